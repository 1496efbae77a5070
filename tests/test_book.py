"""utils.book.glue: the book gets the value, a learner outside the book sees it printed."""

import pytest

from utils.book import glue, shown


def test_glue_prints_the_number_the_prose_quotes(capsys):
    glue("recovery_wiki", 63.6123456)
    glue("removed", "12, 13, 14")
    glue("steps", 1200)
    printed = capsys.readouterr().out.splitlines()
    assert printed == ["recovery_wiki = 63.61", "removed = 12, 13, 14", "steps = 1,200"]


def test_shown_formats_and_glue_refuses_bad_names():
    assert shown(0.000123456) == "0.0001235" and shown(True) == "True"
    with pytest.raises(ValueError, match="name"):
        glue("not a name", 1.0)


def test_budget_tier_follows_quick_the_device_and_the_override(monkeypatch):
    from utils.book import budget_tier

    monkeypatch.delenv("REARCH_BUDGET", raising=False)
    monkeypatch.setenv("REARCH_QUICK", "1")
    assert budget_tier() == "quick"
    monkeypatch.delenv("REARCH_QUICK")
    monkeypatch.setenv("REARCH_DEVICE", "cpu")
    assert budget_tier() == "cpu"
    monkeypatch.setenv("REARCH_BUDGET", "gpu")
    assert budget_tier() == "gpu"
    monkeypatch.setenv("REARCH_BUDGET", "fast")
    with pytest.raises(ValueError, match="REARCH_BUDGET"):
        budget_tier()


def test_recorded_time_reads_the_latest_successful_run(tmp_path):
    import json

    from utils.book import recorded_time

    assert recorded_time("CH02/x.ipynb", "gpu", None) == "not yet recorded"
    assert recorded_time("CH02/x.ipynb", "gpu", tmp_path) == "not yet recorded"
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "chapter_times-gpu.json").write_text(json.dumps({"machine": "NVIDIA H200, Python 3.12", "runs": [
        {"chapter": "CH02/x.ipynb", "date": "2026-11-29", "seconds": 600},
        {"chapter": "CH02/x.ipynb", "date": "2026-11-30", "seconds": 150},
        {"chapter": "CH02/x.ipynb", "date": "2026-12-01", "seconds": 10, "error": "failed"}]}))
    assert recorded_time("CH02/x.ipynb", "gpu", tmp_path) == "about 2 minutes (NVIDIA H200, 2026-11-30)"
    assert recorded_time("CH03/y.ipynb", "gpu", tmp_path) == "not yet recorded"
    with pytest.raises(ValueError, match="kind"):
        recorded_time("CH02/x.ipynb", "tpu", tmp_path)


def test_recorded_runs_keep_the_latest_valid_run_of_each_chapter(tmp_path):
    import json

    from utils.book import recorded_runs, recorded_time

    assert recorded_runs("cpu", None) == {} and recorded_runs("cpu", tmp_path) == {}
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "chapter_times-cpu.json").write_text(json.dumps({"machine": "x86_64, 2 CPU cores, Python 3.11", "runs": [
        {"chapter": "CH02/x.ipynb", "date": "2026-11-30", "seconds": 600},
        {"chapter": "CH02/x.ipynb", "date": "2026-11-29", "seconds": 900},  # older, recorded later
        {"chapter": "CH03/y.ipynb", "date": "2026-11-29", "seconds": 40},
        {"chapter": "CH03/y.ipynb", "date": "2026-11-29", "seconds": 50, "machine": "another machine"},  # same day, later
        {"chapter": "CH03/y.ipynb", "date": "2026-12-01", "seconds": 5, "error": "CellExecutionError"},
        {"chapter": "CH04/z.ipynb", "date": "2026-12-01", "seconds": None}]}))
    runs = recorded_runs("cpu", tmp_path)
    assert sorted(runs) == ["CH02/x.ipynb", "CH03/y.ipynb"]  # failed and untimed runs do not count
    assert runs["CH02/x.ipynb"]["seconds"] == 600 and runs["CH02/x.ipynb"]["machine"] == "x86_64, 2 CPU cores, Python 3.11"
    assert runs["CH03/y.ipynb"]["seconds"] == 50 and runs["CH03/y.ipynb"]["machine"] == "another machine"
    assert recorded_time("CH02/x.ipynb", "cpu", tmp_path) == "about 10 minutes (x86_64, 2 CPU cores, 2026-11-30)"
    assert recorded_time("CH03/y.ipynb", "cpu", tmp_path) == "about 1 minute (another machine, 2026-11-29)"
    assert recorded_time("CH04/z.ipynb", "cpu", tmp_path) == "not yet recorded"
    with pytest.raises(ValueError, match="kind"):
        recorded_runs("tpu", tmp_path)


def test_runs_with_a_changed_budget_are_found_by_their_glued_values_not_taken_as_the_chapters_time(tmp_path):
    import json

    from utils.book import recorded_glued, recorded_runs

    assert recorded_glued("CH02/x.ipynb", "cpu", None, {"distill_steps": "60"}) is None
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "chapter_times-cpu.json").write_text(json.dumps({"machine": "x86_64, 2 CPU cores", "runs": [
        {"chapter": "CH02/x.ipynb", "date": "2026-12-06", "seconds": 950, "glued": {"distill_steps": "60", "recovery_wiki": "75.1"}},
        {"chapter": "CH02/x.ipynb", "date": "2026-12-07", "seconds": 980, "glued": {"distill_steps": "60", "recovery_wiki": "75.3"},
         "overrides": {"REARCH_DISTILL_STEPS": "60"}},
        {"chapter": "CH02/x.ipynb", "date": "2026-12-07", "seconds": 20, "error": "failed", "glued": {"distill_steps": "60"}},
        {"chapter": "CH02/x.ipynb", "date": "2026-12-07", "seconds": 580, "glued": {"distill_steps": "36", "recovery_wiki": "70"}},
        {"chapter": "CH03/y.ipynb", "date": "2026-12-08", "seconds": 40, "glued": {"distill_steps": "60"}}]}))
    # the chapter's time is its own budget's run; the run with overrides is not it
    assert recorded_runs("cpu", tmp_path)["CH02/x.ipynb"]["seconds"] == 580
    # ... but its glued numbers are found by value: the latest valid run of that chapter that glued them
    found = recorded_glued("CH02/x.ipynb", "cpu", tmp_path, {"distill_steps": "60"})
    assert found["glued"]["recovery_wiki"] == "75.3" and found["machine"] == "x86_64, 2 CPU cores"
    assert recorded_glued("CH02/x.ipynb", "cpu", tmp_path, {"distill_steps": 36})["seconds"] == 580
    assert recorded_glued("CH02/x.ipynb", "cpu", tmp_path, {"distill_steps": "80"}) is None
    from utils.book import describe_run
    assert describe_run(found, "cpu") == "about 16 minutes (x86_64, 2 CPU cores, 2026-12-07)"
    with pytest.raises(ValueError, match="where"):
        recorded_glued("CH02/x.ipynb", "cpu", tmp_path, {})
    with pytest.raises(ValueError, match="kind"):
        recorded_glued("CH02/x.ipynb", "tpu", tmp_path, {"distill_steps": "60"})


def test_glue_gives_the_book_plain_numbers_for_numpy_and_torch_scalars(monkeypatch, capsys):
    # the book's {glue:text} roles format the glued text: "np.float64(0.99)" cannot be formatted (a site build
    # warned and left the sentence without its number), the Python float 0.99 can
    import numpy as np
    import torch

    import utils.book as book

    received = {}
    monkeypatch.setattr(book, "_myst_glue", lambda name, value, display=False: received.update({name: value}))
    book.glue("ratio", np.float64(0.9933))
    book.glue("count", np.int64(7))
    book.glue("loss", torch.tensor(0.25))
    assert received == {"ratio": 0.9933, "count": 7, "loss": 0.25}
    assert all(type(value) in (float, int) for value in received.values())
    assert "np.float64" not in capsys.readouterr().out

import contextlib
import json
import math

import pytest
import torch

from utils.evaluation import (LM_EVAL_TASKS, batch_nll, count_parameters, generate, model_size_bytes, perplexity,
                              run_lm_eval, write_lm_eval_tasks)
from utils.speed import measure_speed
from utils.data import load_corpus
from utils.models import tiny_model


def _reference_ppl(model, ids):
    """Plain full-sequence perplexity with transformers' own loss."""
    with torch.no_grad():
        loss = model(ids[None], labels=ids[None]).loss
    return math.exp(loss.item())


def test_perplexity_matches_transformers_loss_when_one_window_covers_all():
    model, _ = tiny_model("tiny-llama")
    ids = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(0))
    assert perplexity(model, ids, window=128, progress=False) == pytest.approx(_reference_ppl(model, ids), rel=1e-5)


def test_sliding_window_scores_each_token_once_and_batching_does_not_change_it():
    model, _ = tiny_model("tiny-llama")
    ids = torch.randint(0, 256, (301,), generator=torch.Generator().manual_seed(1))
    one = perplexity(model, ids, window=64, stride=32, batch_size=1, progress=False)
    many = perplexity(model, ids, window=64, stride=32, batch_size=5, progress=False)
    assert one == pytest.approx(many, rel=1e-5)
    no_overlap = perplexity(model, ids, window=64, progress=False)
    assert no_overlap != pytest.approx(one, rel=1e-6)  # context changes the scores


def test_padding_is_masked_in_batch_nll():
    model, _ = tiny_model("tiny-llama")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    nll, count = batch_nll(model, ids)
    padded = torch.tensor([[1, 2, 3, 4, 5, 0, 0], [7, 8, 9, 0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0]])
    nll_padded, count_padded = batch_nll(model, padded, mask)
    nll_second, count_second = batch_nll(model, torch.tensor([[7, 8, 9]]))
    assert count == 4 and count_padded == 4 + 2
    assert nll_padded == pytest.approx(nll + nll_second, rel=1e-5)


def test_perplexity_rejects_bad_input():
    model, _ = tiny_model("tiny-llama")
    with pytest.raises(ValueError, match="1-D"):
        perplexity(model, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, torch.zeros(10, dtype=torch.long), window=4, stride=8)


def test_parameter_counts_by_component_add_up_and_tied_weights_count_once():
    model, _ = tiny_model("tiny-llama")
    counts = count_parameters(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())  # parameters() dedups tied weights
    assert counts["lm_head"] == 0 and counts["embedding"] == 320 * 64
    assert counts["mlp"] == 4 * 3 * 64 * 128
    assert counts["attention"] == 4 * (64 * 64 * 2 + 64 * 32 * 2)
    assert model_size_bytes(model) == counts["total"] * 4
    untied, _ = tiny_model("tiny-mistral")
    assert count_parameters(untied)["lm_head"] == 320 * 64


def test_measure_speed_reports_medians(tiny):
    name, model, _ = tiny
    speed = measure_speed(model, prompt_tokens=16, new_tokens=4, repeats=2)
    assert speed["ttft_ms"] > 0 and speed["decode_tokens_per_s"] > 0 and speed["prefill_tokens_per_s"] > 0
    with pytest.raises(ValueError):
        measure_speed(model, new_tokens=1)


def test_generate_uses_chat_template():
    model, tokenizer = tiny_model("tiny-llama")
    text = generate(model, tokenizer, "Hello", max_new_tokens=5)
    assert isinstance(text, str)


def test_lm_eval_tasks_are_disjoint_from_calibration_and_run(tmp_path):
    folder = write_lm_eval_tasks(tmp_path, analogy_items=20, sms_per_class=5)
    sms = [json.loads(line) for line in (folder / "rearch_sms_spam.jsonl").read_text().splitlines()]
    assert sorted(doc["label"] for doc in sms) == [0] * 5 + [1] * 5
    calibration = set(load_corpus("sms", "calibration")) | set(load_corpus("sms", "train"))
    assert not calibration & {doc["text"] for doc in sms}
    analogy = [json.loads(line) for line in (folder / "rearch_analogy.jsonl").read_text().splitlines()]
    assert all(len(doc["choices"]) == 4 and len(set(doc["choices"])) == 4 for doc in analogy)
    model, tokenizer = tiny_model("tiny-llama")
    table = run_lm_eval(model, tokenizer, task_folder=folder, batch_size=8)
    assert list(table["task"]) == list(LM_EVAL_TASKS)
    assert ((table["value"] >= 0) & (table["value"] <= 1)).all()
    with pytest.raises(ValueError, match="Unknown tasks"):
        run_lm_eval(model, tokenizer, tasks=("hellaswag",), task_folder=folder)


def test_lm_eval_runs_quietly_and_failures_keep_its_output(tmp_path, capfd):
    """lm-eval's warnings and progress bars do not reach the cell output; a failure still raises with them."""
    folder = write_lm_eval_tasks(tmp_path, analogy_items=20, sms_per_class=5)
    model, tokenizer = tiny_model("tiny-llama")
    capfd.readouterr()
    run_lm_eval(model, tokenizer, tasks=("rearch_sms_spam",), task_folder=folder, limit=4, batch_size=8)
    printed = capfd.readouterr()
    assert "pretrained" not in printed.err and "it/s" not in printed.err, printed.err[-800:]
    (folder / "rearch_sms_spam.jsonl").write_text("not json\n")
    with pytest.raises(RuntimeError, match="lm-eval failed"):
        run_lm_eval(model, tokenizer, tasks=("rearch_sms_spam",), task_folder=folder, limit=4, batch_size=8)


def test_cached_perplexity_computes_once_verifies_and_keys_by_model_and_text(tmp_path, monkeypatch):
    import copy
    import json

    import utils.evaluation as evaluation
    from utils.evaluation import cached_perplexity, model_fingerprint, perplexity

    model, _ = tiny_model("tiny-llama")
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(0))
    expected = perplexity(model, ids, window=16, progress=False)
    assert cached_perplexity(model, ids, window=16, progress=False, cache_dir=tmp_path) == expected
    files = list((tmp_path / "perplexity").glob("*.json"))
    assert len(files) == 1
    calls = []
    monkeypatch.setattr(evaluation, "perplexity", lambda *a, **k: calls.append(1) or 99.0)
    assert cached_perplexity(model, ids, window=16, progress=False, cache_dir=tmp_path) == expected  # from the file
    assert calls == []
    # another window, other text, or changed weights: a new key, computed
    assert cached_perplexity(model, ids, window=8, progress=False, cache_dir=tmp_path) == 99.0
    assert cached_perplexity(model, ids[:30], window=16, progress=False, cache_dir=tmp_path) == 99.0
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0
    assert model_fingerprint(changed) != model_fingerprint(model)
    assert model_fingerprint(copy.deepcopy(model)) == model_fingerprint(model)
    assert cached_perplexity(changed, ids, window=16, progress=False, cache_dir=tmp_path) == 99.0
    assert len(calls) == 3
    # a damaged or foreign file is not trusted: recomputed and rewritten
    stored = json.loads(files[0].read_text())
    files[0].write_text(json.dumps({**stored, "perplexity": float("nan")}))
    assert cached_perplexity(model, ids, window=16, progress=False, cache_dir=tmp_path) == 99.0
    files[0].write_text("{not json")
    assert cached_perplexity(model, ids, window=16, progress=False, cache_dir=tmp_path) == 99.0
    assert json.loads(files[0].read_text())["perplexity"] == 99.0
    with pytest.raises(ValueError, match="1-D tensor"):
        cached_perplexity(model, ids[None], cache_dir=tmp_path)


def test_cached_lm_eval_computes_once_and_keys_by_model_tasks_and_settings(tmp_path, monkeypatch):
    """The first call runs lm-eval and stores the table; the same model and settings read it back (the table
    equals run_lm_eval's); changed weights, another limit or changed task files run again; a damaged file
    is recomputed."""
    import copy

    import pandas as pd

    import utils.evaluation as evaluation
    from utils.evaluation import cached_lm_eval

    folder = write_lm_eval_tasks(tmp_path / "tasks", analogy_items=8, sms_per_class=3)
    model, tokenizer = tiny_model("tiny-llama")
    direct = run_lm_eval(model, tokenizer, task_folder=folder, batch_size=8)
    first = cached_lm_eval(model, tokenizer, task_folder=folder, batch_size=8, cache_dir=tmp_path / "cache")
    pd.testing.assert_frame_equal(first, direct)
    calls = []
    real = evaluation.run_lm_eval
    monkeypatch.setattr(evaluation, "run_lm_eval", lambda *a, **k: calls.append(k.get("limit")) or real(*a, **k))
    again = cached_lm_eval(model, tokenizer, task_folder=folder, batch_size=8, cache_dir=tmp_path / "cache")
    pd.testing.assert_frame_equal(again, direct)
    assert calls == []
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.model.layers[0].mlp.down_proj.weight.mul_(0.5)
    cached_lm_eval(changed, tokenizer, task_folder=folder, batch_size=8, cache_dir=tmp_path / "cache")
    cached_lm_eval(model, tokenizer, task_folder=folder, limit=2, batch_size=8, cache_dir=tmp_path / "cache")
    assert calls == [None, 2]
    (folder / "rearch_analogy.jsonl").write_text((folder / "rearch_analogy.jsonl").read_text().replace("a", "b", 1))
    cached_lm_eval(model, tokenizer, task_folder=folder, batch_size=8, cache_dir=tmp_path / "cache")
    assert len(calls) == 3
    stored = sorted((tmp_path / "cache" / "lm_eval").glob("*.json"))
    assert len(stored) == 4
    for path in stored:
        path.write_text("{not json")
    cached_lm_eval(changed, tokenizer, task_folder=folder, batch_size=8, cache_dir=tmp_path / "cache")
    assert len(calls) == 4
    with pytest.raises(ValueError, match="Unknown tasks"):
        cached_lm_eval(model, tokenizer, tasks=("hellaswag",), task_folder=folder, cache_dir=tmp_path / "cache")


def test_cached_perplexity_keys_and_passes_the_bos_token(tmp_path):
    """With a BOS token (a tokenizer that begins every text with one), the cached value is perplexity's with
    that BOS, under its own key: a value measured without it is never reused."""
    from utils.evaluation import cached_perplexity, perplexity

    model, _ = tiny_model("tiny-llama")
    ids = torch.randint(3, 256, (40,), generator=torch.Generator().manual_seed(1))
    plain = cached_perplexity(model, ids, window=16, progress=False, cache_dir=tmp_path)
    with_bos = cached_perplexity(model, ids, window=16, progress=False, cache_dir=tmp_path, bos_token_id=1)
    assert with_bos == perplexity(model, ids, window=16, progress=False, bos_token_id=1)
    assert with_bos != plain
    assert len(list((tmp_path / "perplexity").glob("*.json"))) == 2
    with pytest.raises(TypeError, match="bos_token_id"):
        cached_perplexity(model, ids, window=16, cache_dir=tmp_path, bos_token_id="<s>")


def test_every_chapter_perplexity_begins_its_windows_the_way_the_tokenizer_begins_a_text():
    """Each `perplexity`/`cached_perplexity` call in the chapters passes the tokenizer's BOS (`BOS`, defined
    from `utils.data.bos_ids` right after the model is loaded), so a model whose tokenizer adds one (Llama 3,
    Gemma) is measured on text shaped as it is in use."""
    import json
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    calls = 0
    for path in sorted(root.glob("CH0*/*.ipynb")):
        code = "\n".join("".join(cell["source"]) for cell in json.loads(path.read_text())["cells"]
                         if cell["cell_type"] == "code")
        for call in re.findall(r"perplexity\([^()]*\)", code):
            calls += 1
            assert "bos_token_id=BOS" in call, f"{path.name}: {call}"
        if "bos_token_id=BOS" in code:
            assert "BOS = (bos_ids(tokenizer) or [None])[0]" in code, path.name
    assert calls >= 10


def test_measure_speed_rounds_interleaves_and_takes_medians(tiny):
    from utils.speed import measure_speed_rounds, median_over_rounds

    _, model, _ = tiny
    order = []

    @contextlib.contextmanager
    def noting(name):
        order.append(name)
        yield

    runs = measure_speed_rounds({"a": model, "b": model}, rounds=3, warmup=0, prompt_tokens=8, new_tokens=3,
                                contexts={"a": lambda: noting("a"), "b": lambda: noting("b")})
    assert order == ["a", "b"] * 3
    assert {name: len(rows) for name, rows in runs.items()} == {"a": 3, "b": 3}
    assert all(row["repeats"] == 1 and row["new_tokens"] == 3 for rows in runs.values() for row in rows)
    medians = median_over_rounds(runs, "ttft_ms")
    assert medians["a"] == sorted(row["ttft_ms"] for row in runs["a"])[1]
    with pytest.raises(ValueError, match="contexts"):
        measure_speed_rounds({"a": model}, contexts={"c": contextlib.nullcontext})
    with pytest.raises(ValueError, match="repeats"):
        measure_speed_rounds({"a": model}, repeats=3)
    with pytest.raises(ValueError, match="decode_tokens"):
        median_over_rounds(runs, "tokens")

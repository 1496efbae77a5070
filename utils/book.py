"""Numbers for the prose: one `glue` that serves the book and a learner in Colab or Jupyter alike.

The book writes numbers into sentences with myst-nb's `{glue:text}` roles, filled from values a cell
glued. Outside the book (Colab, JupyterLab, VS Code) those roles stay as markup, so every glued value is
also printed in the cell's output, as a short `name = value` line right above the sentence that uses
it. Where myst-nb is not installed (Colab needs no Sphinx), `glue` only prints.

The chapters' run times come from the same place for every page that quotes them: `recorded_runs` reads
the recorded runs of benchmarks/results/chapter_times-<kind>.json (the latest valid run per chapter), and
`recorded_time` turns one into a phrase for a chapter's opening (`describe_run`). `recorded_glued` finds
a recorded run by the values it glued (a larger budget than the book's, run once and recorded).
`book_log_times` reads a build's log, and `build_environment` the settings the Makefile gives every process
of a build, for scripts that run chapters outside make.
"""

from __future__ import annotations

import numbers
import os
import re

try:  # the book's builder; absent in a plain notebook environment
    from myst_nb import glue as _myst_glue
except ImportError:  # pragma: no cover - depends on the environment
    _myst_glue = None


def shown(value: object) -> str:
    """A short, readable rendering of a glued value: 4 significant digits for floats.

    A NaN or infinite number is refused (a ValueError): a sentence of the book never quotes one.
    """
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        from .checks import check_number  # here, not at the top: importing the book stays light (no torch)

        check_number("value", value)
    return _shown(value)


def _shown(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return str(value)
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    return f"{float(value):.4g}"


def glue(name: str, value: object, display: bool = False) -> None:
    """Make `value` available to the book's prose under `name`, and print `name = value` for a learner
    reading the notebook outside the book.

    Same signature as `myst_nb.glue` (the book's roles read `{glue:text}`name:.1f``); `display=True` also
    shows the value as the book would. Nothing is hidden: the printed line is the number the sentence
    below it quotes.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"`name` must be an identifier-like string for the book's glue roles, got {name!r}.")
    if getattr(value, "shape", None) == () and hasattr(value, "item"):
        # a NumPy scalar or a 0-d tensor becomes the Python number it holds: the book's roles read the glued
        # text, and "np.float64(0.99)" or "tensor(0.99)" is not a number they can format
        value = value.item()
    if _myst_glue is not None:
        _myst_glue(name, value, display=display)
    elif display:
        from IPython.display import display as show

        show(value)
    print(f"{name} = {_shown(value)}")  # as glued, even a NaN (the printed line shows what the book got)


BUDGET_TIERS = ("quick", "cpu", "gpu")


def budget_tier() -> str:
    """Which budgets a chapter's parameters cell picks: "quick", "cpu" or "gpu".

    "quick" when REARCH_QUICK=1 (the tests run every chapter on a tiny model in seconds); otherwise "gpu"
    when the models will live on a CUDA device (the same choice `utils.models.load_model` makes, so
    REARCH_DEVICE=cpu on a GPU machine gives "cpu"), else "cpu". REARCH_BUDGET ("quick", "cpu", "gpu")
    overrides, for example to try the CPU budgets on a GPU. A chapter writes each budget as
    `{"quick": ..., "cpu": ..., "gpu": ...}[TIER]`, so one parameters cell serves every machine.
    """
    from .models import default_device_and_dtype

    chosen = os.environ.get("REARCH_BUDGET")
    if chosen:
        if chosen not in BUDGET_TIERS:
            raise ValueError(f"REARCH_BUDGET must be one of {', '.join(BUDGET_TIERS)}, got {chosen!r}.")
        return chosen
    if os.environ.get("REARCH_QUICK") == "1":
        return "quick"
    device, _ = default_device_and_dtype()
    return "gpu" if device.type == "cuda" else "cpu"


def _valid_runs(kind: str, root: str | os.PathLike | None) -> list[dict]:
    """The runs of `benchmarks/results/chapter_times-<kind>.json` under `root` that have seconds and no error,
    in the order they were recorded, each with "machine" filled in from the file when it names none."""
    import json
    from pathlib import Path

    if kind not in ("cpu", "gpu"):
        raise ValueError(f"kind must be 'cpu' or 'gpu', got {kind!r}.")
    path = None if root is None else Path(root) / "benchmarks" / "results" / f"chapter_times-{kind}.json"
    if path is None or not path.is_file():
        return []
    record = json.loads(path.read_text())
    return [{**run, "machine": run.get("machine") or record.get("machine", "")}
            for run in record.get("runs", []) if run.get("seconds") and not run.get("error")]


def _newer(run: dict, than: dict | None) -> bool:
    """Whether `run` replaces `than` as the latest: a later date, or the same date recorded later."""
    return than is None or run.get("date", "") >= than.get("date", "")


def recorded_runs(kind: str, root: str | os.PathLike | None) -> dict[str, dict]:
    """The latest valid recorded run of every chapter on `kind` ("cpu" or "gpu"): {chapter: run}.

    Reads `benchmarks/results/chapter_times-<kind>.json` under the repository `root` (written by
    `benchmarks/chapter_times.py` and by the book builds). A run with an error or without seconds is
    skipped; of the rest, the latest date wins, and of two runs on the same date the one recorded later.
    `chapter` is the notebook's path from the root; each run is the file's record ("chapter", "date",
    "seconds", ...) with "machine" filled in from the file when the run does not name its own. Runs made
    with a budget changed through the environment (their "overrides", see `benchmarks/chapter_times.py`)
    are not the chapter's own budget and are skipped too (`recorded_glued` finds them). Empty when
    there is no record, also when `root` is None (a notebook opened alone from its Colab badge).
    """
    latest: dict[str, dict] = {}
    for run in _valid_runs(kind, root):
        if not run.get("overrides") and _newer(run, latest.get(run["chapter"])):
            latest[run["chapter"]] = run
    return latest


def recorded_glued(chapter: str, kind: str, root: str | os.PathLike | None,
                   where: dict[str, str]) -> dict | None:
    """The latest recorded run of `chapter` on `kind` whose glued values include every item of `where`.

    For a chapter that shows, beside its own result, the result of a larger budget that takes too long for
    the book (a run made with an environment variable such as REARCH_DISTILL_STEPS=60 and recorded by
    `benchmarks/chapter_times.py` with the values the chapter glued). `where` names glued values as the run
    printed them, for example {"distill_steps": "60"}. Returns the run's record ("date", "seconds",
    "commit", "machine", "glued" ...) or None when no valid run matches (also when `root` is None).
    """
    if not isinstance(where, dict) or not where:
        raise ValueError(f"where must be a non-empty dict of glued names and values, got {where!r}.")
    found = None
    for run in _valid_runs(kind, root):
        glued = run.get("glued") or {}
        if (run.get("chapter") == chapter and all(glued.get(name) == str(value) for name, value in where.items())
                and _newer(run, found)):
            found = run
    return found


def describe_run(run: dict, kind: str) -> str:
    """A recorded run (from `recorded_runs` or `recorded_glued`) as a phrase for the prose: its minutes, the
    machine and the date, for example "about 9 minutes (NVIDIA H200, 2026-11-30)"."""
    if kind not in ("cpu", "gpu"):
        raise ValueError(f"kind must be 'cpu' or 'gpu', got {kind!r}.")
    where = run["machine"].split(",")[0] if kind == "gpu" else run["machine"].split(", Python")[0]
    minutes = max(1, round(float(run["seconds"]) / 60))
    return f"about {minutes} minute{'' if minutes == 1 else 's'} ({where}, {run.get('date', 'undated')})"


def recorded_time(chapter: str, kind: str, root: str | os.PathLike | None) -> str:
    """The latest recorded run time of a chapter on `kind` ("cpu" or "gpu") as a phrase for the prose.

    The run is the one `recorded_runs` keeps for `chapter` (the notebook's path from the repository `root`),
    described by `describe_run`, for example "about 9 minutes (NVIDIA H200, 2026-11-30)"; "not yet
    recorded" when there is no valid run (also when `root` is None, as in a notebook opened alone from its
    Colab badge).
    """
    run = recorded_runs(kind, root).get(chapter)
    return "not yet recorded" if run is None else describe_run(run, kind)


# ---------------------------------------------------------------------------------------------------
# Build logs
# ---------------------------------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_READING = re.compile(r"reading sources\.\.\. \[\s*\d+%\] (\S+)")
_EXECUTING = re.compile(r"(\S+)\.ipynb: Executing notebook")
_EXECUTED = re.compile(r"Executed notebook in ([\d.]+) seconds")
_CACHED = re.compile(r"Using cached notebook|Cached executed notebook|retrieved from cache", re.IGNORECASE)


def book_log_times(log: str) -> list[tuple[str, float | None]]:
    """(page, seconds executed, or None when it came from the cache) for every notebook page of a book build's log.

    Reads the lines Sphinx writes as it reads each page ("reading sources... [ 40%] CH05/CH05_width_pruning")
    and myst-nb's ("Executed notebook in 512.34 seconds", or that it came from the execution cache), colour
    codes included; `make book` keeps them in _build/book.log.
    """
    if not isinstance(log, str):
        raise TypeError(f"log must be the text of a build log (str), got {type(log).__name__}.")
    times: dict[str, float | None] = {}
    page = None
    for line in log.splitlines():
        line = _ANSI.sub("", line)
        reading = _READING.search(line) or _EXECUTING.search(line)
        if reading:
            page = reading.group(1)
            if "/" in page and not reading.re is _READING:
                page = "/".join(page.split("/")[-2:])
            continue
        executed = _EXECUTED.search(line)
        if executed and page:
            times[page] = float(executed.group(1))
        elif _CACHED.search(line) and page and page not in times:
            times[page] = None
    return list(times.items())


_EXPORTED_MALLOC = re.compile(r"^export (MALLOC_\w+_) \?= (\S+)$", re.M)


def build_environment(root: str | os.PathLike) -> dict[str, str]:
    """The speed settings the Makefile in `root` exports to everything make runs (glibc's malloc settings,
    `MALLOC_..._` variables), read from the Makefile, by name: for scripts that run chapters or benchmarks
    outside make and should run them as `make book` does (`benchmarks/chapter_times.py`,
    `benchmarks/cpu_allocator.py`). Raises FileNotFoundError when `root` holds no Makefile.
    """
    makefile = os.path.join(os.fspath(root), "Makefile")
    if not os.path.isfile(makefile):
        raise FileNotFoundError(f"root must be the course's folder (with its Makefile); no Makefile in {os.fspath(root)!r}.")
    with open(makefile, encoding="utf-8") as f:
        return dict(_EXPORTED_MALLOC.findall(f.read()))

"""Run chapter notebooks on the embedded model and record how long each took, on a CPU or a GPU.

    python benchmarks/chapter_times.py CH02/CH02_first_surgery.ipynb [more notebooks] [--commit abc1234]

Each notebook is executed with nbclient from its own folder, with the environment as it is (so the
chapter picks the embedded model and, on a CUDA machine, its GPU budgets) plus the Makefile's malloc settings
where unset (`utils.book.build_environment`, so the times compare with `make book`'s), and its wall time is appended
to `chapter_times-<cpu|gpu>.json` (the file the chapters' "Before you start" cells read) in $OUT when set,
else in benchmarks/results/. A notebook that fails is recorded with its error and makes the script exit 1.
The numbers each chapter glued (`utils.book.glue` prints them as `name = value`) are kept in the record too,
so a run on another machine can be compared with the book's. A run with a budget or model changed through
the environment (REARCH_DISTILL_STEPS=60, say) is recorded with those "overrides": the chapters' time estimates
skip it, and a chapter can quote its glued result (utils.book.recorded_glued).

    python benchmarks/chapter_times.py CH02/CH02_first_surgery.ipynb --book-build /path/to/clone --commit abc1234

records instead the chapters that a finished `make book` in that clone executed (their seconds from its
_build/book.log, their glued numbers from its _build/jupyter_execute copies; no cell times).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def machine() -> tuple[str, str]:
    """('gpu' or 'cpu', a one-line description of the machine and its versions)."""
    import torch
    import transformers

    versions = f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}"
    if torch.cuda.is_available():
        return "gpu", f"{torch.cuda.get_device_name(0)}, {versions}"
    from utils.models import compute_precision

    return "cpu", f"{platform.machine()}, {os.cpu_count()} CPU cores, {compute_precision()}, {versions}"


GLUED = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*) = (.+)$")


def glued_values(notebook) -> dict[str, str]:
    """The `name = value` lines that `utils.book.glue` printed in a notebook's outputs, by name."""
    found = {}
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and output.get("name") == "stdout":
                for line in output.get("text", "").splitlines():
                    match = GLUED.match(line.strip())
                    if match:
                        found[match.group(1)] = match.group(2)
    return found


def cell_seconds(notebook) -> list[dict[str, object]]:
    """Each executed code cell's wall time (nbclient's execution timestamps), its index and first line, and
    whether it belongs to the exercises (the cells after the notebook's "Exercises" heading): the record
    shows where a chapter spends its time and how long each exercise and solution cell takes."""
    from datetime import datetime

    cells, in_exercises = [], False
    for index, cell in enumerate(notebook.cells):
        source = "".join(cell.get("source", ""))
        if cell.get("cell_type") == "markdown" and source.lstrip().startswith("#"):
            heading = source.lstrip().splitlines()[0].lower()
            in_exercises = "exercise" in heading or (in_exercises and "takeaway" not in heading)
        timing = cell.get("metadata", {}).get("execution", {})
        if cell.get("cell_type") != "code" or "iopub.execute_input" not in timing or "shell.execute_reply" not in timing:
            continue
        begun, ended = (datetime.fromisoformat(timing[key].replace("Z", "+00:00"))
                        for key in ("iopub.execute_input", "shell.execute_reply"))
        cells.append({"cell": index, "first_line": source.splitlines()[0][:80] if source else "",
                      "exercise": in_exercises, "seconds": round((ended - begun).total_seconds(), 1)})
    return cells


def record_book_build(folder: Path, notebooks: list[str], commit: str, description: str, record: dict,
                      path: Path) -> None:
    """Append a run for each of `notebooks` that the `make book` in `folder` executed: its seconds from the
    build log (`utils.book.book_log_times`) and its glued numbers from the executed copy; no cell times (the
    build does not keep them)."""
    import nbformat

    from utils.book import book_log_times

    seconds = dict(book_log_times((folder / "_build" / "book.log").read_text(errors="replace")))
    for name in notebooks:
        page = name.removesuffix(".ipynb")
        if seconds.get(page) is None:
            raise SystemExit(f"{name}: the build in {folder} did not execute it (not in its log, or from the cache)")
        executed = nbformat.read(folder / "_build" / "jupyter_execute" / name, as_version=4)
        run = {"chapter": name, "commit": commit, "date": time.strftime("%Y-%m-%d"), "seconds": seconds[page],
               "machine": description, "source": "make book (jupyter-book, the whole book in one build)",
               "glued": glued_values(executed)}
        record["runs"].append(run)
        print(f"{name}: {run['seconds']:.0f} s (make book)", flush=True)
    path.write_text(json.dumps(record, indent=1) + "\n")


# The environment variables through which a chapter's budget or model can be changed: a run made with any of
# them set is recorded with its "overrides", and the chapters' time estimates (utils.book.recorded_runs) skip it
OVERRIDES = ("REARCH_BUDGET", "REARCH_MODEL", "REARCH_QUICK", "REARCH_DEVICE", "REARCH_DTYPE", "REARCH_DISTILL_STEPS",
             "REARCH_HEAL_STEPS", "REARCH_LORA_STEPS", "REARCH_REFIT_SAMPLES", "REARCH_TAYLOR_SAMPLES", "REARCH_CPU_AUTOCAST")


def overrides() -> dict[str, str]:
    """The budget and model environment variables set for this run (empty for the chapters' own budgets)."""
    return {name: os.environ[name] for name in OVERRIDES if os.environ.get(name)}


def main() -> None:
    import nbformat
    from nbclient import NotebookClient

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="+")
    parser.add_argument("--commit", default=os.environ.get("REARCH_COMMIT", "working tree"))
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    parser.add_argument("--book-build", metavar="FOLDER",
                        help="record the chapters a finished `make book` in FOLDER executed (times from its "
                             "_build/book.log, glued numbers from _build/jupyter_execute) instead of running them")
    args = parser.parse_args()
    kind, description = machine()
    out = Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"chapter_times-{kind}.json"
    if path.exists():
        record = json.loads(path.read_text())
    else:
        record = {"what": "Wall time to execute a chapter notebook on the embedded model (SmolLM2-135M-Instruct), "
                          "nbclient, one notebook at a time, the chapter's own budgets for this kind of machine",
                  "machine": description, "runs": []}
    if args.book_build:
        record_book_build(Path(args.book_build), args.notebooks, args.commit, description, record, path)
        return
    from utils.book import build_environment

    for name, value in build_environment(ROOT).items():  # the kernels nbclient starts inherit them, as make's do
        os.environ.setdefault(name, value)
    failed = False
    for name in args.notebooks:
        notebook_path = (ROOT / name).resolve()
        notebook = nbformat.read(notebook_path, as_version=4)
        client = NotebookClient(notebook, timeout=args.timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(notebook_path.parent)}})
        start = time.perf_counter()
        error = None
        try:
            client.execute()
        except Exception as exception:  # recorded, and the script fails at the end
            text = re.sub(r"\x1b\[[0-9;]*m", "", str(exception) or traceback.format_exc())  # without colours
            # the failing cell's source (head of the message) and the error itself (its tail)
            error = f"{type(exception).__name__}: {text if len(text) < 2000 else text[:1000] + ' ... ' + text[-1000:]}"
            failed = True
        seconds = round(time.perf_counter() - start, 1)
        run = {"chapter": str(notebook_path.relative_to(ROOT)), "commit": args.commit,
               "date": time.strftime("%Y-%m-%d"), "seconds": seconds, "machine": description,
               "glued": glued_values(notebook), "cells": cell_seconds(notebook)}
        changed = overrides()
        if changed:
            run["overrides"] = changed
        if error:
            run["error"] = error
        record["runs"].append(run)
        path.write_text(json.dumps(record, indent=1) + "\n")
        print(f"{run['chapter']}: {seconds:.0f} s{' FAILED ' + error if error else ''}", flush=True)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()

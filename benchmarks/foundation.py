"""Foundation targets on this machine: load time of the embedded model from its cache, and CH03's
execution time on the embedded model. Writes benchmarks/results/foundation.json.

Run: PYTHONPATH=. .venv/bin/python benchmarks/foundation.py   (after `make test` or `make book` once)
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "foundation.json"
LOAD = ("import time, torch, transformers; start = time.perf_counter(); from utils.models import load_model; "
        "load_model('embedded'); print(time.perf_counter() - start)")


def load_seconds(repeats: int = 3) -> list[float]:
    """Load the embedded model from the cache in fresh processes (torch/transformers imported before the
    clock starts), after one warm-up run that also makes sure the cache exists."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = []
    for _ in range(repeats + 1):
        output = subprocess.run([sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, check=True)
        runs.append(float(output.stdout.strip().splitlines()[-1]))
    return runs[1:]


def notebook_seconds(path: Path) -> float:
    """Execute a chapter notebook on the embedded model (as the book build does) and time it."""
    notebook = nbformat.read(path, as_version=4)
    env_model = os.environ.pop("REARCH_MODEL", None)
    os.environ.pop("REARCH_QUICK", None)
    start = time.perf_counter()
    NotebookClient(notebook, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    if env_model:
        os.environ["REARCH_MODEL"] = env_model
    return time.perf_counter() - start


def main() -> None:
    loads = load_seconds()
    ch03 = notebook_seconds(ROOT / "CH03" / "CH03_model_anatomy.ipynb")
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
        "embedded_load_from_cache_s": {"runs": loads, "median": statistics.median(loads), "target": 5.0},
        "ch03_execution_s": {"value": ch03, "target": 180.0},
        "date": time.strftime("%Y-%m-%d"),
    }
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

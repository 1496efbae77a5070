"""The GPU test lane: the unit tests and every chapter notebook on a CUDA device, once per dtype.

    make test-gpu                      # or: python benchmarks/gpu_lane.py --dtypes bf16,fp16

For each dtype the whole suite runs under pytest with REARCH_DEVICE=cuda and REARCH_DTYPE=<dtype>, which
`utils.models.load_model` honours wherever no device or dtype is passed, so every tiny model of the unit
tests and every chapter (on a tiny model, REARCH_QUICK=1) lives on the GPU in that dtype. Left out: the
site test (it needs Chromium and builds the book on the CPU path), the Colab-layout test (it clones the
repository; the CPU lane runs it) and the tests on the embedded model, which need its 98 MB wheel
(skipped through REARCH_SKIP_EMBEDDED=1; set REARCH_SKIP_EMBEDDED=0 where the wheel is installed).
The results file names the card, the versions, and each test file's and notebook's pass/fail counts per
dtype; it is written to $OUT when set (the device machine) or benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEFT_OUT = ["tests/test_site.py", "tests/test_colab_layout.py", "tests/test_embedded.py"]
NOTEBOOK_FOLDERS = ["CH02", "CH03", "CH04", "CH05", "CH06", "CH07", "CH08", "appendix"]


def versions() -> dict[str, str]:
    import torch
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version(), "torch": torch.__version__,
             "cuda": str(torch.version.cuda), "card": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"}
    for package in ("transformers", "accelerate", "peft", "lm_eval", "nbval", "optipfair"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def run(dtype: str, out: Path, extra: list[str]) -> dict[str, object]:
    """Run the suite in one dtype and summarize the junit report by file (tests) and by notebook."""
    report = out / f"junit-{dtype}.xml"
    env = dict(os.environ, REARCH_DEVICE="cuda", REARCH_DTYPE=dtype, REARCH_MODEL="tiny-llama", REARCH_QUICK="1",
               REARCH_SKIP_EMBEDDED=os.environ.get("REARCH_SKIP_EMBEDDED", "1"),
               MPLBACKEND="Agg", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
               *[f"--ignore={path}" for path in LEFT_OUT], "tests", *NOTEBOOK_FOLDERS, *extra]
    start = time.perf_counter()
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    (out / f"pytest-{dtype}.log").write_text(completed.stdout + completed.stderr)
    return {"dtype": dtype, "exit_code": completed.returncode, "seconds": round(seconds, 1), **summarize(report)}


def summarize(report: Path) -> dict[str, object]:
    """Count one junit report's outcomes by test file and by notebook, with each failure's message."""
    by_file: dict[str, dict[str, int]] = {}
    failures = []
    for case in ET.parse(report).getroot().iter("testcase"):
        name = case.get("file") or case.get("classname", "").replace(".", "/")
        if ".ipynb" in (case.get("classname") or ""):
            name = case.get("classname")
        key = name.split("::")[0]
        outcome = "failed" if case.find("failure") is not None or case.find("error") is not None else (
            "skipped" if case.find("skipped") is not None else "passed")
        by_file.setdefault(key, {"passed": 0, "failed": 0, "skipped": 0})[outcome] += 1
        if outcome == "failed":
            element = case.find("failure") if case.find("failure") is not None else case.find("error")
            failures.append({"test": f"{case.get('classname')}::{case.get('name')}",
                             "message": (element.get("message") or "")[:400]})
    notebooks = {k: v for k, v in by_file.items() if k.endswith(".ipynb") or ".ipynb" in k}
    return {"passed": sum(v["passed"] for v in by_file.values()), "failed": sum(v["failed"] for v in by_file.values()),
            "skipped": sum(v["skipped"] for v in by_file.values()),
            "notebooks": {k: ("pass" if v["failed"] == 0 else "fail") for k, v in sorted(notebooks.items())},
            "by_file": by_file, "failures": failures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="bf16,fp16")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--commit", default=os.environ.get("REARCH_COMMIT", "working tree"),
                        help="the commit the results belong to (the device machine's copy has no git history)")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("The GPU lane needs a CUDA device (torch.cuda.is_available() is False).")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for dtype in args.dtypes.split(","):
        runs.append(run(dtype, out, args.pytest_args))
        print(f"{dtype}: {runs[-1]['passed']} passed, {runs[-1]['failed']} failed, {runs[-1]['skipped']} skipped "
              f"in {runs[-1]['seconds']:.0f} s; notebooks: {runs[-1]['notebooks']}", flush=True)
    result = {"what": "GPU test lane: unit tests and every chapter notebook (tiny model, REARCH_QUICK=1) on CUDA",
              "date": time.strftime("%Y-%m-%d"), "commit": args.commit, "versions": versions(), "left_out": LEFT_OUT, "runs": runs}
    card = result["versions"]["card"].replace("NVIDIA ", "").replace(" ", "-").lower()
    path = out / f"gpu_lane-{card}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", path)
    if any(run["failed"] for run in runs):
        raise SystemExit(1)


if __name__ == "__main__":
    main()

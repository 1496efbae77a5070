"""The Makefile's malloc settings: they must reach the build's processes and do what its comment says."""

import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

# a loop that makes vocabulary-wide float32 tensors of 201 MB (CH02's logits: 4 x 256 x 49,152) and frees them, as a
# training loop does: the minor page faults of its last round, once glibc's heap has grown to hold the loop
PROBE = """
import resource, torch
logits = torch.randn(4 * 256, 49152)
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    scaled = logits * 0.5
    log_probs = torch.log_softmax(scaled, dim=-1)
    del scaled, log_probs
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(faults)
"""


def makefile_settings() -> dict[str, str]:
    text = (ROOT / "Makefile").read_text()
    found = dict(re.findall(r"^export (MALLOC_\w+_) \?= (\d+)$", text, flags=re.M))
    assert set(found) == set(SETTINGS), f"the Makefile should export {SETTINGS}, found {sorted(found)}"
    return found


def last_round_faults(settings: dict[str, str]) -> int:
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env.update(settings)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")
def test_makefile_malloc_settings_reuse_large_blocks_where_the_default_faults_them_in_every_round():
    pages = 2 * 4 * 256 * 49152 * 4 // 4096  # two tensors a round, 49,152 pages of 4 KiB each
    tuned = last_round_faults(makefile_settings())
    default = last_round_faults({})
    assert tuned < pages // 20, f"with the Makefile's settings a round still took {tuned} page faults"
    assert default > pages // 2, f"glibc's default took only {default} page faults a round (the settings would not matter)"


def test_make_passes_the_malloc_settings_to_what_it_runs():
    # a recipe added for the test prints what its shell sees: what jupyter-book, pytest and their kernels inherit
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    recipe = "probe: ; @echo " + " ".join(f"$${name}" for name in SETTINGS)
    out = subprocess.run(["make", "-s", "--no-print-directory", "--eval", recipe, "probe"], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == list(makefile_settings().values())


def test_chapter_times_runs_chapters_with_the_makefile_settings():
    import importlib.util

    spec = importlib.util.spec_from_file_location("chapter_times", ROOT / "benchmarks" / "chapter_times.py")
    chapter_times = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chapter_times)
    assert chapter_times.build_environment() == makefile_settings()

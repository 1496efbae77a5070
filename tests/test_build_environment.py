"""The Makefile's malloc settings: they must reach the build's processes and do what its comment says."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from utils.book import build_environment

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def script(name: str):
    """A benchmark script of this repository, imported as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def makefile_settings() -> dict[str, str]:
    found = build_environment(ROOT)
    assert set(found) == set(SETTINGS), f"the Makefile should export {SETTINGS}, found {sorted(found)}"
    assert all(value.isdigit() for value in found.values()), found
    return found


def last_round_faults(settings: dict[str, str]) -> int:
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env.update(settings)
    probe = script("cpu_allocator").PAGE_FAULT_PROBE + "print(faults)\n"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")
def test_makefile_malloc_settings_reuse_large_blocks_where_the_default_faults_them_in_every_round():
    pages = script("cpu_allocator").PROBE_PAGES  # two 201 MB tensors a round, 49,152 pages of 4 KiB each
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


def test_build_environment_reads_the_makefile_and_refuses_a_folder_without_one(tmp_path):
    (tmp_path / "Makefile").write_text("export MALLOC_TOP_PAD_ ?= 1\nexport OTHER ?= 2\nMALLOC_ARENA_MAX_ ?= 3\n")
    assert build_environment(tmp_path) == {"MALLOC_TOP_PAD_": "1"}  # exported malloc settings only
    with pytest.raises(FileNotFoundError, match="root"):
        build_environment(tmp_path / "nowhere")


def test_chapter_times_and_the_allocator_benchmark_use_the_makefile_settings():
    assert script("cpu_allocator").TUNED == makefile_settings()
    source = (ROOT / "benchmarks" / "chapter_times.py").read_text()
    assert "os.environ.setdefault(name, value)" in source and "build_environment(ROOT)" in source

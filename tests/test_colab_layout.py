"""A notebook opened from its Colab badge has no repository around it. These tests run notebooks the way
Colab does: the kernel starts in an empty folder that is not the repository, the setup cell is active
(REARCH_SETUP=colab), and the clone is simulated by `git clone` of this repository's folder (so what is
tested is the committed HEAD, as in CI's clean clone). The pip installs are skipped: the packages are here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(str(p.relative_to(ROOT)) for p in [*ROOT.glob("CH*/*.ipynb"), *ROOT.glob("appendix/*.ipynb")])
PROBE = "import utils, os\nprint('UTILS', utils.__file__)\nprint('CWD', os.getcwd())"


@pytest.fixture(scope="module")
def clone_source(tmp_path_factory):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout to simulate the clone")
    return str(ROOT)


def test_every_notebook_starts_with_the_same_setup_cell():
    setups = {}
    for name in NOTEBOOKS:
        cells = json.loads((ROOT / name).read_text())["cells"]
        first = next(c for c in cells if c["cell_type"] == "code")
        source = "".join(first["source"])
        assert 'os.environ.get("REARCH_SETUP") == "colab"' in source, name
        assert f'CHAPTER_FOLDER = "{Path(name).parent.name}"' in source, name
        setups[name] = source.replace(f'CHAPTER_FOLDER = "{Path(name).parent.name}"', "")
        later = "".join("".join(c["source"]) for c in cells[cells.index(first) + 1:] if c["cell_type"] == "code")
        assert "from myst_nb import" not in later, f"{name}: glue must come from utils.book (Colab has no myst-nb)"
        assert json.loads((ROOT / name).read_text())["metadata"].get("accelerator") == "GPU", name
    assert len(set(setups.values())) == 1, "the setup cells differ beyond their chapter folder"


@pytest.mark.parametrize("name", ["CH07/CH07_attention_bypass.ipynb", "appendix/scaling_up.ipynb"])
def test_a_notebook_runs_from_an_empty_folder_as_in_colab(name, clone_source, tmp_path, monkeypatch):
    """CH07 and the appendix read ROOT / "benchmarks": they failed this way before the setup cell."""
    clone = tmp_path / "content" / "rearchitecting-llms"
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("REARCH_SETUP", "colab")
    monkeypatch.setenv("REARCH_CLONE_DIR", str(clone))
    monkeypatch.setenv("REARCH_REPO_URL", clone_source)
    monkeypatch.setenv("REARCH_SKIP_INSTALL", "1")
    monkeypatch.delenv("PYTHONPATH", raising=False)  # utils must come from the clone, not from here
    notebook = nbformat.read(ROOT / name, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(PROBE))
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(empty)}}).execute()
    probe = "".join(output.get("text", "") for output in notebook.cells[-1].outputs)
    assert f"UTILS {clone / 'utils' / '__init__.py'}" in probe
    assert f"CWD {clone / Path(name).parent.name}" in probe
    subprocess.run(["git", "-C", str(clone), "status", "--short"], check=True, capture_output=True)

"""The prose quotes only numbers the code glued: every `{glue:...}` role in a chapter's markdown names a value
that a `glue(...)` call in a code cell of the same notebook makes (a role with no glue call renders as an
error in the book and as raw markup in Colab). The book's pages (intro.md, instructors.md, ...) quote a
chapter's value as `path.ipynb::name`: that notebook must glue the name.

Glue names built at run time (an f-string, or "ratio_" + name) are matched as patterns: each formatted part
stands for a word of letters, digits and underscores.

Citations follow one convention: a work is cited with a `{cite}` role whose key is an entry of
references.bib, and every entry has a row in references.md. A chapter that types a citation in words
("Liu et al., 2024") also cites that work with the role, so the reader can follow it to the references.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(str(path.relative_to(ROOT)) for path in [*ROOT.glob("CH*/*.ipynb"), *ROOT.glob("appendix/*.ipynb")])
PAGES = sorted(str(path.relative_to(ROOT)) for path in [*ROOT.glob("*.md"), *ROOT.glob("CH*/*.md")])
CITE = re.compile(r"\{cite(?::[a-z]+)?\}`([^`]+)`")
BIB_KEY = re.compile(r"^@\w+\{([^,\s]+),", re.M)
TYPED_CITATION = re.compile(r"\b([A-Z][a-z]+) et al\.,? \(?(\d{4})")
ROLE = re.compile(r"\{glue(?::[a-z]+)?\}`([^`\s]+)`")  # a role's content has no space (prose about roles is not one)


def _cells(notebook: str, kind: str) -> list[str]:
    cells = json.loads((ROOT / notebook).read_text(encoding="utf-8"))["cells"]
    return ["".join(cell["source"]) for cell in cells if cell["cell_type"] == kind]


def _pattern(node: ast.expr) -> str:
    """A regular expression for the names a glue call's first argument can make."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return re.escape(node.value)
    if isinstance(node, ast.JoinedStr):
        return "".join(_pattern(part) for part in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _pattern(node.left) + _pattern(node.right)
    return r"\w+"


def glued_names(notebook: str) -> list[re.Pattern]:
    """One compiled pattern per `glue(name, ...)` call in the notebook's code cells."""
    patterns = []
    for source in _cells(notebook, "code"):
        # IPython magics and shell lines are not Python
        code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.Call) and node.args:
                function = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
                if function == "glue":
                    patterns.append(re.compile(_pattern(node.args[0])))
    return patterns


def role_names(text: str) -> list[str]:
    """The value name of every glue role in a piece of markdown (the format after ':' dropped)."""
    return [role.split("::")[-1].split(":")[0] for role in ROLE.findall(text)]


def test_role_and_pattern_parsing():
    assert role_names("a {glue:text}`speed_b1:.2f`x and {glue}`n` and {glue:text}`CH07/x.ipynb::kv:.3f`") == \
        ["speed_b1", "n", "kv"]
    tree = ast.parse('glue(f"speed_{kind}_b{batch}", 1)\nglue("ratio_" + name.lower(), 2)')
    made = [_pattern(node.args[0]) for node in ast.walk(tree) if isinstance(node, ast.Call) and node.args
            and getattr(node.func, "id", None) == "glue"]
    assert sorted(made) == sorted([r"speed_\w+_b\w+", r"ratio_\w+"])


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_every_glue_role_has_a_glue_call(notebook):
    patterns = glued_names(notebook)
    quoted = {name for text in _cells(notebook, "markdown") for name in role_names(text)}
    missing = sorted(name for name in quoted if not any(p.fullmatch(name) for p in patterns))
    assert not missing, f"{notebook}: the markdown quotes {missing}, but no code cell glues them"


@pytest.mark.parametrize("page", PAGES)
def test_pages_quote_values_a_chapter_glues(page):
    text = (ROOT / page).read_text(encoding="utf-8")
    missing = []
    for role in ROLE.findall(text):
        if "::" not in role:
            missing.append(f"{role} (a page must name the notebook: path.ipynb::name)")
            continue
        notebook, name = role.split("::")[0], role.split("::")[1].split(":")[0]
        if ":" not in role.split("::")[1]:
            # myst-nb splits a text role at its last ":" for the format: "path::name" alone would read as the
            # key "path:" formatted by "name" (a build warned and dropped the value); "path::name:s" is right
            missing.append(f"{role} (a format is needed after the name, e.g. :s or :.2f)")
        if not (ROOT / notebook).exists():
            missing.append(f"{role} ({notebook} does not exist)")
        elif not any(p.fullmatch(name) for p in glued_names(notebook)):
            missing.append(f"{role} ({notebook} glues no {name})")
    assert not missing, f"{page}: {missing}"


def cited_keys(text: str) -> set[str]:
    """The keys of every `{cite}` role in a piece of markdown (a role may name several, comma-separated)."""
    return {key.strip() for role in CITE.findall(text) for key in role.split(",")}


def bib_keys() -> set[str]:
    return set(BIB_KEY.findall((ROOT / "references.bib").read_text(encoding="utf-8")))


def test_citation_parsing():
    assert cited_keys("a {cite}`hu2021lora` and {cite:p}`liu2024dora, sun2023wanda`") == \
        {"hu2021lora", "liu2024dora", "sun2023wanda"}
    assert TYPED_CITATION.findall("DoRA (Liu et al., 2024) and He et al. (2024, ...)") == [("Liu", "2024"), ("He", "2024")]


@pytest.mark.parametrize("source", [*NOTEBOOKS, *PAGES])
def test_every_citation_is_an_entry_of_references_bib(source):
    texts = _cells(source, "markdown") if source.endswith(".ipynb") else [(ROOT / source).read_text(encoding="utf-8")]
    unknown = sorted(cited_keys("\n".join(texts)) - bib_keys())
    assert not unknown, f"{source} cites {unknown}, which references.bib does not have"


def test_references_page_lists_every_entry_and_every_entry_is_cited():
    listed = cited_keys((ROOT / "references.md").read_text(encoding="utf-8"))
    cited = set().union(*(cited_keys("\n".join(_cells(notebook, "markdown"))) for notebook in NOTEBOOKS))
    assert bib_keys() - listed == set(), "references.md has no row for these entries"
    assert bib_keys() - cited == set(), "no chapter cites these entries"


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_a_citation_typed_in_words_is_also_cited(notebook):
    markdown = "\n".join(_cells(notebook, "markdown"))
    keys = cited_keys(markdown)
    uncited = sorted({f"{name} et al., {year}" for name, year in TYPED_CITATION.findall(markdown)
                      if not any(key.startswith(f"{name.lower()}{year}") for key in keys)})
    assert not uncited, f"{notebook} names {uncited} without a {{cite}} role for it (add the entry to references.bib)"

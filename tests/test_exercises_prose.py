"""A number an exercise's question types must be the number its check uses.

Some questions state a value the check cell passes on (or the check assumes): the bytes per value of the
KV cache, the multiple a width is rounded to, the two ranks compared, the perplexity allowed. The learner
reads the question before running anything, so the number is typed in the prose rather than glued; these
tests read the question and the check cell of each such exercise and assert that the two agree, so that
changing one without the other fails here.
"""

import ast
import inspect
import json
import math
import pathlib
import re

from utils import exercises

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cells(notebook: str) -> list[dict]:
    return json.loads((ROOT / notebook).read_text(encoding="utf-8"))["cells"]


def _source(cell: dict) -> str:
    return "".join(cell["source"])


def exercise(notebook: str, check: str) -> tuple[str, ast.Call]:
    """The question (the markdown cell before the check cell) and the check's call in the check cell (the
    first code cell that calls `check`, not the hidden solution)."""
    cells = _cells(notebook)
    for index, cell in enumerate(cells):
        if cell["cell_type"] == "code" and f"{check}(" in _source(cell) and not _source(cell).startswith("# Solution"):
            question = next(_source(c) for c in reversed(cells[:index]) if c["cell_type"] == "markdown")
            call = next(node for node in ast.walk(ast.parse(_source(cell)))
                        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == check)
            return question, call
    raise AssertionError(f"{notebook} has no check cell calling {check}")


def value(notebook: str, node: ast.expr) -> object:
    """A check argument's value: a literal, or a name the notebook assigns a literal to (its parameters)."""
    if isinstance(node, ast.Name):
        for cell in _cells(notebook):
            if cell["cell_type"] != "code":
                continue
            code = "\n".join(line for line in _source(cell).splitlines() if not line.lstrip().startswith(("%", "!")))
            for statement in ast.walk(ast.parse(code)):
                if isinstance(statement, ast.Assign) and [getattr(t, "id", None) for t in statement.targets] == [node.id]:
                    return ast.literal_eval(statement.value)
        raise AssertionError(f"{notebook} assigns no literal to {node.id}")
    return ast.literal_eval(node)


def typed(question: str, pattern: str) -> list[float]:
    """Every number `pattern` (a regular expression with one group) finds in the question, as floats."""
    found = [float(number) for number in re.findall(pattern, question)]
    assert found, f"the question no longer says {pattern!r}: update this test with the new wording"
    return found


def test_ch03_kv_cache_question_states_the_bytes_per_value_the_check_assumes():
    question, call = exercise("CH03/CH03_model_anatomy.ipynb", "check_ch03_kv_bytes_per_token")
    default = inspect.signature(exercises.check_ch03_kv_bytes_per_token).parameters["bytes_per_value"].default
    assert len(call.args) < 6 and not call.keywords, "the check cell passes bytes_per_value: read it from the call"
    assert typed(question, r"\((\d+) bytes a value\)") == [default]


def test_ch05_kept_width_question_states_the_multiple_the_check_uses():
    question, call = exercise("CH05/CH05_width_pruning.ipynb", "check_ch05_kept_width")
    multiple = value("CH05/CH05_width_pruning.ipynb", call.args[3])
    assert typed(question, r"rounded to a multiple of (\d+)") == [multiple]
    assert typed(question, r"multiple=(\d+)") == [multiple]


def test_ch06_rank_ratio_question_states_the_ranks_the_check_compares():
    notebook = "CH06/CH06_lora_specialist.ipynb"
    question, call = exercise(notebook, "check_ch06_rank_ratio")
    low, high = value(notebook, call.args[3]), value(notebook, call.args[4])
    assert typed(question, r"rank (\d+)\s+and rank \d+") == [low]
    assert typed(question, r"rank \d+\s+and rank (\d+)") == [high]
    check_cell = next(_source(c) for c in _cells(notebook) if "check_ch06_rank_ratio(my_answer" in _source(c))
    assert f'"all linear, r={low}"' in check_cell and f'"all linear, r={high}"' in check_cell


def test_ch08b_budget_question_states_the_perplexity_limit_the_check_uses():
    notebook = "CH08/CH08b_fair_pruning.ipynb"
    question, call = exercise(notebook, "check_ch08b_budget_choice")
    limit = value(notebook, call.args[4])
    percent = typed(question, r"at most (\d+(?:\.\d+)?)% more perplexity")
    assert len(percent) == 1 and math.isclose(percent[0], 100 * (limit - 1)), (percent, limit)

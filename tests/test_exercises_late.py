"""The exercise checks of CH06-CH08b: each accepts the reference solution, catches plausible wrong answers
with an explanation, answers `None` with "Not yet" instead of raising, and refuses bad reference data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from utils.exercises import (check_ch06_adapter_megabytes, check_ch06_lora_parameters, check_ch06_merged_weight,
                             check_ch06_rank_ratio, check_ch07_better_method, check_ch07_kv_bytes, check_ch07_kv_limit,
                             check_ch07_lowest_k, check_ch08a_allocation, check_ch08a_batch_skips,
                             check_ch08a_more_skips, check_ch08b_bias_metric, check_ch08b_budget_choice,
                             check_ch08b_random_change)

ROOT = Path(__file__).resolve().parents[1]


def caught(feedback, *words: str) -> bool:
    """A wrong answer is caught when the check says it is not correct and explains it with these words."""
    return not feedback.correct and all(word in feedback.message for word in words)


def test_ch06_lora_parameters() -> None:
    assert check_ch06_lora_parameters(8 * (576 + 576), 576, 576, 8, 9216).correct
    assert caught(check_ch06_lora_parameters(576 * 576, 576, 576, 8, 9216), "frozen weight")
    assert caught(check_ch06_lora_parameters(8 * 576 * 576, 576, 576, 8, 9216), "B A")
    assert caught(check_ch06_lora_parameters(8 * 576, 576, 576, 8, 9216), "one of the two factors")
    assert caught(check_ch06_lora_parameters(None, 576, 576, 8, 9216), "None")
    assert caught(check_ch06_lora_parameters("many", 576, 576, 8, 9216), "number")
    with pytest.raises(ValueError, match="rank"):
        check_ch06_lora_parameters(1, 576, 576, 0, 9216)


def test_ch06_merged_weight() -> None:
    assert check_ch06_merged_weight(lambda W, A, B, alpha, r: W + (alpha / r) * (B @ A)).correct
    assert caught(check_ch06_merged_weight(lambda W, A, B, alpha, r: W + B @ A), "alpha / r")
    assert caught(check_ch06_merged_weight(lambda W, A, B, alpha, r: W), "unchanged")
    assert caught(check_ch06_merged_weight(lambda W, A, B, alpha, r: W.add_((alpha / r) * (B @ A))), "in place")
    assert caught(check_ch06_merged_weight(lambda W, A, B, alpha, r: W + (alpha / r) * (A.T @ B.T).T @ W.T @ W), "differs")
    assert caught(check_ch06_merged_weight(lambda W, A, B, alpha, r: W + A @ B), "raised")
    assert caught(check_ch06_merged_weight(None), "None")


def test_ch06_adapter_megabytes_and_rank_ratio() -> None:
    assert check_ch06_adapter_megabytes(4.0, 1_000_000, 4.05).correct
    assert check_ch06_adapter_megabytes(0.08, 20_000, 0.11).correct  # a tiny adapter: the header weighs
    assert caught(check_ch06_adapter_megabytes(2.0, 1_000_000, 4.05), "float32")
    assert caught(check_ch06_adapter_megabytes(4_000_000, 1_000_000, 4.05), "unit")
    assert caught(check_ch06_adapter_megabytes(None, 1_000_000, 4.05), "None")
    with pytest.raises(ValueError, match="measured_mb"):
        check_ch06_adapter_megabytes(4.0, 1_000_000, 0)
    assert check_ch06_rank_ratio(4, 100.0, 400.0, 2, 8).correct
    assert caught(check_ch06_rank_ratio(16, 100.0, 400.0, 2, 8), "Squared")
    assert caught(check_ch06_rank_ratio(2, 100.0, 400.0, 2, 8), "measured ratio")


def test_ch07_kv_bytes_and_limit() -> None:
    assert check_ch07_kv_bytes(2304 * 22 / 30, 2304.0, 2304 * 22 / 30, 30, 8).correct
    assert caught(check_ch07_kv_bytes(2304, 2304.0, 2304 * 22 / 30, 30, 8), "no attention")
    assert caught(check_ch07_kv_bytes(2304 * 8 / 30, 2304.0, 2304 * 22 / 30, 30, 8), "disappears")
    assert caught(check_ch07_kv_bytes(None, 2304.0, 2304 * 22 / 30, 30, 8), "None")
    with pytest.raises(ValueError, match="bypassed"):
        check_ch07_kv_bytes(1.0, 2304.0, 2304.0, 30, 30)
    assert check_ch07_kv_limit(32 / 24, 32, 8).correct
    assert caught(check_ch07_kv_limit(24 / 32, 32, 8), "inverse")
    assert caught(check_ch07_kv_limit(1.25, 32, 8), "n / (n - k)")


def test_ch07_lowest_k_and_better_method() -> None:
    scores = torch.tensor([0.5, 0.1, 0.3, 0.05, 0.9, 0.2])
    assert check_ch07_lowest_k(lambda s, k: torch.as_tensor(s).argsort()[:k].tolist(), scores, 2).correct
    assert caught(check_ch07_lowest_k(lambda s, k: torch.as_tensor(s).argsort(descending=True)[:k].tolist(), scores, 2), "highest")
    assert caught(check_ch07_lowest_k(lambda s, k: torch.as_tensor(s).argsort()[:k + 1].tolist(), scores, 2), "exactly k")
    assert caught(check_ch07_lowest_k(lambda s, k: list(range(k)), scores, 2), "lowest")
    assert caught(check_ch07_lowest_k(None, scores, 2), "None")
    ratios = {"one-shot importance": 1.8, "greedy loss": 1.4}
    assert check_ch07_better_method("greedy loss", ratios).correct
    assert caught(check_ch07_better_method("one-shot importance", ratios), "greedy")
    assert caught(check_ch07_better_method("random", ratios), "one of")


def test_ch08a_checks() -> None:
    allocation = {"wikipedia": 5, "sms": 11}
    assert check_ch08a_more_skips("sms", allocation).correct
    assert caught(check_ch08a_more_skips("wikipedia", allocation), "loss")
    assert caught(check_ch08a_more_skips(None, allocation), "None")
    skip_sets = {"wikipedia": [4, 7, 9], "sms": [4, 5, 7, 9, 12]}
    assert check_ch08a_batch_skips(3, skip_sets, 3).correct
    assert caught(check_ch08a_batch_skips(5, skip_sets, 3), "union")
    assert caught(check_ch08a_batch_skips(4, skip_sets, 3), "Which sublayers")

    curves = {"wikipedia": [2.0, 2.1, 2.4, 3.0], "sms": [3.0, 3.01, 3.02, 3.1]}
    weights = {"wikipedia": 0.8, "sms": 0.2}

    def brute(curves, budget, weights):
        import itertools
        kinds = list(curves)
        splits = [ks for ks in itertools.product(*(range(len(curves[k])) for k in kinds)) if sum(ks) == budget * len(kinds)]
        best = min(splits, key=lambda ks: sum(weights[k] * curves[k][n] for k, n in zip(kinds, ks)))
        return dict(zip(kinds, best))

    assert check_ch08a_allocation(brute, curves, 1, weights).correct
    assert caught(check_ch08a_allocation(lambda c, b, w: {k: b for k in c}, curves, 1, weights), "weighted loss")
    assert caught(check_ch08a_allocation(lambda c, b, w: {k: 2 * b for k in c}, curves, 1, weights), "average")
    assert caught(check_ch08a_allocation(lambda c, b, w: {"wikipedia": 2}, curves, 1, weights), "per kind")
    assert caught(check_ch08a_allocation(None, curves, 1, weights), "None")


def test_ch08b_checks() -> None:
    gaps = torch.tensor([[1.0, 0.2], [0.1, 0.6], [0.5, 0.5]])
    expected = float((gaps[:, 0] - gaps[:, 1]).abs().mean())
    assert check_ch08b_bias_metric(lambda g: (g[:, 0] - g[:, 1]).abs().mean(), gaps, expected).correct
    assert caught(check_ch08b_bias_metric(lambda g: (g[:, 0] - g[:, 1]).mean(), gaps, expected), "signed mean")
    assert caught(check_ch08b_bias_metric(lambda g: g.abs().mean(), gaps, expected), "gaps themselves")
    assert caught(check_ch08b_bias_metric(None, gaps, expected), "None")
    with pytest.raises(ValueError, match="gaps"):
        check_ch08b_bias_metric(lambda g: 0.0, torch.zeros(3), 0.0)

    counts, bias, ppl = [0, 16, 32, 64], [1.0, 0.8, 0.6, 0.4], [1.0, 1.01, 1.04, 1.12]
    assert check_ch08b_budget_choice(32, counts, bias, ppl, 1.05).correct
    assert caught(check_ch08b_budget_choice(64, counts, bias, ppl, 1.05), "over the limit")
    assert caught(check_ch08b_budget_choice(16, counts, bias, ppl, 1.05), "lower bias")
    assert caught(check_ch08b_budget_choice(20, counts, bias, ppl, 1.05), "measured neuron counts")

    assert check_ch08b_random_change(-1.0, 0.5, -35.0).correct
    assert caught(check_ch08b_random_change(-33.0, 0.5, -35.0), "choice of neurons")
    assert caught(check_ch08b_random_change(None, 0.5, -35.0), "None")


@pytest.mark.parametrize("notebook", ["CH06/CH06_lora_specialist.ipynb", "CH07/CH07_attention_bypass.ipynb",
                                      "CH08/CH08a_adaptive_bypass.ipynb", "CH08/CH08b_fair_pruning.ipynb"])
def test_late_chapters_have_exercises_solutions_and_scaffolding(notebook: str) -> None:
    """At least four exercises, a check per answerable exercise, solutions hidden and asserting the check;
    objectives first, key takeaways last, CH07 and CH08b with an explorer."""
    cells = json.loads((ROOT / notebook).read_text())["cells"]
    text = ["".join(cell["source"]) for cell in cells]
    markdown = "\n".join(t for t, cell in zip(text, cells) if cell["cell_type"] == "markdown")
    exercises = [line for line in markdown.splitlines() if line.startswith("**") and line[2:3].isdigit()]
    assert len(exercises) >= 4, exercises
    solutions = [(t, cell) for t, cell in zip(text, cells) if t.startswith("# Solution")]
    checks = [t for t in text if "check_ch" in t and "my_answer = None" in t or "return None  # your code" in t]
    assert len(solutions) >= 3 and len(checks) == len(solutions)
    for source, cell in solutions:
        assert cell["metadata"].get("tags") == ["hide-input"] and "assert check_ch" in source
    headings = [t.splitlines()[0] for t in text if t.startswith("## ")]
    assert "## Before you start" in headings and headings[-1] == "## Key takeaways" and "## Exercises" in headings
    assert text[-1].startswith("## Key takeaways") and "Next:" in text[-1]
    assert "shared 2-core" not in markdown
    if notebook.startswith(("CH07", "CH08/CH08b")):
        assert any("explore(" in t for t in text)

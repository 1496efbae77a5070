"""The exercises of Chapters 2-5 (utils.exercises, CH02-CH05 sections) and the exercise structure of every chapter.

Every check accepts the reference answer, catches at least one plausible wrong answer with a message that
says what is wrong, answers "Not yet" (without raising) when nothing was answered or when the answer is of
the wrong kind (saying what kind is expected), and refuses bad reference arguments (the chapter's own
measurements) with a clear error. The structure test reads every chapter notebook CH02-CH08b: at least four
exercises of mixed kinds, a hidden, runnable solution after every check, and the opening and closing
sections of a classroom chapter.
"""

import json
import pathlib
import re

import pytest
import torch

from utils import exercises as ex
from utils.exercises import (check_ch02_ideal_speedup, check_ch02_params_saved, check_ch02_recovery,
                             check_ch03_glu_parameters, check_ch03_kv_bytes_per_token, check_ch03_least_changed_block,
                             check_ch04_angular_window, check_ch04_block_influence, check_ch04_select_lowest,
                             check_ch05_kept_width, check_ch05_peak_to_peak, check_ch05_removed_parameters)
from utils.models import decoder_layers, glu_projections, load_model
from utils.width import static_neuron_importance, target_intermediate_size

ROOT = pathlib.Path(__file__).resolve().parents[1]


def caught(feedback, *words):
    """The answer was refused, and the message names what is wrong."""
    assert not feedback.correct, feedback
    assert str(feedback).startswith("Not yet."), feedback
    for word in words:
        assert word.lower() in feedback.message.lower(), (word, feedback.message)


# ---- CH02 ----

def test_ch02_params_saved_on_tiny_model():
    model, _ = load_model("tiny-llama")
    block = sum(p.numel() for p in decoder_layers(model)[0].parameters())
    total = sum(p.numel() for p in model.parameters())
    n_layers = model.config.num_hidden_layers
    assert check_ch02_params_saved(100 * block / total, 1, block, total).correct
    caught(check_ch02_params_saved(100 / n_layers, 1, block, total), "embedding")
    caught(check_ch02_params_saved(block / total, 1, block, total), "fraction")
    caught(check_ch02_params_saved(None, 1, block, total), "no answer")
    with pytest.raises(ValueError, match="total_parameters"):
        check_ch02_params_saved(1.0, 2, 10, 5)
    caught(check_ch02_params_saved("ten", 1, block, total), "must be a number")


def test_ch02_ideal_speedup():
    assert check_ch02_ideal_speedup(30 / 24, 30, 6).correct
    caught(check_ch02_ideal_speedup(24 / 30, 30, 6), "ratio of the times")
    caught(check_ch02_ideal_speedup(1.2, 30, 6), "divides the time")
    caught(check_ch02_ideal_speedup(2.0, 30, 6))
    caught(check_ch02_ideal_speedup(None, 30, 6), "no answer")
    with pytest.raises(ValueError, match="n_removed"):
        check_ch02_ideal_speedup(1.0, 30, 30)


def test_ch02_recovery():
    assert check_ch02_recovery(lambda base, pruned, healed: (pruned - healed) / (pruned - base)).correct
    caught(check_ch02_recovery(lambda base, pruned, healed: (healed - base) / (pruned - base)), "complement")
    caught(check_ch02_recovery(lambda base, pruned, healed: (healed - pruned) / (pruned - base)), "sign")
    caught(check_ch02_recovery(lambda base, pruned, healed: pruned / healed), "ratio of perplexities")
    caught(check_ch02_recovery(lambda base, pruned, healed: 1 / 0), "ZeroDivisionError")
    caught(check_ch02_recovery(None), "no answer")
    caught(check_ch02_recovery(0.75), "must be a function recovery(base, pruned, healed)")


# ---- CH03 ----

def test_ch03_kv_bytes_per_token_on_tiny_models(tiny):
    _, model, _ = tiny
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    args = (config.num_hidden_layers, config.num_key_value_heads, head_dim, config.num_attention_heads)
    right = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 2
    assert check_ch03_kv_bytes_per_token(right, *args).correct
    caught(check_ch03_kv_bytes_per_token(right // 2, *args), "keys and values")
    if config.num_attention_heads != config.num_key_value_heads:
        caught(check_ch03_kv_bytes_per_token(right * config.num_attention_heads // config.num_key_value_heads, *args),
               "query heads")
    caught(check_ch03_kv_bytes_per_token(None, *args), "no answer")
    with pytest.raises(ValueError, match="n_kv_heads"):
        check_ch03_kv_bytes_per_token(1, 2, 0, 64, 4)


def test_ch03_glu_parameters_match_the_module(tiny):
    _, model, _ = tiny
    config = model.config
    mlp = decoder_layers(model)[0].mlp
    counted = sum(p.numel() for p in mlp.parameters())
    bias = bool(getattr(config, "mlp_bias", False))
    assert check_ch03_glu_parameters(counted, config.hidden_size, config.intermediate_size, bias=bias).correct
    caught(check_ch03_glu_parameters(2 * config.hidden_size * config.intermediate_size, config.hidden_size,
                                     config.intermediate_size), "classic")
    caught(check_ch03_glu_parameters(None, config.hidden_size, config.intermediate_size), "no answer")
    with pytest.raises(ValueError, match="hidden_size"):
        check_ch03_glu_parameters(1, 0, 10)


def test_ch03_least_changed_block():
    cosine = torch.tensor([0.2, 0.9, 0.95, 0.8, 0.5])
    assert check_ch03_least_changed_block(2, cosine).correct
    caught(check_ch03_least_changed_block(0, cosine), "lowest cosine")
    caught(check_ch03_least_changed_block(3, cosine), "neighbour")
    caught(check_ch03_least_changed_block(7, cosine), "does not exist")
    caught(check_ch03_least_changed_block(None, cosine), "no answer")
    caught(check_ch03_least_changed_block("two", cosine), "must be a block index")
    caught(check_ch03_least_changed_block(2.5, cosine), "must be a block index")
    with pytest.raises(ValueError, match="empty"):
        check_ch03_least_changed_block(0, [])


# ---- CH04 ----

def test_ch04_select_lowest():
    scores = [0.5, 0.02, 0.3, 0.01, 0.2, 0.9]
    assert check_ch04_select_lowest(lambda s, n: sorted(sorted(range(len(s)), key=lambda i: s[i])[:n]), scores, 2).correct
    caught(check_ch04_select_lowest(lambda s, n: sorted(sorted(range(len(s)), key=lambda i: s[i])[-n:]), scores, 2),
           "highest scores")
    caught(check_ch04_select_lowest(lambda s, n: sorted(s)[:n], scores, 2), "indices")
    caught(check_ch04_select_lowest(lambda s, n: sorted(range(len(s)), key=lambda i: s[i])[:n], scores, 2), "sorted")
    caught(check_ch04_select_lowest(lambda s, n: None, scores, 2), "returned None")
    caught(check_ch04_select_lowest(None, scores, 2), "no answer")
    with pytest.raises(ValueError, match="`n`"):
        check_ch04_select_lowest(lambda s, n: [], scores, 6)


def test_ch04_block_influence():
    def right(block_in, block_out, mask):
        cosine = torch.nn.functional.cosine_similarity(block_in, block_out, dim=-1)
        return (1 - cosine)[mask.bool()].mean()

    def unmasked(block_in, block_out, mask):
        return (1 - torch.nn.functional.cosine_similarity(block_in, block_out, dim=-1)).mean()

    def cosine_only(block_in, block_out, mask):
        return torch.nn.functional.cosine_similarity(block_in, block_out, dim=-1)[mask.bool()].mean()

    assert check_ch04_block_influence(right).correct
    caught(check_ch04_block_influence(unmasked), "padding")
    caught(check_ch04_block_influence(cosine_only), "mean cosine")
    caught(check_ch04_block_influence(None), "no answer")
    caught(check_ch04_block_influence(3), "must be a function block_influence(")


def test_ch04_angular_window():
    distance = torch.tensor([0.4, 0.3, 0.1, 0.2, 0.6])
    assert check_ch04_angular_window([2, 3, 4], distance, 3).correct
    caught(check_ch04_angular_window([4, 5, 6], distance, 3), "largest")
    caught(check_ch04_angular_window([3, 4, 5], distance, 3), "off by one")
    caught(check_ch04_angular_window([2, 3], distance, 3), "exactly")
    caught(check_ch04_angular_window([2, 4, 6], distance, 3), "consecutive")
    caught(check_ch04_angular_window(None, distance, 3), "no answer")
    caught(check_ch04_angular_window(["a"], distance, 3), "must be a list of block indices")
    caught(check_ch04_angular_window("234", distance, 3), "must be a list of block indices")
    with pytest.raises(ValueError, match="`n`"):
        check_ch04_angular_window(None, distance, 0)


# ---- CH05 ----

def test_ch05_removed_parameters_match_pruning():
    from utils.width import prune_glu_width

    model, _ = load_model("tiny-llama")
    config = model.config
    keep = target_intermediate_size(config.intermediate_size, config.hidden_size, percent=20)
    narrow = prune_glu_width(model, static_neuron_importance(model), percent=20)
    measured = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in narrow.parameters())
    args = (config.hidden_size, config.intermediate_size, keep, config.num_hidden_layers)
    assert check_ch05_removed_parameters(measured, *args).correct
    caught(check_ch05_removed_parameters(measured * 2 // 3, *args), "two matrices")
    caught(check_ch05_removed_parameters(measured // config.num_hidden_layers, *args), "one block")
    caught(check_ch05_removed_parameters(None, *args), "no answer")
    with pytest.raises(ValueError, match="keep"):
        check_ch05_removed_parameters(1, config.hidden_size, 10, 11, 2)


def test_ch05_peak_to_peak_matches_utils(tiny):
    _, model, _ = tiny
    gate, up, _ = glu_projections(decoder_layers(model)[0])
    gate, up = gate.weight.detach(), up.weight.detach()

    def right(g, u):
        return (g.amax(1) + g.amin(1).abs()) + (u.amax(1) + u.amin(1).abs())

    assert check_ch05_peak_to_peak(right, gate, up).correct
    # static_neuron_importance returns its scores on the CPU; the model's weights may be on the GPU
    assert torch.allclose(right(gate.float(), up.float()).cpu(), static_neuron_importance(model)[0].float(),
                          rtol=1e-4, atol=1e-5)
    caught(check_ch05_peak_to_peak(lambda g, u: g.amax(1) + g.amin(1).abs(), gate, up), "gate rows only")
    caught(check_ch05_peak_to_peak(lambda g, u: (g.amax(0) + g.amin(0).abs()) + (u.amax(0) + u.amin(0).abs()), gate, up),
           "one per neuron")
    caught(check_ch05_peak_to_peak(lambda g, u: g.abs().amax(1) + u.abs().amax(1), gate, up))
    caught(check_ch05_peak_to_peak(None, gate, up), "no answer")
    with pytest.raises(ValueError, match="one shape"):
        check_ch05_peak_to_peak(right, gate, up[:, :-1])


def test_ch05_kept_width_agrees_with_target_intermediate_size():
    for width, percent, multiple in ((1536, 20, 64), (8192, 40, 128), (64, 20, 8)):
        expected = target_intermediate_size(width, 576, percent=percent, multiple=multiple)
        assert check_ch05_kept_width(expected, width, percent, multiple).correct
    caught(check_ch05_kept_width(1228.8, 1536, 20, 64), "unrounded")
    caught(check_ch05_kept_width(1229, 1536, 20, 64), "unrounded")
    caught(check_ch05_kept_width(1280, 1536, 20, 64), "nearest")
    caught(check_ch05_kept_width(320, 1536, 20, 64), "removed")
    caught(check_ch05_kept_width(None, 1536, 20, 64), "no answer")
    with pytest.raises(ValueError, match="percent"):
        check_ch05_kept_width(1, 1536, 120, 64)


# ---- every chapter's exercise structure ----

CHAPTERS = ["CH02/CH02_first_surgery.ipynb", "CH03/CH03_model_anatomy.ipynb", "CH04/CH04_data_driven_depth_pruning.ipynb",
            "CH05/CH05_width_pruning.ipynb", "CH06/CH06_lora_specialist.ipynb", "CH07/CH07_attention_bypass.ipynb",
            "CH08/CH08a_adaptive_bypass.ipynb", "CH08/CH08b_fair_pruning.ipynb"]
KIND_LABEL = re.compile(r"\*\*(?:\d+\.\s+)?([A-Z][^*\n]{2,60}?[.?!:])\*\*")  # "**Predict, then run.**" or "**1. Predict, then run.**"
CHECK_CALL = re.compile(r"\b(check_ch0\w+)\(")


def exercise_groups(cells):
    """The cells between '## Exercises' and '## Key takeaways', grouped per exercise: each group starts at a
    markdown cell that states an exercise (a bold kind label such as **Predict, then run.**)."""
    texts = ["".join(cell["source"]) for cell in cells]
    start = next(i for i, text in enumerate(texts) if cells[i]["cell_type"] == "markdown" and text.startswith("## Exercises"))
    end = next(i for i, text in enumerate(texts) if cells[i]["cell_type"] == "markdown" and text.startswith("## Key takeaways"))
    groups = []
    # the '## Exercises' cell itself may state the first exercise after its introduction
    first = start if KIND_LABEL.search(texts[start]) else start + 1
    for cell, text in zip(cells[first:end], texts[first:end]):
        if cell["cell_type"] == "markdown" and not text.lstrip().startswith(":::") and KIND_LABEL.search(text):
            groups.append([])
        if groups:
            groups[-1].append((cell, text))
    return groups


@pytest.mark.parametrize("path", CHAPTERS)
def test_chapter_has_classroom_structure(path):
    cells = json.loads((ROOT / path).read_text())["cells"]
    texts = ["".join(cell["source"]) for cell in cells]
    assert any(cell["cell_type"] == "markdown" and text.startswith("## Before you start") for cell, text in zip(cells, texts)), \
        f"{path}: no '## Before you start' cell (objectives, prerequisites, time)"
    assert any(cell["cell_type"] == "code" and ("chapter_times-" in text or "recorded_time(" in text) for cell, text in zip(cells, texts)), \
        f"{path}: the time estimate is not read from benchmarks/results/chapter_times-*.json"
    assert cells[-1]["cell_type"] == "markdown" and texts[-1].startswith("## Key takeaways"), \
        f"{path}: the last cell must be '## Key takeaways'"
    assert re.search(r"\]\([^)]+\)|\{doc\}", texts[-1]), f"{path}: the key takeaways must link forward"
    groups = exercise_groups(cells)
    assert len(groups) >= 4, f"{path}: {len(groups)} exercises, at least 4 wanted"
    kinds = {KIND_LABEL.search(group[0][1]).group(1) for group in groups}
    assert len(kinds) >= 3, f"{path}: exercise kinds {sorted(kinds)}: mix at least three"
    checked = 0
    for number, group in enumerate(groups, 1):
        code = [(cell, text) for cell, text in group if cell["cell_type"] == "code"]
        answers = [i for i, (cell, text) in enumerate(code)
                   if CHECK_CALL.search(text) and "hide-input" not in cell["metadata"].get("tags", [])]
        discussed = any(":::{dropdown}" in text for cell, text in group if cell["cell_type"] == "markdown")
        assert answers or discussed, f"{path}, exercise {number}: neither a check nor a discussion dropdown"
        for i in answers:
            checked += 1
            assert "= None" in code[i][1] or "return None" in code[i][1], \
                f"{path}, exercise {number}: the answer cell must start the answer as None (or a function returning None)"
            assert i + 1 < len(code), f"{path}, exercise {number}: no solution cell after the check"
            cell, solution = code[i + 1]
            assert "hide-input" in cell["metadata"].get("tags", []), f"{path}, exercise {number}: solution not hidden"
            assert solution.startswith("# Solution"), f"{path}, exercise {number}: solution must start with '# Solution'"
            name = CHECK_CALL.search(code[i][1]).group(1)
            assert re.search(rf"assert {name}\(.*?\)\.correct", solution, re.DOTALL), \
                f"{path}, exercise {number}: the solution must assert {name}(...).correct"
            assert hasattr(ex, name), f"{path}: utils.exercises has no {name}"
    assert checked >= 2, f"{path}: only {checked} checked exercises"
    for cell in cells:
        if cell["cell_type"] == "code":
            assert not cell.get("outputs"), f"{path}: committed with outputs"


def test_every_check_is_called_from_a_chapter():
    names = {name for name in dir(ex) if name.startswith("check_ch0")}
    used = set()
    for path in CHAPTERS:
        used |= set(CHECK_CALL.findall((ROOT / path).read_text()))
    early = {name for name in names if name[:9] in {"check_ch0" + d for d in "2345"}}
    assert early <= used, f"checks no chapter calls: {sorted(early - used)}"

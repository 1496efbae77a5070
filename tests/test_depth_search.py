"""The depth selections that search (KL swap search) and the span replaced by one trained block, on the five
tiny families: what they return, that they leave the model unchanged, that the final block is guarded, and
that the replaced model saves and reloads exactly with plain transformers."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from utils.data import calibration_batches
from utils.depth import (kl_swap_search, reference_log_probs, removal_kl, replace_span,
                         select_window_by_distance)
from utils.models import decoder_layers, model_device, tiny_model
from utils.speed import timed_call

PROMPT = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))


def _logits(model) -> torch.Tensor:
    """The model's logits on PROMPT, which goes to the model's device first (the GPU lane puts models on CUDA)."""
    with torch.no_grad():
        return model(PROMPT.to(model_device(model))).logits


def _batches(tokenizer):
    return calibration_batches(tokenizer, "wikipedia", n_samples=4, seq_len=32, batch_size=2)


def _make_identity(block) -> None:
    """Zero the attention and MLP output projections: the block then passes the residual stream through."""
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()


def test_select_window_by_distance_guards_the_final_block():
    distances = torch.tensor([0.5, 0.2, 0.3, 0.1])  # 4 starts of a 3-block window: 6 blocks
    assert select_window_by_distance(distances, 3) == [1, 2, 3]
    assert select_window_by_distance(distances, 3, include_last=True) == [3, 4, 5]
    with pytest.raises(ValueError, match="at least one must remain"):
        select_window_by_distance(torch.tensor([0.1]), 3)
    with pytest.raises(ValueError, match="finite"):
        select_window_by_distance(torch.tensor([0.1, float("nan")]), 3)


def test_removal_kl_is_zero_for_the_base_and_positive_for_a_removal(tiny, one_thread):
    name, model, tokenizer = tiny
    batches = _batches(tokenizer)
    reference = reference_log_probs(model, batches)
    before = _logits(model)
    assert removal_kl(model, batches, reference) == pytest.approx(0.0, abs=1e-6)
    assert removal_kl(model, batches, reference, [1]) > 1e-4
    assert torch.equal(_logits(model), before)
    with pytest.raises(ValueError, match="reference"):
        removal_kl(model, batches, reference[:1], [1])


def test_kl_swap_search_finds_the_block_that_does_nothing(tiny, one_thread):
    name, model, tokenizer = tiny
    n_layers = len(decoder_layers(model))
    idle = n_layers - 2  # the last block the search may take
    _make_identity(decoder_layers(model)[idle])
    batches = _batches(tokenizer)
    before = _logits(model)

    result = kl_swap_search(model, batches, [0], radius=None, max_evaluations=50, progress=False)

    assert result["blocks"] == [idle]
    assert result["kl"] == pytest.approx(0.0, abs=1e-6) and result["start_kl"] > 1e-4
    assert [row["kl"] for row in result["history"]] == sorted((row["kl"] for row in result["history"]), reverse=True)
    assert all(n_layers - 1 not in row["blocks"] for row in result["history"])
    assert torch.equal(_logits(model), before)


def test_kl_swap_search_respects_its_budget_and_radius():
    model, tokenizer = tiny_model("tiny-gemma3")  # 6 blocks
    batches = _batches(tokenizer)
    result = kl_swap_search(model, batches, [0], radius=1, max_evaluations=2, progress=False)
    assert result["evaluations"] <= 2
    assert all(block in (0, 1) for block in result["blocks"])


def test_kl_swap_search_errors_say_what_is_wrong():
    model, tokenizer = tiny_model("tiny-llama")  # 4 blocks
    batches = _batches(tokenizer)
    with pytest.raises(ValueError, match="include_last"):
        kl_swap_search(model, batches, [3], progress=False)
    with pytest.raises(ValueError, match="radius"):
        kl_swap_search(model, batches, [1], radius=0, progress=False)
    with pytest.raises(ValueError, match="max_evaluations"):
        kl_swap_search(model, batches, [1], max_evaluations=0, progress=False)
    with pytest.raises(ValueError, match="list of decoder block indices"):
        kl_swap_search(model, batches, 1, progress=False)


def test_replace_span_trains_one_block_that_reloads_exactly(tiny, tmp_path, one_thread):
    name, model, tokenizer = tiny
    n_layers = len(decoder_layers(model))
    batches = _batches(tokenizer)
    before = _logits(model)
    reference = reference_log_probs(model, batches)
    untrained, _ = replace_span(model, 0, 3, batches, steps=1, lr=1e-12, progress=False)

    replaced, losses = replace_span(model, 0, 3, batches, steps=40, lr=1e-3, progress=False)

    assert len(decoder_layers(replaced)) == replaced.config.num_hidden_layers == n_layers - 2
    assert sum(losses[-5:]) / 5 < 0.8 * losses[0]
    # the trained block keeps the base model's predictions better than the block it started from
    assert removal_kl(replaced, batches, reference) < removal_kl(untrained, batches, reference)
    assert torch.equal(_logits(model), before)
    assert all(p.requires_grad for p in replaced.parameters())
    replaced.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=replaced.dtype).to(model_device(replaced)).eval()
    assert reloaded.config.num_hidden_layers == n_layers - 2
    assert torch.equal(_logits(reloaded), _logits(replaced))


def test_replace_span_errors_say_what_is_wrong():
    model, tokenizer = tiny_model("tiny-llama")  # 4 blocks
    batches = _batches(tokenizer)
    with pytest.raises(ValueError, match="at least two blocks"):
        replace_span(model, 0, 1, batches, progress=False)
    with pytest.raises(ValueError, match="include_last"):
        replace_span(model, 2, 2, batches, progress=False)
    with pytest.raises(ValueError, match="steps"):
        replace_span(model, 0, 2, batches, steps=0, progress=False)
    with pytest.raises(ValueError, match="lr"):
        replace_span(model, 0, 2, batches, lr=-1.0, progress=False)
    replaced, _ = replace_span(model, 2, 2, batches, steps=1, include_last=True, progress=False)
    assert len(decoder_layers(replaced)) == 3


def test_timed_call_returns_the_result_and_both_clocks():
    result, seconds = timed_call(lambda: sum(i * i for i in range(200_000)))
    assert result == sum(i * i for i in range(200_000))
    assert seconds["wall_s"] > 0 and seconds["cpu_s"] > 0
    with pytest.raises(TypeError, match="function must be a function called with no arguments"):
        timed_call(3)

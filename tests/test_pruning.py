import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM

from utils.models import TINY_ARCHITECTURES, decoder_layers, tiny_model
from utils.depth import (layers_removed, removable_layers, remove_layers, select_by_importance, select_first,
                         select_last, select_window)

PROMPT = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))  # longer than gemma's window 16


def _index_attributes(model) -> list[list[tuple[str, int]]]:
    """Per block, every (module path, layer_idx) found inside it."""
    return [[(path, module.__dict__["layer_idx"]) for path, module in block.named_modules()
             if "layer_idx" in module.__dict__] for block in decoder_layers(model)]


def _snapshot(model) -> dict:
    return {"blocks": list(decoder_layers(model)), "config": model.config.to_dict(),
            "indices": _index_attributes(model)}


def _greedy(model, ids, use_cache: bool) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=use_cache, pad_token_id=258)


def _drop_for(name: str) -> list[int]:
    return [5, 1] if name == "tiny-gemma3" else [1]  # middle blocks: their removal shifts the later indices


def test_remove_layers_keeps_cache_generation_and_reloads_identically(tiny, tmp_path):
    prompt = PROMPT.to(tiny[1].device)
    name, model, _ = tiny
    n_layers = len(decoder_layers(model))
    before = _snapshot(model)
    base_logits = model(prompt.to(model.device)).logits
    drop = _drop_for(name)
    kept = [i for i in range(n_layers) if i not in drop]

    pruned = remove_layers(model, drop)

    # the base model is untouched and shares no block with the pruned one
    assert _snapshot(model) == before
    assert torch.equal(model(prompt.to(model.device)).logits, base_logits)
    assert not {id(p) for p in pruned.parameters()} & {id(p) for p in model.parameters()}
    # the right blocks remain, renumbered, with the config in sync
    assert len(decoder_layers(pruned)) == pruned.config.num_hidden_layers == len(kept)
    for new, old in enumerate(kept):
        for (key, value), (_, original) in zip(decoder_layers(pruned)[new].state_dict().items(),
                                               decoder_layers(model)[old].state_dict().items()):
            assert torch.equal(value, original), key
    indices = _index_attributes(pruned)
    assert all(indices) and [{value for _, value in block} for block in indices] == [{j} for j in range(len(kept))]
    if getattr(model.config, "layer_types", None) is not None:
        assert pruned.config.layer_types == [model.config.layer_types[i] for i in kept]
    assert not torch.equal(pruned(prompt).logits, base_logits)
    # generation with the KV cache agrees with generation without it
    assert torch.equal(_greedy(pruned, prompt, use_cache=True), _greedy(pruned, prompt, use_cache=False))
    # a plain transformers reload is the same model
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=pruned.dtype).to(pruned.device).eval()
    assert reloaded.config.num_hidden_layers == len(kept)
    assert getattr(reloaded.config, "layer_types", None) == getattr(pruned.config, "layer_types", None)
    assert torch.equal(reloaded(prompt).logits, pruned(prompt).logits)
    assert torch.equal(_greedy(reloaded, prompt, use_cache=True), _greedy(pruned, prompt, use_cache=True))


@pytest.mark.parametrize("drop, expected", [
    ([1, 5], ["sliding_attention"] * 4),
    ([0, 2], ["sliding_attention"] * 3 + ["full_attention"]),
])
def test_gemma3_layer_types_shrink_with_the_blocks(drop, expected):
    model, _ = tiny_model("tiny-gemma3")
    assert model.config.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    pruned = remove_layers(model, drop)
    assert pruned.config.layer_types == expected and pruned.config.num_hidden_layers == 4
    for j, block in enumerate(decoder_layers(pruned)):
        assert block.layer_idx == j and block.self_attn.layer_idx == j  # gemma keeps an index on the block too
        assert block.self_attn.is_sliding == (expected[j] == "sliding_attention")
    assert model.config.num_hidden_layers == 6 and len(model.config.layer_types) == 6


def test_qwen2_sliding_threshold_follows_the_blocks(tmp_path):
    model, _ = tiny_model("tiny-qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=2)
    assert model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    pruned = remove_layers(model, [0])
    assert pruned.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert pruned.config.max_window_layers == 1 and pruned.model.has_sliding_layers
    only_full = remove_layers(model, [2, 3])
    assert only_full.config.layer_types == ["full_attention"] * 2 and not only_full.model.has_sliding_layers
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.layer_types == pruned.config.layer_types
    assert torch.equal(reloaded(PROMPT).logits, pruned(PROMPT).logits)


class _Uncopyable:
    def __deepcopy__(self, memo):
        raise AssertionError("a removed block was copied")


def test_the_copy_never_copies_the_removed_blocks():
    model, _ = tiny_model("tiny-llama")
    decoder_layers(model)[2].trap = _Uncopyable()
    pruned = remove_layers(model, [2])  # raises if block 2 were deep-copied
    assert not any(hasattr(block, "trap") for block in decoder_layers(pruned))
    with pytest.raises(AssertionError, match="was copied"):
        remove_layers(model, [1])


def test_inplace_changes_and_returns_the_same_model():
    model, _ = tiny_model("tiny-llama")
    third = decoder_layers(model)[3]
    result = remove_layers(model, [0, 2], inplace=True)
    assert result is model
    assert model.config.num_hidden_layers == 2 and decoder_layers(model)[1] is third
    assert [block.self_attn.layer_idx for block in decoder_layers(model)] == [0, 1]
    assert torch.equal(_greedy(model, PROMPT, use_cache=True), _greedy(model, PROMPT, use_cache=False))


@pytest.mark.parametrize("name", list(TINY_ARCHITECTURES))
def test_layers_removed_restores_everything_also_when_the_body_raises(name):
    model, _ = tiny_model(name)
    before = _snapshot(model)
    logits = model(PROMPT).logits
    with layers_removed(model, [0]) as inside:
        assert inside is model and model.config.num_hidden_layers == len(before["blocks"]) - 1
        assert torch.equal(model(PROMPT).logits, remove_layers(tiny_model(name)[0], [0])(PROMPT).logits)
    assert _snapshot(model) == before
    with pytest.raises(RuntimeError, match="inside"):
        with layers_removed(model, [1, 2]):
            raise RuntimeError("inside")
    assert _snapshot(model) == before
    assert torch.equal(model(PROMPT).logits, logits)


def test_heterogeneous_per_layer_overrides_are_renumbered():
    model, _ = tiny_model("tiny-llama")
    model.config.per_layer_config = {1: {"rms_norm_eps": 1e-3}, 3: {"rms_norm_eps": 1e-4}}
    pruned = remove_layers(model, [0, 2])
    assert pruned.config.to_dict()["per_layer_config"] == {"0": {"rms_norm_eps": 1e-3}, "1": {"rms_norm_eps": 1e-4}}
    assert model.config.to_dict()["per_layer_config"] == {"1": {"rms_norm_eps": 1e-3}, "3": {"rms_norm_eps": 1e-4}}
    homogeneous = remove_layers(model, [1, 3])
    assert not homogeneous.config.is_heterogeneous


def test_remove_layers_errors_say_what_is_wrong():
    model, _ = tiny_model("tiny-llama")
    with pytest.raises(ValueError, match="empty"):
        remove_layers(model, [])
    with pytest.raises(ValueError, match=r"out of range.*0..3"):
        remove_layers(model, [4])
    with pytest.raises(ValueError, match="out of range"):
        remove_layers(model, [-1])
    with pytest.raises(ValueError, match="Duplicate"):
        remove_layers(model, [1, 1])
    with pytest.raises(ValueError, match="all 4 decoder blocks"):
        remove_layers(model, [0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"write \[2\]"):
        remove_layers(model, 2)
    with pytest.raises(ValueError, match="Cannot find the decoder blocks"):
        remove_layers(torch.nn.Linear(2, 2), [0])
    with pytest.raises(ValueError, match="all 4"):
        with layers_removed(model, range(4)):
            pass
    assert model.config.num_hidden_layers == 4 and len(decoder_layers(model)) == 4


def test_simple_selection_rules():
    model, _ = tiny_model("tiny-gemma3")
    assert select_last(model, 2) == [4, 5] and select_last(30, 3) == [27, 28, 29]
    assert select_first(model, 2) == [0, 1]
    assert select_window(model, 2, 3) == [2, 3, 4] and select_window(6, 3, 3) == [3, 4, 5]
    with pytest.raises(ValueError, match=r"start must be in 0..3"):
        select_window(6, 4, 3)
    with pytest.raises(ValueError, match=r"start must be in 0..3"):
        select_window(6, -1, 3)
    for rule in (select_last, select_first):
        with pytest.raises(ValueError, match="at least one must remain"):
            rule(model, 6)
        with pytest.raises(ValueError, match=">= 1"):
            rule(model, 0)
    with pytest.raises(ValueError, match="model or a number of layers"):
        select_last("six", 1)
    with pytest.raises(ValueError, match="at least 1"):
        select_first(0, 1)


def test_select_by_importance_removes_the_lowest_scores_first():
    scores = torch.tensor([0.9, 0.1, 0.5, 0.05, 0.3, 0.2])
    assert select_by_importance(scores, 1) == [3]
    assert select_by_importance(scores, 3) == [1, 3, 5]
    assert select_by_importance([0.9, 0.1, 0.5, 0.05, 0.3, 0.2], 2, protect_first=2, protect_last=1) == [3, 4]
    assert select_by_importance(scores, 2, no_adjacent=True) == [1, 3]
    # picking the lowest one by one would take block 2 and then a 5.0; the exact choice is {1, 3}
    assert select_by_importance([5.0, 0.1, 0.0, 0.1, 5.0], 2, no_adjacent=True) == [1, 3]


def test_select_by_importance_no_adjacent_is_exact_against_brute_force():
    generator = torch.Generator().manual_seed(0)
    for trial in range(40):
        n_layers = 4 + trial % 6
        scores = torch.rand(n_layers, generator=generator).tolist()
        for n, first, last in ((1, 0, 0), (2, 1, 0), (2, 0, 1), (3, 0, 0)):
            candidates = range(first, n_layers - last)
            feasible = [c for c in itertools.combinations(candidates, n)
                        if all(b - a > 1 for a, b in zip(c, c[1:]))]
            if not feasible or n >= n_layers:
                with pytest.raises(ValueError):
                    select_by_importance(scores, n, first, last, no_adjacent=True)
                continue
            best = min(sum(scores[i] for i in c) for c in feasible)
            chosen = select_by_importance(scores, n, first, last, no_adjacent=True)
            assert all(b - a > 1 for a, b in zip(chosen, chosen[1:])) and set(chosen) <= set(candidates)
            assert sum(scores[i] for i in chosen) == pytest.approx(best)


def test_select_by_importance_errors_when_impossible():
    scores = [0.5, 0.1, 0.2, 0.3, 0.4]
    with pytest.raises(ValueError, match="at least one must remain"):
        select_by_importance(scores, 5)
    with pytest.raises(ValueError, match=">= 1"):
        select_by_importance(scores, 0)
    with pytest.raises(ValueError, match="leaves only 2 removable"):
        select_by_importance(scores, 3, protect_first=2, protect_last=1)
    with pytest.raises(ValueError, match="at most 2"):
        select_by_importance(scores, 3, protect_first=1, no_adjacent=True)
    with pytest.raises(ValueError, match="protect_last must be an integer >= 0"):
        select_by_importance(scores, 1, protect_last=-1)
    with pytest.raises(ValueError, match="NaN or infinite"):
        select_by_importance([0.1, float("nan"), 0.3], 1)
    with pytest.raises(ValueError, match="1-D"):
        select_by_importance(torch.zeros(2, 3), 1)
    with pytest.raises(ValueError, match="block_influence"):
        select_by_importance({"block_influence": torch.zeros(5)}, 1)
    assert removable_layers(6, 2, 1, 2) == [1, 2, 3]


def test_embedded_model_pruned_generates_and_reloads(embedded, tmp_path):
    model, tokenizer = embedded
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    logits = model(ids).logits
    pruned = remove_layers(model, [10, 20, 21])
    assert model.config.num_hidden_layers == 30 and len(decoder_layers(model)) == 30
    assert [block.self_attn.layer_idx for block in decoder_layers(model)] == list(range(30))
    assert torch.equal(model(ids).logits, logits)
    assert pruned.config.num_hidden_layers == 27
    assert [block.self_attn.layer_idx for block in decoder_layers(pruned)] == list(range(27))
    assert torch.equal(_greedy(pruned, ids, use_cache=True), _greedy(pruned, ids, use_cache=False))
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(reloaded(ids).logits, pruned(ids).logits)

"""Attention bypass (utils.bypass, utils.bypass_modeling) and sublayer importance, on every tiny family."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from utils.bypass import (attention_skipped, attention_zeroed, bypass_attention, bypassed_layers, load_bypassed,
                          modeling_source, save_bypassed, select_attention_by_loss)
from utils.speed import filled_cache_layers, kv_cache_bytes, kv_cache_bytes_per_token
from utils.bypass_modeling import MODELING_FILE, cache_slots
from utils.data import calibration_batches
from utils.evaluation import count_parameters
from utils.hooks import count_hooks
from utils.importance import sublayer_importance
from utils.models import decoder_layers, output_cache, tiny_model


def _ids(seed: int = 1, rows: int = 2, tokens: int = 12) -> torch.Tensor:
    return torch.randint(0, 256, (rows, tokens), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids.to(model.device), use_cache=False).logits


def _some_layers(model) -> list[int]:
    """Two blocks including block 0 (the hard case for position tracking) when the family allows it."""
    n = len(decoder_layers(model))
    return [0, n - 2]


def test_bypass_equals_zeroed_attention_and_drops_weights(tiny):
    name, model, _ = tiny
    ids = _ids()
    layers = _some_layers(model)
    with attention_zeroed(model, layers):
        zeroed = _logits(model, ids)
    assert count_hooks(model) == 0
    bypassed = bypass_attention(model, layers)
    assert bypassed_layers(bypassed) == layers and bypassed_layers(model) == []  # the original is untouched
    assert torch.allclose(_logits(bypassed, ids), zeroed, atol=1e-5), name
    assert not torch.allclose(_logits(model, ids), zeroed, atol=1e-3)  # the bypass changes the function
    names = [n for n, _ in bypassed.named_parameters()]
    for index in layers:
        assert not any(n.startswith(f"model.layers.{index}.self_attn.") for n in names)
        assert not any(n.startswith(f"model.layers.{index}.input_layernorm") for n in names)
        assert any(n.startswith(f"model.layers.{index}.mlp.") for n in names)
    per_layer_attention = count_parameters(model)["attention"] / len(decoder_layers(model))
    assert count_parameters(bypassed)["attention"] == pytest.approx(count_parameters(model)["attention"]
                                                                   - len(layers) * per_layer_attention)
    assert isinstance(decoder_layers(bypassed)[0], type(decoder_layers(model)[0]))


def test_attention_skipped_matches_bypass_and_restores(tiny):
    _, model, _ = tiny
    ids, layers = _ids(), _some_layers(model)
    before = _logits(model, ids)
    with attention_skipped(model, layers):
        skipped = _logits(model, ids)
        assert bypassed_layers(model) == layers
    assert bypassed_layers(model) == []
    assert torch.equal(_logits(model, ids), before)
    assert torch.allclose(skipped, _logits(bypass_attention(model, layers), ids), atol=1e-6)


def test_bypass_follows_accelerate_hooks():
    """A model dispatched with a device_map has accelerate hooks that call each block's saved forward:
    bypassing (and skipping) must change that forward too, or the dropped attention would still be called."""
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    model, _ = tiny_model("tiny-llama", seed=0)
    ids, layers = _ids(), _some_layers(model)
    expected = _logits(bypass_attention(model, layers), ids)
    for block in decoder_layers(model):
        add_hook_to_module(block, ModelHook())
    with attention_skipped(model, layers):
        assert torch.allclose(_logits(model, ids), expected, atol=1e-6)
    bypassed = bypass_attention(model, layers, inplace=True)
    assert torch.allclose(_logits(bypassed, ids), expected, atol=1e-6)
    for block in decoder_layers(bypassed):
        remove_hook_from_module(block)
    assert torch.allclose(_logits(bypassed, ids), expected, atol=1e-6)


def test_generate_with_cache_matches_recomputation(tiny):
    name, model, _ = tiny
    bypassed = bypass_attention(model, _some_layers(model))
    prompt = _ids(rows=1, tokens=10).to(bypassed.device)
    with torch.no_grad():
        cached = bypassed.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
        recomputed = bypassed.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(cached, recomputed), name
    # and the step-by-step logits with the cache equal the full forward pass without it
    with torch.no_grad():
        full = bypassed(input_ids=cached.to(bypassed.device), use_cache=False).logits
        output = bypassed(input_ids=cached[:, :10].to(bypassed.device), use_cache=True)
        steps = [output.logits[:, -1]]
        cache = output_cache(output)
        for position in range(10, cached.shape[1] - 1):
            output = bypassed(input_ids=cached[:, position:position + 1], use_cache=True, **{_cache_kwarg(bypassed): cache})
            cache = output_cache(output)
            steps.append(output.logits[:, -1])
    assert torch.allclose(torch.stack(steps, 1), full[:, 9:-1], atol=1e-4), name


def _cache_kwarg(model):
    from utils.models import cache_argument_name

    return cache_argument_name(model)


def test_kv_cache_shrinks_in_proportion(tiny):
    name, model, _ = tiny
    n = len(decoder_layers(model))
    layers = _some_layers(model)
    base = kv_cache_bytes_per_token(model, tokens=8)
    small = kv_cache_bytes_per_token(bypass_attention(model, layers), tokens=8)
    assert base > 0
    assert small == pytest.approx(base * (n - len(layers)) / n), name
    with torch.no_grad():
        cache = output_cache(bypass_attention(model, layers)(input_ids=_ids(tokens=8).to(model.device), use_cache=True))
    assert filled_cache_layers(cache) == n - len(layers)
    assert kv_cache_bytes(cache) == pytest.approx(small * 2 * 8)


def test_cache_slots_keep_types_and_fill_slot_zero():
    types = ["sliding", "sliding", "full", "sliding", "full", "sliding"]
    slots = cache_slots(types, bypassed={0, 2, 3})
    assert slots == {1: 0, 4: 2, 5: 1}
    assert all(types[slot] == types[block] for block, slot in slots.items())
    assert 0 in slots.values()


def test_gemma_mixed_types_bypass_first_sliding_layer():
    model, _ = tiny_model("tiny-gemma3", sliding_window=4)  # window smaller than the text: sliding really matters
    bypassed = bypass_attention(model, [0, 5])  # a sliding layer and the only full-attention layer
    prompt = _ids(rows=1, tokens=9)
    with torch.no_grad():
        cached = bypassed.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True)
        recomputed = bypassed.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=False)
    assert torch.equal(cached, recomputed)


def test_save_and_load_gives_identical_logits(tiny, tmp_path):
    name, model, tokenizer = tiny
    bypassed = bypass_attention(model, _some_layers(model))
    folder = save_bypassed(bypassed, tmp_path / name, tokenizer)
    config = json.loads((folder / "config.json").read_text())
    assert config["bypassed_attention_layers"] == _some_layers(model)
    assert (folder / MODELING_FILE).read_text() == modeling_source()
    loaded = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, dtype=bypassed.dtype)
    loaded = loaded.to(bypassed.device).eval()
    assert bypassed_layers(loaded) == _some_layers(model)
    assert isinstance(loaded, type(model))  # the family's own class (a subclass of it)
    ids = _ids()
    assert torch.equal(_logits(loaded, ids), _logits(bypassed, ids)), name
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in bypassed.parameters())
    with torch.no_grad():
        a = loaded.generate(ids[:1], max_new_tokens=6, do_sample=False)
        b = bypassed.generate(ids[:1], max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)


def test_saved_files_shrink_and_resave(tmp_path):
    model, tokenizer = tiny_model("tiny-llama")
    model.save_pretrained(tmp_path / "base")
    bypassed = bypass_attention(model, [1, 2])
    folder = save_bypassed(bypassed, tmp_path / "bypassed")
    size = lambda f: sum(p.stat().st_size for p in f.glob("*.safetensors"))  # noqa: E731
    assert size(folder) < size(tmp_path / "base")
    loaded = load_bypassed(folder)
    again = save_bypassed(bypass_attention(loaded, [3]), tmp_path / "again")  # bypass more after loading
    assert bypassed_layers(load_bypassed(again)) == [1, 2, 3]


def test_bad_input_errors():
    model, _ = tiny_model("tiny-llama")
    with pytest.raises(ValueError, match="out of range"):
        bypass_attention(model, [4])
    with pytest.raises(ValueError, match="empty"):
        bypass_attention(model, [])
    with pytest.raises(ValueError, match="list"):
        bypass_attention(model, 1)
    with pytest.raises(ValueError, match="every attention"):
        bypass_attention(model, [0, 1, 2, 3])
    bypassed = bypass_attention(model, [1])
    with pytest.raises(ValueError, match="already bypassed"):
        bypass_attention(bypassed, [1, 2])
    with pytest.raises(ValueError, match="no bypassed"):
        save_bypassed(model, "/nonexistent/never")
    decoder_layers(model)[2].self_attn = None  # an architecture whose attention module cannot be found
    del decoder_layers(model)[2].self_attn
    with pytest.raises(ValueError, match="self_attn"):
        bypass_attention(model, [2])


def test_sublayer_importance(tiny):
    name, model, tokenizer = tiny
    batches = calibration_batches(tokenizer, "wikipedia", n_samples=4, seq_len=16, batch_size=2)
    scores = sublayer_importance(model, batches, progress=False)
    n = len(decoder_layers(model))
    assert set(scores) == {"attention", "mlp"}
    assert all(s.shape == (n,) and torch.isfinite(s).all() and (s > 0).all() for s in scores.values())
    assert count_hooks(model) == 0
    bypassed = bypass_attention(model, [1])
    after = sublayer_importance(bypassed, batches, progress=False)
    assert abs(float(after["attention"][1])) < 1e-6 and after["attention"][0] == pytest.approx(float(scores["attention"][0]), rel=1e-4)
    # padding is not scored: a padded copy of the batch gives the same scores
    ids = batches[0]["input_ids"][:1]
    padded = {"input_ids": torch.cat([ids, torch.full((1, 5), 258)], 1),
              "attention_mask": torch.cat([torch.ones_like(ids), torch.zeros(1, 5, dtype=ids.dtype)], 1)}
    plain = sublayer_importance(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], progress=False)
    masked = sublayer_importance(model, [padded], progress=False)
    assert torch.allclose(plain["attention"], masked["attention"], atol=1e-5)


def test_select_attention_by_loss_picks_the_cheapest():
    model, tokenizer = tiny_model("tiny-llama", num_hidden_layers=5)
    batches = calibration_batches(tokenizer, "wikipedia", n_samples=2, seq_len=16, batch_size=2)
    chosen = select_attention_by_loss(model, batches, n=2, protect_first=1, progress=False)
    assert len(chosen) == 2 and 0 not in chosen and len(set(chosen)) == 2
    from utils.importance import calibration_loss

    with attention_skipped(model, chosen[:1]):
        best = calibration_loss(model, batches)
    for other in range(1, 5):
        with attention_skipped(model, [other]):
            assert calibration_loss(model, batches) >= best - 1e-9

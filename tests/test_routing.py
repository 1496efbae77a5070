"""Adaptive attention bypass (utils.routing) on tiny models: routing, equivalence with a fixed skip set,
generate() with the KV cache, save/reload, fitting steps and bad input."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from utils.bypass import attention_skipped, bypass_attention, bypassed_layers
from utils.speed import filled_cache_layers
from utils.data import calibration_batches
from utils.models import decoder_layers, output_cache, tiny_model
from utils.routing import (AttentionRouter, adaptive_state, allocate_skips, fit_router, load_adaptive,
                           make_adaptive, per_input_nll, perplexity_by_kind, pooled_hidden_states,
                           profile_skip_orders, remove_adaptive, save_adaptive, skip_candidates, skip_loss_curve)
from utils.speed import greedy_tokens, interleaved_timings


def threshold_router(model, router_layer, skip_sets, feature=0):
    """A hand-made router: profile "long" when hidden feature `feature` of the pooled state is above 0."""
    hidden = model.config.hidden_size
    weight = torch.zeros(2, hidden)
    weight[1, feature] = 1.0
    return AttentionRouter(router_layer=router_layer, profiles=["short", "long"], skip_sets=skip_sets,
                           weight=weight, bias=torch.zeros(2), feature_mean=torch.zeros(hidden),
                           feature_std=torch.ones(hidden))


def pooled_feature(model, ids, router_layer, feature=0):
    return float(pooled_hidden_states(model, [{"input_ids": ids}], router_layer, progress=False)[0, feature])


def two_inputs(model, router_layer):
    """Two prompts that the threshold router sends to different profiles (searched among random prompts)."""
    generator = torch.Generator().manual_seed(0)
    found = {}
    for _ in range(200):
        ids = torch.randint(0, 256, (1, 12), generator=generator)
        found.setdefault(pooled_feature(model, ids, router_layer) > 0, ids)
        if len(found) == 2:
            return found[False].to(model.device), found[True].to(model.device)
    pytest.skip("no prompt pair with different routes found")


def candidates_and_sets(model):
    candidates = skip_candidates(model, 0)
    return candidates, {"short": candidates[:2], "long": candidates[-1:]}


def test_routes_and_matches_fixed_skip_set(tiny):
    name, model, _ = tiny
    candidates, sets = candidates_and_sets(model)
    short_ids, long_ids = two_inputs(model, 0)
    expected = {}
    for profile, ids in (("short", short_ids), ("long", long_ids)):
        with attention_skipped(model, sets[profile]):
            expected[profile] = model(input_ids=ids.to(model.device), use_cache=False).logits
    base = model(input_ids=short_ids.to(model.device), use_cache=False).logits
    make_adaptive(model, threshold_router(model, 0, sets))
    try:
        state = adaptive_state(model)
        for profile, ids in (("short", short_ids), ("long", long_ids)):
            logits = model(input_ids=ids, use_cache=False).logits
            assert state.last_profiles == [profile]
            assert state.skip_set == sorted(sets[profile])
            torch.testing.assert_close(logits, expected[profile], rtol=0, atol=1e-5)
        assert not torch.allclose(expected["short"], base)  # the skip really changes the output
        # a mixed batch skips only what both profiles skip (here: nothing in common)
        both = torch.cat([short_ids, long_ids])
        model(input_ids=both, use_cache=False)
        assert state.last_profiles == ["short", "long"]
        assert state.skip_set == sorted(set(sets["short"]) & set(sets["long"]))
    finally:
        remove_adaptive(model)
    assert bypassed_layers(model) == []
    assert not hasattr(model, "adaptive_bypass")
    torch.testing.assert_close(model(input_ids=short_ids, use_cache=False).logits, base, rtol=0, atol=0)
    assert not model._forward_pre_hooks and not model.model._forward_pre_hooks
    assert all(not block._forward_hooks for block in decoder_layers(model))


def test_generate_with_cache_equals_recomputation(tiny):
    name, model, _ = tiny
    candidates, sets = candidates_and_sets(model)
    short_ids, long_ids = two_inputs(model, 0)
    make_adaptive(model, threshold_router(model, 0, sets))
    try:
        generated = model.generate(input_ids=short_ids, attention_mask=torch.ones_like(short_ids),
                                   max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=258)
        state = adaptive_state(model)
        assert state.last_profiles == ["short"] and state.skip_set == sorted(sets["short"])
        output = model(input_ids=short_ids.to(model.device), use_cache=True)  # cache slots of skipped blocks stay empty
        kept = len(decoder_layers(model)) - len(sets["short"])
        assert filled_cache_layers(output_cache(output)) == kept
        loop = greedy_tokens(model, short_ids, 6)
    finally:
        remove_adaptive(model)
    ids = short_ids.to(model.device)
    with attention_skipped(model, sets["short"]):  # recompute every step from scratch, no cache
        for _ in range(6):
            next_id = model(input_ids=ids, use_cache=False).logits[:, -1:].argmax(-1)
            ids = torch.cat([ids, next_id], dim=1)
    assert torch.equal(generated, ids)
    assert torch.equal(loop, ids[:, short_ids.shape[1]:])


def test_save_and_reload_identical(tmp_path):
    model, _ = tiny_model("tiny-llama")
    candidates, sets = candidates_and_sets(model)
    short_ids, long_ids = two_inputs(model, 0)
    make_adaptive(model, threshold_router(model, 0, sets))
    save_adaptive(model, tmp_path)
    before = {p: model(input_ids=ids, use_cache=False).logits for p, ids in (("short", short_ids), ("long", long_ids))}
    reloaded = load_adaptive(tmp_path)
    for profile, ids in (("short", short_ids), ("long", long_ids)):
        assert torch.equal(reloaded(input_ids=ids, use_cache=False).logits, before[profile])
        assert adaptive_state(reloaded).last_profiles == [profile]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)  # the weights folder is an ordinary model
    assert torch.equal(plain.state_dict()["model.layers.1.self_attn.q_proj.weight"],
                       model.state_dict()["model.layers.1.self_attn.q_proj.weight"])
    with pytest.raises(FileNotFoundError, match="folder"):
        load_adaptive(tmp_path / "missing")
    (tmp_path / "no_router").mkdir()
    with pytest.raises(ValueError, match="adaptive_router.json"):
        load_adaptive(tmp_path / "no_router")


def test_fitting_steps_and_skipping_helps_where_expected():
    model, tokenizer = tiny_model("tiny-llama")
    batches = {"wikipedia": calibration_batches(tokenizer, "wikipedia", n_samples=4, seq_len=24),
               "sms": calibration_batches(tokenizer, "sms", n_samples=8, seq_len=24, packed=False)}
    candidates = skip_candidates(model, 0)
    importance = {"wikipedia": torch.tensor([0.5, 0.1, 0.3, 0.2]), "sms": torch.tensor([0.5, 0.3, 0.1, 0.2])}
    orders = profile_skip_orders(importance, candidates)
    assert orders == {"wikipedia": [1, 3, 2], "sms": [2, 3, 1]}
    curve = skip_loss_curve(model, batches["wikipedia"], orders["wikipedia"], 2, progress=False)
    assert curve.shape == (3,) and torch.isfinite(curve).all() and curve[1] != curve[0]
    curves = {"wikipedia": torch.tensor([1.0, 1.5, 3.0, 9.0]), "sms": torch.tensor([2.0, 2.1, 2.2, 2.3])}
    assert allocate_skips(curves, 1.5, {"wikipedia": 1, "sms": 1}) == {"wikipedia": 0, "sms": 3}
    assert allocate_skips(curves, 1.0, {"wikipedia": 1, "sms": 3}) == {"wikipedia": 1, "sms": 1}  # the only way
    # token weights: when the mix's tokens are mostly SMS, SMS keeps its attention instead
    assert allocate_skips(curves, 1.5, {"wikipedia": 1, "sms": 1}, {"wikipedia": 0.01, "sms": 100.0})["sms"] == 0
    features = {kind: pooled_hidden_states(model, b, 0, progress=False) for kind, b in batches.items()}
    assert features["sms"].shape == (8, model.config.hidden_size)
    router = fit_router(features, 0, {"wikipedia": orders["wikipedia"][:1], "sms": orders["sms"][:2]})
    assert router.extra["train_accuracy"] >= 0.75
    make_adaptive(model, router)
    try:
        rows = [b["input_ids"][i][b["attention_mask"][i].bool()] for b in batches["sms"] for i in range(len(b["input_ids"]))]
        scored = per_input_nll(model, rows, progress=False)
        assert all(r["profile"] in ("wikipedia", "sms") for r in scored)
        assert all(r["skipped"] == len(router.skip_sets[r["profile"]]) for r in scored)
        assert sum(r["tokens"] for r in scored) == sum(len(r) - 1 for r in rows)
        summary = perplexity_by_kind({"sms": scored, "copy": scored[:1]})
        assert summary["mix"] > 1 and summary["sms"] > 1
        assert summary["mean skipped"] == sum(r["skipped"] for r in scored + scored[:1]) / (len(scored) + 1)
    finally:
        remove_adaptive(model)


def test_router_cost_is_measured_with_same_work_as_static():
    model, _ = tiny_model("tiny-llama")
    _, sets = candidates_and_sets(model)
    short_ids, _ = two_inputs(model, 0)
    static = bypass_attention(model, sets["short"])
    make_adaptive(model, threshold_router(model, 0, sets))
    try:
        assert torch.equal(greedy_tokens(model, short_ids, 4), greedy_tokens(static, short_ids, 4))
        timings = interleaved_timings({"adaptive": lambda: greedy_tokens(model, short_ids, 2),
                                       "static": lambda: greedy_tokens(static, short_ids, 2)}, repeats=2)
        assert set(timings) == {"adaptive", "static"} and all(t > 0 for t in timings.values())
    finally:
        remove_adaptive(model)


def test_bad_input():
    model, _ = tiny_model("tiny-llama")
    with pytest.raises(ValueError, match="no attention sublayer is left"):
        skip_candidates(model, 3)
    with pytest.raises(ValueError, match="router_layer"):
        skip_candidates(model, 7)
    with pytest.raises(ValueError, match="cannot be skipped"):
        make_adaptive(model, threshold_router(model, 1, {"short": [1], "long": [3]}))
    with pytest.raises(ValueError, match="cannot be skipped"):
        make_adaptive(model, threshold_router(model, 0, {"short": [9], "long": [3]}))
    with pytest.raises(ValueError, match="skip_sets has profiles"):
        make_adaptive(model, threshold_router(model, 0, {"short": [2]}))
    with pytest.raises(ValueError, match="budget"):
        allocate_skips({"a": torch.zeros(3), "b": torch.zeros(4)}, 2.5, {"a": 1, "b": 1})
    with pytest.raises(ValueError, match="average exactly"):
        allocate_skips({"a": torch.zeros(3), "b": torch.zeros(3)}, 0.3, {"a": 1, "b": 1})
    with pytest.raises(ValueError, match="two profiles"):
        fit_router({"a": torch.zeros(2, 64)}, 0, {"a": [1]})
    with pytest.raises(ValueError, match="no adaptive router"):
        remove_adaptive(model)
    with attention_skipped(model, [2]):
        with pytest.raises(ValueError, match="skipped for now"):
            make_adaptive(model, threshold_router(model, 0, {"short": [2], "long": [3]}))
    make_adaptive(model, threshold_router(model, 0, {"short": [2], "long": [3]}))
    with pytest.raises(ValueError, match="already has"):
        make_adaptive(model, threshold_router(model, 0, {"short": [2], "long": [3]}))
    remove_adaptive(model)
    with pytest.raises(ValueError, match="format"):
        AttentionRouter.from_dict({"format": 99})


def test_router_on_a_bypassed_model_skips_only_attention_that_is_left():
    """Blocks bypassed for good are no candidates, and neither is the first block that still has attention
    (its KV-cache slot 0 is where the model reads the past length)."""
    model, _ = tiny_model("tiny-llama")
    bypassed = bypass_attention(model, [0])
    assert skip_candidates(model, 0) == [1, 2, 3] and skip_candidates(bypassed, 0) == [2, 3]
    assert skip_candidates(bypass_attention(model, [2]), 0) == [1, 3]
    with pytest.raises(ValueError, match="cannot be skipped"):
        make_adaptive(bypass_attention(model, [2]), threshold_router(model, 0, {"short": [2], "long": [3]}))

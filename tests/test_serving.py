"""Served decoding (utils.serving) on tiny models: the eager fallback of the served step on the CPU, the
report's fields against the card table, the grouped-query decode attention against transformers' SDPA,
the bytes of a step for every transformation, and bad input. The tests of the CPU fallback build their model
on the CPU in float32 (`cpu_llama`) whatever REARCH_DEVICE says; the others use the lane's device (`llama`).
The CUDA-graph path runs on the GPU machine through benchmarks/served_speed.py (results in
benchmarks/results/served_speed-llama-3.1-8b-cuda.json)."""

import pytest
import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from utils.bypass import bypass_attention
from utils.depth import remove_layers
from utils.models import decoder_layers, load_model, model_device
from utils.routing import AttentionRouter, adaptive_state, make_adaptive
from utils.serving import (
    ATTENTIONS,
    card_peaks,
    compile_blocks,
    copy_bandwidth,
    decode_attention,
    decode_attention_matmul,
    has_forward_hooks,
    prefill_report,
    python_hooks_suspended,
    relation_to_ideal,
    served_decode_report,
    served_decode_step,
    step_bytes,
)
from utils.speed import decode_bytes
from utils.width import prune_glu_width, static_neuron_importance


@pytest.fixture(scope="module")
def llama(one_thread):
    """The tiny Llama on the lane's device and dtype (REARCH_DEVICE, REARCH_DTYPE): CUDA in the GPU lane."""
    return load_model("tiny-llama")[0]


@pytest.fixture(scope="module")
def cpu_llama(one_thread):
    """The tiny Llama on the CPU in float32 whatever the lane: for the tests of the CPU (eager) fallback."""
    return load_model("tiny-llama", device="cpu", dtype="fp32")[0]


def adaptive_copy(model, skip):
    """A copy of `model` with a one-profile router installed and its skip set applied (a fixed decision)."""
    import copy

    adaptive = copy.deepcopy(model)
    hidden = model.config.hidden_size
    router = AttentionRouter(router_layer=0, profiles=["p"], skip_sets={"p": skip}, weight=torch.zeros(1, hidden),
                             bias=torch.zeros(1), feature_mean=torch.zeros(hidden), feature_std=torch.ones(hidden))
    make_adaptive(adaptive, router)
    adaptive_state(adaptive).apply(skip)
    return adaptive


def test_card_table_lookup_and_override():
    assert card_peaks("NVIDIA H200")["memory_bytes_per_s"] == 4.8e12
    assert card_peaks("Tesla T4")["memory_bytes_per_s"] == 320e9
    assert card_peaks("NVIDIA H100 PCIe")["memory_bytes_per_s"] == 2.0e12  # the longest key wins
    assert card_peaks("NVIDIA H100 80GB HBM3")["memory_bytes_per_s"] == 3.35e12
    assert card_peaks("NVIDIA A100-SXM4-80GB")["memory_bytes_per_s"] == 2.039e12
    cpu = card_peaks("cpu")
    assert cpu["table_key"] is None and cpu["memory_bytes_per_s"] is None
    assert card_peaks("cpu", memory_bytes_per_s=5e10)["memory_bytes_per_s"] == 5e10
    assert card_peaks("Tesla T4", memory_bytes_per_s=1e11)["memory_bytes_per_s"] == 1e11
    for bad in (-1.0, 0, True, "fast"):
        with pytest.raises(ValueError, match="memory_bytes_per_s"):
            card_peaks("cpu", memory_bytes_per_s=bad)


@pytest.mark.parametrize("with_mask", [False, True])
def test_decode_attention_matches_transformers_sdpa(with_mask):
    generator = torch.Generator().manual_seed(0)
    rows, heads, kv_heads, length, dim = 2, 8, 2, 11, 16
    query = torch.randn(rows, heads, 1, dim, generator=generator)
    key = torch.randn(rows, kv_heads, length, dim, generator=generator)
    value = torch.randn(rows, kv_heads, length, dim, generator=generator)
    mask = None
    if with_mask:
        mask = torch.ones(rows, 1, 1, length, dtype=torch.bool)
        mask[0, ..., -3:] = False  # the first row sees fewer keys
    module = nn.Module()
    module.num_key_value_groups = heads // kv_heads
    module.is_causal = True
    reference, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=dim ** -0.5)
    for function in (decode_attention, decode_attention_matmul):
        output, _ = function(module, query, key, value, mask, scaling=dim ** -0.5)
        assert output.shape == (rows, 1, heads, dim)
        torch.testing.assert_close(output, reference, atol=1e-5, rtol=1e-5)


def test_served_step_falls_back_to_eager_and_agrees_across_attentions(cpu_llama):
    logits = {}
    for attention in ATTENTIONS:
        step = served_decode_step(cpu_llama, batch_size=2, context=10, attention=attention)
        assert step.mode == "eager"
        first = step().clone()
        assert torch.equal(step.tokens, first[:, -1:].argmax(-1))  # fed back: a real greedy step
        assert torch.isfinite(first).all() and first.shape == (2, 1, cpu_llama.config.vocab_size)
        assert not first.requires_grad
        logits[attention] = first
    torch.testing.assert_close(logits["decode"], logits["sdpa"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits["matmul"], logits["sdpa"], atol=1e-5, rtol=1e-4)
    assert cpu_llama.config._attn_implementation == "sdpa"  # restored after each call


def test_step_bytes_for_every_transformation(llama):
    n = len(decoder_layers(llama))
    assert step_bytes(llama, 9, 2)["total"] == decode_bytes(llama, 9, 2)
    static = bypass_attention(llama, [1])
    adaptive = adaptive_copy(llama, [1])
    assert step_bytes(adaptive, 9, 2) == step_bytes(static, 9, 2)  # weights kept but not read, no KV slot
    assert step_bytes(adaptive, 9, 2)["total"] < step_bytes(llama, 9, 2)["total"]
    depth = remove_layers(llama, [n - 1])
    assert step_bytes(depth, 9)["weights"] < step_bytes(llama, 9)["weights"]


def test_report_on_the_cpu_for_every_transformation(cpu_llama):
    scores = static_neuron_importance(cpu_llama, "peak_to_peak")
    width = cpu_llama.config.intermediate_size // 2
    models = {"base": cpu_llama, "depth": remove_layers(cpu_llama, [1]),
              "width": prune_glu_width(cpu_llama, scores, intermediate_size=width),
              "bypass": bypass_attention(cpu_llama, [1]), "adaptive": adaptive_copy(cpu_llama, [1])}
    peaks = card_peaks("cpu", memory_bytes_per_s=1e10)
    report = served_decode_report(models, batch_size=1, context=8, steps=2, repeats=2, warmup=0, peaks=peaks)
    assert report["mode"] == "eager" and report["card"] == "cpu" and report["memory_bytes_per_s"] == 1e10
    for name, row in report["models"].items():
        ms = row["ms_per_step"]
        assert 0 < ms["min"] <= ms["q1"] <= ms["median"] <= ms["q3"] <= ms["max"]
        assert row["bytes"] == step_bytes(models[name], 9, 1)
        assert row["fraction_of_peak"] == pytest.approx(row["achieved_bytes_per_s"] / 1e10)
        assert row["ideal_ms"] == pytest.approx(1000 * row["bytes"]["total"] / 1e10)
        assert row["speedup_over_ideal"] == pytest.approx(row["speedup"] / row["ideal_speedup"])
    assert report["models"]["base"]["speedup"] == 1.0
    for name in ("depth", "width", "bypass", "adaptive"):
        assert report["models"][name]["ideal_speedup"] > 1
    unknown = served_decode_report({"base": cpu_llama}, context=4, steps=1, repeats=1, warmup=0, peaks=card_peaks("cpu"))
    assert unknown["models"]["base"]["fraction_of_peak"] is None


def test_prefill_report_fields(llama):
    report = prefill_report({"base": llama, "depth": remove_layers(llama, [1])}, tokens=16, repeats=1, warmup=0,
                            peaks=card_peaks("Tesla T4"))
    assert report["bf16_flops_per_s"] == 65e12
    depth = report["models"]["depth"]
    assert depth["ideal_speedup"] > 1 and 0 < depth["fraction_of_peak"] < 1


def test_hooks_suspended_and_restored(llama):
    calls = []
    handle = llama.register_forward_hook(lambda *args: calls.append(1))
    try:
        ids = torch.tensor([[1, 2]], device=model_device(llama))
        with python_hooks_suspended(llama):
            llama(input_ids=ids)
        assert calls == []
        llama(input_ids=ids)
        assert calls == [1]
    finally:
        handle.remove()


def test_bad_inputs(llama, cpu_llama):
    for kwargs, word in (({"batch_size": 0}, "batch_size"), ({"context": -1}, "context"), ({"context": 2.5}, "context"),
                         ({"mode": "fast"}, "mode"), ({"attention": "flash"}, "attention")):
        with pytest.raises(ValueError, match=word):
            served_decode_step(llama, **kwargs)
    with pytest.raises(ValueError, match="CUDA"):  # a CUDA graph needs a model on a CUDA device
        served_decode_step(cpu_llama, mode="graph")
    with pytest.raises(ValueError, match="steps"):
        served_decode_report({"base": llama}, steps=0)
    with pytest.raises(ValueError, match="at least one"):
        served_decode_report({})
    with pytest.raises(ValueError, match="baseline"):
        served_decode_report({"base": llama}, baseline="other")
    with pytest.raises(ValueError, match="mode"):
        compile_blocks(llama, "reduce-overhead")  # its CUDA graphs would nest inside the step's own
    with pytest.raises(ValueError, match="scope"):
        compile_blocks(llama, scope="layers")
    with pytest.raises(ValueError, match="megabytes"):
        copy_bandwidth("cpu", 0)
    assert copy_bandwidth("cpu", 8, repeats=2) > 0


def test_relation_to_ideal():
    assert relation_to_ideal(1.31, 1.30) == "close to"
    assert relation_to_ideal(1.285, 1.157) == "above"
    assert relation_to_ideal(1.13, 1.43) == "below"
    with pytest.raises(ValueError, match="tolerance"):
        relation_to_ideal(0, 1.2)


def test_compile_blocks_whole_model_keeps_the_step_exact():
    # scope="model" compiles the whole forward (Inductor; "default" mode, so the CPU lane compiles in seconds
    # rather than autotuning): the served step's logits match the eager model's
    model = load_model("tiny-llama")[0]
    reference = served_decode_step(model, batch_size=2, context=8, mode="eager")().clone()
    compile_blocks(model, "default", scope="model")
    step = served_decode_step(model, batch_size=2, context=8, mode="auto")
    exact = next(model.parameters()).dtype == torch.float32  # the GPU lane runs bf16 and fp16: fused kernels round
    tolerance = dict(rtol=1e-4, atol=1e-4) if exact else dict(rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(step().float(), reference.float(), **tolerance)


def test_whole_model_compile_runs_hooks_eagerly_and_captures_an_adaptive_step():
    # a compiled graph ignores hooks added after tracing, so the whole-model compile runs the eager forward
    # whenever a hook is on (an adaptive router at prefill acts), and the compiled graph when none is (a
    # served step, captured with the hooks suspended): the adaptive model's step keeps its skip set's logits
    from torch._dynamo.utils import counters

    model = load_model("tiny-llama")[0]
    adaptive = adaptive_copy(model, [1])
    reference = served_decode_step(adaptive, batch_size=2, context=8, mode="eager")().clone()
    compile_blocks(adaptive, "default", scope="model")
    assert has_forward_hooks(adaptive) and not has_forward_hooks(model)
    ids = torch.tensor([[1, 2, 3]], device=model_device(adaptive))
    calls = []
    handle = decoder_layers(adaptive)[0].register_forward_hook(lambda *args: calls.append(1))
    try:
        compiled_before = counters["stats"]["unique_graphs"]
        adaptive(input_ids=ids)  # eager: the router routes this prompt and the extra hook runs
        assert calls == [1] and adaptive_state(adaptive).last_profiles == ["p"]
        assert counters["stats"]["unique_graphs"] == compiled_before  # nothing traced while hooks are on
    finally:
        handle.remove()
    adaptive_state(adaptive).apply([1])
    with python_hooks_suspended(adaptive):  # on the CPU the step is eager: run it the way a capture does
        step = served_decode_step(adaptive, batch_size=2, context=8, mode="auto")
        logits = step().float()
    assert counters["stats"]["unique_graphs"] > compiled_before  # the step ran the compiled graph
    exact = next(adaptive.parameters()).dtype == torch.float32
    tolerance = dict(rtol=1e-4, atol=1e-4) if exact else dict(rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(logits, reference.float(), **tolerance)
    assert has_forward_hooks(adaptive)  # the router's hooks are back

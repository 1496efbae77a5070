"""bfloat16 autocast on a CPU with bfloat16 units (utils.models.cpu_autocast_dtype): when it is chosen, that the
evaluation passes and the training loop really run their matrix products in bfloat16, that the values stay
close to float32, and that cached values never cross from one precision to the other."""

import contextlib

import pytest
import torch

import utils.models as models
from conftest import SKIP_EMBEDDED
from utils.data import calibration_batches, token_ids
from utils.distill import next_token_loss
from utils.evaluation import cached_perplexity, perplexity, run_lm_eval
from utils.models import compute_autocast, compute_precision, cpu_autocast_dtype, cpu_has_bf16_units, library_versions
from utils.specialize import classify, sms_examples
from utils.training import autocast_dtype, train


@pytest.fixture
def model_and_tokenizer():
    # a float32 model on the CPU, whatever the lane (the GPU lane's REARCH_DEVICE and REARCH_DTYPE): these tests are
    # about the CPU's autocast, which a model on a GPU or in a low-precision dtype never takes
    return models.load_model("tiny-llama", device="cpu", dtype="fp32")


@contextlib.contextmanager
def linear_output_dtypes(model):
    """The dtypes of every nn.Linear output while the context is open."""
    seen = set()
    handles = [m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
               for m in model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def test_the_variable_decides(monkeypatch, model_and_tokenizer):
    model, _ = model_and_tokenizer
    monkeypatch.setenv("REARCH_CPU_AUTOCAST", "off")
    assert cpu_autocast_dtype(model) is None and compute_precision() == "float32"
    with compute_autocast(model):
        assert not torch.is_autocast_enabled("cpu")
    monkeypatch.setenv("REARCH_CPU_AUTOCAST", "bf16")
    assert cpu_autocast_dtype(model) == torch.bfloat16
    assert compute_precision() == "bf16 autocast"
    if not torch.cuda.is_available():  # the run records name the CPU's precision; on a GPU machine they name the card
        assert compute_precision() in library_versions()["device"]
    with compute_autocast(model):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("units", [True, False])
def test_auto_follows_the_processor(monkeypatch, model_and_tokenizer, units):
    model, _ = model_and_tokenizer
    monkeypatch.setenv("REARCH_CPU_AUTOCAST", "auto")
    monkeypatch.setattr(models, "cpu_has_bf16_units", lambda: units)
    assert cpu_autocast_dtype(model) == (torch.bfloat16 if units else None)
    monkeypatch.delenv("REARCH_CPU_AUTOCAST")  # unset means auto
    assert cpu_autocast_dtype(model) == (torch.bfloat16 if units else None)


def test_the_processor_check_is_a_bool():
    assert isinstance(cpu_has_bf16_units(), bool)


def test_a_low_precision_model_keeps_its_own(monkeypatch, model_and_tokenizer):
    model, _ = model_and_tokenizer
    monkeypatch.setenv("REARCH_CPU_AUTOCAST", "bf16")
    assert cpu_autocast_dtype(model.to(torch.bfloat16)) is None
    assert autocast_dtype(model, "auto") == torch.bfloat16  # its own dtype, as before


def test_a_lora_model_keeps_float32(monkeypatch, model_and_tokenizer):
    from peft import get_peft_model

    from utils.specialize import lora_config

    model, _ = model_and_tokenizer
    monkeypatch.setenv("REARCH_CPU_AUTOCAST", "bf16")
    adapted = get_peft_model(model, lora_config(model, "all-linear", rank=2))
    assert cpu_autocast_dtype(adapted) is None and autocast_dtype(adapted, "auto") is None
    assert cpu_autocast_dtype(adapted.merge_and_unload()) == torch.bfloat16  # merged: a plain model again


def test_evaluation_runs_in_bf16_and_stays_close(monkeypatch, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = token_ids(tokenizer, "wikipedia", "eval", max_tokens=512)
    monkeypatch.setenv("REARCH_CPU_AUTOCAST", "off")
    with linear_output_dtypes(model) as seen:
        reference = perplexity(model, ids, window=128, progress=False)
    assert seen == {torch.float32}
    monkeypatch.setenv("REARCH_CPU_AUTOCAST", "bf16")
    with linear_output_dtypes(model) as seen:
        low = perplexity(model, ids, window=128, progress=False)
    assert seen == {torch.bfloat16}
    assert abs(low / reference - 1) < 0.02
    examples = sms_examples("eval", "classify", 2, seed=0, max_chars=60)
    with linear_output_dtypes(model) as seen:
        classify(model, tokenizer, examples)
    assert seen == {torch.bfloat16}
    with linear_output_dtypes(model) as seen:
        table = run_lm_eval(model, tokenizer, limit=2)
    assert seen == {torch.bfloat16} and table["value"].between(0, 1).all()


def test_training_autocasts_and_keeps_float32_weights(monkeypatch, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    batches = calibration_batches(tokenizer, "wikipedia", n_samples=2, seq_len=32, batch_size=2, split="train")
    monkeypatch.setenv("REARCH_CPU_AUTOCAST", "off")
    assert autocast_dtype(model, "auto") is None
    monkeypatch.setenv("REARCH_CPU_AUTOCAST", "bf16")
    assert autocast_dtype(model, "auto") == torch.bfloat16
    assert autocast_dtype(model, "no") is None
    with linear_output_dtypes(model) as seen:
        history = train(model, batches, lambda m, b: next_token_loss(m(**b, use_cache=False).logits, b["input_ids"]),
                        steps=2, lr=1e-3, progress=False)
    assert seen == {torch.bfloat16}
    assert all(torch.isfinite(torch.tensor(history.column("loss"))))
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_cached_values_never_cross_precisions(monkeypatch, model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    ids = token_ids(tokenizer, "wikipedia", "eval", max_tokens=256)
    values = {}
    for mode in ("off", "bf16", "off"):
        monkeypatch.setenv("REARCH_CPU_AUTOCAST", mode)
        values.setdefault(mode, []).append(cached_perplexity(model, ids, window=128, progress=False, cache_dir=tmp_path))
        assert values[mode][-1] == perplexity(model, ids, window=128, progress=False)
    assert len(list((tmp_path / "perplexity").glob("*.json"))) == 2


@SKIP_EMBEDDED
def test_the_embedded_model_in_bf16_is_within_half_a_percent(monkeypatch, embedded):
    """What lets the book use it: the embedded model's held-out perplexity moves by less than 0.5% (measured
    2026-12-07: 22.113 -> 22.105 for the base, 50.33 -> 50.41 with six blocks removed)."""
    model, tokenizer = embedded
    ids = token_ids(tokenizer, "wikipedia", "eval", max_tokens=1024)
    monkeypatch.setenv("REARCH_CPU_AUTOCAST", "off")
    reference = perplexity(model, ids, window=512, progress=False)
    monkeypatch.setenv("REARCH_CPU_AUTOCAST", "bf16")
    low = perplexity(model, ids, window=512, progress=False)
    assert abs(low / reference - 1) < 0.005


def test_statistics_passes_run_in_bf16_but_sum_in_full_precision(monkeypatch, model_and_tokenizer):
    """activation_statistics runs its forward pass under bf16 autocast; the hooks hand the callback bf16
    activations with autocast switched off, so the Gram matrix is a float32 product, not a bf16 one."""
    from utils.hooks import capture_activations
    from utils.width import activation_statistics

    model, tokenizer = model_and_tokenizer
    batches = calibration_batches(tokenizer, "wikipedia", n_samples=4, seq_len=32, batch_size=2)
    monkeypatch.setenv("REARCH_CPU_AUTOCAST", "off")
    reference = activation_statistics(model, batches, gram=True, progress=False)
    monkeypatch.setenv("REARCH_CPU_AUTOCAST", "bf16")
    with linear_output_dtypes(model) as seen:
        low = activation_statistics(model, batches, gram=True, progress=False)
    assert seen == {torch.bfloat16}
    for key in ("mean", "mean_abs", "mean_square"):
        assert float((low[key] - reference[key]).norm() / reference[key].norm()) < 0.05, key
    assert low["gram"].dtype == torch.float64
    assert float((low["gram"] - reference["gram"]).norm() / reference["gram"].norm()) < 0.02
    inside = []

    def callback(point, layer, tensor):
        flat = tensor.reshape(-1, tensor.shape[-1]).float()
        inside.append((tensor.dtype, torch.is_autocast_enabled("cpu"), (flat.T @ flat).dtype))

    ids = batches[0]["input_ids"]
    with compute_autocast(model), capture_activations(model, layers=[0], points=("mlp_act",), callback=callback):
        with torch.no_grad():
            model(input_ids=ids)
    assert inside == [(torch.bfloat16, False, torch.float32)]
    assert not torch.is_autocast_enabled("cpu")


@SKIP_EMBEDDED
def test_the_embedded_models_block_rankings_survive_bf16(monkeypatch, embedded):
    """The importance passes run in bf16 on such a CPU: on the embedded model the choices the chapters make from
    them stay the same (CH04's 6-block angular window and its lowest block influences, CH07's least important
    attention sublayers)."""
    from utils.importance import layer_importance, sublayer_importance

    model, tokenizer = embedded
    batches = calibration_batches(tokenizer, "wikipedia", n_samples=8, seq_len=256, batch_size=8)
    found = {}
    for mode in ("off", "bf16"):
        monkeypatch.setenv("REARCH_CPU_AUTOCAST", mode)
        layers = layer_importance(model, batches, window_blocks=6, progress=False)
        attention = sublayer_importance(model, batches, progress=False)["attention"]
        found[mode] = (int(layers["angular_distance"].argmin()), set(layers["block_influence"].argsort()[:6].tolist()),
                       set(attention.argsort()[:8].tolist()))
    assert found["bf16"] == found["off"]

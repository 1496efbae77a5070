"""The one training loop: precision (fp32 master weights, autocast, loss scaling), its checks, its history."""

from __future__ import annotations

import copy

import pytest
import torch

from utils.data import calibration_batches
from utils.distill import distill
from utils.models import load_model
from utils.training import TrainingHistory, autocast_dtype, train


def _lm_loss(model, batch):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), use_cache=False)
    return {"loss": out.loss.float()}


@pytest.fixture(scope="module")
def batches():
    _, tokenizer = load_model("tiny-llama")
    return calibration_batches(tokenizer, "wikipedia", n_samples=4, seq_len=32, split="train", batch_size=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models_train_with_fp32_master_weights(dtype, batches, one_thread):
    """A model loaded in fp16 or bf16 (what a GPU loader picks) trains to a finite, lower loss, and comes back
    in its own dtype with weights that moved."""
    model, _ = load_model("tiny-llama", dtype=dtype)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert autocast_dtype(model) == dtype
    history = train(model, batches[:1], _lm_loss, steps=12, lr=3e-3, progress=False)
    losses = history.column("loss")
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.1, losses
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert any(not torch.equal(before[name], p) for name, p in model.named_parameters())


def test_fp16_distillation_stays_finite(batches, one_thread):
    """The failure learners met on a T4: distillation of an fp16 student (NaN at step 2 before)."""
    teacher, _ = load_model("tiny-llama", dtype=torch.float16)
    student = copy.deepcopy(teacher)
    torch.nn.init.normal_(student.model.layers[0].mlp.down_proj.weight, std=0.3)
    history = distill(student, teacher, batches, steps=8, lr=1e-3, ce_weight=0.0, kd_weight=1.0, progress=False)
    assert all(torch.isfinite(torch.tensor(history.column("loss"))))
    assert history.column("kd")[-1] < history.column("kd")[0]
    assert next(student.parameters()).dtype == torch.float16


def test_fp32_model_trains_in_fp32_unless_asked(batches, one_thread):
    model, _ = load_model("tiny-llama", dtype=torch.float32)
    assert autocast_dtype(model) is None and autocast_dtype(model, "bf16") == torch.bfloat16
    assert autocast_dtype(model, "no") is None
    reference = copy.deepcopy(model)
    plain = train(model, batches, _lm_loss, steps=3, lr=1e-3, progress=False)
    same = train(reference, batches, _lm_loss, steps=3, lr=1e-3, mixed_precision="no", progress=False)
    assert plain.column("loss") == same.column("loss")  # "auto" on fp32 is exactly fp32
    bf16 = train(copy.deepcopy(reference), batches, _lm_loss, steps=3, lr=1e-3, mixed_precision="bf16", progress=False)
    assert next(reference.parameters()).dtype == torch.float32
    assert all(torch.isfinite(torch.tensor(bf16.column("loss"))))


def test_history_rows_and_evaluation_schedule(batches, one_thread):
    model, _ = load_model("tiny-llama")
    calls = []

    def evaluate(m):
        calls.append(m.training)
        return {"score": 1.0}

    history = train(model, batches, _lm_loss, steps=4, lr=1e-3, eval_fn=evaluate, eval_every=2, progress=False)
    assert isinstance(history, TrainingHistory)
    assert [row["step"] for row in history.eval] == [0, 2, 4] and calls == [False, False, False]
    assert set(history.train[0]) >= {"step", "loss", "lr", "grad_norm", "tokens", "train_s", "elapsed_s"}
    assert history.column("tokens") == sorted(history.column("tokens"))
    assert not model.training


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=0), "steps"), (dict(lr=0), "lr"), (dict(grad_accum=0), "grad_accum"),
    (dict(warmup_steps=5), "warmup_steps"), (dict(eval_every=0), "eval_every"), (dict(max_grad_norm=0), "max_grad_norm"),
    (dict(weight_decay=-1), "weight_decay"), (dict(mixed_precision="fp8"), "mixed_precision"),
])
def test_bad_arguments_name_themselves(kwargs, message, batches):
    model, _ = load_model("tiny-llama")
    before = [p.detach().clone() for p in model.parameters()]
    arguments = dict(steps=2, lr=1e-3, progress=False) | kwargs
    with pytest.raises(ValueError, match=message):
        train(model, batches, _lm_loss, **arguments)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("kwargs, message", [(dict(steps=2.5), "steps"), (dict(steps=True), "steps"),
                                             (dict(lr="1e-3"), "lr"), (dict(warmup_steps=1.0), "warmup_steps")])
def test_arguments_of_the_wrong_type_are_type_errors(kwargs, message, batches):
    model, _ = load_model("tiny-llama")
    with pytest.raises(TypeError, match=message):
        train(model, batches, _lm_loss, **(dict(steps=2, lr=1e-3, progress=False) | kwargs))


def test_a_loss_function_must_return_a_loss(batches):
    model, _ = load_model("tiny-llama")
    with pytest.raises(ValueError, match="loss_fn must return"):
        train(model, batches, lambda m, b: 3.0, steps=1, lr=1e-3, progress=False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        frozen, _ = load_model("tiny-llama")
        frozen.requires_grad_(False)
        train(frozen, batches, _lm_loss, steps=1, lr=1e-3, progress=False)


def _nan_gradient(loss):
    """The loss, unchanged in value, with a NaN gradient: sqrt(0 * loss) is 0, its derivative inf * 0."""
    return loss + torch.sqrt(loss * 0.0)


def test_steps_with_non_finite_gradients_are_skipped_and_counted(batches, one_thread):
    """A finite loss whose gradients are NaN (an overflow in a low-precision backward) skips that step's
    update instead of writing NaN into the weights; more than the allowed share of such steps stops the run."""
    model, _ = load_model("tiny-llama", dtype=torch.float32)
    calls = {"n": 0}

    def sometimes_nan_gradient(trained, batch):
        calls["n"] += 1
        loss = _lm_loss(trained, batch)["loss"]
        return {"loss": _nan_gradient(loss) if calls["n"] in (2, 4) else loss}

    history = train(model, batches[:1], sometimes_nan_gradient, steps=6, lr=1e-3, progress=False)
    assert history.column("skipped") == [0, 1, 1, 2, 2, 2]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(torch.tensor(history.column("loss"))))

    always = lambda trained, batch: {"loss": _nan_gradient(_lm_loss(trained, batch)["loss"])}
    with pytest.raises(FloatingPointError, match="gradients were not finite in 4 of 4 steps"):
        train(load_model("tiny-llama", dtype=torch.float32)[0], batches[:1], always, steps=8, lr=1e-3, progress=False)

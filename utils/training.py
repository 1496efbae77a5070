"""The one training loop of the course: distillation (`utils.distill`) and LoRA (`utils.specialize`) use it.

`train` takes a model, a list of batches and a loss function `loss_fn(model, batch)` that returns the
loss (a scalar tensor, or a dict whose "loss" is the one to minimize and whose other entries are logged).
Everything else is the same for every kind of training, so it is written once here: argument checks,
AdamW (torch's fused kernel on a CPU) with linear warm-up then cosine decay (transformers'
`get_cosine_schedule_with_warmup`), the batch stream (cycled, optionally reshuffled every pass), gradient
accumulation, a check that the loss stays finite, gradient clipping, held-out evaluation on a schedule, a
progress bar, and a history of rows.

Precision: a model loaded in float16 or bfloat16 (what `utils.models.load_model` picks on a GPU) is
trained with float32 master weights and autocast in its own dtype, float16 with dynamic loss scaling
(torch.amp.GradScaler), so a T4 (float16) trains the same recipe as an H100 (bfloat16) or a CPU (float32).
The trainable parameters go back to the model's dtype at the end. A float32 model on a CPU with bfloat16
units trains under bfloat16 autocast (`utils.models.cpu_autocast_dtype`; about 1.6x faster a step there), a
model with LoRA adapters excepted.
`mixed_precision` can also ask for autocast on a float32 model ("bf16", "fp16") or for none at all ("no").

With an `accelerate.Accelerator`, the model is wrapped for several processes (DDP or FSDP), each process
trains on its own share of the batches, and precision follows the accelerator's own setting.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from .batches import Batch, batch_stream, check_batches, to_device, token_counts
from .checks import check_callable, check_int, check_number, check_optional_int
from .models import cpu_autocast_dtype, model_device
from .speed import stopwatch

if TYPE_CHECKING:
    from accelerate import Accelerator

LossFn = Callable[[nn.Module, Batch], "torch.Tensor | Mapping[str, torch.Tensor]"]
EvalFn = Callable[[nn.Module], "float | Mapping[str, float]"]
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
_LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainingHistory:
    """What `train` recorded: one row per optimizer step in `train`, one row per evaluation in `eval`.

    Train rows: step, loss and every other term the loss function returned, lr (the rate the step used),
    grad_norm (before clipping), tokens (seen so far, as the loop's `count_tokens` counts them), train_s
    (seconds spent in training steps, evaluations excluded) and elapsed_s. Eval rows: step (0 = before
    training), the evaluation's values ("eval" for a float, its keys for a dict) and elapsed_s.
    `pandas.DataFrame(history.train)` gives a table.
    """

    train: list[dict[str, float]] = field(default_factory=list)
    eval: list[dict[str, float]] = field(default_factory=list)

    def column(self, key: str, part: str = "train") -> list[float]:
        """The values of one key over the rows of `part` ("train" or "eval") that have it."""
        if part not in ("train", "eval"):
            raise ValueError(f"part must be 'train' or 'eval', got {part!r}.")
        return [row[key] for row in getattr(self, part) if key in row]


def check_training_arguments(steps: int, lr: float, grad_accum: int = 1, warmup_steps: int = 0,
                             eval_every: int | None = None, max_grad_norm: float | None = 1.0,
                             weight_decay: float = 0.0) -> None:
    """Raise an error that names the argument when a training setting is wrong: a TypeError for the wrong
    type (2.5 or True steps), a ValueError out of range.

    steps (optimizer steps) and grad_accum (batches per step): integers >= 1; lr > 0; warmup_steps: an
    integer in 0..steps; eval_every: None (evaluate at start and end) or an integer >= 1; max_grad_norm:
    None (no clipping) or > 0; weight_decay >= 0.
    """
    steps = check_int("steps", steps, minimum=1)
    check_int("grad_accum", grad_accum, minimum=1)
    check_number("lr", lr, minimum=0.0, strict_minimum=True)
    check_int("warmup_steps", warmup_steps, 0, steps)
    check_optional_int("eval_every", eval_every, minimum=1)
    if max_grad_norm is not None:
        check_number("max_grad_norm", max_grad_norm, minimum=0.0, strict_minimum=True)
    check_number("weight_decay", weight_decay, minimum=0.0)


def autocast_dtype(model: nn.Module, mixed_precision: str = "auto") -> torch.dtype | None:
    """The dtype `train` autocasts to for this model and setting, or None for no autocast.

    "auto": the dtype of the trainable parameters when it is float16 or bfloat16; for a float32 model,
    bfloat16 on a CPU with bfloat16 units (`utils.models.cpu_autocast_dtype`, REARCH_CPU_AUTOCAST=off to
    keep float32), else None (float32). "no": None. "bf16" / "fp16": that dtype, whatever the model's.
    """
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {mixed_precision!r}.")
    if mixed_precision == "no":
        return None
    if mixed_precision in _LOW_PRECISION:
        return _LOW_PRECISION[mixed_precision]
    dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
    low = dtypes & {torch.float16, torch.bfloat16}
    if not low:
        return cpu_autocast_dtype(model)
    return torch.float16 if torch.float16 in low else torch.bfloat16


def _loss_terms(value: "torch.Tensor | Mapping[str, torch.Tensor]") -> Mapping[str, torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return {"loss": value}
    if not isinstance(value, Mapping) or "loss" not in value:
        raise ValueError("loss_fn must return a scalar tensor or a dict with a 'loss' entry, got "
                         f"{type(value).__name__}.")
    return value


def evaluation_values(value: "float | Mapping[str, float]") -> dict[str, float]:
    """An evaluation's result as a row of floats: {"eval": value} for a number, the dict's items for a dict.

    Anything but real numbers is a TypeError (a string such as "0.5" is not read as a number); NaN passes,
    as an honest "undefined" (the recall of a class with no example).
    """
    if isinstance(value, Mapping):
        return {key: check_number(f"value[{key!r}]", v, finite=False) for key, v in value.items()}
    return {"eval": check_number("value", value, finite=False)}


def train(model: nn.Module, batches: Sequence[Batch], loss_fn: LossFn, *, steps: int, lr: float,
          grad_accum: int = 1, warmup_steps: int = 0, weight_decay: float = 0.0,
          max_grad_norm: float | None = 1.0, eval_fn: EvalFn | None = None, eval_every: int | None = None,
          shuffle: bool = False, seed: int = 0, count_tokens: Callable[[Batch], int] | None = None,
          mixed_precision: str = "auto", accelerator: Accelerator | None = None, progress: bool = True,
          desc: str = "train", batches_name: str = "batches") -> TrainingHistory:
    """Train the parameters of `model` that require gradients on `loss_fn` and return the history.

    Each of the `steps` optimizer steps accumulates the gradients of `grad_accum` batches (each loss
    divided by `grad_accum`), taken in order from `batches` and cycled as needed (`shuffle` re-orders
    every pass, seeded by `seed`, which also seeds torch). AdamW with linear warm-up over `warmup_steps`
    then cosine decay to 0; gradients clipped to `max_grad_norm`. A loss that is not finite stops the run
    with a FloatingPointError that says at which step; without a loss scaler (fp16 has one), a step whose loss
    is finite but whose gradients are not is skipped (as a loss scaler skips an overflow), counted in the history rows' `skipped`, and more
    than 5% of the steps skipped (at least 3) stops the run the same way. `eval_fn(model)` (a float or a dict of floats) runs
    before training, every `eval_every` steps and at the end, in eval mode without gradients.
    `count_tokens(batch)` says how many tokens a batch teaches (default: its real tokens). Each batch is
    moved to the model's device before `loss_fn` sees it. Precision: see
    the module docstring (`mixed_precision`). With `accelerator`, batch i goes to process i mod the number
    of processes, and `steps` counts optimizer steps, each seeing one batch per process. The model is left
    in eval mode, trained in place.
    """
    check_training_arguments(steps, lr, grad_accum, warmup_steps, eval_every, max_grad_norm, weight_decay)
    batches = check_batches(batches, batches_name, min_real_tokens=2)
    check_callable("loss_fn", loss_fn, "loss_fn(model, batch) -> loss")
    if eval_fn is not None:
        check_callable("eval_fn", eval_fn, "eval_fn(model) -> float")
    if accelerator is not None and mixed_precision not in ("auto", "no"):
        raise ValueError("With an accelerator, precision follows the accelerator (Accelerator(mixed_precision=...)); "
                         f"leave mixed_precision at 'auto', got {mixed_precision!r}.")
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError("The model has no trainable parameters (every requires_grad is False); for LoRA, wrap it "
                         "with peft.get_peft_model first.")
    count_tokens = count_tokens or (lambda batch: token_counts(batch)[0])
    if accelerator is not None:
        shard = batches[accelerator.process_index::accelerator.num_processes]
        if not shard:
            raise ValueError(f"{len(batches)} training batches cannot feed {accelerator.num_processes} processes: "
                             "pass at least one batch per process.")
        batches = shard
        compute_dtype = None
    else:
        compute_dtype = autocast_dtype(model, mixed_precision)

    # float32 master weights: trainable low-precision parameters train in float32, cast back at the end
    master = [(p, p.dtype) for p in parameters if p.dtype in (torch.float16, torch.bfloat16)]
    if compute_dtype is not None:
        for parameter, _ in master:
            parameter.data = parameter.data.float()
    device = model_device(model)
    scaler = torch.amp.GradScaler(device.type) if compute_dtype == torch.float16 else None

    def autocast():
        if accelerator is not None:
            return accelerator.autocast()
        if compute_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=compute_dtype)

    torch.manual_seed(seed)
    # on a CPU, torch's fused AdamW (one vectorized kernel per parameter; 0.08 s a step for every parameter of the
    # embedded model against 0.24 s for the per-tensor loop torch picks there by default); elsewhere torch's default
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=True if device.type == "cpu" else None)
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=warmup_steps, num_training_steps=steps)
    trained = model  # what the forward pass goes through: the model, or accelerate's wrapper around it
    if accelerator is not None:
        # the scheduler is not prepared: accelerate would step it once per process, and `steps` is global
        trained, optimizer = accelerator.prepare(model, optimizer)
        parameters = [p for p in trained.parameters() if p.requires_grad]
        progress = progress and accelerator.is_main_process
    history = TrainingHistory()
    since_start = stopwatch()
    train_s = 0.0
    postfix: dict[str, str] = {}

    def evaluate(step: int) -> None:
        model.eval()
        with torch.no_grad(), autocast():
            row = {"step": step, **evaluation_values(eval_fn(model))}
        row["elapsed_s"] = since_start()["wall_s"]
        history.eval.append(row)
        postfix.update({k: f"{v:.4g}" for k, v in row.items() if k not in ("step", "elapsed_s")})
        model.train()

    stream = batch_stream(batches, shuffle, seed)
    # Without a loss scaler, a step whose gradients are not finite (an overflow in a low-precision backward) is
    # skipped, as a scaler would skip it, and counted in the history; more than 5% of the steps (at least 3)
    # stops training.
    skipped, max_skipped = 0, max(3, steps // 20)
    # a loss scaler (ours or accelerate's, fp16) skips an overflowed step itself and shrinks its scale: those
    # early skips are part of how it works, so only steps without a scaler are counted
    unscaled = scaler is None and getattr(accelerator, "scaler", None) is None
    tokens = 0
    running = None
    try:
        if eval_fn is not None:
            evaluate(0)
        model.train()
        bar = tqdm(range(1, steps + 1), desc=desc, disable=not progress)
        for step in bar:
            step_time = stopwatch()
            lr_now = optimizer.param_groups[0]["lr"]
            sums: dict[str, float] = {}
            for micro_step in range(grad_accum):
                batch = next(stream)
                # with several processes, gradients are averaged on the last micro-batch only
                sync = accelerator is None or micro_step == grad_accum - 1
                with (contextlib.nullcontext() if sync else accelerator.no_sync(trained)):
                    with autocast():
                        terms = _loss_terms(loss_fn(trained, to_device(batch, device)))
                    loss = terms["loss"] / grad_accum
                    if accelerator is not None:
                        accelerator.backward(loss)
                    elif scaler is not None:
                        scaler.scale(loss).backward()
                    else:
                        loss.backward()
                for name, value in terms.items():
                    sums[name] = sums.get(name, 0.0) + float(value.detach()) / grad_accum
                tokens += int(count_tokens(batch))
            if not math.isfinite(sums["loss"]):
                raise FloatingPointError(f"The loss became {sums['loss']} at step {step}; lower lr (now {lr_now:.3g}) "
                                         "or check the inputs.")
            clip = max_grad_norm or float("inf")
            if accelerator is not None:
                grad_norm = accelerator.clip_grad_norm_(parameters, clip)
            else:
                if scaler is not None:
                    scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(parameters, clip)
            finite_gradients = not unscaled or bool(torch.isfinite(torch.as_tensor(grad_norm)))
            if scaler is not None:
                scaler.step(optimizer)  # skipped when the scaled gradients overflowed; the scale then shrinks
                scaler.update()
            elif finite_gradients:
                optimizer.step()
            if not finite_gradients:  # a finite loss with non-finite gradients: this step's update is skipped
                skipped += 1
                if skipped > max_skipped:
                    raise FloatingPointError(
                        f"The gradients were not finite in {skipped} of {step} steps (the loss stayed finite), more "
                        f"than the {max_skipped} skipped steps allowed; lower lr (now {lr_now:.3g}), train in float32 "
                        "(mixed_precision='no') or check the inputs.")
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            train_s += step_time()["wall_s"]
            history.train.append({"step": step, **sums, "lr": lr_now, "grad_norm": float(grad_norm), "skipped": skipped,
                                  "tokens": tokens, "train_s": train_s, "elapsed_s": since_start()["wall_s"]})
            running = sums["loss"] if running is None else 0.9 * running + 0.1 * sums["loss"]
            postfix.update(loss=f"{running:.4g}", lr=f"{lr_now:.2e}")
            if eval_fn is not None and (step == steps or (eval_every is not None and step % eval_every == 0)):
                evaluate(step)
            bar.set_postfix(postfix, refresh=False)
        bar.close()
    finally:
        optimizer.zero_grad(set_to_none=True)
        model.eval()
        if compute_dtype is not None:
            for parameter, dtype in master:
                parameter.data = parameter.data.to(dtype)
    return history

"""Knowledge distillation: training a smaller student to imitate a teacher, token by token.

The loss has three terms, each a pure function of tensors so a notebook can inspect it alone:

- `next_token_loss`: ordinary cross-entropy on the next token (the student learns the text itself);
- `kd_loss`: KL(teacher || student) between temperature-softened distributions, scaled by T^2 so that its
  gradient keeps the same size whatever the temperature (Hinton et al., 2015);
- `hidden_state_loss`: 1 - cosine similarity between student and teacher hidden states, for pairs given
  by a layer map (student hidden-state index -> teacher hidden-state index).

Hidden-state indices follow `output_hidden_states=True`: index 0 is the embedding output, index i the
output of decoder block i-1, and the last index (= number of blocks) the output of the last block after
the final norm. Every term averages over real tokens only: positions where `attention_mask` is 0
(padding) never count. `distill` runs the training loop (AdamW, warm-up then cosine decay, gradient
accumulation and clipping: `utils.training.train`) with the teacher frozen, and returns its history.
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .batches import Batch, batch_key, check_batches, check_disjoint, to_device, token_counts
from .checks import check_callable, check_indices, check_int, check_module, check_tensor
from .evaluation import model_fingerprint
from .models import decoder_layers, model_device
from .training import (
    EvalFn,
    TrainingHistory,
    autocast_dtype,
    check_training_arguments,
    evaluation_values,
    train,
)

if TYPE_CHECKING:
    from accelerate import Accelerator


# ---------------------------------------------------------------------------------------------------
# Loss terms (pure functions of tensors)
# ---------------------------------------------------------------------------------------------------

def _mask_or_ones(attention_mask: torch.Tensor | None, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """The attention mask as booleans of shape (batch, seq), all True when none is given."""
    if attention_mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if attention_mask.shape != shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, but the tokens have shape "
                         f"{tuple(shape)} (batch, sequence); they must match.")
    return attention_mask.to(device).bool()


def _selected_rows(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The entries of `values` (batch, seq, ...) where the boolean `mask` (batch, seq) is True, flattened to
    (n, ...) in row-major order: `values[mask]`, but without the gather (and its backward scatter) when every
    entry is selected, where it is the same values in the same order."""
    return values.flatten(0, 1) if bool(mask.all()) else values[mask]


def check_same_vocabulary(student_size: int, teacher_size: int, what: str = "vocabulary size") -> None:
    """Raise a ValueError naming both sizes when student and teacher do not share one vocabulary.

    Distillation on logits compares the two distributions token id by token id, so it needs the same
    tokenizer and the same number of output logits in both models.
    """
    if int(student_size) != int(teacher_size):
        raise ValueError(f"Student and teacher have different vocabularies: student {what} {student_size}, "
                         f"teacher {what} {teacher_size}. Logit distillation needs the same tokenizer and the "
                         "same vocabulary size in both models.")


def _check_logits_pair(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if student_logits.dim() != 3 or teacher_logits.dim() != 3:
        raise ValueError(f"Logits must be 3-D (batch, sequence, vocabulary); got student "
                         f"{tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)}.")
    check_same_vocabulary(student_logits.shape[-1], teacher_logits.shape[-1], "logits size")
    if student_logits.shape[:2] != teacher_logits.shape[:2]:
        raise ValueError(f"Student logits cover (batch, sequence) = {tuple(student_logits.shape[:2])}, teacher "
                         f"logits {tuple(teacher_logits.shape[:2])}: both models must read the same batch.")


def next_token_loss(student_logits: torch.Tensor, labels: torch.Tensor,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of the student over the real tokens of a batch.

    `labels` are the token ids (usually the input ids; the shift by one happens here, as in transformers),
    with -100 marking tokens not to score. Token t is scored as the prediction at position t-1, and only
    where both positions are real (`attention_mask` 1), so padding on either side never counts. Computed
    in float32; a batch without any scored token gives 0.
    """
    if student_logits.dim() != 3 or labels.shape != student_logits.shape[:2]:
        raise ValueError(f"Expected logits (batch, sequence, vocabulary) and labels (batch, sequence); got "
                         f"{tuple(student_logits.shape)} and {tuple(labels.shape)}.")
    labels = labels.to(student_logits.device)
    mask = _mask_or_ones(attention_mask, labels.shape, student_logits.device)
    scored = mask[:, 1:] & mask[:, :-1] & (labels[:, 1:] != -100)
    if not scored.any():
        return student_logits.sum() * 0.0
    # the scored positions' logits; when every position is scored the rows are taken as they are, without a
    # gather (the same values in the same order, so the same loss, with less copying of vocabulary-wide rows)
    logits = _selected_rows(student_logits[:, :-1], scored).float()
    return F.cross_entropy(logits, _selected_rows(labels[:, 1:], scored))


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            attention_mask: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the temperature-softened next-token distributions, times T^2.

    Both logits are divided by `temperature` T before the softmax; the KL divergence is summed over the
    vocabulary, averaged over the real positions (`attention_mask` 1) and multiplied by T^2, which keeps
    the gradient's size independent of T. The teacher logits are treated as constants (detached).
    Computed in float32. Zero exactly when the two distributions agree.
    """
    _check_logits_pair(student_logits, teacher_logits)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    mask = _mask_or_ones(attention_mask, student_logits.shape[:2], student_logits.device)
    if not mask.any():
        return student_logits.sum() * 0.0
    student = _selected_rows(student_logits, mask).float() / temperature
    teacher = _selected_rows(teacher_logits.to(student_logits.device), mask).detach().float() / temperature
    kl = F.kl_div(F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1), log_target=True,
                  reduction="none").sum(-1)
    return kl.mean() * temperature ** 2


def check_layer_map(layer_map: Mapping[int, int], n_student_states: int, n_teacher_states: int) -> dict[int, int]:
    """Validate a layer map against the number of hidden states of each model and return it as a dict.

    A model with n decoder blocks has n + 1 hidden states (indices 0..n). Raises a ValueError for an
    empty map, or naming the offending pairs and the valid ranges for an index outside either model.
    """
    if not layer_map:
        raise ValueError("The layer map is empty: give at least one pair {student hidden-state index: teacher "
                         "hidden-state index} (see default_layer_map).")
    layer_map = {int(s): int(t) for s, t in layer_map.items()}
    bad = {s: t for s, t in layer_map.items()
           if not (0 <= s < n_student_states and 0 <= t < n_teacher_states)}
    if bad:
        raise ValueError(f"Layer map pairs {bad} point outside the models: student hidden-state indices must be "
                         f"in 0..{n_student_states - 1} and teacher ones in 0..{n_teacher_states - 1} "
                         "(index 0 = embeddings, index i = output of block i-1).")
    return layer_map


def hidden_state_loss(student_hidden_states: Sequence[torch.Tensor], teacher_hidden_states: Sequence[torch.Tensor],
                      layer_map: Mapping[int, int], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of 1 - cosine similarity between mapped student and teacher hidden states, over real tokens.

    `layer_map` maps a student hidden-state index to a teacher hidden-state index (the tuples returned
    with `output_hidden_states=True`). For each pair the cosine is taken per token over the hidden
    dimension, averaged over the real tokens; the result is the average over pairs. The teacher states
    are treated as constants. Needs equal hidden sizes: a ValueError says so otherwise.
    """
    layer_map = check_layer_map(layer_map, len(student_hidden_states), len(teacher_hidden_states))
    first = student_hidden_states[0]
    mask = _mask_or_ones(attention_mask, first.shape[:2], first.device)
    terms = []
    for s, t in layer_map.items():
        student, teacher = student_hidden_states[s], teacher_hidden_states[t]
        if student.shape[-1] != teacher.shape[-1]:
            raise ValueError(f"The hidden-state loss needs equal hidden sizes: student state {s} has size "
                             f"{student.shape[-1]}, teacher state {t} has {teacher.shape[-1]}. Set hidden_weight=0 "
                             "or distill into a student of the teacher's width.")
        if student.shape[:2] != teacher.shape[:2]:
            raise ValueError(f"Student state {s} covers {tuple(student.shape[:2])} tokens, teacher state {t} "
                             f"{tuple(teacher.shape[:2])}: both models must read the same batch.")
        student = student[mask].float()
        teacher = teacher.to(first.device)[mask].detach().float()
        if student.shape[0] == 0:
            terms.append(first.sum() * 0.0)
        else:
            terms.append((1.0 - F.cosine_similarity(student, teacher, dim=-1)).mean())
    return torch.stack(terms).mean()


def _check_weights(ce_weight: float, kd_weight: float, hidden_weight: float) -> None:
    weights = {"ce_weight": ce_weight, "kd_weight": kd_weight, "hidden_weight": hidden_weight}
    negative = {name: value for name, value in weights.items() if not value >= 0}
    if negative:
        raise ValueError(f"Loss weights must be >= 0, got {negative}.")
    if sum(weights.values()) == 0:
        raise ValueError("All loss weights are 0 (ce_weight, kd_weight, hidden_weight): at least one must be > 0.")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      attention_mask: torch.Tensor | None = None, *, temperature: float = 2.0,
                      ce_weight: float = 0.5, kd_weight: float = 0.5, hidden_weight: float = 0.0,
                      student_hidden_states: Sequence[torch.Tensor] | None = None,
                      teacher_hidden_states: Sequence[torch.Tensor] | None = None,
                      layer_map: Mapping[int, int] | None = None) -> dict[str, torch.Tensor]:
    """The weighted distillation loss and its terms: {"loss", "ce", "kd"} plus "hidden" when used.

    loss = ce_weight * next_token_loss + kd_weight * kd_loss(temperature) + hidden_weight * hidden_state_loss.
    The hidden term is computed when `hidden_weight` > 0 or a `layer_map` is given; it needs both models'
    hidden states and the layer map. Terms with weight 0 are still returned (for logging) but do not
    enter "loss". Raises a ValueError for different vocabularies, naming both sizes.
    """
    _check_weights(ce_weight, kd_weight, hidden_weight)
    _check_logits_pair(student_logits, teacher_logits)
    terms = {"ce": next_token_loss(student_logits, labels, attention_mask),
             "kd": kd_loss(student_logits, teacher_logits, attention_mask, temperature)}
    if hidden_weight > 0 or layer_map is not None:
        if student_hidden_states is None or teacher_hidden_states is None or layer_map is None:
            raise ValueError("The hidden-state term needs student_hidden_states, teacher_hidden_states (run both "
                             "models with output_hidden_states=True) and a layer_map (see default_layer_map).")
        terms["hidden"] = hidden_state_loss(student_hidden_states, teacher_hidden_states, layer_map, attention_mask)
    weights = {"ce": ce_weight, "kd": kd_weight, "hidden": hidden_weight}
    total = sum(weights[name] * value for name, value in terms.items() if weights[name] > 0)
    return {"loss": total, **terms}


def default_layer_map(student_layers: Sequence[int] | int, n_teacher: int) -> dict[int, int]:
    """A layer map from student hidden-state indices to teacher hidden-state indices.

    With a list of the teacher blocks a depth-pruned student kept (in order, e.g. [0, 1, 4, 5]), the
    output of student block j is mapped to the output of teacher block kept[j] it came from. With a
    number of student blocks, student block j is mapped to the teacher block at the same relative
    depth. In both cases the student's last hidden state, which transformers returns after the final
    norm, is mapped to the teacher's last one (also after the final norm); the embeddings (index 0) are
    not mapped.
    """
    n_teacher = check_int("n_teacher", n_teacher, minimum=1)
    if isinstance(student_layers, numbers.Number) or (isinstance(student_layers, torch.Tensor) and student_layers.dim() == 0):
        n_student = check_int("student_layers", student_layers, minimum=1)  # a number of student blocks
        return {j: max(1, round(j * n_teacher / n_student)) for j in range(1, n_student + 1)}
    # the teacher blocks the student kept: integers only ("12" is refused, not read as blocks 1 and 2)
    kept = check_indices("student_layers", student_layers, n_teacher, allow_empty=False)
    if any(b <= a for a, b in zip(kept, kept[1:])):
        raise ValueError(f"Kept blocks {kept} must be strictly increasing: a pruned student keeps the teacher's "
                         "order and each block once.")
    layer_map = {j + 1: block + 1 for j, block in enumerate(kept)}
    layer_map[len(kept)] = n_teacher  # both final states are taken after the final norm
    return layer_map


# ---------------------------------------------------------------------------------------------------
# Running the models
# ---------------------------------------------------------------------------------------------------

def _n_blocks(model: nn.Module) -> int:
    return len(decoder_layers(model))


def _text_config(model: nn.Module):
    """The config that holds vocab_size and hidden_size (the text part of a multimodal config)."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _check_pair(student: nn.Module, teacher: nn.Module) -> None:
    """Student and teacher must be distinct, share no parameters, and have one vocabulary."""
    if student is teacher:
        raise ValueError("The student is the teacher itself: distill into a separate model (copy.deepcopy).")
    teacher_params = {p.data_ptr() for p in teacher.parameters()}
    if any(p.data_ptr() in teacher_params for p in student.parameters()):
        raise ValueError("The student shares parameter tensors with the teacher, so training it would change the "
                         "teacher. Build the student from copy.deepcopy(teacher), or prune with inplace=False.")
    check_same_vocabulary(_text_config(student).vocab_size, _text_config(teacher).vocab_size, "config.vocab_size")


def _forward(model: nn.Module, batch: Batch, hidden: bool):
    moved = to_device(batch, model_device(model))
    return model(input_ids=moved["input_ids"], attention_mask=moved["attention_mask"], output_hidden_states=hidden,
                 use_cache=False)


def logits_from_final_state(model: nn.Module, final_state: torch.Tensor) -> torch.Tensor:
    """The logits a causal LM computes from its final hidden state (the last of `output_hidden_states`, after
    the final norm): its output embedding, then the final soft-capping where the config has one (Gemma)."""
    check_module("model", model)
    check_tensor("final_state", final_state, dim=3, integer=False)
    if model.get_output_embeddings() is None:
        raise ValueError(f"model ({type(model).__name__}) has no output embedding: pass a causal language model.")
    logits = model.get_output_embeddings()(final_state)
    cap = getattr(_text_config(model), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def check_head_once(model: nn.Module, final_state: torch.Tensor, logits: torch.Tensor, cache: dict,
                    cache_name: str) -> None:
    """Before a cache first keeps `final_state` to stand for `logits`: check, once per cache, that the output
    embedding of it (`logits_from_final_state`) reproduces them exactly, or raise a ValueError naming the
    cache argument `cache_name` (a model whose head does something more cannot use such a cache)."""
    if cache.get("checked"):
        return
    if not torch.equal(logits_from_final_state(model, final_state), logits):
        raise ValueError(f"{cache_name} cannot be used with this model ({type(model).__name__}): its logits are not "
                         f"its output embedding of its final hidden state. Pass {cache_name}=None.")
    cache["checked"] = True


def _teacher_outputs(teacher: nn.Module, batch: Batch, layer_map: Mapping[int, int] | None,
                     teacher_cache: dict | None) -> tuple[torch.Tensor, Sequence[torch.Tensor | None] | None]:
    """The teacher's logits on `batch` and, with a layer map, its hidden states (None where not mapped).

    With a `teacher_cache` (a dict the caller keeps), the first pass over a batch stores the teacher's final
    hidden state and the mapped states, and every later pass over the same batch (another epoch, or another
    distillation from the same teacher on the same batches) recomputes the logits from the final state with
    the output embedding alone (`logits_from_final_state`) instead of running the teacher's blocks. The first
    store checks that those logits equal the teacher's own, exactly, and refuses a teacher whose head does
    something else."""
    hidden = layer_map is not None
    if teacher_cache is None:
        with torch.no_grad():
            out = _forward(teacher, batch, hidden)
        return out.logits, (out.hidden_states if hidden else None)
    key = batch_key(batch)
    needed = sorted(set(layer_map.values())) if hidden else []
    stored = teacher_cache.get(key)
    if stored is None or any(index not in stored["states"] for index in needed):
        with torch.no_grad():
            out = _forward(teacher, batch, True)
            final = out.hidden_states[-1]
            check_head_once(teacher, final, out.logits, teacher_cache, "teacher_cache")
        states = {**(stored or {}).get("states", {}), **{index: out.hidden_states[index] for index in needed}}
        teacher_cache[key] = {"final": final, "states": states}
        logits = out.logits
    else:
        states = stored["states"]
        with torch.no_grad():
            logits = logits_from_final_state(teacher, stored["final"])
    if not hidden:
        return logits, None
    n_states = len(decoder_layers(teacher)) + 1
    return logits, [states.get(index) for index in range(n_states)]


def _batch_terms(student: nn.Module, teacher: nn.Module, batch: Batch, *, temperature: float, ce_weight: float,
                 kd_weight: float, hidden_weight: float,
                 layer_map: Mapping[int, int] | None, teacher_cache: dict | None = None) -> dict[str, torch.Tensor]:
    """Forward both models on one batch (the teacher under no_grad, or from `teacher_cache`) and return the
    loss terms."""
    hidden = layer_map is not None
    teacher_logits, teacher_states = _teacher_outputs(teacher, batch, layer_map, teacher_cache)
    student_out = _forward(student, batch, hidden)
    device = student_out.logits.device
    mask = batch.get("attention_mask")
    return distillation_loss(
        student_out.logits, teacher_logits.to(device), batch["input_ids"].to(device),
        None if mask is None else mask.to(device), temperature=temperature, ce_weight=ce_weight,
        kd_weight=kd_weight, hidden_weight=hidden_weight,
        student_hidden_states=student_out.hidden_states if hidden else None,
        teacher_hidden_states=teacher_states, layer_map=layer_map)


@torch.no_grad()
def distillation_metrics(student: nn.Module, teacher: nn.Module, batches: Sequence[Batch], *,
                         temperature: float = 2.0, layer_map: Mapping[int, int] | None = None,
                         progress: bool = False) -> dict[str, float]:
    """Token-weighted loss terms of the student against the teacher on a list of batches.

    Returns {"ce", "ppl", "kd"} plus "hidden" with a `layer_map`: next-token cross-entropy and the
    student's perplexity exp(ce), the T^2-scaled KL to the teacher, and the hidden-state cosine loss,
    each averaged over the real tokens of all batches together. Both models run in eval mode; their
    previous modes are restored afterwards.
    """
    batches = check_batches(batches, "batches", min_real_tokens=2)
    _check_pair(student, teacher)
    modes = student.training, teacher.training
    student.eval()
    teacher.eval()
    sums = {"ce": 0.0, "kd": 0.0, "hidden": 0.0}
    real_total, targets_total = 0, 0
    try:
        for batch in tqdm(batches, desc="distillation metrics", disable=not progress, leave=False):
            terms = _batch_terms(student, teacher, batch, temperature=temperature, ce_weight=1.0, kd_weight=0.0,
                                 hidden_weight=0.0, layer_map=layer_map)
            real_tokens, targets = token_counts(batch)
            sums["ce"] += terms["ce"].item() * targets
            sums["kd"] += terms["kd"].item() * real_tokens
            if "hidden" in terms:
                sums["hidden"] += terms["hidden"].item() * real_tokens
            real_total += real_tokens
            targets_total += targets
    finally:
        student.train(modes[0])
        teacher.train(modes[1])
    ce = sums["ce"] / max(targets_total, 1)
    metrics = {"ce": ce, "ppl": math.exp(min(ce, 700.0)), "kd": sums["kd"] / real_total}
    if layer_map is not None:
        metrics["hidden"] = sums["hidden"] / real_total
    return metrics


# ---------------------------------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------------------------------

def distill(student: nn.Module, teacher: nn.Module, train_batches: Sequence[Batch], *, steps: int,
            lr: float = 1e-4, grad_accum: int = 1, warmup_steps: int = 0, weight_decay: float = 0.0,
            max_grad_norm: float | None = 1.0, temperature: float = 2.0, ce_weight: float = 0.5,
            kd_weight: float = 0.5, hidden_weight: float = 0.0, layer_map: Mapping[int, int] | None = None,
            eval_fn: EvalFn | None = None, eval_batches: Sequence[Batch] | None = None,
            eval_every: int | None = None, check_overlap: bool = True, shuffle: bool = False,
            device: str | torch.device | None = None, progress: bool = True, seed: int = 0,
            mixed_precision: str = "auto", accelerator: Accelerator | None = None,
            teacher_cache: dict | None = None) -> TrainingHistory:
    """Train `student` to imitate `teacher` on `train_batches` and return the history of the run.

    The training loop is `utils.training.train` (AdamW, warm-up then cosine decay, gradient accumulation
    over `grad_accum` batches, clipping to `max_grad_norm`, `shuffle` and `seed`, float32 master weights
    with autocast for a float16 or bfloat16 student, bfloat16 autocast for a float32 one on a CPU with
    bfloat16 units, see `mixed_precision`); the loss is
    `distillation_loss` with the given weights, and `hidden_weight` > 0 adds the hidden-state term over
    `layer_map` (default: `default_layer_map` by relative depth). The teacher runs in eval mode under
    no_grad and is never changed (its mode is restored at the end). Held-out evaluation, before training,
    every `eval_every` steps and at the end: `eval_fn(student)` (a float or a dict of floats, e.g. a
    perplexity) and/or `distillation_metrics` on `eval_batches` (as "eval_ce", "eval_ppl", "eval_kd"),
    which must not share rows with the training batches (`check_overlap`). `device` moves the student
    (default: where it is); the teacher stays where it is and gets each batch on its own device. Train
    rows of the history hold loss, ce, kd (and hidden), lr, grad_norm, real tokens seen, train_s and
    elapsed_s. The student is returned to eval mode at the end, trained in place.

    Several GPUs: pass an `accelerate.Accelerator` and start the script with `accelerate launch`. Each
    process then trains on its own share of `train_batches` (batch i goes to process i mod the number of
    processes), the student is wrapped by accelerate (DDP, or FSDP when the accelerate config says so),
    gradients are averaged across processes, and mixed precision follows the accelerator; `steps` counts
    optimizer steps, each seeing one batch per process.

    `teacher_cache`: a dict (empty at first) that keeps the teacher's final hidden state and the states the
    layer map uses, per batch, so that a second distillation from the same teacher on the same batches (a
    control run, the same heal of several students) or a second epoch recomputes only the teacher's output
    embedding, not its blocks. The training is the same as without the cache: the head is checked once to
    reproduce the teacher's logits exactly, and a dict filled by another teacher, device or precision is
    refused. It costs memory where the teacher lives: one hidden state per batch, plus one per mapped
    teacher state (SmolLM2-135M, 4 x 256 tokens, one state at the cut: about 5 MB a batch).
    """
    check_training_arguments(steps, lr, grad_accum, warmup_steps, eval_every, max_grad_norm, weight_decay)
    if teacher_cache is not None and not isinstance(teacher_cache, dict):
        raise TypeError(f"teacher_cache must be a dict (start with {{}}) or None, got {type(teacher_cache).__name__}.")
    if teacher_cache is not None:
        # one cache, one teacher computed one way: weights and block classes, device, and the precision the
        # training loop runs it in (a cache filled another way is refused)
        precision = (f"accelerate {accelerator.mixed_precision}" if accelerator is not None
                     else str(autocast_dtype(student, mixed_precision)))
        identity = (model_fingerprint(teacher), str(model_device(teacher)), precision,
                    tuple(type(block).__name__ for block in decoder_layers(teacher)))
        if teacher_cache.setdefault("teacher", identity) != identity:
            raise ValueError("teacher_cache holds outputs computed another way (another teacher, this one before a "
                             "change of its weights, blocks or device, or another precision): pass a new dict.")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    _check_weights(ce_weight, kd_weight, hidden_weight)
    train_batches = check_batches(train_batches, "train_batches", min_real_tokens=2)
    _check_pair(student, teacher)
    if eval_batches is not None:
        eval_batches = check_batches(eval_batches, "eval_batches", min_real_tokens=2)
        if check_overlap:
            check_disjoint(train_batches, eval_batches)
    if eval_fn is not None:
        check_callable("eval_fn", eval_fn, "eval_fn(student) -> float")
    if hidden_weight > 0 or layer_map is not None:
        student_width, teacher_width = _text_config(student).hidden_size, _text_config(teacher).hidden_size
        if student_width != teacher_width:
            raise ValueError(f"The hidden-state loss needs equal hidden sizes: student hidden_size "
                             f"{student_width}, teacher {teacher_width}. Set "
                             "hidden_weight=0 or distill into a student of the teacher's width.")
        if layer_map is None:
            layer_map = default_layer_map(_n_blocks(student), _n_blocks(teacher))
        layer_map = check_layer_map(layer_map, _n_blocks(student) + 1, _n_blocks(teacher) + 1)
    if accelerator is not None:
        teacher.to(accelerator.device)
    elif device is not None:
        student.to(device)
    terms = dict(temperature=temperature, ce_weight=ce_weight, kd_weight=kd_weight, hidden_weight=hidden_weight,
                 layer_map=layer_map, teacher_cache=teacher_cache)

    def loss_fn(model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        return _batch_terms(model, teacher, batch, **terms)

    evaluate = None
    if eval_fn is not None or eval_batches is not None:
        def evaluate(model: nn.Module) -> dict[str, float]:
            row: dict[str, float] = {}
            if eval_fn is not None:
                row.update(evaluation_values(eval_fn(model)))
            if eval_batches is not None:
                metrics = distillation_metrics(model, teacher, eval_batches, temperature=temperature,
                                               layer_map=layer_map)
                row.update({f"eval_{k}": v for k, v in metrics.items()})
            return row

    teacher_was_training = teacher.training
    teacher.eval()
    try:
        return train(student, train_batches, loss_fn, steps=steps, lr=lr, grad_accum=grad_accum,
                     warmup_steps=warmup_steps, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                     eval_fn=evaluate, eval_every=eval_every, shuffle=shuffle, seed=seed,
                     mixed_precision=mixed_precision, accelerator=accelerator, progress=progress, desc="distill",
                     batches_name="train_batches")
    finally:
        teacher.train(teacher_was_training)


def train_only_blocks_from(student: nn.Module, first_block: int, train_embeddings: bool = False,
                           last_block: int | None = None) -> int:
    """Freeze everything before decoder block `first_block` (and the embeddings unless asked) and return
    the number of trainable parameters left.

    Healing a depth-pruned model mostly needs the blocks after the cut to adapt to their new input.
    Freezing the blocks before it makes each step cheaper: the backward pass stops at the first trainable
    block, and the optimizer holds state only for what trains. The final norm and the blocks from
    `first_block` on stay trainable. With `last_block`, only blocks `first_block`..`last_block` train
    (the blocks after it, the final norm and the output head are frozen too): the gradient still flows
    back through the frozen blocks, but their weight gradients and optimizer state are skipped. Raises a
    ValueError for a block index outside the model or a `last_block` before `first_block`.
    """
    blocks = decoder_layers(student)
    if not 0 <= first_block < len(blocks):
        raise ValueError(f"first_block must be in 0..{len(blocks) - 1} (the student has {len(blocks)} blocks), got {first_block}.")
    if last_block is not None and not first_block <= last_block < len(blocks):
        raise ValueError(f"last_block must be None (train to the end) or in first_block..{len(blocks) - 1} "
                         f"({first_block}..{len(blocks) - 1}), got {last_block}.")
    for parameter in student.parameters():
        parameter.requires_grad_(last_block is None)
    for parameter in student.get_input_embeddings().parameters():
        parameter.requires_grad_(train_embeddings)
    for index, block in enumerate(blocks):
        for parameter in block.parameters():
            parameter.requires_grad_(first_block <= index <= (len(blocks) - 1 if last_block is None else last_block))
    return sum(p.numel() for p in student.parameters() if p.requires_grad)


def cut_layer_map(removed: Sequence[int], n_teacher: int) -> dict[int, int]:
    """A layer map that ties the student to the teacher just after each cut, for `hidden_state_loss`.

    For each run of consecutive removed blocks, the output of the first block the student kept after the
    run (student hidden-state index) is mapped to the output of the same block in the teacher (teacher
    hidden-state index): the place where the student's residual stream first differs from the teacher's,
    and the one the blocks around the cut must repair. A run at the very end maps the two final states
    (both after the final norm). Raises a ValueError for duplicate or out-of-range indices, or when every
    block would be removed.
    """
    if int(n_teacher) < 1:
        raise ValueError(f"n_teacher must be >= 1 decoder block, got {n_teacher}.")
    drop = sorted(int(i) for i in removed)
    if not drop:
        raise ValueError("removed is empty: give the teacher blocks that were removed (e.g. [12, 13, 14]).")
    if len(set(drop)) != len(drop) or not all(0 <= i < n_teacher for i in drop):
        raise ValueError(f"removed must hold distinct block indices in 0..{n_teacher - 1}, got {list(removed)}.")
    if len(drop) == n_teacher:
        raise ValueError(f"removed covers all {n_teacher} blocks: the student must keep at least one.")
    kept = [i for i in range(n_teacher) if i not in set(drop)]
    layer_map = {}
    for block in drop:
        after = block + 1
        if after in drop:
            continue  # not the end of a run
        if after == n_teacher:
            layer_map[len(kept)] = n_teacher  # both final states, after the final norm
        else:
            layer_map[kept.index(after) + 1] = after + 1
    return layer_map

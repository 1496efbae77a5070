"""Batches of token ids: the one batch format of the course, its validation, and running a model on it.

A batch is a dict with "input_ids", a 2-D tensor (rows, tokens), and usually "attention_mask" of the same
shape (1 = real token, 0 = padding); training batches for LoRA also carry "labels" (-100 = not learned).
`utils.data.calibration_batches` and `utils.specialize.training_batches` make them. Every function of
the package that reads batches checks them here, with one set of rules and one set of messages, and
moves them to the model's device here. `evaluating` is the context in which scoring passes run: eval
mode, no gradients, each module's own training flag restored afterwards.
"""

from __future__ import annotations

import itertools
import random
from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from .checks import check_int, check_module

Batch = Mapping[str, torch.Tensor]
"""One batch: {"input_ids": LongTensor[rows, tokens], "attention_mask": same shape, optional "labels"}."""


def check_batches(batches: Sequence[Batch], name: str = "batches", min_real_tokens: int = 1) -> list[Batch]:
    """Validate a list of batches and return it as a list, or raise a ValueError that names `name`.

    Each batch must be a dict with 2-D, non-empty "input_ids" of integers; "attention_mask" and "labels",
    when present, must have the same shape. A single dict (instead of a list of them) and an empty list
    are refused. At least one row of some batch must hold `min_real_tokens` real tokens: 1 for scoring
    passes, 2 for training (a next-token loss needs a token to predict from and one to predict).
    """
    if isinstance(batches, Mapping):
        raise ValueError(f"`{name}` must be a list of batches (dicts with 'input_ids' and 'attention_mask'), "
                         "got a single dict; wrap it in a list.")
    if isinstance(batches, (str, bytes, torch.Tensor)):
        raise ValueError(f"`{name}` must be a list of batches (dicts with 'input_ids' and 'attention_mask'), "
                         f"got {type(batches).__name__}.")
    batches = list(batches)
    if not batches:
        raise ValueError(f"{name} is empty: it must be a non-empty list of batches, such as those of "
                         "utils.data.calibration_batches(tokenizer, split=...).")
    most_real = 0
    for i, batch in enumerate(batches):
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            found = f"a dict with keys {sorted(batch)}" if isinstance(batch, Mapping) else type(batch).__name__
            raise ValueError(f"`{name}`[{i}] must be a dict with 'input_ids' (and 'attention_mask'), got {found}.")
        ids = batch["input_ids"]
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.numel() == 0:
            shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"`{name}`[{i}]['input_ids'] must be a non-empty 2-D tensor (rows, tokens), got {shape}.")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"`{name}`[{i}]['input_ids'] must hold integer token ids, got dtype {ids.dtype}.")
        for key in ("attention_mask", "labels"):
            other = batch.get(key)
            if other is not None and tuple(other.shape) != tuple(ids.shape):
                raise ValueError(f"`{name}`[{i}]['{key}'] has shape {tuple(other.shape)}, but 'input_ids' has "
                                 f"shape {tuple(ids.shape)}; they must match.")
        most_real = max(most_real, int(real_token_mask(batch).sum(1).max()))
    if most_real == 0:
        raise ValueError(f"{name} hold no real token: every attention_mask entry is 0.")
    if most_real < min_real_tokens:
        raise ValueError(f"{name} have no row with at least {min_real_tokens} real tokens (attention_mask 1): "
                         "nothing to predict.")
    return batches


def real_token_mask(batch: Batch) -> torch.Tensor:
    """The batch's attention mask as booleans (all True when the batch has none)."""
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise TypeError(f"batch must be a dict with 'input_ids' (and 'attention_mask'), got {type(batch).__name__}.")
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    return torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()


def to_device(batch: Batch, device: torch.device | str) -> dict[str, torch.Tensor]:
    """A copy of the batch on `device`, with an all-ones "attention_mask" added when it had none."""
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise TypeError(f"batch must be a dict with 'input_ids' (and 'attention_mask'), got {type(batch).__name__}.")
    moved = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
    if moved.get("attention_mask") is None:
        moved["attention_mask"] = torch.ones_like(moved["input_ids"])
    return moved


def ids_and_masks(batches: Sequence[Batch], device: torch.device | str,
                  name: str = "batches") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Check `batches` (see `check_batches`) and return their (input_ids, attention_mask) pairs on `device`.

    What a scoring pass loops over: a missing mask counts every token as real.
    """
    return [(moved["input_ids"], moved["attention_mask"])
            for moved in (to_device(batch, device) for batch in check_batches(batches, name))]


def token_counts(batch: Batch) -> tuple[int, int]:
    """(real tokens, next-token targets) of a batch: the positions a per-token loss averages over, and the
    pairs of neighbouring real tokens a next-token loss scores."""
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise TypeError(f"batch must be a dict with 'input_ids' (and 'attention_mask'), got {type(batch).__name__}.")
    mask = real_token_mask(batch)
    return int(mask.sum()), int((mask[:, 1:] & mask[:, :-1]).sum())


def batch_key(batch: Batch, with_labels: bool = False) -> bytes:
    """The identity of a batch by content: the shapes and values of its token ids and attention mask (and of
    its labels with `with_labels`), as bytes a cache can use as a key."""
    parts = [batch["input_ids"], batch.get("attention_mask")] + ([batch.get("labels")] if with_labels else [])
    return b"|".join(b"none" if t is None else repr(tuple(t.shape)).encode() + t.detach().to("cpu", torch.int64).numpy().tobytes()
                     for t in parts)


def batch_stream(batches: Sequence[Batch], shuffle: bool = False, seed: int = 0) -> Iterator[Batch]:
    """Cycle through the batches forever; with `shuffle`, in a new seeded order on every pass."""
    seed = check_int("seed", seed)
    batches = list(batches)
    if not shuffle:
        yield from itertools.cycle(batches)
        return
    rng = random.Random(seed)
    while True:
        order = list(range(len(batches)))
        rng.shuffle(order)
        for i in order:
            yield batches[i]


def _rows(batches: Sequence[Batch]) -> set[tuple[int, ...]]:
    rows = set()
    for batch in batches:
        ids = batch["input_ids"].cpu()
        for row, row_mask in zip(ids, real_token_mask(batch).cpu()):
            rows.add(tuple(row[row_mask].tolist()))
    return rows


def check_disjoint(train_batches: Sequence[Batch], eval_batches: Sequence[Batch]) -> None:
    """Raise a ValueError when a row of the evaluation batches also appears in the training batches.

    Rows are compared by their real tokens. Held-out numbers are only meaningful on text the model was
    not trained on: take training batches from split="train" and evaluation ones from "validation".
    """
    shared = _rows(train_batches) & _rows(eval_batches)
    if shared:
        raise ValueError(f"{len(shared)} evaluation rows also appear in the training batches: evaluation must be "
                         "held out. Use calibration_batches(..., split='train') for training and "
                         "split='validation' for evaluation.")


def pad_token_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else its end-of-sequence token, else a clear error.

    Padding is always masked out (attention_mask 0), so which id fills it does not change any result;
    this is the one rule the whole package uses.
    """
    if not hasattr(tokenizer, "pad_token_id"):
        raise TypeError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("The tokenizer has neither a pad token nor an end-of-sequence token to pad with; "
                         "set tokenizer.pad_token first.")
    return int(pad)


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token id lists to the longest: (input_ids, attention_mask), padding marked 0 in the mask.

    `side="left"` puts the padding first (what generation and last-token scoring need: every row ends in
    the last column); "right" puts it last.
    """
    if side not in ("left", "right"):
        raise ValueError(f"`side` must be 'left' or 'right', got {side!r}.")
    rows = [list(row) for row in rows]
    if not rows:
        raise ValueError("`rows` is empty: nothing to pad.")
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        if not row:
            continue
        span = slice(length - len(row), length) if side == "left" else slice(0, len(row))
        input_ids[i, span] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, span] = 1
    return input_ids, attention_mask


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module in eval mode and disable gradients; restore each module's own flag on exit."""
    check_module("model", model)
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for module, training in flags:
            module.training = training

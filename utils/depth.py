"""Depth pruning: removing whole decoder blocks, and the rules that choose which blocks to remove.

`remove_layers` returns a standard transformers model whose config, per-layer config lists and per-layer
indices (the `layer_idx` the KV cache is addressed with) agree with its remaining blocks, so `generate`
works with the cache and `save_pretrained` followed by a plain `AutoModelForCausalLM.from_pretrained`
gives the same model. `layers_removed` does the same temporarily and restores everything on exit, which
lets a search try many candidate removals without copying the model.

The selection rules return lists of block indices of the unpruned model: `select_last`, `select_first`,
`select_window`, and `select_by_importance` for any per-block score where a low score means "less
important, remove first" (see `utils.importance` for scores).

Width pruning (narrower GLU MLPs) lives in `utils.width`.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from .checks import check_indices, check_int, check_module
from .models import check_layer_indices, decoder_layers, layer_count, stack_configs

# Per-module attributes that hold a block's position in the stack; renumbered after a removal.
LAYER_INDEX_ATTRIBUTES = ("layer_idx", "layer_index", "layer_id")


# ---------------------------------------------------------------------------------------------------
# Removing blocks
# ---------------------------------------------------------------------------------------------------

def _removal_indices(model: nn.Module, indices: Sequence[int]) -> list[int]:
    """Validate the blocks to remove and return them sorted: not empty, in range, unique, not all."""
    if isinstance(indices, int) or (isinstance(indices, torch.Tensor) and indices.dim() == 0):
        raise ValueError(f"`indices` must be a list of decoder block indices, got {indices!r}; "
                         f"to remove a single block write [{int(indices)}].")
    check_module("model", model)
    indices = check_indices("indices", indices)
    n_layers = len(decoder_layers(model))
    if not indices:
        raise ValueError(f"No blocks to remove: `indices` is empty. Pass at least one decoder block index "
                         f"in 0..{n_layers - 1}.")
    drop = check_layer_indices(model, indices)
    if len(drop) >= n_layers:
        raise ValueError(f"Cannot remove all {n_layers} decoder blocks: at least one must remain.")
    return drop


def _apply_removal(model: nn.Module, drop: list[int]) -> Callable[[], None]:
    """Remove the blocks `drop` (validated, sorted) in place and return a function that undoes it.

    Changed: the ModuleList `model.model.layers`; in every config of the stack `num_hidden_layers`,
    every list attribute whose name contains "layer" and has one entry per block (`layer_types`,
    `mlp_layer_types`, ...), Qwen's `max_window_layers` threshold, and per-layer overrides of
    heterogeneous configs; the index attributes (`layer_idx`, ...) of every module inside each
    remaining block; and Qwen's `has_sliding_layers` flag. The undo function restores all of them.
    """
    blocks = decoder_layers(model)
    inner = model.model
    n_old = len(blocks)
    kept = [i for i in range(n_old) if i not in set(drop)]
    undo: list[Callable[[], None]] = []

    def remember(obj, name: str, dict_level: bool = False) -> None:
        if dict_level:
            had, old = name in obj.__dict__, obj.__dict__.get(name)
            undo.append(lambda: obj.__dict__.__setitem__(name, old) if had else obj.__dict__.pop(name, None))
        else:
            old = getattr(obj, name)
            undo.append(lambda: setattr(obj, name, old))

    def restore() -> None:
        for step in reversed(undo):
            step()

    try:
        for config in stack_configs(model, n_old):
            values = config.__dict__
            remember(config, "num_hidden_layers", dict_level=True)
            config.__dict__["num_hidden_layers"] = len(kept)
            for name, value in list(values.items()):
                if (not name.startswith("_") and "layer" in name and isinstance(value, (list, tuple))
                        and len(value) == n_old):
                    remember(config, name, dict_level=True)
                    values[name] = type(value)(value[i] for i in kept)
            threshold = values.get("max_window_layers")
            if isinstance(threshold, int) and not isinstance(threshold, bool) and 0 <= threshold < n_old:
                # Qwen: blocks at index >= max_window_layers use the sliding window (when enabled)
                remember(config, "max_window_layers", dict_level=True)
                values["max_window_layers"] = sum(1 for i in kept if i < threshold)
            spec = values.get("_heterogeneity_spec")
            if spec is not None:
                remember(config, "_heterogeneity_spec", dict_level=True)
                overrides = {new: copy.deepcopy(spec.per_layer_overrides[old])
                             for new, old in enumerate(kept) if old in spec.per_layer_overrides}
                config.per_layer_config = overrides if overrides else None
            if hasattr(config, "validate_layer_type"):
                config.validate_layer_type()

        for new, old in enumerate(kept):
            for module in blocks[old].modules():
                for name in LAYER_INDEX_ATTRIBUTES:
                    value = module.__dict__.get(name)
                    if isinstance(value, int) and not isinstance(value, bool):
                        remember(module, name, dict_level=True)
                        module.__dict__[name] = new

        layer_types = getattr(inner.config, "layer_types", None) if hasattr(inner, "config") else None
        if "has_sliding_layers" in inner.__dict__ and layer_types is not None:
            remember(inner, "has_sliding_layers", dict_level=True)
            inner.__dict__["has_sliding_layers"] = "sliding_attention" in layer_types

        remember(inner, "layers")
        inner.layers = nn.ModuleList([blocks[i] for i in kept])
    except BaseException:
        restore()
        raise
    return restore


def remove_layers(model: nn.Module, indices: Sequence[int], inplace: bool = False) -> nn.Module:
    """Remove the decoder blocks `indices` and return a standard transformers model without them.

    By default the caller's model is left untouched: a deep copy is made that never copies the removed
    blocks, so the extra memory is only that of the blocks that remain. With `inplace=True` the model
    itself is changed and returned. The result's config says how many blocks remain, its per-layer lists
    (Gemma's and Qwen's `layer_types`, ...) keep the entries of the remaining blocks, and each remaining
    block's `layer_idx` is renumbered 0..n-1 so that the KV cache is indexed right; saving it with
    `save_pretrained` and loading it with `AutoModelForCausalLM.from_pretrained` gives the same model.
    Raises a ValueError for an empty list, an index out of range, a duplicate, removing every block, or a
    model whose decoder blocks cannot be found.
    """
    drop = _removal_indices(model, indices)
    if inplace:
        _apply_removal(model, drop)
        return model
    blocks = decoder_layers(model)
    memo = {id(blocks[i]): None for i in drop}  # deepcopy leaves these out instead of copying them
    pruned = copy.deepcopy(model, memo)
    _apply_removal(pruned, drop)
    return pruned


@contextmanager
def layers_removed(model: nn.Module, indices: Sequence[int]) -> Iterator[nn.Module]:
    """Temporarily remove decoder blocks in place; everything is restored when the `with` block exits.

    Inside the block, `model` is exactly what `remove_layers(model, indices, inplace=True)` returns
    (config and `layer_idx` in sync), without copying anything; on exit, also when the body raises, the
    original blocks, config fields and indices are put back. Meant for searches that score many candidate
    removals, such as `utils.importance.iterative_loss_pruning`. Raises like `remove_layers`.
    """
    restore = _apply_removal(model, _removal_indices(model, indices))
    try:
        yield model
    finally:
        restore()


# ---------------------------------------------------------------------------------------------------
# Choosing the blocks to remove
# ---------------------------------------------------------------------------------------------------

def _check_count(n: int, n_layers: int) -> None:
    """`n` blocks can be removed from `n_layers`: at least one, and at least one must remain."""
    n = check_int("n", n)
    if n < 1:
        raise ValueError(f"n, the number of blocks to remove, must be an integer >= 1, got {n!r}.")
    if n >= n_layers:
        raise ValueError(f"Cannot remove {n} of {n_layers} blocks: at least one must remain "
                         f"(n must be at most {n_layers - 1}).")


def removable_layers(n_layers: int, n: int, protect_first: int = 0, protect_last: int = 0) -> list[int]:
    """The block indices a selection may remove when the first and last few blocks are protected.

    Checks that `n` blocks can be removed from `n_layers` (1 <= n < n_layers), that the protections are
    non-negative, and that at least `n` blocks are left unprotected; raises a ValueError that names the
    numbers otherwise. Returns the unprotected indices, protect_first..n_layers-protect_last-1.
    """
    _check_count(n, n_layers)
    for name, value in (("protect_first", protect_first), ("protect_last", protect_last)):
        if check_int(name, value) < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}.")
    candidates = list(range(protect_first, n_layers - protect_last))
    if len(candidates) < n:
        raise ValueError(f"Cannot remove {n} blocks: protecting the first {protect_first} and the last "
                         f"{protect_last} of {n_layers} blocks leaves only {max(len(candidates), 0)} removable.")
    return candidates


def select_last(model_or_n_layers: nn.Module | int, n: int) -> list[int]:
    """Indices of the last `n` decoder blocks (the classic "drop the top layers" baseline)."""
    n_layers = layer_count(model_or_n_layers)
    _check_count(n, n_layers)
    return list(range(n_layers - n, n_layers))


def select_first(model_or_n_layers: nn.Module | int, n: int) -> list[int]:
    """Indices of the first `n` decoder blocks (a baseline that is usually a bad idea, which is the point)."""
    n_layers = layer_count(model_or_n_layers)
    _check_count(n, n_layers)
    return list(range(n))


def select_window(model_or_n_layers: nn.Module | int, start: int, n: int) -> list[int]:
    """Indices of `n` consecutive decoder blocks starting at `start` (a window, as in Gromov et al.).

    Raises a ValueError when the window starts before 0 or runs past the last block, naming the largest
    valid start. Pair it with `utils.importance.angular_distance`: the window to remove starts at the
    argmin of the distances.
    """
    n_layers = layer_count(model_or_n_layers)
    _check_count(n, n_layers)
    start = check_int("start", start)
    if not 0 <= start <= n_layers - n:
        raise ValueError(f"A window of {n} blocks starting at {start} does not fit in {n_layers} blocks: "
                         f"start must be in 0..{n_layers - n}.")
    return list(range(start, start + n))


def _lowest_non_adjacent(scores: list[float], candidates: list[int], n: int) -> list[int]:
    """The `n` candidates, no two adjacent, with the lowest total score (exact, dynamic programming).

    `candidates` is a run of consecutive indices. best[k] after candidate j is the best (total, indices)
    choosing k of the candidates seen so far; taking j extends the best of the candidates before j-1.
    """
    infeasible = (float("inf"), ())
    before_previous = [(0.0, ())] + [infeasible] * n  # best choices among candidates up to j-2
    previous = list(before_previous)                  # best choices among candidates up to j-1
    for j in candidates:
        current = list(previous)
        for k in range(1, n + 1):
            total, chosen = before_previous[k - 1]
            if total != float("inf"):
                option = (total + scores[j], chosen + (j,))
                if option < current[k]:
                    current[k] = option
        before_previous, previous = previous, current
    return list(previous[n][1])


def select_by_importance(scores: torch.Tensor | Sequence[float], n: int, protect_first: int = 0,
                         protect_last: int = 0, no_adjacent: bool = False) -> list[int]:
    """Indices of the `n` least important blocks: a low score means less important, removed first.

    `scores` has one value per block (from `utils.importance` or any other rule). The first
    `protect_first` and last `protect_last` blocks are never chosen. With `no_adjacent=True` no two
    chosen blocks are neighbours; the choice is then the set of `n` non-adjacent blocks with the lowest
    total score (found exactly, which can differ from picking the lowest one by one). Returns the indices
    sorted. Raises a ValueError when the scores are not a 1-D list of finite numbers, or when `n` blocks
    cannot be removed under the protections and the adjacency rule, saying how many could be.
    """
    if isinstance(scores, dict):
        raise ValueError(f"`scores` must hold one score per block; got a dict with keys {sorted(scores)}. "
                         "Pass one entry, such as scores['block_influence'].")
    values = torch.as_tensor(scores, dtype=torch.float64).detach().cpu()
    if values.dim() != 1 or len(values) == 0:
        raise ValueError(f"`scores` must be a non-empty 1-D sequence with one score per block, "
                         f"got shape {tuple(values.shape)}.")
    if not torch.isfinite(values).all():
        raise ValueError(f"`scores` must be finite; blocks {torch.nonzero(~torch.isfinite(values)).flatten().tolist()} "
                         "are NaN or infinite.")
    candidates = removable_layers(len(values), n, protect_first, protect_last)
    values = values.tolist()
    if not no_adjacent:
        return sorted(sorted(candidates, key=lambda i: (values[i], i))[:n])
    most = (len(candidates) + 1) // 2
    if n > most:
        raise ValueError(f"Cannot remove {n} non-adjacent blocks: the {len(candidates)} removable blocks "
                         f"(indices {candidates[0]}..{candidates[-1]}) allow at most {most}.")
    return sorted(_lowest_non_adjacent(values, candidates, n))

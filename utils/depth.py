"""Depth pruning: removing whole decoder blocks, and the rules that choose which blocks to remove.

`remove_layers` returns a standard transformers model whose config, per-layer config lists and per-layer
indices (the `layer_idx` the KV cache is addressed with) agree with its remaining blocks, so `generate`
works with the cache and `save_pretrained` followed by a plain `AutoModelForCausalLM.from_pretrained`
gives the same model. `layers_removed` does the same temporarily and restores everything on exit, which
lets a search try many candidate removals without copying the model.

The selection rules return lists of block indices of the unpruned model: `select_last`, `select_first`,
`select_window`, and `select_by_importance` for any per-block score where a low score means "less
important, remove first" (see `utils.importance` for scores).

Two methods search instead of ranking once. `kl_swap_search` improves a removal set by swapping one removed
block for a kept one while the KL divergence from the base model's next-token distribution falls
(`removal_kl`). `replace_span` removes a span of consecutive blocks and trains one standard block of the
model's own family in its place on the span's input and output hidden states (after LLM-Streamline,
Chen et al. 2024); the result is an ordinary, smaller model. `select_window_by_distance` picks the window
of smallest angular distance (Gromov et al. 2024); like every rule here, these never take the final block
unless asked (`include_last=True`).

Width pruning (narrower GLU MLPs) lives in `utils.width`.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .batches import Batch, evaluating, ids_and_masks
from .bypass_modeling import (
    BYPASSED_LAYERS_KEY,
    attention_types,
    cache_slots,
    check_attention_remains,
    statically_bypassed,
)
from .checks import check_indices, check_int, check_module
from .models import check_layer_indices, decoder_layers, layer_count, model_device, run_for_hooks, stack_configs
from .training import check_training_arguments, train

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
    bypassed = set(statically_bypassed(decoder_layers(model)))
    if bypassed:
        kept = [i for i in range(n_layers) if i not in set(drop)]
        types = attention_types(model.config, n_layers)
        try:
            check_attention_remains([types[i] for i in kept], {new for new, old in enumerate(kept) if old in bypassed})
        except ValueError as error:
            raise ValueError(f"Cannot remove blocks {drop} from this model whose attention is bypassed in blocks "
                             f"{sorted(bypassed)}: {error}") from None
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

        bypassed = set(statically_bypassed(blocks))
        if bypassed or model.config.__dict__.get(BYPASSED_LAYERS_KEY):
            # a bypassed model's kept attention modules use the cache slots of `cache_slots`, not their position
            kept_bypassed = {new for new, old in enumerate(kept) if old in bypassed}
            slots = cache_slots(attention_types(model.config, len(kept)), kept_bypassed)
            for new, slot in slots.items():
                attention = blocks[kept[new]].self_attn
                remember(attention, "layer_idx", dict_level=True)
                attention.__dict__["layer_idx"] = slot
            for config in {id(c): c for c in [model.config, *stack_configs(model, len(kept))]}.values():
                if BYPASSED_LAYERS_KEY in config.__dict__:
                    remember(config, BYPASSED_LAYERS_KEY, dict_level=True)
                    config.__dict__[BYPASSED_LAYERS_KEY] = sorted(kept_bypassed)

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
    if getattr(model, "adaptive_bypass", None) is not None:
        raise ValueError("This model has an adaptive router, whose router layer and skip sets are block indices of "
                         "the current model: remove blocks first and install the router afterwards, or call "
                         "utils.routing.remove_adaptive(model), remove blocks, and fit a new router on the result.")
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


# ---------------------------------------------------------------------------------------------------
# Selections that search, and a span replaced by one trained block
# ---------------------------------------------------------------------------------------------------

def select_window_by_distance(distances: torch.Tensor | Sequence[float], n: int,
                              include_last: bool = False) -> list[int]:
    """The window of `n` consecutive blocks with the smallest distance, never the final block unless asked.

    `distances` holds one value per window start, as `utils.importance.angular_distance` returns them
    (n_layers - n + 1 entries; entry l is the window l..l+n-1). On some models the most similar window is
    the last one, which is the worst possible choice (the final block writes the stream that the head
    reads); so by default a window that takes the final block is not considered, and `include_last=True`
    allows it. Raises a ValueError when the distances are not a finite 1-D list or `n` cannot be removed.
    """
    values = torch.as_tensor(distances, dtype=torch.float64).detach().cpu()
    if values.dim() != 1 or len(values) == 0 or not torch.isfinite(values).all():
        raise ValueError(f"`distances` must be a non-empty 1-D sequence of finite numbers (one per window "
                         f"start), got shape {tuple(values.shape)}.")
    n_layers = len(values) + n - 1
    _check_count(n, n_layers)
    starts = len(values) if include_last else len(values) - 1  # n < n_layers leaves at least 2 starts
    start = int(torch.argmin(values[:starts]))
    return list(range(start, start + n))


def reference_log_probs(model: nn.Module, batches: Sequence[Batch]) -> list[torch.Tensor]:
    """The model's next-token log-probabilities on `batches`, kept to compare pruned models against.

    One tensor per batch, [rows, tokens - 1, vocab] in float32 on the model's device, for the positions
    that predict a real token (the mask is applied by `removal_kl`). Memory: 4 bytes x tokens x vocab, so
    keep calibration small (8 x 128 tokens of a 49k-word vocabulary is about 200 MB).
    """
    prepared = ids_and_masks(batches, model_device(model))
    reference = []
    with evaluating(model):
        for ids, mask in prepared:
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
            reference.append(torch.log_softmax(logits.float(), dim=-1))
    return reference


def removal_kl(model: nn.Module, batches: Sequence[Batch], reference: Sequence[torch.Tensor],
               indices: Sequence[int] = ()) -> float:
    """Mean KL(base || pruned) of the next-token distribution, per real predicted token, in nats.

    `reference` comes from `reference_log_probs(model, batches)` on the unpruned model. With `indices`,
    those blocks are removed temporarily (`layers_removed`) while the pruned model is scored; with none,
    the model is scored as it is (0 for the model that made the reference). A selection with a low KL
    keeps the base model's predictions, which is what the chapter's held-out perplexity then checks.
    """
    prepared = ids_and_masks(batches, model_device(model))
    if len(reference) != len(prepared):
        raise ValueError(f"`reference` has {len(reference)} entries but `batches` has {len(prepared)}: "
                         "compute it with reference_log_probs(model, batches) on the same batches.")

    def score() -> float:
        total, count = 0.0, 0
        with evaluating(model):
            for (ids, mask), base in zip(prepared, reference):
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
                log_q = torch.log_softmax(logits.float(), dim=-1)
                base = base.to(log_q.device)
                kl = (base.exp() * (base - log_q)).sum(-1)
                real = (mask[:, :-1] * mask[:, 1:]).bool().to(kl.device)
                total += float(kl[real].sum(dtype=torch.float64))
                count += int(real.sum())
        if count == 0:
            raise ValueError("The batches have no token to predict: each row needs at least 2 real tokens.")
        return total / count

    if len(indices) == 0:
        return score()
    with layers_removed(model, indices):
        return score()


def kl_swap_search(model: nn.Module, batches: Sequence[Batch], start: Sequence[int], radius: int | None = 2,
                   max_evaluations: int = 40, protect_first: int = 0, include_last: bool = False,
                   reference: Sequence[torch.Tensor] | None = None,
                   progress: bool = True) -> dict[str, object]:
    """Improve a removal set by local search: swap one removed block for a kept one while the KL falls.

    Starting from `start` (the best one-shot selection, say), every move puts one removed block back and
    removes one kept block instead, at most `radius` positions away (None: any kept block); moves are tried
    nearest first and the first that lowers `removal_kl` is taken, until no move helps or
    `max_evaluations` candidate sets have been scored. The first `protect_first` blocks, and the final
    block unless `include_last=True`, are never removed. Returns {"blocks": the best set (sorted),
    "kl": its KL, "start_kl": the KL of `start`, "evaluations": sets scored, "history": one row per
    accepted move}. The model is unchanged afterwards. Costs one forward pass over `batches` per
    evaluation (plus one for the reference, unless `reference` is passed).
    """
    n_layers = len(decoder_layers(model))
    current = sorted(_removal_indices(model, start))
    if radius is not None and (isinstance(radius, bool) or not isinstance(radius, int) or radius < 1):
        raise ValueError(f"`radius` must be an integer >= 1 or None (any block), got {radius!r}.")
    if isinstance(max_evaluations, bool) or not isinstance(max_evaluations, int) or max_evaluations < 1:
        raise ValueError(f"`max_evaluations` must be an integer >= 1, got {max_evaluations!r}.")
    allowed = set(removable_layers(n_layers, len(current), protect_first, 0 if include_last else 1))
    outside = sorted(set(current) - allowed)
    if outside:
        raise ValueError(f"`start` removes blocks {outside}, which this search may not remove (protect_first="
                         f"{protect_first}, include_last={include_last}); allowed: {min(allowed)}..{max(allowed)}.")
    if reference is None:
        reference = reference_log_probs(model, batches)
    best = removal_kl(model, batches, reference, current)
    result: dict[str, object] = {"start_kl": best, "history": [{"evaluations": 1, "blocks": list(current), "kl": best}]}
    evaluations = 1
    bar = tqdm(total=max_evaluations, desc="KL swap search", disable=not progress, leave=False)
    bar.update(1)
    improved = True
    while improved and evaluations < max_evaluations:
        improved = False
        moves = [(abs(out - into), out, into) for out in current for into in sorted(allowed - set(current))
                 if radius is None or abs(out - into) <= radius]
        for _, out, into in sorted(moves):
            if evaluations >= max_evaluations:
                break
            candidate = sorted((set(current) - {out}) | {into})
            kl = removal_kl(model, batches, reference, candidate)
            evaluations += 1
            bar.update(1)
            if kl < best:
                best, current, improved = kl, candidate, True
                result["history"].append({"evaluations": evaluations, "blocks": list(current), "kl": kl})
                bar.set_postfix(kl=f"{kl:.4f}")
                break
    bar.close()
    result.update(blocks=list(current), kl=best, evaluations=evaluations)
    return result


def _detached(value):
    """`value` with every tensor inside (tuples, lists, dicts) detached and floating ones made float32."""
    if isinstance(value, torch.Tensor):
        value = value.detach()
        return value.float() if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


def _block_output(output) -> torch.Tensor:
    """A decoder block's hidden states, whether the block returns a tensor or a tuple that starts with it."""
    return output[0] if isinstance(output, (tuple, list)) else output


def replace_span(model: nn.Module, start: int, n: int, batches: Sequence[Batch], steps: int = 200,
                 lr: float = 1e-3, include_last: bool = False, seed: int = 0,
                 progress: bool = True) -> tuple[nn.Module, list[float]]:
    """Replace blocks start..start+n-1 by one trained block (in the spirit of LLM-Streamline).

    The span's input and output hidden states are recorded on `batches` with the unpruned model; blocks
    start+1..start+n-1 are removed (`remove_layers`, a copy) and the remaining block `start`, a standard
    decoder block of the model's own family, is trained alone to map the span's input to the span's
    output with `utils.training.train` (AdamW at `lr`, cosine decay, `steps` steps of one recorded batch
    each, float32 master weights) on the mean squared error over real tokens divided by the mean square of
    the target (so 1.0 means "no better than zeros"). The result is an ordinary model with
    n_layers - n + 1 blocks (the parameter count of removing n - 1 blocks) that saves and reloads with
    plain transformers. Returns (pruned model, the loss of every step). The span may not take the final
    block unless `include_last=True`; the caller's model is unchanged.
    """
    n_layers = len(decoder_layers(model))
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"`n` must be an integer >= 2 (a span of at least two blocks, replaced by one), got {n!r}.")
    _check_count(n, n_layers)
    last_start = n_layers - n if include_last else n_layers - n - 1
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= last_start:
        hint = "" if include_last else " (a span may not take the final block unless include_last=True)"
        raise ValueError(f"`start` must be an integer in 0..{last_start} for a span of {n} of {n_layers} "
                         f"blocks{hint}, got {start!r}.")
    check_training_arguments(steps, lr)
    prepared = ids_and_masks(batches, model_device(model))

    blocks = decoder_layers(model)
    records: list[dict] = []
    current: dict = {}

    def keep_input(module, args, kwargs):
        current["args"], current["kwargs"] = _detached(args), _detached(kwargs)

    def keep_output(module, args, output):
        current["target"] = _block_output(output).detach().float()

    handles = [blocks[start].register_forward_pre_hook(keep_input, with_kwargs=True),
               blocks[start + n - 1].register_forward_hook(keep_output)]
    try:
        with evaluating(model):
            for ids, mask in prepared:
                current.clear()
                run_for_hooks(model, ids, mask)
                records.append({**current, "real": mask.bool()})
    finally:
        for handle in handles:
            handle.remove()

    pruned = remove_layers(model, list(range(start + 1, start + n)))
    block = decoder_layers(pruned)[start]

    def span_loss(trained: nn.Module, batch: Batch) -> torch.Tensor:
        record = records[int(batch["record"][0])]
        output = _block_output(block(*record["args"], **record["kwargs"])).float()
        real, target = record["real"].to(output.device), record["target"].to(output.device)
        return ((output - target)[real] ** 2).mean() / (target[real] ** 2).mean()

    flags = [(p, p.requires_grad) for p in pruned.parameters()]
    for p in pruned.parameters():
        p.requires_grad_(False)
    for p in block.parameters():
        p.requires_grad_(True)
    indexed = [{"input_ids": ids, "attention_mask": mask, "record": torch.tensor([i])}
               for i, (ids, mask) in enumerate(prepared)]
    try:
        history = train(pruned, indexed, span_loss, steps=steps, lr=lr, shuffle=True, seed=seed,
                        progress=progress, desc="training the replacement block")
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    pruned.eval()
    return pruned, history.column("loss")

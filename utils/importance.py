"""How important is each decoder block? Scores for depth pruning, where a low score means "remove first".

Activation-based scores come from ONE forward pass over calibration batches (lists of
{"input_ids", "attention_mask"} dicts, as made by `utils.data.calibration_batches`), with hooks on every
block at once that stream into running sums, so memory does not grow with the number of batches.
Padding (attention_mask 0) is never scored.

- Block influence (ShortGPT, Men et al. 2024): mean over real tokens of 1 - cos(block input, block
  output). A block that barely turns the residual stream scores low.
- Angular distance (Gromov et al. 2024): for a window of n blocks starting at l, mean over real tokens
  of arccos(cos(input of block l, output of block l+n-1)) / pi. The window with the lowest distance is
  the one to remove (see `utils.depth.select_window`). `angular_distances` gives several window sizes
  from the same single pass.
- Baselines: weight magnitude, and position (later blocks less important).
- Iterative loss pruning (SLEB-like, Song et al. 2024): remove, one at a time, the block whose removal
  raises the calibration loss least, re-scoring after each removal.

Every function runs the model in eval mode under torch.no_grad, restores the training flags it found,
and removes every hook it registered, also when a forward pass raises. The passes run under
`utils.models.compute_autocast` like every evaluation pass (bfloat16 matrix products on a CPU with
bfloat16 units); the scores are computed from the residual stream, in its own dtype, outside autocast.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, ContextManager, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .checks import check_callable, check_indices, check_int, check_module
from .batches import Batch, evaluating, ids_and_masks
from .depth import layers_removed, removable_layers
from .evaluation import batch_nll
from .hooks import block_input_replaced, capture_activations
from .models import compute_autocast, decoder_layers, layer_count, model_device, run_for_hooks


def _masked_cosine(a: torch.Tensor, b: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Cosine similarity, in float32, between the hidden states of `a` and `b` at the real tokens only."""
    return F.cosine_similarity(a[real].float(), b[real].float(), dim=-1)


def layer_importance(model: nn.Module, batches: Sequence[Batch], window_blocks: int | None = None,
                     progress: bool = True) -> dict[str, torch.Tensor]:
    """Block influence of every block and, with `window_blocks` = n, the angular distance of every window
    of n consecutive blocks, from one pass over `batches`.

    Returns {"block_influence": Tensor[n_layers]} and, when `window_blocks` = n is given, also
    {"angular_distance": Tensor[n_layers - n + 1]} whose entry l is the distance between the input of
    block l and the output of block l+n-1. Both are means over every real token of every batch (padding,
    attention_mask 0, is excluded). Hooks on all blocks stream each block's input and output into running
    sums; only the inputs of the last `window_blocks` blocks of the current batch are held at a time.
    """
    check_module("model", model)
    n_layers = len(decoder_layers(model))
    if window_blocks is not None and (isinstance(window_blocks, bool) or not isinstance(window_blocks, int)
                                      or not 1 <= window_blocks <= n_layers):
        raise ValueError(f"`window_blocks` must be an integer in 1..{n_layers} (the number of blocks), "
                         f"got {window_blocks!r}.")
    influence, distances = _influence_and_windows(model, batches, [] if window_blocks is None else [window_blocks],
                                                  progress)
    result = {"block_influence": influence}
    if window_blocks is not None:
        result["angular_distance"] = distances[window_blocks]
    return result


def angular_distances(model: nn.Module, batches: Sequence[Batch], sizes: Sequence[int],
                      progress: bool = True) -> dict[int, torch.Tensor]:
    """`angular_distance` for several window sizes from one forward pass: {n: Tensor[n_layers - n + 1]}.

    The same values as one `angular_distance(model, batches, n)` call per size, for the cost of one pass
    (the inputs of the last max(sizes) blocks of the current batch are held at a time). For choosing
    windows of several lengths on the same text, as a parameter-budget curve does.
    """
    check_module("model", model)
    n_layers = len(decoder_layers(model))
    if (isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or not sizes
            or any(isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= n_layers for n in sizes)
            or len(set(sizes)) != len(sizes)):
        raise ValueError(f"sizes must be a non-empty list of distinct integers in 1..{n_layers} (the number of "
                         f"blocks), got {sizes!r}.")
    return _influence_and_windows(model, batches, list(sizes), progress)[1]


def _influence_and_windows(model: nn.Module, batches: Sequence[Batch], sizes: list[int],
                           progress: bool) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """One pass: the block influence of every block and the angular distance of every window of each size."""
    n_layers = len(decoder_layers(model))
    device = model_device(model)
    prepared = ids_and_masks(batches, device)
    influence = torch.zeros(n_layers, dtype=torch.float64, device=device)
    distance = {n: torch.zeros(n_layers - n + 1, dtype=torch.float64, device=device) for n in sizes}
    longest = max(sizes, default=1)
    inputs: dict[int, torch.Tensor] = {}
    current: dict[str, torch.Tensor] = {}

    def on_capture(point: str, layer: int, hidden: torch.Tensor) -> None:
        if point == "block_in":
            inputs[layer] = hidden
            return
        real = current["real"].to(hidden.device)  # blocks may sit on different devices (device_map)
        cosine = _masked_cosine(inputs[layer].to(hidden.device), hidden, real)
        influence[layer] += (1 - cosine).sum(dtype=torch.float64).to(device)
        for n in sizes:
            start = layer - n + 1
            if start >= 0:
                window = cosine if n == 1 else _masked_cosine(inputs[start].to(hidden.device), hidden, real)
                angle = torch.arccos(window.clamp(-1.0, 1.0)).sum(dtype=torch.float64) / math.pi
                distance[n][start] += angle.to(device)
        inputs.pop(layer - longest + 1, None)  # no window of any size needs that block's input any more

    tokens = 0
    # bfloat16 matrix products where the CPU has the units (utils.models.compute_autocast); the residual stream the
    # hooks read keeps the model's dtype (float32 there) and the callback's cosines and sums run outside autocast
    with evaluating(model), compute_autocast(model), \
            capture_activations(model, points=("block_in", "block_out"), callback=on_capture):
        for ids, mask in tqdm(prepared, desc="layer importance", disable=not progress, leave=False):
            current["real"] = mask.bool()
            try:
                run_for_hooks(model, ids, mask)
            finally:
                inputs.clear()
            tokens += int(mask.sum())
    return (influence / tokens).float().cpu(), {n: (d / tokens).float().cpu() for n, d in distance.items()}


def block_influence(model: nn.Module, batches: Sequence[Batch], progress: bool = True) -> torch.Tensor:
    """ShortGPT's block influence: per block, mean over real tokens of 1 - cos(block input, block output).

    Low influence = the block barely changes the residual stream = the first candidate for removal
    (`utils.depth.select_by_importance`). One forward pass over `batches`; see `layer_importance`.
    """
    return layer_importance(model, batches, progress=progress)["block_influence"]


def angular_distance(model: nn.Module, batches: Sequence[Batch], n: int, progress: bool = True) -> torch.Tensor:
    """Gromov et al.'s angular distance of every window of `n` consecutive blocks, Tensor[n_layers - n + 1].

    Entry l is the mean over real tokens of arccos(cos(input of block l, output of block l+n-1)) / pi,
    in [0, 1]. The window to remove starts at the argmin: `select_window(model, int(d.argmin()), n)`.
    One forward pass over `batches`; see `layer_importance`.
    """
    return layer_importance(model, batches, window_blocks=n, progress=progress)["angular_distance"]


def weight_magnitude_importance(model: nn.Module) -> torch.Tensor:
    """Per block, the mean absolute value of its weight matrices (parameters with 2 or more dimensions).

    A data-free baseline: blocks with smaller weights score lower and are removed first. Norm scales and
    biases are left out because their typical values differ between families (Gemma stores 1 + w).
    """
    check_module("model", model)
    scores = []
    for index, block in enumerate(decoder_layers(model)):
        matrices = [p for p in block.parameters() if p.dim() >= 2]
        if not matrices:
            raise ValueError(f"Decoder block {index} of {type(model).__name__} has no weight matrices to measure.")
        with torch.no_grad():
            total = sum(p.detach().abs().sum(dtype=torch.float64).item() for p in matrices)
        scores.append(total / sum(p.numel() for p in matrices))
    return torch.tensor(scores, dtype=torch.float32)


def position_importance(model_or_n_layers: nn.Module | int) -> torch.Tensor:
    """Scores n_layers, n_layers-1, ..., 1: later blocks count as less important.

    With `select_by_importance` this reproduces the "drop the last blocks" baseline, so every rule can be
    compared through the same call.
    """
    n_layers = layer_count(model_or_n_layers)
    return torch.arange(n_layers, 0, -1, dtype=torch.float32)


def calibration_loss(model: nn.Module, batches: Sequence[Batch]) -> float:
    """Mean next-token negative log-likelihood over the real tokens of `batches` (padding excluded).

    Token-weighted across batches, so it does not depend on how the rows are grouped into batches.
    Runs in eval mode under torch.no_grad; exp() of it is the calibration perplexity.
    """
    check_module("model", model)
    prepared = ids_and_masks(batches, model_device(model))
    total_nll, total_tokens = 0.0, 0
    with evaluating(model):
        for ids, mask in prepared:
            nll, count = batch_nll(model, ids, mask)
            total_nll += nll
            total_tokens += count
    if total_tokens == 0:
        raise ValueError("The calibration batches have no token to predict: each row needs at least 2 real tokens.")
    return total_nll / total_tokens


def iterative_loss_pruning(model: nn.Module, batches: Sequence[Batch], n: int, protect_first: int = 0,
                           protect_last: int = 0, progress: bool = True) -> list[int]:
    """Choose `n` blocks to remove one at a time by calibration loss (SLEB-like); original indices.

    Each step tries every remaining unprotected block: the blocks chosen so far plus that candidate are
    removed temporarily (`utils.depth.layers_removed`, no copy of the model), the calibration loss is
    measured, and the candidate with the lowest loss joins the chosen ones. Later steps therefore see the
    effect of earlier removals. Returns the indices in the order they were chosen (pass them to
    `remove_layers` as they are). The model is restored after every trial, also when one raises. Costs
    about n * (removable blocks) forward passes over `batches`. Raises a ValueError when `n` blocks cannot
    be removed under the protections.
    """
    n = check_int("n", n, minimum=1)
    n_layers = len(decoder_layers(model))
    candidates = removable_layers(n_layers, n, protect_first, protect_last)
    ids_and_masks(batches, model_device(model))  # fail before the search, not inside it
    return greedy_loss_search(model, batches, candidates, n, layers_removed, desc="iterative loss pruning",
                              progress=progress)


def greedy_loss_search(model: nn.Module, batches: Sequence[Batch], candidates: Sequence[int], n: int,
                       trial: Callable[[nn.Module, list[int]], ContextManager], desc: str = "greedy search",
                       progress: bool = True,
                       score: Callable[[nn.Module, Sequence[Batch]], float] | None = None,
                       reuse_prefix: bool = True) -> list[int]:
    """Choose `n` of `candidates` one at a time: the one whose trial gives the lowest calibration loss.

    `trial(model, indices)` is a context manager that changes the model temporarily for those indices
    (blocks removed, attention skipped) and restores it on exit. Each step tries every remaining candidate
    together with those chosen so far, so later steps see the effect of earlier choices. `score(model,
    batches)` is what is minimized (default `calibration_loss`; e.g. a KL to the unchanged model). A
    non-finite score counts as infinitely bad. Returns the indices in the order chosen.

    With `reuse_prefix` (the default) each step first runs `score` once on the model with the chosen
    indices applied and records the input of every block; a candidate's trial then starts at the first block
    at or after the candidate, fed the recorded input of the candidate's block, because the blocks before
    it are those of the recorded run. The scores are those of running every trial in full (tested); the
    blocks before each candidate, on average half of them, are not run again (a quarter of the time of
    CH04's search on the embedded model, whose LM head and loss still run in full). It requires a trial that changes only the blocks it is given (true of
    `utils.depth.layers_removed` and `utils.bypass.attention_skipped`) and a `score` that runs the model
    over the same batches in the same order each time; the recorded inputs take (blocks x tokens x hidden
    size) of memory. `reuse_prefix=False` runs every trial in full.
    """
    check_module("model", model)
    score = calibration_loss if score is None else check_callable("score", score, "score(model, batches) -> float")
    candidates = check_indices("candidates", candidates, len(decoder_layers(model)))
    n = check_int("n", n, minimum=1)
    if not isinstance(reuse_prefix, bool):
        raise TypeError(f"reuse_prefix must be True or False, got {reuse_prefix!r}.")
    original = {id(block): index for index, block in enumerate(decoder_layers(model))}
    chosen: list[int] = []
    trials = sum(len(candidates) - step for step in range(n))
    with evaluating(model), tqdm(total=trials, desc=desc, disable=not progress, leave=False) as bar:
        for _ in range(n):
            recorded = _block_inputs(model, batches, score, trial, chosen, original) if reuse_prefix else {}
            best_loss, best = math.inf, None
            for candidate in candidates:
                if candidate in chosen:
                    continue
                with trial(model, chosen + [candidate]):
                    start = _resume_position(model, original, candidate) if reuse_prefix else None
                    if start is None:
                        loss = score(model, batches)
                    else:
                        inputs = recorded[candidate]
                        with layers_removed(model, list(range(start))), block_input_replaced(model, 0, inputs) as used:
                            loss = score(model, batches)
                        if used[0] != len(inputs):
                            raise RuntimeError(f"score ran the model {used[0]} times for candidate {candidate} but "
                                               f"{len(inputs)} times when its inputs were recorded: pass "
                                               "reuse_prefix=False for a score that does not repeat its work.")
                if not math.isfinite(loss):
                    loss = math.inf
                if best is None or loss < best_loss:
                    best_loss, best = loss, candidate
                bar.update(1)
            chosen.append(best)
            bar.set_postfix(chosen=chosen, loss=f"{best_loss:.4f}")
    return chosen


def _block_inputs(model: nn.Module, batches: Sequence[Batch], score: Callable, trial: Callable,
                  chosen: list[int], original: dict[int, int]) -> dict[int, list[torch.Tensor]]:
    """The input of every block at each forward pass of `score`, with the chosen indices applied, keyed by
    the block's original index."""
    with trial(model, chosen) if chosen else contextlib.nullcontext():
        with capture_activations(model, points=("block_in",), to_cpu=False) as captured:
            score(model, batches)
        return {original[id(block)]: captured.get(("block_in", position), [])
                for position, block in enumerate(decoder_layers(model))}


def _resume_position(model: nn.Module, original: dict[int, int], candidate: int) -> int | None:
    """Position in the model as it is now of the first block at or after `candidate` (original indices),
    where a trial's pass can start; None when it must run in full (that block is the first, or none is left)."""
    for position, block in enumerate(decoder_layers(model)):
        if original.get(id(block), -1) >= candidate:
            return position if position > 0 else None
    return None


# ---------------------------------------------------------------------------------------------------
# Sublayer importance: attention and MLP separately (for attention bypass, see utils.bypass)
# ---------------------------------------------------------------------------------------------------

def sublayer_importance(model: nn.Module, batches: Sequence[Batch], progress: bool = True) -> dict[str, torch.Tensor]:
    """Importance of every attention and every MLP sublayer from one pass over `batches`.

    For the attention sublayer of block i: the mean over real tokens of 1 - cos(h, h + attn(h)), the
    hidden state entering the block against the one after the attention's residual add ("block_in" vs
    "resid_mid" in `utils.hooks`); for the MLP sublayer: the same between the state after the attention
    add and the block output ("resid_mid" vs "block_out"). He et al. (2024) score sublayers this way. Returns
    {"attention": Tensor[n_layers], "mlp": Tensor[n_layers]}; low = redundant. Padding is never scored; a
    bypassed attention sublayer scores 0 (up to float rounding).
    """
    check_module("model", model)
    n_layers = len(decoder_layers(model))
    device = model_device(model)
    prepared = ids_and_masks(batches, device)
    sums = {"attention": torch.zeros(n_layers, dtype=torch.float64, device=device),
            "mlp": torch.zeros(n_layers, dtype=torch.float64, device=device)}
    held: dict[tuple[str, int], torch.Tensor] = {}
    current: dict[str, torch.Tensor] = {}

    def on_capture(point: str, layer: int, hidden: torch.Tensor) -> None:
        if point == "block_in":
            held[point, layer] = hidden
            return
        real = current["real"].to(hidden.device)
        before, kind = (held.pop(("block_in", layer)), "attention") if point == "resid_mid" else \
            (held.pop(("resid_mid", layer)), "mlp")
        sums[kind][layer] += (1 - _masked_cosine(before.to(hidden.device), hidden, real)).sum(dtype=torch.float64).to(device)
        if point == "resid_mid":
            held[point, layer] = hidden

    tokens = 0
    with evaluating(model), compute_autocast(model), \
            capture_activations(model, points=("block_in", "resid_mid", "block_out"), callback=on_capture):
        for ids, mask in tqdm(prepared, desc="sublayer importance", disable=not progress, leave=False):
            current["real"] = mask.bool()
            try:
                run_for_hooks(model, ids, mask)
            finally:
                held.clear()
            tokens += int(mask.sum())
    return {kind: (total / tokens).float().cpu() for kind, total in sums.items()}

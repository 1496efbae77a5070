"""How important is each decoder block? Scores for depth pruning, where a low score means "remove first".

Activation-based scores come from ONE forward pass over calibration batches (lists of
{"input_ids", "attention_mask"} dicts, as made by `utils.data.calibration_batches`), with hooks on every
block at once that stream into running sums, so memory does not grow with the number of batches.
Padding (attention_mask 0) is never scored.

- Block influence (ShortGPT, Men et al. 2024): mean over real tokens of 1 - cos(block input, block
  output). A block that barely turns the residual stream scores low.
- Angular distance (Gromov et al. 2024): for a window of n blocks starting at l, mean over real tokens
  of arccos(cos(input of block l, output of block l+n-1)) / pi. The window with the lowest distance is
  the one to remove (see `utils.pruning.select_window`).
- Baselines: weight magnitude, and position (later blocks less important).
- Iterative loss pruning (SLEB-like, Song et al. 2024): remove, one at a time, the block whose removal
  raises the calibration loss least, re-scoring after each removal.

Every function runs the model in eval mode under torch.no_grad, restores the training flags it found,
and removes every hook it registered, also when a forward pass raises.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, ContextManager, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .evaluation import batch_nll
from .hooks import capture_activations
from .models import decoder_layers, model_device
from .pruning import _n_layers, layers_removed, removable_layers

Batch = dict[str, torch.Tensor]


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module in eval mode and disable gradients; restore each module's own flag on exit."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for module, training in flags:
            module.training = training


def _prepared_batches(batches: Sequence[Batch], device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Validate calibration batches and return (input_ids, attention_mask) pairs on `device`.

    A batch without "attention_mask" counts every token as real.
    """
    if isinstance(batches, dict):
        raise ValueError("`batches` must be a list of batches (dicts with 'input_ids' and 'attention_mask'), "
                         "got a single dict; wrap it in a list.")
    batches = list(batches)
    if not batches:
        raise ValueError("`batches` is empty: pass at least one calibration batch "
                         "(see utils.data.calibration_batches).")
    prepared = []
    for number, batch in enumerate(batches):
        if not isinstance(batch, dict) or "input_ids" not in batch:
            found = f"a dict with keys {sorted(batch)}" if isinstance(batch, dict) else type(batch).__name__
            raise ValueError(f"Batch {number} must be a dict with 'input_ids' (and 'attention_mask'), got {found}.")
        ids = torch.as_tensor(batch["input_ids"])
        if ids.dim() != 2:
            raise ValueError(f"Batch {number}: 'input_ids' must be 2-D (rows, tokens), got shape {tuple(ids.shape)}.")
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask)
        if mask.shape != ids.shape:
            raise ValueError(f"Batch {number}: 'attention_mask' has shape {tuple(mask.shape)}, "
                             f"but 'input_ids' has shape {tuple(ids.shape)}.")
        prepared.append((ids.to(device), mask.to(device)))
    if sum(int(mask.sum()) for _, mask in prepared) == 0:
        raise ValueError("The calibration batches hold no real token: every attention_mask entry is 0.")
    return prepared


def _masked_cosine(a: torch.Tensor, b: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Cosine similarity, in float32, between the hidden states of `a` and `b` at the real tokens only."""
    return F.cosine_similarity(a[real].float(), b[real].float(), dim=-1)


def layer_importance(model: nn.Module, batches: Sequence[Batch], window: int | None = None,
                     progress: bool = True) -> dict[str, torch.Tensor]:
    """Block influence of every block and, with `window`, angular distances, from one pass over `batches`.

    Returns {"block_influence": Tensor[n_layers]} and, when `window` = n is given, also
    {"angular_distance": Tensor[n_layers - n + 1]} whose entry l is the distance between the input of
    block l and the output of block l+n-1. Both are means over every real token of every batch (padding,
    attention_mask 0, is excluded). Hooks on all blocks stream each block's input and output into running
    sums; only the inputs of the last `window` blocks of the current batch are held at a time.
    """
    n_layers = len(decoder_layers(model))
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= n_layers):
        raise ValueError(f"`window` must be an integer in 1..{n_layers} (the number of blocks), got {window!r}.")
    device = model_device(model)
    prepared = _prepared_batches(batches, device)
    influence = torch.zeros(n_layers, dtype=torch.float64, device=device)
    distance = torch.zeros(n_layers - window + 1, dtype=torch.float64, device=device) if window else None
    inputs: dict[int, torch.Tensor] = {}
    current: dict[str, torch.Tensor] = {}

    def on_capture(point: str, layer: int, hidden: torch.Tensor) -> None:
        if point == "block_in":
            inputs[layer] = hidden
            return
        real = current["real"].to(hidden.device)  # blocks may sit on different devices (device_map)
        cosine = _masked_cosine(inputs[layer].to(hidden.device), hidden, real)
        influence[layer] += (1 - cosine).sum(dtype=torch.float64).to(device)
        if window is not None:
            start = layer - window + 1
            if start >= 0:
                if window > 1:
                    cosine = _masked_cosine(inputs[start].to(hidden.device), hidden, real)
                angle = torch.arccos(cosine.clamp(-1.0, 1.0)).sum(dtype=torch.float64) / math.pi
                distance[start] += angle.to(device)
                inputs.pop(start)
        if window is None or layer > n_layers - window:
            inputs.pop(layer, None)  # no window starts here: only the block influence needed it

    tokens = 0
    with _evaluating(model), capture_activations(model, points=("block_in", "block_out"), callback=on_capture):
        for ids, mask in tqdm(prepared, desc="layer importance", disable=not progress, leave=False):
            current["real"] = mask.bool()
            try:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            finally:
                inputs.clear()
            tokens += int(mask.sum())
    result = {"block_influence": (influence / tokens).float().cpu()}
    if distance is not None:
        result["angular_distance"] = (distance / tokens).float().cpu()
    return result


def block_influence(model: nn.Module, batches: Sequence[Batch], progress: bool = True) -> torch.Tensor:
    """ShortGPT's block influence: per block, mean over real tokens of 1 - cos(block input, block output).

    Low influence = the block barely changes the residual stream = the first candidate for removal
    (`utils.pruning.select_by_importance`). One forward pass over `batches`; see `layer_importance`.
    """
    return layer_importance(model, batches, progress=progress)["block_influence"]


def angular_distance(model: nn.Module, batches: Sequence[Batch], n: int, progress: bool = True) -> torch.Tensor:
    """Gromov et al.'s angular distance of every window of `n` consecutive blocks, Tensor[n_layers - n + 1].

    Entry l is the mean over real tokens of arccos(cos(input of block l, output of block l+n-1)) / pi,
    in [0, 1]. The window to remove starts at the argmin: `select_window(model, int(d.argmin()), n)`.
    One forward pass over `batches`; see `layer_importance`.
    """
    return layer_importance(model, batches, window=n, progress=progress)["angular_distance"]


def weight_magnitude_importance(model: nn.Module) -> torch.Tensor:
    """Per block, the mean absolute value of its weight matrices (parameters with 2 or more dimensions).

    A data-free baseline: blocks with smaller weights score lower and are removed first. Norm scales and
    biases are left out because their typical values differ between families (Gemma stores 1 + w).
    """
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
    n_layers = _n_layers(model_or_n_layers)
    return torch.arange(n_layers, 0, -1, dtype=torch.float32)


def calibration_loss(model: nn.Module, batches: Sequence[Batch]) -> float:
    """Mean next-token negative log-likelihood over the real tokens of `batches` (padding excluded).

    Token-weighted across batches, so it does not depend on how the rows are grouped into batches.
    Runs in eval mode under torch.no_grad; exp() of it is the calibration perplexity.
    """
    prepared = _prepared_batches(batches, model_device(model))
    total_nll, total_tokens = 0.0, 0
    with _evaluating(model):
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
    removed temporarily (`utils.pruning.layers_removed`, no copy of the model), the calibration loss is
    measured, and the candidate with the lowest loss joins the chosen ones. Later steps therefore see the
    effect of earlier removals. Returns the indices in the order they were chosen (pass them to
    `remove_layers` as they are). The model is restored after every trial, also when one raises. Costs
    about n * (removable blocks) forward passes over `batches`. Raises a ValueError when `n` blocks cannot
    be removed under the protections.
    """
    n_layers = len(decoder_layers(model))
    candidates = removable_layers(n_layers, n, protect_first, protect_last)
    _prepared_batches(batches, model_device(model))  # fail before the search, not inside it
    return greedy_loss_search(model, batches, candidates, n, layers_removed, desc="iterative loss pruning",
                              progress=progress)


def greedy_loss_search(model: nn.Module, batches: Sequence[Batch], candidates: Sequence[int], n: int,
                       trial: Callable[[nn.Module, list[int]], ContextManager], desc: str = "greedy search",
                       progress: bool = True) -> list[int]:
    """Choose `n` of `candidates` one at a time: the one whose trial gives the lowest calibration loss.

    `trial(model, indices)` is a context manager that changes the model temporarily for those indices
    (blocks removed, attention skipped) and restores it on exit. Each step tries every remaining candidate
    together with those chosen so far, so later steps see the effect of earlier choices. A non-finite loss
    counts as infinitely bad. Returns the indices in the order chosen.
    """
    chosen: list[int] = []
    trials = sum(len(candidates) - step for step in range(n))
    with _evaluating(model), tqdm(total=trials, desc=desc, disable=not progress, leave=False) as bar:
        for _ in range(n):
            best_loss, best = math.inf, None
            for candidate in candidates:
                if candidate in chosen:
                    continue
                with trial(model, chosen + [candidate]):
                    loss = calibration_loss(model, batches)
                if not math.isfinite(loss):
                    loss = math.inf
                if best is None or loss < best_loss:
                    best_loss, best = loss, candidate
                bar.update(1)
            chosen.append(best)
            bar.set_postfix(chosen=chosen, loss=f"{best_loss:.4f}")
    return chosen


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
    n_layers = len(decoder_layers(model))
    device = model_device(model)
    prepared = _prepared_batches(batches, device)
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
    with _evaluating(model), capture_activations(model, points=("block_in", "resid_mid", "block_out"),
                                                 callback=on_capture):
        for ids, mask in tqdm(prepared, desc="sublayer importance", disable=not progress, leave=False):
            current["real"] = mask.bool()
            try:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            finally:
                held.clear()
            tokens += int(mask.sum())
    return {kind: (total / tokens).float().cpu() for kind, total in sums.items()}


# ---------------------------------------------------------------------------------------------------
# Neuron importance in GLU MLPs (for width pruning, see utils.pruning.prune_glu_width)
# ---------------------------------------------------------------------------------------------------

STATIC_NEURON_METHODS = ("peak_to_peak", "variance", "product_of_norms", "l2")


def glu_projections(layer: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    """The (gate_proj, up_proj, down_proj) of a decoder block's GLU MLP, or a clear error.

    Neuron i of the MLP is row i of gate_proj and up_proj and column i of down_proj. Families with a fused
    gate_up projection or a classic two-matrix MLP (fc1/fc2) have no such triple and are refused.
    """
    mlp = getattr(layer, "mlp", None)
    if mlp is None:
        raise ValueError(f"{type(layer).__name__} has no 'mlp' module: GLU width pruning needs one.")
    projections = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(p, nn.Linear) for p in projections):
        found = sorted(name for name, child in mlp.named_children() if isinstance(child, nn.Linear))
        kind = "a fused gate_up projection" if any("gate_up" in name for name in found) else "no GLU"
        raise ValueError(f"{type(mlp).__name__} has {kind} (linear layers: {found}); GLU width pruning needs "
                         "separate gate_proj, up_proj and down_proj (Llama, Qwen, Mistral, Gemma).")
    return projections[0], projections[1], projections[2]


def static_neuron_importance(model: nn.Module, method: str = "peak_to_peak") -> torch.Tensor:
    """Importance of every GLU neuron from the weights alone, Tensor[n_layers, intermediate_size].

    Neuron i's rows of gate_proj (g) and up_proj (u): "peak_to_peak" = (max g + |min g|) + (max u + |min u|)
    (the Peak-to-Peak Magnitude that optipfair calls MAW); "variance" = var(g) + var(u); "product_of_norms"
    = |g| * |u|; "l2" = the L2 norm of g, u and down_proj's column i together. High = keep.
    """
    if method not in STATIC_NEURON_METHODS:
        raise ValueError(f"Unknown static method {method!r}; known: {', '.join(STATIC_NEURON_METHODS)}.")
    scores = []
    with torch.no_grad():
        for layer in decoder_layers(model):
            gate, up, down = (p.weight.float() for p in glu_projections(layer))
            if method == "peak_to_peak":
                score = (gate.amax(1) + gate.amin(1).abs()) + (up.amax(1) + up.amin(1).abs())
            elif method == "variance":
                score = gate.var(1) + up.var(1)
            elif method == "product_of_norms":
                score = gate.norm(dim=1) * up.norm(dim=1)
            else:
                score = (gate.pow(2).sum(1) + up.pow(2).sum(1) + down.pow(2).sum(0)).sqrt()
            scores.append(score.cpu())
    return torch.stack(scores)


def activation_statistics(model: nn.Module, batches: Sequence[Batch], gram: bool = False,
                          progress: bool = True) -> dict[str, torch.Tensor]:
    """Statistics of every GLU neuron's activation act(gate) * up over the real tokens of `batches`.

    One forward pass with a hook on every down_proj input. Returns "mean_abs" and "mean_square",
    Tensor[n_layers, intermediate_size], and "tokens"; with `gram=True` also "gram", the per-layer matrix
    A^T A / tokens of the activations (Tensor[n_layers, intermediate, intermediate], float64), which is what
    re-fitting down_proj by least squares needs (`utils.pruning.refit_down_proj`).
    """
    blocks = decoder_layers(model)
    n_layers = len(blocks)
    width = glu_projections(blocks[0])[2].in_features
    device = model_device(model)
    prepared = _prepared_batches(batches, device)
    mean_abs = torch.zeros(n_layers, width, dtype=torch.float64)
    mean_square = torch.zeros(n_layers, width, dtype=torch.float64)
    grams = torch.zeros(n_layers, width, width, dtype=torch.float64) if gram else None
    current: dict[str, torch.Tensor] = {}

    def on_capture(point: str, layer: int, activation: torch.Tensor) -> None:
        real = activation[current["real"].to(activation.device)].float()
        mean_abs[layer] += real.abs().sum(0, dtype=torch.float64).cpu()
        mean_square[layer] += real.pow(2).sum(0, dtype=torch.float64).cpu()
        if grams is not None:
            grams[layer] += (real.T @ real).double().cpu()

    tokens = 0
    with _evaluating(model), capture_activations(model, points=("mlp_act",), callback=on_capture):
        for ids, mask in tqdm(prepared, desc="neuron activations", disable=not progress, leave=False):
            current["real"] = mask.bool()
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            tokens += int(mask.sum())
    result = {"mean_abs": (mean_abs / tokens).float(), "mean_square": (mean_square / tokens).float(), "tokens": tokens}
    if grams is not None:
        result["gram"] = grams / tokens
    return result


def activation_neuron_importance(model: nn.Module, batches: Sequence[Batch], method: str = "activation_x_down",
                                 statistics: dict[str, torch.Tensor] | None = None,
                                 progress: bool = True) -> torch.Tensor:
    """Data-driven importance of every GLU neuron, Tensor[n_layers, intermediate_size]; high = keep.

    "mean_abs_activation": mean |act(gate) * up| over the real calibration tokens (what the neuron feeds
    down_proj). "activation_x_down": that times the L2 norm of the neuron's down_proj column (how much the
    neuron moves the output, a hybrid of activation and weight). "output_energy": mean squared activation
    times the squared column norm, the mean squared size of the neuron's contribution to the MLP output.
    Pass `statistics` from `activation_statistics` to reuse one forward pass for several methods.
    """
    methods = ("mean_abs_activation", "activation_x_down", "output_energy")
    if method not in methods:
        raise ValueError(f"Unknown activation method {method!r}; known: {', '.join(methods)}.")
    if statistics is None:
        statistics = activation_statistics(model, batches, progress=progress)
    if method == "mean_abs_activation":
        return statistics["mean_abs"].clone()
    with torch.no_grad():
        column_norms = torch.stack([glu_projections(layer)[2].weight.float().norm(dim=0).cpu()
                                    for layer in decoder_layers(model)])
    if method == "activation_x_down":
        return statistics["mean_abs"] * column_norms
    return statistics["mean_square"] * column_norms.pow(2)

"""Width pruning: narrower GLU MLPs, and the scores that decide which neurons go.

A GLU MLP computes down_proj(act(gate_proj(x)) * up_proj(x)); neuron i is row i of gate_proj and
up_proj and column i of down_proj (`utils.models.glu_projections`). Removing neurons slices all three
together, in every decoder block to one width, so the config's single `intermediate_size` still
describes the model and it saves and loads with plain `from_pretrained`.

- Scores (high = keep), Tensor[n_layers, intermediate_size]: `static_neuron_importance` from the weights
  alone (peak-to-peak magnitude, variance, product of norms, L2), and `activation_neuron_importance` from
  one hooked pass over calibration batches (`activation_statistics`).
- Pruning: `target_intermediate_size` turns a percent, a width or an expansion ratio into the width to
  keep (rounded to a multiple that fast matrix kernels like); `prune_glu_width` keeps the best neurons;
  `refit_down_proj` optionally re-fits down_proj by least squares to make up for the removed ones.
- Published criteria: `literature_neuron_importance` (FLAP's fluctuation, Wanda-style weight x activation
  norm), `taylor_neuron_importance` (first-order Taylor estimate of the loss change, LLM-Pruner), and
  `prune_glu_width_with_bias` (FLAP's bias that replaces the removed neurons' mean output, stored as
  `config.mlp_bias` so the model still reloads with plain `from_pretrained`).
- Gradual pruning: `prune_glu_width_in_steps` cuts in several smaller steps, each followed by a short heal
  by distillation from the unpruned model (`utils.distill.distill`).
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .checks import check_bool, check_finite, check_int, check_module, check_number
from .batches import Batch, evaluating, ids_and_masks
from .distill import distill
from .hooks import capture_activations
from .models import compute_autocast, decoder_layers, glu_projections, model_device, run_for_hooks, stack_configs

# ---------------------------------------------------------------------------------------------------
# Neuron importance: which GLU neurons to keep (high score = keep)
# ---------------------------------------------------------------------------------------------------

STATIC_NEURON_METHODS = ("peak_to_peak", "variance", "product_of_norms", "l2")


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


def _gram(activations: torch.Tensor, parts: int = 4) -> torch.Tensor:
    """activations^T @ activations (tokens x width in, width x width out) with each block of columns above the
    diagonal computed once and mirrored below it: every entry is the same dot product over the tokens as in the
    full product, for about 5/8 of its multiply-adds with 4 parts (the matrix is symmetric)."""
    width = activations.shape[1]
    edges = [width * part // parts for part in range(parts + 1)]
    gram = activations.new_empty(width, width)
    for begin, end in zip(edges, edges[1:]):
        if begin == end:
            continue
        panel = activations[:, begin:end].T @ activations[:, begin:]
        gram[begin:end, begin:] = panel
        gram[end:, begin:end] = panel[:, end - begin:].T
    return gram


def activation_statistics(model: nn.Module, batches: Sequence[Batch], gram: bool = False,
                          progress: bool = True) -> dict[str, torch.Tensor]:
    """Statistics of every GLU neuron's activation act(gate) * up over the real tokens of `batches`.

    One forward pass with a hook on every down_proj input. Returns "mean" (signed), "mean_abs" and "mean_square",
    Tensor[n_layers, intermediate_size], and "tokens"; with `gram=True` also "gram", the per-layer matrix
    A^T A / tokens of the activations (Tensor[n_layers, intermediate, intermediate], float64), which is what
    re-fitting down_proj by least squares needs (`utils.width.refit_down_proj`). The forward pass runs under
    `utils.models.compute_autocast` like the evaluation passes; the sums and the Gram matrix do not.
    """
    check_module("model", model)
    check_bool("gram", gram)
    blocks = decoder_layers(model)
    n_layers = len(blocks)
    width = glu_projections(blocks[0])[2].in_features
    device = model_device(model)
    prepared = ids_and_masks(batches, device)
    mean = torch.zeros(n_layers, width, dtype=torch.float64)
    mean_abs = torch.zeros(n_layers, width, dtype=torch.float64)
    mean_square = torch.zeros(n_layers, width, dtype=torch.float64)
    grams = torch.zeros(n_layers, width, width, dtype=torch.float64) if gram else None
    current: dict[str, torch.Tensor] = {}

    def on_capture(point: str, layer: int, activation: torch.Tensor) -> None:
        real = activation[current["real"].to(activation.device)].float()
        mean[layer] += real.sum(0, dtype=torch.float64).cpu()
        mean_abs[layer] += real.abs().sum(0, dtype=torch.float64).cpu()
        mean_square[layer] += real.pow(2).sum(0, dtype=torch.float64).cpu()
        if grams is not None:
            grams[layer] += _gram(real).double().cpu()

    tokens = 0
    # bfloat16 matrix products on a CPU with bfloat16 units (utils.models.compute_autocast); the sums above stay
    # in float64 and the Gram products in float32 (the hooks run the callback outside autocast)
    with evaluating(model), compute_autocast(model), capture_activations(model, points=("mlp_act",), callback=on_capture):
        for ids, mask in tqdm(prepared, desc="neuron activations", disable=not progress, leave=False):
            current["real"] = mask.bool()
            run_for_hooks(model, ids, mask)
            tokens += int(mask.sum())
    result = {"mean": (mean / tokens).float(), "mean_abs": (mean_abs / tokens).float(), "mean_square": (mean_square / tokens).float(), "tokens": tokens}
    if grams is not None:
        result["gram"] = grams / tokens
    return result


def merged_statistics(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The `activation_statistics` of two passes' batches together, from each pass's result: every mean is
    token-weighted ("tokens" adds up), the Gram matrices too where both passes computed one.

    The values are those of one pass over both sets of batches up to rounding (the means are kept in float32),
    so a larger calibration set can build on a pass already made instead of running its first batches again.
    Raises a ValueError when the two results do not describe the same model (keys or shapes differ) or hold no
    token.
    """
    keys = ("mean", "mean_abs", "mean_square", "tokens")
    for name, statistics in (("first", first), ("second", second)):
        if not isinstance(statistics, dict) or any(key not in statistics for key in keys):
            raise ValueError(f"`{name}` must be a result of activation_statistics (keys {', '.join(keys)}), "
                             f"got {type(statistics).__name__} with keys {sorted(statistics) if isinstance(statistics, dict) else '-'}.")
    if ("gram" in first) != ("gram" in second):
        raise ValueError("Only one of the two passes computed a Gram matrix: run both with gram=True, or neither.")
    for key in ("mean", "mean_abs", "mean_square") + (("gram",) if "gram" in first else ()):
        if first[key].shape != second[key].shape:
            raise ValueError(f"The two passes' {key!r} differ in shape ({tuple(first[key].shape)} against "
                             f"{tuple(second[key].shape)}): they must come from the same model.")
    tokens = check_int("first['tokens']", first["tokens"], minimum=0) + check_int("second['tokens']", second["tokens"], minimum=0)
    if tokens == 0:
        raise ValueError("Neither pass holds a token to merge.")
    share = first["tokens"] / tokens

    def weighted(key: str) -> torch.Tensor:
        return first[key].double() * share + second[key].double() * (1 - share)

    result = {key: weighted(key).float() for key in ("mean", "mean_abs", "mean_square")}
    result["tokens"] = tokens
    if "gram" in first:
        result["gram"] = weighted("gram")
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


# ---------------------------------------------------------------------------------------------------
# Pruning: removing the low-scoring neurons from every GLU MLP
# ---------------------------------------------------------------------------------------------------

def target_intermediate_size(current: int, hidden_size: int, percent: float | None = None,
                             intermediate_size: int | None = None, expansion_ratio: float | None = None,
                             multiple: int = 1) -> int:
    """The GLU width to prune to, from exactly one of three ways of saying it, rounded to `multiple`.

    `percent` of the `current` neurons removed (0 < percent < 100), a target `intermediate_size`
    (1..current), or an `expansion_ratio` = intermediate / hidden. The result is rounded to the nearest
    multiple of `multiple` (fast matrix kernels like widths that are multiples of 64 or 128), never below
    `multiple` and never above `current`. Raises a ValueError for anything outside these ranges.
    """
    given = [name for name, value in (("percent", percent), ("intermediate_size", intermediate_size),
                                      ("expansion_ratio", expansion_ratio)) if value is not None]
    if len(given) != 1:
        raise ValueError(f"Give exactly one of percent, intermediate_size or expansion_ratio (got {given or 'none'}).")
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"`multiple` must be an integer >= 1, got {multiple!r}.")
    if multiple > current:
        raise ValueError(f"`multiple` ({multiple}) is larger than the current width {current}: rounding to it "
                         "would prune nothing. Use a multiple <= the width (64 or 128 on real models).")
    if percent is not None:
        if not 0 < percent < 100:
            raise ValueError(f"`percent` of neurons to remove must be in (0, 100), got {percent}.")
        target = current * (1 - percent / 100)
    elif intermediate_size is not None:
        if not 1 <= intermediate_size <= current:
            raise ValueError(f"`intermediate_size` must be in 1..{current} (the current width), got {intermediate_size}.")
        target = intermediate_size
    else:
        if not 0 < expansion_ratio * hidden_size <= current:
            raise ValueError(f"`expansion_ratio` must be in (0, {current / hidden_size:.4g}] (current intermediate "
                             f"{current} / hidden {hidden_size}), got {expansion_ratio}.")
        target = expansion_ratio * hidden_size
    rounded = int(round(target / multiple)) * multiple
    return min(current, max(multiple, rounded))


def neurons_to_keep(scores: torch.Tensor, keep: int) -> list[torch.Tensor]:
    """Per layer, the indices (sorted) of the `keep` highest-scoring neurons of Tensor[n_layers, width]."""
    check_finite("scores", scores)
    if scores.dim() != 2:
        raise ValueError(f"`scores` must be Tensor[n_layers, intermediate_size], got shape {tuple(scores.shape)}.")
    if not 1 <= keep <= scores.shape[1]:
        raise ValueError(f"Cannot keep {keep} neurons of {scores.shape[1]}: keep must be in 1..{scores.shape[1]}.")
    return [torch.sort(torch.topk(row.float(), keep).indices).values for row in scores]


def _sliced_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear holding only the rows (dim 0) or columns (dim 1) `index` of `linear`, bias included."""
    weight = linear.weight.data.index_select(dim, index.to(linear.weight.device))
    out_features, in_features = weight.shape
    new = nn.Linear(in_features, out_features, bias=linear.bias is not None, device=weight.device, dtype=weight.dtype)
    new.weight.data.copy_(weight)
    if linear.bias is not None:
        bias = linear.bias.data if dim == 1 else linear.bias.data.index_select(0, index.to(linear.bias.device))
        new.bias.data.copy_(bias)
    return new


def prune_glu_width(model: nn.Module, scores: torch.Tensor, percent: float | None = None,
                    intermediate_size: int | None = None, expansion_ratio: float | None = None,
                    multiple: int = 1, gram: torch.Tensor | None = None, ridge: float = 1e-3,
                    inplace: bool = False) -> nn.Module:
    """Remove the lowest-scoring GLU neurons of every decoder block and return the narrower model.

    `scores` is Tensor[n_layers, intermediate_size] (high = keep), e.g. from
    `utils.width.static_neuron_importance` or `activation_neuron_importance`. The target width comes
    from exactly one of `percent` (removed), `intermediate_size` or `expansion_ratio`, rounded to `multiple`
    (see `target_intermediate_size`). In every block the same number of neurons is kept, so the config's
    single `intermediate_size` describes every layer; rows of gate_proj and up_proj and columns of
    down_proj are sliced consistently (biases too). The result is a standard transformers model that saves
    and loads with plain `from_pretrained`. With `gram` (from `utils.width.activation_statistics(...,
    gram=True)` on calibration text) each down_proj is then re-fitted to compensate for the removed neurons
    (`refit_down_proj`). A copy is returned unless `inplace`. Refuses a model without
    separate gate/up/down projections, and scores of the wrong shape (scores for only some layers cannot
    be honoured: the family's config has one width for all layers).
    """
    check_module("model", model)
    check_finite("scores", scores)
    blocks = decoder_layers(model)
    current = glu_projections(blocks[0])[2].in_features
    configs = stack_configs(model, len(blocks))
    if not configs or any(getattr(c, "intermediate_size", None) != current for c in configs):
        raise ValueError("The model's config has no single `intermediate_size` matching its MLPs; this family's "
                         "config cannot express the pruned width.")
    widths = {glu_projections(block)[2].in_features for block in blocks}
    if widths != {current}:
        raise ValueError(f"The MLPs have different widths {sorted(widths)}; prune a model with one width per layer.")
    scores = torch.as_tensor(scores)
    if tuple(scores.shape) != (len(blocks), current):
        raise ValueError(f"`scores` must have shape ({len(blocks)}, {current}) = (every layer, every neuron); got "
                         f"{tuple(scores.shape)}. The config has a single intermediate_size, so every layer is "
                         "pruned to the same width: per-layer widths are not supported.")
    hidden_size = configs[0].hidden_size
    keep = target_intermediate_size(current, hidden_size, percent, intermediate_size, expansion_ratio, multiple)
    kept = neurons_to_keep(scores, keep)
    original_down = [glu_projections(block)[2].weight.detach() for block in blocks] if gram is not None else None
    if not inplace:
        model = copy.deepcopy(model)
        blocks = decoder_layers(model)
    with torch.no_grad():
        for block, index in zip(blocks, kept):
            gate, up, down = glu_projections(block)
            block.mlp.gate_proj = _sliced_linear(gate, index, 0)
            block.mlp.up_proj = _sliced_linear(up, index, 0)
            block.mlp.down_proj = _sliced_linear(down, index, 1)
            if hasattr(block.mlp, "intermediate_size"):
                block.mlp.intermediate_size = keep
    for config in stack_configs(model, len(blocks)):
        config.intermediate_size = keep
    if gram is not None:
        refit_down_proj(model, gram, kept, original_down, ridge=ridge)
    return model


def refit_down_proj(model: nn.Module, gram: torch.Tensor, kept: Sequence[torch.Tensor],
                    original_down: Sequence[torch.Tensor], ridge: float = 1e-3) -> None:
    """Re-fit each pruned block's down_proj so it reproduces the unpruned MLP output, by least squares.

    With A the calibration activations of all neurons of a block (its `gram` = A^T A / tokens, from
    `utils.width.activation_statistics(..., gram=True)` on the unpruned model), K the kept neurons and
    W the original down_proj, the new down_proj solves min ||A W^T - A_K W_K'^T||^2 + ridge * mean(diag) *
    ||W_K'||^2: W_K'^T = (G_KK + lambda I)^-1 G_K: W^T. The removed neurons' average contribution is thereby
    spread over the kept ones that correlate with it. `kept` and `original_down` are per layer (as from
    `neurons_to_keep` and the unpruned down_proj weights); the model is changed in place.
    """
    blocks = decoder_layers(model)
    if not (len(blocks) == len(kept) == len(original_down) == gram.shape[0]):
        raise ValueError(f"One gram matrix, kept-index list and down_proj per block is needed ({len(blocks)} blocks; "
                         f"got {gram.shape[0]}, {len(kept)}, {len(original_down)}).")
    if ridge < 0:
        raise ValueError(f"`ridge` must be >= 0, got {ridge}.")
    with torch.no_grad():
        for block, g, index, weight in zip(blocks, gram, kept, original_down):
            g = g.double()
            index = index.cpu()
            g_kk = g[index][:, index]
            lam = ridge * float(g_kk.diagonal().mean())
            rhs = g[index] @ weight.double().cpu().T  # (kept, hidden)
            solution = torch.linalg.solve(g_kk + lam * torch.eye(len(index), dtype=torch.float64), rhs)
            down = glu_projections(block)[2]
            down.weight.data.copy_(solution.T.to(down.weight.dtype))


# ---------------------------------------------------------------------------------------------------
# Published criteria: FLAP (fluctuation + bias compensation), Wanda-style, first-order Taylor, iterative
# ---------------------------------------------------------------------------------------------------

LITERATURE_NEURON_METHODS = ("flap", "wanda")


def literature_neuron_importance(model: nn.Module, statistics: dict[str, torch.Tensor],
                                 method: str = "flap") -> torch.Tensor:
    """Neuron scores of two published pruning criteria from one `activation_statistics` pass; high = keep.

    "flap" (FLAP, An et al. 2024): the fluctuation of the neuron's activation a_j over the calibration
    tokens times its down_proj column's squared norm, Var(a_j) * ||W[:, j]||^2. What stays constant can be
    replaced by a bias (`prune_glu_width_with_bias`), so only the part that varies is at risk. "wanda"
    (Wanda, Sun et al. 2024, applied per neuron): the activation's L2 norm over the tokens times the L1 norm
    of the down_proj column, sum_i |W_ij| * ||a_j||. Returns Tensor[n_layers, intermediate_size].
    """
    if method not in LITERATURE_NEURON_METHODS:
        raise ValueError(f"Unknown method {method!r}; known: {', '.join(LITERATURE_NEURON_METHODS)}.")
    missing = [key for key in ("mean", "mean_square") if key not in statistics]
    if missing:
        raise ValueError(f"`statistics` lacks {missing}: pass the result of utils.width.activation_statistics.")
    with torch.no_grad():
        downs = [glu_projections(layer)[2].weight.float().cpu() for layer in decoder_layers(model)]
    if tuple(statistics["mean"].shape) != (len(downs), downs[0].shape[1]):
        raise ValueError(f"`statistics` are for shape {tuple(statistics['mean'].shape)}, the model has "
                         f"({len(downs)}, {downs[0].shape[1]}) neurons: compute them on this model.")
    mean, mean_square = statistics["mean"].double(), statistics["mean_square"].double()
    if method == "flap":
        variance = (mean_square - mean.pow(2)).clamp_min(0)
        return (variance * torch.stack([d.pow(2).sum(0) for d in downs]).double()).float()
    return (mean_square.sqrt() * torch.stack([d.abs().sum(0) for d in downs]).double()).float()


def taylor_neuron_importance(model: nn.Module, batches: Sequence[Batch], aggregate: str = "squares",
                             progress: bool = True) -> torch.Tensor:
    """First-order Taylor estimate of how much the loss changes when each GLU neuron is removed; high = keep.

    Removing neuron j zeroes column j of down_proj, so to first order the next-token loss changes by
    -sum_i W_ij dL/dW_ij (LLM-Pruner, Ma et al. 2023). One forward and backward pass per calibration batch
    (only the down_proj weights get gradients; the model's parameters and mode are restored afterwards).
    `aggregate="squares"` (the default) averages its square over the batches (Molchanov et al. 2019), so
    batches do not cancel; `"sum"` takes |that| with the gradient of the loss over all batches together
    (LLM-Pruner). Returns Tensor[n_layers, intermediate_size].
    """
    if aggregate not in ("sum", "squares"):
        raise ValueError(f"`aggregate` must be 'sum' or 'squares', got {aggregate!r}.")
    batches = list(batches)
    if not batches:
        raise ValueError("`batches` is empty: the Taylor scores need at least one calibration batch.")
    downs = [glu_projections(layer)[2] for layer in decoder_layers(model)]
    device = model_device(model)
    prepared = ids_and_masks(batches, device)
    flags = {parameter: parameter.requires_grad for parameter in model.parameters()}
    training = model.training
    per_batch, weights = [], []
    try:
        model.eval()
        for parameter in flags:
            parameter.requires_grad_(False)
        for down in downs:
            down.weight.requires_grad_(True)
        for ids, mask in tqdm(prepared, desc="Taylor scores", disable=not progress, leave=False):
            labels = ids.masked_fill(mask == 0, -100)
            targets = int((labels[:, 1:] != -100).sum())
            if targets == 0:
                continue
            loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
            gradients = torch.autograd.grad(loss, [down.weight for down in downs])
            with torch.no_grad():
                per_batch.append(torch.stack([(down.weight.float() * g.float()).sum(0).cpu()
                                              for down, g in zip(downs, gradients)]).double())
            weights.append(targets)
    finally:
        for parameter, flag in flags.items():
            parameter.requires_grad_(flag)
        model.train(training)
    if not per_batch:
        raise ValueError("`batches` hold no next-token targets (every row has fewer than 2 real tokens).")
    share = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    stacked = torch.stack(per_batch)  # (batches, layers, width): each batch's first-order change
    if aggregate == "sum":
        return (stacked * share[:, None, None]).sum(0).abs().float()
    return (stacked.pow(2) * share[:, None, None]).sum(0).float()


def prune_glu_width_with_bias(model: nn.Module, scores: torch.Tensor, mean: torch.Tensor,
                              percent: float | None = None, intermediate_size: int | None = None,
                              expansion_ratio: float | None = None, multiple: int = 1,
                              gram: torch.Tensor | None = None, ridge: float = 1e-3,
                              inplace: bool = False) -> nn.Module:
    """Prune like `prune_glu_width`, then give down_proj a bias that replaces the removed neurons' mean output.

    FLAP's compensation (An et al. 2024): on calibration text neuron j sends on average mean_j * W[:, j],
    so the removed neurons' mean output sum_{j removed} W[:, j] mean_j becomes down_proj's bias. `mean` is
    `activation_statistics(...)["mean"]` on the unpruned model. With `gram` (from the same call with
    `gram=True`) the kept columns are also re-fitted by least squares on the centred activations, the best
    affine replacement of the full MLP output on the calibration tokens. The bias is stored the way the
    family's config says: `config.mlp_bias = True` (gate and up get zero biases), so the model saves and
    reloads exactly with plain `from_pretrained`. Families whose config has no `mlp_bias` (in transformers
    5: Qwen2, Qwen3, Gemma3, Mistral) cannot store it: a ValueError says so before anything changes.
    """
    check_module("model", model)
    check_finite("scores", torch.as_tensor(scores))
    check_finite("mean", torch.as_tensor(mean))  # a NaN mean would become a NaN bias
    if gram is not None:
        check_finite("gram", torch.as_tensor(gram))
    ridge = check_number("ridge", ridge, minimum=0.0)
    check_bool("inplace", inplace)
    blocks = decoder_layers(model)
    configs = stack_configs(model, len(blocks))
    if not configs or not all("mlp_bias" in config.to_dict() for config in configs):
        raise ValueError(f"{type(model).__name__}'s config has no `mlp_bias`, so a compensating down_proj bias "
                         "would not survive save and reload; use prune_glu_width (no bias) for this family.")
    width = glu_projections(blocks[0])[2].in_features
    mean = torch.as_tensor(mean)
    if tuple(mean.shape) != (len(blocks), width):
        raise ValueError(f"`mean` must have shape ({len(blocks)}, {width}) (activation_statistics(...)['mean']), "
                         f"got {tuple(mean.shape)}.")
    scores = torch.as_tensor(scores)
    if tuple(scores.shape) != (len(blocks), width):
        raise ValueError(f"`scores` must have shape ({len(blocks)}, {width}), got {tuple(scores.shape)}.")
    keep = target_intermediate_size(width, configs[0].hidden_size, percent, intermediate_size, expansion_ratio,
                                    multiple)
    kept = neurons_to_keep(scores, keep)
    original = [glu_projections(block)[2] for block in blocks]
    original_down = [down.weight.detach().clone() for down in original]
    original_bias = [down.bias.detach().clone() if down.bias is not None else None for down in original]
    pruned = prune_glu_width(model, scores, intermediate_size=keep, inplace=inplace)
    if gram is not None:
        m = mean.double()
        centred = gram.double() - m[:, :, None] * m[:, None, :]
        refit_down_proj(pruned, centred, kept, original_down, ridge=ridge)
    with torch.no_grad():
        for block, index, weight, bias, m in zip(decoder_layers(pruned), kept, original_down, original_bias, mean):
            gate, up, down = glu_projections(block)
            full = weight.double().cpu() @ m.double()  # the full MLP's mean output on calibration text
            now = down.weight.double().cpu() @ m.double()[index.cpu()]  # what the kept columns give
            compensation = full - now + (bias.double().cpu() if bias is not None else 0)
            for name, linear, value in (("gate_proj", gate, None), ("up_proj", up, None), ("down_proj", down, compensation)):
                if linear.bias is None:
                    new = nn.Linear(linear.in_features, linear.out_features, bias=True,
                                    device=linear.weight.device, dtype=linear.weight.dtype)
                    new.weight.data.copy_(linear.weight.data)
                    new.bias.data.zero_()
                    setattr(block.mlp, name, new)
                    linear = new
                if value is not None:
                    linear.bias.data.copy_(value.to(linear.bias.dtype))
    for config in stack_configs(pruned, len(blocks)):
        config.mlp_bias = True
    return pruned


# ---------------------------------------------------------------------------------------------------
# Gradual pruning: several smaller cuts, each followed by a short heal
# ---------------------------------------------------------------------------------------------------

def prune_glu_width_in_steps(model: nn.Module, calibration: Sequence[Batch], heal_batches: Sequence[Batch],
                             percent: float, rounds: int = 2, heal_steps: int = 4, method: str = "flap",
                             refit: bool = True, lr: float = 3e-4, teacher_cache: dict | None = None,
                             statistics: dict[str, torch.Tensor] | None = None, progress: bool = True) -> nn.Module:
    """Remove `percent` of every block's GLU neurons in `rounds` equal cuts, each followed by `heal_steps`
    steps of distillation from `model`, and return the pruned, healed copy (`model` is not changed).

    Gradual pruning (Zhu and Gupta 2018): a cut in small steps lets the kept neurons take over before the
    next cut. Each round measures `activation_statistics` of the current
    model on `calibration`, scores its neurons with `literature_neuron_importance(method)` ("flap" or
    "wanda"), keeps the best down to that round's width (the widths step evenly from the full one to
    `percent` removed), re-fits down_proj on that pass's Gram matrix when `refit` (`refit_down_proj`), and
    then distills the unpruned `model` into it (`utils.distill.distill`, learning rate `lr`) for
    `heal_steps` steps on the round's own slice of `heal_batches`, which needs rounds * heal_steps batches.
    The fair comparison is one cut of `percent` healed for rounds * heal_steps steps on the same batches;
    `teacher_cache` (a dict) lets both read the teacher's outputs once. `statistics`, where that pass was
    already made (`activation_statistics(model, calibration, gram=refit)`), serves the first round.
    """
    check_module("model", model)
    blocks = decoder_layers(model)
    width = glu_projections(blocks[0])[2].in_features
    final = target_intermediate_size(width, stack_configs(model, len(blocks))[0].hidden_size, percent=percent)
    rounds = check_int("rounds", rounds, minimum=1)
    heal_steps = check_int("heal_steps", heal_steps, minimum=0)
    if method not in LITERATURE_NEURON_METHODS:
        raise ValueError(f"Unknown method {method!r}; known: {', '.join(LITERATURE_NEURON_METHODS)}.")
    check_bool("refit", refit)
    calibration, heal_batches = list(calibration), list(heal_batches)
    if not calibration:
        raise ValueError("`calibration` is empty: each round's scores need at least one calibration batch.")
    if statistics is not None:
        missing = [key for key in ("mean", "mean_square") + (("gram",) if refit else ()) if key not in statistics]
        if missing:
            raise ValueError(f"`statistics` lacks {missing}: pass activation_statistics(model, calibration, "
                             f"gram={refit}) of this model.")
    if len(heal_batches) < rounds * heal_steps:
        raise ValueError(f"`heal_batches` holds {len(heal_batches)} batches; {rounds} rounds of {heal_steps} heal "
                         f"steps need {rounds * heal_steps}.")
    widths = [round(width - (width - final) * (r + 1) / rounds) for r in range(rounds)]
    student = model
    for r, keep in enumerate(tqdm(widths, desc="gradual width pruning", disable=not progress, leave=False)):
        if r > 0 or statistics is None:
            statistics = activation_statistics(student, calibration, gram=refit, progress=False)
        scores = literature_neuron_importance(student, statistics, method)
        student = prune_glu_width(student, scores, intermediate_size=keep, gram=statistics["gram"] if refit else None)
        if heal_steps:
            distill(student, model, heal_batches[r * heal_steps:(r + 1) * heal_steps], steps=heal_steps, lr=lr,
                    progress=False, teacher_cache=teacher_cache)
    return student

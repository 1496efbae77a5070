"""Adaptive attention bypass: a small router decides, once per input at prefill, which attention sublayers to skip.

Static attention bypass (`utils.bypass`, Chapter 7) skips the same attention sublayers for every input. But
inputs differ: a short, simple SMS message may tolerate many more skipped attention sublayers than a dense
Wikipedia paragraph. Following FiRST (per-sequence skip decisions at prefill, which keep the KV cache
consistent; see REFERENCES.md), the adaptive model works like this:

- Blocks 0..`router_layer` always run in full. After block `router_layer`, the router reads the hidden state
  mean-pooled over the real tokens of the prompt and picks one *profile* (a kind of input, such as
  "wikipedia" or "sms"); each profile has its own skip set, chosen on that kind's calibration text.
- For the rest of this forward pass and every decode step that follows with the same KV cache, the blocks
  in the skip set run the MLP branch only (exactly the forward of `utils.bypass`, so no q/k/v/o work at
  all) and never write their KV-cache slot. The next prompt (a call with an empty or no cache) decides again.
- The attention weights all stay in the model, because other inputs use them. One skip set serves a whole
  batch: when rows pick different profiles, the batch skips only the sublayers every row's profile skips
  (their intersection), which is where adaptive skipping stops paying.
- The router is tiny (a standardized linear classifier over the pooled state: hidden x profiles weights),
  and it adds no forward pass: it reads a hidden state the model computes anyway.

Fitting, step by step (each step is a function here, so a chapter can show it):
`profile_skip_orders` (per-kind attention importance, `utils.importance.sublayer_importance`, turned into an
order of candidates), `skip_loss_curve` (calibration loss per number of skipped sublayers), `allocate_skips`
(how many sublayers each kind skips for a given average budget), `pooled_hidden_states` + `fit_router`
(the classifier), then `make_adaptive` installs it. `save_adaptive` / `load_adaptive` round-trip the model
plus router (`adaptive_router.json`); `per_input_nll`, `perplexity_by_kind` and `interleaved_timings` measure quality and speed.
"""

from __future__ import annotations

import itertools
import json
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .batches import Batch, evaluating, ids_and_masks
from .bypass import attention_skipped, bypassed_layers, save_bypassed
from .bypass_modeling import (
    BYPASSED_LAYERS_KEY,
    AttentionBypassedForCausalLM,
    attention_only_modules,
    attention_types,
    bypassed_block_class,
    statically_bypassed,
)
from .checks import check_finite, check_folder, check_indices, check_int, check_module, check_str, check_tensor
from .data import atomic_write_text
from .depth import layers_removed
from .evaluation import batch_nll
from .hooks import capture_activations
from .importance import calibration_loss
from .models import ROUTER_FILE, decoder_layers, model_device

ROUTER_FORMAT = 1


# ---------------------------------------------------------------------------------------------------
# The router
# ---------------------------------------------------------------------------------------------------

@dataclass
class AttentionRouter:
    """Which profile (kind of input) a prompt belongs to, and the attention sublayers each profile skips.

    `router_layer`: the block after which the router reads the hidden state (blocks 0..router_layer always
    run). `profiles`: profile names, in the order of the classifier's outputs. `skip_sets`: {profile: sorted
    block indices whose attention is skipped}. The classifier: logits = weight @ ((pooled - feature_mean) /
    feature_std) + bias, with weight [profiles, hidden] and bias [profiles]; the highest logit wins.
    """

    router_layer: int
    profiles: list[str]
    skip_sets: dict[str, list[int]]
    weight: torch.Tensor
    bias: torch.Tensor
    feature_mean: torch.Tensor
    feature_std: torch.Tensor
    extra: dict = field(default_factory=dict)  # free-form facts saved with the router (budget, accuracy, ...)

    def __post_init__(self) -> None:
        """Check the fields on construction: a NaN weight or a profile without a skip set would otherwise
        only show as wrong routing decisions. What depends on a model is checked by `check_router`."""
        self.router_layer = check_int("router_layer", self.router_layer, minimum=0)
        if isinstance(self.profiles, (str, bytes)) or not isinstance(self.profiles, Sequence):
            raise TypeError(f"profiles must be a list of profile names, got {type(self.profiles).__name__}.")
        for index, name in enumerate(self.profiles):
            check_str(f"profiles[{index}]", name)
        if not isinstance(self.skip_sets, Mapping):
            raise TypeError(f"skip_sets must be a dict {{profile: [block indices]}}, got {type(self.skip_sets).__name__}.")
        for name, layers in self.skip_sets.items():
            check_indices(f"skip_sets[{name!r}]", layers)
        for name in ("weight", "bias", "feature_mean", "feature_std"):
            check_finite(name, check_tensor(name, getattr(self, name), dim=2 if name == "weight" else 1))
        n_profiles, hidden = self.weight.shape
        for name, size in (("bias", n_profiles), ("feature_mean", hidden), ("feature_std", hidden)):
            if len(getattr(self, name)) != size:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries, but weight has shape "
                                 f"{tuple(self.weight.shape)} ([profiles, hidden]): it needs {size}.")
        if not isinstance(self.extra, Mapping):
            raise TypeError(f"extra must be a dict, got {type(self.extra).__name__}.")

    def logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """Profile logits for pooled hidden states [rows, hidden] -> [rows, profiles] (float32)."""
        features = (pooled.float() - self.feature_mean.to(pooled.device)) / self.feature_std.to(pooled.device)
        return features @ self.weight.to(pooled.device).T + self.bias.to(pooled.device)

    def choose(self, pooled: torch.Tensor) -> list[str]:
        """The profile each row of `pooled` [rows, hidden] is routed to."""
        return [self.profiles[int(i)] for i in self.logits(pooled).argmax(-1)]

    def to_dict(self) -> dict:
        """Plain JSON-able form; float32 values survive the round trip through Python floats exactly."""
        return {"format": ROUTER_FORMAT, "router_layer": self.router_layer, "profiles": list(self.profiles),
                "skip_sets": {name: list(map(int, layers)) for name, layers in self.skip_sets.items()},
                "weight": self.weight.float().tolist(), "bias": self.bias.float().tolist(),
                "feature_mean": self.feature_mean.float().tolist(), "feature_std": self.feature_std.float().tolist(),
                "extra": self.extra}

    @classmethod
    def from_dict(cls, data: dict) -> "AttentionRouter":
        """Inverse of `to_dict`; a ValueError names a missing field or an unknown format."""
        if data.get("format") != ROUTER_FORMAT:
            raise ValueError(f"Unknown router format {data.get('format')!r}; this code reads format {ROUTER_FORMAT}.")
        try:
            return cls(router_layer=int(data["router_layer"]), profiles=list(data["profiles"]),
                       skip_sets={name: [int(i) for i in layers] for name, layers in data["skip_sets"].items()},
                       weight=torch.tensor(data["weight"], dtype=torch.float32),
                       bias=torch.tensor(data["bias"], dtype=torch.float32),
                       feature_mean=torch.tensor(data["feature_mean"], dtype=torch.float32),
                       feature_std=torch.tensor(data["feature_std"], dtype=torch.float32),
                       extra=dict(data.get("extra", {})))
        except KeyError as missing:
            raise ValueError(f"The router description lacks the field {missing}.") from None


def skip_candidates(model: nn.Module, router_layer: int) -> list[int]:
    """Blocks whose attention an adaptive model may skip: those after `router_layer` that still have their
    attention, except the first such block of each attention type (the KV cache reads the past length and
    the mask sizes from the slots those fill). Blocks whose attention is bypassed for good
    (`utils.bypass.bypass_attention`) are never candidates: they have no attention left to skip.

    Raises a ValueError when `router_layer` is out of range or leaves nothing to skip.
    """
    blocks = decoder_layers(model)
    n_layers = len(blocks)
    if isinstance(router_layer, bool) or not isinstance(router_layer, int) or not 0 <= router_layer < n_layers:
        raise ValueError(f"`router_layer` must be a block index in 0..{n_layers - 2} (this model has {n_layers} "
                         f"blocks), got {router_layer!r}.")
    types = attention_types(model.config, n_layers)
    static = set(statically_bypassed(blocks))
    with_attention = [i for i in range(n_layers) if i not in static]
    first_of_type = {next(i for i in with_attention if types[i] == kind)
                     for kind in {types[i] for i in with_attention}}
    candidates = [i for i in with_attention if i > router_layer and i not in first_of_type]
    if not candidates:
        raise ValueError(f"With router_layer={router_layer}, no attention sublayer is left to skip: the router must "
                         f"read an earlier block (this model has {n_layers} blocks; blocks that open an attention "
                         "type are never skipped).")
    return candidates


def _check_router_type(router: object) -> None:
    if not isinstance(router, AttentionRouter):
        raise TypeError(f"router must be an AttentionRouter (see fit_router), got {type(router).__name__}.")


def check_router(model: nn.Module, router: AttentionRouter) -> None:
    """Validate a router against a model: profiles, skip sets inside the candidates, matching shapes."""
    _check_router_type(router)
    check_module("model", model)
    candidates = set(skip_candidates(model, router.router_layer))
    if not router.profiles or len(set(router.profiles)) != len(router.profiles):
        raise ValueError(f"The router needs distinct profile names, got {router.profiles!r}.")
    if set(router.skip_sets) != set(router.profiles):
        raise ValueError(f"skip_sets has profiles {sorted(router.skip_sets)} but the router has {router.profiles}.")
    for name, layers in router.skip_sets.items():
        bad = [i for i in layers if i not in candidates]
        if bad:
            raise ValueError(f"Profile {name!r} skips blocks {bad}, which cannot be skipped with router_layer="
                             f"{router.router_layer}: allowed are {sorted(candidates)}.")
        if len(set(layers)) != len(layers):
            raise ValueError(f"Profile {name!r} lists a block twice: {layers}.")
    hidden = model.config.hidden_size
    shapes = {"weight": (len(router.profiles), hidden), "bias": (len(router.profiles),),
              "feature_mean": (hidden,), "feature_std": (hidden,)}
    for name, shape in shapes.items():
        if tuple(getattr(router, name).shape) != shape:
            raise ValueError(f"router.{name} has shape {tuple(getattr(router, name).shape)}, expected {shape} "
                             f"(hidden size {hidden}, {len(router.profiles)} profiles).")


# ---------------------------------------------------------------------------------------------------
# Installing the router on a model
# ---------------------------------------------------------------------------------------------------

class AdaptiveBypass:
    """The state of an adaptive model: its router, hooks, the blocks' own classes and the current decision.

    Kept on the model as `model.adaptive_bypass` (a plain attribute, not a submodule, so the model's state
    dict and `save_pretrained` files are those of the base model). `last_profiles` holds the profile each
    row of the last prompt was routed to, `skip_set` the attention sublayers skipped since that prompt.
    """

    def __init__(self, model: nn.Module, router: AttentionRouter):
        _check_router_type(router)
        check_module("model", model)
        self.router = router
        self.blocks = decoder_layers(model)
        self.candidates = skip_candidates(model, router.router_layer)
        self.block_classes = {i: type(self.blocks[i]) for i in self.candidates}
        self.skip_set: list[int] = []
        self.last_profiles: list[str] = []
        self.decide_now = False
        self.real_tokens: torch.Tensor | None = None
        self.handles: list = []

    def apply(self, skip_set: list[int]) -> None:
        """Make blocks in `skip_set` run their MLP branch only and every other candidate its full forward."""
        for index, block_class in self.block_classes.items():
            self.blocks[index].__class__ = bypassed_block_class(block_class) if index in skip_set else block_class
        self.skip_set = sorted(skip_set)

    def on_model_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Before each forward: a call without a cache or with an empty one starts a new input, so decide."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self.decide_now = cache is None or cache.get_seq_length() == 0
        mask = kwargs.get("attention_mask")
        self.real_tokens = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def on_router_block(self, module: nn.Module, args: tuple, output) -> None:
        """After block `router_layer` of a new input: pool, route, and set the skip set for the batch."""
        if not self.decide_now:
            return
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        real = self.real_tokens
        if real is None or real.shape != hidden.shape[:2]:
            real = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        weights = real.to(hidden.device, torch.float32).unsqueeze(-1)
        pooled = (hidden.float() * weights).sum(1) / weights.sum(1).clamp(min=1)
        self.last_profiles = self.router.choose(pooled)
        chosen = [set(self.router.skip_sets[name]) for name in self.last_profiles]
        self.apply(sorted(set.intersection(*chosen)))
        self.decide_now = False


def make_adaptive(model: nn.Module, router: AttentionRouter) -> nn.Module:
    """Install `router` on `model` in place and return the model, now an adaptive-bypass model.

    Adds a forward pre-hook on the decoder stack `model.model` (notes whether a call starts a new input, and its attention mask)
    and a forward hook on block `router.router_layer` (routes and applies the skip set). Nothing is copied
    and no weight changes; `remove_adaptive` undoes it. Works with `generate()` (one skip set per batch;
    see the module docstring). Raises a ValueError for a router that does not fit the model, for a model that
    already has a router, or for a model inside `attention_skipped`. A model whose attention is bypassed
    for good in some blocks (`utils.bypass.bypass_attention`) can take a router: those blocks are simply
    not candidates (`skip_candidates`).
    """
    _check_router_type(router)
    check_module("model", model)
    if getattr(model, "adaptive_bypass", None) is not None:
        raise ValueError("This model already has an adaptive router; call remove_adaptive(model) first.")
    skipped = sorted(set(bypassed_layers(model)) - set(statically_bypassed(decoder_layers(model))))
    if skipped:
        raise ValueError(f"The attention of blocks {skipped} is skipped for now (inside attention_skipped); "
                         "install the router outside that block.")
    check_router(model, router)
    blocks = decoder_layers(model)
    for index in sorted({i for layers in router.skip_sets.values() for i in layers}):
        attention_only_modules(blocks[index])  # raises when a block's attention cannot be found
    state = AdaptiveBypass(model, router)
    try:
        inner = getattr(model, "model", model)  # the decoder stack: also seen when it is called directly
        state.handles.append(inner.register_forward_pre_hook(state.on_model_call, with_kwargs=True))
        state.handles.append(blocks[router.router_layer].register_forward_hook(state.on_router_block))
    except BaseException:
        for handle in state.handles:
            handle.remove()
        raise
    model.adaptive_bypass = state
    return model


def remove_adaptive(model: nn.Module) -> nn.Module:
    """Remove the router installed by `make_adaptive`: hooks gone, every block back to its own class."""
    check_module("model", model, allow_meta=True)
    state = getattr(model, "adaptive_bypass", None)
    if state is None:
        raise ValueError("This model has no adaptive router to remove.")
    try:
        for handle in state.handles:
            handle.remove()
    finally:
        state.apply([])
        del model.adaptive_bypass
    return model


def adaptive_state(model: nn.Module) -> AdaptiveBypass:
    """The `AdaptiveBypass` state of an adaptive model, or a ValueError for a model without a router."""
    state = getattr(model, "adaptive_bypass", None)
    if state is None:
        raise ValueError("This model has no adaptive router: build one with make_adaptive(model, router).")
    return state


def save_adaptive(model: nn.Module, folder: str | Path, tokenizer=None) -> Path:
    """Save an adaptive model: the base model's `save_pretrained` files plus `adaptive_router.json`.

    The router file is written atomically (readers never see half of it). The weights folder is an
    ordinary transformers folder: a plain `from_pretrained` loads the base model, `load_adaptive` the
    adaptive one. The tokenizer is saved too when given. Returns the folder.
    """
    state = adaptive_state(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    skip_set = list(state.skip_set)
    state.apply([])  # save the blocks under their own classes, whatever the last input chose
    try:
        if statically_bypassed(decoder_layers(model)):
            save_bypassed(model, folder, tokenizer)
        else:
            model.save_pretrained(folder)
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)
    finally:
        state.apply(skip_set)
    atomic_write_text(folder / ROUTER_FILE, json.dumps(state.router.to_dict()))
    return folder


def load_adaptive(folder: str | Path, **kwargs) -> nn.Module:
    """Load a folder written by `save_adaptive`: `AutoModelForCausalLM.from_pretrained(folder, **kwargs)` in
    eval mode with its router installed (for a model also bypassed for good, the loader class of
    `utils.bypass_modeling`, so no remote code runs). Same logits and routing decisions as the saved model."""
    from transformers import AutoModelForCausalLM

    folder = check_folder("folder", folder)
    path = folder / ROUTER_FILE
    if not path.is_file():
        raise ValueError(f"folder {str(folder)!r} has no {ROUTER_FILE}: it was not saved by save_adaptive.")
    router = AttentionRouter.from_dict(json.loads(path.read_text()))
    config = json.loads((Path(folder) / "config.json").read_text())
    if config.get(BYPASSED_LAYERS_KEY):  # also bypassed for good: the course's own loader class, no remote code
        kwargs.pop("trust_remote_code", None)
        model = AttentionBypassedForCausalLM.from_pretrained(str(folder), **kwargs).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs).eval()
    return make_adaptive(model, router)


# ---------------------------------------------------------------------------------------------------
# Fitting the router on calibration text
# ---------------------------------------------------------------------------------------------------

def profile_skip_orders(importance: Mapping[str, torch.Tensor], candidates: Sequence[int]) -> dict[str, list[int]]:
    """For each profile, the candidate blocks ordered from least to most important attention sublayer.

    `importance` maps a profile to its per-block attention importance (for example
    `sublayer_importance(model, batches)["attention"]` on that kind's calibration text).
    """
    if not isinstance(importance, Mapping):
        raise TypeError(f"importance must be a dict {{profile: per-block scores}}, got {type(importance).__name__}.")
    candidates = check_indices("candidates", candidates)
    orders = {}
    for name, scores in importance.items():
        scores = check_finite(f"importance[{name!r}]", torch.as_tensor(scores))
        bad = [i for i in candidates if not 0 <= i < len(scores)]
        if bad:
            raise ValueError(f"Candidates {bad} are out of range for the {len(scores)} scores of profile {name!r}.")
        orders[name] = sorted(candidates, key=lambda i: (float(scores[i]), i))
    return orders


def skip_loss_curve(model: nn.Module, batches: Sequence[Batch], order: Sequence[int], max_skips: int,
                    progress: bool = True) -> torch.Tensor:
    """Calibration loss when the attention of the first k blocks of `order` is skipped, for k = 0..max_skips.

    Returns Tensor[max_skips + 1]; entry 0 is the unchanged model. Uses `utils.bypass.attention_skipped`
    (nothing is copied). Costs max_skips + 1 passes over `batches`.
    """
    if not 0 <= max_skips <= len(order):
        raise ValueError(f"`max_skips` must be in 0..{len(order)} (the length of `order`), got {max_skips}.")
    losses = [calibration_loss(model, batches)]
    for k in tqdm(range(1, max_skips + 1), desc="skip loss curve", disable=not progress, leave=False):
        with attention_skipped(model, list(order[:k])):
            losses.append(calibration_loss(model, batches))
    return torch.tensor(losses, dtype=torch.float64)


def allocate_skips(loss_curves: Mapping[str, torch.Tensor], budget: float, input_shares: Mapping[str, float],
                   token_weights: Mapping[str, float] | None = None) -> dict[str, int]:
    """How many attention sublayers each profile skips, for an average of `budget` skips per input.

    Chooses k per profile, with sum(input_shares[p] * k[p]) == budget (the average over inputs), minimizing
    sum(token_weights[p] * loss_curves[p][k[p]]): the expected loss of the mix, each profile's mean token loss
    weighted by its share of the mix's tokens (default: its input share). Exhaustive over the combinations
    (fine for a few profiles). Raises a ValueError for a budget outside 0..the shortest curve's range or
    when no combination meets it exactly.
    """
    names = list(loss_curves)
    if set(input_shares) != set(names) or (token_weights is not None and set(token_weights) != set(names)):
        raise ValueError(f"input_shares and token_weights need exactly the profiles {names}.")
    total = sum(input_shares.values())
    if not total > 0 or any(share < 0 for share in input_shares.values()):
        raise ValueError(f"input_shares must be non-negative with a positive sum, got {dict(input_shares)}.")
    shares = {name: input_shares[name] / total for name in names}
    weights = shares if token_weights is None else token_weights
    max_k = min(len(loss_curves[name]) - 1 for name in names)
    if not 0 <= budget <= max_k:
        raise ValueError(f"`budget` must be an average number of skipped sublayers in 0..{max_k}, got {budget}.")
    best, best_loss = None, math.inf
    for ks in itertools.product(*(range(len(loss_curves[name])) for name in names)):
        if abs(sum(shares[n] * k for n, k in zip(names, ks)) - budget) > 1e-9:
            continue
        loss = sum(weights[n] * float(loss_curves[n][k]) for n, k in zip(names, ks))
        if loss < best_loss:
            best, best_loss = ks, loss
    if best is None:
        raise ValueError(f"No whole numbers of skips per profile average exactly {budget} with shares {shares}.")
    return dict(zip(names, map(int, best)))


def pooled_hidden_states(model: nn.Module, batches: Sequence[Batch], router_layer: int,
                         progress: bool = True) -> torch.Tensor:
    """Per row of `batches`, the output of block `router_layer` mean-pooled over its real tokens:
    Tensor[rows, hidden] (float32, CPU). What the router reads, computed the same way.

    Only blocks 0..router_layer run: the later blocks are removed for the duration
    (`utils.depth.layers_removed`) and the LM head is not called, so this costs a fraction of a pass.
    """
    n_layers = len(decoder_layers(model))
    if isinstance(router_layer, bool) or not isinstance(router_layer, int) or not 0 <= router_layer < n_layers:
        raise ValueError(f"`router_layer` must be a block index in 0..{n_layers - 1}, got {router_layer!r}.")
    prepared = ids_and_masks(batches, model_device(model))
    later = list(range(router_layer + 1, n_layers))
    pooled = []
    with evaluating(model), (layers_removed(model, later) if later else nullcontext()), \
            capture_activations(model, layers=[router_layer], points=("block_out",), to_cpu=False) as captured:
        for ids, mask in tqdm(prepared, desc="router features", disable=not progress, leave=False):
            model.model(input_ids=ids, attention_mask=mask, use_cache=False)
            hidden = captured["block_out", router_layer].pop()
            weights = mask.to(hidden.device, torch.float32).unsqueeze(-1)
            pooled.append(((hidden.float() * weights).sum(1) / weights.sum(1).clamp(min=1)).cpu())
    return torch.cat(pooled)


def fit_router(features: Mapping[str, torch.Tensor], router_layer: int, skip_sets: Mapping[str, Sequence[int]],
               l2: float = 1e-2, steps: int = 100) -> AttentionRouter:
    """Fit the router's classifier: multinomial logistic regression from pooled hidden states to profiles.

    `features` maps each profile to its calibration rows' pooled states [rows, hidden] (from
    `pooled_hidden_states`). Features are standardized with the calibration mean and std, classes are
    weighted equally whatever their row counts, and `l2` penalizes the weights. Full-batch L-BFGS from zero
    weights: no randomness, the same features give the same router. The training accuracy is kept in
    `router.extra["train_accuracy"]`.
    """
    names = list(features)
    if len(names) < 2:
        raise ValueError(f"The router needs at least two profiles to choose between, got {names}.")
    if set(skip_sets) != set(names):
        raise ValueError(f"skip_sets has profiles {sorted(skip_sets)}, features has {names}.")
    rows = [check_finite(f"features[{name!r}]", torch.as_tensor(features[name])).float() for name in names]
    if any(r.dim() != 2 or len(r) == 0 or r.shape[1] != rows[0].shape[1] for r in rows):
        raise ValueError("Each profile's features must be a non-empty [rows, hidden] tensor of the same hidden size.")
    x = torch.cat(rows)
    y = torch.cat([torch.full((len(r),), i) for i, r in enumerate(rows)])
    class_weight = torch.tensor([len(x) / (len(names) * len(r)) for r in rows])
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    z = (x - mean) / std
    weight = torch.zeros(len(names), x.shape[1], requires_grad=True)
    bias = torch.zeros(len(names), requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, y, weight=class_weight) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    weight, bias = weight.detach(), bias.detach()
    accuracy = float(((z @ weight.T + bias).argmax(-1) == y).float().mean())
    return AttentionRouter(router_layer=int(router_layer), profiles=names,
                           skip_sets={name: sorted(int(i) for i in skip_sets[name]) for name in names},
                           weight=weight, bias=bias, feature_mean=mean, feature_std=std,
                           extra={"train_accuracy": accuracy})


# ---------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------

def skipped_count(model: nn.Module) -> int:
    """Attention sublayers the model skipped on its last input: the adaptive decision when a router is
    installed, else the statically bypassed blocks."""
    state = getattr(model, "adaptive_bypass", None)
    return len(state.skip_set) if state is not None else len(bypassed_layers(model))


@torch.no_grad()
def per_input_nll(model: nn.Module, inputs: Sequence[torch.Tensor], progress: bool = True) -> list[dict]:
    """Score each input separately (batch of one, so an adaptive model routes each on its own).

    `inputs` are 1-D token-id tensors of at least 2 tokens. Returns one dict per input: "nll" (summed
    next-token negative log-likelihood), "tokens" (tokens scored), "skipped" (attention sublayers skipped),
    and "profile" (the router's choice; None without a router).
    """
    results = []
    with evaluating(model):
        for number, ids in enumerate(tqdm(inputs, desc="scoring inputs", disable=not progress, leave=False)):
            ids = torch.as_tensor(ids)
            if ids.dim() != 1 or len(ids) < 2:
                raise ValueError(f"Input {number} must be a 1-D tensor of at least 2 token ids, got shape "
                                 f"{tuple(ids.shape)}.")
            nll, tokens = batch_nll(model, ids.unsqueeze(0))
            state = getattr(model, "adaptive_bypass", None)
            results.append({"nll": nll, "tokens": tokens, "skipped": skipped_count(model),
                            "profile": state.last_profiles[0] if state is not None else None})
    return results


def perplexity_by_kind(scored: Mapping[str, Sequence[dict]]) -> dict[str, float]:
    """Summaries of `per_input_nll` results grouped by kind of input ({kind: results}).

    Returns, for each kind, its perplexity (token-weighted over its inputs), "mix" (the perplexity of all
    inputs together, token-weighted) and "mean skipped" (attention sublayers skipped, averaged over inputs).
    """
    if not scored or any(len(results) == 0 for results in scored.values()):
        raise ValueError("`scored` needs at least one kind with at least one scored input.")
    summary = {kind: math.exp(sum(r["nll"] for r in results) / sum(r["tokens"] for r in results))
               for kind, results in scored.items()}
    every = [r for results in scored.values() for r in results]
    summary["mix"] = math.exp(sum(r["nll"] for r in every) / sum(r["tokens"] for r in every))
    summary["mean skipped"] = sum(r["skipped"] for r in every) / len(every)
    return summary

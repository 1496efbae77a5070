"""Attention bypass: decoder blocks that keep their MLP and drop their attention sublayer entirely.

Attention sublayers are often far more redundant than MLP sublayers (He et al., 2024, "What Matters in
Transformers? Not All Attention is Needed"): `utils.importance.sublayer_importance` measures both, and the
functions here act on the attention sublayers that matter least.

- `bypass_attention(model, indices)` returns a real, smaller model: the bypassed blocks run only their MLP
  branch, their attention weights (q/k/v/o projections and the norms that serve only attention) are gone
  from the parameters and from the saved files, and the KV cache holds entries for the remaining attention
  layers only. `generate()` works with the cache. The mechanism lives in `utils.bypass_modeling`.
- `save_bypassed(model, folder)` saves it so that `AutoModelForCausalLM.from_pretrained(folder,
  trust_remote_code=True)` loads it back with identical logits. Why remote code: every transformers decoder
  block builds its `self_attn` in `__init__`, so a plain `from_pretrained` would re-create the bypassed
  attention with random weights (it only warns about "newly initialized" weights). The smallest honest
  mechanism is transformers' own one for custom architectures: the folder holds the standard weights and
  config plus `modeling_bypass.py` (a verbatim copy of `utils/bypass_modeling.py`, which imports only torch
  and transformers), and `config.auto_map` points `AutoModelForCausalLM` at its loader class. The loader
  builds the family's own class (LlamaForCausalLM, Qwen3ForCausalLM, ...) with the bypass applied before
  the weights load. No course code is needed to load the folder.
- `attention_zeroed(model, indices)` is the other way, the one that gives no speedup: the attention is
  computed (and its KV cache filled) and then multiplied away. It is kept to measure the difference.
- `attention_skipped(model, indices)` bypasses temporarily, without deleting anything, for searches;
  `select_attention_by_loss` is such a search (greedy on calibration loss).
- Measuring the KV cache (`kv_cache_bytes`, `kv_cache_bytes_per_token`) lives in `utils.speed`.
"""

from __future__ import annotations

import copy
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from .batches import Batch
from .checks import check_folder, check_module
from .bypass_modeling import (
    BYPASSED_LAYERS_KEY,
    LOADER_CLASS,
    MODELING_FILE,
    apply_bypass,
    attention_only_modules,
    bypassed_block_class,
    is_bypassed,
    set_block_class,
    statically_bypassed,
)
from .depth import removable_layers
from .importance import greedy_loss_search
from .models import check_layer_indices, decoder_layers


def bypassed_layers(model: nn.Module) -> list[int]:
    """Indices of the decoder blocks whose attention sublayer is bypassed (empty for an ordinary model)."""
    return [index for index, block in enumerate(decoder_layers(model)) if is_bypassed(block)]


def _bypass_indices(model: nn.Module, indices: Sequence[int]) -> list[int]:
    """Validate the blocks whose attention to bypass: a non-empty list, in range, unique, not yet bypassed,
    each with a findable attention sublayer, and at least one attention sublayer left. Returns them sorted."""
    if isinstance(indices, int) or (isinstance(indices, torch.Tensor) and indices.dim() == 0):
        raise ValueError(f"`indices` must be a list of decoder block indices, got {indices!r}; "
                         f"to bypass a single block write [{int(indices)}].")
    indices = check_layer_indices(model, indices)  # integers only: "12" or [1.0] are refused, not truncated
    if not indices:
        raise ValueError("No attention sublayer to bypass: `indices` is empty.")
    blocks = decoder_layers(model)
    already = [i for i in indices if is_bypassed(blocks[i])]
    if already:
        raise ValueError(f"The attention of blocks {already} is already bypassed (bypassed now: "
                         f"{bypassed_layers(model)}); pass only blocks that still have attention.")
    for index in indices:
        attention_only_modules(blocks[index])  # raises when the attention sublayer cannot be found
    if len(set(indices) | set(bypassed_layers(model))) == len(blocks):
        raise ValueError(f"Cannot bypass every attention sublayer of the {len(blocks)} blocks: at least one must "
                         "remain (without any, nothing tracks the positions in the KV cache).")
    return indices


def bypass_attention(model: nn.Module, indices: Sequence[int], inplace: bool = False) -> nn.Module:
    """Bypass the attention sublayers of decoder blocks `indices` and return the smaller model.

    Each chosen block then computes `x + MLP(norm(x))` only; its attention modules are deleted (parameter
    count, memory and file size go down), and it neither allocates nor fills KV-cache entries. The model
    stays an instance of its transformers class and works with `generate()`. By default the caller's model
    is untouched: a deep copy is made that never copies the attention being dropped. `inplace=True` changes
    and returns `model`. May be called again on a bypassed model to bypass more blocks. Raises a ValueError
    for an empty list, an index out of range or repeated, a block already bypassed, a block whose attention
    cannot be found, or bypassing every attention sublayer.
    """
    check_module("model", model)
    if getattr(model, "adaptive_bypass", None) is not None:
        raise ValueError("This model has an adaptive router, whose skip sets and cache slots refer to its current "
                         "attention sublayers: bypass first and install the router afterwards, or call "
                         "utils.routing.remove_adaptive(model), bypass, and fit a new router on the result.")
    indices = _bypass_indices(model, indices)
    if not inplace:
        blocks = decoder_layers(model)
        placeholder = nn.Identity()  # stands in for the dropped modules in the copy, deleted right after
        memo = {id(getattr(blocks[i], name)): placeholder for i in indices for name in attention_only_modules(blocks[i])}
        model = copy.deepcopy(model, memo)
    apply_bypass(model, indices)
    return model


@contextmanager
def attention_skipped(model: nn.Module, indices: Sequence[int]) -> Iterator[nn.Module]:
    """Temporarily run blocks `indices` without their attention sublayer; restored on exit.

    Inside the block the chosen blocks run exactly the bypassed forward (MLP branch only), but nothing is
    deleted and the KV-cache slots are not renumbered, so use it with `use_cache=False` (scoring, searches).
    Cheap to enter and leave, which is what a search over many candidate sets needs.
    """
    blocks = decoder_layers(model)
    indices = _bypass_indices(model, indices)
    classes = {index: type(blocks[index]) for index in indices}
    try:
        for index in indices:
            set_block_class(blocks[index], bypassed_block_class(classes[index]))
        yield model
    finally:
        for index, block_class in classes.items():
            set_block_class(blocks[index], block_class)


@contextmanager
def attention_zeroed(model: nn.Module, indices: Sequence[int]) -> Iterator[nn.Module]:
    """Zero the output of the attention sublayers of blocks `indices` for the duration of the block.

    The attention is still computed in full (projections, attention, KV cache) and its output is then
    replaced by zeros: the same function as a bypass, none of the savings. This is how the approach that
    gave no speedup worked; the hooks are removed on exit, also when the body raises.
    """
    blocks = decoder_layers(model)
    indices = _bypass_indices(model, indices)

    def zero_output(module, args, output):
        if isinstance(output, tuple):
            return (torch.zeros_like(output[0]), *output[1:])
        return torch.zeros_like(output)

    handles = []
    try:
        for index in indices:
            handles.append(blocks[index].self_attn.register_forward_hook(zero_output))
        yield model
    finally:
        for handle in handles:
            handle.remove()


def modeling_source() -> str:
    """The text of `utils/bypass_modeling.py`, which `save_bypassed` writes into a folder as-is."""
    return (Path(__file__).parent / "bypass_modeling.py").read_text()


def save_bypassed(model: nn.Module, folder: str | Path, tokenizer=None) -> Path:
    """Save a bypassed model so that `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`
    loads it back with identical logits; returns the folder.

    Writes the standard `save_pretrained` files (the bypassed attention is absent from the weights), a
    verbatim copy of `utils/bypass_modeling.py` as `modeling_bypass.py`, and `config.auto_map`
    {"AutoModelForCausalLM": "modeling_bypass.AttentionBypassedForCausalLM"}. The tokenizer is saved too
    when given. Raises a ValueError for a model without bypassed attention (save it with save_pretrained).
    """
    if isinstance(folder, bool) or not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"folder must be a folder path (str or Path), got {type(folder).__name__}.")
    check_module("model", model)
    bypassed = statically_bypassed(decoder_layers(model))
    if not bypassed:
        raise ValueError("This model has no bypassed attention sublayer: save it with model.save_pretrained.")
    if model.config.__dict__.get(BYPASSED_LAYERS_KEY) != bypassed:
        raise ValueError(f"The model's config.{BYPASSED_LAYERS_KEY} = {model.config.__dict__.get(BYPASSED_LAYERS_KEY)} "
                         f"does not match the blocks whose attention is gone ({bypassed}): the model was changed "
                         "behind utils.bypass's back (bypass and remove blocks with utils.bypass / utils.depth).")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    auto_map = dict(getattr(config, "auto_map", None) or {})
    auto_map["AutoModelForCausalLM"] = f"{Path(MODELING_FILE).stem}.{LOADER_CLASS}"
    config.auto_map = auto_map
    model.save_pretrained(folder)
    (folder / MODELING_FILE).write_text(modeling_source())
    saved = json.loads((folder / "config.json").read_text())
    if saved.get(BYPASSED_LAYERS_KEY) != bypassed or saved.get("auto_map") != auto_map:
        raise RuntimeError(f"config.json in {folder} does not record the bypass; the saved model would not load back.")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def load_bypassed(folder: str | Path, **kwargs) -> nn.Module:
    """`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, **kwargs)`, in eval mode.

    Only a folder written by `save_bypassed` (or one you trust) should be loaded this way: remote code runs
    the `modeling_bypass.py` the folder holds. `folder` must exist (a name is never looked up on the Hub).
    """
    from transformers import AutoModelForCausalLM

    folder = check_folder("folder", folder)
    return AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, **kwargs).eval()


# ---------------------------------------------------------------------------------------------------
# Choosing the attention sublayers to bypass
# ---------------------------------------------------------------------------------------------------

def select_attention_by_loss(model: nn.Module, batches: Sequence[Batch], n: int, protect_first: int = 0,
                             protect_last: int = 0, progress: bool = True) -> list[int]:
    """Choose `n` attention sublayers to bypass, greedily by calibration loss; indices in the order chosen.

    Each step tries every remaining unprotected block: the sublayers chosen so far plus the candidate are
    skipped temporarily (`attention_skipped`), the calibration loss is measured, and the candidate with
    the lowest loss joins. Later steps therefore see the effect of earlier choices, which a one-shot
    importance ranking cannot. Costs about n * (number of blocks) forward passes over `batches`.
    """
    n_layers = len(decoder_layers(model))
    already = set(bypassed_layers(model))
    candidates = [i for i in removable_layers(n_layers, n, protect_first, protect_last) if i not in already]
    if n > len(candidates) or len(already) + n >= n_layers:
        raise ValueError(f"Cannot choose {n} attention sublayers: {len(candidates)} candidates remain and at least "
                         "one attention sublayer must stay.")
    return greedy_loss_search(model, batches, candidates, n, attention_skipped, desc="attention bypass search",
                              progress=progress)

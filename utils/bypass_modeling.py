"""The modeling code of attention bypass: decoder blocks that keep their MLP and have no attention at all.

This file is self-contained on purpose (it imports only torch and transformers): `utils.bypass` copies it,
verbatim, as `modeling_bypass.py` into every folder it saves, and transformers' remote-code loader imports
it from there. One source of truth serves the model in memory and the model loaded back from disk.

How a bypass is done, on any Llama / Qwen 2-3 / Mistral / Gemma 3 style decoder block:

- The block's class is swapped for a subclass (`AttentionBypassed<Family>DecoderLayer`) whose forward is
  `residual + MLP branch` only: no attention norm, no q/k/v/o projection, no attention, no residual add of
  a zero tensor. The class stays a subclass of the family's block, so hooks and isinstance checks still see
  a decoder block.
- The modules that serve only attention are deleted, so their weights leave the model and its state dict:
  `self_attn` and `input_layernorm`, and in Gemma 3 (which normalizes the attention output) also
  `post_attention_layernorm`. Llama's `post_attention_layernorm` is the MLP's input norm and stays.
- The remaining attention modules get new KV-cache slots (`layer_idx`), numbered so that the cache the
  model builds from its unchanged config is filled without gaps: within each attention type ("full" or
  "sliding"), the i-th remaining layer of that type writes the slot of the i-th layer of that type. So
  the first slot of each type is filled (transformers reads the past length from slot 0 and picks the
  mask sizes from the first full and first sliding slot), each slot keeps its type (a sliding layer never
  writes into a full-attention slot), and the slots no remaining layer uses stay empty: a DynamicCache
  allocates nothing for them. The KV cache therefore shrinks by exactly the bypassed share.
- The list of bypassed blocks is stored in the config as `bypassed_attention_layers`. The loader class
  `AttentionBypassedForCausalLM` (the target of the config's `auto_map`) builds the family's model class,
  applies the same bypass in `__init__` before any weight is loaded, and loads the saved weights into it.
"""

from __future__ import annotations

import types
from functools import lru_cache

import torch
from torch import nn

BYPASSED_LAYERS_KEY = "bypassed_attention_layers"
MODELING_FILE = "modeling_bypass.py"
LOADER_CLASS = "AttentionBypassedForCausalLM"


# Entry checks. This file cannot import `utils.checks` (a saved folder holds it alone), so it has these few
# of its own, worded like `utils.checks`: a TypeError for a wrong type, a ValueError out of range, each
# naming the argument.

def _check_module(name: str, value: object) -> nn.Module:
    if not isinstance(value, nn.Module):
        raise TypeError(f"{name} must be a torch module (nn.Module), got {type(value).__name__}.")
    return value


def _check_module_class(name: str, value: object) -> type:
    if not isinstance(value, type) or not issubclass(value, nn.Module):
        raise TypeError(f"{name} must be a torch module class (a subclass of nn.Module, such as "
                        f"LlamaDecoderLayer), got {type(value).__name__} {value!r}.")
    return value


def _check_indices(name: str, values: object, upper: int) -> list[int]:
    """Integer block indices in 0..upper-1, without duplicates (a string or a float is not an index)."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name} must be a collection of integer block indices, got {type(values).__name__} {values!r}.")
    result = []
    for value in values:
        if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point() \
                and value.dtype != torch.bool:
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) and type(value).__name__ not in _NUMPY_INTEGERS:
            raise TypeError(f"{name} must hold integers only, got {type(value).__name__} {value!r}.")
        result.append(int(value))
    bad = [value for value in result if not 0 <= value < upper]
    if bad:
        raise ValueError(f"{name} has indices out of range {bad}: valid indices are 0..{upper - 1}.")
    if len(set(result)) != len(result):
        raise ValueError(f"Duplicate indices in {name}: each index may appear once, got {result}.")
    return result


_NUMPY_INTEGERS = {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"}


def _blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks at model.model.layers (the layout of every family this file supports)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"Cannot find the decoder blocks of {type(model).__name__}: expected model.model.layers.")
    return layers


def attention_only_modules(block: nn.Module) -> list[str]:
    """Names of the submodules of a decoder block that serve only its attention sublayer.

    `self_attn` and the norm before it (`input_layernorm`); in the Gemma layout, where the MLP has its own
    `pre_feedforward_layernorm`, also `post_attention_layernorm`, which normalizes the attention output.
    Raises a ValueError when the block has no `self_attn`, or no norm before its MLP.
    """
    _check_module("block", block)
    if not isinstance(getattr(block, "self_attn", None), nn.Module):
        raise ValueError(f"{type(block).__name__} has no 'self_attn' module: its attention sublayer cannot be found, "
                         "so it cannot be bypassed (supported: Llama, Qwen 2/3, Mistral and Gemma 3 style blocks).")
    names = ["self_attn", "input_layernorm"]
    if hasattr(block, "pre_feedforward_layernorm"):
        names.append("post_attention_layernorm")
    elif not hasattr(block, "post_attention_layernorm"):
        raise ValueError(f"{type(block).__name__} has no norm before its MLP (post_attention_layernorm or "
                         "pre_feedforward_layernorm): its MLP branch cannot be run on its own.")
    return [name for name in names if hasattr(block, name)]


class AttentionBypassedBlock(nn.Module):
    """Forward of a decoder block whose attention sublayer is bypassed: only the MLP branch runs.

    Mixed in front of the family's block class by `bypassed_block_class`, so the block keeps its class
    identity. It reads the MLP's norms by the family's names (Gemma: pre/post_feedforward_layernorm;
    Llama, Qwen, Mistral: post_attention_layernorm before the MLP) and ignores every attention argument
    (mask, positions, cache).
    """

    attention_bypassed = True  # the mark `is_bypassed` reads: this class may also come from a saved folder's copy

    def __init__(self, config, *args, **kwargs):
        """Built only as part of a family's class (`bypassed_block_class`), with that family's arguments."""
        if type(self) is AttentionBypassedBlock:
            raise TypeError("AttentionBypassedBlock is a mix-in: build bypassed_block_class(<family block class>)"
                            "(config, ...) instead, or bypass a model's blocks with utils.bypass.bypass_attention.")
        super().__init__(config, *args, **kwargs)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        residual = hidden_states
        if hasattr(self, "pre_feedforward_layernorm"):
            hidden_states = self.pre_feedforward_layernorm(hidden_states)
            hidden_states = self.mlp(hidden_states)
            hidden_states = self.post_feedforward_layernorm(hidden_states)
        else:
            hidden_states = self.post_attention_layernorm(hidden_states)
            hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


@lru_cache(maxsize=None)
def bypassed_block_class(block_class: type) -> type:
    """The subclass of a decoder block class whose forward is the MLP branch only (one class per family)."""
    _check_module_class("block_class", block_class)
    return type(f"AttentionBypassed{block_class.__name__}", (AttentionBypassedBlock, block_class), {})


def set_block_class(block: nn.Module, block_class: type) -> None:
    """Give `block` the class `block_class` (same attributes, new forward), also under an accelerate hook.

    A model loaded with a `device_map` has accelerate hooks that saved each block's original bound
    forward as `_old_forward` and call that; it must follow the class change, or the old forward runs.
    `block_class` must be the block's own class or a class derived from it (its attributes stay valid).
    """
    _check_module("block", block)
    _check_module_class("block_class", block_class)
    family = [cls for cls in type(block).__mro__ if not getattr(cls, "attention_bypassed", False)][0]
    if not issubclass(block_class, family):
        raise TypeError(f"block_class {block_class.__name__} is not derived from the block's family class "
                        f"{family.__name__}: the block's attributes would not fit its forward.")
    block.__class__ = block_class
    if hasattr(block, "_hf_hook") and hasattr(block, "_old_forward"):
        block._old_forward = types.MethodType(block_class.forward, block)


def is_bypassed(block: nn.Module) -> bool:
    """Whether a decoder block's attention sublayer is bypassed (also for blocks built by the copy of this
    file that transformers imports from a saved folder, whose classes are distinct objects)."""
    _check_module("block", block)
    return _marked_bypassed(block)


def _marked_bypassed(block: object) -> bool:
    return getattr(type(block), "attention_bypassed", False) is True


def attention_types(config, n_layers: int) -> list[str]:
    """Attention type of each block, as the KV cache sees it: `config.layer_types` when the family has it,
    else one type for all blocks ("sliding_attention" when the config sets a sliding window)."""
    if isinstance(n_layers, bool) or not isinstance(n_layers, int):
        raise TypeError(f"n_layers must be an integer, got {type(n_layers).__name__} {n_layers!r}.")
    if n_layers < 1:
        raise ValueError(f"n_layers must be an integer >= 1 (the number of decoder blocks), got {n_layers}.")
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return [str(kind) for kind in layer_types]
    kind = "sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"
    return [kind] * n_layers


def cache_slots(types: list[str], bypassed: set[int]) -> dict[int, int]:
    """KV-cache slot of every block that keeps its attention: {block index: slot}.

    Within each attention type, the i-th kept block of that type gets the slot of the i-th block of that
    type, so every slot keeps its type and the first slot of each type that is still used is filled.
    `bypassed` holds block indices in 0..len(types)-1.
    """
    bypassed = set(_check_indices("bypassed", bypassed, len(types)))
    slots: dict[int, int] = {}
    for kind in dict.fromkeys(types):
        same_type = [index for index, other in enumerate(types) if other == kind]
        kept = [index for index in same_type if index not in bypassed]
        slots.update(zip(kept, same_type))
    return slots


def statically_bypassed(blocks) -> list[int]:
    """Indices of the blocks whose attention is bypassed for good: bypassed class and no `self_attn` left.

    Blocks that only run the bypassed forward for a while (inside `attention_skipped`, or skipped by an
    adaptive router) keep their attention module and are not counted: they keep their KV-cache slot.
    `blocks` is the model's decoder blocks (an nn.ModuleList or a list; a None entry, a block being
    removed, counts as not bypassed).
    """
    if isinstance(blocks, (str, bytes, nn.Module)) and not isinstance(blocks, nn.ModuleList) \
            or not hasattr(blocks, "__iter__"):
        raise TypeError(f"blocks must be a list of decoder blocks (model.model.layers), got {type(blocks).__name__}.")
    return [index for index, block in enumerate(blocks) if _marked_bypassed(block) and not hasattr(block, "self_attn")]


def check_attention_remains(types: list[str], bypassed: set[int]) -> None:
    """Raise a ValueError unless some attention sublayer of block 0's type stays (the model reads the
    cached length from the first KV-cache slot, which a bypassed model fills from the first kept block of
    that type)."""
    if all(index in bypassed for index, kind in enumerate(types) if kind == types[0]):
        raise ValueError(f"At least one attention sublayer of type {types[0]!r} (the type of block 0) must remain: "
                         "the model reads the cached length from the first KV-cache slot.")


def apply_bypass(model: nn.Module, indices: list[int]) -> None:
    """Bypass the attention sublayers of blocks `indices` in place (low level: `utils.bypass` validates).

    Blocks already bypassed are left as they are; afterwards every kept attention module is given its cache
    slot for the full set of bypassed blocks, and the config records that set. `apply_bypass(model, [])`
    only renumbers the slots and the config (what a block removal needs). Everything is checked before
    anything changes: raises a ValueError when a block's attention cannot be found, when a kept attention
    has no integer `layer_idx`, or when no attention of block 0's type would remain (the model reads the
    past length from cache slot 0, which would then stay empty).
    """
    blocks = _blocks(model)
    indices = _check_indices("indices", indices, len(blocks))
    bypassed = set(statically_bypassed(blocks)) | set(indices)
    types = attention_types(model.config, len(blocks))
    check_attention_remains(types, bypassed)
    removed = {index: attention_only_modules(blocks[index]) for index in indices if not is_bypassed(blocks[index])}
    for index in range(len(blocks)):
        attention = getattr(blocks[index], "self_attn", None)
        if index not in bypassed and not isinstance(getattr(attention, "layer_idx", None), int):
            raise ValueError(f"The attention module of block {index} ({type(attention).__name__}) has no integer "
                             "'layer_idx': its KV-cache slot cannot be set.")
    for index, names in removed.items():
        block = blocks[index]
        set_block_class(block, bypassed_block_class(type(block)))
        for name in names:
            delattr(block, name)
    for index, slot in cache_slots(types, bypassed).items():
        blocks[index].self_attn.layer_idx = slot
    setattr(model.config, BYPASSED_LAYERS_KEY, sorted(bypassed))


@lru_cache(maxsize=None)
def bypassed_model_class(model_class: type) -> type:
    """The subclass of a family's *ForCausalLM class that bypasses, in __init__ and so before any weight is
    loaded, the attention of the blocks listed in `config.bypassed_attention_layers`."""
    _check_module_class("model_class", model_class)

    def __init__(self, config, *args, **kwargs):
        model_class.__init__(self, config, *args, **kwargs)
        apply_bypass(self, list(getattr(config, BYPASSED_LAYERS_KEY, None) or []))

    return type(f"AttentionBypassed{model_class.__name__}", (model_class,), {"__init__": __init__})


class AttentionBypassedForCausalLM:
    """Loader named by `auto_map` in a saved bypassed model's config.

    `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` imports this file from the folder
    and calls `from_pretrained` here: it looks up the family's causal-LM class from the config (Llama, Qwen,
    Gemma, ...), derives `bypassed_model_class` from it and loads the weights into that. The result is an
    instance of the family's class, with the bypassed blocks' attention absent from its parameters.
    """

    def __new__(cls, config, *args, **kwargs):
        """`AttentionBypassedForCausalLM(config)`: a fresh bypassed model of the config's family, as `from_config`
        (an instance of the family's class, not of this loader)."""
        from transformers import PretrainedConfig

        if not isinstance(config, PretrainedConfig):
            raise TypeError(f"config must be a transformers model config (PretrainedConfig), got {type(config).__name__}.")
        return cls._from_config(config, **kwargs)

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModelForCausalLM") -> None:
        """Nothing to register: the returned model is an instance of a transformers class."""

    @classmethod
    def _family_class(cls, config) -> type:
        from transformers import MODEL_FOR_CAUSAL_LM_MAPPING  # public: config class -> model class

        return bypassed_model_class(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)])

    @classmethod
    def from_pretrained(cls, path, *args, config=None, **kwargs):
        """Load a saved bypassed model: the family's class with the bypass applied before the weights load."""
        from transformers import AutoConfig

        kwargs.pop("trust_remote_code", None)
        kwargs.pop("adapter_kwargs", None)
        if config is None:
            config = AutoConfig.from_pretrained(path)
        return cls._family_class(config).from_pretrained(path, *args, config=config, **kwargs)

    @classmethod
    def _from_config(cls, config, **kwargs):
        """`AutoModelForCausalLM.from_config(config, trust_remote_code=True)`: a fresh bypassed model."""
        kwargs.pop("trust_remote_code", None)
        return cls._family_class(config)._from_config(config, **kwargs)

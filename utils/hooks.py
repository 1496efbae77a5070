"""Forward hooks that capture what flows through decoder blocks, always removed afterwards.

Capture points of decoder block `i` (Llama, Qwen, Mistral, Gemma layout):

- "block_in":  the residual stream entering the block
- "attn_in":   the normalized hidden state the attention sublayer reads
- "attn_out":  what the attention sublayer returns (before the residual add)
- "resid_mid": the residual stream after the attention residual add (the input of the norm before the MLP)
- "mlp_in":    the normalized hidden state the MLP reads
- "mlp_act":   the MLP's intermediate activation act(gate) * up, the input of down_proj
- "mlp_out":   what the MLP returns (before the residual add)
- "block_out": the residual stream leaving the block
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from .checks import check_module
from .models import check_layer_indices, decoder_layers

POINTS = ("block_in", "attn_in", "attn_out", "resid_mid", "mlp_in", "mlp_act", "mlp_out", "block_out")

Callback = Callable[[str, int, torch.Tensor], None]


def _first_tensor(value) -> torch.Tensor:
    """Decoder modules return a tensor or a tuple whose first item is the hidden states."""
    return value[0] if isinstance(value, (tuple, list)) else value


def _hidden_states_argument(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _norm_before_mlp(layer: nn.Module) -> nn.Module:
    """The norm whose input is the residual stream after attention: Gemma's pre_feedforward_layernorm,
    else the post_attention_layernorm of Llama, Qwen and Mistral (which in those families normalizes the
    MLP input, despite its name)."""
    for name in ("pre_feedforward_layernorm", "post_attention_layernorm"):
        if hasattr(layer, name):
            return getattr(layer, name)
    raise ValueError(f"{type(layer).__name__} has no norm before its MLP; 'resid_mid' cannot be captured.")


def _submodule(layer: nn.Module, name: str, point: str) -> nn.Module:
    module = layer
    for part in name.split("."):
        module = getattr(module, part, None)
        if module is None:
            raise ValueError(f"{type(layer).__name__} has no '{name}' module, needed to capture {point!r}.")
    return module


class Captured(dict):
    """Captured tensors: `captured[point, layer]` is a list with one tensor per forward pass."""

    def stacked(self, point: str, layer: int, dim: int = 0) -> torch.Tensor:
        """All captures of one point and layer concatenated along `dim` (the batch dimension by default)."""
        return torch.cat(self[point, layer], dim=dim)


@contextmanager
def capture_activations(model: nn.Module, layers: list[int] | None = None,
                        points: tuple[str, ...] = ("block_in", "block_out"),
                        callback: Callback | None = None, to_cpu: bool = True) -> Iterator[Captured]:
    """Capture tensors at chosen points of chosen decoder blocks during the forward passes in the block.

    `layers` defaults to every block. Without `callback`, the tensors are detached (and moved to the CPU
    when `to_cpu`) and collected in the yielded `Captured` dict. With `callback(point, layer, tensor)`,
    nothing is stored: each tensor is handed to the callback as it is produced, which lets importance
    scores be accumulated over many batches in constant memory. Every hook is removed when the block
    exits, also when a forward pass inside it raises.
    """
    unknown = [p for p in points if p not in POINTS]
    if unknown:
        raise ValueError(f"Unknown capture points {unknown}; known points: {', '.join(POINTS)}")
    blocks = decoder_layers(model)
    layers = check_layer_indices(model, list(range(len(blocks))) if layers is None else layers, name="layers")
    captured = Captured()

    def record(point: str, index: int, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        if callback is not None:
            callback(point, index, tensor)
        else:
            captured.setdefault((point, index), []).append(tensor.cpu() if to_cpu else tensor)

    def pre_hook(point: str, index: int):
        def hook(module, args, kwargs):
            record(point, index, _hidden_states_argument(args, kwargs))
        return hook

    def post_hook(point: str, index: int):
        def hook(module, args, kwargs, output):
            record(point, index, _first_tensor(output))
        return hook

    handles = []
    try:
        for index in layers:
            layer = blocks[index]
            for point in points:
                if point == "block_in":
                    handles.append(layer.register_forward_pre_hook(pre_hook(point, index), with_kwargs=True))
                elif point == "block_out":
                    handles.append(layer.register_forward_hook(post_hook(point, index), with_kwargs=True))
                elif point == "attn_in":
                    module = _submodule(layer, "self_attn", point)
                    handles.append(module.register_forward_pre_hook(pre_hook(point, index), with_kwargs=True))
                elif point == "attn_out":
                    module = _submodule(layer, "self_attn", point)
                    handles.append(module.register_forward_hook(post_hook(point, index), with_kwargs=True))
                elif point == "resid_mid":
                    module = _norm_before_mlp(layer)
                    handles.append(module.register_forward_pre_hook(pre_hook(point, index), with_kwargs=True))
                elif point == "mlp_in":
                    module = _submodule(layer, "mlp", point)
                    handles.append(module.register_forward_pre_hook(pre_hook(point, index), with_kwargs=True))
                elif point == "mlp_out":
                    module = _submodule(layer, "mlp", point)
                    handles.append(module.register_forward_hook(post_hook(point, index), with_kwargs=True))
                elif point == "mlp_act":
                    module = _submodule(layer, "mlp.down_proj", point)
                    handles.append(module.register_forward_pre_hook(pre_hook(point, index), with_kwargs=True))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def count_hooks(model: nn.Module) -> int:
    """Number of forward and forward-pre hooks still registered anywhere in `model` (0 after a capture)."""
    check_module("model", model)
    return sum(len(module._forward_hooks) + len(module._forward_pre_hooks) for module in model.modules())

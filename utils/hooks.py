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
    scores be accumulated over many batches in constant memory; it runs with autocast switched off, so a
    pass under bfloat16 autocast hands it bfloat16 activations but its own sums and products are not
    rounded to bfloat16. Every hook is removed when the block exits, also when a forward pass inside it
    raises.
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
            # the callback's arithmetic (sums, Gram matrices) runs in the tensor's own precision, also when the
            # forward pass runs under autocast (utils.models.compute_autocast), which would round its products
            with torch.autocast(tensor.device.type, enabled=False):
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


@contextmanager
def block_input_replaced(model: nn.Module, layer: int, inputs: list[torch.Tensor]) -> Iterator[list[int]]:
    """Feed decoder block `layer` recorded residual-stream tensors instead of what reaches it.

    At the k-th forward pass inside the `with` block, the hidden states entering block `layer` are replaced
    by `inputs[k]` (same shape, dtype and device). With the blocks before `layer` removed
    (`utils.depth.layers_removed`), this runs a model from block `layer` on states recorded earlier with
    `capture_activations(..., points=("block_in",))`: how `utils.importance.greedy_loss_search` skips the
    blocks a trial leaves unchanged. Yields a one-item list holding how many inputs were used so far, so the
    caller can check that every recorded pass was replayed. A forward pass with no input left, or one whose
    hidden states differ in shape, dtype or device from the recorded ones, raises a RuntimeError. The hook is
    removed on exit, also when a forward pass raises.
    """
    blocks = decoder_layers(model)
    layer = check_layer_indices(model, [layer], name="layer")[0]
    if not isinstance(inputs, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError(f"inputs must be a list of tensors (one per forward pass), got {type(inputs).__name__}.")
    used = [0]

    def replace(module, args, kwargs):
        arriving = _hidden_states_argument(args, kwargs)
        if used[0] >= len(inputs):
            raise RuntimeError(f"Block {layer} was run {used[0] + 1} times but only {len(inputs)} recorded inputs "
                               "were given: the replayed work must run the model as often as the recorded work.")
        recorded = inputs[used[0]]
        if (recorded.shape, recorded.dtype, recorded.device) != (arriving.shape, arriving.dtype, arriving.device):
            raise RuntimeError(f"Recorded input {used[0]} of block {layer} is {tuple(recorded.shape)} {recorded.dtype} "
                               f"on {recorded.device}, but the forward pass brings {tuple(arriving.shape)} "
                               f"{arriving.dtype} on {arriving.device}: replay the same batches in the same order.")
        used[0] += 1
        if args:
            return (recorded, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": recorded}

    handle = blocks[layer].register_forward_pre_hook(replace, with_kwargs=True)
    try:
        yield used
    finally:
        handle.remove()


def count_hooks(model: nn.Module) -> int:
    """Number of forward and forward-pre hooks still registered anywhere in `model` (0 after a capture)."""
    check_module("model", model)
    return sum(len(module._forward_hooks) + len(module._forward_pre_hooks) for module in model.modules())

"""Strict inputs: the validators every public function of `utils` calls at its entry.

Each validator takes the argument's name first, so that its error says which argument is wrong and what
is allowed, and it runs before anything is changed (an in-place operation refuses before it touches the
model). Integers must be integers: a string, a float or a bool is a TypeError, never truncated or read
character by character; numpy and 0-d torch integers are accepted. This module imports no other module
of the package, so every module can use it.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn


def _describe(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def check_int(name: str, value: object, minimum: int | None = None, maximum: int | None = None) -> int:
    """Return `value` as a Python int, or raise: TypeError unless it is an integer, ValueError out of range.

    Accepted: int, numpy integers and 0-d integer tensors. Refused with a TypeError: bool, float (even
    2.0), str and anything else. `minimum` and `maximum` are inclusive bounds; the error names the
    argument and the allowed range.
    """
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point() \
            and value.dtype != torch.bool and not value.is_complex():
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {_describe(value)}.")
    value = int(value)
    if minimum is not None and value < minimum or maximum is not None and value > maximum:
        if maximum is None:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value}.")
        if minimum is None:
            raise ValueError(f"{name} must be an integer <= {maximum}, got {value}.")
        raise ValueError(f"{name} must be in {minimum}..{maximum}, got {value}.")
    return value


def check_positive_int(name: str, value: object) -> int:
    """Return `value` as an int >= 1, or raise a TypeError (not an integer) or a ValueError (below 1)."""
    return check_int(name, value, minimum=1)


def check_optional_int(name: str, value: object, minimum: int | None = None, maximum: int | None = None) -> int | None:
    """Like `check_int`, but None passes through (an optional count or limit)."""
    return None if value is None else check_int(name, value, minimum, maximum)


def check_number(name: str, value: object, minimum: float | None = None, maximum: float | None = None,
                 strict_minimum: bool = False, finite: bool = True) -> float:
    """Return a finite real number as a float, or raise: TypeError for a bool, str or tensor of many
    values, ValueError for NaN, infinity, or a value outside [minimum, maximum] (minimum excluded when
    `strict_minimum`). `finite=False` lets NaN and infinities through (a measurement that can honestly be
    undefined, such as the recall of a class with no example); the type is checked all the same."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {_describe(value)}.")
    value = float(value)
    if not math.isfinite(value):
        if not finite:
            return value
        raise ValueError(f"{name} must be finite, got {value}.")
    below = value <= minimum if strict_minimum and minimum is not None else minimum is not None and value < minimum
    if below or maximum is not None and value > maximum:
        low = "-inf" if minimum is None else f"{minimum}"
        high = "inf" if maximum is None else f"{maximum}"
        interval = f"{'(' if strict_minimum else '['}{low}, {high}]"
        raise ValueError(f"{name} must be in {interval}, got {value}.")
    return value


def check_numbers(name: str, values: object, allow_empty: bool = False, finite: bool = True) -> list[float]:
    """Return a sequence of real numbers (list, tuple, 1-D tensor or array) as a list of floats, or raise.

    A string, a single number or a dict is a TypeError, and so is any element that is not a real number
    (the error names the element, e.g. `values[2]`); a NaN or infinite element is a ValueError unless
    `finite=False`, and so is an empty sequence unless `allow_empty`.
    """
    if isinstance(values, (str, bytes, Mapping)) or isinstance(values, numbers.Number) \
            or isinstance(values, torch.Tensor) and values.dim() != 1:
        raise TypeError(f"{name} must be a sequence of numbers (a list or a 1-D tensor), got {_describe(values)}.")
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if not isinstance(values, Iterable):
        raise TypeError(f"{name} must be a sequence of numbers (a list or a 1-D tensor), got {_describe(values)}.")
    result = [check_number(f"{name}[{position}]", value, finite=finite) for position, value in enumerate(values)]
    if not allow_empty and not result:
        raise ValueError(f"{name} must hold at least one number, got an empty sequence.")
    return result


def check_bool(name: str, value: object) -> bool:
    """Return `value` if it is a bool (numpy bools included), else raise a TypeError naming the argument."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {_describe(value)}.")


def check_in(name: str, value: object, allowed: Iterable[object]) -> object:
    """Return `value` if it is one of `allowed`, else raise a ValueError that lists what is allowed."""
    allowed = list(allowed)
    try:
        found = value in allowed
    except TypeError:  # an unhashable or incomparable value
        found = False
    if not found:
        raise ValueError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}; got {_describe(value)}.")
    return value


def check_str(name: str, value: object, empty: bool = False) -> str:
    """Return `value` if it is a string (non-empty unless `empty`), else raise a TypeError or ValueError."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {_describe(value)}.")
    if not empty and not value.strip():
        raise ValueError(f"{name} must not be empty.")
    return value


def check_indices(name: str, values: object, upper: int | None = None, allow_empty: bool = True,
                  allow_duplicates: bool = False) -> list[int]:
    """Return a list of integer indices, each in 0..upper-1 and (unless allowed) without duplicates.

    `values` is a sequence (list, tuple, range, 1-D integer tensor or array) of integers. A string is a
    TypeError (never read character by character: "12" is not [1, 2]), and so is any float or bool
    element. The order is kept; callers sort when order does not matter.
    """
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of integers, got the string {values!r}; "
                        f"write a list such as [1, 2].")
    if isinstance(values, numbers.Number) or isinstance(values, torch.Tensor) and values.dim() == 0:
        raise TypeError(f"{name} must be a sequence of integers, got a single {_describe(values)}; "
                        f"write a list such as [{values}].")
    if isinstance(values, torch.Tensor):
        if values.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got a tensor of shape {tuple(values.shape)}.")
        values = values.tolist()
    if isinstance(values, (set, frozenset)):
        values = sorted(values)
    if not isinstance(values, Iterable):
        raise TypeError(f"{name} must be a sequence of integers, got {_describe(values)}.")
    result = []
    for position, value in enumerate(values):
        if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point() \
                and value.dtype != torch.bool:
            value = int(value.item())
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must hold integers only; element {position} is {_describe(value)}.")
        result.append(int(value))
    if not allow_empty and not result:
        raise ValueError(f"{name} must not be empty.")
    if upper is not None:
        bad = [value for value in result if not 0 <= value < upper]
        if bad:
            raise ValueError(f"{name} has indices out of range {bad}: valid indices are 0..{upper - 1}.")
    if not allow_duplicates and len(set(result)) != len(result):
        duplicates = sorted({value for value in result if result.count(value) > 1})
        raise ValueError(f"Duplicate indices {duplicates} in {name}: each index may appear once.")
    return result


def check_tensor(name: str, value: object, dim: int | Sequence[int] | None = None, integer: bool | None = None) -> torch.Tensor:
    """Return `value` if it is a torch tensor of the given number of dimensions and kind, else raise.

    `dim` is an int or a sequence of allowed dims; `integer=True` asks for an integer dtype, False for a
    floating one. TypeError for a non-tensor or a wrong dtype kind, ValueError for a wrong dim.
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {_describe(value)}.")
    if dim is not None:
        dims = (dim,) if isinstance(dim, int) else tuple(dim)
        if value.dim() not in dims:
            raise ValueError(f"{name} must be {' or '.join(f'{d}-D' for d in dims)}, got shape {tuple(value.shape)}.")
    if integer is True and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise TypeError(f"{name} must hold integer token ids or indices, got dtype {value.dtype}.")
    if integer is False and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}.")
    return value


def check_finite(name: str, value: object) -> torch.Tensor:
    """Return `value` (a tensor) if every element is finite, else raise a ValueError counting NaN and inf.

    A NaN score would otherwise sort first or last depending on the operation, silently.
    """
    value = check_tensor(name, value)
    if value.is_floating_point() or value.is_complex():
        bad = ~torch.isfinite(value)
        if bool(bad.any()):
            n_nan = int(torch.isnan(value).sum())
            raise ValueError(f"{name} must be finite: it holds {n_nan} NaN and {int(bad.sum()) - n_nan} infinite "
                             f"value(s) out of {value.numel()}.")
    return value


def check_token_ids(name: str, value: object, vocab_size: int | None = None, dim: int | Sequence[int] | None = None) -> torch.Tensor:
    """Return `value` if it is an integer tensor of ids in 0..vocab_size-1, else a clear error.

    Ids beyond the vocabulary would fail deep inside an embedding lookup (or read garbage on a GPU).
    """
    value = check_tensor(name, value, dim=dim, integer=True)
    if value.numel() and vocab_size is not None:
        low, high = int(value.min()), int(value.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(f"{name} holds token ids in {low}..{high}, but the model's vocabulary has "
                             f"{vocab_size} tokens (valid ids 0..{vocab_size - 1}).")
    return value


def check_module(name: str, value: object, allow_meta: bool = False) -> nn.Module:
    """Return `value` if it is a torch module whose weights are real (not on the `meta` device).

    A model on the meta device has shapes but no values: anything that runs or edits it would fail
    with torch internals, so it is refused here with what to do instead. Functions that read only shapes
    (counting parameters, sizes) pass `allow_meta=True`: Chapter 3 counts real architectures that way.
    """
    if not isinstance(value, nn.Module):
        raise TypeError(f"{name} must be a torch model (nn.Module), got {_describe(value)}.")
    if allow_meta:
        return value
    for tensor in (*value.parameters(), *value.buffers()):
        if tensor.device.type == "meta":
            raise ValueError(f"{name} is on the 'meta' device (shapes without values): load real weights "
                             f"first, e.g. utils.models.load_model or build_from_config(..., device='cpu').")
        break
    return value


def check_callable(name: str, value: object, signature: str = "") -> object:
    """Return `value` if it can be called, else raise a TypeError naming the argument and the expected call.

    `signature` shows how it will be called, e.g. "recovery(base, pruned, healed)".
    """
    if not callable(value):
        shape = f" {signature}" if signature else ""
        raise TypeError(f"{name} must be a function{shape}, got {_describe(value)}.")
    return value


def check_folder(name: str, value: object) -> Path:
    """Return `value` as a Path to an existing folder: TypeError for anything but a str or os.PathLike,
    FileNotFoundError (naming the argument) when no such folder exists."""
    if isinstance(value, bool) or not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a folder path (str or Path), got {_describe(value)}.")
    path = Path(value)
    if not path.is_dir():
        raise FileNotFoundError(f"{name} must be an existing folder, got {str(value)!r} "
                                f"({'a file' if path.exists() else 'no such folder'}).")
    return path


def model_vocab_size(model: nn.Module) -> int | None:
    """The number of rows of a model's input embedding (the valid token ids), or None if it has none."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch model (nn.Module), got {_describe(model)}.")
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    weight = getattr(embedding, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) else None

"""Plots the chapters share: parameter breakdowns and per-layer curves."""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import pandas as pd

from .checks import check_numbers

COMPONENTS = ("embedding", "attention", "mlp", "norm", "lm_head", "other")


def plot_parameter_breakdown(counts: Mapping[str, Mapping[str, int]], title: str = "Where the parameters are",
                             share: bool = True):
    """Stacked horizontal bars, one per model, of parameters by component (from count_parameters).

    With `share`, bars show the percentage of each model's total, so models of very different sizes can
    be compared; otherwise absolute counts in millions. Returns the matplotlib Figure.
    """
    if not isinstance(counts, Mapping):
        raise TypeError(f"counts must be a dict {{model name: count_parameters(model)}}, got {type(counts).__name__}.")
    if not counts:
        raise ValueError("counts is empty: pass {model name: count_parameters(model)} for at least one model.")
    for name, row in counts.items():
        if not isinstance(row, Mapping):
            raise TypeError(f"counts[{name!r}] must be a dict of parameters by component (count_parameters), "
                            f"got {type(row).__name__}.")
        check_numbers(f"counts[{name!r}]", [row.get(c, 0) for c in COMPONENTS])
        if not any(row.get(c, 0) for c in COMPONENTS):
            raise ValueError(f"counts[{name!r}] has no parameter in any of {', '.join(COMPONENTS)}.")
    table = pd.DataFrame({name: {c: row.get(c, 0) for c in COMPONENTS} for name, row in counts.items()}).T
    table = table.loc[:, (table != 0).any()]
    values = table.div(table.sum(axis=1), axis=0) * 100 if share else table / 1e6
    figure, axis = plt.subplots(figsize=(8, 0.6 * len(table) + 1.5))
    values.plot.barh(stacked=True, ax=axis, colormap="tab10", width=0.7)
    axis.set_xlabel("% of parameters" if share else "parameters (millions)")
    axis.set_title(title)
    axis.invert_yaxis()
    axis.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    figure.tight_layout()
    return figure


def plot_layer_curves(curves: Mapping[str, Sequence[float]], ylabel: str, title: str = "",
                      xlabel: str = "decoder block", marker: str = "o"):
    """One line per named curve over layer index (importance, cosine, norms...). Returns the Figure.

    `curves` maps a name to a non-empty sequence of finite numbers (a list or 1-D tensor), one per layer.
    """
    if not isinstance(curves, Mapping):
        raise TypeError(f"curves must be a dict {{name: values per layer}}, got {type(curves).__name__}.")
    if not curves:
        raise ValueError("curves is empty: pass {name: values per layer} with at least one curve.")
    curves = {name: check_numbers(f"curves[{name!r}]", values) for name, values in curves.items()}
    figure, axis = plt.subplots(figsize=(8, 3.5))
    for name, values in curves.items():
        axis.plot(range(len(values)), values, marker=marker, markersize=3, label=name)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    if title:
        axis.set_title(title)
    if len(curves) > 1:
        axis.legend(frameon=False)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure

"""Explorers: results computed once in a chapter, shown as a static figure and, in a live notebook, as a
slider that answers at once.

A chapter measures a few curves (blocks removed against perplexity for each selection method, neurons
pruned against bias gap, ...) and hands them to `explore` as a mapping from a method name to its columns:
one column for the x axis and one or more measured columns, each a sequence of numbers, the column names
doubling as axis labels. `explore` always draws one matplotlib figure of all the data (that is what the
static book shows), and in a live kernel with ipywidgets it adds a dropdown (the method) and a slider (the
x value) whose readout is looked up in the same precomputed table: moving the slider runs no model.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import matplotlib.pyplot as plt


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_results(results: Mapping[str, Mapping[str, Sequence[float]]], x: str, y: Sequence[str]) -> None:
    """Refuse results an explorer cannot show, with a message naming the argument and what is allowed.

    `results` must be a non-empty mapping from method names (strings) to mappings of columns; every method
    has the column `x` and every column of `y`, all of the same non-zero length and all numbers; the x
    values of a method are finite and distinct (measured values may be NaN: "not measured").
    """
    if not isinstance(x, str) or not x:
        raise ValueError(f"`x` must be a non-empty column name, got {x!r}.")
    if not y or any(not isinstance(name, str) or not name for name in y):
        raise ValueError(f"`y` must name one or more measured columns (non-empty strings), got {y!r}.")
    if x in y or len(set(y)) != len(y):
        raise ValueError(f"`y` must name distinct columns other than the x column {x!r}, got {list(y)!r}.")
    if not isinstance(results, Mapping) or not results:
        raise ValueError("`results` must be a non-empty mapping from a method name to its columns "
                         f"({{method: {{{x!r}: [...], {y[0]!r}: [...]}}}}), got {type(results).__name__}.")
    for method, columns in results.items():
        if not isinstance(method, str) or not method:
            raise ValueError(f"`results` keys must be non-empty method names (strings), got {method!r}.")
        if not isinstance(columns, Mapping):
            raise ValueError(f"`results[{method!r}]` must map column names to sequences of numbers, "
                             f"got {type(columns).__name__}.")
        missing = [name for name in (x, *y) if name not in columns]
        if missing:
            raise ValueError(f"`results[{method!r}]` lacks the column(s) {missing}; it has {sorted(columns)}.")
        lengths = {name: len(columns[name]) for name in (x, *y)}
        if len(set(lengths.values())) != 1 or not lengths[x]:
            raise ValueError(f"`results[{method!r}]` columns must have the same non-zero length, got {lengths}.")
        for name in (x, *y):
            bad = [value for value in columns[name] if not _is_number(value)]
            if bad:
                raise ValueError(f"`results[{method!r}][{name!r}]` must hold numbers only, got {bad[0]!r}.")
        xs = [float(value) for value in columns[x]]
        if not all(math.isfinite(value) for value in xs) or len(set(xs)) != len(xs):
            raise ValueError(f"`results[{method!r}][{x!r}]` must hold finite, distinct x values, got {xs}.")


@dataclass
class Explorer:
    """Precomputed results with their static figure and, in a live kernel, an interactive view.

    `figure` is the matplotlib Figure of every curve; `widget` is the ipywidgets view (None outside a
    live kernel or where ipywidgets is missing); `at` and `readout` answer for one method at one x value
    from the stored table, which is what the widget shows as the slider moves.
    """

    results: dict[str, dict[str, list[float]]]
    x: str
    y: tuple[str, ...]
    figure: object
    xs: list[float] = field(default_factory=list)
    widget: object | None = None

    def at(self, method: str, x_value: float) -> dict[str, float] | None:
        """The measured columns of `method` at `x_value`, or None where that method was not measured there."""
        if method not in self.results:
            raise ValueError(f"`method` must be one of {list(self.results)}, got {method!r}.")
        columns = self.results[method]
        for index, value in enumerate(columns[self.x]):
            if math.isclose(value, float(x_value), rel_tol=1e-9, abs_tol=1e-12):
                return {name: columns[name][index] for name in self.y}
        return None

    def best(self, x_value: float, column: str | None = None) -> tuple[str, float] | None:
        """The method with the lowest value of `column` (default: the first measured column) at `x_value`."""
        column = column or self.y[0]
        if column not in self.y:
            raise ValueError(f"`column` must be one of {list(self.y)}, got {column!r}.")
        found = [(method, row[column]) for method in self.results
                 if (row := self.at(method, x_value)) is not None and math.isfinite(row[column])]
        return min(found, key=lambda item: item[1]) if found else None

    def readout(self, method: str, x_value: float) -> str:
        """A short HTML answer for `method` at `x_value`: its measured values and the best method there."""
        row = self.at(method, x_value)
        head = f"<b>{method}</b> at {self.x} = {x_value:g}: "
        if row is None:
            return head + "not measured at this value (the slider lists every value any method was measured at)."
        parts = [f"{name} = {_format(value)}" for name, value in row.items()]
        best = self.best(x_value)
        tail = f"<br>lowest {self.y[0]} at this {self.x}: <b>{best[0]}</b> ({_format(best[1])})" if best else ""
        return head + ", ".join(parts) + tail

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.figure)
        plt.close(self.figure)  # shown once, here, not again when the cell ends
        if self.widget is not None:
            display(self.widget)


def _format(value: float) -> str:
    return "not measured" if not math.isfinite(value) else f"{value:.4g}"


def live_kernel() -> bool:
    """Whether code runs in a live Jupyter kernel with ipywidgets installed (where a widget can respond)."""
    try:
        from IPython import get_ipython
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def explorer_widget(explorer: Explorer):
    """The ipywidgets view of an `Explorer`: a method dropdown, an x slider and a readout from the stored table."""
    if not isinstance(explorer, Explorer):
        raise TypeError(f"explorer must be an Explorer (what explore returns), got {type(explorer).__name__}.")
    import ipywidgets as widgets

    methods = list(explorer.results)
    choose = widgets.Dropdown(options=methods, value=methods[0], description="method")
    slide = widgets.SelectionSlider(options=[(f"{value:g}", value) for value in explorer.xs],
                                    value=explorer.xs[0], description=explorer.x[:20], continuous_update=True)
    answer = widgets.HTML(explorer.readout(methods[0], explorer.xs[0]))

    def update(_change: object = None) -> None:
        answer.value = explorer.readout(choose.value, slide.value)

    choose.observe(update, names="value")
    slide.observe(update, names="value")
    return widgets.VBox([widgets.HBox([choose, slide]), answer])


def explore(results: Mapping[str, Mapping[str, Sequence[float]]], x: str, y: str | Sequence[str],
            title: str = "", log_y: Sequence[str] = (), interactive: bool | None = None) -> Explorer:
    """Draw every method's curves of `y` against `x` and, in a live kernel, add a slider over the same data.

    `results` maps a method name to its columns: `results[method][x]` the x values (blocks removed, percent
    pruned, ...) and `results[method][name]` for each measured column of `y` (one panel per column; the
    names are the axis labels). `log_y` names columns drawn on a log scale. `interactive=None` builds the
    widget only in a live kernel with ipywidgets (True forces it, False never). Bad input raises a
    ValueError before anything is drawn. Returns an `Explorer`; as a cell's last expression it shows the
    figure and then the widget.
    """
    y = (y,) if isinstance(y, str) else tuple(y)
    check_results(results, x, y)
    unknown = [name for name in log_y if name not in y]
    if unknown:
        raise ValueError(f"`log_y` must name columns of `y` ({list(y)}), got {unknown}.")
    if interactive not in (None, True, False):
        raise ValueError(f"`interactive` must be None, True or False, got {interactive!r}.")
    table = {method: {name: [float(value) for value in columns[name]] for name in (x, *y)}
             for method, columns in results.items()}
    xs = sorted({value for columns in table.values() for value in columns[x]})

    figure, axes = plt.subplots(1, len(y), figsize=(4.2 * len(y) + 1.0, 3.4), squeeze=False)
    for axis, name in zip(axes[0], y):
        for method, columns in table.items():
            pairs = sorted(zip(columns[x], columns[name]))
            axis.plot([p[0] for p in pairs], [p[1] for p in pairs], marker="o", markersize=4, label=method)
        axis.set_xlabel(x)
        axis.set_ylabel(name)
        if name in log_y:
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
    axes[0][0].legend(frameon=False, fontsize="small")
    if title:
        figure.suptitle(title)
    figure.tight_layout()

    result = Explorer(results=table, x=x, y=y, figure=figure, xs=xs)
    if interactive is True or (interactive is None and live_kernel()):
        result.widget = explorer_widget(result)
    return result

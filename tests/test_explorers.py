"""The explorers: a static figure drawn from all the data, a widget that answers from the stored table, and
bad input refused before anything is drawn."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from utils.explorers import explore  # noqa: E402

RESULTS = {
    "cosine": {"blocks removed": [0, 2, 4], "perplexity": [10.0, 14.0, 30.0], "KV bytes": [300.0, 260.0, 220.0]},
    "last blocks": {"blocks removed": [0, 2, 4, 6], "perplexity": [10.0, 12.0, 40.0, 90.0],
                    "KV bytes": [300.0, 260.0, 220.0, 180.0]},
}


def test_static_figure_holds_every_curve() -> None:
    shown = explore(RESULTS, x="blocks removed", y=["perplexity", "KV bytes"], title="t", log_y=["perplexity"],
                    interactive=False)
    axes = shown.figure.axes
    assert [axis.get_ylabel() for axis in axes] == ["perplexity", "KV bytes"]
    assert axes[0].get_yscale() == "log" and axes[1].get_yscale() == "linear"
    for axis, column in zip(axes, ["perplexity", "KV bytes"]):
        lines = {line.get_label(): line for line in axis.get_lines()}
        assert set(lines) == set(RESULTS)
        for method, columns in RESULTS.items():
            assert list(lines[method].get_xdata()) == columns["blocks removed"]
            assert list(lines[method].get_ydata()) == columns[column]
    assert shown.widget is None
    plt.close(shown.figure)


def test_widget_answers_from_the_stored_table() -> None:
    shown = explore(RESULTS, x="blocks removed", y=["perplexity", "KV bytes"], interactive=True)
    assert shown.xs == [0, 2, 4, 6]
    assert shown.at("cosine", 4) == {"perplexity": 30.0, "KV bytes": 220.0}
    assert shown.at("cosine", 6) is None
    assert shown.best(2) == ("last blocks", 12.0)
    assert shown.best(4) == ("cosine", 30.0)
    box = shown.widget
    (choose, slide), answer = box.children[0].children, box.children[1]
    assert "cosine" in answer.value and "10" in answer.value
    choose.value = "last blocks"
    slide.value = 6
    assert "last blocks" in answer.value and "perplexity = 90" in answer.value and "KV bytes = 180" in answer.value
    choose.value = "cosine"
    assert "not measured" in answer.value
    plt.close(shown.figure)


def test_nan_is_shown_as_not_measured() -> None:
    shown = explore({"a": {"x": [1, 2], "y": [1.0, math.nan]}}, x="x", y="y", interactive=False)
    assert "not measured" in shown.readout("a", 2) and shown.best(2) is None
    plt.close(shown.figure)


@pytest.mark.parametrize("results, x, y, message", [
    ({}, "x", "y", "non-empty mapping"),
    ({"a": {"x": [1, 2]}}, "x", "y", "lacks the column"),
    ({"a": {"x": [1, 2], "y": [1.0]}}, "x", "y", "same non-zero length"),
    ({"a": {"x": [1, 1], "y": [1.0, 2.0]}}, "x", "y", "distinct"),
    ({"a": {"x": [1, 2], "y": ["1", 2.0]}}, "x", "y", "numbers only"),
    ({"a": {"x": [1, 2], "y": [1.0, 2.0]}}, "x", "x", "other than the x column"),
    ({"a": {"x": [1, 2], "y": [1.0, 2.0]}}, "x", [], "one or more"),
])
def test_bad_input_is_refused_before_drawing(results, x, y, message) -> None:
    before = plt.get_fignums()
    with pytest.raises(ValueError, match=message):
        explore(results, x=x, y=y, interactive=False)
    assert plt.get_fignums() == before


def test_bad_options_and_lookups_are_refused() -> None:
    with pytest.raises(ValueError, match="log_y"):
        explore(RESULTS, x="blocks removed", y="perplexity", log_y=["KV bytes"])
    with pytest.raises(ValueError, match="interactive"):
        explore(RESULTS, x="blocks removed", y="perplexity", interactive="yes")
    shown = explore(RESULTS, x="blocks removed", y="perplexity", interactive=False)
    with pytest.raises(ValueError, match="method"):
        shown.at("random", 2)
    plt.close(shown.figure)

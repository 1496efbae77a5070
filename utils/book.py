"""Numbers for the prose: one `glue` that serves the book and a learner in Colab or Jupyter alike.

The book writes numbers into sentences with myst-nb's `{glue:text}` roles, filled from values a cell
glued. Outside the book (Colab, JupyterLab, VS Code) those roles stay as markup, so every glued value is
also printed in the cell's output, as a short `name = value` line right above the sentence that uses
it. Where myst-nb is not installed (Colab needs no Sphinx), `glue` only prints.
"""

from __future__ import annotations

import numbers

try:  # the book's builder; absent in a plain notebook environment
    from myst_nb import glue as _myst_glue
except ImportError:  # pragma: no cover - depends on the environment
    _myst_glue = None


def shown(value: object) -> str:
    """A short, readable rendering of a glued value: 4 significant digits for floats."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return str(value)
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    return f"{float(value):.4g}"


def glue(name: str, value: object, display: bool = False) -> None:
    """Make `value` available to the book's prose under `name`, and print `name = value` for a learner
    reading the notebook outside the book.

    Same signature as `myst_nb.glue` (the book's roles read `{glue:text}`name:.1f``); `display=True` also
    shows the value as the book would. Nothing is hidden: the printed line is the number the sentence
    below it quotes.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"`name` must be an identifier-like string for the book's glue roles, got {name!r}.")
    if _myst_glue is not None:
        _myst_glue(name, value, display=display)
    elif display:
        from IPython.display import display as show

        show(value)
    print(f"{name} = {shown(value)}")

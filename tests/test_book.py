"""utils.book.glue: the book gets the value, a learner outside the book sees it printed."""

import pytest

from utils.book import glue, shown


def test_glue_prints_the_number_the_prose_quotes(capsys):
    glue("recovery_wiki", 63.6123456)
    glue("removed", "12, 13, 14")
    glue("steps", 1200)
    printed = capsys.readouterr().out.splitlines()
    assert printed == ["recovery_wiki = 63.61", "removed = 12, 13, 14", "steps = 1,200"]


def test_shown_formats_and_glue_refuses_bad_names():
    assert shown(0.000123456) == "0.0001235" and shown(True) == "True"
    with pytest.raises(ValueError, match="name"):
        glue("not a name", 1.0)

"""Checks for the chapters' exercises: each takes a learner's answer and says whether it holds, and why not.

Every chapter ends with exercises. Those with an answer have a check cell that calls one function of this
module with the learner's answer (a number, a list of blocks, a function they wrote) and the chapter's own
measured values. A check returns a `Feedback`: `correct` and a message that explains what is wrong with a
wrong answer (not only that it is wrong). In a notebook the feedback displays itself; the tests call each
check with the reference solution (it must pass) and with at least one plausible wrong answer (it must be
caught). The chapters' checks follow, one section per chapter, in chapter order.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Feedback:
    """The verdict of one exercise check: whether the answer holds and a message saying why (or why not)."""

    correct: bool
    message: str

    def __bool__(self) -> bool:
        return self.correct

    def __str__(self) -> str:
        return ("Correct. " if self.correct else "Not yet. ") + self.message

    def _repr_markdown_(self) -> str:
        return ("**Correct.** " if self.correct else "**Not yet.** ") + self.message

    def __repr__(self) -> str:
        return str(self)


def verdict(correct: bool, right: str, wrong: str) -> Feedback:
    """A `Feedback` from a condition: `right` is the message when it holds, `wrong` the explanation when not."""
    return Feedback(bool(correct), right if correct else wrong)


def within(answer: float, expected: float, rel: float) -> bool:
    """Whether a numeric `answer` lies within a relative tolerance `rel` of `expected` (a finite number)."""
    import math

    answer = float(answer)
    return math.isfinite(answer) and abs(answer - expected) <= rel * abs(expected)


# ---- Chapter sections below (CH02 ... CH08b), each check named check_chXX_<what>. ----

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
from typing import Callable, Mapping, Sequence

from .checks import check_bool, check_callable, check_int, check_number, check_str


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
    """A `Feedback` from a condition: `right` is the message when it holds, `wrong` the explanation when not.

    `correct` must be a bool (a string such as "yes" is always truthy: it is refused, not read).
    """
    correct = check_bool("correct", correct)
    return Feedback(correct, check_str("right", right) if correct else check_str("wrong", wrong))


def within(answer: float, expected: float, rel: float) -> bool:
    """Whether a numeric `answer` lies within a relative tolerance `rel` >= 0 of `expected` (a finite number).

    A NaN or infinite answer is never within; a negative or non-finite `rel` is refused.
    """
    import math

    answer = check_number("answer", answer, finite=False)
    expected = check_number("expected", expected)
    rel = check_number("rel", rel, minimum=0.0)
    return math.isfinite(answer) and abs(answer - expected) <= rel * abs(expected)


# ---- Reading a learner's answer: one way for each kind of answer ----
#
# An answer cell starts as `my_answer = None`. Each reader below returns the answer in the form its check
# needs, or the `Feedback` the check returns instead: "No answer yet" while it is None (saying what to write),
# and what is wrong when it is not the kind of answer asked for (text for a number, a number for a function):
# a learner's answer is graded, never raised on, in every chapter. The checks' other arguments (the
# chapter's own measurements) are the course's code, not the learner's: a bad one is still refused with a
# ValueError or TypeError, before the answer is read.


def _no_answer_yet(what: str) -> Feedback:
    """The feedback for an exercise not answered yet (the answer is still None): what to do in the answer cell."""
    return Feedback(False, f"No answer yet (it is still `None`): {what}, then run this cell again.")


def _wrong_kind(message: str) -> Feedback:
    """The feedback for an answer of the wrong kind: `message` says what kind of answer is expected."""
    return Feedback(False, message)


def _finite_float(value: object) -> float | None:
    """`value` as a finite float (numpy and torch scalars included), or None where it is not a finite real
    number (text, a list, a bool, NaN)."""
    import math

    if isinstance(value, bool):
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _number_answer(answer: object, what: str, kind: str = "a number") -> float | Feedback:
    """A learner's number answer as a float, or the Feedback to return instead.

    None gives the "no answer yet" feedback, saying `what` to write. Numpy and torch scalars count as
    numbers; anything else that is not a finite real number (text, a list, True, NaN) is of the wrong kind:
    the feedback says the answer must be `kind`.
    """
    if answer is None:
        return _no_answer_yet(what)
    value = _finite_float(answer)
    if value is None:
        return _wrong_kind(f"The answer must be {kind}, got {answer!r}.")
    return value


def _function_answer(answer: object, what: str, signature: str) -> Callable | Feedback:
    """A learner's function answer, or the Feedback to return instead.

    None gives the "no answer yet" feedback, saying `what` to write; anything that is not callable is of the
    wrong kind: the feedback names the `signature` asked for.
    """
    if answer is None:
        return _no_answer_yet(what)
    if not callable(answer):
        return _wrong_kind(f"The answer must be a function {signature}, got {type(answer).__name__} {answer!r:.60}.")
    return answer


def _choice_answer(answer: object, what: str, choices: Sequence[str]) -> str | Feedback:
    """A learner's answer that picks one of `choices`, or the Feedback to return instead ("no answer yet",
    saying `what` to write, or the list of choices when the answer is not one of them)."""
    if answer is None:
        return _no_answer_yet(what)
    if answer not in choices:
        return Feedback(False, f"The answer must be one of {sorted(choices)}, got {answer!r}.")
    return str(answer)


def _blocks_answer(answer: object, what: str) -> list[int] | Feedback:
    """A learner's answer that lists blocks, as a sorted list of ints, or the Feedback to return instead ("no
    answer yet", saying `what` to write, or what is expected when it is not a list of whole numbers)."""
    if answer is None:
        return _no_answer_yet(what)
    if isinstance(answer, (str, bytes)):
        return _wrong_kind(f"The answer must be a list of block indices (integers), got {answer!r:.60}.")
    try:
        return _block_list(answer, "my_answer")
    except ValueError:
        return _wrong_kind(f"The answer must be a list of block indices (integers), got {answer!r:.60}.")


def _block_list(value: object, name: str) -> list[int]:
    """`value` (a list of block indices, an answer or what a learner's function returned) as a sorted list
    of ints; a ValueError naming `name` when it is not a list of whole numbers."""
    try:
        blocks = [int(block) for block in value]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a list of block indices (integers), got {value!r:.60}.") from None
    return sorted(blocks)


def _measured_positive(name: str, value: float) -> float:
    """A chapter's measured value `name` as a float; a ValueError when it is not a positive number."""
    value = float(value)
    if not value > 0:
        raise ValueError(f"`{name}` must be a positive number (the chapter's measured value), got {value}.")
    return value


# ---- Chapter sections below (CH02 ... CH08b), each check named check_chXX_<what>. ----


# ---- CH02 ----

def check_ch02_params_saved(answer: float | None, blocks_removed: int, block_parameters: int,
                            total_parameters: int) -> Feedback:
    """Check a learner's percentage of parameters saved by removing `blocks_removed` decoder blocks.

    The right answer is 100 * blocks_removed * block_parameters / total_parameters (within 1% relative). A
    common mistake, blocks_removed / n_layers, forgets that the embedding table, the final norm and the LM
    head stay; the feedback says so. `answer` None means "not answered yet".
    """
    if blocks_removed < 1 or block_parameters < 1 or total_parameters < blocks_removed * block_parameters:
        raise ValueError("`blocks_removed` and `block_parameters` must be >= 1 and `total_parameters` at least "
                         f"their product; got {blocks_removed}, {block_parameters}, {total_parameters}.")
    value = _number_answer(answer, "write your percentage in `my_answer` (a number such as 12.5)")
    if isinstance(value, Feedback):
        return value
    expected = 100 * blocks_removed * block_parameters / total_parameters
    if within(value, expected, 0.01):
        return Feedback(True, f"{expected:.1f}% of the parameters sit in the removed blocks.")
    if 0 < value <= 1 and within(100 * value, expected, 0.01):
        return Feedback(False, "That is a fraction, not a percentage: multiply by 100.")
    return Feedback(False, f"{value:.1f}% is not what the removed blocks hold. Count the parameters of one block "
                           "(attention + MLP + norms), multiply by the number removed and divide by the whole model: "
                           "the embedding table, the final norm and the LM head stay, so the share is smaller than "
                           "blocks removed / blocks.")


def check_ch02_ideal_speedup(answer: float | None, n_layers: int, n_removed: int) -> Feedback:
    """Check a learner's predicted decode speedup if a step's time were proportional to the number of blocks.

    The ideal is n_layers / (n_layers - n_removed) (within 1%). The feedback recognizes the inverse (the time
    ratio, below 1) and 1 + n_removed / n_layers (the share removed added to 1).
    """
    if not 1 <= n_removed < n_layers:
        raise ValueError(f"`n_removed` must be in 1..n_layers-1 = {n_layers - 1}, got {n_removed}.")
    value = _number_answer(answer, "write your predicted speedup in `my_answer` (for example 1.3)")
    if isinstance(value, Feedback):
        return value
    expected = n_layers / (n_layers - n_removed)
    if within(value, expected, 0.01):
        return Feedback(True, f"{n_layers} / {n_layers - n_removed} = {expected:.3f}x: the upper limit if only the "
                              "blocks cost time.")
    if within(value, 1 / expected, 0.01):
        return Feedback(False, "That is the ratio of the times (below 1). A speedup is old time / new time.")
    if within(value, 1 + n_removed / n_layers, 0.01):
        return Feedback(False, "Removing a share s of the work divides the time by (1 - s); it does not add s to the speed.")
    return Feedback(False, f"{value:.3f}x is not the ideal. If every block costs the same time t, a step costs "
                           f"n_layers * t before and (n_layers - n_removed) * t after.")


def check_ch02_recovery(recovery: object) -> Feedback:
    """Check a learner's function recovery(base, pruned, healed) -> share of the perplexity gap recovered.

    The chapter defines recovery = (pruned - healed) / (pruned - base): 1 when the healed model is back at the
    base perplexity, 0 when healing did nothing. The check calls the function on made-up perplexities and
    explains the usual mistakes (the complement, a ratio of perplexities, a sign error).
    """
    recovery = _function_answer(recovery, "define `def recovery(base, pruned, healed): ...` and set "
                                "`my_recovery = recovery`", "recovery(base, pruned, healed)")
    if isinstance(recovery, Feedback):
        return recovery
    cases = [(10.0, 30.0, 15.0, 0.75), (20.0, 25.0, 20.0, 1.0), (8.0, 40.0, 40.0, 0.0)]
    for base, pruned, healed, expected in cases:
        try:
            value = float(recovery(base, pruned, healed))
        except Exception as error:  # the learner's code: report, do not crash the check
            return Feedback(False, f"Your function raised {type(error).__name__}: {error}.")
        if abs(value - expected) > 1e-6:
            hint = "Check the formula against the definition in section 3."
            if abs(value - (1 - expected)) < 1e-6:
                hint = "You computed the share still missing (healed - base) / (pruned - base); recovery is its complement."
            elif abs(value + expected) < 1e-6:
                hint = "The sign is flipped: subtract the healed perplexity from the pruned one."
            elif abs(value - pruned / healed) < 1e-6 or abs(value - healed / pruned) < 1e-6:
                hint = "A ratio of perplexities ignores where the base model is: measure against the gap pruned - base."
            return Feedback(False, f"recovery(base={base}, pruned={pruned}, healed={healed}) gave {value:.3f}, expected "
                                   f"{expected:.3f}. {hint}")
    return Feedback(True, "Your function gives 1 for a full repair, 0 for none, and the share of the gap in between.")


# ---- CH03 ----

def check_ch03_kv_bytes_per_token(answer: float | None, n_layers: int, n_kv_heads: int, head_dim: int,
                                  n_query_heads: int, bytes_per_value: int = 2) -> Feedback:
    """Check a learner's KV-cache bytes per token: 2 (keys and values) * layers * KV heads * head_dim * bytes.

    The feedback names the usual mistakes: counting the query heads instead of the key/value heads (that
    ignores grouped-query attention), forgetting that both keys and values are cached, or forgetting the layers.
    """
    if min(n_layers, n_kv_heads, head_dim, n_query_heads, bytes_per_value) < 1:
        raise ValueError("`n_layers`, `n_kv_heads`, `head_dim`, `n_query_heads` and `bytes_per_value` must be >= 1.")
    value = _number_answer(answer, "write the number of bytes the KV cache stores per token in `my_answer`")
    if isinstance(value, Feedback):
        return value
    expected = 2 * n_layers * n_kv_heads * head_dim * bytes_per_value
    if within(value, expected, 1e-6):
        return Feedback(True, f"{expected:,} bytes per token: keys and values, every layer, only the KV heads.")
    if n_query_heads != n_kv_heads and within(value, expected * n_query_heads / n_kv_heads, 1e-6):
        return Feedback(False, "You counted the query heads. With grouped-query attention several query heads share "
                               "one key/value head, and only the key/value heads are cached (config.num_key_value_heads).")
    if within(value, expected / 2, 1e-6):
        return Feedback(False, "Both keys and values are cached: count them twice.")
    if within(value, expected / n_layers, 1e-6):
        return Feedback(False, "That is one layer's worth: every decoder block keeps its own keys and values.")
    if within(value, expected / bytes_per_value, 1e-6):
        return Feedback(False, f"That counts values, not bytes: each value takes {bytes_per_value} bytes here.")
    return Feedback(False, f"{value:,.0f} is not it. Multiply: 2 (K and V) x layers x KV heads x head_dim x bytes per value.")


def check_ch03_glu_parameters(answer: float | None, hidden_size: int, intermediate_size: int, bias: bool = False) -> Feedback:
    """Check a learner's parameter count of one GLU MLP: gate and up (hidden x intermediate each) and down.

    Without biases the count is 3 * hidden_size * intermediate_size; the feedback recognizes the classic
    two-matrix MLP (2 * hidden * intermediate) and a single matrix.
    """
    if hidden_size < 1 or intermediate_size < 1:
        raise ValueError(f"`hidden_size` and `intermediate_size` must be >= 1, got {hidden_size}, {intermediate_size}.")
    value = _number_answer(answer, "write the number of parameters of one GLU MLP in `my_answer`")
    if isinstance(value, Feedback):
        return value
    expected = 3 * hidden_size * intermediate_size + (2 * intermediate_size + hidden_size if bias else 0)
    if within(value, expected, 1e-6):
        return Feedback(True, f"{expected:,}: three matrices of {hidden_size} x {intermediate_size}.")
    if within(value, 2 * hidden_size * intermediate_size, 1e-3):
        return Feedback(False, "That is the classic two-matrix MLP. A GLU MLP has three: gate_proj, up_proj and down_proj.")
    if within(value, hidden_size * intermediate_size, 1e-3):
        return Feedback(False, "That is one matrix. Count gate_proj, up_proj and down_proj.")
    return Feedback(False, f"{value:,.0f} is not it. Each of gate, up and down is a hidden x intermediate matrix.")


def check_ch03_least_changed_block(answer: int | None, mean_cosine: object) -> Feedback:
    """Check a learner's index of the block that changes the residual stream least (highest cos(input, output)).

    `mean_cosine` is the chapter's per-block mean cosine between a block's input and output. The feedback
    recognizes the opposite choice (the lowest cosine: the block that changes the stream most).
    """
    values = [float(v) for v in mean_cosine]
    if not values:
        raise ValueError("`mean_cosine` must hold one cosine per block; it is empty.")
    kind = "a block index (an integer)"
    value = _number_answer(answer, "write the index (0-based) of the block whose output is most like its input in "
                                   "`my_answer`", kind)
    if isinstance(value, Feedback):
        return value
    if value != int(value):
        return _wrong_kind(f"The answer must be {kind}, got {answer!r}.")
    index = int(value)
    if not 0 <= index < len(values):
        return Feedback(False, f"Block {index} does not exist: the indices run from 0 to {len(values) - 1}.")
    best = max(range(len(values)), key=values.__getitem__)
    if values[index] >= values[best] - 1e-9:
        return Feedback(True, f"Block {index}: cosine {values[index]:.3f}, the highest, so its output is closest to its input.")
    if index == min(range(len(values)), key=values.__getitem__):
        return Feedback(False, f"Block {index} has the lowest cosine: it changes the stream the most. Look for the highest.")
    if index == best + 1 or index == best - 1:
        return Feedback(False, f"Close: block {index} is a neighbour. Indices count from 0 (`mean_cosine[0]` is the first block).")
    return Feedback(False, f"Block {index} has cosine {values[index]:.3f}; another block's is higher. Use argmax of mean_cosine.")


# ---- CH04 ----

def check_ch04_select_lowest(select: object, scores: object, n: int) -> Feedback:
    """Check a learner's selection rule select(scores, n) -> the n blocks with the LOWEST scores, sorted.

    The function is called on the chapter's `scores` (one per block) and on a made-up example. The feedback
    recognizes taking the highest scores (the most important blocks), unsorted output and a wrong count.
    """
    values = [float(v) for v in scores]
    if not 1 <= n < len(values):
        raise ValueError(f"`n` must be in 1..{len(values) - 1} (fewer than the {len(values)} blocks), got {n}.")
    select = _function_answer(select, "define `def select(scores, n): ...` and set `my_select = select`",
                              "select(scores, n)")
    if isinstance(select, Feedback):
        return select
    for case, k in ((values, n), ([0.9, 0.1, 0.5, 0.05, 0.7, 0.3], 2)):
        expected = sorted(sorted(range(len(case)), key=case.__getitem__)[:k])
        try:
            returned = select(list(case), k)
            got = None if returned is None else _block_list(returned, "select(scores, n)")
        except Exception as error:  # the learner's code: report, do not crash the check
            return Feedback(False, f"Your function raised {type(error).__name__}: {error}.")
        if got is None:
            return Feedback(False, "Your function returned None: return a list of block indices.")
        if got != expected:
            highest = sorted(sorted(range(len(case)), key=case.__getitem__)[-k:])
            if len(got) != k:
                hint = f"It returned {len(got)} blocks; it must return exactly n = {k}."
            elif got == highest:
                hint = "You picked the highest scores: those are the blocks that matter most. Remove the lowest."
            else:
                hint = "Return the indices (positions) of the n smallest scores, not the scores themselves."
            return Feedback(False, f"On scores {[round(v, 3) for v in case]} with n={k} your rule chose {got}, expected "
                                   f"{expected}. {hint}")
        raw = select(list(case), k)
        if [int(v) for v in raw] != expected:
            return Feedback(False, f"Right blocks, but return them sorted ({expected}) so that the lists compare.")
    return Feedback(True, "Your rule picks the n least important blocks, as `select_by_importance` does.")


def check_ch04_block_influence(block_influence: object) -> Feedback:
    """Check a learner's block_influence(block_in, block_out, attention_mask) -> float, ShortGPT's score.

    Block influence is 1 - cos(input, output) per token, averaged over the real tokens (attention_mask 1)
    only. The check uses made-up hidden states with padding and recognizes returning the cosine itself and
    averaging over the padding too.
    """
    import torch

    block_influence = _function_answer(block_influence, "define `def block_influence(block_in, block_out, "
                                       "attention_mask): ...` and set `my_block_influence = block_influence`",
                                       "block_influence(block_in, block_out, attention_mask)")
    if isinstance(block_influence, Feedback):
        return block_influence
    generator = torch.Generator().manual_seed(0)
    block_in = torch.randn(2, 5, 8, generator=generator)
    block_out = block_in + 0.7 * torch.randn(2, 5, 8, generator=generator)
    block_out[1, 3:] = -block_in[1, 3:]  # padding positions with opposite directions: they must not count
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    cosine = torch.nn.functional.cosine_similarity(block_in, block_out, dim=-1)
    expected = float((1 - cosine)[mask.bool()].mean())
    try:
        value = float(block_influence(block_in.clone(), block_out.clone(), mask.clone()))
    except Exception as error:  # the learner's code: report, do not crash the check
        return Feedback(False, f"Your function raised {type(error).__name__}: {error}.")
    if abs(value - expected) < 1e-4:
        return Feedback(True, f"{value:.4f}: one minus the cosine, averaged over the real tokens only.")
    if abs(value - (1 - expected)) < 1e-4:
        return Feedback(False, "That is the mean cosine. Block influence is 1 - cosine: high when the block changes the stream.")
    if abs(value - float((1 - cosine).mean())) < 1e-4:
        return Feedback(False, "You averaged over the padding positions too. Keep only tokens where attention_mask is 1.")
    return Feedback(False, f"Got {value:.4f}, expected {expected:.4f}. Take the cosine over the last dimension (hidden size) "
                           "per token, then 1 - cosine, then the mean over real tokens.")


def check_ch04_angular_window(answer: object, angular_distance: object, n: int) -> Feedback:
    """Check a learner's window of n consecutive blocks to remove from Gromov et al.'s angular distances.

    Entry l of `angular_distance` is the distance between the input of block l and the output of block
    l+n-1; the window to remove starts at the argmin and holds n blocks. The feedback recognizes starting at
    the argmax, off-by-one windows and a wrong length.
    """
    distances = [float(v) for v in angular_distance]
    if not distances or n < 1:
        raise ValueError(f"`angular_distance` must be non-empty and `n` >= 1; got {len(distances)} entries, n={n}.")
    blocks = _blocks_answer(answer, "write the list of blocks to remove in `my_answer`, e.g. [10, 11, 12]")
    if isinstance(blocks, Feedback):
        return blocks
    start = min(range(len(distances)), key=distances.__getitem__)
    expected = list(range(start, start + n))
    if blocks == expected:
        return Feedback(True, f"Blocks {expected}: the window starting at the smallest angular distance "
                              f"({distances[start]:.3f}).")
    if len(blocks) != n:
        return Feedback(False, f"A window removes exactly n = {n} blocks; you listed {len(blocks)}.")
    if blocks != list(range(blocks[0], blocks[0] + n)):
        return Feedback(False, "The blocks of a window are consecutive.")
    top = max(range(len(distances)), key=distances.__getitem__)
    if blocks[0] == top:
        return Feedback(False, "That window has the LARGEST distance: it changes the stream most. Start at the argmin.")
    if abs(blocks[0] - start) == 1:
        return Feedback(False, f"Off by one: the window starts at index {start} of angular_distance (0-based), "
                               "the block whose input the distance is measured from.")
    return Feedback(False, f"That window starts at {blocks[0]} (distance {distances[blocks[0]]:.3f} if it exists); "
                           "another start has a smaller distance.")


# ---- CH05 ----

def check_ch05_removed_parameters(answer: float | None, hidden_size: int, width: int, keep: int, n_layers: int) -> Feedback:
    """Check a learner's count of parameters removed when every block's GLU MLP goes from `width` to `keep`.

    Each removed neuron takes one row of gate_proj, one row of up_proj and one column of down_proj:
    3 * hidden_size parameters (no biases), in each of the `n_layers` blocks. The feedback recognizes
    counting two matrices and forgetting the blocks.
    """
    if not 1 <= keep <= width or min(hidden_size, n_layers) < 1:
        raise ValueError(f"Need 1 <= keep <= width and hidden_size, n_layers >= 1; got keep={keep}, width={width}, "
                         f"hidden_size={hidden_size}, n_layers={n_layers}.")
    value = _number_answer(answer, "write the number of parameters removed from the whole model in `my_answer`")
    if isinstance(value, Feedback):
        return value
    per_neuron, removed = 3 * hidden_size, width - keep
    expected = per_neuron * removed * n_layers
    if within(value, expected, 1e-6):
        return Feedback(True, f"{expected:,}: {removed} neurons x 3 x {hidden_size} x {n_layers} blocks.")
    if within(value, expected * 2 / 3, 1e-6):
        return Feedback(False, "You counted two matrices. A GLU neuron lives in three: a row of gate_proj, a row of "
                               "up_proj and a column of down_proj.")
    if within(value, expected / n_layers, 1e-6):
        return Feedback(False, "That is one block. Every block's MLP is narrowed the same way.")
    if within(value, 3 * hidden_size * keep * n_layers, 1e-6):
        return Feedback(False, "That counts the neurons kept; the question asks for those removed.")
    return Feedback(False, f"{value:,.0f} is not it. One neuron = 3 x hidden_size parameters; count the removed ones in every block.")


def check_ch05_peak_to_peak(peak_to_peak: object, gate: object, up: object) -> Feedback:
    """Check a learner's peak_to_peak(gate, up) -> one score per neuron, the Peak-to-Peak Magnitude (MAW).

    For neuron i (row i of gate_proj.weight g and up_proj.weight u) the score is (max g_i + |min g_i|) +
    (max u_i + |min u_i|). The check compares with that on the given weights and recognizes a score per
    column (dimension 0 instead of 1) and the gate rows alone.
    """
    import torch

    peak_to_peak = _function_answer(peak_to_peak, "define `def peak_to_peak(gate, up): ...` and set "
                                    "`my_peak_to_peak = peak_to_peak`", "peak_to_peak(gate, up) -> Tensor")
    if isinstance(peak_to_peak, Feedback):
        return peak_to_peak
    gate, up = torch.as_tensor(gate).float(), torch.as_tensor(up).float()
    if gate.dim() != 2 or gate.shape != up.shape:
        raise ValueError(f"`gate` and `up` must be weight matrices of one shape; got {tuple(gate.shape)}, {tuple(up.shape)}.")
    expected = (gate.amax(1) + gate.amin(1).abs()) + (up.amax(1) + up.amin(1).abs())
    try:
        value = torch.as_tensor(peak_to_peak(gate.clone(), up.clone())).float().flatten()
    except Exception as error:  # the learner's code: report, do not crash the check
        return Feedback(False, f"Your function raised {type(error).__name__}: {error}.")
    if value.shape != expected.shape:
        return Feedback(False, f"Your scores have {value.numel()} entries; there must be one per neuron, "
                               f"{expected.numel()} (the rows of gate_proj.weight: reduce over dimension 1).")
    if torch.allclose(value, expected, rtol=1e-4, atol=1e-5):
        return Feedback(True, "One score per neuron: the peak-to-peak spread of its gate and up rows.")
    if torch.allclose(value, gate.amax(1) + gate.amin(1).abs(), rtol=1e-4, atol=1e-5):
        return Feedback(False, "You scored the gate rows only; add the same term for up_proj.")
    return Feedback(False, "Not the peak-to-peak score: per row, max + |min| of gate plus max + |min| of up.")


def check_ch05_kept_width(answer: float | None, width: int, percent: float, multiple: int) -> Feedback:
    """Check a learner's predicted GLU width kept when `percent` of `width` neurons go, rounded to `multiple`.

    The rule of `utils.width.target_intermediate_size`: width * (1 - percent / 100), rounded to the nearest
    multiple of `multiple`. The feedback recognizes the unrounded width, rounding up or down instead of to the
    nearest, and the number removed instead of kept.
    """
    if width < 1 or not 0 < percent < 100 or multiple < 1:
        raise ValueError(f"Need width >= 1, 0 < percent < 100 and multiple >= 1; got {width}, {percent}, {multiple}.")
    value = _number_answer(answer, "write the number of neurons each block keeps in `my_answer`")
    if isinstance(value, Feedback):
        return value
    import math

    target = width * (1 - percent / 100)
    expected = min(width, max(multiple, int(round(target / multiple)) * multiple))
    if value == expected:
        return Feedback(True, f"{expected} neurons: {target:g} rounded to the nearest multiple of {multiple}.")
    if abs(value - target) < 1:
        return Feedback(False, f"{target:g} is the unrounded width; round it to the nearest multiple of {multiple}.")
    if value in (math.floor(target / multiple) * multiple, math.ceil(target / multiple) * multiple):
        return Feedback(False, f"A multiple of {multiple}, but not the nearest one to {target:g}.")
    if abs(value - (width - target)) < multiple:
        return Feedback(False, "That is about the number removed; the question asks how many each block keeps.")
    return Feedback(False, f"{value:g} is not it: start from {width} x (1 - {percent}/100), then round to a multiple of {multiple}.")


# ---- CH06 ----

def check_ch06_lora_parameters(answer: object, d_in: int, d_out: int, rank: int, measured: int) -> Feedback:
    """Exercise: how many trainable parameters does LoRA of rank `rank` add to one d_in -> d_out linear layer?

    `measured` is the count read from the adapted model (lora_A plus lora_B of that layer). A wrong answer
    is diagnosed: the full d_in x d_out matrix, r x d_in x d_out, or only one of the two factors.
    """
    for name, value in (("d_in", d_in), ("d_out", d_out), ("rank", rank), ("measured", measured)):
        if int(value) != value or value < 1:
            raise ValueError(f"`{name}` must be a positive whole number, got {value!r}.")
    value = _number_answer(answer, "write your prediction in `my_answer` (a whole number of parameters)", "a number of parameters")
    if isinstance(value, Feedback):
        return value
    if value == measured:
        return Feedback(True, f"A is {rank} x {d_in} and B is {d_out} x {rank}: {rank} x ({d_in} + {d_out}) = "
                              f"{measured:,} parameters, the count peft created.")
    if value == d_in * d_out:
        return Feedback(False, "That is the size of the frozen weight W itself; LoRA trains two thin matrices beside it.")
    if value == rank * d_in * d_out:
        return Feedback(False, "r x d_in x d_out would be r full matrices. LoRA's update is B A with A of shape "
                               "r x d_in and B of shape d_out x r: count the entries of the two.")
    if value in (rank * d_in, rank * d_out):
        return Feedback(False, "You counted one of the two factors. The update is B A: count both A (r x d_in) and B (d_out x r).")
    return Feedback(False, f"{value:g} is not the count peft created. Hint: A is r x d_in, B is d_out x r, with r = {rank}.")


def check_ch06_merged_weight(merge: object) -> Feedback:
    """Exercise: implement `merge(W, A, B, alpha, rank)`, the merged weight W + (alpha / rank) B A.

    The function is run on random matrices of several shapes and compared with the reference; a missing
    scale, a product in the wrong order or a modified input is explained.
    """
    import torch

    merge = _function_answer(merge, "make your function `merge(W, A, B, alpha, rank)` return the merged weight", "merge(W, A, B, alpha, rank)")
    if isinstance(merge, Feedback):
        return merge
    generator = torch.Generator().manual_seed(0)
    for d_out, d_in, rank, alpha in ((6, 4, 2, 4.0), (5, 7, 3, 16.0)):
        W = torch.randn(d_out, d_in, generator=generator)
        A = torch.randn(rank, d_in, generator=generator)
        B = torch.randn(d_out, rank, generator=generator)
        copies = (W.clone(), A.clone(), B.clone())
        try:
            result = merge(W, A, B, alpha, rank)
        except Exception as error:  # a learner's code: report, do not raise
            return Feedback(False, f"Your function raised {type(error).__name__}: {error}. W is d_out x d_in, "
                                   "A is r x d_in, B is d_out x r.")
        if not all(torch.equal(a, b) for a, b in zip((W, A, B), copies)):
            return Feedback(False, "Your function changed its inputs in place; return a new tensor and leave W, A and B as they are.")
        if not isinstance(result, torch.Tensor) or result.shape != W.shape:
            return Feedback(False, f"The merged weight must be a tensor of W's shape {tuple(W.shape)}.")
        expected = W + (alpha / rank) * (B @ A)
        if torch.allclose(result, expected, atol=1e-5):
            continue
        if torch.allclose(result, W + B @ A, atol=1e-5):
            return Feedback(False, "The update is scaled: W + (alpha / r) B A. Your result leaves out alpha / r.")
        if torch.allclose(result, W, atol=1e-5):
            return Feedback(False, "The result is W unchanged: add the low-rank update (alpha / r) B A.")
        return Feedback(False, "The result differs from W + (alpha / r) B A. B A (d_out x r times r x d_in) has W's shape.")
    return Feedback(True, "W + (alpha / r) B A: after merging, the adapter is gone and the layer costs what it cost before.")


def check_ch06_adapter_megabytes(answer: object, trainable: int, measured_mb: float) -> Feedback:
    """Exercise: predict the adapter's size on disk (MB) from its trainable parameters; `measured_mb` is the
    size of the saved adapter. Within 10% (or 0.05 MB) counts; half of it (2 bytes a parameter) is diagnosed."""
    measured_mb = _measured_positive("measured_mb", measured_mb)
    trainable = int(_measured_positive("trainable", trainable))
    value = _number_answer(answer, "write your prediction in `my_answer`, in megabytes (1 MB = 1e6 bytes)", "a number of megabytes")
    if isinstance(value, Feedback):
        return value
    bytes_each = measured_mb * 1e6 / trainable
    # 10%, or 50 kB for a small adapter, whose file header (the tensor names) is a large share of it
    if abs(value - measured_mb) <= max(0.10 * measured_mb, 0.05):
        return Feedback(True, f"Saved: {measured_mb:.2f} MB, about {bytes_each:.1f} bytes per trainable parameter.")
    if within(value * 2, measured_mb, 0.10):
        return Feedback(False, f"Half of the {measured_mb:.2f} MB saved: peft keeps the adapter in float32 (4 bytes), not 2.")
    if within(value / 1e6, measured_mb, 0.10) or within(value * 1e6, measured_mb, 0.10):
        return Feedback(False, "Right digits, wrong unit: the answer is in megabytes (1e6 bytes).")
    return Feedback(False, f"The saved adapter takes {measured_mb:.2f} MB, about {bytes_each:.1f} bytes per trainable "
                           f"parameter ({trainable:,} of them). Which dtype do 4 bytes suggest?")


def check_ch06_rank_ratio(answer: object, trainable_low: float, trainable_high: float, low: int, high: int) -> Feedback:
    """Exercise: predict how many times more trainable parameters an all-linear adapter of rank `high` has
    than one of rank `low`; the two measured counts decide (LoRA's parameters grow linearly in r)."""
    trainable_low, trainable_high = _measured_positive("trainable_low", trainable_low), _measured_positive("trainable_high", trainable_high)
    low = check_int("low", low, minimum=1)
    high = check_int("high", high, minimum=low + 1)  # the larger rank
    value = _number_answer(answer, f"write your prediction of trainable(r={high}) / trainable(r={low}) in `my_answer`", "a number (a ratio)")
    if isinstance(value, Feedback):
        return value
    measured = trainable_high / trainable_low
    if within(value, measured, 0.02):
        return Feedback(True, f"Measured ratio {measured:.2f}: every adapted layer holds r x (d_in + d_out) parameters, linear in r.")
    if within(value, (high / low) ** 2, 0.02):
        return Feedback(False, "Squared: but neither A (r x d_in) nor B (d_out x r) grows with r in two dimensions.")
    return Feedback(False, f"The measured ratio is {measured:.2f}. Count the parameters of A and B as a function of r.")


# ---- CH07 ----

def check_ch07_kv_bytes(answer: object, kv_base: float, kv_bypassed: float, n_layers: int, bypassed: int) -> Feedback:
    """Exercise: predict the KV-cache bytes per token after bypassing `bypassed` of `n_layers` attention
    sublayers, from the base model's `kv_base`; `kv_bypassed` is the measured value (within 1% counts)."""
    kv_base, kv_bypassed = _measured_positive("kv_base", kv_base), _measured_positive("kv_bypassed", kv_bypassed)
    if not 0 < bypassed < n_layers:
        raise ValueError(f"`bypassed` must lie in 1..n_layers-1 = {n_layers - 1}, got {bypassed}.")
    value = _number_answer(answer, "write your prediction of the KV-cache bytes per token in `my_answer`", "a number of bytes")
    if isinstance(value, Feedback):
        return value
    if within(value, kv_bypassed, 0.01):
        return Feedback(True, f"{kv_bypassed:,.0f} bytes per token: the {n_layers - bypassed} remaining attention "
                              "sublayers each keep their keys and values, the bypassed ones keep nothing.")
    if within(value, kv_base, 0.01):
        return Feedback(False, "That is the base model's cache: a bypassed block has no attention, so it writes no keys or values.")
    if within(value, kv_base * bypassed / n_layers, 0.01):
        return Feedback(False, "That is the part of the cache that disappears, not what remains.")
    return Feedback(False, f"Each block's attention keeps the same bytes per token ({kv_base / n_layers:,.0f} here); "
                           f"{bypassed} of {n_layers} no longer do.")


def check_ch07_lowest_k(select: object, scores: Sequence[float], k: int) -> Feedback:
    """Exercise: implement the one-shot rule `select(scores, k)`: the indices of the k lowest scores (the
    least important attention sublayers). Run on the chapter's scores and on random ones."""
    import torch

    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    if not 0 < k < len(scores):
        raise ValueError(f"`k` must lie in 1..{len(scores) - 1}, got {k}.")
    select = _function_answer(select, "make your function `select(scores, k)` return the k block indices", "select(scores, k)")
    if isinstance(select, Feedback):
        return select
    generator = torch.Generator().manual_seed(0)
    for trial, case in enumerate((scores, torch.rand(12, generator=generator, dtype=torch.float64))):
        kk = k if trial == 0 else 3
        try:
            chosen = select(case.clone(), kk)
            chosen = [int(i) for i in (chosen.tolist() if hasattr(chosen, "tolist") else chosen)]
        except Exception as error:  # a learner's code: report, do not raise
            return Feedback(False, f"Your function raised or returned something that is not a list of indices "
                                   f"({type(error).__name__}: {error}).")
        expected = set(case.argsort()[:kk].tolist())
        if set(chosen) == expected and len(chosen) == kk:
            continue
        if set(chosen) == set(case.argsort(descending=True)[:kk].tolist()):
            return Feedback(False, "You picked the highest scores: those are the sublayers that turn the stream most, the last to bypass.")
        if len(chosen) != kk:
            return Feedback(False, f"Return exactly k = {kk} block indices, got {len(chosen)}.")
        if not all(0 <= i < len(case) for i in chosen):
            return Feedback(False, "Return block indices (positions in `scores`), not score values.")
        return Feedback(False, "Not the k lowest scores. Sort the indices by score (argsort) and take the first k.")
    return Feedback(True, "The k least important attention sublayers: the chapter's one-shot selection.")


def check_ch07_better_method(answer: object, ratios: Mapping[str, float]) -> Feedback:
    """Exercise: predict which selection method gives the lower held-out perplexity (`ratios` maps each
    method to its measured perplexity / base)."""
    if not ratios:
        raise ValueError("`ratios` must map at least one method to its measured perplexity ratio.")
    answer = _choice_answer(answer, f"write one of {sorted(ratios)} in `my_answer`", list(ratios))
    if isinstance(answer, Feedback):
        return answer
    best = min(ratios, key=lambda name: ratios[name])
    measured = ", ".join(f"{name}: {value:.3f}x" for name, value in ratios.items())
    if answer == best:
        return Feedback(True, f"Measured: {measured}.")
    return Feedback(False, f"Measured: {measured}. The greedy search re-measures after each choice and sees what "
                           "earlier choices took away; the one-shot score judges each sublayer alone. Which one did "
                           "better here, and at this budget, why?")


def check_ch07_kv_limit(answer: object, n_layers: int, bypassed: int) -> Feedback:
    """Exercise: the ideal decode speedup when the KV cache is all a step reads, after bypassing `bypassed`
    of `n_layers` attention sublayers: n / (n - bypassed)."""
    if not 0 < bypassed < n_layers:
        raise ValueError(f"`bypassed` must lie in 1..n_layers-1 = {n_layers - 1}, got {bypassed}.")
    value = _number_answer(answer, "write the ideal speedup in `my_answer` (a ratio such as 1.2)", "a number (a ratio)")
    if isinstance(value, Feedback):
        return value
    expected = n_layers / (n_layers - bypassed)
    if within(value, expected, 0.005):
        return Feedback(True, f"{n_layers} / {n_layers - bypassed} = {expected:.3f}: a step reads the cache of "
                              f"{n_layers - bypassed} attention sublayers instead of {n_layers}.")
    if within(value, (n_layers - bypassed) / n_layers, 0.005):
        return Feedback(False, "That is the share of bytes left; the speedup is its inverse (old time over new time).")
    if within(value, 1 + bypassed / n_layers, 0.005):
        return Feedback(False, "1 + k/n adds the removed share; time scales with the bytes read, so divide: n / (n - k).")
    return Feedback(False, "Time per step is proportional to the bytes read; the speedup is bytes before over bytes after.")


# ---- CH08a ----

def check_ch08a_more_skips(answer: object, allocation: Mapping[str, int]) -> Feedback:
    """Exercise: predict which kind of input the allocation lets skip more attention sublayers."""
    if len(allocation) < 2:
        raise ValueError(f"`allocation` must map at least two kinds to their skips, got {dict(allocation)}.")
    answer = _choice_answer(answer, f"write one of {sorted(allocation)} in `my_answer`", list(allocation))
    if isinstance(answer, Feedback):
        return answer
    most = max(allocation.values())
    shown = ", ".join(f"{kind}: {k}" for kind, k in allocation.items())
    if allocation[answer] == most:
        return Feedback(True, f"Allocation: {shown}. That kind's loss curve stays flat for longer as attention goes.")
    return Feedback(False, f"Allocation: {shown}. Look at the loss curves: which kind's loss climbs first as attention sublayers go?")


def check_ch08a_allocation(allocate: object, curves: Mapping[str, Sequence[float]], budget: int,
                           weights: Mapping[str, float]) -> Feedback:
    """Exercise: implement `allocate(curves, budget, weights)` for inputs of each kind in equal numbers: whole
    skips per kind averaging exactly `budget`, minimizing the weighted loss sum(weights[kind] * curves[kind][k]).
    Checked against `utils.routing.allocate_skips` on the chapter's curves and on a synthetic case."""
    import torch

    from .routing import allocate_skips

    allocate = _function_answer(allocate, "make your function `allocate(curves, budget, weights)` return {kind: skips}", "allocate(curves, budget, weights)")
    if isinstance(allocate, Feedback):
        return allocate
    synthetic = ({"a": [0.0, 0.1, 0.2, 0.9], "b": [0.0, 0.5, 1.0, 1.5]}, 1, {"a": 0.5, "b": 0.5})
    for case_curves, case_budget, case_weights in ((curves, budget, weights), synthetic):
        tensors = {kind: torch.as_tensor(curve, dtype=torch.float64) for kind, curve in case_curves.items()}
        expected = allocate_skips(tensors, case_budget, input_shares={kind: 1 for kind in tensors}, token_weights=case_weights)
        try:
            result = allocate({kind: list(map(float, curve)) for kind, curve in tensors.items()}, case_budget, dict(case_weights))
            result = {kind: int(k) for kind, k in dict(result).items()}
        except Exception as error:  # a learner's code: report, do not raise
            return Feedback(False, f"Your function raised or returned no mapping kind -> skips ({type(error).__name__}: {error}).")
        if result == expected:
            continue
        if set(result) != set(expected):
            return Feedback(False, f"Return one whole number of skips per kind, for exactly the kinds {sorted(expected)}.")
        mean = sum(result.values()) / len(result)
        if abs(mean - case_budget) > 1e-9:
            return Feedback(False, f"Your skips average {mean:g}, not the budget {case_budget}: the constraint is the mean over kinds.")
        loss = lambda ks: sum(case_weights[kind] * float(tensors[kind][k]) for kind, k in ks.items())
        if loss(result) > loss(expected) + 1e-12:
            return Feedback(False, f"Your allocation {result} meets the budget but its weighted loss {loss(result):.4f} is "
                                   f"higher than {loss(expected):.4f} for another split: try every split that meets the budget.")
        return Feedback(False, f"Your allocation {result} differs from {expected} (ties: take the first split found when "
                               "counting the first kind's skips up from 0).")
    return Feedback(True, "Every whole split that meets the average, the one with the lowest expected loss: the chapter's allocation.")


def check_ch08a_batch_skips(answer: object, skip_sets: Mapping[str, Sequence[int]], measured: int) -> Feedback:
    """Exercise: predict how many attention sublayers a batch holding one input of each kind skips (the
    model skips only the sublayers every row's skip set contains); `measured` is what the model did."""
    sets = [set(map(int, s)) for s in skip_sets.values()]
    if not sets:
        raise ValueError("`skip_sets` must map each kind to its skip set.")
    value = _number_answer(answer, "write a whole number of attention sublayers in `my_answer`", "a whole number")
    if isinstance(value, Feedback):
        return value
    common = set.intersection(*sets)
    if value == measured:
        return Feedback(True, f"{measured}: only the sublayers every row may skip ({sorted(common)}), since the whole batch "
                              "runs one forward.")
    if value == len(set.union(*sets)):
        return Feedback(False, "That is the union: skipping a sublayer that one row needs would hurt that row. The batch "
                               "can only skip what all rows agree on.")
    if value in {len(s) for s in sets}:
        return Feedback(False, "That is one kind's skip set; the batch holds both kinds and runs one forward for both.")
    return Feedback(False, f"The model skipped {measured}. Which sublayers are in every row's skip set?")


# ---- CH08b ----

def check_ch08b_bias_metric(metric: object, gaps: object, expected: float) -> Feedback:
    """Exercise: implement `metric(gaps)` (gaps: Tensor[n_pairs, 2], the stereotype gap of side A and side B):
    the bias, the mean over pairs of |gap A - gap B|. `expected` is the chapter's value on the same gaps."""
    import torch

    gaps = torch.as_tensor(gaps, dtype=torch.float64)
    if gaps.dim() != 2 or gaps.shape[1] != 2 or len(gaps) == 0:
        raise ValueError(f"`gaps` must have shape [n_pairs >= 1, 2], got {tuple(gaps.shape)}.")
    metric = _function_answer(metric, "make your function `metric(gaps)` return one number", "metric(gaps)")
    if isinstance(metric, Feedback):
        return metric
    try:
        value = _finite_float(metric(gaps.clone()))
    except Exception as error:  # a learner's code: report, do not raise
        return Feedback(False, f"Your function raised {type(error).__name__}: {error}.")
    if value is None:
        return Feedback(False, "Your function must return one number (a float or a 0-d tensor).")
    if abs(value - expected) <= 1e-6 * max(1.0, abs(expected)):
        return Feedback(True, f"{expected:.4f} nats: zero only when swapping the attribute never moves the preference.")
    difference = gaps[:, 0] - gaps[:, 1]
    if abs(value - float(difference.mean())) <= 1e-6 * max(1.0, abs(value)):
        return Feedback(False, "That is the signed mean: pairs that lean opposite ways cancel. The bias takes the absolute "
                               "difference of each pair first.")
    if abs(value - float(gaps.abs().mean())) <= 1e-6 * max(1.0, abs(value)):
        return Feedback(False, "That is the mean size of the gaps themselves. The bias compares the two sides of a pair: "
                               "|gap A - gap B|.")
    return Feedback(False, "Not the chapter's bias. Per pair: |gap(side A) - gap(side B)|; then the mean over pairs.")


def check_ch08b_budget_choice(answer: object, counts: Sequence[int], bias_ratio: Sequence[float],
                              ppl_ratio: Sequence[float], max_ppl_ratio: float) -> Feedback:
    """Exercise: from the trade-off curve, the neuron count with the lowest held-out bias among those whose
    perplexity stays within `max_ppl_ratio` of the base (count 0, the base, always qualifies)."""
    if not (len(counts) == len(bias_ratio) == len(ppl_ratio)) or not counts:
        raise ValueError("`counts`, `bias_ratio` and `ppl_ratio` must be non-empty and of the same length.")
    kind = f"one of the measured neuron counts {list(counts)}"
    value = _number_answer(answer, f"write a neuron count in `my_answer`, {kind}", kind)
    if isinstance(value, Feedback):
        return value
    if int(value) not in counts:
        return Feedback(False, f"The answer must be {kind}, got {answer!r}.")
    allowed = [(b, c) for c, b, p in zip(counts, bias_ratio, ppl_ratio) if p <= max_ppl_ratio]
    best = min(allowed)[1] if allowed else None
    row = {c: (b, p) for c, b, p in zip(counts, bias_ratio, ppl_ratio)}
    chosen_bias, chosen_ppl = row[int(value)]
    if int(value) == best:
        return Feedback(True, f"{best} neurons: bias {chosen_bias:.3f}x the base at perplexity {chosen_ppl:.3f}x.")
    if chosen_ppl > max_ppl_ratio:
        return Feedback(False, f"At {int(value)} neurons perplexity is {chosen_ppl:.3f}x the base, over the limit of {max_ppl_ratio:g}x.")
    return Feedback(False, f"{int(value)} neurons keep perplexity within the limit, but another count allowed by it has "
                           "a lower bias: read both panels.")


def check_ch08b_random_change(answer: object, measured_change: float, fair_change: float) -> Feedback:
    """Exercise: predict the change of held-out bias (in %) when as many random neurons are pruned as the
    fair score chose. Within 5 percentage points of `measured_change` counts; `fair_change` (the fair
    score's change) explains a prediction that expected random neurons to work as well."""
    measured_change = check_number("measured_change", measured_change)
    fair_change = check_number("fair_change", fair_change)
    value = _number_answer(answer, "write your prediction in `my_answer`, in percent (for example -3 for a 3% drop)", "a number of percent")
    if isinstance(value, Feedback):
        return value
    if abs(value - measured_change) <= 5:
        return Feedback(True, f"Random neurons change the bias by {measured_change:+.1f}% (the fair score: {fair_change:+.1f}%): "
                              "a few random neurons among tens of thousands barely touch the preference.")
    if abs(value - fair_change) <= 5 and abs(fair_change - measured_change) > 5:
        return Feedback(False, f"That is about what the fair score achieved ({fair_change:+.1f}%); random neurons "
                               f"changed it by {measured_change:+.1f}%. The choice of neurons is what does the work.")
    return Feedback(False, f"Measured: {measured_change:+.1f}% for random neurons, against {fair_change:+.1f}% for the fair score.")

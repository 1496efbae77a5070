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


def _number(answer: object, name: str) -> float | None:
    """`answer` as a float, or None when the learner has not answered yet (None); a clear error otherwise."""
    if answer is None:
        return None
    if isinstance(answer, bool) or not isinstance(answer, (int, float)):
        try:
            return float(answer)  # numpy and torch scalars
        except (TypeError, ValueError):
            raise ValueError(f"`{name}` must be a number (or None while you think), got {answer!r}.") from None
    return float(answer)


def _not_yet(what: str) -> Feedback:
    """The feedback for an exercise not attempted yet: what to write in the answer cell."""
    return Feedback(False, f"No answer yet: {what}, then run this cell again.")


def _blocks(answer: object, name: str) -> list[int] | None:
    """`answer` as a sorted list of block indices, or None when not answered yet; a clear error otherwise."""
    if answer is None:
        return None
    try:
        values = [int(value) for value in answer]
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a list of block indices (integers), got {answer!r}.") from None
    return sorted(values)


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
    value = _number(answer, "answer")
    if value is None:
        return _not_yet("write your percentage in `my_answer` (a number such as 12.5)")
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
    value = _number(answer, "answer")
    if value is None:
        return _not_yet("write your predicted speedup in `my_answer` (for example 1.3)")
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
    if recovery is None:
        return _not_yet("define `def recovery(base, pruned, healed): ...` and set `my_recovery = recovery`")
    if not callable(recovery):
        raise ValueError(f"`recovery` must be a function recovery(base, pruned, healed), got {recovery!r}.")
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
    value = _number(answer, "answer")
    if value is None:
        return _not_yet("write the number of bytes the KV cache stores per token in `my_answer`")
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
    value = _number(answer, "answer")
    if value is None:
        return _not_yet("write the number of parameters of one GLU MLP in `my_answer`")
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
    if answer is None:
        return _not_yet("write the index (0-based) of the block whose output is most like its input in `my_answer`")
    if isinstance(answer, bool) or not isinstance(answer, int) and not hasattr(answer, "__index__"):
        raise ValueError(f"`answer` must be a block index (an integer), got {answer!r}.")
    index = int(answer)
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
    if select is None:
        return _not_yet("define `def select(scores, n): ...` and set `my_select = select`")
    if not callable(select):
        raise ValueError(f"`select` must be a function select(scores, n), got {select!r}.")
    values = [float(v) for v in scores]
    if not 1 <= n < len(values):
        raise ValueError(f"`n` must be in 1..{len(values) - 1} (fewer than the {len(values)} blocks), got {n}.")
    for case, k in ((values, n), ([0.9, 0.1, 0.5, 0.05, 0.7, 0.3], 2)):
        expected = sorted(sorted(range(len(case)), key=case.__getitem__)[:k])
        try:
            got = _blocks(select(list(case), k), "select(scores, n)")
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

    if block_influence is None:
        return _not_yet("define `def block_influence(block_in, block_out, attention_mask): ...` and set "
                        "`my_block_influence = block_influence`")
    if not callable(block_influence):
        raise ValueError(f"`block_influence` must be a function (block_in, block_out, attention_mask), got {block_influence!r}.")
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
    blocks = _blocks(answer, "answer")
    if blocks is None:
        return _not_yet("write the list of blocks to remove in `my_answer`, e.g. [10, 11, 12]")
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
    value = _number(answer, "answer")
    if value is None:
        return _not_yet("write the number of parameters removed from the whole model in `my_answer`")
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

    if peak_to_peak is None:
        return _not_yet("define `def peak_to_peak(gate, up): ...` and set `my_peak_to_peak = peak_to_peak`")
    if not callable(peak_to_peak):
        raise ValueError(f"`peak_to_peak` must be a function (gate, up) -> Tensor, got {peak_to_peak!r}.")
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
    value = _number(answer, "answer")
    if value is None:
        return _not_yet("write the number of neurons each block keeps in `my_answer`")
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

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
from typing import Mapping, Sequence


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


def _answer_missing(answer: object, what: str) -> Feedback | None:
    """The feedback for an exercise not yet answered (`answer` is None), else None."""
    if answer is None:
        return Feedback(False, f"Replace `None` with {what}, then run the cell again.")
    return None


def _as_number(answer: object) -> float | None:
    """`answer` as a finite float, or None where it is not a finite real number."""
    import math
    import numbers

    if isinstance(answer, bool) or not isinstance(answer, numbers.Real):
        try:  # a 0-d tensor or numpy scalar
            answer = float(answer)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return None
    value = float(answer)
    return value if math.isfinite(value) else None


def _measured_positive(name: str, value: float) -> float:
    value = float(value)
    if not value > 0:
        raise ValueError(f"`{name}` must be a positive number (the chapter's measured value), got {value}.")
    return value


# ---- CH06 ----

def check_ch06_lora_parameters(answer: object, d_in: int, d_out: int, rank: int, measured: int) -> Feedback:
    """Exercise: how many trainable parameters does LoRA of rank `rank` add to one d_in -> d_out linear layer?

    `measured` is the count read from the adapted model (lora_A plus lora_B of that layer). A wrong answer
    is diagnosed: the full d_in x d_out matrix, r x d_in x d_out, or only one of the two factors.
    """
    for name, value in (("d_in", d_in), ("d_out", d_out), ("rank", rank), ("measured", measured)):
        if int(value) != value or value < 1:
            raise ValueError(f"`{name}` must be a positive whole number, got {value!r}.")
    missing = _answer_missing(answer, "a whole number of parameters")
    if missing:
        return missing
    value = _as_number(answer)
    if value is None:
        return Feedback(False, f"The answer must be a number of parameters, got {answer!r}.")
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

    missing = _answer_missing(merge, "your function `merge(W, A, B, alpha, rank)`")
    if missing:
        return missing
    if not callable(merge):
        return Feedback(False, f"The answer must be a function merge(W, A, B, alpha, rank), got {type(merge).__name__}.")
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
    missing = _answer_missing(answer, "your prediction in megabytes (1 MB = 1e6 bytes)")
    if missing:
        return missing
    value = _as_number(answer)
    if value is None:
        return Feedback(False, f"The answer must be a number of megabytes, got {answer!r}.")
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
    missing = _answer_missing(answer, f"the ratio trainable(r={high}) / trainable(r={low})")
    if missing:
        return missing
    value = _as_number(answer)
    if value is None:
        return Feedback(False, f"The answer must be a number (a ratio), got {answer!r}.")
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
    missing = _answer_missing(answer, "your prediction of the KV-cache bytes per token")
    if missing:
        return missing
    value = _as_number(answer)
    if value is None:
        return Feedback(False, f"The answer must be a number of bytes, got {answer!r}.")
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
    missing = _answer_missing(select, "your function `select(scores, k)`")
    if missing:
        return missing
    if not callable(select):
        return Feedback(False, f"The answer must be a function select(scores, k), got {type(select).__name__}.")
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
    missing = _answer_missing(answer, f"one of {sorted(ratios)}")
    if missing:
        return missing
    if answer not in ratios:
        return Feedback(False, f"The answer must be one of {sorted(ratios)}, got {answer!r}.")
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
    missing = _answer_missing(answer, "the ideal speedup (a ratio such as 1.2)")
    if missing:
        return missing
    value = _as_number(answer)
    if value is None:
        return Feedback(False, f"The answer must be a number, got {answer!r}.")
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
    missing = _answer_missing(answer, f"one of {sorted(allocation)}")
    if missing:
        return missing
    if answer not in allocation:
        return Feedback(False, f"The answer must be one of {sorted(allocation)}, got {answer!r}.")
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

    missing = _answer_missing(allocate, "your function `allocate(curves, budget, weights)`")
    if missing:
        return missing
    if not callable(allocate):
        return Feedback(False, f"The answer must be a function allocate(curves, budget, weights), got {type(allocate).__name__}.")
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
    missing = _answer_missing(answer, "a whole number of attention sublayers")
    if missing:
        return missing
    value = _as_number(answer)
    if value is None:
        return Feedback(False, f"The answer must be a whole number, got {answer!r}.")
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
    missing = _answer_missing(metric, "your function `metric(gaps)`")
    if missing:
        return missing
    if not callable(metric):
        return Feedback(False, f"The answer must be a function metric(gaps), got {type(metric).__name__}.")
    try:
        value = _as_number(metric(gaps.clone()))
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
    missing = _answer_missing(answer, f"a neuron count, one of {list(counts)}")
    if missing:
        return missing
    value = _as_number(answer)
    if value is None or int(value) not in counts:
        return Feedback(False, f"The answer must be one of the measured neuron counts {list(counts)}, got {answer!r}.")
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
    missing = _answer_missing(answer, "your prediction in percent (for example -3 for a 3% drop)")
    if missing:
        return missing
    value = _as_number(answer)
    if value is None:
        return Feedback(False, f"The answer must be a number of percent, got {answer!r}.")
    if abs(value - measured_change) <= 5:
        return Feedback(True, f"Random neurons change the bias by {measured_change:+.1f}% (the fair score: {fair_change:+.1f}%): "
                              "a few random neurons among tens of thousands barely touch the preference.")
    if abs(value - fair_change) <= 5 and abs(fair_change - measured_change) > 5:
        return Feedback(False, f"That is about what the fair score achieved ({fair_change:+.1f}%); random neurons "
                               f"changed it by {measured_change:+.1f}%. The choice of neurons is what does the work.")
    return Feedback(False, f"Measured: {measured_change:+.1f}% for random neurons, against {fair_change:+.1f}% for the fair score.")

"""Timing and cost: how fast a model runs, and how fast the hardware says it could run.

One clock for the whole course (`stopwatch`): it synchronizes the device before every read and reads
both the wall clock and this process's CPU clock; nothing else in the course reads a clock to time model
work. On top of it, one timing helper (`interleaved_samples`): the variants to compare run in interleaved
rounds (a, b, c, a, b, c, ...) after warm-up rounds, and the result keeps every sample so a median can be
shown with its spread. `measure_speed` (time to first token and decode speed) uses it, and so do the
chapters' own comparisons and the benchmark scripts; `measure_speed_rounds` compares the decode speed of
several models the same way, one run of each per round. `timed_call` times a one-off cost once, with both
clocks.

One cost model: `decode_bytes` (what a decode step must read: decoder-block weights, LM head and the KV
cache of the context) and `prefill_flops` (what a prefill must compute), read from the model itself, so
a pruned, narrowed or bypassed model is costed as it is, and every measured number can stand beside
its hardware limit (the bytes or FLOPs over the card's bandwidth or throughput).

Eager single-token decoding with transformers is launch-bound on a GPU: the card waits for Python and
kernel launches, not for memory, so its tokens/s sit far below `decode_bytes` / bandwidth.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable, ContextManager, Mapping, Sequence

import torch
from torch import nn

from .checks import check_callable, check_int
from .models import (
    architecture_summary,
    cache_argument_name,
    decoder_layers,
    last_logits_only,
    model_device,
    output_cache,
)

# ---------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------

def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for the device's queued work, so a clock read after it measures work done (no-op on a CPU)."""
    device = torch.device(device) if device is not None else None
    if (device is None and torch.cuda.is_available()) or (device is not None and device.type == "cuda"):
        torch.cuda.synchronize(device)


def stopwatch(device: torch.device | str | None = None) -> Callable[[], dict[str, float]]:
    """Start a stopwatch; returns a function that reads the seconds since: {"wall_s": ..., "cpu_s": ...}.

    The one place of the course that reads clocks to time work. The device's queued work is waited for
    (`synchronize`) when the stopwatch starts and at every read, so the seconds are those of work done, not
    of work queued. `wall_s` is wall-clock time; `cpu_s` is this process's CPU time (all its threads), which
    a shared, loaded machine inflates less. Usage: `elapsed = stopwatch()`, do the work, `elapsed()["wall_s"]`.
    A device of "cpu" waits for nothing (for timing a child process, say); None waits for the current CUDA
    device where there is one.
    """
    if device is not None and not isinstance(device, (str, torch.device)):
        raise TypeError(f"`device` must be a torch.device, a name such as 'cuda:0', or None, got {type(device).__name__}.")
    synchronize(device)
    cpu_start = time.process_time()
    wall_start = time.perf_counter()

    def elapsed() -> dict[str, float]:
        synchronize(device)
        wall = time.perf_counter() - wall_start
        return {"wall_s": wall, "cpu_s": time.process_time() - cpu_start}

    return elapsed


def interleaved_samples(runs: Mapping[str, Callable[[], object]], repeats: int = 5,
                        warmup: int = 1) -> dict[str, list[float]]:
    """Wall-clock seconds of every call of each callable, timed in interleaved rounds (a, b, c, a, b, c, ...).

    Interleaving spreads slow phases of a shared machine over every contender instead of penalizing one.
    `warmup` rounds are run and discarded; `repeats` rounds are kept. Each call is timed by a `stopwatch`
    (CUDA work synchronized before each clock read). A run whose work includes set-up that must not count (filling a cache, say) times
    itself and returns its seconds as a float; that float is then recorded instead of the call's time.
    Returns {name: [seconds of each kept round]}.
    """
    if not runs or isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"interleaved timing needs at least one run and an integer repeats >= 1, got {len(runs)} "
                         f"runs and repeats={repeats!r}.")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}.")
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_number in range(warmup + repeats):
        for name, run in runs.items():
            elapsed = stopwatch()
            result = run()
            seconds = elapsed()["wall_s"]
            if round_number >= warmup:
                times[name].append(result if isinstance(result, float) else seconds)
    return times


def interleaved_timings(runs: Mapping[str, Callable[[], object]], repeats: int = 5,
                        warmup: int = 1) -> dict[str, float]:
    """Median wall-clock seconds of each callable, timed by `interleaved_samples` (interleaved rounds,
    warm-up discarded, device synchronized)."""
    return {name: statistics.median(values) for name, values in interleaved_samples(runs, repeats, warmup).items()}


@torch.no_grad()
def greedy_tokens(model: nn.Module, input_ids: torch.Tensor, new_tokens: int,
                  on_first_token: Callable[[], None] | None = None) -> torch.Tensor:
    """Greedy decoding with the KV cache as a plain loop (prefill, then one token per step); returns the
    new token ids [rows, new_tokens].

    The loop every speed measurement of the course times. Like transformers' `generate`, the prefill asks
    for the logits of the last position only (`utils.models.last_logits_only`).
    `on_first_token()` is called right after the prefill has produced the first token (after a device
    synchronization), so a caller can read a clock there for the time to first token.
    """
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
        raise ValueError(f"`new_tokens` must be an integer >= 1, got {new_tokens!r}.")
    device = model_device(model)
    ids = torch.as_tensor(input_ids).to(device)
    ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
    cache_name = cache_argument_name(model)
    output = model(input_ids=ids, use_cache=True, **last_logits_only(model))
    generated = [output.logits[:, -1:].argmax(-1)]
    if on_first_token is not None:
        synchronize(device)
        on_first_token()
    for _ in range(new_tokens - 1):
        output = model(input_ids=generated[-1], use_cache=True, **{cache_name: output_cache(output)})
        generated.append(output.logits[:, -1:].argmax(-1))
    return torch.cat(generated, dim=1)


@torch.no_grad()
def measure_speed(model: nn.Module, prompt_tokens: int = 128, new_tokens: int = 32, batch_size: int = 1,
                  warmup: int = 1, repeats: int = 5, seed: int = 0) -> dict[str, float]:
    """Time to first token and decode speed of greedy generation with the KV cache, median of repeats.

    The prompt is `batch_size` rows of `prompt_tokens` random token ids (fixed `seed`, so every model
    sees the same input). One run = `greedy_tokens`: a prefill forward pass (time to first token)
    followed by `new_tokens - 1` single-token decode steps; the decode time excludes the prefill.
    `warmup` runs are discarded. Works on CPU and CUDA (clocks are read after a device synchronization).
    Also returns the decode step's bytes (`decode_bytes` at the prompt length) and the bandwidth the
    median step achieved: compare it with the card's peak memory bandwidth.
    """
    if new_tokens < 2 or prompt_tokens < 1 or repeats < 1:
        raise ValueError("measure_speed needs new_tokens >= 2, prompt_tokens >= 1 and repeats >= 1.")
    device = model_device(model)
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (batch_size, prompt_tokens), generator=generator).to(device)
    ttft, decode = [], []

    def run() -> None:
        elapsed = stopwatch(device)
        first: dict[str, float] = {}
        greedy_tokens(model, prompt, new_tokens, on_first_token=lambda: first.update(elapsed()))
        total = elapsed()["wall_s"]
        ttft.append(first["wall_s"])
        decode.append(total - first["wall_s"])

    interleaved_samples({"run": run}, repeats=repeats, warmup=warmup)
    ttft_s = statistics.median(ttft[warmup:])
    decode_s = statistics.median(decode[warmup:])
    step_bytes = decode_bytes(model, context=prompt_tokens + new_tokens // 2, batch_size=batch_size)
    return {
        "ttft_ms": 1000 * ttft_s,
        "prefill_tokens_per_s": batch_size * prompt_tokens / ttft_s,
        "decode_tokens_per_s": batch_size * (new_tokens - 1) / decode_s,
        "decode_bytes_per_step": step_bytes,
        "decode_bytes_per_s": step_bytes * (new_tokens - 1) / decode_s,
        "batch_size": batch_size, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeats": repeats,
    }


def measure_speed_rounds(models: Mapping[str, nn.Module], rounds: int = 3, warmup: int = 1,
                         contexts: Mapping[str, Callable[[], ContextManager]] | None = None,
                         **settings) -> dict[str, list[dict[str, float]]]:
    """`measure_speed` of several models, compared fairly: one run of every model per round, in interleaved
    rounds (a, b, c, a, b, c, ...), so that a slow moment of the machine hits every model alike.

    Each model also runs `warmup` discarded runs in the first round. `settings` go to `measure_speed`
    (prompt_tokens, new_tokens, batch_size, seed); `contexts[name]()`, where given, is a context manager
    entered around that model's runs (a hook that zeroes attention, say). Returns {name: [measure_speed's
    result of each round]}: compare the models' medians over the rounds (`median_over_rounds`), and read
    the spread of one model's rounds as how much this machine's timings move.
    """
    if not models:
        raise ValueError("`models` is empty: pass {name: model} for at least one model.")
    rounds = check_int("rounds", rounds, minimum=1)
    warmup = check_int("warmup", warmup, minimum=0)
    contexts = dict(contexts or {})
    unknown = sorted(set(contexts) - set(models))
    if unknown:
        raise ValueError(f"`contexts` names {unknown}, which are not in `models` ({', '.join(models)}).")
    for name, context in contexts.items():
        check_callable(f"contexts[{name!r}]", context, "a function that returns a context manager")
    reserved = sorted({"repeats", "warmup"} & set(settings))
    if reserved:
        raise ValueError(f"{reserved} cannot be settings here: each round runs every model once (`rounds`), and "
                         "`warmup` is this function's own argument.")
    results: dict[str, list[dict[str, float]]] = {name: [] for name in models}
    for round_index in range(rounds):
        for name, model in models.items():
            with contexts[name]() if name in contexts else contextlib.nullcontext():
                results[name].append(measure_speed(model, warmup=warmup if round_index == 0 else 0, repeats=1,
                                                   **settings))
    return results


def median_over_rounds(results: Mapping[str, Sequence[Mapping[str, float]]],
                       key: str = "decode_tokens_per_s") -> dict[str, float]:
    """The median over the rounds of one quantity of `measure_speed_rounds`'s results, per model."""
    for name, rows in results.items():
        if not rows or any(key not in row for row in rows):
            raise ValueError(f"{name!r} has no {key!r} in every round: pass the result of measure_speed_rounds and one "
                             "of measure_speed's keys, such as 'decode_tokens_per_s' or 'ttft_ms'.")
    return {name: statistics.median(row[key] for row in rows) for name, rows in results.items()}


# ---------------------------------------------------------------------------------------------------
# The KV cache, measured
# ---------------------------------------------------------------------------------------------------

def _cache_layers(cache) -> Sequence[object]:
    """The layers of a transformers Cache (DynamicCache, StaticCache...), or a TypeError naming `cache`."""
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, (list, tuple)):
        raise TypeError(f"cache must be a transformers KV cache (a Cache such as DynamicCache, with .layers), "
                        f"got {type(cache).__name__}.")
    return layers


def kv_cache_bytes(cache) -> int:
    """Bytes held by the key and value tensors of a KV cache (a transformers Cache), counted from the
    tensors themselves: empty slots and dummy layers count 0."""
    total = 0
    for layer in _cache_layers(cache):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def filled_cache_layers(cache) -> int:
    """Number of cache slots that hold key/value tensors with at least one token."""
    return sum(1 for layer in _cache_layers(cache)
               if isinstance(getattr(layer, "keys", None), torch.Tensor) and layer.keys.numel() > 0)


@torch.no_grad()
def kv_cache_bytes_per_token(model: nn.Module, tokens: int = 64, batch_size: int = 1) -> float:
    """KV-cache bytes per token, measured: one forward pass with the cache over `batch_size` rows of
    `tokens` token ids, then the bytes of the cache's tensors divided by the number of tokens.

    Keep `tokens` below any sliding window, or sliding layers will hold fewer tokens than were fed.
    """
    tokens = check_int("tokens", tokens, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    device = model_device(model)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, tokens), generator=torch.Generator().manual_seed(0))
    output = model(input_ids=ids.to(device), use_cache=True)
    return kv_cache_bytes(output_cache(output)) / (batch_size * tokens)


# ---------------------------------------------------------------------------------------------------
# The cost model
# ---------------------------------------------------------------------------------------------------

def attention_layer_count(model: nn.Module) -> int:
    """Decoder blocks that still compute attention (a bypassed block has no q_proj left)."""
    return sum(1 for block in decoder_layers(model)
               if any(isinstance(m, nn.Linear) and name.endswith("q_proj") for name, m in block.named_modules()))


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the weights a forward pass reads, in their current dtype: {"blocks", "lm_head", "total"}.

    The embedding table is looked up row by row (a few rows a step), so it is not counted; the LM head
    (tied or not) is one full matrix-vector product per token.
    """
    blocks = sum(p.numel() * p.element_size() for p in decoder_layers(model).parameters())
    head = model.get_output_embeddings().weight
    lm_head = head.numel() * head.element_size()
    return {"blocks": blocks, "lm_head": lm_head, "total": blocks + lm_head}


def decode_bytes(model: nn.Module, context: int, batch_size: int = 1) -> float:
    """Bytes one decode step must read at least: every weight of the decoder blocks and the LM head once,
    plus the KV cache of `context` tokens in each of `batch_size` rows.

    The KV-cache bytes per token are computed from the config of the layers that still hold attention,
    in the dtype of the model's weights. Divided by the card's memory bandwidth, this is the fastest a
    step can be: the bytes ideal. Ratios of it between two models are the ideal speedup of decoding.
    """
    context = check_int("context", context, minimum=0)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    shape = architecture_summary(model.config)
    element = next(model.parameters()).element_size()
    kv_per_token = 2 * attention_layer_count(model) * shape["kv heads"] * shape["head dim"] * element
    return float(weight_bytes(model)["total"] + kv_per_token * context * batch_size)


def matmul_parameters(model: nn.Module) -> int:
    """Parameters every token multiplies with: the decoder blocks' linear layers plus the LM head."""
    blocks = sum(m.weight.numel() for m in decoder_layers(model).modules() if isinstance(m, nn.Linear))
    return blocks + model.get_output_embeddings().weight.numel()


def prefill_flops(model: nn.Module, tokens: int, batch_size: int = 1, all_logits: bool = True) -> float:
    """FLOPs of a causal prefill of `tokens` tokens in each of `batch_size` rows.

    2 FLOPs per multiply-add: every linear weight of the blocks once per token, the causal attention
    scores and weighted sum (QK^T and AV, half of the T x T square each) in every block that still has
    attention, and the LM head for every token (`all_logits`) or only the last one. Divided by the card's
    throughput, this is the fastest a prefill can be: the FLOP ideal.
    """
    tokens = check_int("tokens", tokens, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    shape = architecture_summary(model.config)
    head = model.get_output_embeddings().weight.numel()
    linear = matmul_parameters(model) - head
    attention = 2 * 2 * tokens * tokens / 2 * shape["heads"] * shape["head dim"] * attention_layer_count(model)
    lm_head = 2 * head * (tokens if all_logits else 1)
    return float(batch_size * (2 * linear * tokens + attention + lm_head))


def timed_call(function: Callable[[], object]) -> tuple[object, dict[str, float]]:
    """Run `function()` once and return (its result, {"wall_s": ..., "cpu_s": ...}).

    For one-off costs such as a selection method's search, where repeating the work to take a median
    would cost as much as the work: wall-clock seconds (the device synchronized before each clock read)
    and this process's CPU seconds (all its threads), so that a run on a shared, loaded machine can be
    read by its CPU time when its wall time is inflated by other processes. Timed by a `stopwatch`.
    """
    check_callable("function", function, "called with no arguments (use a lambda)")
    elapsed = stopwatch()
    result = function()
    return result, elapsed()

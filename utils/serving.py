"""Served decoding: a decode step the way a serving engine runs it, measured against the card's limits.

Eager single-token decoding with transformers is launch-bound on a GPU (the card waits for Python and
kernel launches), so its speedups say little about a deployed model. A serving engine runs each decode
step with a static KV cache (fixed addresses) and a captured step (a CUDA graph: the whole step's kernels
replayed with one launch), which brings a batch-1 step close to its memory-bandwidth limit. This module
builds that step for any model the course makes (the base model, blocks removed by `utils.depth`, GLU
neurons removed by `utils.width`, attention bypassed by `utils.bypass`, or an adaptive model of
`utils.routing` with the skip set its router chose), times it with the course's one timing helper
(`utils.speed.interleaved_samples`), and reports each run's bytes per second against the card's peak
memory bandwidth, read from `CARDS` (overridable). On a CPU the same step runs eagerly and the same report
is made (with the bandwidth the caller gives, or a measured copy bandwidth).

The decode step attends with `decode_attention`: for a single new token, the query heads that share a
key/value head are folded into that head's query rows, so the KV cache is read once, at its own size,
instead of being copied once per query head (what transformers' SDPA path does under a mask).
"""

from __future__ import annotations

import inspect
import statistics
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .bypass_modeling import attention_only_modules, is_bypassed
from .checks import check_bool, check_in, check_int, check_module, check_number, check_numbers, check_str
from .models import architecture_summary, cache_argument_name, decoder_layers, model_device
from .speed import interleaved_samples, prefill_flops

# ---------------------------------------------------------------------------------------------------
# The cards: peak memory bandwidth (bytes/s) and dense bf16 (fp16 where the card has no bf16) tensor
# throughput (FLOP/s), from the vendors' datasheets. Keys are matched, longest first, against the name
# torch reports (torch.cuda.get_device_name), case-insensitively.
# ---------------------------------------------------------------------------------------------------

CARDS: dict[str, dict[str, float]] = {
    # NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200): 4.8 TB/s HBM3e; BF16 1,979 TFLOPS with sparsity -> 989 dense
    "H200": {"memory_bytes_per_s": 4.8e12, "bf16_flops_per_s": 989e12},
    # NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100): SXM 3.35 TB/s, 989 TFLOPS dense BF16; PCIe 2.0 TB/s, 756
    "H100 PCIe": {"memory_bytes_per_s": 2.0e12, "bf16_flops_per_s": 756e12},
    "H100": {"memory_bytes_per_s": 3.35e12, "bf16_flops_per_s": 989e12},
    # NVIDIA A100 datasheet (nvidia.com/en-us/data-center/a100): 40GB 1,555 GB/s, 80GB SXM 2,039 GB/s, BF16 312 TFLOPS dense
    "A100-SXM4-80GB": {"memory_bytes_per_s": 2.039e12, "bf16_flops_per_s": 312e12},
    "A100 80GB PCIe": {"memory_bytes_per_s": 1.935e12, "bf16_flops_per_s": 312e12},
    "A100": {"memory_bytes_per_s": 1.555e12, "bf16_flops_per_s": 312e12},
    # NVIDIA L4 datasheet: 300 GB/s GDDR6, BF16 242 TFLOPS with sparsity -> 121 dense
    "L4": {"memory_bytes_per_s": 300e9, "bf16_flops_per_s": 121e12},
    # NVIDIA L40S datasheet: 864 GB/s, BF16 733 TFLOPS with sparsity -> 366 dense
    "L40S": {"memory_bytes_per_s": 864e9, "bf16_flops_per_s": 366e12},
    # NVIDIA A10 / A10G (AWS) datasheet: 600 GB/s, BF16 125 TFLOPS dense
    "A10": {"memory_bytes_per_s": 600e9, "bf16_flops_per_s": 125e12},
    # NVIDIA T4 datasheet: 320 GB/s GDDR6, FP16 65 TFLOPS (no bf16 tensor cores: the chapters run T4s in fp16)
    "T4": {"memory_bytes_per_s": 320e9, "bf16_flops_per_s": 65e12},
    # NVIDIA V100 SXM2 datasheet: 900 GB/s HBM2, FP16 125 TFLOPS
    "V100": {"memory_bytes_per_s": 900e9, "bf16_flops_per_s": 125e12},
    # GeForce RTX 4090 (Ada whitepaper): 1,008 GB/s GDDR6X, 165.2 TFLOPS dense BF16 (FP32 accumulate)
    "RTX 4090": {"memory_bytes_per_s": 1008e9, "bf16_flops_per_s": 165.2e12},
    # GeForce RTX 3090 (Ampere GA102 whitepaper): 936 GB/s GDDR6X, 71 TFLOPS dense BF16 (FP32 accumulate)
    "RTX 3090": {"memory_bytes_per_s": 936e9, "bf16_flops_per_s": 71e12},
}


def device_name(device: torch.device | str | None = None) -> str:
    """The name of the device: the CUDA card's name as torch reports it, or "cpu"."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def card_peaks(card: str | None = None, memory_bytes_per_s: float | None = None,
               bf16_flops_per_s: float | None = None) -> dict[str, object]:
    """The peak memory bandwidth and dense bf16 throughput of a card, from `CARDS`, or as given.

    `card` is a name such as torch reports it ("NVIDIA H200", "Tesla T4"); None means the current device.
    The longest key of `CARDS` found in the name (case-insensitive) wins. `memory_bytes_per_s` and
    `bf16_flops_per_s` override the table (for a card it lacks, a CPU, or a measured ceiling). Returns
    {"card", "table_key", "memory_bytes_per_s", "bf16_flops_per_s"}; a peak that is neither in the table
    nor given is None. Raises a ValueError for an override that is not a positive number.
    """
    for name, value in (("memory_bytes_per_s", memory_bytes_per_s), ("bf16_flops_per_s", bf16_flops_per_s)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
            raise ValueError(f"`{name}` must be a positive number (bytes or FLOPs per second), got {value!r}.")
    name = card if card is not None else device_name()
    matches = [key for key in CARDS if key.lower() in name.lower()]
    key = max(matches, key=len) if matches else None
    row = CARDS.get(key, {})
    return {"card": name, "table_key": key,
            "memory_bytes_per_s": float(memory_bytes_per_s or row.get("memory_bytes_per_s") or 0) or None,
            "bf16_flops_per_s": float(bf16_flops_per_s or row.get("bf16_flops_per_s") or 0) or None}


@torch.no_grad()
def copy_bandwidth(device: torch.device | str, megabytes: int = 256, repeats: int = 5) -> float:
    """Measured memory bandwidth of `device` in bytes/s: a copy of `megabytes` MB between two buffers
    (bytes read plus bytes written), median of `repeats` interleaved timings. The practical ceiling a
    decode step can reach on this machine (on a CPU, where no datasheet peak applies)."""
    if isinstance(megabytes, bool) or not isinstance(megabytes, int) or megabytes < 1:
        raise ValueError(f"`megabytes` must be an integer >= 1, got {megabytes!r}.")
    source = torch.randn(megabytes * 2**20 // 4, device=device)
    target = torch.empty_like(source)
    seconds = interleaved_samples({"copy": lambda: target.copy_(source)}, repeats=repeats, warmup=1)["copy"]
    return 2 * source.numel() * source.element_size() / statistics.median(seconds)


# ---------------------------------------------------------------------------------------------------
# What a served decode step reads
# ---------------------------------------------------------------------------------------------------

def running_attention_blocks(model: nn.Module) -> list[int]:
    """Decoder blocks whose attention runs (not removed, not bypassed statically or by an adaptive router's
    current skip set)."""
    return [index for index, block in enumerate(decoder_layers(model))
            if not is_bypassed(block) and hasattr(block, "self_attn")]


def step_bytes(model: nn.Module, context: int, batch_size: int = 1) -> dict[str, float]:
    """Bytes one decode step reads at least, counting only the modules that run: {"weights", "kv_cache", "total"}.

    Weights: every parameter of the decoder blocks, except the attention modules of bypassed blocks
    (an adaptive model keeps those weights but does not read them while its skip set holds), plus the LM
    head. KV cache: keys and values of `context` tokens in each of `batch_size` rows, for every block whose
    attention runs, in the weights' dtype. For a model without bypassed blocks this equals
    `utils.speed.decode_bytes`.
    """
    check_module("model", model)
    context = check_int("context", context, minimum=0)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    shape = architecture_summary(model.config)
    element = next(model.parameters()).element_size()
    weights = 0
    for block in decoder_layers(model):
        skipped = set(attention_only_modules(block)) if is_bypassed(block) and hasattr(block, "self_attn") else set()
        weights += sum(p.numel() * p.element_size() for name, p in block.named_parameters()
                       if name.split(".")[0] not in skipped)
    head = model.get_output_embeddings().weight
    weights += head.numel() * head.element_size()
    kv = 2 * len(running_attention_blocks(model)) * shape["kv heads"] * shape["head dim"] * element * context * batch_size
    return {"weights": float(weights), "kv_cache": float(kv), "total": float(weights + kv)}


# ---------------------------------------------------------------------------------------------------
# Attention for a single new token: the KV cache read once
# ---------------------------------------------------------------------------------------------------

DECODE_ATTENTION = "rearch_decode"
DECODE_ATTENTION_MATMUL = "rearch_decode_matmul"


def decode_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """Attention in transformers' attention-function form, for decode steps of grouped-query attention.

    query [rows, heads, q_len, d], key/value [rows, kv_heads, kv_len, d] (the whole static cache) ->
    output [rows, q_len, heads, d]. With q_len 1, the `heads / kv_heads` query heads of each group become
    the query rows of their key/value head ([rows, kv_heads, group, d]), so SDPA reads each cached key and
    value once and may use its flash kernel when no mask is given. Any other call (a prefill, a mask with a
    query dimension) goes to transformers' own SDPA function. `dropout` must be 0 (transformers passes 0
    in eval mode): a served step never drops attention weights.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if check_number("dropout", dropout) != 0.0:
        raise ValueError(f"dropout must be 0.0 for decode attention (an inference kernel: run the model in eval "
                         f"mode), got {dropout}.")
    rows, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    mask_is_per_query = attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[1] != 1
    if q_len != 1 or heads % kv_heads or mask_is_per_query or kwargs.get("softcap") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    grouped = query.reshape(rows, kv_heads, heads // kv_heads, dim)
    mask = attention_mask[..., : key.shape[-2]] if attention_mask is not None else None
    if kwargs.get("split_by_matmul"):
        # two batched matrix products (scores, then the weighted sum): cuBLAS spreads the work over the whole
        # context, where a fused attention kernel gives one block of threads to each (row, key/value head)
        scores = torch.matmul(grouped, key.transpose(-1, -2)).float() * (scaling if scaling is not None else dim ** -0.5)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        output = torch.matmul(scores.softmax(-1).to(value.dtype), value)
    else:
        output = F.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, scale=scaling, is_causal=False)
    return output.reshape(rows, heads, 1, dim).transpose(1, 2), None


def decode_attention_matmul(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            **kwargs) -> tuple[torch.Tensor, None]:
    """`decode_attention` computed as two batched matrix products (scores, softmax in float32, weighted sum)
    instead of one fused SDPA kernel: the better choice when few (row, key/value head) pairs share a long
    cache, e.g. batch 1 at a long context, where the fused kernel runs on few of the card's processors."""
    return decode_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                            split_by_matmul=True, **kwargs)


def register_decode_attention(matmul: bool = False) -> str:
    """Register `decode_attention` (or, with `matmul`, `decode_attention_matmul`) with transformers (the
    attention function, and SDPA's mask function) under the name `DECODE_ATTENTION` (or
    `DECODE_ATTENTION_MATMUL`), and return that name (repeated calls change nothing)."""
    matmul = check_bool("matmul", matmul)
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    name, function = ((DECODE_ATTENTION_MATMUL, decode_attention_matmul) if matmul
                      else (DECODE_ATTENTION, decode_attention))
    AttentionInterface.register(name, function)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    return name


@contextmanager
def attention_implementation(model: nn.Module, name: str) -> Iterator[nn.Module]:
    """Run `model` (and its decoder stack) with attention implementation `name` inside the block; the
    previous implementation is restored afterwards, also on error.

    `name` is "eager" or an implementation registered with transformers' AttentionInterface ("sdpa",
    `DECODE_ATTENTION` once `register_decode_attention` ran...); anything else is refused before the
    model is touched (transformers would only fail at the next forward pass).
    """
    from transformers import AttentionInterface

    check_module("model", model)
    check_str("name", name)
    check_in("name", name, ["eager", *AttentionInterface().valid_keys()])
    configs = {id(c): c for c in (model.config, getattr(getattr(model, "model", None), "config", None)) if c is not None}
    previous = {key: config._attn_implementation for key, config in configs.items()}
    try:
        for config in configs.values():
            config._attn_implementation = name
        yield model
    finally:
        for key, config in configs.items():
            config._attn_implementation = previous[key]


# ---------------------------------------------------------------------------------------------------
# The served decode step
# ---------------------------------------------------------------------------------------------------

ATTENTIONS = ("decode", "matmul", "sdpa")
MODES = ("auto", "graph", "eager")


def check_step_arguments(batch_size: int, context: int, mode: str, attention: str) -> None:
    """Raise a ValueError naming the argument when a served step's settings are out of range."""
    for name, value in (("batch_size", batch_size), ("context", context)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}.")
    if attention not in ATTENTIONS:
        raise ValueError(f"`attention` must be one of {ATTENTIONS}, got {attention!r}.")


def filled_static_cache(model: nn.Module, batch_size: int, context: int, max_cache_len: int, seed: int = 0):
    """A transformers StaticCache of `max_cache_len` tokens holding `context` random tokens (keys and values
    drawn from N(0, 1)) in the slot of every block whose attention runs; the other slots stay unallocated.
    `context` must fit in the cache: 0..max_cache_len."""
    from transformers import StaticCache

    check_module("model", model)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    max_cache_len = check_int("max_cache_len", max_cache_len, minimum=1)
    context = check_int("context", context, 0, max_cache_len)
    seed = check_int("seed", seed)
    shape = architecture_summary(model.config)
    parameter = next(model.parameters())
    generator = torch.Generator(device=parameter.device).manual_seed(seed)
    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    blocks = decoder_layers(model)
    for index in running_attention_blocks(model):
        keys = torch.randn(batch_size, shape["kv heads"], context, shape["head dim"], device=parameter.device,
                           dtype=parameter.dtype, generator=generator)
        values = torch.randn(keys.shape, device=parameter.device, dtype=parameter.dtype, generator=generator)
        cache.update(keys, values, blocks[index].self_attn.layer_idx)
    return cache


HOOK_TABLES = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called")


@contextmanager
def python_hooks_suspended(model: nn.Module) -> Iterator[nn.Module]:
    """Suspend the forward hooks of `model` and its submodules inside the block (restored afterwards).

    A replayed CUDA graph runs kernels only, never Python, so hooks cannot act in a captured step anyway;
    and an adaptive model's router hooks (`utils.routing`), which decide only at prefill, read the cache
    length on the host, which a capture forbids. Capturing with them suspended records exactly the step
    the model runs with the skip set it holds.
    """
    check_module("model", model, allow_meta=True)
    saved = []
    for module in model.modules():
        for table in HOOK_TABLES:
            hooks = getattr(module, table, None)
            if hooks:
                saved.append((hooks, dict(hooks)))
                hooks.clear()
    try:
        yield model
    finally:
        for hooks, entries in saved:
            hooks.update(entries)


@torch.no_grad()
def served_decode_step(model: nn.Module, batch_size: int = 1, context: int = 128, mode: str = "auto",
                       attention: str = "decode", seed: int = 0) -> Callable[[], torch.Tensor]:
    """One greedy decode step at position `context`, built the way a server runs it; returns a callable.

    A StaticCache of `context + 1` tokens is filled with `context` random tokens (`filled_static_cache`),
    so the step attends to exactly its context. Each call restores the cache's length, feeds the current
    tokens [batch_size, 1], writes slot `context`, and feeds the argmax of the logits back as the next
    tokens: the same work every call, and a real greedy step. `mode="graph"` captures the step as a CUDA
    graph after warm-up (a call replays it); `"eager"` runs the model each call; `"auto"` is graph on a
    CUDA device and eager elsewhere. `attention="decode"` uses `decode_attention` (the cache read once),
    `"matmul"` `decode_attention_matmul` (the same as two matrix products), `"sdpa"` transformers' own.
    The model runs as it is now: an adaptive model (`utils.routing`) keeps the skip set it holds (apply one
    first), since a filled cache makes its router decide nothing (in graph mode its hooks are suspended for
    the warm-up and the capture: `python_hooks_suspended`). The callable carries `.mode`, `.cache`,
    `.logits` and `.tokens` (the next input).
    """
    check_step_arguments(batch_size, context, mode, attention)
    device = model_device(model)
    if mode == "auto":
        mode = "graph" if device.type == "cuda" else "eager"
    if mode == "graph" and device.type != "cuda":
        raise ValueError(f"`mode='graph'` needs a model on a CUDA device; this one is on {device}. Use 'eager' or 'auto'.")
    implementation = "sdpa" if attention == "sdpa" else register_decode_attention(matmul=attention == "matmul")
    cache = filled_static_cache(model, batch_size, context, context + 1, seed)
    tokens = torch.randint(0, model.config.vocab_size, (batch_size, 1), device=device,
                           generator=torch.Generator(device=device).manual_seed(seed))
    kwargs = {cache_argument_name(model): cache, "use_cache": True, "logits_to_keep": 1,
              "position_ids": torch.full((batch_size, 1), context, device=device, dtype=torch.long)}
    if "cache_position" in inspect.signature(model.forward).parameters:  # transformers before 5.2x
        kwargs["cache_position"] = torch.tensor([context], device=device, dtype=torch.long)
    lengths = [layer.cumulative_length for layer in getattr(cache, "layers", [])
               if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor) and getattr(layer, "is_initialized", False)]
    logits = torch.empty(batch_size, 1, model.config.vocab_size, device=device, dtype=next(model.parameters()).dtype)

    @torch.no_grad()
    def forward() -> torch.Tensor:
        for length in lengths:
            length.fill_(context)
        out = model(input_ids=tokens, **kwargs).logits
        logits.copy_(out)
        tokens.copy_(out[:, -1:].argmax(-1))
        return logits

    # a captured step runs no Python, so its warm-up runs as it will: without hooks (a whole-model compile then
    # compiles here, not inside the capture)
    with attention_implementation(model, implementation), \
            (python_hooks_suspended(model) if mode == "graph" else nullcontext()):
        forward()  # allocates what the step needs once, outside any capture
        if mode == "graph":
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    forward()
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                forward()

    if mode == "graph":
        def step() -> torch.Tensor:
            graph.replay()
            return logits
        step.graph = graph
    else:
        def step() -> torch.Tensor:
            with attention_implementation(model, implementation):
                return forward()
    step.mode, step.cache, step.logits, step.tokens = mode, cache, logits, tokens
    return step


COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
COMPILE_SCOPES = ("pieces", "model")


def has_forward_hooks(model: nn.Module) -> bool:
    """Whether `model` or any submodule holds a forward (pre-)hook: an adaptive router, a capture, a probe."""
    check_module("model", model, allow_meta=True)
    return any(getattr(module, table, None) for module in model.modules() for table in HOOK_TABLES)


def compile_blocks(model: nn.Module, mode: str = "max-autotune-no-cudagraphs", scope: str = "pieces") -> nn.Module:
    """Compile `model` in place with `torch.compile`'s `mode`, by pieces of each block or as a whole; returns it.

    `scope="pieces"` compiles what holds no cache in every block (the MLP, the norms, the attention's linear
    projections); attention, rotary embedding, residual additions and cache writes stay eager, and blocks of
    one shape share the code. `scope="model"` compiles the whole `forward` as one graph, as transformers and
    gpt-fast compile a static-cache decoder, so Inductor also fuses the rotary embedding, the residual
    additions and the query/key/value products that share an input; it compiles longer. A compiled graph
    keeps the hooks it was traced with and ignores later ones, so the whole-model graph runs only while the
    model holds no forward hook (`has_forward_hooks`); a call with hooks (an adaptive model's router at
    prefill, a capture) runs the eager forward, and the hooks act. A served decode step captures with the
    hooks suspended (`python_hooks_suspended`), so an adaptive model's step runs the compiled graph of the
    skip set it holds; another skip set swaps block classes and makes torch.compile trace once more. With
    "max-autotune-no-cudagraphs" each matrix-vector product's kernel is picked by timing; the graph of a
    `served_decode_step` built afterwards replays the compiled kernels (the graph is ours, hence no
    "cudagraphs" in the mode). Compilation happens at the first call without hooks.
    """
    check_module("model", model)
    if mode not in COMPILE_MODES:
        raise ValueError(f"`mode` must be one of {COMPILE_MODES}, got {mode!r}.")
    if scope not in COMPILE_SCOPES:
        raise ValueError(f"`scope` must be one of {COMPILE_SCOPES}, got {scope!r}.")
    if scope == "model":
        eager = model.forward
        compiled = torch.compile(eager, mode=mode, dynamic=False)

        def forward(*args, **kwargs):
            return eager(*args, **kwargs) if has_forward_hooks(model) else compiled(*args, **kwargs)
        model.forward = forward
        return model
    for block in decoder_layers(model):
        for name, child in block.named_children():
            if name == "mlp" or name.endswith("norm"):
                child.compile(mode=mode, dynamic=False)
            elif name == "self_attn":
                for projection in child.children():
                    if isinstance(projection, nn.Linear):
                        projection.compile(mode=mode, dynamic=False)
    return model


# ---------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------

def spread(values: list[float]) -> dict[str, float]:
    """Median, minimum, maximum and the interquartile range of a non-empty list of samples."""
    ordered = sorted(check_numbers("values", values))
    quartiles = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else [ordered[0]] * 3
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1],
            "q1": quartiles[0], "q3": quartiles[2]}


def served_decode_report(models: Mapping[str, nn.Module], batch_size: int = 1, context: int = 128,
                         steps: int = 20, repeats: int = 7, warmup: int = 2, mode: str = "auto",
                         attention: str = "decode", peaks: Mapping[str, object] | None = None,
                         baseline: str | None = None, progress: bool = False) -> dict[str, object]:
    """Time a served decode step (`served_decode_step`) of each model, interleaved, and report it against
    the bytes it must read and the card's peak memory bandwidth.

    Each sample is `steps` calls of the step (the device synchronized around it), `warmup` rounds
    discarded and `repeats` kept (`utils.speed.interleaved_samples`). Per model: milliseconds per step
    (median, min, max, quartiles), `step_bytes`, the bytes ideal (bytes / peak), achieved bytes/s and its
    fraction of the peak, and against `baseline` (default: the first model) the measured speedup, the bytes
    ideal speedup and their ratio. `peaks` is a `card_peaks` result (default: the current device's); a peak
    that is None leaves the fractions None. Raises a ValueError for no models, an unknown baseline, or
    settings out of range.
    """
    check_step_arguments(batch_size, context, mode, attention)
    for name, value in (("steps", steps), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
    if not models:
        raise ValueError("`models` must name at least one model.")
    baseline = baseline if baseline is not None else next(iter(models))
    if baseline not in models:
        raise ValueError(f"`baseline` must be one of {list(models)}, got {baseline!r}.")
    device = model_device(next(iter(models.values())))
    peaks = dict(peaks) if peaks is not None else card_peaks(device_name(device))
    bandwidth = peaks.get("memory_bytes_per_s")
    step_functions = {name: served_decode_step(model, batch_size, context, mode, attention)
                      for name, model in tqdm(models.items(), desc="capturing steps", disable=not progress)}

    def run(step: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def many() -> None:
            for _ in range(steps):
                step()
        return many

    samples = interleaved_samples({name: run(step) for name, step in step_functions.items()}, repeats=repeats,
                                  warmup=warmup)
    rows = {}
    for name, model in models.items():
        ms = spread([1000 * s / steps for s in samples[name]])
        moved = step_bytes(model, context + 1, batch_size)
        achieved = moved["total"] / (ms["median"] / 1000)
        rows[name] = {"ms_per_step": ms, "tokens_per_s": batch_size * 1000 / ms["median"], "bytes": moved,
                      "achieved_bytes_per_s": achieved,
                      "fraction_of_peak": achieved / bandwidth if bandwidth else None,
                      "ideal_ms": 1000 * moved["total"] / bandwidth if bandwidth else None}
    for name, row in rows.items():
        row["speedup"] = rows[baseline]["ms_per_step"]["median"] / row["ms_per_step"]["median"]
        row["ideal_speedup"] = rows[baseline]["bytes"]["total"] / row["bytes"]["total"]
        row["speedup_over_ideal"] = row["speedup"] / row["ideal_speedup"]
    modes = {step.mode for step in step_functions.values()}
    del step_functions
    return {"mode": modes.pop() if len(modes) == 1 else sorted(modes), "attention": attention,
            "batch_size": batch_size, "context": context, "steps_per_sample": steps, "repeats": repeats,
            "warmup": warmup, "baseline": baseline, "card": peaks.get("card"),
            "memory_bytes_per_s": bandwidth, "models": rows}


@torch.no_grad()
def prefill_report(models: Mapping[str, nn.Module], tokens: int = 4096, batch_size: int = 1, repeats: int = 5,
                   warmup: int = 1, peaks: Mapping[str, object] | None = None,
                   baseline: str | None = None) -> dict[str, object]:
    """Time one prefill forward pass (no cache, logits of the last position) of each model, interleaved,
    against its FLOP ideal (`utils.speed.prefill_flops`) and the card's peak bf16 throughput.

    Per model: milliseconds (median and spread), FLOPs, achieved FLOP/s and its fraction of the peak, and
    against `baseline` (default: the first) the measured speedup, the FLOP ideal speedup and their ratio.
    Prefill is compute-bound: kernel launches are a small part of it, so it runs eagerly.
    """
    check_step_arguments(batch_size, tokens, "eager", "sdpa")
    if not models:
        raise ValueError("`models` must name at least one model.")
    baseline = baseline if baseline is not None else next(iter(models))
    if baseline not in models:
        raise ValueError(f"`baseline` must be one of {list(models)}, got {baseline!r}.")
    device = model_device(next(iter(models.values())))
    peaks = dict(peaks) if peaks is not None else card_peaks(device_name(device))
    throughput = peaks.get("bf16_flops_per_s")
    ids = torch.randint(0, next(iter(models.values())).config.vocab_size, (batch_size, tokens),
                        generator=torch.Generator().manual_seed(0)).to(device)
    samples = interleaved_samples({name: (lambda m=model: m(input_ids=ids, use_cache=False, logits_to_keep=1))
                                   for name, model in models.items()}, repeats=repeats, warmup=warmup)
    rows = {}
    for name, model in models.items():
        ms = spread([1000 * s for s in samples[name]])
        flops = prefill_flops(model, tokens, batch_size, all_logits=False)
        achieved = flops / (ms["median"] / 1000)
        rows[name] = {"ms": ms, "flops": flops, "achieved_flops_per_s": achieved,
                      "fraction_of_peak": achieved / throughput if throughput else None}
    for name, row in rows.items():
        row["speedup"] = rows[baseline]["ms"]["median"] / row["ms"]["median"]
        row["ideal_speedup"] = rows[baseline]["flops"] / row["flops"]
        row["speedup_over_ideal"] = row["speedup"] / row["ideal_speedup"]
    return {"tokens": tokens, "batch_size": batch_size, "repeats": repeats, "warmup": warmup, "baseline": baseline,
            "card": peaks.get("card"), "bf16_flops_per_s": throughput, "models": rows}


def relation_to_ideal(measured: float, ideal: float, tolerance: float = 0.05) -> str:
    """The word a sentence may use for a measured speedup against its ideal: "close to" when the ratio
    measured / ideal is within `tolerance` of 1, else "above" or "below" (the book's comparative words come
    from here, not from the writer). Raises a ValueError for a non-positive speedup or tolerance."""
    if not measured > 0 or not ideal > 0 or not 0 <= tolerance < 1:
        raise ValueError(f"speedups must be > 0 and tolerance in [0, 1), got measured={measured!r}, ideal={ideal!r}, "
                         f"tolerance={tolerance!r}.")
    ratio = measured / ideal
    return "close to" if abs(ratio - 1) <= tolerance else ("above" if ratio > 1 else "below")

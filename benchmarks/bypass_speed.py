"""Attention bypass: measured speedup against its physical limit, for decode and prefill.

For each setting the ideal speedup comes from what the base and the bypassed model must move or compute:

- decode (one token per row per step, memory-bound): bytes read per step = the weights of the decoder
  blocks + the LM head (the embedding lookup reads one row per token) + the KV cache. The KV-cache bytes
  are measured from the cache tensors, not computed from the config.
- prefill (compute-bound): FLOPs = 2 x tokens x block parameters + the causal attention scores and
  weighted sums, 2 x T^2 x heads x head_dim per attention layer (QK^T and AV, half of the T x T square),
  + the LM head for the last position.

The decode loop uses transformers' StaticCache, which allocates its tensors lazily on a layer's first
write, so the bypassed model allocates nothing for the slots it does not use, and each step reads the
whole cache once (a DynamicCache would also re-write the whole cache every step by concatenation). The
cache is filled with random keys and values of the chosen context length instead of running a prefill:
the content does not change the work of a decode step, and filling 32 x 8,192 tokens by a real prefill
would need tens of GB of activations. The base model, the bypassed model, and the base model with its
attention output zeroed (the approach that computes the attention and throws it away) are measured
interleaved, medians over repeats after warm-up, with device synchronization around every timing.

  GPU, Llama-3.1-8B shape, random bf16 weights:  python benchmarks/bypass_speed.py --model llama-3.1-8b --device cuda
  CPU smoke test:  PYTHONPATH=. .venv/bin/python benchmarks/bypass_speed.py --model tiny-llama --device cpu --small

Writes benchmarks/results/bypass_speed-<model>-<device>.json (under $OUT when that is set).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import StaticCache

from utils.bypass import attention_zeroed, bypass_attention
from utils.evaluation import count_parameters
from utils.models import (
    ARCHITECTURES,
    TINY_ARCHITECTURES,
    architecture_summary,
    build_from_config,
    cache_argument_name,
    decoder_layers,
    load_model,
)
from utils.speed import (
    interleaved_samples,
    kv_cache_bytes,
    prefill_flops,
    stopwatch,
    weight_bytes,
)


def attention_slots(model: torch.nn.Module) -> list[int]:
    """The KV-cache slots the model's remaining attention modules write (their layer_idx)."""
    return [block.self_attn.layer_idx for block in decoder_layers(model) if hasattr(block, "self_attn")]


def filled_static_cache(model: torch.nn.Module, batch_size: int, context: int, max_len: int) -> StaticCache:
    """A StaticCache of `max_len` tokens holding `context` random tokens in every slot the model uses."""
    shape = architecture_summary(model.config)
    parameter = next(model.parameters())
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    for slot in attention_slots(model):
        keys = torch.randn(batch_size, shape["kv heads"], context, shape["head dim"], device=parameter.device,
                           dtype=parameter.dtype)
        cache.update(keys, torch.randn_like(keys), slot)
    return cache


@torch.no_grad()
def time_decode(model: torch.nn.Module, batch_size: int, context: int, steps: int) -> tuple[float, int]:
    """Seconds for `steps` decode steps after a `context`-token cache; and the cache bytes read per step."""
    device = next(model.parameters()).device
    cache = filled_static_cache(model, batch_size, context, context + steps)
    cache_bytes = kv_cache_bytes(cache)
    token = torch.randint(0, model.config.vocab_size, (batch_size, 1), device=device)
    name = cache_argument_name(model)
    elapsed = stopwatch(device)
    for _ in range(steps):
        logits = model(input_ids=token, use_cache=True, logits_to_keep=1, **{name: cache}).logits
        token = logits[:, -1:].argmax(-1)
    seconds = elapsed()["wall_s"]
    del cache
    return seconds, cache_bytes


@torch.no_grad()
def time_prefill(model: torch.nn.Module, tokens: int) -> float:
    """Seconds of one prefill forward pass of `tokens` tokens (batch 1, no cache, logits of the last only)."""
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=device)
    elapsed = stopwatch(device)
    model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return elapsed()["wall_s"]


def measure(variants: dict, run, warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds of `run(model)` per variant (utils.speed.interleaved_samples: variants interleaved
    within every round, warm-up rounds discarded); each variant runs inside its own context."""
    def timed(model, context):
        def call() -> float:
            with context():
                return run(model)
        return call
    samples = interleaved_samples({name: timed(model, context) for name, (model, context) in variants.items()},
                                  repeats=repeats, warmup=warmup)
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama-3.1-8b",
                        help="'embedded', or a key of utils.models.ARCHITECTURES / TINY_ARCHITECTURES (random weights)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--bypass", type=int, default=None, help="attention sublayers to bypass (default: a quarter)")
    parser.add_argument("--steps", type=int, default=32, help="decode steps per timed run")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--small", action="store_true", help="tiny contexts for a CPU smoke test")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.model == "embedded":
        base, _ = load_model("embedded", device=device, dtype=dtype)
    elif args.model in ARCHITECTURES or args.model in TINY_ARCHITECTURES:
        base = build_from_config(args.model, device=device, dtype=dtype)  # random N(0, 0.02) weights
    else:
        raise SystemExit(f"unknown model {args.model}")
    n_layers = len(decoder_layers(base))
    n_bypass = args.bypass or n_layers // 4
    # Which blocks does not change the speed; spread them over the middle, away from block 0.
    indices = sorted({round(1 + i * (n_layers - 2) / n_bypass) for i in range(n_bypass)})
    bypassed = bypass_attention(base, indices)
    noop = lambda: torch.no_grad()  # noqa: E731  (a context that changes nothing)
    variants = {"base": (base, noop), "bypassed": (bypassed, noop),
                "zeroed": (base, lambda: attention_zeroed(base, indices))}

    if args.small:
        decode_settings = [(1, 16), (1, 64), (4, 128)]
        prefill_tokens = 64
    else:
        decode_settings = [(1, 128), (1, 4096), (32, 8192)]
        prefill_tokens = 4096

    weights = {name: weight_bytes(model)["total"] for name, (model, _) in variants.items()}
    rows = []
    for batch_size, context in decode_settings:
        cache_bytes = {}

        def run(model, batch_size=batch_size, context=context):
            seconds, read = time_decode(model, batch_size, context, args.steps)
            cache_bytes[id(model)] = read
            return seconds

        seconds = measure(variants, run, args.warmup, args.repeats)
        moved = {name: weights[name] + cache_bytes[id(model)] for name, (model, _) in variants.items()}
        ideal = moved["base"] / moved["bypassed"]
        measured = seconds["base"] / seconds["bypassed"]
        rows.append({
            "setting": f"decode batch {batch_size}, context {context}", "kind": "decode",
            "batch_size": batch_size, "context_tokens": context, "steps": args.steps,
            "tokens_per_s": {name: batch_size * args.steps / s for name, s in seconds.items()},
            "bytes_read_per_step": moved, "kv_cache_bytes": {name: cache_bytes[id(m)] for name, (m, _) in variants.items()},
            "ideal_speedup": ideal, "measured_speedup": measured, "measured_over_ideal": measured / ideal,
            "zeroed_speedup": seconds["base"] / seconds["zeroed"],
            # how close each run came to moving its bytes at full memory bandwidth (the physical limit)
            "achieved_GB_per_s": {name: moved[name] * args.steps / s / 1e9 for name, s in seconds.items()},
        })
        print(f"{rows[-1]['setting']}: measured {measured:.3f}x, ideal {ideal:.3f}x ({measured / ideal:.0%} of ideal); "
              f"zeroed attention {rows[-1]['zeroed_speedup']:.3f}x", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    seconds = measure(variants, lambda model: time_prefill(model, prefill_tokens), args.warmup, args.repeats)
    flops = {name: prefill_flops(model, prefill_tokens, all_logits=False) for name, (model, _) in variants.items()}
    flops["zeroed"] = flops["base"]  # zeroing does all the work
    ideal, measured = flops["base"] / flops["bypassed"], seconds["base"] / seconds["bypassed"]
    rows.append({
        "setting": f"prefill batch 1, {prefill_tokens} tokens", "kind": "prefill", "batch_size": 1,
        "context_tokens": prefill_tokens, "time_to_first_token_ms": {k: 1000 * v for k, v in seconds.items()},
        "flops": flops, "ideal_speedup": ideal, "measured_speedup": measured, "measured_over_ideal": measured / ideal,
        "zeroed_speedup": seconds["base"] / seconds["zeroed"],
        "achieved_TFLOP_per_s": {name: flops[name] / s / 1e12 for name, s in seconds.items()},
    })
    print(f"{rows[-1]['setting']}: measured {measured:.3f}x, ideal {ideal:.3f}x ({measured / ideal:.0%} of ideal); "
          f"zeroed attention {rows[-1]['zeroed_speedup']:.3f}x", flush=True)

    if device.type == "cuda":
        card = torch.cuda.get_device_name(device)
    else:
        card = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    import transformers

    result = {
        "what": f"attention bypass speed: {len(indices)} of {n_layers} attention sublayers bypassed",
        "model": args.model, "shape": architecture_summary(base.config), "bypassed_layers": indices,
        "parameters": {"base": count_parameters(base)["total"], "bypassed": count_parameters(bypassed)["total"]},
        "device": card, "dtype": str(dtype), "torch": torch.__version__, "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "method": "eager PyTorch, SDPA attention; decode: StaticCache (lazily allocated) pre-filled with random keys/values "
                  f"of the context length, {args.steps} greedy single-token steps per run; prefill: one forward pass, "
                  f"no cache, logits of the last position; {args.warmup} warm-up and {args.repeats} timed runs per "
                  "variant, variants interleaved, medians. Ideal: decode = bytes read per step (block weights + LM head "
                  "+ KV cache measured from the cache tensors), prefill = FLOPs (matmuls + causal attention).",
        "rows": rows,
    }
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bypass_speed-{args.model}-{device.type}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()

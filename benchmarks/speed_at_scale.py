"""Depth pruning, width pruning and attention bypass at real sizes: measured speed against the ideal.

For Llama-3.2-1B-, 3B- and Llama-3.1-8B-shaped models with random weights (speed does not depend on the
values), the base model is measured beside three variants that remove about the same number of decoder
parameters: whole blocks removed (depth: an eighth of the blocks), GLU neurons removed in every block
(width: the same parameter count, rounded to a multiple of 128 neurons) and attention sublayers bypassed
(the same parameter count again, which takes many attention sublayers since they are small).

Measured for each: prefill tokens/s (batch 1, `--prefill` tokens: the time to first token), decode
tokens/s at batch 1 and at batch 16 after a `--context`-token prompt, peak GPU memory of the batch-16
run, and KV-cache bytes per token measured from the cache tensors. Beside each speedup is its ideal:
decode = ratio of bytes one step must read (decoder weights + LM head + KV cache), prefill = ratio of
FLOPs (2 x matmul parameters x tokens + attention scores). Base and variants are measured interleaved,
medians over repeats after warm-up, with the device synchronized before every clock read.

  python benchmarks/speed_at_scale.py                       # GPU: all three shapes
  python benchmarks/speed_at_scale.py --models tiny-llama --device cpu --quick   # smoke test

Writes benchmarks/results/speed_at_scale-<device>.json (or under $OUT).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from pathlib import Path

import torch

from utils.bypass import bypass_attention
from utils.depth import remove_layers, select_last
from utils.models import (
    build_from_config,
    decoder_layers,
)
from utils.speed import (
    decode_bytes,
    kv_cache_bytes_per_token,
    measure_speed,
    prefill_flops,
)
from utils.width import prune_glu_width, static_neuron_importance

GLU_MULTIPLE = 128


def width_variant(model: torch.nn.Module, neurons_removed: int) -> torch.nn.Module:
    """A copy of `model` with `neurons_removed` GLU neurons fewer in every block (which ones: by weights)."""
    scores = static_neuron_importance(model, "peak_to_peak")
    return prune_glu_width(model, scores, intermediate_size=model.config.intermediate_size - neurons_removed)


def bypass_variant(model: torch.nn.Module, layers: list[int]) -> torch.nn.Module:
    """A copy of `model` with the attention sublayers of `layers` bypassed (weights and KV cache gone)."""
    return bypass_attention(model, layers)


def variants(base: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, str]]:
    """The three variants at (about) the same number of decoder parameters removed, with a description."""
    config = base.config
    layers = decoder_layers(base)
    n_layers = len(layers)
    block_parameters = sum(p.numel() for p in layers[0].parameters())
    attention_parameters = sum(p.numel() for p in layers[0].self_attn.parameters())
    n_blocks = max(1, round(n_layers / 8))
    target = n_blocks * block_parameters
    neurons = target / (3 * config.hidden_size * n_layers)
    multiple = GLU_MULTIPLE if config.intermediate_size >= 8 * GLU_MULTIPLE else 8  # tiny smoke-test shapes
    neurons = max(multiple, int(round(neurons / multiple)) * multiple)
    n_bypass = min(n_layers - 1, max(1, round(target / attention_parameters)))
    bypass_layers = list(range(n_layers - n_bypass, n_layers))  # which ones does not change the speed
    return {
        "depth": (remove_layers(base, select_last(n_layers, n_blocks)), f"{n_blocks} of {n_layers} blocks removed"),
        "width": (width_variant(base, neurons), f"{neurons} of {config.intermediate_size} GLU neurons removed per block"),
        "attention bypass": (bypass_variant(base, bypass_layers), f"{n_bypass} of {n_layers} attention sublayers bypassed"),
    }


def measure(model: torch.nn.Module, args: argparse.Namespace) -> dict[str, float]:
    device = next(model.parameters()).device
    prefill = measure_speed(model, prompt_tokens=args.prefill, new_tokens=2, batch_size=1, warmup=1, repeats=args.repeats)
    decode_1 = measure_speed(model, prompt_tokens=args.context, new_tokens=args.new_tokens, batch_size=1,
                             warmup=1, repeats=args.repeats)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    decode_16 = measure_speed(model, prompt_tokens=args.context, new_tokens=args.new_tokens, batch_size=args.batch,
                              warmup=1, repeats=args.repeats)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"prefill": prefill["prefill_tokens_per_s"], "ttft_ms": prefill["ttft_ms"],
            "decode_b1": decode_1["decode_tokens_per_s"], f"decode_b{args.batch}": decode_16["decode_tokens_per_s"],
            "peak_memory_gib": peak}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="llama-3.2-1b,llama-3.2-3b,llama-3.1-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over base and variants")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.prefill, args.context, args.new_tokens, args.batch, args.repeats, args.rounds = 64, 32, 8, 4, 2, 1
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32

    rows = []
    for name in args.models.split(","):
        base = build_from_config(name, device=args.device, dtype=dtype, seed=0)
        models = {"base": (base, "unpruned"), **variants(base)}
        runs: dict[str, list[dict]] = {variant: [] for variant in models}
        for _ in range(args.rounds):  # interleaved, so drifts hit every variant alike
            for variant, (model, _) in models.items():
                runs[variant].append(measure(model, args))
        metrics = [m for m in runs["base"][0] if m not in ("ttft_ms", "peak_memory_gib")]
        median = {variant: {m: statistics.median(r[m] for r in results) for m in results[0] if results[0][m] is not None}
                  for variant, results in runs.items()}
        base_decode_bytes = {m: decode_bytes(base, args.context + args.new_tokens // 2,
                                                   1 if m == "decode_b1" else args.batch) for m in metrics if m != "prefill"}
        for variant, (model, description) in models.items():
            row = {"model": name, "variant": variant, "description": description,
                   "decoder_parameters_M": sum(p.numel() for p in decoder_layers(model).parameters()) / 1e6,
                   "kv_bytes_per_token": kv_cache_bytes_per_token(model, tokens=8),
                   "ttft_ms": median[variant]["ttft_ms"], "peak_memory_gib": median[variant].get("peak_memory_gib")}
            for metric in metrics:
                row[f"{metric}_tokens_per_s"] = median[variant][metric]
                row[f"{metric}_measured"] = median[variant][metric] / median["base"][metric]
                if metric == "prefill":
                    row[f"{metric}_ideal"] = prefill_flops(base, args.prefill) / prefill_flops(model, args.prefill)
                else:
                    batch = 1 if metric == "decode_b1" else args.batch
                    row[f"{metric}_ideal"] = base_decode_bytes[metric] / decode_bytes(
                        model, args.context + args.new_tokens // 2, batch)
            rows.append(row)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()})
        del models, base, runs
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
        write(rows, args, dtype)  # after every shape, so a run cut short still leaves its results


def write(rows: list[dict], args: argparse.Namespace, dtype: torch.dtype) -> None:
    """Write the rows measured so far, with the card, the method and the versions."""
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    result = {
        "what": "base vs depth-pruned, width-pruned and attention-bypassed at about the same decoder parameters removed",
        "device": device_name, "dtype": str(dtype), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "method": (f"utils.speed.measure_speed (HF forward, KV cache, greedy); prefill batch 1 x {args.prefill} tokens; "
                   f"decode {args.new_tokens} tokens after a {args.context}-token prompt at batch 1 and {args.batch}; "
                   f"median of {args.repeats} repeats after 1 warm-up, {args.rounds} interleaved rounds, median of rounds; "
                   "ideal decode = utils.speed.decode_bytes ratio (weights + LM head + KV cache), ideal prefill = utils.speed.prefill_flops ratio"),
        "rows": rows,
    }
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"speed_at_scale-{args.device}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()

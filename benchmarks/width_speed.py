"""GLU width pruning: measured speed against the share of FLOPs removed, and why widths should be round.

A Llama-3.2-1B-shaped model with random weights (speed does not depend on the values) is pruned to 40%
fewer GLU neurons, three ways: the exact width (8192 x 0.6 = 4915, an odd number), and the same budget
rounded to a multiple of 64 and of 128. Each is measured beside the base model: prefill tokens/s
(batch 1 x `--prefill` tokens and batch 8 x `--prefill`), decode tokens/s at batch 1 and 16. Beside each
ratio: the ideal (prefill: FLOPs; decode: bytes read per step). Base and variants are measured
interleaved; medians over repeats after warm-up; the device is synchronized before every clock read.

  python benchmarks/width_speed.py                                      # GPU
  python benchmarks/width_speed.py --model tiny-llama --device cpu --quick   # smoke test

Writes benchmarks/results/width_speed-<model>-<device>.json (or under $OUT).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from utils.models import build_from_config
from utils.speed import decode_bytes, measure_speed, prefill_flops
from utils.width import (
    prune_glu_width,
    static_neuron_importance,
    target_intermediate_size,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama-3.2-1b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--percent", type=float, default=40.0)
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.prefill, args.context, args.new_tokens, args.repeats, args.rounds = 64, 32, 8, 2, 1
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32

    base = build_from_config(args.model, device=args.device, dtype=dtype, seed=0)
    width, hidden = base.config.intermediate_size, base.config.hidden_size
    scores = static_neuron_importance(base, "peak_to_peak")  # which neurons go does not change the speed
    models = {f"base ({width})": base}
    for multiple in (1, 64, 128):
        size = target_intermediate_size(width, hidden, percent=args.percent, multiple=multiple)
        label = f"{size}" + (" (exact)" if multiple == 1 else f" (multiple of {multiple})")
        models[label] = prune_glu_width(base, scores, intermediate_size=size)

    settings = {"prefill_b1": (1, args.prefill, 2), "prefill_b8": (8, args.prefill, 2),
                "decode_b1": (1, args.context, args.new_tokens), "decode_b16": (16, args.context, args.new_tokens)}
    runs = {label: {s: [] for s in settings} for label in models}
    for _ in range(args.rounds):
        for label, model in models.items():
            for setting, (batch, prompt, new) in settings.items():
                result = measure_speed(model, prompt_tokens=prompt, new_tokens=new, batch_size=batch, warmup=1,
                                       repeats=args.repeats)
                key = "prefill_tokens_per_s" if setting.startswith("prefill") else "decode_tokens_per_s"
                runs[label][setting].append(result[key])
    base_label = next(iter(models))
    rows = []
    for label, model in models.items():
        row = {"variant": label, "intermediate_size": model.config.intermediate_size,
               "mlp_flops_removed_share": 1 - model.config.intermediate_size / width,
               "total_flops_removed_share_prefill": 1 - prefill_flops(model, args.prefill) / prefill_flops(base, args.prefill)}
        for setting, (batch, prompt, new) in settings.items():
            tokens_per_s = statistics.median(runs[label][setting])
            base_tokens_per_s = statistics.median(runs[base_label][setting])
            row[f"{setting}_tokens_per_s"] = tokens_per_s
            row[f"{setting}_measured"] = tokens_per_s / base_tokens_per_s
            if setting.startswith("prefill"):
                row[f"{setting}_ideal"] = prefill_flops(base, prompt) / prefill_flops(model, prompt)
            else:
                context = prompt + new // 2
                row[f"{setting}_ideal"] = decode_bytes(base, context, batch) / decode_bytes(model, context, batch)
        rows.append(row)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()})

    result = {
        "what": f"{args.percent:g}% of GLU neurons removed in every block: exact width and rounded widths",
        "model": args.model, "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "dtype": str(dtype), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "method": (f"utils.speed.measure_speed; prefill batch 1 and 8 x {args.prefill} tokens; decode "
                   f"{args.new_tokens} tokens after {args.context} at batch 1 and 16; median of {args.repeats} repeats "
                   f"after warm-up, {args.rounds} interleaved rounds; ideal prefill = FLOPs ratio, ideal decode = "
                   "bytes-read ratio"),
        "rows": rows,
    }
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"width_speed-{args.model}-{args.device}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()

"""Depth pruning: measured decode speedup against its physical limit.

The ideal decode speedup of removing blocks comes from what one decode step must read: the weights of
every kept block plus the LM head (the embedding lookup reads one row), plus the KV cache. FLOPs per token
follow the same weights, so the ratio is the same for compute. This script builds the model, removes the
blocks, and measures decode tokens/s of both, side by side in one run, medians over repeats after warm-up.

  CPU, embedded model:   PYTHONPATH=. .venv/bin/python benchmarks/depth_speed.py --model embedded --remove 6
  GPU, random weights:   python benchmarks/depth_speed.py --model llama-3.2-1b --remove 4 --device cuda

Writes benchmarks/results/depth_speed-<model>-<device>.json (or under $OUT when set, for the GPU machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from utils.depth import remove_layers, select_last
from utils.models import (
    ARCHITECTURES,
    build_from_config,
    load_model,
)
from utils.speed import decode_bytes, measure_speed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="embedded", help="'embedded' or a key of utils.models.ARCHITECTURES (random weights)")
    parser.add_argument("--remove", type=int, default=6, help="number of blocks removed (the last ones: speed does not depend on which)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", default="1")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    if args.model == "embedded":
        base, _ = load_model("embedded", device=args.device, dtype=dtype)
    elif args.model in ARCHITECTURES:
        base = build_from_config(args.model, device=args.device, dtype=dtype)
        for parameter in base.parameters():  # random init is N(0, 0.02) by default; keep it, but never zeros
            assert parameter.abs().sum() > 0 or parameter.numel() == 0
    else:
        raise SystemExit(f"unknown model {args.model}")
    n_layers = base.config.num_hidden_layers
    pruned = remove_layers(base, select_last(n_layers, args.remove))

    rows = []
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        context = args.prompt_tokens + args.new_tokens // 2
        ideal = decode_bytes(base, context, batch_size) / decode_bytes(pruned, context, batch_size)
        # interleave base and pruned measurements so drifts (clocks, other load) hit both alike
        runs = {"base": [], "pruned": []}
        for _ in range(3):
            for name, model in (("base", base), ("pruned", pruned)):
                runs[name].append(measure_speed(model, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                                                batch_size=batch_size, warmup=1, repeats=args.repeats))
        median = {name: sorted(r["decode_tokens_per_s"] for r in results)[1] for name, results in runs.items()}
        ttft = {name: sorted(r["ttft_ms"] for r in results)[1] for name, results in runs.items()}
        measured = median["pruned"] / median["base"]
        rows.append({
            "batch_size": batch_size, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
            "decode_tokens_per_s": median, "ttft_ms": ttft,
            "ideal_decode_speedup": ideal, "measured_decode_speedup": measured,
            "share_of_ideal": (measured - 1) / (ideal - 1) if ideal > 1 else None,
            "ratio_to_ideal": measured / ideal,
        })
        print(f"batch {batch_size}: base {median['base']:.1f} tok/s, pruned {median['pruned']:.1f} tok/s, "
              f"measured {measured:.3f}x, ideal {ideal:.3f}x, measured/ideal {measured / ideal:.3f}")

    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    result = {
        "what": f"decode speed, {args.remove} of {n_layers} blocks removed",
        "model": args.model, "device": device_name, "dtype": str(dtype),
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "method": "manual greedy decode loop with KV cache (utils.speed.measure_speed); median of repeats after warm-up; "
                  "base and pruned interleaved 3 times, the median of the 3 medians reported",
        "rows": rows,
    }
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"depth_speed-{args.model}-{args.device}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()

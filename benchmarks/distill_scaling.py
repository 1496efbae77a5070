"""Distillation on several GPUs through accelerate: step time on 1 and on N GPUs, and scaling efficiency.

The course's `utils.distill.distill` takes an `accelerate.Accelerator`; started with `accelerate launch`,
every process trains on its own share of the batches and DDP averages the gradients. This script times
that loop for a Llama-3.2-1B-shaped student and a Llama-3.2-3B-shaped teacher with random weights
(timing does not depend on the values), at a fixed micro-batch per GPU (weak scaling: N GPUs see N times
the tokens per step). Scaling efficiency = N-GPU throughput / (N x 1-GPU throughput).

  accelerate launch --num_processes 1 --mixed_precision bf16 benchmarks/distill_scaling.py
  accelerate launch --num_processes 2 --mixed_precision bf16 --multi_gpu benchmarks/distill_scaling.py
  python benchmarks/distill_scaling.py --combine          # writes the results file from the two runs

CPU smoke test: accelerate launch --num_processes 1 --cpu benchmarks/distill_scaling.py --student tiny-llama
--teacher tiny-llama --steps 3 --seq-len 32. Results: benchmarks/results/distill_scaling-*.json (or $OUT).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from utils.distill import distill
from utils.models import build_from_config


def out_dir() -> Path:
    path = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    path.mkdir(parents=True, exist_ok=True)
    return path


def run(args: argparse.Namespace) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator()
    device = accelerator.device
    student = build_from_config(args.student, device=device, dtype=torch.float32, seed=0)
    teacher = build_from_config(args.teacher, device=device,
                                dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, seed=1)
    vocab = student.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    n_batches = args.micro_batches * accelerator.num_processes  # each process gets `micro_batches` of them
    batches = [{"input_ids": torch.randint(0, vocab, (args.batch, args.seq_len), generator=generator),
                "attention_mask": torch.ones(args.batch, args.seq_len, dtype=torch.long)} for _ in range(n_batches)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    history = distill(student, teacher, batches, steps=args.warmup + args.steps, lr=1e-5, check_overlap=False,
                      accelerator=accelerator, progress=accelerator.is_main_process)
    elapsed = [row["elapsed_s"] for row in history.train]
    step_times = [b - a for a, b in zip(elapsed[args.warmup - 1:], elapsed[args.warmup:])]
    median_step = statistics.median(step_times)
    tokens_per_step = args.batch * args.seq_len * accelerator.num_processes
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    if accelerator.is_main_process:
        result = {
            "processes": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
            "mixed_precision": accelerator.mixed_precision,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "student": args.student, "teacher": args.teacher,
            "student_parameters": sum(p.numel() for p in student.parameters()),
            "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
            "micro_batch_per_process": [args.batch, args.seq_len], "tokens_per_step": tokens_per_step,
            "warmup_steps": args.warmup, "timed_steps": args.steps,
            "step_times_s": step_times, "median_step_s": median_step,
            "tokens_per_s": tokens_per_step / median_step, "peak_memory_gib_process0": peak,
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        }
        path = out_dir() / f"distill_scaling-run-{accelerator.num_processes}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"{accelerator.num_processes} process(es): median step {median_step:.3f} s, "
              f"{result['tokens_per_s']:.0f} tokens/s -> {path}")


def combine() -> None:
    runs = {}
    for path in sorted(out_dir().glob("distill_scaling-run-*.json")):
        row = json.loads(path.read_text())
        runs[row["processes"]] = row
    if 1 not in runs or len(runs) < 2:
        raise SystemExit(f"need the 1-process run and at least one multi-process run, found {sorted(runs)}")
    one = runs[1]
    rows = []
    for n, row in sorted(runs.items()):
        efficiency = row["tokens_per_s"] / (n * one["tokens_per_s"])
        rows.append({"processes": n, "median_step_s": row["median_step_s"], "tokens_per_s": row["tokens_per_s"],
                     "scaling_efficiency": efficiency})
        print(f"{n} GPU(s): {row['tokens_per_s']:.0f} tokens/s, efficiency {efficiency:.3f}")
    result = {"what": "distillation step time on 1 and N GPUs (DDP through accelerate), weak scaling",
              "method": "utils.distill.distill with an accelerate.Accelerator, fixed micro-batch per GPU; median "
                        "step time over the timed steps after warm-up (the loss .item() each step synchronizes)",
              "rows": rows, "runs": {str(n): row for n, row in runs.items()}}
    name = f"distill_scaling-{one['student']}-from-{one['teacher']}-{'cuda' if one['device'] != 'cpu' else 'cpu'}.json"
    (Path(__file__).parent / "results" if not os.environ.get("OUT") else out_dir()).joinpath(name).write_text(
        json.dumps(result, indent=2) + "\n")
    print("wrote", name)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--student", default="llama-3.2-1b")
    parser.add_argument("--teacher", default="llama-3.2-3b")
    parser.add_argument("--batch", type=int, default=4, help="rows per micro-batch per process")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--micro-batches", type=int, default=4, help="distinct batches per process (cycled)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--combine", action="store_true", help="combine the per-run files into the results file")
    args = parser.parse_args()
    combine() if args.combine else run(args)


if __name__ == "__main__":
    main()

"""Distillation in the dtypes a GPU loader picks: the failure learners met on a T4, and the fix.

A SmolLM2-135M-shaped teacher (random weights) and a student with 6 of its 30 blocks removed, both in
float16 or bfloat16 on a CUDA device, distilled for a few steps on random-token batches of 4 x 128 at
lr 3e-4 (the setting the issue reported: `FloatingPointError: ... nan at step 2` in float16). Each dtype
runs twice: `mixed_precision="no"` (the old loop: AdamW directly on the low-precision weights) and
`"auto"` (utils.training.train: float32 master weights, autocast, loss scaling in float16). The results
file lists every step's loss and whether it stayed finite.

    python benchmarks/low_precision_training.py            # writes $OUT or benchmarks/results/
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path

import torch

from utils.depth import remove_layers
from utils.distill import distill
from utils.models import build_from_config
from utils.speed import stopwatch


def batches(vocab: int, device: torch.device, count: int = 8) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, vocab, (4, 128), generator=generator).to(device),
             "attention_mask": torch.ones(4, 128, dtype=torch.long, device=device)} for _ in range(count)]


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        teacher = build_from_config("smollm2-135m", device=device, dtype=dtype, seed=0)
        data = batches(teacher.config.vocab_size, device)
        for mode in ("no", "auto"):
            student = remove_layers(teacher, list(range(12, 18)))
            elapsed = stopwatch(device)
            try:
                history = distill(student, teacher, data, steps=20, lr=3e-4, mixed_precision=mode, progress=False)
                losses, error = history.column("loss"), None
            except FloatingPointError as failure:
                losses, error = [], str(failure)
            rows.append({"dtype": str(dtype).replace("torch.", ""), "mixed_precision": mode, "losses": losses,
                         "finite": error is None and all(math.isfinite(v) for v in losses), "error": error,
                         "student_dtype_after": str(next(student.parameters()).dtype).replace("torch.", ""),
                         "seconds": round(elapsed()["wall_s"], 2)})
            print({k: v for k, v in rows[-1].items() if k != "losses"},
                  "first/last loss:", (losses[0], losses[-1]) if losses else None, flush=True)
            del student
        del teacher
    result = {"what": "distillation of a 24-block student from a SmolLM2-135M-shaped teacher (random weights) in "
                      "float16 and bfloat16, old loop (mixed_precision='no') vs utils.training.train ('auto')",
              "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "setting": "20 steps, 8 random-token batches of 4 x 128 cycled, lr 3e-4, AdamW, clip 1.0", "rows": rows}
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    name = "cuda" if device.type == "cuda" else "cpu"
    (out / f"low_precision_training-{name}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

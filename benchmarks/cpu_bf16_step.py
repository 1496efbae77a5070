"""Is bf16 autocast faster than float32 for one training step on this CPU? Process CPU time, alternating.

One forward and backward of CH02's pruned student (24 of 30 blocks of the embedded model, all parameters
trainable) on 2 x 128 tokens of Wikipedia, next-token loss, with and without torch.autocast("cpu",
torch.bfloat16), alternating so that load changes on a shared machine hit both alike. One thread, so
process CPU time measures the work rather than the waiting. Appends a JSON line to
benchmarks/results/cpu_bf16_step.jsonl.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from utils.data import calibration_batches  # noqa: E402
from utils.depth import remove_layers, select_window  # noqa: E402
from utils.distill import next_token_loss  # noqa: E402
from utils.models import load_model  # noqa: E402
from utils.speed import stopwatch  # noqa: E402

torch.set_num_threads(1)
model, tokenizer = load_model("embedded")
student = remove_layers(model, select_window(30, 12, 6))
batch = calibration_batches(tokenizer, "wikipedia", n_samples=2, seq_len=128, batch_size=2, split="train")[0]
times = {"fp32": [], "bf16": []}
for repeat in range(4):
    for name in ("fp32", "bf16"):
        context = torch.autocast("cpu", dtype=torch.bfloat16) if name == "bf16" else contextlib.nullcontext()
        student.zero_grad(set_to_none=True)
        elapsed = stopwatch()
        with context:
            logits = student(**batch, use_cache=False).logits
            loss = next_token_loss(logits, batch["input_ids"])
        loss.backward()
        if repeat > 0:  # the first of each is a warm-up
            times[name].append(elapsed()["cpu_s"])
row = {name: sorted(values)[len(values) // 2] for name, values in times.items()}
row.update(all=times, speedup_bf16=row["fp32"] / row["bf16"], load=os.getloadavg(),
           cpu=torch.backends.cpu.get_cpu_capability(), date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
print(json.dumps(row))
with open(ROOT / "benchmarks" / "results" / "cpu_bf16_step.jsonl", "a") as f:
    f.write(json.dumps(row) + "\n")

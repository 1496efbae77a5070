"""Does glibc's malloc, told to keep large blocks, make a CPU training step faster? Interleaved processes.

glibc serves an allocation above its mmap threshold (at most 32 MB by default) with a fresh mmap and returns it
to the system when freed, so every large tensor (CH02's logits are 4 x 256 x 49,152 floats, 201 MB) costs page
faults and zeroing each time it is made. `make book` and `make test` set MALLOC_MMAP_THRESHOLD_ and
MALLOC_TRIM_THRESHOLD_ (see the Makefile) so such blocks come from the heap and are reused. This script runs
CH02's healing step (the pruned student, blocks 8 and 9 training, hidden-state term at the cut, 4 x 256 tokens,
bf16 autocast where the CPU has bf16 units) in fresh processes, alternately without and with those settings, and
records each process's step times (the first step, which also runs the teacher's check, is left out), the
final loss (the arithmetic is the same, so it must be equal), and the minor page faults of the last of 12
rounds that each make and free two 201 MB tensors (a loop's steady state). Writes benchmarks/results/cpu_allocator-cpu.json.

    python benchmarks/cpu_allocator.py [--rounds 2] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from utils.book import build_environment  # noqa: E402

TUNED = build_environment(ROOT)  # the Makefile's malloc settings

# 12 rounds that each make and free two vocabulary-wide float32 tensors of 201 MB (CH02's logits, 4 x 256 x 49,152),
# as a training loop does: `faults` is the last round's minor page faults, once glibc's heap has grown to hold the
# loop (tests/test_build_environment.py runs it too)
PAGE_FAULT_PROBE = """
import resource
import torch
logits = torch.randn(4 * 256, 49152)
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    scaled = logits * 0.5
    log_probs = torch.log_softmax(scaled, dim=-1)
    del scaled, log_probs
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
del logits
"""
PROBE_PAGES = 2 * 4 * 256 * 49152 * 4 // 4096  # the 4 KiB pages of one round's two tensors: its faults if every one is new

CHILD = PAGE_FAULT_PROBE + r"""
import json, sys
from utils.data import calibration_batches
from utils.depth import remove_layers, select_window
from utils.distill import cut_layer_map, distill, train_only_blocks_from
from utils.models import load_model

steps = int(sys.argv[1])
model, tokenizer = load_model("embedded")
n = model.config.num_hidden_layers
start = n // 2 - 3
removed = select_window(n, start, 6)
student = remove_layers(model, removed)
train_only_blocks_from(student, start - 1, last_block=start)
batches = calibration_batches(tokenizer, "wikipedia", n_samples=4 * steps, seq_len=256, batch_size=4, split="train")
history = distill(student, model, batches, steps=steps, lr=3e-3, temperature=2.0, ce_weight=0.5, kd_weight=0.5,
                  hidden_weight=1.0, layer_map=cut_layer_map(removed, n), seed=0, progress=False)
ends = [row["train_s"] for row in history.train]
print(json.dumps({"step_s": [b - a for a, b in zip(ends, ends[1:])], "loss": history.train[-1]["loss"],
                  "last_round_minor_faults": faults}))
"""


def run(settings: dict[str, str], steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in TUNED}
    env.update(settings, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    out = subprocess.run([sys.executable, "-c", CHILD, str(steps)], env=env, cwd=ROOT, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="processes of each variant, alternating")
    parser.add_argument("--steps", type=int, default=5, help="training steps a process (the first is left out)")
    args = parser.parse_args()
    import torch
    import transformers

    runs: dict[str, list[dict]] = {"default": [], "tuned": []}
    for _ in range(args.rounds):
        for name, settings in (("default", {}), ("tuned", TUNED)):
            runs[name].append(run(settings, args.steps))
            print(name, runs[name][-1], flush=True)
    summary = {}
    for name, rows in runs.items():
        steps = [s for row in rows for s in row["step_s"]]
        summary[name] = {"median_step_s": statistics.median(steps), "min_step_s": min(steps), "max_step_s": max(steps),
                         "losses": sorted({row["loss"] for row in rows}),
                         "last_round_minor_faults": [row["last_round_minor_faults"] for row in rows]}
    record = {
        "what": "CH02's healing step (4 x 256 tokens) in fresh processes, glibc malloc default vs the Makefile's "
                "MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_, alternating; step times after the first step",
        "settings": TUNED,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
                   f"torch {torch.__version__}, transformers {transformers.__version__}, glibc {platform.libc_ver()[1]}",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "runs": runs, "summary": summary,
        "speedup": summary["default"]["median_step_s"] / summary["tuned"]["median_step_s"],
        "same_loss": summary["default"]["losses"] == summary["tuned"]["losses"],
        "faults_if_every_page_is_new": PROBE_PAGES,
    }
    print(json.dumps({k: record[k] for k in ("summary", "speedup", "same_loss")}, indent=1))
    path = Path(os.environ.get("OUT", ROOT / "benchmarks" / "results")) / "cpu_allocator-cpu.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()

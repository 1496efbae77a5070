"""How far a search over removal sets goes on CH04's task: 6 of 30 blocks of the embedded model, unhealed.

CH04's chapter budget lets its KL swap search score a dozen sets. This script asks what a much larger search
finds, with the same utils functions and on the same held-out text (Wikipedia eval, 4,096 tokens, window 512),
so the chapter can say whether the 1.75x target is out of reach for a selection or only for its budget:

  angular window      the one-shot start (utils.importance.angular_distance, the final block kept)
  swap from window    utils.depth.kl_swap_search from it, any distance (radius None), up to --evaluations sets
  greedy KL           blocks removed one at a time, each the one whose removal keeps the KL lowest
  swap from greedy    the swap search again, from the greedy set
  iterative loss      utils.importance.iterative_loss_pruning (SLEB-like, calibration cross-entropy)

The KL is scored on --samples x --length tokens of Wikipedia's calibration split; held-out ratios are computed
once per distinct set. Prints and writes one JSON object to benchmarks/results/depth_search-<device>.json
($OUT when set).

    python benchmarks/depth_search.py --samples 16 --length 256 --evaluations 2000
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from utils.data import bos_ids, calibration_batches, token_ids  # noqa: E402
from utils.depth import (kl_swap_search, layers_removed, reference_log_probs, removable_layers,  # noqa: E402
                         removal_kl, select_window_by_distance)
from utils.evaluation import perplexity  # noqa: E402
from utils.importance import angular_distance, greedy_loss_search, iterative_loss_pruning  # noqa: E402
from utils.models import library_versions, load_model  # noqa: E402
from utils.speed import stopwatch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--remove", type=int, default=6)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--evaluations", type=int, default=2000)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    model, tokenizer = load_model("embedded", dtype=getattr(torch, args.dtype))
    bos = (bos_ids(tokenizer) or [None])[0]
    n_layers = model.config.num_hidden_layers
    held_out = token_ids(tokenizer, "wikipedia", "eval", max_tokens=4096)
    base_ppl = perplexity(model, held_out, window=512, bos_token_id=bos, progress=False)
    batches = calibration_batches(tokenizer, "wikipedia", n_samples=args.samples, seq_len=args.length, batch_size=4)
    reference = reference_log_probs(model, batches)
    allowed = removable_layers(n_layers, args.remove, 0, 1)  # the final block is kept, as in the chapter
    greedy_sets = sum(len(allowed) - step for step in range(args.remove))  # sets a greedy removal of n blocks scores

    def ratio(blocks) -> float:
        with layers_removed(model, blocks):
            return perplexity(model, held_out, window=512, bos_token_id=bos, progress=False) / base_ppl

    rows = {}

    def record(name: str, blocks, seconds: float, scored: int) -> None:
        blocks = sorted(int(b) for b in blocks)
        rows[name] = {"blocks": blocks, "kl": removal_kl(model, batches, reference, blocks), "ppl_ratio": ratio(blocks),
                      "sets_scored": scored, "search_s": round(seconds, 1)}
        print(name, json.dumps(rows[name]), flush=True)

    clock = stopwatch()
    window = select_window_by_distance(angular_distance(model, batches, args.remove, progress=False), args.remove)
    record("angular window", window, clock()["wall_s"], 0)
    clock = stopwatch()
    swap = kl_swap_search(model, batches, window, radius=None, max_evaluations=args.evaluations, reference=reference)
    record("swap from window", swap["blocks"], clock()["wall_s"], swap["evaluations"])
    clock = stopwatch()
    greedy = greedy_loss_search(model, batches, allowed, args.remove, layers_removed, desc="greedy KL",
                                score=lambda pruned, scored: removal_kl(pruned, scored, reference))
    record("greedy KL", greedy, clock()["wall_s"], greedy_sets)
    clock = stopwatch()
    swap = kl_swap_search(model, batches, greedy, radius=None, max_evaluations=args.evaluations, reference=reference)
    record("swap from greedy", swap["blocks"], clock()["wall_s"], swap["evaluations"])
    clock = stopwatch()
    loss = iterative_loss_pruning(model, batches, args.remove, protect_last=1, progress=False)
    record("iterative loss", loss, clock()["wall_s"], greedy_sets)

    result = {"what": "removal sets for 6 of 30 blocks of the embedded model, unhealed: held-out Wikipedia "
                      "perplexity / base (4,096 tokens, window 512)",
              "calibration": f"wikipedia calibration split, {args.samples} x {args.length} tokens",
              "max_evaluations": args.evaluations, "dtype": args.dtype, "base_ppl": base_ppl,
              "device": str(next(model.parameters()).device), "versions": library_versions(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}
    out = pathlib.Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    (out / f"depth_search-{device}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: round(v["ppl_ratio"], 3) for k, v in rows.items()}))


if __name__ == "__main__":
    main()

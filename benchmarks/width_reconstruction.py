"""Width pruning with reconstruction on the embedded model: which neurons to remove when down_proj is re-fitted.

CH05's criteria score each GLU neuron alone and `prune_glu_width(..., gram=...)` can then re-fit down_proj
by least squares (`refit_down_proj`). When the re-fit follows, the right question is no longer "which
neuron matters least" but "which neuron the kept ones can stand in for": the structured Optimal Brain
Surgeon criterion answers it. With G = A^T A / tokens the Gram matrix of a block's neuron activations
(`activation_statistics(..., gram=True)`) and W its down_proj, removing neuron j and re-fitting the others
costs ||W[:, j]||^2 / [G^-1]_jj of squared output error; removing in several rounds (re-fitting and
re-scoring in between) lets the criterion see what the earlier removals changed. Every row is 20% of the
neurons removed in every block (the chapter's setting), unhealed, as the ratio of the held-out Wikipedia
perplexity (2,048 tokens, window 512) to the base model's on the same text.

  python benchmarks/width_reconstruction.py --dtype float32          # on a GPU: the CPU's arithmetic
  python benchmarks/width_reconstruction.py --model tiny-llama --quick   # smoke test

Prints one line per row and appends JSON lines to benchmarks/results/width_reconstruction-<cpu|cuda>.jsonl
($OUT when set).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils.data import calibration_batches, token_ids  # noqa: E402
from utils.evaluation import perplexity  # noqa: E402
from utils.models import decoder_layers, glu_projections, load_model  # noqa: E402
from utils.speed import stopwatch  # noqa: E402
from utils.width import (activation_neuron_importance, activation_statistics, literature_neuron_importance,  # noqa: E402
                         prune_glu_width, target_intermediate_size)


def obs_kept(gram: torch.Tensor, down: torch.Tensor, keep: int, rounds: int, ridge: float) -> torch.Tensor:
    """Indices of the `keep` neurons of one block chosen by the structured OBS criterion in `rounds` rounds.

    Each round: re-fit the kept neurons' down_proj columns to the full block's output (least squares on the
    Gram matrix), score every kept neuron by ||W'[:, j]||^2 / [G_KK^-1]_jj (the output error of removing it
    and re-fitting the rest) and drop the lowest share of this round.
    """
    gram = gram.double()
    down = down.double()
    width = gram.shape[0]
    kept = torch.arange(width, device=gram.device)
    lam = ridge * float(gram.diagonal().mean())
    to_remove = width - keep
    for r in range(rounds):
        n_drop = to_remove * (r + 1) // rounds - (width - len(kept))
        if n_drop <= 0:
            continue
        g_kk = gram[kept][:, kept] + lam * torch.eye(len(kept), dtype=gram.dtype, device=gram.device)
        inverse = torch.linalg.inv(g_kk)
        refit = (inverse @ gram[kept] @ down.T).T  # W_K' = (G_KK^-1 G_K: W^T)^T, [hidden, kept]
        score = refit.pow(2).sum(0) / inverse.diagonal()
        order = torch.argsort(score, descending=True)
        kept = kept[order[:len(kept) - n_drop]].sort().values
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--percent", type=float, default=20)
    parser.add_argument("--cal-samples", default="32,128", help="calibration sizes (samples of 256 tokens)")
    parser.add_argument("--ridges", default="1e-3,1e-2", help="ridge of every re-fit (times the Gram's mean diagonal)")
    parser.add_argument("--rounds", default="1,4,16", help="rounds of the OBS selection")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    device = next(model.parameters()).device
    cal_len, eval_tokens, window = (32, 256, 64) if args.quick else (256, 2048, 512)
    held_out = token_ids(tokenizer, "wikipedia", "eval", max_tokens=eval_tokens)
    base = perplexity(model, held_out, window=window, progress=False)
    blocks = decoder_layers(model)
    width = glu_projections(blocks[0])[2].in_features
    keep = target_intermediate_size(width, model.config.hidden_size, args.percent)
    out = Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    out.mkdir(parents=True, exist_ok=True)
    results = out / f"width_reconstruction-{device.type}.jsonl"

    def record(name: str, n_samples: int, pruned: torch.nn.Module, seconds: dict[str, float] | None = None) -> None:
        ratio = perplexity(pruned, held_out, window=window, progress=False) / base
        row = {"method": name, "percent": args.percent, "calibration": f"{n_samples} x {cal_len}", "ratio": ratio,
               "select_s": None if seconds is None else round(seconds["wall_s"], 2), "dtype": str(next(model.parameters()).dtype),
               "device": str(device), "card": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
               "base_ppl": base, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        print(f"{name:40s} cal {n_samples:4d}: ratio {ratio:.3f}", flush=True)
        with open(results, "a") as f:
            f.write(json.dumps(row) + "\n")

    for n_samples in [int(n) for n in args.cal_samples.split(",")]:
        calibration = calibration_batches(tokenizer, "wikipedia", n_samples=4 if args.quick else n_samples,
                                          seq_len=cal_len, batch_size=4)
        statistics = activation_statistics(model, calibration, gram=True, progress=False)
        gram = statistics["gram"].to(device)
        scores = {"activation_x_down": activation_neuron_importance(model, calibration, statistics=statistics),
                  "wanda": literature_neuron_importance(model, statistics, "wanda"),
                  "flap": literature_neuron_importance(model, statistics, "flap")}
        for name, score in scores.items():
            record(name, n_samples, prune_glu_width(model, score, percent=args.percent))
            for ridge in [float(r) for r in args.ridges.split(",")]:
                record(f"{name} + refit (ridge {ridge:g})", n_samples,
                       prune_glu_width(model, score, percent=args.percent, gram=statistics["gram"], ridge=ridge))
        for rounds in [int(r) for r in args.rounds.split(",")]:
            for ridge in [float(r) for r in args.ridges.split(",")]:
                elapsed = stopwatch(device)
                kept = [obs_kept(gram[i], glu_projections(block)[2].weight.detach(), keep, rounds, ridge).cpu()
                        for i, block in enumerate(blocks)]
                seconds = elapsed()
                mask = torch.zeros(len(blocks), width)
                for i, index in enumerate(kept):
                    mask[i, index] = 1.0
                record(f"OBS {rounds} rounds + refit (ridge {ridge:g})", n_samples,
                       prune_glu_width(model, mask, percent=args.percent, gram=statistics["gram"], ridge=ridge), seconds)


if __name__ == "__main__":
    main()

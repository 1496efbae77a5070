"""Width pruning criteria on the embedded model: held-out perplexity ratio and CPU cost of each, unhealed.

The measurement behind CH05's published-methods section, with a larger budget than the chapter can
afford: 20% of the GLU neurons removed in every block, calibration 32 x 256 Wikipedia tokens, held-out
Wikipedia 2048 tokens (window 512), ratio to the base perplexity on the same text. For every row it prints
the ratio and the wall and process CPU seconds of scoring, cutting and evaluating (note the machine's load:
`uptime`). One thread by default: on a shared 2-core machine that is faster than two.

  python benchmarks/width_methods.py                       # every row (about 20 CPU-minutes here)
  python benchmarks/width_methods.py --taylor-samples 32   # Taylor scores on more calibration samples
  python benchmarks/width_methods.py --model tiny-llama --quick   # smoke test
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.data import calibration_batches, token_ids  # noqa: E402
from utils.evaluation import perplexity  # noqa: E402
from utils.models import load_model  # noqa: E402
from utils.speed import stopwatch  # noqa: E402
from utils.width import (activation_neuron_importance, activation_statistics, literature_neuron_importance,  # noqa: E402
                         prune_glu_width, prune_glu_width_with_bias, taylor_neuron_importance)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--percent", type=float, default=20)
    parser.add_argument("--taylor-samples", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    cal_samples, cal_len, eval_tokens, window = (8, 32, 256, 64) if args.quick else (32, 256, 2048, 512)
    held_out = token_ids(tokenizer, "wikipedia", "eval", max_tokens=eval_tokens)
    calibration = calibration_batches(tokenizer, "wikipedia", n_samples=cal_samples, seq_len=cal_len, batch_size=4)
    print(f"load average {os.getloadavg()}", flush=True)
    base = perplexity(model, held_out, window=window, progress=False)
    print(f"base perplexity {base:.3f}", flush=True)

    elapsed = stopwatch()
    statistics = activation_statistics(model, calibration, gram=True, progress=False)
    seconds = elapsed()
    print(f"statistics pass (with Gram): wall {seconds['wall_s']:.0f} s, cpu {seconds['cpu_s']:.0f} s", flush=True)
    scores = {"activation_x_down": activation_neuron_importance(model, calibration, statistics=statistics),
              "flap": literature_neuron_importance(model, statistics, "flap"),
              "wanda": literature_neuron_importance(model, statistics, "wanda")}
    for aggregate in ("squares", "sum"):
        elapsed = stopwatch()
        scores[f"taylor_{aggregate}"] = taylor_neuron_importance(model, calibration[:max(1, args.taylor_samples // 4)],
                                                                 aggregate, progress=False)
        seconds = elapsed()
        print(f"taylor ({aggregate}, {args.taylor_samples} samples): wall {seconds['wall_s']:.0f} s, "
              f"cpu {seconds['cpu_s']:.0f} s", flush=True)
    bias = "mlp_bias" in model.config.to_dict()
    for name, score in scores.items():
        variants = {"": lambda: prune_glu_width(model, score, percent=args.percent)}
        if bias:
            variants[" + bias"] = lambda: prune_glu_width_with_bias(model, score, statistics["mean"], percent=args.percent)
        for suffix, build in variants.items():
            elapsed = stopwatch()
            ratio = perplexity(build(), held_out, window=window, progress=False) / base
            seconds = elapsed()
            print(f"{name}{suffix}: ratio {ratio:.3f} (cut + evaluation: wall {seconds['wall_s']:.0f} s, "
                  f"cpu {seconds['cpu_s']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()

"""Healing recipes for CH02's cut on the embedded model: recovery of the held-out Wikipedia perplexity gap and time.

One run = one recipe: the chapter's cut (6 middle blocks of 30 removed), distilled from the base model on
Wikipedia's train split, then measured on the chapter's held-out Wikipedia eval text (4,096 tokens, window
512). Recovery = (pruned - healed) / (pruned - base). Prints one JSON line per run and appends it to
benchmarks/results/heal_recipe-<cpu|cuda>.jsonl ($OUT when set). Wall and process CPU time of the distillation are recorded, with the
load average before and after (the machine is shared).

    python benchmarks/heal_recipe.py --steps 20 --lr 1e-3 --first 11 --last 13 --hidden-cut 1.0
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from utils.data import calibration_batches, token_ids  # noqa: E402
from utils.depth import remove_layers, select_window  # noqa: E402
from utils.distill import distill, train_only_blocks_from  # noqa: E402
from utils.evaluation import cached_perplexity, perplexity  # noqa: E402
from utils.models import load_model  # noqa: E402
from utils.speed import stopwatch  # noqa: E402


def main() -> None:
    since_start = stopwatch()  # the CPU seconds of the curve's progress lines
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, default=-1)
    parser.add_argument("--first", type=int, default=-1, help="first trainable block (default: start - 1)")
    parser.add_argument("--last", type=int, default=-1, help="last trainable block (default: the last)")
    parser.add_argument("--ce", type=float, default=0.5)
    parser.add_argument("--kd", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--hidden-cut", type=float, default=0.0, help="weight of a hidden-state term at the cut")
    parser.add_argument("--hidden-all", type=float, default=0.0, help="weight of the hidden-state term on every kept block")
    parser.add_argument("--precision", default="no")
    parser.add_argument("--control", action="store_true", help="distill the unpruned model the same way too")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="also measure the held-out recovery every N steps (the curve; costs a perplexity each)")
    parser.add_argument("--tag", default="")
    parser.add_argument("--dtype", default=None,
                        help="the model's dtype (default: load_model's choice: float32 on a CPU, bfloat16 on a GPU); "
                             "float32 on a GPU reproduces the CPU chapter's arithmetic")
    parser.add_argument("--recipes", default=None,
                        help="a JSONL file, one recipe per line (keys: the options above, e.g. {\"lr\": 1e-3, \"steps\": 40}); "
                             "runs each in turn with the model and baselines loaded once")
    cli = parser.parse_args()
    recipes = [{}] if cli.recipes is None else [json.loads(line) for line in open(cli.recipes) if line.strip()]

    model, tokenizer = load_model("embedded", dtype=cli.dtype)
    n_layers, n_remove = model.config.num_hidden_layers, 6
    start = n_layers // 2 - n_remove // 2
    removed = select_window(n_layers, start, n_remove)
    pruned = remove_layers(model, removed)
    held_out = token_ids(tokenizer, "wikipedia", "eval", max_tokens=4096)
    news = token_ids(tokenizer, "news", "eval", max_tokens=4096)
    baselines = {"base": cached_perplexity(model, held_out, window=512, progress=False),
                 "pruned": cached_perplexity(pruned, held_out, window=512, progress=False),
                 "base_news": cached_perplexity(model, news, window=512, progress=False),
                 "pruned_news": cached_perplexity(pruned, news, window=512, progress=False)}
    for overrides in recipes:
        unknown = set(overrides) - set(vars(cli))
        if unknown:
            raise SystemExit(f"unknown recipe keys {sorted(unknown)}; known: {sorted(vars(cli))}")
        args = argparse.Namespace(**{**vars(cli), **overrides, "recipes": None})
        load_before = os.getloadavg()
        train_batches = calibration_batches(tokenizer, "wikipedia", n_samples=args.batch * args.steps, seq_len=args.seq,
                                            batch_size=args.batch, split="train")
        first = args.first if args.first >= 0 else start - 1
        kept = [i for i in range(n_layers) if i not in removed]
        # student block index j holds teacher block kept[j]; hidden-state index j + 1 is its output
        cut_student = kept.index(removed[-1] + 1) + 1  # output of the first block after the cut
        layer_map = None
        hidden_weight = 0.0
        if args.hidden_cut > 0:
            layer_map, hidden_weight = {cut_student: removed[-1] + 2}, args.hidden_cut
        if args.hidden_all > 0:
            layer_map = {j + 1: block + 1 for j, block in enumerate(kept)}
            hidden_weight = args.hidden_all

        def curve(student):
            ppl = perplexity(student, held_out, window=512, progress=False)
            print(json.dumps({"tag": args.tag, "ppl_wiki": ppl, "cpu_s": since_start()["cpu_s"], "load": os.getloadavg(),
                              "recovery_wiki": (baselines["pruned"] - ppl) / (baselines["pruned"] - baselines["base"])}),
                  flush=True)
            return {"ppl_wiki": ppl, "recovery_wiki": (baselines["pruned"] - ppl) / (baselines["pruned"] - baselines["base"])}

        def heal(student, n_blocks):
            trainable = train_only_blocks_from(student, first)
            if args.last >= 0:
                blocks = student.model.layers
                last = args.last if n_blocks == len(kept) else kept[args.last]  # the same teacher block
                for block in list(blocks)[last + 1:]:
                    for p in block.parameters():
                        p.requires_grad_(False)
                for p in student.model.norm.parameters():
                    p.requires_grad_(False)
                trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
            elapsed = stopwatch()
            history = distill(student, model, train_batches, steps=args.steps, lr=args.lr,
                              warmup_steps=args.warmup if args.warmup >= 0 else max(1, args.steps // 10),
                              temperature=args.temperature, ce_weight=args.ce, kd_weight=args.kd,
                              hidden_weight=hidden_weight if n_blocks == len(kept) else 0.0,
                              layer_map=layer_map if n_blocks == len(kept) else None,
                              mixed_precision=args.precision, seed=0, progress=False,
                              eval_fn=curve if args.eval_every and n_blocks == len(kept) else None,
                              eval_every=args.eval_every)
            seconds = elapsed()
            return history, trainable, seconds["cpu_s"], seconds["wall_s"]

        healed = copy.deepcopy(pruned)
        history, trainable, cpu_s, wall_s = heal(healed, len(kept))
        healed_ppl = perplexity(healed, held_out, window=512, progress=False)
        healed_news = perplexity(healed, news, window=512, progress=False)
        row = {"tag": args.tag, **vars(args), "first": first, "trainable_M": trainable / 1e6,
               "base": baselines["base"], "pruned": baselines["pruned"], "healed": healed_ppl,
               "recovery_wiki": (baselines["pruned"] - healed_ppl) / (baselines["pruned"] - baselines["base"]),
               "recovery_news": (baselines["pruned_news"] - healed_news) / (baselines["pruned_news"] - baselines["base_news"]),
               "distill_wall_s": wall_s, "distill_cpu_s": cpu_s, "step_s": wall_s / args.steps,
               "final_loss": history.train[-1]["loss"], "curve": history.eval,
               "train_s_per_step": [row["train_s"] for row in history.train], "load_before": load_before, "load_after": os.getloadavg(),
               "threads": torch.get_num_threads(), "device": str(next(model.parameters()).device),
               "dtype": str(next(model.parameters()).dtype),
               "card": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if args.control:
            control = copy.deepcopy(model)
            _, _, c_cpu, c_wall = heal(control, n_layers)
            row["control_wiki"] = perplexity(control, held_out, window=512, progress=False)
            row["control_wall_s"], row["control_cpu_s"] = c_wall, c_cpu
        line = json.dumps(row)
        print(line, flush=True)
        out = pathlib.Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results")
        kind = "cuda" if next(model.parameters()).is_cuda else "cpu"
        with open(out / f"heal_recipe-{kind}.jsonl", "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()

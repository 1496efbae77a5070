"""The course's utils on a model sharded over several GPUs give the same result as on one GPU.

A Llama-3.2-1B-shaped model with random weights is saved once, then loaded twice: whole on GPU 0, and
sharded over every visible GPU with accelerate (`device_map="auto"`, memory caps forcing a split). The
same calls run on both: layer importance, depth pruning, GLU width pruning (data-driven scores), attention
bypass, and saving. The script records whether each result matches between the two (importances and
logits within bf16 tolerance; the same blocks selected) and whether the sharded pruned model, saved and
loaded back whole, gives the single-GPU model's logits.

  python benchmarks/sharded_check.py            # on a machine with 2 or more GPUs
  python benchmarks/sharded_check.py --model tiny-llama --device cpu   # smoke test of the code path

Writes benchmarks/results/sharded_check-<model>.json (or under $OUT).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from utils.bypass import bypass_attention, load_bypassed, save_bypassed
from utils.depth import remove_layers, select_by_importance
from utils.importance import layer_importance, sublayer_importance
from utils.models import build_from_config
from utils.speed import stopwatch
from utils.width import activation_neuron_importance, prune_glu_width


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).abs().max())


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids.to(next(model.parameters()).device), use_cache=False).logits.float().cpu()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama-3.2-1b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--remove", type=int, default=4)
    parser.add_argument("--width-percent", type=float, default=25.0)
    parser.add_argument("--bypass", type=int, default=4)
    args = parser.parse_args()

    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    n_gpus = torch.cuda.device_count() if cuda else 0
    folder = Path(tempfile.mkdtemp(prefix="sharded-check-"))
    base = build_from_config(args.model, device="cuda:0" if cuda else "cpu", dtype=dtype, seed=0)
    base.save_pretrained(folder / "base")
    weight_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    del base
    if cuda:
        torch.cuda.empty_cache()

    single = AutoModelForCausalLM.from_pretrained(folder / "base", dtype=dtype, device_map={"": 0} if cuda else {"": "cpu"})
    if cuda and n_gpus >= 2:
        # cap GPU 0 at about 40% of the weights so accelerate must place the rest on the other cards
        cap = {0: int(0.4 * weight_bytes), **{i: int(2 * weight_bytes) for i in range(1, n_gpus)}}
        sharded = AutoModelForCausalLM.from_pretrained(folder / "base", dtype=dtype, device_map="auto", max_memory=cap)
    else:
        sharded = AutoModelForCausalLM.from_pretrained(folder / "base", dtype=dtype, device_map="auto")
    placement = sorted({str(d) for d in getattr(sharded, "hf_device_map", {"": "cpu"}).values()})
    print("sharded placement:", placement)

    vocab = single.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    calibration = [{"input_ids": torch.randint(0, vocab, (4, 256), generator=generator),
                    "attention_mask": torch.ones(4, 256, dtype=torch.long)} for _ in range(2)]
    probe = torch.randint(0, vocab, (2, 64), generator=generator)
    checks: dict[str, dict] = {}
    tolerance = 0.05 if cuda else 1e-4  # bf16 matmuls on different cards may round differently

    elapsed = stopwatch()
    importance = {name: layer_importance(model, calibration, window_blocks=args.remove, progress=False)
                  for name, model in (("single", single), ("sharded", sharded))}
    chosen = {name: select_by_importance(imp["block_influence"], args.remove) for name, imp in importance.items()}
    checks["layer_importance"] = {
        "max_abs_difference": max_difference(importance["single"]["block_influence"], importance["sharded"]["block_influence"]),
        "same_blocks_selected": chosen["single"] == chosen["sharded"], "blocks": chosen["single"]}

    depth = {name: remove_layers(model, chosen["single"]) for name, model in (("single", single), ("sharded", sharded))}
    difference = max_difference(logits(depth["single"], probe), logits(depth["sharded"], probe))
    checks["remove_layers"] = {"max_abs_logit_difference": difference, "match": difference < tolerance}
    sharded_saved = folder / "sharded-depth"
    depth["sharded"].save_pretrained(sharded_saved)
    reloaded = AutoModelForCausalLM.from_pretrained(sharded_saved, dtype=dtype, device_map={"": 0} if cuda else {"": "cpu"})
    difference = max_difference(logits(depth["single"], probe), logits(reloaded, probe))
    checks["save_sharded_reload_whole"] = {"max_abs_logit_difference": difference, "match": difference < tolerance}
    del depth, reloaded
    scores = {name: activation_neuron_importance(model, calibration, progress=False)
              for name, model in (("single", single), ("sharded", sharded))}
    scores_difference = float((scores["single"] - scores["sharded"]).abs().max() / scores["single"].abs().max())
    width = {name: prune_glu_width(model, scores["single"], percent=args.width_percent)
             for name, model in (("single", single), ("sharded", sharded))}
    difference = max_difference(logits(width["single"], probe), logits(width["sharded"], probe))
    checks["prune_glu_width"] = {"max_relative_score_difference": scores_difference,
                                 "intermediate_size": width["single"].config.intermediate_size,
                                 "max_abs_logit_difference": difference, "match": difference < tolerance}
    del width

    attention = {name: sublayer_importance(model, calibration, progress=False)["attention"]
                 for name, model in (("single", single), ("sharded", sharded))}
    bypass = {name: select_by_importance(imp, args.bypass) for name, imp in attention.items()}
    bypassed = {name: bypass_attention(model, bypass["single"]) for name, model in (("single", single), ("sharded", sharded))}
    difference = max_difference(logits(bypassed["single"], probe), logits(bypassed["sharded"], probe))
    checks["bypass_attention"] = {"same_sublayers_selected": bypass["single"] == bypass["sharded"],
                                  "sublayers": bypass["single"], "max_abs_logit_difference": difference,
                                  "match": difference < tolerance}
    save_bypassed(bypassed["sharded"], folder / "sharded-bypass")
    reloaded = load_bypassed(folder / "sharded-bypass", dtype=dtype, device_map={"": 0} if cuda else {"": "cpu"})
    difference = max_difference(logits(bypassed["single"], probe), logits(reloaded, probe))
    checks["save_bypassed_sharded_reload_whole"] = {"max_abs_logit_difference": difference, "match": difference < tolerance}

    result = {
        "what": "utils calls on a model sharded over GPUs (accelerate device_map) against the same calls on one GPU",
        "model": args.model, "dtype": str(dtype), "gpus": n_gpus,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu", "sharded_placement": placement,
        "tolerance": tolerance, "checks": checks, "all_match": all(
            c.get("match", c.get("same_blocks_selected", True)) for c in checks.values()),
        "elapsed_s": elapsed()["wall_s"], "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
    }
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"sharded_check-{args.model}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(checks, indent=1))
    print("all match:", result["all_match"], "->", path)


if __name__ == "__main__":
    main()

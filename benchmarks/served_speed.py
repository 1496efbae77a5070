"""Served decoding: every transformation of the course timed the way a server runs it, against the card.

The base model and one variant per transformation (depth: blocks removed with utils.depth.remove_layers;
width: GLU neurons removed with utils.width.prune_glu_width; attention bypass with
utils.bypass.bypass_attention; adaptive bypass: utils.routing.make_adaptive with the skip set its router
would pick applied, a fixed decision for the measured step) are timed with utils.serving.served_decode_report:
a StaticCache filled with random keys/values of the context length, one greedy decode step captured as a
CUDA graph (eager on a CPU), the variants interleaved, warm-up rounds discarded, medians with quartiles, and
each run's bytes per second against the card's peak memory bandwidth (utils.serving.CARDS, or the measured
copy bandwidth on a CPU). Sections (each written to the results file as soon as it is done):

  decode    served decode at each batch x context, for every variant (CUDA graph, decode_attention)
  attention the 16 x 4,096 base step with transformers' own SDPA attention instead (what the cache costs)
  eager     the same step run eagerly (the launch-bound regime), at the smallest setting
  prefill   one forward pass of --prefill tokens, against the FLOP ideal and the card's peak bf16 throughput
  glu       the three GLU matrix-vector products of one block at several widths: cuBLAS in a CUDA graph vs
            torch.compile max-autotune, with the kernel each picks (why a narrower GLU loses efficiency)
  profile   the kernels of a captured base and width step (time per kernel name, launches, gaps)
  compiled  utils.serving.compile_blocks on every variant, then the decode section again (one section per
            --compile-scopes entry: "compiled" for the pieces of each block, "compiled model" for the whole forward;
            each scope on freshly built variants)

  GPU (Llama-3.1-8B shape, random bf16 weights):  python benchmarks/served_speed.py
  CPU, the embedded model:  python benchmarks/served_speed.py --model embedded --device cpu --settings 1x128 \
      --sections decode,eager,prefill --prefill 128

Writes benchmarks/results/served_speed-<model>-<device>.json (under $OUT when that is set).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from utils.bypass import bypass_attention
from utils.depth import remove_layers
from utils.models import (
    ARCHITECTURES,
    TINY_ARCHITECTURES,
    architecture_summary,
    build_from_config,
    decoder_layers,
    library_versions,
    load_model,
)
from utils.routing import AttentionRouter, adaptive_state, make_adaptive
from utils.serving import (
    card_peaks,
    compile_blocks,
    copy_bandwidth,
    device_name,
    prefill_report,
    served_decode_report,
    served_decode_step,
    spread,
)
from utils.speed import interleaved_samples
from utils.width import prune_glu_width, static_neuron_importance, target_intermediate_size


def spread_indices(n_layers: int, count: int) -> list[int]:
    """`count` block indices spread over the middle of the stack, never block 0 (which ones does not change
    the speed)."""
    return sorted({round(1 + i * (n_layers - 2) / count) for i in range(count)})


def build_variants(base: torch.nn.Module, fraction: int, width_percent: float, multiples: tuple[int, ...],
                   kept: tuple[str, ...] = ("base", "depth", "width", "bypass", "adaptive")) -> tuple[dict, dict]:
    """The base model and one variant per transformation named in `kept`, and a description of each. Width
    is pruned once per rounding multiple in `multiples` whose width differs: "width" for the first,
    "width-<multiple>" for the others (so one process compares the roundings, interleaved)."""
    n_layers = len(decoder_layers(base))
    count = max(1, n_layers // fraction)
    depth_removed = spread_indices(n_layers, count)
    bypassed = spread_indices(n_layers, count)
    current = base.config.intermediate_size
    widths = {}
    for number, multiple in enumerate(multiples):
        width = target_intermediate_size(current, base.config.hidden_size, percent=width_percent, multiple=multiple)
        if width not in [kept_width for kept_width, _ in widths.values()]:
            widths["width" if not number else f"width-{multiple}"] = (width, multiple)
    builders = {"base": lambda: base,
                "depth": lambda: remove_layers(base, depth_removed),
                "bypass": lambda: bypass_attention(base, bypassed)}
    for name, (width, _) in widths.items():
        builders[name] = lambda width=width: prune_glu_width(base, static_neuron_importance(base, "peak_to_peak"),
                                                             intermediate_size=width)

    def adaptive() -> torch.nn.Module:
        model = copy.deepcopy(base)
        hidden = base.config.hidden_size
        router = AttentionRouter(router_layer=0, profiles=["measured"], skip_sets={"measured": bypassed},
                                 weight=torch.zeros(1, hidden), bias=torch.zeros(1), feature_mean=torch.zeros(hidden),
                                 feature_std=torch.ones(hidden))
        make_adaptive(model, router)
        adaptive_state(model).apply(bypassed)  # the decision the router made at prefill, fixed for the step
        return model
    builders["adaptive"] = adaptive
    order = ("base", "depth", *widths, "bypass", "adaptive")
    # built one by one, only those asked ("width" asks for every rounding)
    models = {name: builders[name]() for name in order if name.split("-")[0] in kept}
    described = {"base": "unpruned",
                 "depth": f"{count} of {n_layers} blocks removed: {depth_removed}",
                 "bypass": f"attention of {count} of {n_layers} blocks bypassed: {bypassed}",
                 "adaptive": f"adaptive router (utils.routing), skip set {bypassed} applied for the step"}
    for name, (width, multiple) in widths.items():
        described[name] = f"GLU width {current} -> {width} ({width_percent}% removed, multiple {multiple})"
    return models, described


def glu_study(hidden: int, widths: list[int], dtype: torch.dtype, peaks: dict, repeats: int) -> list[dict]:
    """The GLU matrix-vector products of one block (gate, up: hidden -> width; down: width -> hidden) at
    batch 1, for each width: cuBLAS (F.linear) replayed from a CUDA graph, and torch.compile max-autotune
    (its own kernel choice), each timed over 50 replays per sample; plus the CUDA kernels each launches."""
    rows = []
    for width in widths:
        x = torch.randn(1, hidden, device="cuda", dtype=dtype)
        # four sets of weights (> 50 MB L2 each time), rotated, so no replay reads from the cache
        sets = [(torch.randn(width, hidden, device="cuda", dtype=dtype) * 0.02,
                 torch.randn(width, hidden, device="cuda", dtype=dtype) * 0.02,
                 torch.randn(hidden, width, device="cuda", dtype=dtype) * 0.02) for _ in range(4)]

        def glu(x, gate, up, down):
            return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)

        compiled = torch.compile(glu, mode="max-autotune-no-cudagraphs", dynamic=False)
        timings, kernels = {}, {}
        for name, function in (("cublas", glu), ("max_autotune", compiled)):
            for weights in sets:
                function(x, *weights)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
                function(x, *sets[0])
                torch.cuda.synchronize()
            kernels[name] = sorted({event.name[:90] for event in profile.events()
                                    if event.device_type == torch.autograd.DeviceType.CUDA})
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(50 // len(sets)):
                    for weights in sets:
                        function(x, *weights)
            timings[name] = graph
        per_call = 4 * (50 // len(sets))
        samples = interleaved_samples({name: graph.replay for name, graph in timings.items()}, repeats=repeats, warmup=2)
        moved = 3 * hidden * width * torch.finfo(dtype).bits // 8
        row = {"width": width, "multiple_of_128": width % 128 == 0, "multiple_of_256": width % 256 == 0,
               "bytes": moved}
        for name, values in samples.items():
            us = spread([1e6 * v / per_call for v in values])
            row[name] = {"us": us, "fraction_of_peak": moved / (us["median"] / 1e6) / peaks["memory_bytes_per_s"],
                         "kernels": kernels[name]}
        print(f"GLU width {width}: cuBLAS {row['cublas']['fraction_of_peak']:.0%} of peak, max-autotune "
              f"{row['max_autotune']['fraction_of_peak']:.0%}", flush=True)
        rows.append(row)
        del sets, timings
    return rows


def kernel_profile(models: dict, batch_size: int, context: int, replays: int = 10) -> dict:
    """Where a captured step's time goes: the CUDA kernels of `replays` graph replays, profiled, summed by
    kernel name (microseconds per step, launches per step), beside the step's wall time; the difference is
    time the card spends between kernels (launch gaps, ramp-up and tail of many short kernels)."""
    rows = {}
    for name, model in models.items():
        step = served_decode_step(model, batch_size, context)
        for _ in range(3):
            step()
        samples = interleaved_samples({"step": lambda: [step() for _ in range(replays)]}, repeats=5, warmup=1)["step"]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
            for _ in range(replays):
                step()
            torch.cuda.synchronize()
        kernels: dict[str, list[float]] = {}
        for event in profile.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                entry = kernels.setdefault(event.name[:90], [0.0, 0])
                entry[0] += event.device_time_total / replays
                entry[1] += 1 / replays
        top = sorted(kernels.items(), key=lambda item: -item[1][0])
        rows[name] = {"wall_us_per_step": 1e6 * statistics.median(samples) / replays,
                      "kernel_us_per_step": sum(v[0] for v in kernels.values()),
                      "launches_per_step": sum(v[1] for v in kernels.values()),
                      "top_kernels": [{"kernel": k, "us_per_step": round(v[0], 2), "launches_per_step": round(v[1], 2)}
                                      for k, v in top[:14]]}
        print(f"profile {name} {batch_size}x{context}: wall {rows[name]['wall_us_per_step']:.0f} us, kernels "
              f"{rows[name]['kernel_us_per_step']:.0f} us in {rows[name]['launches_per_step']:.0f} launches", flush=True)
        for entry in rows[name]["top_kernels"][:8]:
            print("   ", entry, flush=True)
        del step
    return rows


def matmul_rate(dtype: torch.dtype, n: int = 8192) -> float:
    """Measured dense matrix-product throughput (FLOP/s) of an n x n x n product on random data."""
    a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
    seconds = interleaved_samples({"mm": lambda: [a @ b for _ in range(10)]}, repeats=5, warmup=2)["mm"]
    return 10 * 2 * n**3 / statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama-3.1-8b",
                        help="'embedded', or a key of utils.models.ARCHITECTURES / TINY_ARCHITECTURES (random weights)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--settings", default="1x128,1x4096,16x4096", help="batch x context of the decode steps")
    parser.add_argument("--sections", default="decode,attention,eager,prefill,glu,compiled")
    parser.add_argument("--attention", default="decode,matmul", help="decode attentions to measure (utils.serving.ATTENTIONS)")
    parser.add_argument("--compiled-settings", default="1x128,16x4096")
    parser.add_argument("--compile-scopes", default="pieces,model", help="utils.serving.COMPILE_SCOPES to measure")
    parser.add_argument("--variants", default="base,depth,width,bypass,adaptive",
                        help="which variants to keep (fewer fit a smaller card: the 8B shape's five need about 70 GB)")
    parser.add_argument("--fraction", type=int, default=4, help="a 1/fraction of blocks removed or bypassed")
    parser.add_argument("--width-percent", type=float, default=40.0)
    parser.add_argument("--multiple", default="128", help="rounding multiple(s) of the pruned GLU width, comma-separated "
                        "(each distinct width is a variant: width, width-<multiple>)")
    parser.add_argument("--glu-widths", default="14336,8602,8576,8704,8192,7168")
    parser.add_argument("--prefill", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--memory-bandwidth", type=float, default=None, help="override the card's peak (bytes/s)")
    args = parser.parse_args()
    started = time.time()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sections = args.sections.split(",")
    settings = [tuple(int(v) for v in s.split("x")) for s in args.settings.split(",")]

    result: dict = {"what": "served decoding (static KV cache, captured step) of the base model and every transformation",
                    "model": args.model, "device": device_name(device), "dtype": str(dtype),
                    "versions": library_versions(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "host": platform.node(), "sections": {}}
    if device.type == "cuda":
        peaks = card_peaks(memory_bytes_per_s=args.memory_bandwidth)
        measured = {"copy_bytes_per_s": copy_bandwidth(device, 2048), "bf16_matmul_flops_per_s": matmul_rate(dtype)}
        try:
            result["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem,"
                                                   "power.limit,temperature.gpu", "--format=csv"],
                                                  capture_output=True, text=True, timeout=20).stdout
        except Exception as error:  # noqa: BLE001 (a record, not a requirement)
            result["nvidia_smi"] = repr(error)
    else:
        measured = {"copy_bytes_per_s": copy_bandwidth(device, 256)}
        peaks = card_peaks("cpu", memory_bytes_per_s=args.memory_bandwidth or measured["copy_bytes_per_s"])
        result["cpu_load"] = {"loadavg": os.getloadavg(), "threads": torch.get_num_threads(), "cores": os.cpu_count()}
    result["peaks"], result["measured_ceilings"] = peaks, measured
    print("peaks", peaks, "measured", measured, flush=True)

    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"served_speed-{args.model}-{device.type}.json"

    def save(section: str, value) -> None:
        result["sections"][section] = value
        result["elapsed_s"] = round(time.time() - started, 1)
        path.write_text(json.dumps(result, indent=1, default=str) + "\n")
        print(f"[{time.time() - started:.0f}s] wrote section {section}", flush=True)

    def attempt(section: str, function) -> None:
        try:
            save(section, function())
        except Exception as error:  # noqa: BLE001 (record the failure, go on with the next section)
            import traceback

            traceback.print_exc()
            save(section, {"error": repr(error)})
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def load() -> torch.nn.Module:
        if args.model == "embedded":
            return load_model("embedded", device=device, dtype=dtype)[0]
        if args.model in ARCHITECTURES or args.model in TINY_ARCHITECTURES:
            return build_from_config(args.model, device=device, dtype=dtype)
        raise SystemExit(f"unknown model {args.model}")

    base = load()
    kept = args.variants.split(",")
    multiples = tuple(int(m) for m in args.multiple.split(","))

    def variants(base: torch.nn.Module) -> tuple[dict, dict]:
        """build_variants, keeping only --variants (the others freed at once)."""
        return build_variants(base, args.fraction, args.width_percent, multiples, tuple(kept))

    models, described = variants(base)
    result["shape"] = architecture_summary(base.config)
    result["variants"] = described
    result["method"] = (f"utils.serving.served_decode_report: StaticCache of context+1 tokens pre-filled with random "
                        f"keys/values, one greedy step (logits of the last position, argmax fed back), captured as a "
                        f"CUDA graph on a GPU (eager on a CPU); {args.steps} steps per sample, {args.warmup} warm-up and "
                        f"{args.repeats} kept rounds, variants interleaved (utils.speed.interleaved_samples, device "
                        "synchronized around every sample); bytes = utils.serving.step_bytes (weights of the modules "
                        "that run + LM head + KV cache of the context); peak = utils.serving.CARDS (datasheet) unless "
                        "overridden; prefill: utils.serving.prefill_report, FLOPs = utils.speed.prefill_flops")

    def decode(mode: str = "auto", attention: str = "decode", chosen=None, which=settings, steps=args.steps):
        rows = []
        for batch_size, context in which:
            report = served_decode_report(chosen or models, batch_size, context, steps=steps, repeats=args.repeats,
                                          warmup=args.warmup, mode=mode, attention=attention, peaks=peaks)
            rows.append(report)
            line = ", ".join(f"{name} {row['ms_per_step']['median']:.2f} ms ({row['fraction_of_peak'] or 0:.0%}; "
                             f"{row['speedup']:.3f}/{row['ideal_speedup']:.3f})" for name, row in report["models"].items())
            print(f"{report['mode']} {attention} {batch_size}x{context}: {line}", flush=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        return rows

    attentions = args.attention.split(",")
    if "decode" in sections:
        for attention in attentions:
            attempt("decode" if attention == "decode" else f"decode {attention}",
                    lambda attention=attention: decode(attention=attention))
    if "attention" in sections and device.type == "cuda":
        biggest = max(settings, key=lambda s: s[0] * s[1])
        attempt("attention", lambda: decode(attention="sdpa", chosen={"base": base}, which=[biggest]))
    if "eager" in sections:
        attempt("eager", lambda: decode(mode="eager", attention="sdpa", which=[settings[0]], steps=5))
    if "prefill" in sections:  # the adaptive model decides at prefill: left out
        attempt("prefill", lambda: prefill_report({name: model for name, model in models.items() if name != "adaptive"},
                                                  args.prefill, repeats=5, warmup=1, peaks=peaks))
    if "glu" in sections and device.type == "cuda":
        widths = [int(w) for w in args.glu_widths.split(",")]
        attempt("glu", lambda: glu_study(base.config.hidden_size, widths, dtype, peaks, args.repeats))
    if "profile" in sections and device.type == "cuda":
        attempt("profile", lambda: {"graph 1x128": kernel_profile({name: models[name] for name in ("base", "width") if name in models}, 1, 128),
                                    "graph 1x4096 base": kernel_profile({"base": base}, 1, 4096)})
    if "compiled" in sections and device.type == "cuda":
        torch._dynamo.config.recompile_limit = 64
        torch._dynamo.config.cache_size_limit = 64
        which = [tuple(int(v) for v in s.split("x")) for s in args.compiled_settings.split(",")]
        for number, scope in enumerate(args.compile_scopes.split(",")):
            if number:  # compile_blocks works in place: every scope after the first gets freshly built variants
                models.clear()
                base = None
                gc.collect()
                torch.cuda.empty_cache()
                try:
                    base = load()
                    models.update(variants(base)[0])
                except Exception as error:  # noqa: BLE001 (record it: the sections already written stay)
                    save(f"compiled {scope}", {"error": repr(error)})
                    continue
            section = "compiled" if scope == "pieces" else f"compiled {scope}"
            # a whole-model compile runs the adaptive model's captured step (hooks suspended) as the compiled
            # graph of the skip set it holds
            chosen = dict(models)

            def compiled(scope=scope, chosen=chosen):
                for model in chosen.values():
                    compile_blocks(model, "max-autotune-no-cudagraphs", scope=scope)
                return {attention: decode(which=which, attention=attention, chosen=chosen) for attention in attentions}
            attempt(section, compiled)
            if "profile" in sections:
                attempt(f"profile {section}", lambda: {f"{section} 1x128": kernel_profile(
                    {name: models[name] for name in ("base", "width") if name in models}, 1, 128)})
            del chosen
    print(f"done in {time.time() - started:.0f}s; wrote {path}")


if __name__ == "__main__":
    main()

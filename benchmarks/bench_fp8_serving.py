"""FP8 as served against FP16 compiled, ViT-L/14, both towers, every serving batch size: verdicts that hold.

One process, one timer. The model is CLIP ViT-L/14 (laion2B architecture) with random weights (latency
depends on shapes only); the FP8 form is what the ``torch_fp8`` stage writes, made here without ModelOpt
(so the script runs on a GPU host with torch and transformers alone): every Linear an ``FP8Linear`` with its
weight max-calibrated (E4M3, per tensor) and its input scale the max over calibration batches, as ModelOpt's
``max`` algorithm sets it. Variants (``--variants``):

- ``fp16``: the FP16 model, ``torch.compile`` ``reduce-overhead`` (CUDA graphs): the reference;
- ``fp8``: every Linear an ``FP8Linear``, Q, K and V separate;
- ``fp8-qkv``: torch-fp8 as ``clip_fp8.fp8_runtime.load`` serves it (Q, K and V in one GEMM, ``fuse_qkv``);
- ``fp8-qkv-div``: that, quantizing by a divide (the runtime before it held the reciprocal);

each optionally with levers appended (``fp8-qkv-cdt``), applied to FP16 alike for a like-for-like ratio
(``fp16-cdt``): ``autotune`` (Inductor ``max-autotune``: its Triton FP8 GEMM templates against cuBLASLt), ``cdt``
(Inductor's coordinate-descent tuning of its pointwise and reduction kernels). SDPA backends are compared by
``probe_fp8_kernels.py``: forcing one around a compiled model here reused the graph already compiled for it.

Timing: every variant of one case (tower, batch) is compiled and warmed, then timed in ``--rounds``
interleaved rounds (the variant order rotates each round); a round is a block of CUDA-graph replays
between two CUDA events, about ``--block-ms`` long. Each case reports the median of the rounds and their
spread, and each FP8 variant's speedup over FP16 per round: a **win** when FP8 is faster in every round, a
**loss** when slower in every round, else a **tie** (the difference is within the noise). Where a case runs the
board at its power limit (image batch 128 on a 700 W H100), FP8's clock dips after each switch from FP16 and
recovers within a few hundred ms, so short rounds understate it: time such a case with ``--block-ms 300`` and
``SMI_TRACE=1`` (``scripts/gpu_session.sh``; docs/benchmarks.md, "The final form"). ``--profile``
adds the CUDA kernel time per call by category (GEMM, quantize, attention, norm, other) at batch 1 and 128,
and each variant's ten costliest kernels. Numerics: each FP8 variant's minimum embedding cosine against
the fake-quant model (the same scales, simulated in FP32) on calibration-like inputs.

    python benchmarks/bench_fp8_serving.py --out docs/results/2026-12-07-h100-fp8-serving.json --profile
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch
from bench_encoders import VIT_L_14, build_model  # this folder is on sys.path when the script runs

from clip_fp8.encoders import ImageEncoder, TextEncoder
from clip_fp8.fp8_runtime import COMPILE_OPTIONS, FP8, FP8_MAX, FP8Linear, fuse_qkv, gemm_fits, swap_in_fp8_linears
from clip_fp8.timing import compare, interleaved

TOWERS = {"image": ImageEncoder, "text": TextEncoder}
BASES = ("fp8-qkv-div", "fp8-qkv", "fp16", "fp8")  # a variant is one of these, then levers: fp8-qkv-cdt
LEVERS = ("autotune", "cdt")


def parse_variant(name: str) -> tuple[str, tuple[str, ...]]:
    base = next((b for b in BASES if name == b or name.startswith(b + "-") and
                 all(t in LEVERS for t in name[len(b) + 1:].split("-"))), None)
    if base is None:
        raise SystemExit(f"variant '{name}': not a base ({', '.join(BASES)}) followed by levers ({', '.join(LEVERS)})")
    return base, tuple(name[len(base) + 1:].split("-")) if name != base else ()


def compile_options(levers) -> dict:
    # As the runtime compiles (CUDA graphs); max-autotune adds max_autotune and coordinate-descent tuning.
    return {**COMPILE_OPTIONS, "max_autotune": "autotune" in levers,
            "coordinate_descent_tuning": "autotune" in levers or "cdt" in levers}


def matched_reference(name: str, variants) -> str:
    """The FP16 variant with the same levers (``fp16-cdt`` for ``fp8-qkv-cdt``) if timed, else plain ``fp16``."""
    levers = parse_variant(name)[1]
    twin = "-".join(("fp16", *levers))
    return twin if twin in variants else "fp16"


class DivFP8Linear(FP8Linear):
    """The quantization as the runtime first wrote it: ``x / s_x`` per element (now ``x * (1 / s_x)``)."""

    def forward(self, x):
        lead = x.shape[:-1]
        x8 = (x.reshape(-1, self.in_features) / self.input_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        y = torch._scaled_mm(x8, self.weight.t(), scale_a=self.input_scale, scale_b=self.weight_scale,
                             bias=self.bias, out_dtype=x.dtype, use_fast_accum=True)
        return y.reshape(*lead, self.out_features)


def inputs(tower: str, batch: int, seed: int) -> torch.Tensor:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    if tower == "image":
        return torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.float16, generator=generator)
    ids = torch.randint(0, VIT_L_14["text_config"]["vocab_size"] - 1, (batch, 77), device="cuda", generator=generator)
    ids[:, -1] = VIT_L_14["text_config"]["vocab_size"] - 1  # the highest id: where CLIP pools (argmax)
    return ids


@torch.inference_mode()
def calibrate(model, batches: int) -> dict[str, float]:
    """Each Linear's input amax over calibration batches (ModelOpt's ``max``)."""
    amax: dict[str, float] = {}
    hooks = [module.register_forward_hook(
        lambda mod, args, out, name=name: amax.__setitem__(name, max(amax.get(name, 0.0), args[0].abs().max().item())))
        for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    for i in range(batches):
        ImageEncoder(model)(inputs("image", 32, 1000 + i))
        TextEncoder(model)(inputs("text", 32, 2000 + i))
    for hook in hooks:
        hook.remove()
    return amax


def to_fp8(model, amax: dict[str, float]):
    """What the torch_fp8 stage writes: every Linear whose shape ``_scaled_mm`` takes, in FP8."""
    fp8 = copy.deepcopy(model)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and gemm_fits(m.in_features, m.out_features)]
    swap_in_fp8_linears(fp8, names, torch.float16, "cuda")
    with torch.no_grad():
        for name in names:
            source, target = model.get_submodule(name), fp8.get_submodule(name)
            weight_scale = source.weight.float().abs().max() / FP8_MAX
            target.weight.data = (source.weight.float() / weight_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
            target.weight_scale.fill_(weight_scale.item())
            target.input_scale.fill_(amax[name] / FP8_MAX)
            if source.bias is not None:
                target.bias.data = source.bias.data.clone()
    return fp8.eval()


class FakeQuantLinear(torch.nn.Module):
    """The reference: the FP8 layer's arithmetic simulated in FP32 (quantize, dequantize, matmul)."""

    def __init__(self, layer: FP8Linear):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        l = self.layer
        x = (x.float() / l.input_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * l.input_scale
        y = x @ (l.weight.float() * l.weight_scale).t()
        return y if l.bias is None else y + l.bias.float()


def fake_quant(fp8_model):
    reference = copy.deepcopy(fp8_model).float()
    for name, module in list(reference.named_modules()):
        if isinstance(module, FP8Linear):
            parent, _, child = name.rpartition(".")
            setattr(reference.get_submodule(parent), child, FakeQuantLinear(module))
    return reference


@torch.inference_mode()
def min_cosine(model, reference, tower: str) -> float:
    worst = 1.0
    for i in range(2):
        x = inputs(tower, 32, 3000 + i)
        got = TOWERS[tower](model)(x).float()
        want = TOWERS[tower](reference)(x.float() if tower == "image" else x).float()
        worst = min(worst, torch.nn.functional.cosine_similarity(got, want).min().item())
    return worst


# Inductor names a fused kernel after every op it holds (``triton_poi_fused__scaled_mm__to_copy_clamp_div_gelu`` is
# GELU and the next GEMM's input quantization): only library kernels are GEMMs or attention.
CATEGORIES = ("gemm", "attention", "norm", "activation", "quantize", "other")


def category(kernel: str) -> str:
    name = kernel.lower()
    if name.startswith("triton_tem") or "triton_" not in name and any(
            k in name for k in ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_")) and "sdpa" not in name:
        return "gemm"
    if any(k in name for k in ("flash", "fmha", "sdpa", "attention_kernel")) and not name.startswith("triton"):
        return "attention"
    if "layer_norm" in name:
        return "norm"  # with the residual add, and the next GEMM's input quantization where fused
    if "gelu" in name:
        return "activation"
    if any(k in name for k in ("clamp", "to_copy", "div")):
        return "quantize"
    return "other"


def profile(run, calls: int = 10) -> dict:
    """CUDA kernel time per call by category, and the costliest kernels (CUDA-graph replays included)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        start.record()
        for _ in range(calls):
            run()
        stop.record()
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and "memcpy" not in event.name.lower() \
                and "memset" not in event.name.lower():
            kernels.setdefault(event.name, []).append(event.time_range.elapsed_us())
    by_category: dict[str, dict] = {}
    for name, times in kernels.items():
        entry = by_category.setdefault(category(name), {"us": 0.0, "kernels": 0})
        entry["us"] += sum(times) / calls
        entry["kernels"] += len(times) / calls
    top = sorted(kernels.items(), key=lambda kv: -sum(kv[1]))[:10]
    # Kernel time against the wall time of the same calls: the difference is time with no kernel running.
    return {"per_call_us": round(sum(sum(t) for t in kernels.values()) / calls, 1),
            "wall_us_per_call": round(start.elapsed_time(stop) * 1000 / calls, 1),
            "kernels_per_call": round(sum(len(t) for t in kernels.values()) / calls, 1),
            "categories": {c: {"us": round(v["us"], 1), "kernels": round(v["kernels"], 1)} for c, v in sorted(by_category.items())},
            "top": [{"kernel": n[:140], "category": category(n), "us_per_call": round(sum(t) / calls, 1),
                     "launches_per_call": round(len(t) / calls, 1)} for n, t in top]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--variants", default="fp16,fp8,fp8-qkv")
    parser.add_argument("--served", default="fp8-qkv", help="the variant that is FP8 as the runtime serves it")
    parser.add_argument("--towers", default="image,text")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--block-ms", type=float, default=150.0)
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument("--profile", action="store_true", help="kernel breakdown at batch 1 and 128")
    parser.add_argument("--budget-s", type=float, default=0, help="start no new case after this many seconds (0: none)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    variants = args.variants.split(",")
    parsed = {v: parse_variant(v) for v in variants}
    if variants[0] != "fp16" or args.served not in variants:
        raise SystemExit(f"--variants must start with fp16 and hold --served ({args.served}): {args.variants}")

    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = True  # PyTorch's default, stated
    # One compiled frame per variant and batch size: past dynamo's default limit (8) it silently runs eagerly.
    torch._dynamo.config.recompile_limit = torch._dynamo.config.accumulated_recompile_limit = 256
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": __import__("transformers").__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv, "rounds": args.rounds,
            "block_ms": args.block_ms, "served": args.served}
    t0 = time.perf_counter()
    fp16 = build_model("cuda", torch.float16)
    fp8 = to_fp8(fp16, calibrate(fp16, args.calibration_batches))
    models = {"fp16": fp16, "fp8": fp8}
    if any(base.startswith("fp8-qkv") for base, _ in parsed.values()):
        models["fp8-qkv"] = copy.deepcopy(fp8)
        meta["qkv_fused_attentions"] = fuse_qkv(models["fp8-qkv"])
        models["fp8-qkv-div"] = copy.deepcopy(models["fp8-qkv"])
        for module in models["fp8-qkv-div"].modules():
            if isinstance(module, FP8Linear):
                module.__class__ = DivFP8Linear
    reference = fake_quant(fp8)
    numerics = {v: {t: min_cosine(models[parsed[v][0]], reference, t) for t in TOWERS}
                for v in dict.fromkeys(b for b, _ in parsed.values())}
    del reference
    torch.cuda.empty_cache()
    meta["setup_s"] = round(time.perf_counter() - t0, 1)
    print("min cosine vs fake-quant:", json.dumps(numerics), flush=True)

    rows, profiles, compile_s, skipped, failed = [], {}, {}, [], {}
    result = {"meta": meta, "numerics_min_cosine_vs_fakequant": numerics, "rows": rows, "profiles": profiles,
              "compile_s": compile_s, "skipped": skipped, "failed": failed}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for tower in args.towers.split(","):
        compiled = {v: torch.compile(TOWERS[tower](models[base]), dynamic=False, options=compile_options(levers))
                    for v, (base, levers) in parsed.items()}
        for batch in args.batch_sizes:
            if args.budget_s and time.perf_counter() - t0 > args.budget_s:
                skipped.append(f"{tower}/{batch}")
                continue
            x = inputs(tower, batch, 7)
            runs = {}
            for v in variants:
                def run(v=v):
                    with torch.inference_mode():
                        compiled[v](x)
                started = time.perf_counter()
                try:
                    for _ in range(3):  # compile, record the CUDA graph, replay
                        run()
                    torch.cuda.synchronize()
                except Exception as exc:  # a variant that does not compile here: recorded, the others timed
                    failed[f"{tower}/{batch}/{v}"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
                    print(f"{tower} b{batch} {v}: {failed[f'{tower}/{batch}/{v}']}", flush=True)
                    continue
                compile_s[f"{tower}/{batch}/{v}"] = round(time.perf_counter() - started, 1)
                runs[v] = run
            if "fp16" not in runs or args.served not in runs:
                continue
            print(f"{time.strftime('%H:%M:%S')} timing {tower} b{batch}", flush=True)  # to line up with a clock trace
            timed = interleaved(runs, rounds=args.rounds, block_target_ms=args.block_ms)
            print(f"{time.strftime('%H:%M:%S')} timed", flush=True)
            stats = timed["forms"]
            like_for_like = {v: matched_reference(v, list(runs)) for v in list(runs)[1:]}
            row = {"tower": tower, "batch": batch, "fp16_ms": stats["fp16"]["median_ms"], "variants": stats,
                   "speedup": timed["versus"],
                   "speedup_like_for_like": {v: {"reference": r, **compare(stats, r, v)} for v, r in like_for_like.items()
                                             if parsed[v][0] != "fp16"}}
            # As served: the runtime's FP8 form where it beats FP16 compiled (with the same levers) in every round.
            served, reference_form = args.served, like_for_like[args.served]
            versus = compare(stats, reference_form, served)
            served_by = "fp8" if versus["verdict"] == "win" else "fp16"
            served_ms = stats[served if served_by == "fp8" else reference_form]["median_ms"]
            row.update(fp16_reference=reference_form, fp8_form=served, fp8_ms=stats[served]["median_ms"],
                       served_by=served_by, served_ms=served_ms,
                       served_speedup=stats[reference_form]["median_ms"] / served_ms, served_verdict=versus["verdict"],
                       spread={v: stats[v]["spread"] for v in stats})
            rows.append(row)
            print(f"{tower:5s} b{batch:<4d} " + "  ".join(
                f"{v} {stats[v]['median_ms']:.3f}ms±{stats[v]['spread']:.1%}" for v in stats) + "  " + "  ".join(
                f"{v}/{s['reference']}: {s['median']:.2f}x [{s['min']:.2f}-{s['max']:.2f}] {s['verdict']}"
                for v, s in row["speedup_like_for_like"].items()), flush=True)
            if args.profile and batch in (1, 128):
                print(f"{time.strftime('%H:%M:%S')} profiling {tower} b{batch}", flush=True)
                for v in runs:
                    profiles[f"{tower}/{batch}/{v}"] = profile(runs[v])
            args.out.write_text(json.dumps(result, indent=1))  # after every case: a cut-off run keeps what it timed
        del compiled
        torch._dynamo.reset()

    args.out.write_text(json.dumps(result, indent=1))
    for row in rows:  # one table line per case: its forms' medians (spread), then FP8 over its like-for-like FP16
        s = row["variants"]
        print(f"| {row['tower']} | {row['batch']} | " + " | ".join(f"{v} {s[v]['median_ms']:.3f} (±{s[v]['spread']:.0%})" for v in s)
              + " | " + " | ".join(f"{v}/{c['reference']} {c['median']:.2f}x {c['verdict']}"
                                   for v, c in row["speedup_like_for_like"].items()) + f" | served by {row['served_by']} |")
    if failed:
        print("failed:", json.dumps(failed, indent=1))
    if skipped:
        print("not timed (--budget-s):", ", ".join(skipped))
    if profiles:
        print("\n| case | us/call | kernels | " + " | ".join(CATEGORIES) + " |")
        for case, p in profiles.items():
            cats = p["categories"]
            print(f"| {case} | {p['per_call_us']} | {p['kernels_per_call']} | " + " | ".join(
                f"{cats.get(c, {}).get('us', 0):.0f} ({cats.get(c, {}).get('kernels', 0):.0f})" for c in CATEGORIES) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

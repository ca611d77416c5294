"""PyTorch baselines for the CLIP encoders at production shapes: what users run today, timed fairly.

CLIP ViT-L/14 (laion2B-s32B-b82K architecture; random weights where the checkpoint cannot be had:
latency depends on shapes, not values), FP16, SDPA attention, on one GPU. For each encoder and batch
size: warm-up, then timed iterations for a fixed duration with CUDA events around each call, inputs
already on the device and rotated among several sets (so no host-device copy and no cache-resident
replay is timed). Reports median/p90/p95/p99 latency, throughput in samples/s, coefficient of
variation (runs above --unstable-cv are flagged) and peak memory. Prints a table, writes JSON.

    python benchmarks/bench_encoders.py --out bench.json [--compile] [--batch-sizes 1 8 32 128] [--onnx-dir DIR]

The baselines need only torch and transformers (they run on GPU hosts without the rest of the project
installed). With --onnx-dir and TensorRT present (Python API or trtexec), the FP16 and FP8 engines are
built and timed by the pipeline's own build and benchmark code (CUDA graphs where they capture, the same
timer); without TensorRT that part is skipped with the reason, in the output and in the JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from clip_fp8.model_locks import CLIP_VOCAB_SIZE
from clip_fp8.encoders import ImageEncoder, TextEncoder
from clip_fp8.timing import time_cuda

VIT_L_14 = dict(
    text_config=dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=77, hidden_act="gelu"),
    vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=224, patch_size=14, hidden_act="gelu"),
    projection_dim=768,
)


def build_model(device: str, dtype: torch.dtype):
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(**VIT_L_14)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = CLIPModel(config).to(dtype).eval()
    return model


def time_engines(onnx_dir: Path, args, work: Path) -> tuple[list[dict], dict]:
    """Build FP16/FP8 engines from ``onnx_dir`` (fp16_text.onnx, fp8_image.onnx, ... as the surgery stage writes
    them) with the pipeline's own build stage, and time them with its benchmark code. Needs TensorRT."""
    from clip_fp8.artifacts import ArtifactRef
    from clip_fp8.config import BenchmarkConfig, BuildConfig
    from clip_fp8.tasks.benchmark import time_engines as time_built_engines
    from clip_fp8.tasks.build import build
    from clip_fp8.tasks.tensorrt import resolve_target

    build_cfg = BuildConfig(backend=args.backend, min_batch=min(args.batch_sizes), opt_batch=max(args.batch_sizes),
                            max_batch=max(args.batch_sizes))
    bench_cfg = BenchmarkConfig(batch_sizes=args.batch_sizes, warmup_ms=int(args.warmup * 1000),
                                duration_s=max(1, round(args.duration)))
    target = resolve_target(build_cfg)
    if target.unavailable:
        return [], {"skipped": target.unavailable}
    if not list(onnx_dir.glob("fp*_*.onnx")):
        sys.exit(f"bench_encoders.py: no fp16_*/fp8_*.onnx in --onnx-dir {onnx_dir}")
    rows, meta = [], {"target": target.model_dump(), "engines": {}, "skipped": {}}
    for variant in ("fp16", "fp8"):
        files = {p.stem: p.name for p in sorted(onnx_dir.glob(f"{variant}_*.onnx"))}
        if not files:
            continue
        repaired = ArtifactRef(stage="surgery", path=str(onnx_dir), digest=variant, files=files, meta={"variant": variant})
        out = work / variant
        out.mkdir(parents=True, exist_ok=True)
        built = build(repaired, build_cfg, target, out)
        if built.skip_reason:
            meta["skipped"][variant] = built.skip_reason
            continue
        meta["engines"].update(built.meta["engines"])
        ref = ArtifactRef(stage="build", path=str(out), digest=variant, files=built.files, meta=built.meta)
        timed, skipped = time_built_engines(ref, target, bench_cfg, out)
        meta["skipped"].update(skipped)
        rows += [{"variant": f"tensorrt-{r['variant']}", **{k.removeprefix("latency_"): v for k, v in r.items() if k != "variant"}}
                 for r in timed]
    return rows, meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench_encoders.json"))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (default mode, static shapes)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per case")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds of timed iterations per case")
    parser.add_argument("--input-sets", type=int, default=4)
    parser.add_argument("--unstable-cv", type=float, default=0.05)
    parser.add_argument("--onnx-dir", type=Path, help="also build and time TensorRT engines from this folder's "
                        "fp16_*/fp8_*.onnx (the surgery stage's output); skipped, with the reason, where TensorRT is absent")
    parser.add_argument("--backend", default="auto", choices=["auto", "tensorrt", "trtexec"])
    args = parser.parse_args()

    if not torch.cuda.is_available():
        sys.exit("bench_encoders.py: needs a CUDA GPU (the PyTorch FP16 baseline is a GPU measurement)")
    device, dtype = "cuda", torch.float16
    model = build_model(device, dtype)
    props = torch.cuda.get_device_properties(0)
    meta = {"date": time.strftime("%Y-%m-%d"), "device": props.name,
            "compute_capability": f"{props.major}.{props.minor}", "torch": torch.__version__,
            "transformers": __import__("transformers").__version__, "python": platform.python_version(),
            "model": "CLIP ViT-L/14 (laion2B-s32B-b82K architecture, random weights), FP16, SDPA",
            "parameters": sum(p.numel() for p in model.parameters()), "method": vars(args) | {"out": str(args.out)}}
    encoders = {"text": TextEncoder(model).eval(), "image": ImageEncoder(model).eval()}
    variants = {"pytorch-eager": lambda m: m}
    if args.compile:
        variants["pytorch-compile"] = lambda m: torch.compile(m, dynamic=False)

    rows = []
    for variant, wrap in variants.items():
        for encoder_name, encoder in encoders.items():
            runner = wrap(encoder)
            for batch in args.batch_sizes:
                g = torch.Generator(device=device).manual_seed(batch)
                if encoder_name == "text":
                    inputs = [torch.randint(0, 49406, (batch, 77), device=device, generator=g) for _ in range(args.input_sets)]
                    for x in inputs:
                        x[:, 20] = 49407  # EOS: CLIP pools there
                else:
                    inputs = [torch.randn(batch, 3, 224, 224, device=device, dtype=dtype, generator=g)
                              for _ in range(args.input_sets)]
                torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                with torch.inference_mode():
                    stats = time_cuda(lambda i: runner(inputs[i % len(inputs)]), warmup_s=args.warmup, duration_s=args.duration)
                row = {"variant": variant, "encoder": encoder_name, "batch": batch, **stats,
                       "throughput_samples_s": batch * 1000.0 / stats["median_ms"],
                       "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20,
                       "unstable": stats["cv"] > args.unstable_cv, "wall_s": time.perf_counter() - t0}
                rows.append(row)
                args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))  # partial results survive a timeout
                print(f"{variant:16} {encoder_name:5} b={batch:<4} median {row['median_ms']:8.3f} ms  "
                      f"p99 {row['p99_ms']:8.3f}  {row['throughput_samples_s']:9.1f}/s  cv {row['cv']:.3f}"
                      f"{' UNSTABLE' if row['unstable'] else ''}  peak {row['peak_memory_mb']:.0f} MB", flush=True)

    if args.onnx_dir:
        del encoders, model
        torch.cuda.empty_cache()
        engine_rows, meta["tensorrt"] = time_engines(args.onnx_dir, args, args.out.parent / "engines")
        for row in engine_rows:
            row["unstable"] = row["cv"] > args.unstable_cv
        rows += engine_rows
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
        if "skipped" in meta["tensorrt"]:
            print(f"TensorRT engines not timed: {meta['tensorrt']['skipped']}")

    print(f"\n{meta['device']} (cc {meta['compute_capability']}), torch {meta['torch']}, {meta['model']}")
    print(f"{'variant':16} {'encoder':7} {'batch':>5} {'median ms':>10} {'p90':>8} {'p95':>8} {'p99':>8} {'samples/s':>10} {'cv':>6} {'peak MB':>8}")
    for r in rows:
        print(f"{r['variant']:16} {r['encoder']:7} {r['batch']:>5} {r['median_ms']:>10.3f} {r['p90_ms']:>8.3f} "
              f"{r['p95_ms']:>8.3f} {r['p99_ms']:>8.3f} {r['throughput_samples_s']:>10.1f} {r['cv']:>6.3f} {r.get('peak_memory_mb', float('nan')):>8.0f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

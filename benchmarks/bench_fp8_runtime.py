"""torch-fp8 against PyTorch FP16 at production shapes, and the accuracy of every runtime on the embedded model.

Runs the pipeline's stage functions themselves (``clip_fp8.stage.execute``, no Prefect):

- ``--model vit-l-14`` (CLIP ViT-L/14, laion2B architecture, random weights: latency depends on shapes):
  calibration_data -> quantize -> torch_fp8, then the ``benchmark`` stage (PyTorch FP16 eager, FP16
  compiled with CUDA graphs, torch-fp8 compiled with CUDA graphs; batch sizes as given; one timer), then
  at the largest batch the two eager FP8 forms that explain why fusion is needed: torch-fp8 uncompiled and
  ModelOpt's own real-quant model (``mtq.compress``). Also the embedding cosine of torch-fp8 against the
  fake-quant model on calibration images, and the weights' bytes.
- ``--model embedded``: calibration_data -> quantize -> evaluate -> export[fp8] -> surgery[fp8] -> torch_fp8
  -> evaluate_deployed with runtimes fakequant, onnxruntime and torch-fp8: their CLIP_benchmark metrics
  side by side.

    python benchmarks/bench_fp8_runtime.py --model vit-l-14 --work /tmp/fp8 --out fp8-vitl.json
    python benchmarks/bench_fp8_runtime.py --model embedded --work /tmp/fp8e --out fp8-embedded.json

``--no-modelopt-ext`` makes ModelOpt fake-quantize FP8 with its own eager fallback instead of compiling its
CUDA extension first (about a minute on a fresh host; the same E4M3 rounding).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from bench_pipeline import make_checkpoint  # this folder is on sys.path when the script runs


def stage_runner(store, rows: list[dict]):
    from clip_fp8.stage import execute

    def run(fn, **inputs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        ref = execute(fn, store, f"bench-{fn.__name__}-{time.time_ns()}", inputs)
        rows.append({"stage": fn.__name__, "seconds": time.perf_counter() - t0})
        print(f"{fn.__name__:18s} {rows[-1]['seconds']:8.1f} s", flush=True)
        return ref

    return run


def quantized_model(config, run):
    from clip_fp8.tasks.calibration_data import calibration_data
    from clip_fp8.tasks.calibration_sources import resolve_data_source
    from clip_fp8.tasks.checkpoints import resolve_model_source
    from clip_fp8.tasks.quantize import quantize

    model_source, data_source = resolve_model_source(config.model), resolve_data_source(config.calibration)
    calib = run(calibration_data, data_source=data_source, cfg=config.calibration)
    quantized = run(quantize, model_source=model_source, calibration=calib, data_source=data_source,
                    model_cfg=config.model, calib_cfg=config.calibration, cfg=config.quantization)
    return model_source, data_source, calib, quantized


def cosine_to_fakequant(model_source, calib, data_source, quantized, fp8_ref, n: int) -> dict:
    """Min/mean embedding cosine of torch-fp8 (as served) against the fake-quant model, on calibration images."""
    from clip_fp8.config import ModelConfig
    from clip_fp8.fp8_runtime import load
    from clip_fp8.tasks.checkpoints import load_quantized
    from clip_fp8.tasks.surgery import check_inputs, torch_embeddings

    inputs = check_inputs(model_source.path, json.loads(calib.file("manifest").read_text()), data_source.path, n)
    fake = load_quantized(quantized.file("checkpoint"), ModelConfig(device="cuda", dtype="float16"))
    clip = load(fp8_ref.local_dir(), device="cuda", compile=False)  # the compiled forms are timed by benchmark
    out = {}
    for encoder, encode in (("image", clip.encode_image), ("text", clip.encode_text)):
        ref = torch.from_numpy(torch_embeddings(fake, encoder, inputs[encoder]))
        got = encode(torch.from_numpy(inputs[encoder])).float().cpu()
        sims = torch.nn.functional.cosine_similarity(got, ref)
        out[encoder] = {"min_cosine": float(sims.min()), "mean_cosine": float(sims.mean()), "samples": n}
    out["fp8_weight_tensors"] = clip.fp8_weights()
    out["weights_bytes"] = clip.weights_bytes
    del fake, clip
    torch.cuda.empty_cache()
    return out


def eager_fp8_rows(model_source, quantized, fp8_ref, batch: int, cfg) -> list[dict]:
    """At one batch size, the FP8 forms that run eagerly: torch-fp8 uncompiled and ModelOpt's ``mtq.compress``."""
    import modelopt.torch.quantization as mtq

    from clip_fp8.config import ModelConfig
    from clip_fp8.encoders import ImageEncoder, TextEncoder
    from clip_fp8.fp8_runtime import load
    from clip_fp8.tasks.benchmark import _time_encoder, model_dims
    from clip_fp8.tasks.checkpoints import load_quantized

    dims = model_dims(model_source.path)
    one = cfg.model_copy(update={"batch_sizes": [batch]})
    rows = []
    clip = load(fp8_ref.local_dir(), device="cuda", compile=False)
    for encoder, run in (("text", clip.encode_text), ("image", clip.encode_image)):
        rows += _time_encoder("torch-fp8-eager", encoder, run, dims[encoder], clip.model.config.text_config.vocab_size,
                              one, None, cuda_graph=False)
    del clip
    compressed = load_quantized(quantized.file("checkpoint"), ModelConfig(device="cuda", dtype="float16"))
    mtq.compress(compressed)
    for encoder, wrap in (("text", TextEncoder), ("image", ImageEncoder)):
        rows += _time_encoder("modelopt-compress-eager", encoder, wrap(compressed).eval(), dims[encoder],
                              compressed.config.text_config.vocab_size, one, None, cuda_graph=False)
    torch._dynamo.reset()
    try:  # whole-model compile of ModelOpt's real-quant model (no graph breaks allowed): recorded, not required
        torch.compile(ImageEncoder(compressed).eval(), dynamic=False, fullgraph=True)(
            torch.zeros(1, 3, *dims["image"][2:], device="cuda", dtype=torch.float16))
        compile_note = "compiled"
    except Exception as exc:  # noqa: BLE001 - the failure is the finding
        compile_note = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    rows.append({"variant": "modelopt-compress-compile", "note": compile_note})
    del compressed
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit-l-14", choices=["vit-l-14", "embedded"])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--calibration", type=int, default=512, help="calibration pairs (the recipe: 8192)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--duration", type=int, default=2, help="timed seconds per case")
    parser.add_argument("--check-samples", type=int, default=64)
    parser.add_argument("--no-modelopt-ext", action="store_true")
    args = parser.parse_args()

    if args.no_modelopt_ext:
        from modelopt.torch.quantization import extensions

        extensions.get_cuda_ext_fp8.extension = None  # ModelOpt then uses its eager E4M3 fake quantization
    from clip_fp8.artifacts import ArtifactStore
    from clip_fp8.config import PipelineConfig
    from clip_fp8.tasks.torch_fp8 import torch_fp8

    args.work.mkdir(parents=True, exist_ok=True)
    if args.model == "vit-l-14":
        source = args.work / "vit-l-14"
        if not (source / "config.json").is_file():
            make_checkpoint(source)
    else:
        source = "embedded:tiny-clip-shapes"
    config = PipelineConfig().with_overrides([
        f"model.source={source}", f"calibration.num_samples={args.calibration}", "calibration.batch_size=256",
        f"benchmark.batch_sizes={json.dumps(args.batch_sizes)}", f"benchmark.duration_s={args.duration}",
        "benchmark.warmup_ms=500", "evaluation.runtimes=[fakequant, onnxruntime, torch-fp8]"])
    store = ArtifactStore(str(args.work / "store"))
    stages: list[dict] = []
    run = stage_runner(store, stages)
    props = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
    meta = {"date": time.strftime("%Y-%m-%d"), "device": props.name if props else platform.processor() or "cpu",
            "compute_capability": f"{props.major}.{props.minor}" if props else None,
            "torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "modelopt": __import__("importlib.metadata").metadata.version("nvidia-modelopt"),
            "python": platform.python_version(), "args": {k: str(v) for k, v in vars(args).items()}}
    result: dict = {"meta": meta, "stages": stages}
    model_source, data_source, calib, quantized = quantized_model(config, run)
    fp8_ref = run(torch_fp8, quantized=quantized, model_cfg=config.model)
    result["torch_fp8"] = fp8_ref.meta

    if args.model == "embedded":
        from clip_fp8.tasks.eval_datasets import resolve_eval_source
        from clip_fp8.tasks.evaluate import evaluate
        from clip_fp8.tasks.evaluate_baseline import evaluate_baseline
        from clip_fp8.tasks.evaluate_deployed import evaluate_deployed
        from clip_fp8.tasks.export import export
        from clip_fp8.tasks.set_scales import set_scales
        from clip_fp8.tasks.surgery import surgery

        e, m = config.evaluation, config.model
        eval_source = resolve_eval_source(e)
        baseline = run(evaluate_baseline, model_source=model_source, eval_source=eval_source, model_cfg=m, cfg=e)
        first = run(evaluate, model_source=model_source, quantized=quantized, baseline=baseline, eval_source=eval_source,
                    model_cfg=m, cfg=e)
        exported = run(export, variant="fp8", model_source=model_source, model_cfg=m, quantization=config.quantization,
                       cfg=config.export)
        scaled = run(set_scales, exported=exported, quantized=quantized, model_source=model_source, model_cfg=m,
                     cfg=config.export)
        repaired = run(surgery, variant="fp8", exported=scaled, model_source=model_source, quantized=quantized,
                       calibration=calib, data_source=data_source, model_cfg=m, cfg=config.export, build_cfg=config.build)
        deployed = run(evaluate_deployed, evaluated=first, model_source=model_source, onnx=repaired, engines=None,
                       torch_fp8=fp8_ref, eval_source=eval_source, model_cfg=m, cfg=e, runtimes=list(e.runtimes))
        metrics = json.loads(deployed.file("metrics").read_text())
        result["metrics"] = metrics
        print(deployed.file("report:deployed-quality").read_text())
    else:
        from clip_fp8.tasks.benchmark import benchmark
        from clip_fp8.tasks.tensorrt import resolve_target

        result["cosine_to_fakequant"] = cosine_to_fakequant(model_source, calib, data_source, quantized, fp8_ref,
                                                            args.check_samples)
        print(json.dumps(result["cosine_to_fakequant"]), flush=True)
        timed = run(benchmark, engines=[], model_source=model_source, torch_fp8=fp8_ref, model_cfg=config.model,
                    cfg=config.benchmark, serving=config.serving, target=resolve_target(config.build))
        rows = timed.meta["rows"]
        args.out.write_text(json.dumps({**result, "rows": rows}, indent=1, default=str))
        rows += eager_fp8_rows(model_source, quantized, fp8_ref, max(args.batch_sizes), config.benchmark)
        result["rows"] = rows
        median = {(r["encoder"], r["variant"], r["batch"]): r["latency_median_ms"] for r in rows if "encoder" in r}
        print(f"\n{meta['device']}, torch {meta['torch']}: median ms (speedup of torch-fp8 over FP16 compiled)")
        for r in sorted((r for r in rows if "encoder" in r), key=lambda r: (r["encoder"], r["batch"], r["variant"])):
            ref = median.get((r["encoder"], "pytorch-compile", r["batch"]))
            ratio = f"{ref / r['latency_median_ms']:.2f}x" if ref and r["variant"].startswith(("torch-fp8", "modelopt")) else ""
            print(f"{r['encoder']:6} b{r['batch']:<4} {r['variant']:24} {r['latency_median_ms']:9.3f} ms  "
                  f"p99 {r['latency_p99_ms']:9.3f}  cv {r['cv']:.3f}  {ratio}")
        print(rows[-1])
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

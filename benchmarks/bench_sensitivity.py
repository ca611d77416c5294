"""The sensitivity stage at production size: how long ranking every unit of a ViT-L/14 CLIP takes.

Runs the stage functions themselves (``clip_fp8.stage.execute``, no Prefect), in the order the flow runs
them after a failed gate: calibration_data -> quantize (the first attempt) -> sensitivity. CLIP ViT-L/14
(laion2B architecture) with random weights and the generated shapes data at 224x224, as
``bench_pipeline.py`` (no checkpoint or COCO can be downloaded where this runs).

    python benchmarks/bench_sensitivity.py --work /tmp/sens --out sensitivity.json [--samples 256] [--batch 64]

Prints a table (stage, seconds, peak GPU memory) and the top units; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from bench_pipeline import make_checkpoint  # this folder is on sys.path when the script runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--calibration", type=int, default=512, help="pairs the first attempt is calibrated on")
    parser.add_argument("--samples", type=int, default=256, help="quantization.sensitivity_samples")
    parser.add_argument("--batch", type=int, default=64, help="quantization.sensitivity_batch_size")
    parser.add_argument("--model", default="vit-l-14", help="vit-l-14 (random weights) or any model.source")
    args = parser.parse_args()

    from clip_fp8.artifacts import ArtifactStore
    from clip_fp8.config import PipelineConfig
    from clip_fp8.stage import execute
    from clip_fp8.tasks.calibration_data import calibration_data
    from clip_fp8.tasks.calibration_sources import resolve_data_source
    from clip_fp8.tasks.checkpoints import resolve_model_source
    from clip_fp8.tasks.quantize import quantize
    from clip_fp8.tasks.sensitivity import sensitivity

    model_dir = args.work / "vit-l-14" if args.model == "vit-l-14" else args.model
    if args.model == "vit-l-14" and not (model_dir / "config.json").is_file():
        make_checkpoint(model_dir)
    config = PipelineConfig().with_overrides([
        f"model.source={model_dir}", f"calibration.num_samples={args.calibration}", "calibration.batch_size=256",
        f"quantization.sensitivity_samples={args.samples}", f"quantization.sensitivity_batch_size={args.batch}"])
    store = ArtifactStore(str(args.work / "store"))
    model_source, data_source = resolve_model_source(config.model), resolve_data_source(config.calibration)
    rows = []

    def timed(name, fn, inputs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        ref = execute(fn, store, f"bench-{name}-{time.time_ns()}", inputs)
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        rows.append({"stage": name, "seconds": seconds, "peak_gpu_bytes": peak})
        print(f"{name:18s} {seconds:8.1f} s  peak GPU {peak / 2**30 if peak else 0:.1f} GiB", flush=True)
        return ref

    calib = timed("calibration_data", calibration_data, {"data_source": data_source, "cfg": config.calibration})
    quantized = timed("quantize", quantize, {
        "model_source": model_source, "calibration": calib, "data_source": data_source, "model_cfg": config.model,
        "calib_cfg": config.calibration, "cfg": config.quantization})
    ranked = timed("sensitivity", sensitivity, {
        "model_source": model_source, "quantized": quantized, "calibration": calib, "data_source": data_source,
        "model_cfg": config.model, "cfg": config.quantization, "samples": args.samples, "batch_size": args.batch})
    result = json.loads(ranked.file("sensitivity").read_text())
    print(f"{len(result['units'])} units scored on {result['samples']} pairs; top 5:")
    for u in result["units"][:5]:
        print(f"  {u['unit']:55s} {u['kind']:9s} {u['score']:.4g}  {u['macs'] / result['total_macs']:.2%}")
    meta = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
            "torch": torch.__version__, "python": platform.python_version(), "args": {k: str(v) for k, v in vars(args).items()}}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows, "units_scored": len(result["units"]),
                                    "top": result["units"][:10], "total_macs": result["total_macs"]}, indent=1))


if __name__ == "__main__":
    main()

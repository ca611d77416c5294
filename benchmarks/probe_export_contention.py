"""Why stages beside the ONNX export slow down on a GPU host (issue 10): quantize timed alone, beside the two
export processes exporting on the GPU (the pipeline's behaviour), and beside the same exports on the CPU.

"first" is the host's first quantization: ModelOpt compiles its FP8 CUDA extension then (a
cold pipeline run pays it inside quantize, beside the exports). Each export process of a GPU-sized model traces on the GPU, so the host then has three CUDA contexts
(the flow's process and two exporters). Kernels of different processes do not run side by side: the GPU
time-slices between contexts. If that is what slows quantize down, exporting on the CPU removes it.

    python benchmarks/probe_export_contention.py --work /tmp/probe --out probe.json
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import torch
from bench_pipeline import make_checkpoint  # this folder is on sys.path when the script runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--calibration", type=int, default=8192)
    parser.add_argument("--cases", nargs="+", default=["first", "alone", "beside-gpu-export", "beside-cpu-export"])
    args = parser.parse_args()

    from clip_fp8.artifacts import ArtifactStore, scratch_directory
    from clip_fp8.config import PipelineConfig
    from clip_fp8.stage import execute
    from clip_fp8.tasks.calibration_data import calibration_data
    from clip_fp8.tasks.calibration_sources import resolve_data_source
    from clip_fp8.tasks.checkpoints import resolve_model_source
    from clip_fp8.tasks.export import export_in_processes
    from clip_fp8.tasks.quantize import quantize

    source = args.work / "vit-l-14"
    if not (source / "config.json").is_file():
        make_checkpoint(source)
    config = PipelineConfig().with_overrides([f"model.source={source}", f"calibration.num_samples={args.calibration}"])
    store = ArtifactStore(str(args.work / "store"))
    model_source, data_source = resolve_model_source(config.model), resolve_data_source(config.calibration)
    calib = execute(calibration_data, store, "calib", {"data_source": data_source, "cfg": config.calibration})
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cases": {}}

    def timed_quantize(label: str) -> float:
        t0 = time.perf_counter()
        execute(quantize, store, f"q-{label}-{time.time_ns()}", {
            "model_source": model_source, "calibration": calib, "data_source": data_source, "model_cfg": config.model,
            "calib_cfg": config.calibration, "cfg": config.quantization})
        return time.perf_counter() - t0

    for case in args.cases:
        if case in ("first", "alone"):  # first: includes building ModelOpt's CUDA extension on a fresh host
            result["cases"][case] = {"quantize_s": timed_quantize(case)}
        else:
            device = "cuda" if case == "beside-gpu-export" else "cpu"
            m = config.model.model_copy(update={"device": device, "dtype": "float16" if device == "cuda" else "float32"})
            spans: dict = {}

            def run_export():
                t0 = time.perf_counter()
                with scratch_directory() as out:
                    export_in_processes("fp16", model_source.path, None, m, config.export, out)
                spans["export_s"] = time.perf_counter() - t0

            exporter = threading.Thread(target=run_export)
            exporter.start()
            time.sleep(15)  # the two processes have started and loaded the model
            spans["quantize_s"] = timed_quantize(case)
            exporter.join()
            result["cases"][case] = spans
        print(case, result["cases"][case], flush=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

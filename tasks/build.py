"""Stage build: TensorRT engines from the repaired ONNX graphs of one variant, for one target.

Both variants build strongly typed, so precision comes from the ONNX: the FP16 engines from the FP16
graphs, the FP8 engines from the repaired FP8 graphs. The target (backend, version, GPU, compute
capability) is resolved once by the flow and is part of the key: an engine never moves across GPU
types. FP8 needs compute capability >= 8.9; below it the FP8 build is skipped with that reason.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

from clip_fp8.artifacts import ArtifactRef
from clip_fp8.config import BuildConfig
from clip_fp8.stage import Reads, StageOutput, stage
from clip_fp8.tasks.tensorrt import (
    Target, build_with_api, fp8_supported, layer_info_with_api, onnx_input, onnx_vocab_size, precision_census,
    trtexec_build_command,
)


def build_engine(name: str, onnx_path: Path, cfg: BuildConfig, target: Target, out_dir: Path) -> dict:
    """One engine into ``out_dir``: the report's facts for it (engine file name, size, build time, precision)."""
    timing_cache = out_dir / "timing.cache"
    engine_path = out_dir / f"{name}.engine"
    layer_path = out_dir / f"{name}.layers.json"
    if target.backend == "trtexec":
        cmd = trtexec_build_command(shutil.which("trtexec") or "trtexec", target.version, onnx_path, engine_path,
                                    cfg, timing_cache, layer_path)
        t0 = time.perf_counter()
        run = subprocess.run(cmd, capture_output=True, text=True)
        (out_dir / f"{name}.build.log").write_text(" ".join(cmd) + "\n" + run.stdout + run.stderr)
        if run.returncode != 0:
            raise RuntimeError(f"trtexec failed on {onnx_path.name} (see {name}.build.log)")
        seconds = time.perf_counter() - t0
        layer_info = layer_path.read_text() if layer_path.exists() else None
    else:
        built = build_with_api(target.backend, onnx_path, engine_path, cfg, timing_cache)
        (out_dir / f"{name}.build.log").write_text("\n".join(built["log"]))
        seconds = built["seconds"]
        layer_info = layer_info_with_api(target.backend, engine_path)
        if layer_info:
            layer_path.write_text(layer_info)
    return {"engine": engine_path.name, "engine_bytes": engine_path.stat().st_size, "build_seconds": seconds,
            "precision": precision_census(layer_info) or "unavailable (layer information needs a GPU)"}


# What ``build_engine`` reads of build.* (which GPUs to build for are the flow's: build.targets).
EngineSettings = Reads[BuildConfig, "enabled", "backend", "static_shapes", "workspace_mb", "optimization_level",
                       "min_batch", "opt_batch", "max_batch"]


@stage(retries=2)
def build(repaired: ArtifactRef, cfg: EngineSettings, target: Target, out_dir: Path) -> StageOutput:
    if target.unavailable:
        return StageOutput.skipped(target.unavailable)
    variant = repaired.meta["variant"]
    if variant == "fp8" and not fp8_supported(target.compute_capability):
        return StageOutput.skipped(f"FP8 needs compute capability >= 8.9; {target.gpu} is {target.compute_capability}")
    engines = {}
    for name in sorted(n for n in repaired.files if n.startswith(f"{variant}_")):
        onnx_path = repaired.file(name)
        input_name, dims = onnx_input(onnx_path)
        # What the benchmark needs of the graph: its input, and for text the vocabulary to draw ids below.
        io = {"input": input_name, "dims": dims, "vocab": onnx_vocab_size(onnx_path) if len(dims) == 2 else None}
        engines[name] = {**io, **build_engine(name, onnx_path, cfg, target, out_dir)}
    result = {"target": target.model_dump(), "variant": variant, "engines": engines}
    (out_dir / "engines.json").write_text(json.dumps(result, indent=1))
    return StageOutput(files={"engines": "engines.json", **{n: e["engine"] for n, e in engines.items()}}, meta=result,
                       summary={"engines": {"target": result["target"], "engines": engines}},
                       shown={f"engine_{n}": n for n in engines})

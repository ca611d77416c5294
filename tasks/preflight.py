"""Pre-flight: parse and build an ONNX with TensorRT-RTX's strongly typed parser and builder.

TensorRT-RTX (PyPI ``tensorrt-rtx-cu13-*``) parses and builds without a GPU, and its strongly typed
network rejects exactly what ``trtexec --stronglyTyped`` rejects (a Half x Float elementwise, a Conv
with mismatched input and kernel types). Every exported ONNX passes through it before the pipeline
trusts it; engines it builds are for RTX GPUs, so the pipeline keeps only its verdict and log.
"""

from __future__ import annotations

import time
from pathlib import Path

# Emitted by every CUDA-less build; says nothing about the graph.
_NO_GPU_NOISE = ("CUDA driver version is insufficient", "catchCudaError", "cudaGetDeviceCount", "CUDA initialization failure")


def available() -> tuple[bool, str]:
    try:
        import tensorrt_rtx_bindings  # noqa: F401
    except ImportError as exc:
        return False, f"TensorRT-RTX is not installed ({exc}); pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings"
    return True, ""


def preflight(onnx_path: str | Path, min_batch: int, opt_batch: int, max_batch: int, build: bool = True) -> dict:
    """Strongly typed parse (and build, if asked) of ``onnx_path``; the verdict, errors and log lines."""
    import tensorrt_rtx_bindings as trt

    from clip_fp8.tasks.tensorrt import capturing_logger

    messages: list[str] = []
    logger = capturing_logger(trt, messages, ignore=_NO_GPU_NOISE)
    t0 = time.perf_counter()
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    parsed = bool(parser.parse_from_file(str(onnx_path)))
    errors = []
    for i in range(parser.num_errors):
        text = str(parser.get_error(i)).splitlines()
        errors.append(next((line for line in text if line and not any(s in line for s in _NO_GPU_NOISE)), text[0]))
    result = {"tool": f"tensorrt-rtx {trt.__version__}", "parsed": parsed, "built": False, "errors": errors,
              "engine_bytes": None}
    if parsed and build:
        config = builder.create_builder_config()
        profile = builder.create_optimization_profile()
        for index in range(network.num_inputs):
            tensor = network.get_input(index)
            rest = tuple(tensor.shape)[1:]
            profile.set_shape(tensor.name, (min_batch, *rest), (opt_batch, *rest), (max_batch, *rest))
        config.add_optimization_profile(profile)
        engine = builder.build_serialized_network(network, config)
        result["built"] = engine is not None
        result["engine_bytes"] = engine.nbytes if engine is not None else None
        if engine is None and not errors:
            result["errors"] = [m for m in messages if m.startswith("[ERROR]")][-3:] or ["build returned no engine"]
    result["seconds"] = round(time.perf_counter() - t0, 3)
    result["log"] = messages[-50:]
    return result

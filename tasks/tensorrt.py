"""TensorRT helpers for the build and benchmark stages: one interface, three backends.

- ``tensorrt``: the TensorRT Python API (builder, ONNX parser, strongly typed network, timing cache).
- ``trtexec``: the command-line tool on PATH (``--stronglyTyped`` on 10.x; 11.x is always strongly typed).
- ``tensorrt-rtx``: TensorRT-RTX from PyPI, same API, engines for RTX GPUs; it builds without a GPU,
  which is how this stage is exercised on CPU machines.
``auto`` picks the API when ``tensorrt`` imports, else trtexec when found, else the stage is skipped
with the reason. Flag values are looked up by name, never hard-coded (they moved between 10 and 11).

Both engines are strongly typed, so precision comes from the ONNX: the FP16 engine from the FP16 ONNX,
the FP8 engine from the repaired FP8 ONNX. FP8 needs compute capability >= 8.9; on an older GPU the
FP8 build is skipped with that reason and the FP16 engine still builds.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from clip_fp8.model_locks import CLIP_VOCAB_SIZE
from clip_fp8.config import BuildConfig

INSTALL_HINT = ("install TensorRT (NVIDIA's TensorRT container, or `pip install tensorrt` from NVIDIA's index) "
                "or put trtexec on PATH")
FP8_MIN_CC = (8, 9)
UNSTABLE_CV = 0.05  # runs whose coefficient of variation exceeds this are flagged


class Target(BaseModel):
    """What engines are built for: part of the build and benchmark keys, so an engine never moves across
    GPU types. ``unavailable`` says why nothing can be built here (then ``backend`` is "none")."""

    model_config = ConfigDict(frozen=True)

    backend: str
    version: str = ""
    gpu: str = "none"
    compute_capability: str = ""
    unavailable: str | None = None


def gpu_info() -> tuple[str, str]:
    """(name, "major.minor") of GPU 0, or ("none", "") where no GPU is visible."""
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return props.name, f"{props.major}.{props.minor}"
    except ImportError:
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        out = subprocess.run([smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            name, cc = (s.strip() for s in out.stdout.splitlines()[0].split(","))
            return name, cc
    return "none", ""


def gpu_limit_name(gpu: str) -> str:
    """The Prefect global concurrency limit a benchmark holds while it times engines on this GPU type."""
    return f"gpu:{gpu}"


def fp8_supported(compute_capability: str) -> bool:
    if not compute_capability:  # ahead-of-time builders without a GPU (TensorRT-RTX) decide for themselves
        return True
    major, minor = (int(x) for x in compute_capability.split("."))
    return (major, minor) >= FP8_MIN_CC


def import_backend(backend: str):
    if backend == "tensorrt":
        import tensorrt as trt
    else:
        import tensorrt_rtx_bindings as trt
    return trt


def trtexec_version(path: str) -> str:
    """'10.3.0' from the banner ``[TensorRT v100300]`` (``v110000`` for 11.0)."""
    out = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=60)
    match = re.search(r"TensorRT v(\d+)", out.stdout + out.stderr)
    if not match:
        return "unknown"
    code = int(match.group(1))
    return f"{code // 10000}.{code // 100 % 100}.{code % 100}"


def resolve_target(cfg: BuildConfig) -> Target:
    """The backend that will build, and for which GPU; ``unavailable`` set when none can.
    The GPU is looked up only once a backend is found (it imports torch, seconds on a CPU host)."""
    if not cfg.enabled:
        return Target(backend="none", unavailable="build.enabled=false")
    wanted, found, why = cfg.backend, None, ""
    if wanted in ("auto", "tensorrt"):
        try:
            found = ("tensorrt", import_backend("tensorrt").__version__)
        except ImportError:
            why = f"build.backend=tensorrt but `import tensorrt` failed; {INSTALL_HINT}"
    if found is None and wanted in ("auto", "trtexec"):
        path = shutil.which("trtexec")
        found = ("trtexec", trtexec_version(path)) if path else None
        why = f"build.backend=trtexec but trtexec is not on PATH; {INSTALL_HINT}" if wanted == "trtexec" else why
    if wanted == "tensorrt-rtx":
        try:
            found = ("tensorrt-rtx", import_backend("tensorrt-rtx").__version__)
        except ImportError:
            why = "build.backend=tensorrt-rtx but tensorrt_rtx_bindings is not installed"
    if found is None:
        if wanted == "auto":
            why = f"no TensorRT: `import tensorrt` failed and trtexec is not on PATH; {INSTALL_HINT}"
        return Target(backend="none", unavailable=why)
    name, cc = gpu_info()
    return Target(backend=found[0], version=found[1], gpu=name, compute_capability=cc)


def onnx_input(onnx_path: Path) -> tuple[str, list[int]]:
    import onnx

    graph_input = onnx.load(str(onnx_path), load_external_data=False).graph.input[0]
    dims = [d.dim_value for d in graph_input.type.tensor_type.shape.dim]
    return graph_input.name, dims


def shapes(onnx_path: Path, cfg: BuildConfig) -> dict[str, tuple[int, ...]]:
    """min/opt/max input shapes (one shape, opt_batch, when build.static_shapes)."""
    _, dims = onnx_input(onnx_path)
    rest = tuple(dims[1:])
    if cfg.static_shapes:
        return {k: (cfg.opt_batch, *rest) for k in ("min", "opt", "max")}
    return {"min": (cfg.min_batch, *rest), "opt": (cfg.opt_batch, *rest), "max": (cfg.max_batch, *rest)}


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


def trtexec_build_command(trtexec: str, version: str, onnx_path: Path, engine_path: Path, cfg: BuildConfig,
                          timing_cache: Path, layer_info: Path) -> list[str]:
    name, _ = onnx_input(onnx_path)
    s = shapes(onnx_path, cfg)
    cmd = [trtexec, f"--onnx={onnx_path}", f"--saveEngine={engine_path}",
           f"--minShapes={name}:{_dims(s['min'])}", f"--optShapes={name}:{_dims(s['opt'])}",
           f"--maxShapes={name}:{_dims(s['max'])}", f"--timingCacheFile={timing_cache}",
           f"--builderOptimizationLevel={cfg.optimization_level}", f"--memPoolSize=workspace:{cfg.workspace_mb}M",
           "--profilingVerbosity=detailed", f"--exportLayerInfo={layer_info}", "--skipInference"]
    if not version.startswith("11."):  # 11.x is always strongly typed and dropped the flag's effect
        cmd.append("--stronglyTyped")
    return cmd


def trtexec_benchmark_command(trtexec: str, version: str, engine_path: Path, input_name: str,
                              shape: tuple[int, ...], warmup_ms: int, duration_s: int) -> list[str]:
    cmd = [trtexec, f"--loadEngine={engine_path}", f"--shapes={input_name}:{_dims(shape)}",
           f"--warmUp={warmup_ms}", f"--duration={duration_s}", "--percentile=90,95,99", "--useSpinWait"]
    if not version.startswith("11."):  # CUDA graphs and no data transfers are 11.x's defaults
        cmd += ["--useCudaGraph", "--noDataTransfers"]
    return cmd


_STAT = r"(min|max|mean|median|percentile\((\d+)%\)) = ([\d.e+-]+) ms"


def parse_trtexec_performance(text: str, batch: int) -> dict:
    """The ``=== Performance summary ===`` of a trtexec run. qps counts batches: samples/s = qps x batch."""
    out: dict = {}
    qps = re.search(r"Throughput: ([\d.e+-]+) qps", text)
    if not qps:
        raise ValueError("no trtexec performance summary in the output")
    out["throughput_qps"] = float(qps.group(1))
    out["throughput_samples_s"] = out["throughput_qps"] * batch
    for label, key in (("Latency", "latency"), ("GPU Compute Time", "gpu_compute")):
        line = re.search(rf"\] {label}: (.*)|^{label}: (.*)", text, re.MULTILINE)
        if not line:
            continue
        for stat, pct, value in re.findall(_STAT, line.group(1) or line.group(2)):
            name = f"p{pct}" if pct else stat
            out[f"{key}_{name}_ms"] = float(value)
    cv = re.search(r"coefficient of variance = ([\d.]+)%", text)
    out["cv"] = float(cv.group(1)) / 100 if cv else None
    out["unstable"] = bool(cv)
    return out


def build_with_api(backend: str, onnx_path: Path, engine_path: Path, cfg: BuildConfig, timing_cache: Path) -> dict:
    trt = import_backend(backend)
    log: list[str] = []
    logger = capturing_logger(trt, log)
    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is not None:  # deprecated and ignored in 11.x (always strongly typed), required in 10.x
        flags |= 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"{backend} could not parse {onnx_path.name}: {errors[:1]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_mb << 20)
    if hasattr(config, "builder_optimization_level"):
        config.builder_optimization_level = cfg.optimization_level
    if hasattr(trt, "ProfilingVerbosity"):
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    cache_bytes = timing_cache.read_bytes() if timing_cache.exists() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    s = shapes(onnx_path, cfg)
    profile.set_shape(network.get_input(0).name, s["min"], s["opt"], s["max"])
    config.add_optimization_profile(profile)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if serialized is None:
        raise RuntimeError(f"{backend} build of {onnx_path.name} failed: {[m for m in log if 'ERROR' in m][-3:]}")
    engine_path.write_bytes(bytes(serialized))
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"seconds": seconds, "log": log}


def capturing_logger(trt, messages: list[str], ignore: tuple[str, ...] = ()):
    """A TensorRT (or TensorRT-RTX) logger that keeps warnings and errors, less lines containing ``ignore``."""

    class Capture(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            if severity <= trt.ILogger.Severity.WARNING and not any(s in msg for s in ignore):
                messages.append(f"[{severity.name}] {msg}")

    return Capture()


def layer_info_with_api(backend: str, engine_path: Path) -> str | None:
    """The engine inspector's JSON (needs a GPU to deserialize; None where there is none)."""
    trt = import_backend(backend)
    try:
        runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
        engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    except Exception:
        return None
    if engine is None:
        return None
    inspector = engine.create_engine_inspector()
    return inspector.get_engine_information(trt.LayerInformationFormat.JSON)


def precision_census(layer_info_json: str | None) -> dict | None:
    """How many engine layers compute on FP8, FP16, FP32 tensors, read off the layer information."""
    if not layer_info_json:
        return None
    data = json.loads(layer_info_json)
    layers = data.get("Layers", data) if isinstance(data, dict) else data
    counts: dict[str, int] = {}
    for layer in layers:
        text = json.dumps(layer)
        kind = "FP8" if "FP8" in text or "Float8" in text else "FP16" if "Half" in text or "FP16" in text else \
            "FP32" if "Float" in text or "FP32" in text else "other"
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def bench_inputs(shape: tuple[int, ...], dtype, seed: int, vocab: int = CLIP_VOCAB_SIZE):
    """The inputs every variant of one encoder gets at one batch size: token ids below ``vocab`` or pixels,
    seeded by the batch so the FP16 engine, the FP8 engine and PyTorch see the same values."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    if not dtype.is_floating_point:
        return torch.randint(0, vocab, shape, dtype=dtype, device="cuda", generator=g)
    return torch.randn(shape, dtype=torch.float32, device="cuda", generator=g).to(dtype)


def onnx_vocab_size(onnx_path: Path, default: int = CLIP_VOCAB_SIZE) -> int:
    """Rows of the token-embedding table the text graph gathers ``input_ids`` from (CLIP's 49,408 if not found)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    ids = {model.graph.input[0].name}  # input_ids and its reshaped/cast copies (nodes are in topological order)
    tables = {i.name: list(i.dims) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("Reshape", "Cast", "Flatten", "Identity", "Unsqueeze", "Squeeze") and node.input[0] in ids:
            ids.update(node.output)
        elif node.op_type == "Gather" and len(node.input) > 1 and node.input[1] in ids and node.input[0] in tables:
            return int(tables[node.input[0]][0])
    return default


def timing_row(stats: dict, batch: int) -> dict:
    """A benchmark row's timing fields from ``clip_fp8.timing.time_cuda``'s result."""
    return {**{f"latency_{k}": v for k, v in stats.items() if k.endswith("_ms")}, "iterations": stats["iterations"],
            "throughput_samples_s": batch * 1000 / stats["median_ms"], "cv": stats["cv"], "unstable": stats["cv"] > UNSTABLE_CV}


def time_engine(backend: str, engine_path: Path, batch: int, warmup_ms: int, duration_s: int,
                   vocab: int = CLIP_VOCAB_SIZE) -> dict:
    """Time ``execute_async_v3`` on device-resident inputs, replayed from a CUDA graph where it captures."""
    import torch

    from clip_fp8.timing import capture_graph, time_cuda

    trt = import_backend(backend)
    runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    context = engine.create_execution_context()
    stream = torch.cuda.Stream()
    dtypes = {trt.DataType.HALF: torch.float16, trt.DataType.FLOAT: torch.float32,
              trt.DataType.INT64: torch.int64, trt.DataType.INT32: torch.int32}
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    for name in inputs:
        context.set_input_shape(name, (batch, *tuple(engine.get_tensor_shape(name))[1:]))
    buffers = {}
    for name in names:
        shape, dtype = tuple(context.get_tensor_shape(name)), dtypes[engine.get_tensor_dtype(name)]
        buffers[name] = (bench_inputs(shape, dtype, batch, vocab) if name in inputs
                         else torch.empty(shape, dtype=dtype, device="cuda"))
        context.set_tensor_address(name, buffers[name].data_ptr())

    def enqueue() -> None:
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"execute_async_v3 failed for {engine_path.name} at batch {batch}")

    graph, why_not = capture_graph(enqueue, stream)
    stats = time_cuda((lambda i: graph.replay()) if graph else (lambda i: enqueue()),
                      warmup_s=warmup_ms / 1000, duration_s=duration_s, stream=stream)
    # Activations: the context's scratch memory for these shapes; weights: the engine's own statistic.
    activations = (context.update_device_memory_size_for_shapes()
                   if hasattr(context, "update_device_memory_size_for_shapes") else engine.device_memory_size_v2)
    weights = engine.get_engine_stat(trt.EngineStat.TOTAL_WEIGHTS_SIZE) if hasattr(trt, "EngineStat") else None
    return {**timing_row(stats, batch), "cuda_graph": graph is not None, **({"cuda_graph_note": why_not} if why_not else {}),
            "activation_bytes": int(activations), "weights_bytes": None if weights is None else int(weights)}

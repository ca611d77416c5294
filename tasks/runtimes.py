"""One interface over every form of the model the pipeline produces: encode images, encode token ids.

| runtime      | what runs                                                     | where                         |
|--------------|---------------------------------------------------------------|-------------------------------|
| pytorch      | the baseline checkpoint (FP16 on a GPU, FP32 on a CPU)        | anywhere                      |
| fakequant    | the ModelOpt checkpoint, FP8 simulated in float (what quantize calibrated) | anywhere         |
| onnxruntime  | the repaired FP8 ONNX graphs (surgery's output)               | CPU; CUDA provider if installed |
| tensorrt     | the FP8 engines (build's output)                              | where TensorRT built them     |
| torch-fp8    | FP8 weights and FP8 GEMMs in PyTorch (``clip_fp8.fp8_runtime``) | GPUs of compute capability >= 8.9 |

``unavailable(name, ...)`` says why a runtime cannot run here (None when it can); ``open_runtime`` gives an
object with ``device``, ``encode_image(pixel_values)`` and ``encode_text(input_ids)`` returning float32
embeddings on ``device``: the surface CLIP_benchmark's evaluators call.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clip_fp8.artifacts import ArtifactRef
from clip_fp8.config import EvaluationConfig, ModelConfig
from clip_fp8.errors import PipelineInputError

RUNTIMES = ("pytorch", "fakequant", "onnxruntime", "tensorrt", "torch-fp8")
# The quality gate judges what will be deployed: the first of these that can run.
GATE_PREFERENCE = ("tensorrt", "torch-fp8", "onnxruntime", "fakequant")


@dataclass
class Artifacts:
    """What the runtimes are opened from (None where that stage did not produce it)."""

    model_source: ArtifactRef
    quantized: ArtifactRef | None = None
    onnx: ArtifactRef | None = None          # surgery[fp8]
    engines: ArtifactRef | None = None       # build[fp8]
    torch_fp8: ArtifactRef | None = None


def tensorrt_why_not(not_built: str | None, backend: str | None, device: str) -> str | None:
    """Why engines (built, or yet to be built, by ``backend``) cannot be evaluated on ``device``."""
    if not_built:
        return f"no TensorRT engines: {not_built}"
    if backend == "tensorrt-rtx":
        return "TensorRT-RTX engines run on RTX GPUs only"
    return None if device.startswith("cuda") else "TensorRT engines need a CUDA GPU"


def unavailable(name: str, device: str, artifacts: Artifacts | None = None) -> str | None:
    """None when ``name`` can run here (and its artifact exists, where given); else the reason, one line."""
    if name not in RUNTIMES:
        raise ValueError(f"unknown runtime {name!r} (known: {', '.join(RUNTIMES)})")
    if name == "onnxruntime":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return "onnxruntime is not installed"
    if name == "torch-fp8":
        from clip_fp8.devices import fp8_support

        if why := fp8_support(device):
            return why
    if name == "tensorrt":
        if artifacts is None or artifacts.engines is None:
            return "no TensorRT engines were built"
        meta = artifacts.engines.meta
        if why := tensorrt_why_not(meta.get("skip_reason"), meta.get("target", {}).get("backend"), device):
            return why
    if artifacts is not None:
        needed = {"fakequant": artifacts.quantized, "onnxruntime": artifacts.onnx, "torch-fp8": artifacts.torch_fp8}
        if name in needed and needed[name] is None:
            return f"no {name} artifact in this run"
    return None


def resolve_gate_runtime(cfg: EvaluationConfig, device: str, target) -> str:
    """The runtime the quality gate judges, decided before any stage starts: ``evaluation.gate_runtime``, or with
    ``auto`` the first of ``GATE_PREFERENCE`` in ``evaluation.runtimes`` that can run here (TensorRT's chance
    read off the build target, whose engines do not exist yet). A named runtime that cannot run is refused."""

    def why_not(name: str) -> str | None:
        return unavailable(name, device) if name != "tensorrt" else tensorrt_why_not(target.unavailable, target.backend, device)

    if cfg.gate_runtime != "auto":
        if why := why_not(cfg.gate_runtime):
            raise PipelineInputError(f"evaluation.gate_runtime '{cfg.gate_runtime}' cannot run here: {why}; "
                                     "use evaluation.gate_runtime=auto")
        return cfg.gate_runtime
    return next((name for name in GATE_PREFERENCE if name in cfg.runtimes and why_not(name) is None), "fakequant")


class OnnxRuntimeEncoders:
    """The repaired graphs through ONNX Runtime, run as written (graph optimizations off, as surgery checks them)."""

    def __init__(self, graphs: dict[str, Path], device: str):
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.sessions = {enc: ort.InferenceSession(str(path), options, providers=providers) for enc, path in graphs.items()}
        self.device = "cpu"  # inputs and outputs pass through host memory either way
        self.providers = providers

    def _run(self, encoder: str, x):
        import numpy as np
        import torch

        session = self.sessions[encoder]
        feed = session.get_inputs()[0]
        array = x.detach().cpu().numpy()
        if "float16" in feed.type:
            array = array.astype(np.float16)
        elif "float" in feed.type:
            array = array.astype(np.float32)
        return torch.from_numpy(session.run(None, {feed.name: array})[0].astype(np.float32))

    def encode_image(self, images):
        return self._run("image", images)

    def encode_text(self, input_ids):
        return self._run("text", input_ids)


class TensorRTEncoders:
    """The FP8 engines, one execution context each; inputs and outputs as CUDA tensors."""

    def __init__(self, engines: ArtifactRef):
        import torch

        from clip_fp8.tasks.tensorrt import import_backend

        backend = engines.meta["target"]["backend"]
        trt = import_backend("tensorrt" if backend == "trtexec" else backend)
        self.trt, self.device = trt, "cuda"
        runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
        self.engines = {}
        for name in engines.meta["engines"]:
            encoder = name.split("_", 1)[1]
            engine = runtime.deserialize_cuda_engine(engines.file(name).read_bytes())
            self.engines[encoder] = (engine, engine.create_execution_context())
        self.dtypes = {trt.DataType.HALF: torch.float16, trt.DataType.FLOAT: torch.float32,
                       trt.DataType.INT64: torch.int64, trt.DataType.INT32: torch.int32}

    def _run(self, encoder: str, x):
        import torch

        engine, context = self.engines[encoder]
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        (input_name,) = [n for n in names if engine.get_tensor_mode(n) == self.trt.TensorIOMode.INPUT]
        x = x.to("cuda", self.dtypes[engine.get_tensor_dtype(input_name)]).contiguous()
        context.set_input_shape(input_name, tuple(x.shape))
        context.set_tensor_address(input_name, x.data_ptr())
        outputs = {}
        for name in names:
            if name != input_name:
                outputs[name] = torch.empty(tuple(context.get_tensor_shape(name)),
                                            dtype=self.dtypes[engine.get_tensor_dtype(name)], device="cuda")
                context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution of the {encoder} engine failed at batch {x.shape[0]}")
        stream.synchronize()
        return next(iter(outputs.values())).float()

    def encode_image(self, images):
        return self._run("image", images)

    def encode_text(self, input_ids):
        return self._run("text", input_ids)


class TorchFP8Encoders:
    """A torch-fp8 artifact through ``clip_fp8.fp8_runtime.load`` (compiled, CUDA graphs on a GPU)."""

    def __init__(self, artifact: ArtifactRef, device: str, batch_sizes):
        import torch

        from clip_fp8.fp8_runtime import load

        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self.clip = load(artifact.local_dir(), device=device, dtype=dtype, batch_sizes=batch_sizes)
        self.device = device

    def encode_image(self, images):
        return self.clip.encode_image(images).float()

    def encode_text(self, input_ids):
        return self.clip.encode_text(input_ids).float()


def open_runtime(name: str, artifacts: Artifacts, model_cfg: ModelConfig, device: str, batch_size: int = 256):
    """The runtime's encoders; raises ``RuntimeError`` with ``unavailable``'s reason if it cannot run here."""
    if why := unavailable(name, device, artifacts):
        raise RuntimeError(f"runtime {name} cannot run here: {why}")
    from clip_fp8.encoders import TorchEncoders
    from clip_fp8.tasks.checkpoints import load_clip, load_quantized

    cfg = model_cfg.model_copy(update={"device": device})
    if name == "pytorch":
        return TorchEncoders(load_clip(artifacts.model_source.path, cfg), device)
    if name == "fakequant":
        return TorchEncoders(load_quantized(artifacts.quantized.file("checkpoint"), cfg), device)
    if name == "onnxruntime":
        folder = artifacts.onnx.local_dir()
        return OnnxRuntimeEncoders({enc: folder / artifacts.onnx.files[f"fp8_{enc}"] for enc in ("text", "image")}, device)
    if name == "tensorrt":
        return TensorRTEncoders(artifacts.engines)
    # torch-fp8: the evaluation batch and the smaller last batch are the only shapes compiled
    return TorchFP8Encoders(artifacts.torch_fp8, device, (batch_size,))

"""The runtime interface's decisions, without a pipeline run: which runtimes can run here, why the others
cannot, and which one the quality gate judges (the runs themselves: test_pipeline_e2e.py, test_gpu_fp8.py)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from clip_fp8.artifacts import ArtifactRef
from clip_fp8.config import BuildConfig, EvaluationConfig, PipelineConfig
from clip_fp8.errors import PipelineInputError
from clip_fp8.tasks.runtimes import GATE_PREFERENCE, Artifacts, resolve_gate_runtime, unavailable
from clip_fp8.tasks.tensorrt import Target, resolve_target


def ref(stage: str, **meta) -> ArtifactRef:
    return ArtifactRef(stage=stage, path="/nonexistent", digest="0" * 64, meta=meta)


def test_each_runtime_says_whether_it_can_run_here_and_why_not():
    assert unavailable("fakequant", "cpu") is None
    assert unavailable("onnxruntime", "cpu") is None
    assert unavailable("pytorch", "cpu") is None
    assert unavailable("torch-fp8", "cpu") == "FP8 GEMMs need a CUDA GPU of compute capability >= 8.9 (this is cpu)"
    with pytest.raises(ValueError, match="unknown runtime 'tflite'"):
        unavailable("tflite", "cpu")

    # With the run's artifacts: a stage that produced nothing, or skipped, is named as the reason.
    none = Artifacts(model_source=ref("model_source"))
    assert unavailable("onnxruntime", "cpu", none) == "no onnxruntime artifact in this run"
    assert unavailable("tensorrt", "cuda", none) == "no TensorRT engines were built"
    skipped = Artifacts(model_source=ref("model_source"), engines=ref("build", skip_reason="install TensorRT"))
    assert unavailable("tensorrt", "cuda", skipped) == "no TensorRT engines: install TensorRT"
    rtx = Artifacts(model_source=ref("model_source"), engines=ref("build", target={"backend": "tensorrt-rtx"}))
    assert unavailable("tensorrt", "cuda", rtx) == "TensorRT-RTX engines run on RTX GPUs only"
    built = Artifacts(model_source=ref("model_source"), engines=ref("build", target={"backend": "tensorrt"}))
    assert unavailable("tensorrt", "cpu", built) == "TensorRT engines need a CUDA GPU"
    assert unavailable("tensorrt", "cuda", built) is None


def test_the_gate_judges_the_first_deployable_runtime_that_can_run_here():
    assert GATE_PREFERENCE == ("tensorrt", "torch-fp8", "onnxruntime", "fakequant")
    here = resolve_target(BuildConfig())  # this machine: no TensorRT (TensorRT-RTX at most), no GPU
    assert resolve_gate_runtime(EvaluationConfig(), "cpu", here) == "onnxruntime"
    assert resolve_gate_runtime(EvaluationConfig(runtimes=["fakequant"]), "cpu", here) == "fakequant"
    assert resolve_gate_runtime(EvaluationConfig(gate_runtime="fakequant"), "cpu", here) == "fakequant"
    # On a Hopper host with TensorRT the engines are judged, unless the runtimes list leaves them out.
    hopper = Target(backend="tensorrt", version="10", gpu="NVIDIA H100", compute_capability="9.0")
    assert resolve_gate_runtime(EvaluationConfig(), "cuda", hopper) == "tensorrt"
    assert resolve_gate_runtime(EvaluationConfig(runtimes=["fakequant", "onnxruntime"]), "cuda", hopper) == "onnxruntime"


def test_a_gate_runtime_that_cannot_run_is_refused_before_any_stage_in_one_line():
    here = resolve_target(BuildConfig())
    with pytest.raises(PipelineInputError) as info:
        resolve_gate_runtime(EvaluationConfig(gate_runtime="torch-fp8"), "cpu", here)
    message = str(info.value)
    assert message == ("evaluation.gate_runtime 'torch-fp8' cannot run here: FP8 GEMMs need a CUDA GPU of compute "
                       "capability >= 8.9 (this is cpu); use evaluation.gate_runtime=auto")
    with pytest.raises(PipelineInputError, match="gate_runtime 'tensorrt' cannot run here: no TensorRT engines: "):
        resolve_gate_runtime(EvaluationConfig(gate_runtime="tensorrt"), "cpu", Target(backend="none", unavailable="no TensorRT"))


def test_gate_runtime_must_be_one_of_the_evaluated_runtimes():
    with pytest.raises(ValidationError, match="evaluation.gate_runtime 'onnxruntime' is not in evaluation.runtimes"):
        EvaluationConfig(runtimes=["fakequant"], gate_runtime="onnxruntime")
    with pytest.raises(ValidationError, match="runtimes"):
        PipelineConfig().with_overrides(["evaluation.runtimes=[fakequant, tflite]"])
    # Which runtimes run is not part of the evaluate stage's key: it is the flow's (and evaluate_deployed's) input.
    flow_fields = {name for name, f in EvaluationConfig.model_fields.items()
                   if (f.json_schema_extra or {}).get("flow")}
    assert {"runtimes", "gate_runtime"} <= flow_fields
    assert PipelineConfig().evaluation.runtimes == ["fakequant", "onnxruntime", "torch-fp8", "tensorrt"]


def test_a_serving_host_loads_torch_fp8_without_modelopt_onnx_or_prefect():
    """`clip_fp8.fp8_runtime` is what a serving process imports: torch, transformers and safetensors only."""
    import subprocess
    import sys

    heavy = ("prefect", "modelopt", "onnx", "onnxruntime", "open_clip", "clip_benchmark", "tensorrt_rtx_bindings")
    probe = f"import sys, clip_fp8.fp8_runtime; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout

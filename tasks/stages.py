"""Thin Prefect tasks around the stage functions: cache key, retries, atomic publication, artifacts.

Each wrapper computes nothing itself: it calls the plain function in its stage module, publishes what
that wrote (``ArtifactStore.staging`` -> rename) and returns an ``ArtifactRef``. Caching is
``ContentPolicy`` (content + settings + code + library versions); retries only for transient failures.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact

from clip_fp8.artifacts import ArtifactRef, ArtifactStore
from clip_fp8.caching import ContentPolicy, stage_key
from clip_fp8.config import (
    BenchmarkConfig, BuildConfig, CalibrationConfig, EvaluationConfig, ExportConfig, ModelConfig, QuantizationConfig,
)
from clip_fp8.errors import DETERMINISTIC_ERRORS, AuditError, QualityGateError

# Stage name -> the modules whose source is part of its cache key.
STAGE_MODULES: dict[str, tuple[str, ...]] = {
    "calibration_data": ("tasks.calibration", "clip_fp8.synthetic"),
    "baseline_model": ("tasks.model",),
    "quantize": ("tasks.quantize", "tasks.calibration", "tasks.model"),
    "audit": ("tasks.audit",),
    "evaluate": ("tasks.evaluate", "clip_fp8.synthetic", "tasks.quantize"),
    "export": ("tasks.export", "tasks.quantize"),
    "surgery": ("tasks.surgery", "tasks.validate", "tasks.preflight"),
    "build": ("tasks.engines",),
    "benchmark": ("tasks.engines", "clip_fp8.timing", "tasks.model"),
}


def retry_transient_only(task, task_run, state) -> bool:
    """Retry I/O hiccups and flaky GPUs; never bad input, failed audits or failed gates."""
    try:
        state.result()
    except DETERMINISTIC_ERRORS:
        return False
    except Exception:
        return True
    return False


def stage(name: str, retries: int = 0, timeout_seconds: float | None = None):
    modules = STAGE_MODULES[name]
    return task(
        name=name,
        cache_policy=ContentPolicy(logic_module=modules[0], extra_modules=modules[1:]),
        persist_result=True,
        retries=retries,
        retry_delay_seconds=[2, 10, 30][:retries] if retries else 0,
        retry_jitter_factor=0.5 if retries else None,
        retry_condition_fn=retry_transient_only,
        timeout_seconds=timeout_seconds,
    )


def key_of(name: str, **inputs) -> str:
    modules = STAGE_MODULES[name]
    return stage_key(name, modules[0], modules[1:], inputs)


@stage("calibration_data", retries=2)
def calibration_data(data_source: ArtifactRef, cfg: CalibrationConfig, store: ArtifactStore) -> ArtifactRef:
    from tasks.calibration import select_calibration_pairs

    key = key_of("calibration_data", data_source=data_source, cfg=cfg)
    manifest = select_calibration_pairs(data_source, cfg)
    with store.staging("calibration_data", key) as tmp:
        (tmp / "manifest.json").write_text(json.dumps(manifest))
    return store.publish("calibration_data", key, {"manifest": "manifest.json"},
                         {"pairs": len(manifest["pairs"]), "unreadable_images": manifest["skipped"]})


@stage("baseline_model", retries=2)
def baseline_model(model_source: ArtifactRef, cfg: ModelConfig, store: ArtifactStore) -> ArtifactRef:
    from tasks.model import describe_baseline

    key = key_of("baseline_model", model_source=model_source, cfg=cfg)
    info = describe_baseline(model_source, cfg)
    with store.staging("baseline_model", key) as tmp:
        (tmp / "baseline.json").write_text(json.dumps(info, indent=1))
    return store.publish("baseline_model", key, {"baseline": "baseline.json"}, info)


@stage("quantize", retries=1)
def quantize(model_source: ArtifactRef, baseline: ArtifactRef, calibration: ArtifactRef, data_source: ArtifactRef,
             model_cfg: ModelConfig, calib_cfg: CalibrationConfig, cfg: QuantizationConfig,
             store: ArtifactStore) -> ArtifactRef:
    from tasks.quantize import quantize as run_quantize

    key = key_of("quantize", model_source=model_source, baseline=baseline, calibration=calibration,
                 data_source=data_source, model_cfg=model_cfg, calib_cfg=calib_cfg, cfg=cfg)
    manifest = json.loads(calibration.file("manifest").read_text())
    with store.staging("quantize", key) as tmp:
        info = run_quantize(model_source.path, manifest, data_source.path, model_cfg, calib_cfg, cfg, tmp)
    files = {"checkpoint": "checkpoint", "quantizers": "quantizers.json", "config": "quant_config.json"}
    return store.publish("quantize", key, files, info)


@stage("audit")
def audit(quantized: ArtifactRef, cfg: QuantizationConfig, store: ArtifactStore) -> ArtifactRef:
    from tasks.audit import audit as run_audit, audit_markdown

    key = key_of("audit", quantized=quantized, cfg=cfg)
    summary = run_audit(json.loads(quantized.file("quantizers").read_text()), cfg)
    markdown = audit_markdown(summary)
    create_markdown_artifact(key="quantization-audit", markdown=markdown, description="What was really quantized")
    if not summary["passed"]:
        raise AuditError("quantization audit failed: " + "; ".join(summary["problems"][:5]))
    with store.staging("audit", key) as tmp:
        (tmp / "audit.json").write_text(json.dumps(summary, indent=1))
        (tmp / "audit.md").write_text(markdown)
    return store.publish("audit", key, {"audit": "audit.json", "markdown": "audit.md"},
                         {"towers": summary["towers"], "quantizers_enabled": summary["quantizers_enabled"],
                          "quantizers_total": summary["quantizers_total"]})


@stage("evaluate", retries=1)
def evaluate(model_source: ArtifactRef, quantized: ArtifactRef, audit_ref: ArtifactRef, eval_source: ArtifactRef,
             model_cfg: ModelConfig, cfg: EvaluationConfig, store: ArtifactStore) -> ArtifactRef:
    from tasks.evaluate import evaluate_model, metrics_markdown, quality_gate
    from tasks.model import load_clip, load_processor, pick_device
    from tasks.quantize import load_quantized

    key = key_of("evaluate", model_source=model_source, quantized=quantized, audit_ref=audit_ref,
                 eval_source=eval_source, model_cfg=model_cfg, cfg=cfg)
    processor, device = load_processor(model_source.path), pick_device(model_cfg)
    baseline_metrics = evaluate_model(load_clip(model_source.path, model_cfg), processor, cfg, device)
    fp8_metrics = evaluate_model(load_quantized(quantized.file("checkpoint"), model_cfg), processor, cfg, device)
    gate = quality_gate(baseline_metrics, fp8_metrics, cfg)
    markdown = metrics_markdown(gate)
    create_markdown_artifact(key="quality-gate", markdown=markdown, description="FP8 vs baseline, CLIP_benchmark")
    if not gate["passed"] and cfg.on_gate_failure == "fail":
        raise QualityGateError("quality gate failed: " + "; ".join(gate["failures"]))
    result = {"baseline": baseline_metrics, "fp8": fp8_metrics, "gate": gate, "promotable": gate["passed"]}
    with store.staging("evaluate", key) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(result, indent=1))
        (tmp / "metrics.md").write_text(markdown)
    return store.publish("evaluate", key, {"metrics": "metrics.json", "markdown": "metrics.md"},
                         {"promotable": gate["passed"], "failures": gate["failures"]})


@stage("export", retries=1)
def export(model_source: ArtifactRef, quantized: ArtifactRef, model_cfg: ModelConfig, cfg: ExportConfig,
           store: ArtifactStore) -> ArtifactRef:
    from tasks.export import export_all

    key = key_of("export", model_source=model_source, quantized=quantized, model_cfg=model_cfg, cfg=cfg)
    with store.staging("export", key) as tmp:
        sizes = export_all(model_source.path, str(quantized.file("checkpoint")), model_cfg, cfg, tmp)
    return store.publish("export", key, {name.removesuffix(".onnx"): name for name in sizes}, {"bytes": sizes})


@stage("surgery")
def surgery(model_source: ArtifactRef, quantized: ArtifactRef, exported: ArtifactRef, calibration: ArtifactRef,
            data_source: ArtifactRef, model_cfg: ModelConfig, cfg: ExportConfig, build_cfg: BuildConfig,
            store: ArtifactStore) -> ArtifactRef:
    from tasks.validate import repair_and_validate

    key = key_of("surgery", model_source=model_source, quantized=quantized, exported=exported,
                 calibration=calibration, data_source=data_source, model_cfg=model_cfg, cfg=cfg, build_cfg=build_cfg)
    manifest = json.loads(calibration.file("manifest").read_text())
    with store.staging("surgery", key) as tmp:
        results = repair_and_validate(exported.local_dir(), model_source.path, str(quantized.file("checkpoint")),
                                      manifest, data_source.path, model_cfg, cfg, build_cfg, tmp)
    files = {name: f"{name}.onnx" for name in results} | {"validation": "validation.json"}
    return store.publish("surgery", key, files, {"validation": results})


@stage("build", retries=2, timeout_seconds=3600)
def build(repaired: ArtifactRef, cfg: BuildConfig, target: str, store: ArtifactStore) -> ArtifactRef:
    """``target`` (backend, version, GPU name, compute capability) is in the key: no engine crosses GPU types."""
    from tasks.engines import build_engines, resolve_target

    if not cfg.enabled:
        return ArtifactRef(stage="build", path="", digest="disabled", meta={"skip_reason": "build.enabled=false"})
    resolved, why_not = resolve_target(cfg)
    if resolved is None:
        return ArtifactRef(stage="build", path="", digest="skipped", meta={"skip_reason": why_not})
    key = key_of("build", repaired=repaired, cfg=cfg, target=target)
    onnx_files = {name: repaired.file(name) for name in repaired.files if name.startswith(("fp16_", "fp8_"))}
    with store.staging("build", key) as tmp:
        result = build_engines(onnx_files, cfg, resolved, tmp)
        for entry in result["engines"].values():  # paths as published, not as staged
            for field in ("engine",):
                if field in entry:
                    entry[field] = Path(entry[field]).name
        (tmp / "engines.json").write_text(json.dumps(result, indent=1))
    return store.publish("build", key, {"engines": "engines.json"}, result)


@stage("benchmark", retries=2, timeout_seconds=3600)
def benchmark(engines: ArtifactRef, model_source: ArtifactRef, model_cfg: ModelConfig, cfg: BenchmarkConfig, target: str,
              store: ArtifactStore) -> ArtifactRef:
    if "skip_reason" in engines.meta:
        return ArtifactRef(stage="benchmark", path="", digest="skipped",
                           meta={"skip_reason": f"no engines to time ({engines.meta['skip_reason']})"})
    if not cfg.enabled:
        return ArtifactRef(stage="benchmark", path="", digest="disabled", meta={"skip_reason": "benchmark.enabled=false"})
    from prefect.concurrency.sync import concurrency

    from tasks.engines import benchmark_engines, benchmark_pytorch, gpu_limit_name

    key = key_of("benchmark", engines=engines, model_source=model_source, model_cfg=model_cfg, cfg=cfg, target=target)
    gpu = engines.meta["target"]["gpu"]
    # One benchmark per GPU type at a time (the limit `clip-fp8 deploy` creates); without it, no lock.
    with store.staging("benchmark", key) as tmp, concurrency(gpu_limit_name(gpu), occupy=1, strict=False):
        result = benchmark_engines(engines.local_dir(), engines.meta, cfg, tmp)
        if result["rows"] and cfg.pytorch_baselines:  # engines were timed, so this host has the GPU
            onnx_files = {name: Path(e["onnx"]) for name, e in engines.meta["engines"].items()}
            result["rows"] += benchmark_pytorch(model_source.path, model_cfg, onnx_files, cfg)
        (tmp / "benchmark.json").write_text(json.dumps(result, indent=1))
    if not result["rows"]:
        result["skip_reason"] = "; ".join(sorted(set(result["skipped"].values()))) or "nothing to time"
    return store.publish("benchmark", key, {"benchmark": "benchmark.json"}, result)

"""The clip-fp8 DAG: calibration -> baseline -> quantize -> audit -> evaluate -> export -> surgery -> build -> benchmark -> report.

The flow's one parameter is ``PipelineConfig``, so the Prefect UI renders its sections, defaults and
descriptions as the run form. Each stage is a cached Prefect task (``tasks.stages``); the flow only
wires refs between them, times them, and always writes the report, also when a stage fails.
"""

from __future__ import annotations

import base64
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from clip_fp8.artifacts import ArtifactRef, ArtifactStore, write_json_atomic, write_text_atomic
from clip_fp8.config import PipelineConfig
from clip_fp8.locking import LeasedFileLockManager
from tasks import stages
from tasks.calibration import resolve_data_source
from tasks.engines import resolve_target
from tasks.evaluate import resolve_eval_source
from tasks.model import resolve_model_source
from tasks.report import plot_benchmark, render_markdown

STAGES = ("calibration_data", "baseline_model", "quantize", "audit", "evaluate", "export", "surgery", "build", "benchmark")


class StageRunner:
    """Runs stage tasks against one store, recording status, seconds and cache hits for the report."""

    def __init__(self, store: ArtifactStore):
        # Cache records live beside the artifacts: a local path, or a RemoteFileSystem block for a URL store.
        self.storage = store.result_storage()
        # SERIALIZABLE + a leased lock per cache key: of two runs that need the same artifact at once,
        # one computes it and the other waits, then reads it from the cache; a killed holder's lock expires.
        self.lock_manager = LeasedFileLockManager(store.root.resolve() / "locks")
        self.records: dict[str, dict[str, Any]] = {name: {"status": "not run", "seconds": 0.0} for name in STAGES}

    def run(self, name: str, prepare=None, **inputs) -> ArtifactRef:
        t0 = time.perf_counter()
        try:
            if prepare is not None:  # resolving a locator belongs to the stage that consumes it
                inputs.update(prepare())
            task = getattr(stages, name)
            task = task.with_options(result_storage=self.storage, cache_policy=task.cache_policy.configure(
                lock_manager=self.lock_manager, isolation_level="SERIALIZABLE"))
            state = task(**inputs, return_state=True)
            result = state.result()  # raises the stage's exception if it failed
        except BaseException as exc:
            self.records[name] = {"status": "failed", "seconds": time.perf_counter() - t0, "note": _one_line(exc)}
            raise
        status = "cached" if state.name == "Cached" else "completed"
        if "skip_reason" in result.meta:
            status = "skipped"
        self.records[name] = {"status": status, "seconds": time.perf_counter() - t0,
                              "note": result.meta.get("skip_reason", "")}
        return result


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _run_name(config: PipelineConfig) -> str:
    if config.output.run_name:
        return config.output.run_name
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{flow_run.get_name() or 'local'}"


@flow(name="clip-fp8", log_prints=True, validate_parameters=True)
def clip_fp8_pipeline(config: PipelineConfig = PipelineConfig()) -> dict:
    """Quantize a CLIP checkpoint to FP8, check it, export and repair its encoders, build and time engines."""
    store = ArtifactStore(config.output.root)
    run_dir = store.root / "runs" / _run_name(config)
    runner = StageRunner(store)
    summary: dict[str, Any] = {"run": run_dir.name, "flow_run_id": str(flow_run.get_id() or ""),
                               "config": config.model_dump(mode="json"), "status": "running", "promotable": False,
                               "stages": runner.records, "metrics": {}, "artifacts": {}}
    try:
        data_source: dict[str, ArtifactRef] = {}
        model_source: dict[str, ArtifactRef] = {}

        def _data():
            data_source["ref"] = resolve_data_source(config.calibration)
            return {"data_source": data_source["ref"]}

        def _model():
            model_source["ref"] = resolve_model_source(config.model)
            return {"model_source": model_source["ref"]}

        calibration = runner.run("calibration_data", _data, cfg=config.calibration, store=store)
        baseline = runner.run("baseline_model", _model, cfg=config.model, store=store)
        summary["model"] = baseline.meta
        quantized = runner.run("quantize", model_source=model_source["ref"], baseline=baseline, calibration=calibration,
                               data_source=data_source["ref"], model_cfg=config.model, calib_cfg=config.calibration,
                               cfg=config.quantization, store=store)
        summary["artifacts"]["checkpoint"] = quantized.location("checkpoint")
        audited = runner.run("audit", quantized=quantized, cfg=config.quantization, store=store)
        summary["audit_markdown"] = audited.file("markdown").read_text()
        summary["audit"] = audited.meta
        summary["artifacts"]["audit"] = audited.location("audit")
        evaluated = runner.run("evaluate", lambda: {"eval_source": resolve_eval_source(config.evaluation)},
                               model_source=model_source["ref"], quantized=quantized, audit_ref=audited,
                               model_cfg=config.model, cfg=config.evaluation, store=store)
        metrics = json.loads(evaluated.file("metrics").read_text())
        summary["metrics"] = {"baseline": metrics["baseline"], "fp8": metrics["fp8"]}
        summary["quality_gate"] = metrics["gate"]
        summary["metrics_markdown"] = evaluated.file("markdown").read_text()
        summary["artifacts"]["metrics"] = evaluated.location("metrics")
        exported = runner.run("export", model_source=model_source["ref"], quantized=quantized, model_cfg=config.model,
                              cfg=config.export, store=store)
        summary["artifacts"]["raw_onnx"] = exported.uri or exported.path
        repaired = runner.run("surgery", model_source=model_source["ref"], quantized=quantized, exported=exported,
                              calibration=calibration, data_source=data_source["ref"], model_cfg=config.model,
                              cfg=config.export, build_cfg=config.build, store=store)
        summary["onnx"] = repaired.meta["validation"]
        summary["artifacts"].update({f"onnx_{k}": repaired.location(k) for k in repaired.files if k != "validation"})
        resolved, _ = resolve_target(config.build)
        target = resolved.key() if resolved else "none"
        engines = runner.run("build", repaired=repaired, cfg=config.build, target=target, store=store)
        if "engines" in engines.meta:
            summary["engines"] = engines.meta
        timed = runner.run("benchmark", engines=engines, model_source=model_source["ref"], model_cfg=config.model,
                           cfg=config.benchmark, target=target, store=store)
        if timed.meta.get("rows"):
            summary["benchmark"] = timed.meta
            run_dir.mkdir(parents=True, exist_ok=True)
            png = plot_benchmark(timed.meta["rows"], run_dir / "benchmark.png")
            summary["benchmark_png"] = base64.b64encode(png).decode()
            summary["artifacts"]["benchmark_plot"] = str(run_dir / "benchmark.png")
        summary["status"] = "completed"
        summary["promotable"] = bool(metrics["promotable"])
    except BaseException as exc:
        summary["status"] = "failed"
        summary["error"] = _one_line(exc)
        raise
    finally:
        summary["all_cached"] = all(r["status"] in ("cached", "skipped") for r in runner.records.values()) \
            and summary["status"] == "completed"
        markdown = render_markdown(summary)
        summary["artifacts"]["report"] = str(run_dir / "report.md")
        summary["artifacts"]["summary"] = str(run_dir / "summary.json")
        write_text_atomic(run_dir / "report.md", markdown)
        write_json_atomic(run_dir / "summary.json", {k: v for k, v in summary.items() if not k.endswith(("_markdown", "_png"))})
        if store.remote:
            print(f"report uploaded: {store.upload_run(run_dir)}/report.md")
        create_markdown_artifact(key="clip-fp8-report", markdown=markdown, description=f"clip-fp8 run {run_dir.name}")
        print(f"report: {run_dir / 'report.md'}")
    return {k: v for k, v in summary.items() if not k.endswith(("_markdown", "_png"))}

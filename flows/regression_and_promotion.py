"""After every run, failed ones too: its history record, the regression check, promotion and events.

The regression check compares the run with the last promoted run of the same model (``model.source`` and
revision): a gated metric that dropped by more than the gate's own limit for it (``evaluation.max_drop``),
or a batch latency that grew by more than ``promotion.max_latency_increase`` on the same GPU type, marks
the run regressed and blocks its promotion. A completed, promotable, non-regressed run that changed
something is promoted when ``promotion.repository`` is set; an unchanged night (every stage cached)
promotes nothing. Prefect events ``clip-fp8.run.regressed`` and ``clip-fp8.run.promoted`` carry the
numbers, for automations (``deployments/automations/``).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from clip_fp8 import history
from clip_fp8.artifacts import sha256_json
from clip_fp8.caching import library_versions
from clip_fp8.config import PipelineConfig
from clip_fp8.triton_repository import PromotionError, promote
from clip_fp8.tasks.gate import over_limit

# The libraries whose versions a record keeps: what the artifacts were made and checked with.
RECORDED_LIBRARIES = {"torch", "transformers", "modelopt", "onnx", "onnxruntime", "prefect", "tensorrt",
                      "tensorrt_rtx_bindings", "open_clip", "clip_benchmark"}
EVENT_REGRESSED = "clip-fp8.run.regressed"
EVENT_PROMOTED = "clip-fp8.run.promoted"


def config_digest(config: PipelineConfig) -> str:
    """What the run was asked to do, less where it writes."""
    return sha256_json({k: v for k, v in config.model_dump(mode="json").items() if k != "output"})


def build_record(summary: dict[str, Any], config: PipelineConfig, calibration_digest: str | None) -> dict[str, Any]:
    model = summary.get("model") or {}
    gate = summary.get("quality_gate") or {}
    bench = summary.get("benchmark") or {}
    return {
        "kind": "run", "run": summary["run"], "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "flow_run_id": summary.get("flow_run_id", ""),
        "model_key": history.model_key(config.model.source, config.model.revision),
        "model": {"source": config.model.source, "revision": config.model.revision,
                  "resolved_revision": model.get("resolved_revision"), "digest": model.get("digest")},
        "calibration_digest": calibration_digest, "config_digest": config_digest(config),
        "libraries": library_versions(RECORDED_LIBRARIES),
        "metrics": summary.get("metrics", {}),  # baseline, and fp8 = what the gate judged
        "gate_runtime": summary.get("gate_runtime"),
        "runtime_metrics": summary.get("runtime_metrics", {}),  # every FP8 runtime evaluated: fakequant, onnxruntime, ...
        "quality_gate": {"passed": gate.get("passed"), "rows": gate.get("rows", [])} if gate else {},
        "onnx_bytes": {name: v.get("bytes") for name, v in (summary.get("onnx") or {}).items()},
        "engine_bytes": {name: e.get("engine_bytes") for name, e in ((summary.get("engines") or {}).get("engines") or {}).items()},
        "gpu": ((summary.get("engines") or {}).get("target") or {}).get("gpu"),
        "benchmark": {"rows": _latency_rows(bench)},
        # The build matrix: each GPU type's engines timed on its own pool (flows/engines.py).
        "targets": {gpu: {"status": t["status"], "benchmark": {"rows": _latency_rows((t.get("benchmark") or {}).get("meta"))}}
                    for gpu, t in (summary.get("targets") or {}).items()},
        # The speed gate's timings as served, per GPU type: tower/batch -> speedup over FP16 compiled.
        "serving": _serving_speedups(summary.get("speed_gate")),
        "status": summary["status"], "error": summary.get("error"), "promotable": bool(summary.get("promotable")),
        "unchanged": bool(summary.get("all_cached")),
        "regression": {"against": None, "reasons": []}, "promotion": None,
    }


def _serving_speedups(speed: dict | None) -> dict[str, dict[str, float]]:
    if not speed or speed.get("status") == "skipped":
        return {}
    return {speed["gpu"]: {f"{r['tower']}/{r['batch']}": r["speedup"] for r in speed["rows"]}}


def _latency_rows(bench: dict | None) -> list[dict]:
    return [{"engine": row.get("engine"), "batch": row.get("batch"), "median_ms": row.get("latency_median_ms"),
             "p99_ms": row.get("latency_p99_ms")} for row in (bench or {}).get("rows", [])]


def latency_by_gpu(record: dict[str, Any]) -> dict[str, list[dict]]:
    """GPU type -> the record's timed rows: engines built where the run ran, and each build target's."""
    timed = {gpu: t["benchmark"]["rows"] for gpu, t in (record.get("targets") or {}).items()}
    if record.get("gpu"):
        timed[record["gpu"]] = record.get("benchmark", {}).get("rows", [])
    return timed


def regression_reasons(record: dict[str, Any], promoted: dict[str, Any], config: PipelineConfig) -> list[str]:
    """Why ``record`` is worse than the promoted one: metrics beyond the gate's limits, latency beyond the budget."""
    reasons = []
    now, then = record["metrics"].get("fp8", {}), promoted.get("metrics", {}).get("fp8", {})
    # Like with like: the promoted run's metrics of the runtime this run's gate judged, where it has them.
    then = promoted.get("runtime_metrics", {}).get(record.get("gate_runtime") or "", then)
    for metric in sorted(now.keys() & then.keys()):
        if why := over_limit(metric, then[metric], now[metric], config.evaluation.max_drop):
            reasons.append(why)
    budget, then_timed = config.promotion.max_latency_increase, latency_by_gpu(promoted)
    for gpu, speedups in (record.get("serving") or {}).items():  # like with like: the same GPU type only
        before = (promoted.get("serving") or {}).get(gpu, {})
        for case, now_x in sorted(speedups.items()):
            if (then_x := before.get(case)) and now_x < then_x / (1 + budget):
                reasons.append(f"{case.replace('/', ' batch ')} on {gpu}: speedup as served {then_x:.2f}x -> {now_x:.2f}x "
                               f"(> max_latency_increase {budget:.0%} slower)")
    now_timed = latency_by_gpu(record)
    for gpu, rows in now_timed.items():  # like with like: the same GPU type only
        before = {(r["engine"], r["batch"]): r["median_ms"] for r in then_timed.get(gpu, [])}
        on = f" on {gpu}" if len(now_timed) > 1 else ""
        for row in rows:
            old = before.get((row["engine"], row["batch"]))
            if old and row["median_ms"] and row["median_ms"] > old * (1 + budget):
                reasons.append(f"{row['engine']} batch {row['batch']}{on} {old:.3f} -> {row['median_ms']:.3f} ms "
                               f"(+{row['median_ms'] / old - 1:.1%} > max_latency_increase {budget:.0%})")
    return reasons


def _emit(event: str, record: dict[str, Any], payload: dict[str, Any]) -> None:
    from prefect.events import emit_event

    emit_event(event=event, resource={"prefect.resource.id": f"clip-fp8.model.{record['model_key']}",
                                      "prefect.resource.name": record["model_key"]},
               payload={"run": record["run"], "flow_run_id": record["flow_run_id"], **payload})


def record_run(summary: dict[str, Any], config: PipelineConfig, calibration_digest: str | None) -> dict[str, Any]:
    """Check, promote, emit and append this run's record; return it (with the model's recent history)."""
    record = build_record(summary, config, calibration_digest)
    past = history.read(config.output.root, model=record["model_key"])
    promoted = history.last_promoted(past, record["model_key"])
    if promoted is not None and record["metrics"].get("fp8"):
        reasons = regression_reasons(record, promoted, config)
        record["regression"] = {"against": promoted["run"], "reasons": reasons}
        if reasons:
            _emit(EVENT_REGRESSED, record, {"against": promoted["run"], "reasons": reasons,
                                            "metrics": record["metrics"].get("fp8", {}),
                                            "promoted_metrics": promoted.get("metrics", {}).get("fp8", {})})
    record["promotion"] = _maybe_promote(summary, record, config)
    history.append(config.output.root, record)
    return {"record": record, "recent": history.read(config.output.root, model=record["model_key"],
                                                     last=config.promotion.trend_runs)}


def promotion_blockers(record: dict[str, Any], config: PipelineConfig, by_hand: bool = False) -> list[str]:
    """Every reason not to promote ``record`` (a nightly also skips an unchanged run; by hand, you chose it)."""
    regression = record["regression"]
    return [why for failed, why in (
        (not config.promotion.repository, "promotion.repository is not set"),
        (record["status"] != "completed", f"the run {record['status']}"),
        (not record["promotable"], "its quality gate failed"),
        (bool(regression["reasons"]), f"it regressed against {regression['against']}: " + "; ".join(regression["reasons"])),
        (record["unchanged"] and not by_hand, "nothing changed since the last run"),
    ) if failed]


def _maybe_promote(summary: dict[str, Any], record: dict[str, Any], config: PipelineConfig) -> dict[str, Any] | None:
    if blockers := promotion_blockers(record, config):
        return {"version": None, "skipped": "; ".join(blockers)}
    return publish(summary, record, config, forced=False)


def publish(summary: dict[str, Any], record: dict[str, Any], config: PipelineConfig, forced: bool) -> dict[str, Any]:
    cfg = config.promotion
    provenance = {k: record[k] for k in ("run", "flow_run_id", "model", "calibration_digest", "config_digest",
                                         "libraries", "metrics", "quality_gate", "time") if k in record}
    provenance["forced"] = forced
    try:
        done = promote(summary, provenance, cfg.repository, keep_versions=cfg.keep_versions, include_fp16=cfg.include_fp16,
                       batch_sizes=config.serving.batch_sizes, max_batch=config.build.max_batch,
                       small_batch=config.serving.small_batch, smoke=cfg.smoke_check)
    except PromotionError as exc:
        return {"version": None, "skipped": str(exc)}
    done["forced"] = forced
    _emit(EVENT_PROMOTED, record, {"version": done["version"], "repository": done["repository"], "forced": forced,
                                   "metrics": record["metrics"].get("fp8", {})})
    return done

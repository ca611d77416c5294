"""The clip-fp8 DAG, run by Prefect as a DAG: independent branches at the same time.

    evaluate_baseline ────────────────────────┐
    calibration_data ──► quantize ──► audit ──┴─┬──► evaluate ─────────────────────────────────────┐
    export[fp8] ────────────────────────────────┼──► set_scales ──► surgery[fp8] ──► build[fp8] ──┴──► evaluate_deployed
                                                └──► torch_fp8 ────────────────────────────────────────┘        │
    baseline_model                                                                                             ▼
    export[fp16] ──► surgery[fp16] ──► build[fp16] ─────────────────────────────────────────────────────► benchmark

``evaluate`` measures the fake-quant model against ``evaluate_baseline`` (the model alone: it starts with the
run and a re-quantization reuses it); ``evaluate_deployed`` measures what ships (ONNX Runtime on the repaired
graphs, torch-fp8, TensorRT engines: each where it can run) and applies the quality gate to the runtime that
will be deployed (``evaluation.gate_runtime``, resolved before any stage starts).

With ``quantization.recovery`` on, export[fp8] waits for the gate: when it fails, ``sensitivity`` ranks
the units and (``auto``) quantize → audit → evaluate run again with the most sensitive units in FP16,
one more per attempt (labelled ``quantize~1``, ``quantize~2``, ...), then ``recovery`` tabulates and
decides; export[fp8] takes the last attempt's exclusions and set_scales its checkpoint.

Both exports depend on the model (and FP8 on the quantization settings), not on calibration: they start at
once, and new calibration data re-runs only quantize and what reads its checkpoint (set_scales writes the new
scales into the FP8 graphs: seconds, where exporting a ViT-L/14 image tower takes a minute). On a GPU host two
things start with the run that are not stages: ModelOpt's FP8 CUDA kernels build (``build-fp8-kernels``, once
per host) beside calibration instead of inside the first FP8 forward, and this process's torch CPU threads are
bounded so that the stages running here side by side leave cores to the export workers (``bound_flow_threads``). Locators (model, data, evaluation sets,
build target) are resolved before any stage starts, so a path that does not exist stops the run at once.
A stage that fails stops only what depends on it; the other branches finish, the report shows every
stage, and then the run fails with the first failure. The flow's one parameter is ``PipelineConfig``,
so the Prefect UI renders its sections, defaults and descriptions as the run form.
"""

from __future__ import annotations

import base64
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import allow_failure, flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import PrefectFuture, wait
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from clip_fp8 import history
from clip_fp8.artifacts import ArtifactRef, ArtifactStore, atomic_write, write_json_atomic
from clip_fp8.config import PipelineConfig
from clip_fp8.flows.engines import benchmark_task, build_task, check_targets, engines_on_target
from clip_fp8.flows.report import plot_benchmark, plot_trend, render_markdown
from clip_fp8.flows.run_history import record_run
from clip_fp8.flows.stage_task import EXECUTIONS, REUSED, stage_results, stage_task
from clip_fp8.flows.subruns import failure_of, one_line
from clip_fp8.imports import preload
from clip_fp8.stage import reports_of
from clip_fp8.tasks.audit import audit
from clip_fp8.tasks.baseline_model import baseline_model
from clip_fp8.tasks.calibration_data import calibration_data
from clip_fp8.tasks.calibration_sources import resolve_data_source
from clip_fp8.tasks.checkpoints import pick_device, resolve_model_source
from clip_fp8.tasks.eval_datasets import resolve_eval_source
from clip_fp8.tasks.evaluate import evaluate
from clip_fp8.tasks.evaluate_baseline import evaluate_baseline
from clip_fp8.tasks.evaluate_deployed import evaluate_deployed
from clip_fp8.tasks.export import export
from clip_fp8.tasks.quantize import build_fp8_kernels, quantize
from clip_fp8.tasks.recovery import exclusion_reasons, plan, recovery
from clip_fp8.tasks.runtimes import resolve_gate_runtime
from clip_fp8.tasks.set_scales import set_scales
from clip_fp8.tasks.sensitivity import sensitivity
from clip_fp8.tasks.surgery import surgery
from clip_fp8.tasks.tensorrt import Target, resolve_target
from clip_fp8.tasks.torch_fp8 import torch_fp8

# Every run's outcome as a one-row table artifact: what a parent run (flows/models_night.py) reads back.
OUTCOME_ARTIFACT = "clip-fp8-outcome"

calibration_data_task = stage_task(calibration_data, retries=2)
baseline_model_task = stage_task(baseline_model, retries=2)
quantize_task = stage_task(quantize, retries=1)
audit_task = stage_task(audit)
sensitivity_task = stage_task(sensitivity, retries=1)
recovery_task = stage_task(recovery)
evaluate_baseline_task = stage_task(evaluate_baseline, retries=1)
evaluate_task = stage_task(evaluate, retries=1)
torch_fp8_task = stage_task(torch_fp8, retries=1)
evaluate_deployed_task = stage_task(evaluate_deployed, retries=1)
export_task = stage_task(export, retries=1)
set_scales_task = stage_task(set_scales, retries=1)
surgery_task = stage_task(surgery)


def bound_flow_threads(device: str) -> int | None:
    """On a GPU host, this process's torch CPU threads to a quarter of the cores; returns the new count.

    Stages run here in threads side by side (calibration beside the baseline, quantize's preprocessing beside
    the FP16 export workers and ModelOpt's kernel build, evaluate and torch_fp8 beside the FP8 export), and each
    thread that calls a torch CPU op gets a team of one OpenMP thread per core. At ViT-L/14 on a 16-core H200
    host this process kept 15 of 16 cores busy through quantize, which took 75.6 s (22.9 s alone, at 3.6 cores),
    while the kernel build and the export workers beside it starved: the teams spin-wait for threads the other
    processes hold. With this bound quantize took 27.6 s beside them (docs/benchmarks.md). On a GPU the
    stages' math is on the device and their CPU work is image preprocessing; a CPU run does its math here
    and keeps every core."""
    if not device.startswith("cuda"):
        return None
    import torch

    threads = max(2, (os.cpu_count() or 1) // 4)
    torch.set_num_threads(min(threads, torch.get_num_threads()))
    return torch.get_num_threads()


@task(name="build-fp8-kernels")
def fp8_kernels_task() -> bool:
    """Not a stage (no artifact, no cache key): a host-level build cache warmed while calibration runs."""
    preload(build_fp8_kernels.__module__)  # ModelOpt imports transformers' lazy modules: one thread at a time
    return build_fp8_kernels()


@flow(name="clip-fp8", log_prints=True, validate_parameters=True, task_runner=ThreadPoolTaskRunner(max_workers=8))
def clip_fp8_pipeline(config: PipelineConfig = PipelineConfig()) -> dict:
    """Quantize a CLIP checkpoint to FP8, check it, export and repair its encoders, build and time engines."""
    store = ArtifactStore(config.output.root)
    run = RunRecord(store, config)
    try:
        model_source = resolve_model_source(config.model)
        data_source = resolve_data_source(config.calibration)
        eval_source = resolve_eval_source(config.evaluation)
        check_targets(config.build)
        target = resolve_target(config.build) if not config.build.targets else Target(
            backend="none", unavailable="engines are built on the build targets' workers (build.targets)")
        m, x = config.model, config.export
        device = pick_device(m)
        gate_runtime = resolve_gate_runtime(config.evaluation, device, target)
        run.summary["gate_runtime"] = gate_runtime
        with stage_results(store):
            bound_flow_threads(device)
            # On a GPU, ModelOpt's FP8 kernels build beside calibration, not in the first FP8 forward (see there).
            kernels = fp8_kernels_task.submit() if device.startswith("cuda") else None
            s: dict[str, PrefectFuture] = {}
            s["calibration_data"] = calibration_data_task.submit(data_source, config.calibration, store=store)
            s["baseline_model"] = baseline_model_task.submit(model_source, m, store=store)
            s["evaluate_baseline"] = evaluate_baseline_task.submit(model_source, eval_source, m, config.evaluation,
                                                                   store=store)
            s["export_fp16"] = export_task.submit("fp16", model_source, m, None, x, store=store)
            if config.quantization.recovery == "off":
                s["export_fp8"] = export_task.submit("fp8", model_source, m, config.quantization, x, store=store)
            s["surgery_fp16"] = surgery_task.submit("fp16", s["export_fp16"], model_source, None, None, None, m, x,
                                                    config.build, store=store)
            if not config.build.targets:
                s["build_fp16"] = build_task.submit(s["surgery_fp16"], config.build, target, store=store)
            s["quantize"] = quantize_task.submit(model_source, s["calibration_data"], data_source, m, config.calibration,
                                                 config.quantization, store=store)
            s["audit"] = audit_task.submit(s["quantize"], config.quantization, store=store)
            s["evaluate"] = evaluate_task.submit(model_source, s["quantize"], s["evaluate_baseline"], eval_source, m,
                                                 gate_config(config, gate_runtime), store=store, wait_for=[s["audit"]])
            if config.quantization.recovery != "off":
                recovered = recover(s, config, model_source, data_source, eval_source, store, gate_runtime)
                s["export_fp8"] = export_task.submit("fp8", model_source, m, config.quantization, x, recovered,
                                                     store=store)
            s["set_scales"] = set_scales_task.submit(s["export_fp8"], last(s, "quantize"), model_source, m, x,
                                                     store=store, wait_for=[last(s, "audit")])
            s["surgery_fp8"] = surgery_task.submit("fp8", s["set_scales"], model_source, last(s, "quantize"),
                                                   s["calibration_data"], data_source, m, x, config.build, store=store)
            if not config.build.targets:
                s["build_fp8"] = build_task.submit(s["surgery_fp8"], config.build, target, store=store)
            s["torch_fp8"] = torch_fp8_task.submit(last(s, "quantize"), m, store=store, wait_for=[last(s, "audit")])
            targets: dict[str, PrefectFuture] = {}
            for t in config.build.targets:  # one engines run per GPU type, each on its own pool (flows/engines.py)
                targets[t.gpu] = engines_on_target.submit(t, [s["surgery_fp16"], s["surgery_fp8"]], model_source,
                                                          s["torch_fp8"], config)
            e = config.evaluation
            s["evaluate_deployed"] = evaluate_deployed_task.submit(
                last(s, "evaluate"), model_source, s["surgery_fp8"], s.get("build_fp8"), s["torch_fp8"], eval_source, m,
                e, list(e.runtimes), gate_runtime, store=store)
            if not config.build.targets:
                # Timed alone: nothing else of this run may share the GPU while it measures.
                s["benchmark"] = benchmark_task.submit([s["build_fp16"], s["build_fp8"]], model_source, s["torch_fp8"],
                                                       m, config.benchmark, target, store=store,
                                                       wait_for=[allow_failure(f) for f in s.values()])
            run.settle(s)
            run.settle_targets(targets)
            if kernels is not None:
                kernels.wait()  # the stages that needed the kernels report their own failure
    except BaseException as exc:
        run.fail(exc)
        raise
    finally:
        run.write()
    run.raise_first_failure()
    return run.public_summary()


def gate_config(config: PipelineConfig, gate_runtime: str):
    """The fake-quant evaluation fails the run only when the gate judges fake-quant and recovery is off; else its
    verdict goes to the flow (``mark``): recovery acts on it, and ``evaluate_deployed`` gates what ships."""
    if config.quantization.recovery == "off" and gate_runtime == "fakequant":
        return config.evaluation
    return config.evaluation.model_copy(update={"on_gate_failure": "mark"})


def last_attempt(labels, stage: str) -> str | None:
    """The label of the last attempt of a stage that recovery may repeat (``stage``, ``stage~1``, ``stage~2``, ...)."""
    attempts = [label for label in labels if label == stage or label.startswith(f"{stage}~")]
    return max(attempts, key=lambda label: int(label.partition("~")[2] or 0)) if attempts else None


def last(stages: dict, stage: str):
    return stages[last_attempt(stages, stage)]


def _settled(future: PrefectFuture) -> ArtifactRef | None:
    future.wait()
    return future.state.result() if future.state.is_completed() else None


def recover(s: dict[str, PrefectFuture], config: PipelineConfig, model_source: ArtifactRef, data_source: ArtifactRef,
            eval_source: ArtifactRef, store: ArtifactStore, gate_runtime: str) -> list[str]:
    """``quantization.recovery`` after a failed gate: rank the units (``sensitivity``); with ``auto``, quantize →
    audit → evaluate again with one more of the most sensitive units in FP16 per attempt, until the gate passes
    or the FP16 budget is spent; then ``recovery`` decides. A stage that fails stops the attempts. Returns the
    exclusions the last attempt added (what the FP8 export must leave out too)."""
    first = _settled(s["evaluate"])
    if first is None or first.meta["promotable"]:
        return []  # passed (or failed for another reason): nothing to recover, no sensitivity computed
    q, m = config.quantization, config.model
    s["sensitivity"] = sensitivity_task.submit(model_source, s["quantize"], s["calibration_data"], data_source, m, q,
                                               q.sensitivity_samples, q.sensitivity_batch_size, store=store)
    if (ranked := _settled(s["sensitivity"])) is None:
        return []
    evaluations, recovered = [s["evaluate"]], []
    if q.recovery == "auto":
        for unit in plan(json.loads(ranked.file("sensitivity").read_text()), q.max_fp16_fraction):
            recovered.append(unit)
            k = len(recovered)
            s[f"quantize~{k}"] = quantize_task.submit(model_source, s["calibration_data"], data_source, m,
                                                      config.calibration, q, recovered=exclusion_reasons(recovered),
                                                      store=store)
            s[f"audit~{k}"] = audit_task.submit(s[f"quantize~{k}"], q, store=store)
            s[f"evaluate~{k}"] = evaluate_task.submit(model_source, s[f"quantize~{k}"], s["evaluate_baseline"],
                                                      eval_source, m, gate_config(config, gate_runtime), store=store,
                                                      wait_for=[s[f"audit~{k}"]])
            evaluations.append(s[f"evaluate~{k}"])
            if (attempt := _settled(s[f"evaluate~{k}"])) is None or attempt.meta["promotable"]:
                break
    s["recovery"] = recovery_task.submit(s["sensitivity"], evaluations, [u["unit"] for u in recovered], q.recovery,
                                         q.max_fp16_fraction, list(q.exclude), config.evaluation.on_gate_failure,
                                         store=store)
    return list(exclusion_reasons(recovered))  # the last attempt's, as its quantize took them


class RunRecord:
    """What a run did, stage by stage, and the report, summary and run folder that say so."""

    def __init__(self, store: ArtifactStore, config: PipelineConfig):
        self.store = store
        self.config = config
        self.started = time.time()
        name = config.output.run_name or (
            f"{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}-{flow_run.get_name() or 'local'}")
        self.dir = store.root / "runs" / name
        self.refs: dict[str, ArtifactRef] = {}
        self.failures: list[tuple[str, BaseException]] = []
        self.summary: dict[str, Any] = {
            "run": name, "flow_run_id": str(flow_run.get_id() or ""), "config": config.model_dump(mode="json"),
            "status": "running", "promotable": False, "stages": {}, "metrics": {}, "artifacts": {}}

    def settle(self, futures: dict[str, PrefectFuture]) -> None:
        """Wait for every stage, then record each one's outcome (a failed one does not stop the others)."""
        wait(list(futures.values()))
        for label, future in futures.items():
            state = future.state
            record: dict[str, Any] = {"status": "not run", "seconds": 0.0}
            if execution := EXECUTIONS.get(str(future.task_run_id)):
                start, end = execution
                record.update(seconds=end - start, start_s=start - self.started, end_s=end - self.started)
            if state.is_completed():
                ref = state.result()
                self.refs[label] = ref
                cached = state.name == "Cached" or str(future.task_run_id) in REUSED
                record["status"] = "skipped" if "skip_reason" in ref.meta else "cached" if cached else "completed"
                record["note"] = ref.meta.get("skip_reason") or ref.meta.get("note", "")
            elif state.is_failed() or state.is_crashed():
                exc = failure_of(state)
                self.failures.append((label, exc))
                # What a failing stage attached to its error (the gate table, the recovery attempts) goes in the report.
                self.summary.setdefault("failure_markdown", []).extend(getattr(exc, "reports", {}).values())
                record.update(status="failed", note=one_line(exc))
            else:  # an input stage failed, so this one never started
                record["note"] = "an earlier stage it needs did not complete"
            self.summary["stages"][label] = record
        self._collect()
        if not self.failures:
            self.summary["status"] = "completed"

    def settle_targets(self, futures: dict[str, PrefectFuture]) -> None:
        """Each build target's outcome (``flows/engines.py``): its engines and timings, or why it has none."""
        wait(list(futures.values()))
        for gpu, future in futures.items():
            label = f"engines@{gpu}"
            if future.state.is_completed():
                result = future.state.result()
            else:
                exc = failure_of(future.state)
                self.failures.append((label, exc))
                result = getattr(exc, "target_result", None) or {
                    "gpu": gpu, "status": "failed" if future.state.is_failed() else "not run", "reason": one_line(exc),
                    "builds": [], "benchmark": None}
            self.summary.setdefault("targets", {})[gpu] = result
            self.summary["stages"][label] = {"status": result["status"], "seconds": 0.0, "note": result.get("reason", "")}
            for built in result["builds"]:
                self.summary["artifacts"].update({
                    f"engine_{gpu}_{name}": f"{built.get('uri') or built['path']}/{built['files'][name]}"
                    for name in built["meta"].get("engines", {})})

    def _collect(self) -> None:
        s, refs = self.summary, self.refs
        if "baseline_model" in refs:
            s["model"] = refs["baseline_model"].meta
        if "calibration_data" in refs:  # pairs used, images skipped and a few of their names
            s["calibration"] = {k: v for k, v in refs["calibration_data"].meta.items() if k != "note"}
        final = {stage: label for stage in ("quantize", "audit", "evaluate") if (label := last_attempt(refs, stage))}
        if "quantize" in final:
            s["artifacts"]["checkpoint"] = refs[final["quantize"]].location("checkpoint")
        if "audit" in final:
            ref = refs[final["audit"]]
            s["audit"] = ref.meta
            s["audit_markdown"] = reports_of(ref).get("quantization-audit", "")
            s["artifacts"]["audit"] = ref.location("audit")
        if "evaluate" in final:
            ref = refs[final["evaluate"]]
            metrics = json.loads(ref.file("metrics").read_text())
            s["metrics"] = {"baseline": metrics["baseline"], "fp8": metrics["fp8"]}
            s["quality_gate"] = metrics["gate"]
            s["metrics_markdown"] = reports_of(ref).get("quality-gate", "")
            s["artifacts"]["metrics"] = ref.location("metrics")
            s["promotable"] = bool(metrics["promotable"])
        if "evaluate_deployed" in refs:  # what ships, and the gate on the deployed runtime
            ref = refs["evaluate_deployed"]
            deployed = json.loads(ref.file("metrics").read_text())
            s["metrics"]["fp8"] = deployed["runtimes"][deployed["gate_runtime"]]  # what the gate judged
            s["runtime_metrics"] = deployed["runtimes"]
            s["runtimes_skipped"] = deployed["skipped"]
            s["gate_runtime"] = deployed["gate_runtime"]
            s["quality_gate"] = deployed["gate"]
            s["deployed_markdown"] = reports_of(ref).get("deployed-quality", "")
            s["artifacts"]["deployed_metrics"] = ref.location("metrics")
            s["promotable"] = s["promotable"] and bool(deployed["promotable"])
        if "torch_fp8" in refs:
            s["torch_fp8"] = {k: v for k, v in refs["torch_fp8"].meta.items() if k != "note"}
            s["artifacts"]["torch_fp8"] = refs["torch_fp8"].uri or refs["torch_fp8"].path
        if "sensitivity" in refs:
            s["sensitivity_markdown"] = reports_of(refs["sensitivity"]).get("sensitivity", "")
            s["artifacts"]["sensitivity"] = refs["sensitivity"].location("sensitivity")
        if "recovery" in refs:
            s["recovery"] = refs["recovery"].meta
            s["promotable"] = s["promotable"] and refs["recovery"].meta["passed"]
            s["recovery_markdown"] = reports_of(refs["recovery"]).get("recovery", "")
            s["artifacts"]["tradeoff_plot"] = refs["recovery"].location("tradeoff")
        for variant, raw in (("fp16", "export_fp16"), ("fp8", "set_scales")):  # the graphs surgery repairs
            if raw in refs:
                s["artifacts"][f"raw_onnx_{variant}"] = refs[raw].uri or refs[raw].path
            if f"surgery_{variant}" in refs:
                ref = refs[f"surgery_{variant}"]
                s.setdefault("onnx", {}).update(ref.meta["validation"])
                s["artifacts"].update({f"onnx_{k}": ref.location(k) for k in ref.files if k.startswith(variant)})
            if (built := refs.get(f"build_{variant}")) and "engines" in built.meta:
                s.setdefault("engines", {"target": built.meta["target"], "engines": {}})["engines"].update(built.meta["engines"])
                s["artifacts"].update({f"engine_{k}": built.location(k) for k in built.meta["engines"]})
        if (timed := refs.get("benchmark")) and timed.meta.get("rows"):
            s["benchmark"] = timed.meta
            self.dir.mkdir(parents=True, exist_ok=True)
            png = plot_benchmark(timed.meta["rows"], self.dir / "benchmark.png")
            s["benchmark_png"] = base64.b64encode(png).decode()
            s["artifacts"]["benchmark_plot"] = str(self.dir / "benchmark.png")

    def fail(self, exc: BaseException) -> None:
        """A failure outside the stages: before any started, resolving the inputs (a locator that does not
        exist), or while waiting (an interrupt)."""
        label = "inputs" if not self.summary["stages"] else "(run)"
        self.summary["stages"].setdefault(label, {"status": "failed", "seconds": time.time() - self.started,
                                                  "note": one_line(exc)})
        self.failures.append((label, exc))

    def raise_first_failure(self) -> None:
        if self.failures:
            raise self.failures[0][1]

    def public_summary(self) -> dict:
        return {k: v for k, v in self.summary.items() if not k.endswith(("_markdown", "_png")) and k != "history_rows"}

    def write(self) -> None:
        """report.md, summary.json, links to every artifact (``artifacts/<stage>``) and ``runs/latest``."""
        s = self.summary
        if self.failures:
            s["status"], s["error"] = "failed", one_line(self.failures[0][1])
            s["promotable"] = False
        s["all_cached"] = s["status"] == "completed" and all(
            r["status"] in ("cached", "skipped") for r in s["stages"].values())
        self._record_history()
        s["artifacts"]["report"] = str(self.dir / "report.md")
        s["artifacts"]["summary"] = str(self.dir / "summary.json")
        markdown = render_markdown(s)
        atomic_write(self.dir / "report.md", markdown)
        write_json_atomic(self.dir / "summary.json", self.public_summary())
        self._link_artifacts()
        if self.store.remote:
            print(f"report uploaded: {self.store.upload_run(self.dir)}/report.md")
        create_markdown_artifact(key="clip-fp8-report", markdown=markdown, description=f"clip-fp8 run {self.dir.name}")
        create_table_artifact(key=OUTCOME_ARTIFACT, table=[{
            "run": s["run"], "status": s["status"], "promotable": s["promotable"], "error": s.get("error", ""),
            "report": s["artifacts"]["report"]}], description=f"clip-fp8 run {self.dir.name}: outcome")
        print(f"report: {self.dir / 'report.md'}")
        for _, exc in self.failures:  # for a caller that reports the failure (the CLI's stage table)
            try:
                exc.run_summary = self.public_summary()  # type: ignore[attr-defined]
            except AttributeError:
                pass

    def _record_history(self) -> None:
        """The run's history record, regression check and promotion (``flows/run_history.py``), and what the
        report shows of them. A failure here is reported, never hides the run's own outcome."""
        s = self.summary
        calibration = self.refs.get("calibration_data")
        try:
            result = record_run(s, self.config, calibration.digest if calibration else None)
        except Exception as exc:  # noqa: BLE001 - the run's outcome stands; say why history is missing
            s["history_error"] = one_line(exc)
            print(f"history not recorded: {s['history_error']}")
            return
        record = result["record"]
        s["regressed"] = bool(record["regression"]["reasons"])
        s["regression"], s["promotion"] = record["regression"], record["promotion"]
        s["history_rows"] = history.table_rows(result["recent"])
        self.dir.mkdir(parents=True, exist_ok=True)
        png = plot_trend(result["recent"], self.dir / "trend.png")
        s["trend_png"] = base64.b64encode(png).decode()
        s["artifacts"]["trend_plot"] = str(self.dir / "trend.png")
        create_table_artifact(key="clip-fp8-history", table=s["history_rows"],
                              description=f"clip-fp8 runs of {record['model_key']}, newest last")

    def _link_artifacts(self) -> None:
        """Relative links, so the run folder survives a move of the whole output root."""
        links = self.dir / "artifacts"
        links.mkdir(parents=True, exist_ok=True)
        for label, ref in self.refs.items():
            if Path(ref.path).is_dir():
                _replace_symlink(links / label, os.path.relpath(ref.path, links))
        _replace_symlink(self.dir.parent / "latest", self.dir.name)


def _replace_symlink(link: Path, target: str) -> None:
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)  # a reader sees the old link or the new one

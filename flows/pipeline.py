"""The clip-fp8 DAG, run by Prefect as a DAG: independent branches at the same time.

    evaluate_baseline ───────────────────────────┐
    calibration_data ──► quantize ──► audit ──┬──┴──► evaluate ──────────────────────────────────────┐
    export[fp8] ──────────────────────────────┼─────► set_scales ──► surgery[fp8] ──► build[fp8] ──┐  │
                                              └─────► torch_fp8 ─────────────────────────────────┐ │  ▼
    baseline_model                                                              evaluate_deployed ◄─┴──┤
    export[fp16] ──► surgery[fp16] ──► build[fp16] ──────────────► benchmark ──────────►│              │
                                                                                        ▼              │
                                                                                       gate ◄──────────┘

Evaluation stages measure (``evaluate``: the fake-quant model against ``evaluate_baseline``; ``evaluate_deployed``:
what ships, each runtime where it can run); ``gate`` judges, and is the run's one source of ``promotable``. It reads
only their metrics (and the benchmark's serving table, for the speed gate), so a new threshold re-runs the gate alone. Every stage is keyed on the digests of the artifacts
it reads and the config fields it declares (``clip_fp8.stage.Reads``): a stage that re-ran and wrote the same
bytes stops the run there (early cutoff).

With ``quantization.recovery`` on, export[fp8] waits for the fake-quant verdict: when it fails, ``sensitivity`` ranks
the units and (``auto``) quantize → audit → evaluate run again with the most sensitive units in FP16, one more per
attempt (labelled ``quantize~1``, ``quantize~2``, ...), then ``recovery`` tabulates; export[fp8] takes the last
attempt's exclusions and set_scales its checkpoint.

Both exports depend on the model (and FP8 on the quantization settings), not on calibration: they start at once,
and new calibration data re-runs only quantize and what reads its checkpoint (set_scales writes the new scales into
the FP8 graphs). On a GPU host ModelOpt's FP8 kernels build beside calibration (``build-fp8-kernels``, not a stage)
and this process's torch threads are bounded (``bound_flow_threads``). Locators are resolved before any stage
starts. A stage that fails stops only what depends on it; the report shows every stage, then the run fails with the
first failure. The flow's one parameter is ``PipelineConfig``, so the Prefect UI renders it as the run form.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from prefect import allow_failure, flow, task
from prefect.futures import PrefectFuture
from prefect.task_runners import ThreadPoolTaskRunner

from clip_fp8.artifacts import ArtifactRef, ArtifactStore
from clip_fp8.config import PipelineConfig
from clip_fp8.devices import pick_device
from clip_fp8.flows.engines import check_targets, engines_on_target
from clip_fp8.flows.run_record import OUTCOME_ARTIFACT, RunRecord, last_attempt  # noqa: F401 - OUTCOME_ARTIFACT: models night
from clip_fp8.flows.stage_task import stage_results, stage_task
from clip_fp8.imports import preload
from clip_fp8.security import check_allowed_roots
from clip_fp8.tasks.audit import audit
from clip_fp8.tasks.baseline_model import baseline_model
from clip_fp8.tasks.benchmark import benchmark
from clip_fp8.tasks.build import build
from clip_fp8.tasks.calibration_data import calibration_data
from clip_fp8.tasks.calibration_sources import resolve_data_source
from clip_fp8.tasks.checkpoints import resolve_model_source
from clip_fp8.tasks.eval_datasets import resolve_eval_source
from clip_fp8.tasks.evaluate import evaluate
from clip_fp8.tasks.evaluate_baseline import evaluate_baseline
from clip_fp8.tasks.evaluate_deployed import evaluate_deployed
from clip_fp8.tasks.export import export
from clip_fp8.tasks.gate import gate, passes
from clip_fp8.tasks.quantize import build_fp8_kernels, quantize
from clip_fp8.tasks.recovery import exclusion_reasons, plan, recovery
from clip_fp8.tasks.runtimes import resolve_gate_runtime
from clip_fp8.tasks.sensitivity import sensitivity
from clip_fp8.tasks.set_scales import set_scales
from clip_fp8.tasks.surgery import surgery
from clip_fp8.tasks.torch_fp8 import torch_fp8
from clip_fp8.tasks.tensorrt import Target, resolve_target


def bound_flow_threads(device: str) -> int | None:
    """On a GPU host, this process's torch CPU threads to a quarter of the cores; returns the new count.

    Stages run here in threads side by side, and each thread that calls a torch CPU op gets a team of one OpenMP
    thread per core: the teams spin-wait and starve the export workers and the kernel build beside them. On a GPU
    the stages' math is on the device; a CPU run keeps every core. Measured: docs/benchmarks.md
    ("What the DAG's cold run waited for")."""
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


class Stages(dict):
    """The run's stage futures by label (``export_fp16``, ``quantize~1``, ...), in the order they were submitted."""

    def __init__(self, store: ArtifactStore):
        super().__init__()
        self.store = store

    def run(self, fn: Callable, *args: Any, label: str | None = None, **kwargs: Any) -> PrefectFuture:
        self[label or fn.__name__] = future = stage_task(fn).submit(*args, store=self.store, **kwargs)
        return future

    def last(self, stage: str) -> PrefectFuture:
        """The last attempt of a stage that recovery may repeat."""
        return self[last_attempt(self, stage)]


@flow(name="clip-fp8", log_prints=True, validate_parameters=True, task_runner=ThreadPoolTaskRunner(max_workers=8))
def clip_fp8_pipeline(config: PipelineConfig = PipelineConfig()) -> dict:
    """Quantize a CLIP checkpoint to FP8, check it, export and repair its encoders, build and time engines."""
    check_allowed_roots(config)  # before anything is read or written: the worker's bound, not the form's
    store = ArtifactStore(config.output.root)
    record = RunRecord(store, config)
    try:
        model_source = resolve_model_source(config.model)
        data_source = resolve_data_source(config.calibration)
        eval_source = resolve_eval_source(config.evaluation)
        check_targets(config.build)
        target = resolve_target(config.build) if not config.build.targets else Target(
            backend="none", unavailable="engines are built on the build targets' workers (build.targets)")
        model, exporting, evaluation = config.model, config.export, config.evaluation
        device = pick_device(model)
        gate_runtime = resolve_gate_runtime(evaluation, device, target)
        record.summary["gate_runtime"] = gate_runtime
        local_engines = not config.build.targets
        with stage_results(store):
            bound_flow_threads(device)
            # On a GPU, ModelOpt's FP8 kernels build beside calibration, not in the first FP8 forward (see there).
            kernels = fp8_kernels_task.submit() if device.startswith("cuda") else None
            stages = Stages(store)
            calibration = stages.run(calibration_data, data_source, config.calibration)
            stages.run(baseline_model, model_source, model)
            baseline = stages.run(evaluate_baseline, model_source, eval_source, model, evaluation)
            raw_fp16 = stages.run(export, "fp16", model_source, model, None, exporting, label="export_fp16")
            if config.quantization.recovery == "off":
                stages.run(export, "fp8", model_source, model, config.quantization, exporting, label="export_fp8")
            repaired_fp16 = stages.run(surgery, "fp16", raw_fp16, model_source, None, None, None, model, exporting,
                                       config.build, label="surgery_fp16")
            if local_engines:
                stages.run(build, repaired_fp16, config.build, target, label="build_fp16")
            quantized = stages.run(quantize, model_source, calibration, data_source, model, config.calibration,
                                   config.quantization)
            audited = stages.run(audit, quantized, config.quantization)
            stages.run(evaluate, model_source, quantized, baseline, eval_source, model, evaluation, wait_for=[audited])
            if config.quantization.recovery != "off":
                recovered = recover(stages, config, model_source, data_source, eval_source)
                stages.run(export, "fp8", model_source, model, config.quantization, exporting, recovered,
                           label="export_fp8")
            checkpoint, checked = stages.last("quantize"), stages.last("audit")
            scaled = stages.run(set_scales, stages["export_fp8"], checkpoint, model_source, model, exporting,
                                wait_for=[checked])
            repaired_fp8 = stages.run(surgery, "fp8", scaled, model_source, checkpoint, calibration, data_source, model,
                                      exporting, config.build, label="surgery_fp8")
            if local_engines:
                stages.run(build, repaired_fp8, config.build, target, label="build_fp8")
            fp8_model = stages.run(torch_fp8, checkpoint, model, wait_for=[checked])
            targets: dict[str, PrefectFuture] = {}
            for build_target in config.build.targets:  # one engines run per GPU type, each on its own pool
                targets[build_target.gpu] = engines_on_target.submit(build_target, [repaired_fp16, repaired_fp8],
                                                                     model_source, fp8_model, config)
            deployed = stages.run(evaluate_deployed, stages.last("evaluate"), model_source, repaired_fp8,
                                  stages.get("build_fp8"), fp8_model, eval_source, model, evaluation,
                                  list(evaluation.runtimes))
            if local_engines:
                # Timed alone: nothing else of this run may share the GPU while it measures.
                stages.run(benchmark, [stages["build_fp16"], stages["build_fp8"]], model_source, fp8_model, model,
                           config.benchmark, config.serving, target, wait_for=[allow_failure(f) for f in stages.values()])
            # Judging fake-quant needs no deployed runtime: the gate then does not wait for the exports and surgery.
            stages.run(gate, stages.last("evaluate"), None if gate_runtime == "fakequant" else deployed,
                       stages.get("recovery"), allow_failure(stages["benchmark"]) if local_engines else None, gate_runtime,
                       evaluation, config.serving,
                       config.promotion)
            record.settle(stages)
            record.settle_targets(targets)
            if kernels is not None:
                kernels.wait()  # the stages that needed the kernels report their own failure
    except BaseException as exc:
        record.fail(exc)
        raise
    finally:
        record.write()
    record.raise_first_failure()
    return record.public_summary()


def _settled(future: PrefectFuture) -> ArtifactRef | None:
    future.wait()
    return future.state.result() if future.state.is_completed() else None


def recover(stages: Stages, config: PipelineConfig, model_source: ArtifactRef, data_source: ArtifactRef,
            eval_source: ArtifactRef) -> list[str]:
    """``quantization.recovery`` after a failed fake-quant verdict: rank the units (``sensitivity``); with ``auto``,
    quantize → audit → evaluate again with one more of the most sensitive units in FP16 per attempt, until the
    verdict passes or the FP16 budget is spent; then ``recovery`` tabulates (``gate`` decides). A stage that fails
    stops the attempts. Returns the exclusions the last attempt added (what the FP8 export must leave out too)."""
    quantization, model, max_drop = config.quantization, config.model, config.evaluation.max_drop
    first = _settled(stages["evaluate"])
    if first is None or passes(first, max_drop):
        return []  # passed (or failed for another reason): nothing to recover, no sensitivity computed
    ranked = _settled(stages.run(sensitivity, model_source, stages["quantize"], stages["calibration_data"], data_source,
                                 model, quantization, quantization.sensitivity_samples,
                                 quantization.sensitivity_batch_size))
    if ranked is None:
        return []
    import json

    evaluations, recovered = [stages["evaluate"]], []
    if quantization.recovery == "auto":
        for unit in plan(json.loads(ranked.file("sensitivity").read_text()), quantization.max_fp16_fraction):
            recovered.append(unit)
            attempt = len(recovered)
            quantized = stages.run(quantize, model_source, stages["calibration_data"], data_source, model,
                                   config.calibration, quantization, recovered=exclusion_reasons(recovered),
                                   label=f"quantize~{attempt}")
            audited = stages.run(audit, quantized, quantization, label=f"audit~{attempt}")
            evaluated = stages.run(evaluate, model_source, quantized, stages["evaluate_baseline"], eval_source, model,
                                   config.evaluation, wait_for=[audited], label=f"evaluate~{attempt}")
            evaluations.append(evaluated)
            if (result := _settled(evaluated)) is None or passes(result, max_drop):
                break
    stages.run(recovery, stages["sensitivity"], evaluations, [u["unit"] for u in recovered], quantization.recovery,
               quantization.max_fp16_fraction, list(quantization.exclude), max_drop)
    return list(exclusion_reasons(recovered))  # the last attempt's, as its quantize took them

"""Stage gate: the one place that decides whether a run's FP8 form may ship (``promotable``).

Evaluation stages measure; this stage judges. It compares each metric's drop (baseline - FP8) with
``evaluation.max_drop`` (patterns over ``dataset/task/metric`` names, the most specific wins) for the fake-quant
model (``evaluate``) and for the runtime that will be deployed (``evaluate_deployed``, ``gate_runtime``), and
applies ``evaluation.on_gate_failure``: ``fail`` raises, ``mark`` completes the run not promotable. After
recovery it reads recovery's verdict into its message (the units to leave in FP16, or the best reached). It
reads a few small JSON files, so a change of threshold re-runs this stage alone, in seconds.
Every metric CLIP_benchmark reports here (accuracy, recall@k, mean per-class recall) is higher-is-better.

The speed gate beside it: the FP8 form as served (``serving.small_batch`` over the benchmark's serving table,
FP16 compiled and FP8 timed in the same run on the same GPU) must be at least ``promotion.min_speedup`` x FP16
compiled at every ``serving.batch_sizes``; otherwise ``promotion.on_slower`` fails the run, marks it not
promotable, or promotes the FP16 encoders (``promote_form``). Where no GPU timed it, it is skipped, with why.
"""

from __future__ import annotations

import fnmatch
import json
import math
from pathlib import Path

from clip_fp8.artifacts import ArtifactRef
from clip_fp8.config import EvaluationConfig, PromotionConfig, ServingConfig
from clip_fp8.errors import PipelineInputError, QualityGateError, SpeedGateError
from clip_fp8.stage import Reads, StageOutput, stage

GateSettings = Reads[EvaluationConfig, "max_drop", "on_gate_failure"]
SpeedSettings = Reads[PromotionConfig, "min_speedup", "on_slower"]
FAKEQUANT = "fakequant"


def allowed_drop(metric: str, max_drop: dict[str, float]) -> float:
    """The most specific matching pattern wins (exact name beats wildcards; longer pattern beats shorter)."""
    if metric in max_drop:
        return max_drop[metric]
    matches = [p for p in max_drop if fnmatch.fnmatchcase(metric, p)]
    return max_drop[max(matches, key=len)] if matches else math.inf


def over_limit(metric: str, before: float, after: float, max_drop: dict[str, float]) -> str | None:
    """Why ``after`` is too far below ``before`` for ``metric``, or None: the gate's and the regression check's words."""
    drop, limit = before - after, allowed_drop(metric, max_drop)
    if drop <= limit + 1e-12:
        return None
    return f"{metric}: {before:.4f} -> {after:.4f} (drop {drop:.4f} > max_drop {limit})"


def quality_gate(baseline: dict[str, float], fp8: dict[str, float], max_drop: dict[str, float]) -> dict:
    """Each metric's drop against its limit; failures worst first (by how far over)."""
    rows, over = [], []
    for metric, base in baseline.items():
        value = fp8[metric]
        if math.isnan(base) or math.isnan(value):
            continue
        why = over_limit(metric, base, value, max_drop)
        limit = allowed_drop(metric, max_drop)
        rows.append({"metric": metric, "baseline": base, "fp8": value, "delta": value - base, "max_drop": limit,
                     "passed": why is None})
        if why:
            over.append(((base - value) - limit, why))
    failures = [text for _, text in sorted(over, key=lambda o: -o[0])]
    return {"rows": rows, "failures": failures, "passed": not failures}


def passes(evaluated: ArtifactRef, max_drop: dict[str, float]) -> bool:
    """The fake-quant verdict of one evaluation: what recovery acts on between its attempts."""
    metrics = json.loads(evaluated.file("metrics").read_text())
    return quality_gate(metrics["baseline"], metrics["fp8"], max_drop)["passed"]


def served_form(small_batch: str, measured: str, batch: int, largest: int) -> str:
    """The form that serves ``batch``: the table's (``auto``), or the user's override (``serving.small_batch``)."""
    return {"auto": measured, "fp8": "fp8", "fp16": "fp16" if batch < largest else "fp8"}[small_batch]


def speed_gate(benchmark: ArtifactRef | None, small_batch: str, min_speedup: float) -> dict:
    """Each tower and batch size as served against FP16 compiled; the sizes under ``min_speedup``, with both timings."""
    if not isinstance(benchmark, ArtifactRef):  # the flow passes what a benchmark that did not complete left
        benchmark = None
    table = (benchmark.meta.get("serving") if benchmark is not None else None) or None
    if table is None:
        why = ("no benchmark completed in this run (it failed or did not start, or build.targets time on their own "
               "pools)" if benchmark is None else
               benchmark.meta.get("skipped", {}).get("torch-fp8") or benchmark.meta.get("skip_reason")
               or "the benchmark timed no torch-fp8")
        return {"status": "skipped", "reason": why, "rows": [], "losing": []}
    rows, losing = [], []
    for tower, sizes in sorted(table["towers"].items()):
        largest = max(int(b) for b in sizes)
        for batch, t in sorted(sizes.items(), key=lambda kv: int(kv[0])):
            form = served_form(small_batch, t["served_by"], int(batch), largest)
            served_ms = t["fp8_ms"] if form == "fp8" else t["fp16_ms"]
            speedup = t["fp16_ms"] / served_ms
            rows.append({"tower": tower, "batch": int(batch), "served_by": form, "fp16_ms": t["fp16_ms"],
                         "fp8_ms": t["fp8_ms"], "served_ms": served_ms, "speedup": speedup, "verdict": t["verdict"]})
            if speedup < min_speedup - 1e-9:
                losing.append(f"{tower} batch {batch}: {form} as served {served_ms:.3f} ms vs FP16 compiled "
                              f"{t['fp16_ms']:.3f} ms ({speedup:.2f}x < promotion.min_speedup {min_speedup})")
    return {"status": "failed" if losing else "passed", "gpu": table["gpu"], "rows": rows, "losing": losing}


def speed_markdown(speed: dict, min_speedup: float) -> str:
    if speed["status"] == "skipped":
        return f"## Speed gate\n\nSkipped: {speed['reason']}.\n"
    lines = [f"## Speed gate ({speed['gpu']}: as served vs FP16 compiled, at least {min_speedup}x)", "",
             "| tower | batch | FP16 ms | FP8 ms | FP8 verdict | served by | speedup as served |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['tower']} | {r['batch']} | {r['fp16_ms']:.3f} | {r['fp8_ms']:.3f} | {r['verdict']} | {r['served_by']} | "
              f"{r['speedup']:.2f}x{'' if r['speedup'] >= min_speedup - 1e-9 else ' **SLOWER**'} |" for r in speed["rows"]]
    return "\n".join(lines) + "\n"


def gate_markdown(judged: dict[str, dict], gate_runtime: str) -> str:
    lines = [f"## Quality gate (CLIP_benchmark; what ships: `{gate_runtime}`)", "",
             "| runtime | metric | baseline | FP8 | delta | max drop | gate |", "|---|---|---|---|---|---|---|"]
    for runtime, gate in judged.items():
        for r in gate["rows"]:
            lines.append(f"| {runtime} | {r['metric']} | {r['baseline']:.4f} | {r['fp8']:.4f} | {r['delta']:+.4f} | "
                         f"{r['max_drop']} | {'pass' if r['passed'] else '**FAIL**'} |")
    return "\n".join(lines) + "\n"


@stage()
def gate(evaluated: ArtifactRef, deployed: ArtifactRef | None, recovery: ArtifactRef | None,
         benchmark: ArtifactRef | None, gate_runtime: str, cfg: GateSettings,
         serving: Reads[ServingConfig, "small_batch"], speed_cfg: SpeedSettings, out_dir: Path) -> StageOutput:
    """Judge the fake-quant model and ``gate_runtime`` (what ships), and the speed as served; the run's one
    ``promotable``."""
    fakequant = json.loads(evaluated.file("metrics").read_text())
    baseline, runtimes, skipped = fakequant["baseline"], {FAKEQUANT: fakequant["fp8"]}, {}
    if deployed is not None:
        shipped = json.loads(deployed.file("metrics").read_text())
        runtimes.update(shipped["runtimes"])
        skipped = shipped["skipped"]
    if gate_runtime not in runtimes:
        raise PipelineInputError(f"evaluation.gate_runtime '{gate_runtime}' cannot run here: "
                                 f"{skipped.get(gate_runtime, 'not in evaluation.runtimes')}; use evaluation.gate_runtime=auto")
    # What ships first: its failure is the run's message; fake-quant too, as recovery's and history's reference.
    judged = {name: quality_gate(baseline, runtimes[name], cfg.max_drop) for name in dict.fromkeys([gate_runtime, FAKEQUANT])}
    speed = speed_gate(benchmark, serving.small_batch, speed_cfg.min_speedup)
    slower = speed["status"] == "failed"
    promote_form = "fp16" if slower and speed_cfg.on_slower == "promote_fp16" else "fp8"
    promotable = all(g["passed"] for g in judged.values()) and not (slower and speed_cfg.on_slower != "promote_fp16")
    reports = {"quality-gate": gate_markdown(judged, gate_runtime), "speed-gate": speed_markdown(speed, speed_cfg.min_speedup)}
    failed = next((name for name, g in judged.items() if not g["passed"]), None)
    message = None
    if failed is not None:
        failures = judged[failed]["failures"]
        more = f" (+{len(failures) - 1} more)" if len(failures) > 1 else ""
        on = "" if failed == FAKEQUANT else f" on runtime {failed}"
        message = f"quality gate failed{on}: {failures[0]}{more}"
        if recovery is not None and not recovery.meta["passed"] and failed == FAKEQUANT:
            message = recovery.meta["message"]  # what recovery found: the units to exclude, or the best reached
    result = {"baseline": baseline, "gate_runtime": gate_runtime, "judged": judged, "promotable": promotable,
              "fp8": runtimes[gate_runtime], "message": message, "speed": speed, "promote_form": promote_form}
    (out_dir / "gate.json").write_text(json.dumps(result, indent=1))
    if message and cfg.on_gate_failure == "fail":
        raise QualityGateError(message, failures=judged[failed]["failures"], reports=reports)
    if slower and speed_cfg.on_slower == "fail":
        more = f" (+{len(speed['losing']) - 1} more)" if len(speed["losing"]) > 1 else ""
        raise SpeedGateError(f"speed gate failed on {speed['gpu']}: {speed['losing'][0]}{more}; serve those sizes in "
                             "FP16 (serving.small_batch=auto) or lower promotion.min_speedup", failures=speed["losing"],
                             reports=reports)
    return StageOutput(
        files={"gate": "gate.json"}, reports=reports, shown={"metrics": "gate"},
        meta={"promotable": promotable, "gate_runtime": gate_runtime, "failures": judged[gate_runtime]["failures"],
              "speed": speed["status"], "promote_form": promote_form,
              "note": f"{'passed' if promotable else 'not promotable'} on {', '.join(judged)}; speed {speed['status']}"
                      + (f": {message}" if message else "") + (f": {'; '.join(speed['losing'])}" if slower else "")},
        summary={"promotable": promotable, "gate_runtime": gate_runtime, "quality_gate": judged[gate_runtime],
                 "metrics": {"baseline": baseline, "fp8": runtimes[gate_runtime]}, "speed_gate": speed,
                 "promote_form": promote_form})

"""Stage gate: the one place that decides whether a run's FP8 form may ship (``promotable``).

Evaluation stages measure; this stage judges. It compares each metric's drop (baseline - FP8) with
``evaluation.max_drop`` (patterns over ``dataset/task/metric`` names, the most specific wins) for the fake-quant
model (``evaluate``) and for the runtime that will be deployed (``evaluate_deployed``, ``gate_runtime``), and
applies ``evaluation.on_gate_failure``: ``fail`` raises, ``mark`` completes the run not promotable. After
recovery it reads recovery's verdict into its message (the units to leave in FP16, or the best reached). It
reads a few small JSON files, so a change of threshold re-runs this stage alone, in seconds.
Every metric CLIP_benchmark reports here (accuracy, recall@k, mean per-class recall) is higher-is-better.
"""

from __future__ import annotations

import fnmatch
import json
import math
from pathlib import Path

from clip_fp8.artifacts import ArtifactRef
from clip_fp8.config import EvaluationConfig
from clip_fp8.errors import PipelineInputError, QualityGateError
from clip_fp8.stage import Reads, StageOutput, stage

GateSettings = Reads[EvaluationConfig, "max_drop", "on_gate_failure"]
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


def gate_markdown(judged: dict[str, dict], gate_runtime: str) -> str:
    lines = [f"## Quality gate (CLIP_benchmark; what ships: `{gate_runtime}`)", "",
             "| runtime | metric | baseline | FP8 | delta | max drop | gate |", "|---|---|---|---|---|---|---|"]
    for runtime, gate in judged.items():
        for r in gate["rows"]:
            lines.append(f"| {runtime} | {r['metric']} | {r['baseline']:.4f} | {r['fp8']:.4f} | {r['delta']:+.4f} | "
                         f"{r['max_drop']} | {'pass' if r['passed'] else '**FAIL**'} |")
    return "\n".join(lines) + "\n"


@stage()
def gate(evaluated: ArtifactRef, deployed: ArtifactRef | None, recovery: ArtifactRef | None, gate_runtime: str,
         cfg: GateSettings, out_dir: Path) -> StageOutput:
    """Judge the fake-quant model and ``gate_runtime`` (what ships); the run's one ``promotable``."""
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
    promotable = all(g["passed"] for g in judged.values())
    reports = {"quality-gate": gate_markdown(judged, gate_runtime)}
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
              "fp8": runtimes[gate_runtime], "message": message}
    (out_dir / "gate.json").write_text(json.dumps(result, indent=1))
    if message and cfg.on_gate_failure == "fail":
        raise QualityGateError(message, failures=judged[failed]["failures"], reports=reports)
    return StageOutput(
        files={"gate": "gate.json"}, reports=reports, shown={"metrics": "gate"},
        meta={"promotable": promotable, "gate_runtime": gate_runtime, "failures": judged[gate_runtime]["failures"],
              "note": f"{'passed' if promotable else 'not promotable'} on {', '.join(judged)}"
                      + (f": {message}" if message else "")},
        summary={"promotable": promotable, "gate_runtime": gate_runtime, "quality_gate": judged[gate_runtime],
                 "metrics": {"baseline": baseline, "fp8": runtimes[gate_runtime]}})

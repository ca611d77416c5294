"""Stage evaluate_deployed: the FP8 artifacts that ship, evaluated like the fake-quant model, and gated.

``evaluate`` measures the baseline and ModelOpt's simulated FP8 (beside the exports, so recovery can act
early). What a user deploys is a repaired ONNX graph, a TensorRT engine or the torch-fp8 model, and an
export or engine defect shows only there. This stage runs the same CLIP_benchmark tasks on the same
data through each of ``evaluation.runtimes`` that can run here (``clip_fp8.tasks.runtimes``; the others
are listed with the reason), tabulates baseline, fake-quant and every runtime side by side with the
fake-quant -> deployed delta, and applies the quality gate to ``gate_runtime``: the runtime that will be
deployed, resolved by the flow before any stage starts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from clip_fp8.artifacts import ArtifactRef
from clip_fp8.config import EvaluationConfig, ModelConfig
from clip_fp8.errors import PipelineInputError, QualityGateError, collected
from clip_fp8.stage import StageOutput
from clip_fp8.tasks.checkpoints import load_processor, pick_device
from clip_fp8.tasks.evaluate import evaluate_model, quality_gate
from clip_fp8.tasks.runtimes import Artifacts, open_runtime, unavailable


def runtimes_markdown(baseline: dict[str, float], metrics: dict[str, dict[str, float]], skipped: dict[str, str],
                      gate: dict, gate_runtime: str) -> str:
    names = list(metrics)
    deployed = [n for n in names if n != "fakequant"]
    lines = [f"## Quality of what ships (CLIP_benchmark; the gate judges `{gate_runtime}`)", "",
             "| metric | baseline | " + " | ".join(names) + " | " +
             "".join(f"{n} - fakequant | " for n in deployed if "fakequant" in metrics) + "gate |",
             "|---|---|" + "---|" * len(names) + "".join("---|" for n in deployed if "fakequant" in metrics) + "---|"]
    verdict = {r["metric"]: r["passed"] for r in gate["rows"]}
    for metric, base in baseline.items():
        values = [metrics[n].get(metric, math.nan) for n in names]
        deltas = [metrics[n].get(metric, math.nan) - metrics["fakequant"].get(metric, math.nan)
                  for n in deployed if "fakequant" in metrics]
        ok = verdict.get(metric)
        lines.append(f"| {metric} | {base:.4f} | " + " | ".join(f"{v:.4f}" for v in values) + " | " +
                     "".join(f"{d:+.4f} | " for d in deltas) + ("pass" if ok else "**FAIL**" if ok is False else "—") + " |")
    if skipped:
        lines += ["", "Not evaluated here: " + "; ".join(f"`{n}`: {why}" for n, why in skipped.items())]
    return "\n".join(lines) + "\n"


def evaluate_deployed(evaluated: ArtifactRef, model_source: ArtifactRef, onnx: ArtifactRef | None,
                      engines: ArtifactRef | None, torch_fp8: ArtifactRef | None, eval_source: ArtifactRef,
                      model_cfg: ModelConfig, cfg: EvaluationConfig, runtimes: list[str], gate_runtime: str,
                      out_dir: Path) -> StageOutput:
    """Evaluate each runtime that can run here; the gate on ``gate_runtime``; ``on_gate_failure=fail`` raises."""
    first = json.loads(evaluated.file("metrics").read_text())
    baseline = first["baseline"]
    metrics: dict[str, dict[str, float]] = {"fakequant": first["fp8"]}  # always shown: the delta's reference
    skipped: dict[str, str] = {}
    device = pick_device(model_cfg)
    processor = load_processor(model_source.path)
    artifacts = Artifacts(model_source=model_source, onnx=onnx, engines=engines, torch_fp8=torch_fp8)
    for name in runtimes:
        if name == "fakequant":
            continue
        if why := unavailable(name, device, artifacts):
            skipped[name] = why
            continue
        encoders = open_runtime(name, artifacts, model_cfg, device, cfg.batch_size)
        metrics[name] = evaluate_model(encoders, processor, cfg, encoders.device)
    if gate_runtime not in metrics:
        raise PipelineInputError(f"evaluation.gate_runtime '{gate_runtime}' cannot run here: "
                                 f"{skipped.get(gate_runtime, 'not in evaluation.runtimes')}; use evaluation.gate_runtime=auto")
    gate = quality_gate(baseline, metrics[gate_runtime], cfg)
    reports = {"deployed-quality": runtimes_markdown(baseline, metrics, skipped, gate, gate_runtime)}
    if not gate["passed"] and cfg.on_gate_failure == "fail":
        raise collected(QualityGateError, f"quality gate failed on runtime {gate_runtime}", gate["failures"], reports)
    result = {"baseline": baseline, "runtimes": metrics, "skipped": skipped, "gate_runtime": gate_runtime,
              "gate": gate, "promotable": gate["passed"]}
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=1))
    evaluated_names = ", ".join(n for n in metrics if n != "fakequant") or "none"
    return StageOutput(files={"metrics": "metrics.json"}, reports=reports,
                       meta={"promotable": gate["passed"], "failures": gate["failures"], "gate_runtime": gate_runtime,
                             "skipped": skipped, "note": f"gate on {gate_runtime}; evaluated {evaluated_names}"})

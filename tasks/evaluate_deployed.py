"""Stage evaluate_deployed: the FP8 artifacts that ship, evaluated like the fake-quant model.

``evaluate`` measures the baseline and ModelOpt's simulated FP8 (beside the exports, so recovery can act
early). What a user deploys is a repaired ONNX graph, a TensorRT engine or the torch-fp8 model, and an
export or engine defect shows only there. This stage runs the same CLIP_benchmark tasks on the same
data through each of ``evaluation.runtimes`` that can run here (``clip_fp8.tasks.runtimes``; the others
are listed with the reason) and tabulates baseline, fake-quant and every runtime side by side with the
fake-quant -> deployed delta. The ``gate`` stage judges the one that will be deployed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from clip_fp8.artifacts import ArtifactRef
from clip_fp8.config import EvaluationConfig, ModelConfig
from clip_fp8.devices import pick_device
from clip_fp8.stage import Reads, StageOutput, stage
from clip_fp8.tasks.checkpoints import ModelSettings, load_processor
from clip_fp8.tasks.evaluate import EvalSettings, evaluate_model
from clip_fp8.tasks.runtimes import Artifacts, open_runtime, unavailable


def runtimes_markdown(baseline: dict[str, float], metrics: dict[str, dict[str, float]], skipped: dict[str, str]) -> str:
    names = list(metrics)
    deployed = [n for n in names if n != "fakequant"]
    lines = ["## Quality of each FP8 runtime (CLIP_benchmark)", "",
             "| metric | baseline | " + " | ".join(names) + " | " + "".join(f"{n} - fakequant | " for n in deployed),
             "|---|---|" + "---|" * len(names) + "".join("---|" for n in deployed)]
    for metric, base in baseline.items():
        values = [metrics[n].get(metric, math.nan) for n in names]
        deltas = [metrics[n].get(metric, math.nan) - metrics["fakequant"].get(metric, math.nan) for n in deployed]
        lines.append(f"| {metric} | {base:.4f} | " + " | ".join(f"{v:.4f}" for v in values) + " | " +
                     "".join(f"{d:+.4f} | " for d in deltas))
    if skipped:
        lines += ["", "Not evaluated here: " + "; ".join(f"`{n}`: {why}" for n, why in skipped.items())]
    return "\n".join(lines) + "\n"


@stage(retries=1)
def evaluate_deployed(evaluated: ArtifactRef, model_source: ArtifactRef, onnx: ArtifactRef | None,
                      engines: ArtifactRef | None, torch_fp8: ArtifactRef | None, eval_source: ArtifactRef,
                      model_cfg: ModelSettings, cfg: EvalSettings, runtimes: list[str], out_dir: Path) -> StageOutput:
    """Evaluate each runtime that can run here; the others are listed with the reason."""
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
    reports = {"deployed-quality": runtimes_markdown(baseline, metrics, skipped)}
    (out_dir / "metrics.json").write_text(json.dumps({"baseline": baseline, "runtimes": metrics, "skipped": skipped},
                                                     indent=1))
    evaluated_names = ", ".join(n for n in metrics if n != "fakequant") or "none"
    return StageOutput(files={"metrics": "metrics.json"}, reports=reports,
                       meta={"skipped": skipped, "note": f"evaluated {evaluated_names}"},
                       summary={"runtime_metrics": metrics, "runtimes_skipped": skipped},
                       shown={"deployed_metrics": "metrics"})

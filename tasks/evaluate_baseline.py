"""Stage evaluate_baseline: CLIP_benchmark metrics of the unquantized model, what every FP8 evaluation compares with.

It depends on the model and the evaluation settings alone, so it starts with the run beside calibration, and a
re-quantization (new calibration data, another exclusion, a recovery attempt) reuses it from the cache instead of
evaluating the same baseline again: at ViT-L/14 that was half of ``evaluate``'s time.
"""

from __future__ import annotations

import json
from pathlib import Path

from clip_fp8.artifacts import ArtifactRef
from clip_fp8.config import EvaluationConfig, ModelConfig
from clip_fp8.devices import pick_device
from clip_fp8.stage import Reads, StageOutput, stage
from clip_fp8.tasks.checkpoints import ModelSettings, load_clip, load_processor
from clip_fp8.tasks.evaluate import EvalSettings, evaluate_model


@stage(retries=1)
def evaluate_baseline(model_source: ArtifactRef, eval_source: ArtifactRef, model_cfg: ModelSettings,
                      cfg: EvalSettings, out_dir: Path) -> StageOutput:
    """Write ``metrics.json`` (metric name -> value, keyed ``dataset/task/metric``) for the baseline model."""
    processor, device = load_processor(model_source.path), pick_device(model_cfg)
    metrics = evaluate_model(load_clip(model_source.path, model_cfg), processor, cfg, device)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return StageOutput(files={"metrics": "metrics.json"}, meta={"metrics": len(metrics)})

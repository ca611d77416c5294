"""Stage evaluate: CLIP_benchmark zero-shot classification and retrieval, baseline vs fake-quantized FP8.

The baseline's metrics come from ``evaluate_baseline`` (keyed on the model, so a re-quantization reuses them);
both models see the same data through CLIP_benchmark's own ``evaluate`` functions, which need only
``encode_image``/``encode_text``. ``amp=False``: autocast would re-round the fake-quant graph and
blur the comparison. It measures only: the ``gate`` stage judges.
"""

from __future__ import annotations

import json
from pathlib import Path

from clip_fp8 import synthetic
from clip_fp8.artifacts import ArtifactRef
from clip_fp8.config import EMBEDDED_DATA, EvaluationConfig, ModelConfig
from clip_fp8.errors import PipelineInputError
from clip_fp8.devices import pick_device
from clip_fp8.stage import Reads, StageOutput, stage
from clip_fp8.tasks.checkpoints import ModelSettings, load_processor, load_quantized
from clip_fp8.tasks.eval_datasets import (
    ShapesCaptions, ShapesClassification, build_clip_benchmark_dataset, dataset_task, limited, make_tokenizer,
    make_transform,
)


# What ``evaluate_model`` reads: the data and how it is scored, not the gate's thresholds (the gate stage has those).
EvalSettings = Reads[EvaluationConfig, "datasets", "tasks", "num_samples", "batch_size", "seed", "recall_k"]


def evaluate_model(model, processor, cfg: EvaluationConfig, device: str) -> dict[str, float]:
    """Run every configured dataset's CLIP_benchmark task on one model (a ``CLIPModel``, or any runtime's
    encoders from ``clip_fp8.tasks.runtimes``); metrics keyed ``dataset/task/metric``."""
    from clip_fp8.encoders import TorchEncoders

    wrapped = model if hasattr(model, "encode_image") else TorchEncoders(model, device)
    transform, tokenizer = make_transform(processor), make_tokenizer(processor)
    metrics: dict[str, float] = {}
    for index, ds in enumerate(cfg.datasets):
        if ds.name == EMBEDDED_DATA:
            runs = []
            if "zeroshot_classification" in cfg.tasks:
                data = ShapesClassification(cfg.seed, cfg.num_samples, transform)
                runs.append(("zeroshot_classification", data, data.classes, synthetic.TEMPLATES))
            if "zeroshot_retrieval" in cfg.tasks:
                runs.append(("zeroshot_retrieval", ShapesCaptions(cfg.seed + 1, cfg.num_samples, transform), None, None))
        else:
            task = dataset_task(ds)
            if task not in cfg.tasks:
                raise PipelineInputError(f"evaluation.tasks {cfg.tasks} does not include {task}, the task of "
                                         f"evaluation.datasets[{index}] '{ds.name}'")
            full = build_clip_benchmark_dataset(ds, index, transform)
            runs = [(task, limited(full, cfg.num_samples, cfg.seed), getattr(full, "classes", None),
                     getattr(full, "templates", None))]
        for task, data, classes, templates in runs:
            result = run_task(wrapped, tokenizer, task, data, classes, templates, cfg, device)
            metrics.update({f"{ds.name}/{task}/{k}": float(v) for k, v in result.items()})
    return metrics


def run_task(wrapped, tokenizer, task: str, data, classes, templates, cfg: EvaluationConfig, device: str) -> dict:
    import torch
    from clip_benchmark.datasets.builder import image_captions_collate_fn
    from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval

    if task == "zeroshot_classification":
        loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size)
        return zeroshot_classification.evaluate(wrapped, loader, tokenizer, classes, templates, device, amp=False)
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, collate_fn=image_captions_collate_fn)
    return zeroshot_retrieval.evaluate(wrapped, loader, tokenizer, device, amp=False, recall_k_list=cfg.recall_k)


@stage(retries=1)
def evaluate(model_source: ArtifactRef, quantized: ArtifactRef, baseline: ArtifactRef, eval_source: ArtifactRef,
             model_cfg: ModelSettings, cfg: EvalSettings, out_dir: Path) -> StageOutput:
    """Evaluate FP8 on every dataset; ``metrics.json`` holds it beside ``baseline`` (``evaluate_baseline``'s
    metrics, the same datasets and settings)."""
    processor, device = load_processor(model_source.path), pick_device(model_cfg)
    baseline_metrics = json.loads(baseline.file("metrics").read_text())
    fp8_metrics = evaluate_model(load_quantized(quantized.file("checkpoint"), model_cfg), processor, cfg, device)
    (out_dir / "metrics.json").write_text(json.dumps({"baseline": baseline_metrics, "fp8": fp8_metrics}, indent=1))
    return StageOutput(files={"metrics": "metrics.json"}, meta={"metrics": len(fp8_metrics)},
                       shown={"fakequant_metrics": "metrics"})

"""Stage evaluate: CLIP_benchmark zero-shot classification and retrieval, baseline vs fake-quantized FP8.

The baseline's metrics come from ``evaluate_baseline`` (keyed on the model, so a re-quantization reuses them);
both models see the same data through CLIP_benchmark's own ``evaluate`` functions, which need only
``encode_image``/``encode_text``. ``amp=False``: autocast would re-round the fake-quant graph and
blur the comparison. The gate compares each metric's drop (baseline - FP8) with
``evaluation.max_drop`` (patterns over ``dataset/task/metric`` names; ``*`` is the default); every
metric CLIP_benchmark reports here (accuracy, recall@k, mean per-class recall) is higher-is-better.
"""

from __future__ import annotations

import fnmatch
import json
import math
from pathlib import Path

from clip_fp8 import synthetic
from clip_fp8.artifacts import ArtifactRef
from clip_fp8.config import EMBEDDED_DATA, EvaluationConfig, ModelConfig
from clip_fp8.errors import PipelineInputError, QualityGateError, collected
from clip_fp8.stage import StageOutput
from clip_fp8.tasks.checkpoints import load_processor, load_quantized, pick_device
from clip_fp8.tasks.eval_datasets import (
    ShapesCaptions, ShapesClassification, build_clip_benchmark_dataset, dataset_task, limited, make_tokenizer,
    make_transform,
)


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


def allowed_drop(metric: str, max_drop: dict[str, float]) -> float:
    """The most specific matching pattern wins (exact name beats wildcards; longer pattern beats shorter)."""
    if metric in max_drop:
        return max_drop[metric]
    matches = [p for p in max_drop if fnmatch.fnmatchcase(metric, p)]
    return max_drop[max(matches, key=len)] if matches else math.inf


def quality_gate(baseline: dict[str, float], fp8: dict[str, float], cfg: EvaluationConfig) -> dict:
    """Each metric's drop (baseline - FP8) against its limit; failures worst first (by how far over)."""
    rows, over = [], []
    for metric, base in baseline.items():
        value = fp8[metric]
        if math.isnan(base) or math.isnan(value):
            continue
        drop = base - value
        limit = allowed_drop(metric, cfg.max_drop)
        ok = drop <= limit + 1e-12
        rows.append({"metric": metric, "baseline": base, "fp8": value, "delta": value - base, "max_drop": limit, "passed": ok})
        if not ok:
            over.append((drop - limit, f"{metric}: {base:.4f} -> {value:.4f} (drop {drop:.4f} > max_drop {limit})"))
    failures = [text for _, text in sorted(over, key=lambda o: -o[0])]
    return {"rows": rows, "failures": failures, "passed": not failures}


def metrics_markdown(gate: dict) -> str:
    lines = ["## Quality (CLIP_benchmark, fake-quant FP8 vs baseline)", "",
             "| metric | baseline | FP8 | delta | max drop | gate |", "|---|---|---|---|---|---|"]
    for r in gate["rows"]:
        lines.append(f"| {r['metric']} | {r['baseline']:.4f} | {r['fp8']:.4f} | {r['delta']:+.4f} | "
                     f"{r['max_drop']} | {'pass' if r['passed'] else '**FAIL**'} |")
    return "\n".join(lines) + "\n"


def evaluate(model_source: ArtifactRef, quantized: ArtifactRef, baseline: ArtifactRef, eval_source: ArtifactRef,
             model_cfg: ModelConfig, cfg: EvaluationConfig, out_dir: Path) -> StageOutput:
    """Evaluate FP8 on every dataset, apply the gate against ``baseline`` (``evaluate_baseline``'s metrics, the
    same datasets and settings); ``on_gate_failure=fail`` raises."""
    processor, device = load_processor(model_source.path), pick_device(model_cfg)
    baseline_metrics = json.loads(baseline.file("metrics").read_text())
    fp8_metrics = evaluate_model(load_quantized(quantized.file("checkpoint"), model_cfg), processor, cfg, device)
    gate = quality_gate(baseline_metrics, fp8_metrics, cfg)
    reports = {"quality-gate": metrics_markdown(gate)}
    if not gate["passed"] and cfg.on_gate_failure == "fail":
        raise collected(QualityGateError, "quality gate failed", gate["failures"], reports)
    result = {"baseline": baseline_metrics, "fp8": fp8_metrics, "gate": gate, "promotable": gate["passed"]}
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=1))
    return StageOutput(files={"metrics": "metrics.json"}, reports=reports,
                       meta={"promotable": gate["passed"], "failures": gate["failures"]})

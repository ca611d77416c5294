"""Quality: CLIP_benchmark zero-shot classification and retrieval, baseline vs fake-quantized FP8.

Both models see the same data through CLIP_benchmark's own ``evaluate`` functions, which need only
``encode_image``/``encode_text``. ``amp=False``: autocast would re-round the fake-quant graph and
blur the comparison. The gate compares each metric's drop (baseline - FP8) with
``evaluation.max_drop`` (patterns over ``task/metric`` names; ``*`` is the default).
"""

from __future__ import annotations

import fnmatch
import math

from clip_fp8 import synthetic
from clip_fp8.config import EvaluationConfig
from clip_fp8.errors import PipelineInputError

HIGHER_IS_BETTER = True  # every metric CLIP_benchmark reports here: accuracy, recall@k, mean per-class recall


class ShapesClassification:
    """Embedded zero-shot classification set, in the (image tensor, label) form CLIP_benchmark reads."""

    def __init__(self, seed: int, n: int, transform):
        self.seed, self.n, self.transform = seed, n, transform
        self.classes = synthetic.CLASSNAMES

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        s = synthetic.make_sample(self.seed, i)
        return self.transform(s.image), s.label


class ShapesCaptions(ShapesClassification):
    """Embedded retrieval set: (image tensor, [caption]) pairs, as mscoco_captions yields them."""

    def __getitem__(self, i: int):
        s = synthetic.make_sample(self.seed, i)
        return self.transform(s.image), [s.caption]


def make_transform(processor):
    def transform(image):
        return processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0]

    return transform


def make_tokenizer(processor):
    context = processor.tokenizer.model_max_length

    def tokenize(texts: list[str]):
        return processor.tokenizer(list(texts), padding="max_length", truncation=True, max_length=context,
                                   return_tensors="pt")["input_ids"]

    return tokenize


def evaluate_model(model, processor, cfg: EvaluationConfig, device: str) -> dict[str, float]:
    """Run the configured CLIP_benchmark tasks on one model; metrics keyed ``task/metric``."""
    import torch
    from clip_benchmark.datasets.builder import image_captions_collate_fn
    from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval

    from clip_fp8.encoders import BenchmarkModel

    if cfg.dataset != "embedded:shapes":
        raise PipelineInputError(f"evaluation.dataset '{cfg.dataset}' is not supported yet; use 'embedded:shapes'")
    wrapped = BenchmarkModel(model)
    transform, tokenizer = make_transform(processor), make_tokenizer(processor)
    metrics: dict[str, float] = {}
    if "zeroshot_classification" in cfg.tasks:
        data = ShapesClassification(cfg.seed, cfg.num_samples, transform)
        loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size)
        result = zeroshot_classification.evaluate(
            wrapped, loader, tokenizer, data.classes, synthetic.TEMPLATES, device, amp=False)
        metrics.update({f"zeroshot_classification/{k}": float(v) for k, v in result.items()})
    if "zeroshot_retrieval" in cfg.tasks:
        data = ShapesCaptions(cfg.seed + 1, cfg.num_samples, transform)
        loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, collate_fn=image_captions_collate_fn)
        result = zeroshot_retrieval.evaluate(wrapped, loader, tokenizer, device, amp=False, recall_k_list=cfg.recall_k)
        metrics.update({f"zeroshot_retrieval/{k}": float(v) for k, v in result.items()})
    return metrics


def allowed_drop(metric: str, max_drop: dict[str, float]) -> float:
    """The most specific matching pattern wins (exact name beats wildcards; longer pattern beats shorter)."""
    if metric in max_drop:
        return max_drop[metric]
    matches = [p for p in max_drop if fnmatch.fnmatchcase(metric, p)]
    return max_drop[max(matches, key=len)] if matches else math.inf


def quality_gate(baseline: dict[str, float], fp8: dict[str, float], cfg: EvaluationConfig) -> dict:
    rows, failures = [], []
    for metric, base in baseline.items():
        value = fp8[metric]
        if math.isnan(base) or math.isnan(value):
            continue
        drop = base - value
        limit = allowed_drop(metric, cfg.max_drop)
        ok = drop <= limit + 1e-12
        rows.append({"metric": metric, "baseline": base, "fp8": value, "delta": value - base, "max_drop": limit, "passed": ok})
        if not ok:
            failures.append(f"{metric}: {base:.4f} -> {value:.4f} (drop {drop:.4f} > {limit})")
    return {"rows": rows, "failures": failures, "passed": not failures}


def metrics_markdown(gate: dict) -> str:
    lines = ["## Quality (CLIP_benchmark, fake-quant FP8 vs baseline)", "",
             "| metric | baseline | FP8 | delta | max drop | gate |", "|---|---|---|---|---|---|"]
    for r in gate["rows"]:
        lines.append(f"| {r['metric']} | {r['baseline']:.4f} | {r['fp8']:.4f} | {r['delta']:+.4f} | "
                     f"{r['max_drop']} | {'pass' if r['passed'] else '**FAIL**'} |")
    return "\n".join(lines) + "\n"

"""Quality: CLIP_benchmark zero-shot classification and retrieval, baseline vs fake-quantized FP8.

Both models see the same data through CLIP_benchmark's own ``evaluate`` functions, which need only
``encode_image``/``encode_text``. ``amp=False``: autocast would re-round the fake-quant graph and
blur the comparison. The gate compares each metric's drop (baseline - FP8) with
``evaluation.max_drop`` (patterns over ``task/metric`` names; ``*`` is the default).
"""

from __future__ import annotations

import fnmatch
import math

from pathlib import Path

from clip_fp8 import synthetic
from clip_fp8.artifacts import ArtifactRef, sha256_file, sha256_json
from clip_fp8.config import EvaluationConfig
from clip_fp8.errors import PipelineInputError

RETRIEVAL_DATASETS = {"mscoco_captions", "flickr8k", "flickr30k", "multilingual_mscoco_captions"}


def resolve_eval_source(cfg: EvaluationConfig) -> ArtifactRef:
    """Fingerprint the evaluation data by content (file names, sizes, annotation digest), never by path."""
    import inspect

    if cfg.dataset == "embedded:shapes":
        return ArtifactRef(stage="eval_source", path="", digest=sha256_json(inspect.getsource(synthetic)),
                           meta={"dataset": cfg.dataset})
    if not cfg.root:
        raise PipelineInputError(
            f"evaluation.dataset '{cfg.dataset}' needs evaluation.root: a local folder in CLIP_benchmark's layout "
            f"(on a connected machine: `clip_benchmark eval --dataset {cfg.dataset} --dataset_root DIR` downloads it)")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise PipelineInputError(f"evaluation.root '{cfg.root}' does not exist")
    annotation = _annotation_file(cfg, root)
    listing = sorted((p.relative_to(root).as_posix(), p.stat().st_size) for p in root.rglob("*") if p.is_file())
    return ArtifactRef(stage="eval_source", path=str(root.resolve()),
                       digest=sha256_json({"files": listing, "annotation": sha256_file(annotation) if annotation else None}),
                       meta={"dataset": cfg.dataset, "files": len(listing)})


def _annotation_file(cfg: EvaluationConfig, root: Path) -> Path | None:
    if cfg.dataset != "mscoco_captions":
        return None
    path = Path(cfg.annotation_file).expanduser() if cfg.annotation_file else root / f"coco_{cfg.split}_karpathy.json"
    if not path.is_file():
        raise PipelineInputError(f"evaluation.annotation_file '{path}' does not exist (mscoco_captions needs the captions "
                                 "JSON; CLIP_benchmark would download coco_<split>_karpathy.json into the root)")
    return path


def dataset_task(cfg: EvaluationConfig) -> str:
    if cfg.dataset in RETRIEVAL_DATASETS:
        return "zeroshot_retrieval"
    if cfg.dataset.startswith("wds/") and cfg.root:
        kind = Path(cfg.root).expanduser() / "dataset_type.txt"
        if kind.is_file() and kind.read_text().strip().lower() == "retrieval":
            return "zeroshot_retrieval"
    return "zeroshot_classification"


def build_clip_benchmark_dataset(cfg: EvaluationConfig, transform):
    """CLIP_benchmark's own loader, classnames and templates, from a local root (download=False)."""
    from clip_benchmark.datasets.builder import build_dataset

    root = Path(cfg.root).expanduser()
    if cfg.dataset == "mscoco_captions":
        folder = root / ("train2014" if cfg.split == "train" else "val2014")
        if not folder.is_dir():  # CLIP_benchmark would wget the 6 GB zip here
            raise PipelineInputError(f"evaluation.root '{cfg.root}' has no {folder.name}/ folder of COCO images")
    try:
        return build_dataset(cfg.dataset, root=str(root), transform=transform, split=cfg.split, download=False,
                             annotation_file=str(_annotation_file(cfg, root) or "") or None, task=dataset_task(cfg))
    except (RuntimeError, FileNotFoundError, ValueError, AssertionError) as exc:
        raise PipelineInputError(
            f"evaluation.dataset '{cfg.dataset}' could not be read from evaluation.root '{cfg.root}' "
            f"({type(exc).__name__}: {str(exc)[:160]}); it must be in CLIP_benchmark's layout for that dataset") from None


def limited(dataset, n: int, seed: int):
    """At most ``n`` samples, a seeded subset for map-style datasets, the first ``n`` for streams."""
    import numpy as np
    import torch

    if hasattr(dataset, "__len__") and not isinstance(dataset, torch.utils.data.IterableDataset):
        if len(dataset) <= n:
            return dataset
        indices = np.random.default_rng(seed).permutation(len(dataset))[:n]
        subset = torch.utils.data.Subset(dataset, sorted(int(i) for i in indices))
    else:
        class First(torch.utils.data.IterableDataset):
            def __iter__(self):
                for i, item in enumerate(dataset):
                    if i == n:
                        return
                    yield item

        subset = First()
    # CLIP_benchmark's evaluators read these off the loader's dataset.
    subset.classes, subset.templates = getattr(dataset, "classes", None), getattr(dataset, "templates", None)
    return subset

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

    wrapped = BenchmarkModel(model)
    transform, tokenizer = make_transform(processor), make_tokenizer(processor)
    metrics: dict[str, float] = {}
    if cfg.dataset != "embedded:shapes":
        task = dataset_task(cfg)
        if task not in cfg.tasks:
            raise PipelineInputError(f"evaluation.tasks {cfg.tasks} does not include {task}, the task "
                                     f"evaluation.dataset '{cfg.dataset}' is for")
        full = build_clip_benchmark_dataset(cfg, transform)
        data = limited(full, cfg.num_samples, cfg.seed)
        if task == "zeroshot_classification":
            loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size)
            result = zeroshot_classification.evaluate(wrapped, loader, tokenizer, full.classes, full.templates, device, amp=False)
        else:
            loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, collate_fn=image_captions_collate_fn)
            result = zeroshot_retrieval.evaluate(wrapped, loader, tokenizer, device, amp=False, recall_k_list=cfg.recall_k)
        return {f"{task}/{k}": float(v) for k, v in result.items()}
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

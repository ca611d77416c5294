"""Evaluation datasets: the embedded shapes sets and CLIP_benchmark's own loaders from a local root.

Every dataset is fingerprinted by content (file names, sizes, annotation digest), never by path, and
read by CLIP_benchmark's ``build_dataset`` with ``download=False``: nothing is fetched at run time.
"""

from __future__ import annotations

import os
from pathlib import Path

from clip_fp8 import synthetic
from clip_fp8.artifacts import ArtifactRef, sha256_file, sha256_json
from clip_fp8.config import EMBEDDED_DATA, EvalDataset, EvaluationConfig
from clip_fp8.errors import PipelineInputError

RETRIEVAL_DATASETS = {"mscoco_captions", "flickr8k", "flickr30k", "multilingual_mscoco_captions"}


def resolve_eval_source(cfg: EvaluationConfig) -> ArtifactRef:
    """Fingerprint every evaluation dataset by content (file names, sizes, annotation digest), never by path."""
    parts, roots = [], []
    for index, ds in enumerate(cfg.datasets):
        if ds.name == EMBEDDED_DATA:
            parts.append({"name": ds.name, "source": synthetic.digest()})
            continue
        root = _root(ds, index)
        annotation = _annotation_file(ds, root, index)
        listing = sorted((p.relative_to(root).as_posix(), p.stat().st_size) for p in root.rglob("*") if p.is_file())
        parts.append({"name": ds.name, "split": ds.split, "files": listing,
                      "annotation": sha256_file(annotation) if annotation else None})
        roots.append(str(root.resolve()))
    return ArtifactRef(stage="eval_source", path=os.pathsep.join(roots), digest=sha256_json(parts),
                       meta={"datasets": [ds.name for ds in cfg.datasets]})


def _root(ds: EvalDataset, index: int) -> Path:
    if not ds.root:
        raise PipelineInputError(
            f"evaluation.datasets[{index}] '{ds.name}' needs a root: a local folder in CLIP_benchmark's layout "
            f"(on a connected machine: `clip_benchmark eval --dataset {ds.name} --dataset_root DIR` downloads it)")
    root = Path(ds.root).expanduser()
    if not root.is_dir():
        raise PipelineInputError(f"evaluation.datasets[{index}] '{ds.name}': root '{ds.root}' does not exist")
    return root


def _annotation_file(ds: EvalDataset, root: Path, index: int) -> Path | None:
    if ds.name != "mscoco_captions":
        return None
    path = Path(ds.annotation_file).expanduser() if ds.annotation_file else root / f"coco_{ds.split}_karpathy.json"
    if not path.is_file():
        raise PipelineInputError(
            f"evaluation.datasets[{index}] 'mscoco_captions': annotation_file '{path}' does not exist (it needs the "
            "captions JSON; CLIP_benchmark would download coco_<split>_karpathy.json into the root)")
    return path


def dataset_task(ds: EvalDataset) -> str:
    if ds.name in RETRIEVAL_DATASETS:
        return "zeroshot_retrieval"
    if ds.name.startswith("wds/") and ds.root:
        kind = Path(ds.root).expanduser() / "dataset_type.txt"
        if kind.is_file() and kind.read_text().strip().lower() == "retrieval":
            return "zeroshot_retrieval"
    return "zeroshot_classification"


def build_clip_benchmark_dataset(ds: EvalDataset, index: int, transform):
    """CLIP_benchmark's own loader, classnames and templates, from a local root (download=False)."""
    from clip_benchmark.datasets.builder import build_dataset

    root = _root(ds, index)
    where = f"evaluation.datasets[{index}] '{ds.name}'"
    if ds.name == "mscoco_captions":
        folder = root / ("train2014" if ds.split == "train" else "val2014")
        if not folder.is_dir():  # CLIP_benchmark would wget the 6 GB zip here
            raise PipelineInputError(f"{where}: root '{ds.root}' has no {folder.name}/ folder of COCO images")
    try:
        return build_dataset(ds.name, root=str(root), transform=transform, split=ds.split, download=False,
                             annotation_file=str(_annotation_file(ds, root, index) or "") or None, task=dataset_task(ds))
    except (RuntimeError, FileNotFoundError, ValueError, AssertionError) as exc:
        hint = "it must be in CLIP_benchmark's layout for that dataset"
        if ds.name in ("cifar10", "cifar100"):
            # torchvision compares each file's MD5 with the official release: re-packed files never load.
            hint = (f"torchvision reads only the official {ds.name}-python release files (it checks their MD5s); "
                    f"for any other copy use CLIP_benchmark's WebDataset form: `clip_benchmark_export_wds` "
                    f"and evaluation dataset 'wds/{ds.name}'")
        raise PipelineInputError(
            f"{where} could not be read from root '{ds.root}' ({type(exc).__name__}: {str(exc)[:160]}); {hint}") from None


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

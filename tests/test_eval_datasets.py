"""Evaluation through CLIP_benchmark's own loaders, classnames and templates, from local roots in its layouts."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch

from clip_fp8 import synthetic
from clip_fp8.config import EvaluationConfig
from clip_fp8.errors import PipelineInputError
from tasks.evaluate import evaluate_model, resolve_eval_source
from tasks.model import EMBEDDED_MODELS, load_clip, load_processor
from tests.conftest import write_coco_folder

WNIDS = ["n01440764", "n01443537", "n01484850"]  # ImageNet's first three classes: tench, goldfish, great white shark


def write_imagenet(root: Path, per_class: int = 4) -> Path:
    """torchvision's ImageNet layout: meta.bin (wnid -> names, val wnids) and val/<wnid>/*.JPEG."""
    names = {w: (n,) for w, n in zip(WNIDS, ["tench", "goldfish", "great white shark"])}
    for c, wnid in enumerate(WNIDS):
        (root / "val" / wnid).mkdir(parents=True)
        for i in range(per_class):
            synthetic.make_sample(9, c * per_class + i).image.save(root / "val" / wnid / f"ILSVRC2012_val_{c:04d}{i:04d}.JPEG")
    torch.save((names, [w for w in WNIDS for _ in range(per_class)]), root / "meta.bin")
    return root


def write_wds_classification(root: Path) -> Path:
    """CLIP_benchmark's WebDataset layout: <split>/{0..n-1}.tar with .webp/.cls, nshards.txt, classnames, templates."""
    (root / "test").mkdir(parents=True)
    (root / "test" / "nshards.txt").write_text("1")
    (root / "classnames.txt").write_text("\n".join(synthetic.CLASSNAMES) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na drawing of a {c}.\n")
    with tarfile.open(root / "test" / "0.tar", "w") as tar:
        for i in range(12):
            sample = synthetic.make_sample(11, i)
            buf = io.BytesIO()
            sample.image.save(buf, format="WEBP")
            for name, data in ((f"s{i:04d}.webp", buf.getvalue()), (f"s{i:04d}.cls", str(sample.label).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return root


@pytest.fixture(scope="module")
def tiny():
    path = EMBEDDED_MODELS["tiny-clip-shapes"]
    from clip_fp8.config import ModelConfig

    return load_clip(path, ModelConfig()), load_processor(path)


def test_imagenet1k_runs_with_its_1000_classnames_and_80_templates(tiny, tmp_path):
    from clip_benchmark.datasets.builder import build_dataset

    root = write_imagenet(tmp_path / "imagenet")
    cfg = EvaluationConfig(dataset="imagenet1k", root=str(root), tasks=["zeroshot_classification"], num_samples=8, batch_size=5)
    full = build_dataset("imagenet1k", root=str(root), split="test", download=False)
    assert len(full.classes) == 1000 and len(full.templates) == 80
    metrics = evaluate_model(*tiny, cfg, "cpu")
    assert set(metrics) == {"zeroshot_classification/acc1", "zeroshot_classification/acc5",
                            "zeroshot_classification/mean_per_class_recall"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())


def test_mscoco_captions_retrieval_with_partial_batches(tiny, tmp_path):
    root = write_coco_folder(tmp_path / "coco", n_images=7, split="val2014")
    cfg = EvaluationConfig(dataset="mscoco_captions", root=str(root), annotation_file=str(root / "annotations" / "captions_val2014.json"),
                           tasks=["zeroshot_retrieval"], num_samples=7, batch_size=3)  # 3 + 3 + 1
    metrics = evaluate_model(*tiny, cfg, "cpu")
    assert set(metrics) == {"zeroshot_retrieval/image_retrieval_recall@1", "zeroshot_retrieval/text_retrieval_recall@1",
                            "zeroshot_retrieval/image_retrieval_recall@5", "zeroshot_retrieval/text_retrieval_recall@5"}
    assert metrics["zeroshot_retrieval/image_retrieval_recall@5"] >= metrics["zeroshot_retrieval/image_retrieval_recall@1"]


def test_webdataset_classification_reads_its_own_classnames_and_templates(tiny, tmp_path):
    root = write_wds_classification(tmp_path / "wds")
    cfg = EvaluationConfig(dataset="wds/shapes", root=str(root), tasks=["zeroshot_classification"], num_samples=10, batch_size=4)
    metrics = evaluate_model(*tiny, cfg, "cpu")
    assert metrics["zeroshot_classification/acc1"] >= 0.8  # the embedded model knows these shapes


def test_eval_source_digest_and_errors(tiny, tmp_path):
    root = write_imagenet(tmp_path / "a")
    cfg = EvaluationConfig(dataset="imagenet1k", root=str(root), tasks=["zeroshot_classification"])
    digest = resolve_eval_source(cfg).digest
    import shutil

    shutil.copytree(root, tmp_path / "b")
    assert resolve_eval_source(cfg.model_copy(update={"root": str(tmp_path / "b")})).digest == digest
    synthetic.make_sample(9, 99).image.save(tmp_path / "b" / "val" / WNIDS[0] / "extra.JPEG")
    assert resolve_eval_source(cfg.model_copy(update={"root": str(tmp_path / "b")})).digest != digest

    with pytest.raises(PipelineInputError, match="needs evaluation.root"):
        resolve_eval_source(EvaluationConfig(dataset="cifar100"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineInputError, match=r"'cifar100' could not be read from evaluation.root"):
        evaluate_model(*tiny, EvaluationConfig(dataset="cifar100", root=str(tmp_path / "empty"), tasks=["zeroshot_classification"]), "cpu")
    with pytest.raises(PipelineInputError, match="does not include zeroshot_retrieval"):
        evaluate_model(*tiny, EvaluationConfig(dataset="mscoco_captions", root=str(tmp_path / "empty"), tasks=["zeroshot_classification"]), "cpu")

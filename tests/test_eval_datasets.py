"""Evaluation through CLIP_benchmark's own loaders, classnames and templates, from local roots in its layouts."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import pytest
import torch

from clip_fp8 import synthetic
from clip_fp8.config import EvalDataset, EvaluationConfig
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


# CIFAR-100's fine labels, in label order (the `meta` file of the python release).
CIFAR100_CLASSES = """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can
castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin elephant flatfish
forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain
mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit
raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower
sweet_pepper table tank telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman
worm""".split()


def cifar_images(n: int):
    """32x32 RGB images with labels spread over the 100 classes."""
    return [(synthetic.make_sample(13, i).image.resize((32, 32)), (7 * i) % 100) for i in range(n)]


def write_cifar100_python(root: Path, n: int = 10) -> Path:
    """The CIFAR-100 python release's layout and format: cifar-100-python/{meta,test,train} pickles."""
    import numpy as np

    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    pairs = cifar_images(n)
    data = np.stack([np.asarray(img).transpose(2, 0, 1).reshape(-1) for img, _ in pairs]).astype(np.uint8)
    batch = {"filenames": [f"img_{i}.png" for i in range(n)], "batch_label": "testing batch 1 of 1",
             "fine_labels": [label for _, label in pairs], "coarse_labels": [label // 5 for _, label in pairs], "data": data}
    for name in ("test", "train"):
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": CIFAR100_CLASSES,
                                               "coarse_label_names": [f"superclass_{i}" for i in range(20)]}))
    return root


def write_wds_cifar100(root: Path, n: int = 10) -> Path:
    """CIFAR-100 in CLIP_benchmark's WebDataset form, written by CLIP_benchmark's own converter (what
    `clip_benchmark_export_wds` calls) with CIFAR-100's classnames and CLIP_benchmark's 18 templates. The
    converter forks 8 DataLoader workers; it runs in a fresh process, as the CLI would, not in the test's."""
    import subprocess
    import sys

    script = f"""
import json, sys
from pathlib import Path
import clip_benchmark.datasets
from clip_benchmark.webdataset_builder import PIL_to_bytes, convert_dataset
from tests.test_eval_datasets import CIFAR100_CLASSES, cifar_images

templates = json.loads((Path(clip_benchmark.datasets.__file__).parent / "en_zeroshot_classification_templates.json").read_text())["cifar100"]

class Cifar(list):
    classes, templates = CIFAR100_CLASSES, templates

convert_dataset(Cifar(cifar_images({n})), "test", {str(root)!r}, transform=PIL_to_bytes("webp"), verbose=False)
"""
    run = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parent.parent, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return root


@pytest.fixture(scope="module")
def tiny():
    path = EMBEDDED_MODELS["tiny-clip-shapes"]
    from clip_fp8.config import ModelConfig

    return load_clip(path, ModelConfig()), load_processor(path)


def test_mscoco_captions_retrieval_with_partial_batches(tiny, tmp_path):
    root = write_coco_folder(tmp_path / "coco", n_images=7, split="val2014")
    coco = EvalDataset(name="mscoco_captions", root=str(root), annotation_file=str(root / "annotations" / "captions_val2014.json"))
    cfg = EvaluationConfig(datasets=[coco], tasks=["zeroshot_retrieval"], num_samples=7, batch_size=3)  # 3 + 3 + 1
    metrics = evaluate_model(*tiny, cfg, "cpu")
    prefix = "mscoco_captions/zeroshot_retrieval/"
    assert set(metrics) == {prefix + m for m in ("image_retrieval_recall@1", "text_retrieval_recall@1",
                                                 "image_retrieval_recall@5", "text_retrieval_recall@5")}
    assert metrics[prefix + "image_retrieval_recall@5"] >= metrics[prefix + "image_retrieval_recall@1"]


def test_webdataset_classification_reads_its_own_classnames_and_templates(tiny, tmp_path):
    root = write_wds_classification(tmp_path / "wds")
    cfg = EvaluationConfig(datasets=[EvalDataset(name="wds/shapes", root=str(root))], tasks=["zeroshot_classification"],
                           num_samples=10, batch_size=4)
    metrics = evaluate_model(*tiny, cfg, "cpu")
    assert metrics["wds/shapes/zeroshot_classification/acc1"] >= 0.8  # the embedded model knows these shapes


def test_cifar100_python_files_are_checked_and_the_error_names_the_way_out(tiny, tmp_path):
    # A copy in the release's exact format still fails torchvision's MD5 check: only the real files load.
    root = write_cifar100_python(tmp_path / "cifar")
    cfg = EvaluationConfig(datasets=[EvalDataset(name="cifar100", root=str(root))], tasks=["zeroshot_classification"])
    with pytest.raises(PipelineInputError, match=r"datasets\[0\] 'cifar100' could not be read .*checks their MD5s.*'wds/cifar100'"):
        evaluate_model(*tiny, cfg, "cpu")


def test_recipe_datasets_in_one_run_cifar100_imagenet1k_mscoco(tiny, tmp_path):
    """The recipe's three evaluations in one configuration, each through CLIP_benchmark's loader. Text batches
    are one class's templates: CIFAR-100's 18 and, for ImageNet's torchvision layout, 1,000 classnames x 80."""
    coco = write_coco_folder(tmp_path / "coco", n_images=5, split="val2014")
    cfg = EvaluationConfig(datasets=[
        EvalDataset(name="wds/cifar100", root=str(write_wds_cifar100(tmp_path / "wds_cifar100"))),
        EvalDataset(name="imagenet1k", root=str(write_imagenet(tmp_path / "imagenet", per_class=2))),
        EvalDataset(name="mscoco_captions", root=str(coco), annotation_file=str(coco / "annotations" / "captions_val2014.json")),
    ], num_samples=6, batch_size=4)
    model, processor = tiny
    text_batches: list[int] = []
    hook = model.text_model.register_forward_pre_hook(
        lambda module, args, kwargs: text_batches.append((kwargs.get("input_ids") if args == () else args[0]).shape[0]),
        with_kwargs=True)
    try:
        metrics = evaluate_model(model, processor, cfg, "cpu")
    finally:
        hook.remove()
    assert {m.rsplit("/", 1)[0] for m in metrics} == {"wds/cifar100/zeroshot_classification",
                                                      "imagenet1k/zeroshot_classification", "mscoco_captions/zeroshot_retrieval"}
    assert {m for m in metrics if m.startswith("imagenet1k/")} == {
        "imagenet1k/zeroshot_classification/acc1", "imagenet1k/zeroshot_classification/acc5",
        "imagenet1k/zeroshot_classification/mean_per_class_recall"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    # Zero-shot classifiers: 100 CIFAR classes x 18 templates, then 1,000 ImageNet classes x 80 templates.
    assert text_batches[:100] == [18] * 100 and text_batches[100:1100] == [80] * 1000


def test_eval_source_digest_and_errors(tiny, tmp_path):
    root = write_imagenet(tmp_path / "a")
    cfg = EvaluationConfig(datasets=[EvalDataset(name="imagenet1k", root=str(root))], tasks=["zeroshot_classification"])
    digest = resolve_eval_source(cfg).digest
    import shutil

    def at(path: Path) -> EvaluationConfig:
        return cfg.model_copy(update={"datasets": [EvalDataset(name="imagenet1k", root=str(path))]})

    shutil.copytree(root, tmp_path / "b")
    assert resolve_eval_source(at(tmp_path / "b")).digest == digest
    synthetic.make_sample(9, 99).image.save(tmp_path / "b" / "val" / WNIDS[0] / "extra.JPEG")
    assert resolve_eval_source(at(tmp_path / "b")).digest != digest
    # Adding a dataset changes the key; the embedded one contributes its generator.
    both = cfg.model_copy(update={"datasets": [EvalDataset(), EvalDataset(name="imagenet1k", root=str(root))]})
    assert resolve_eval_source(both).digest != digest

    with pytest.raises(PipelineInputError, match=r"datasets\[0\] 'cifar100' needs a root"):
        resolve_eval_source(EvaluationConfig(datasets=[EvalDataset(name="cifar100")]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineInputError, match=r"'cifar100' could not be read from root"):
        evaluate_model(*tiny, EvaluationConfig(datasets=[EvalDataset(name="cifar100", root=str(tmp_path / "empty"))],
                                               tasks=["zeroshot_classification"]), "cpu")
    with pytest.raises(PipelineInputError, match=r"does not include zeroshot_retrieval, the task of evaluation.datasets\[1\]"):
        evaluate_model(*tiny, EvaluationConfig(datasets=[EvalDataset(), EvalDataset(name="mscoco_captions", root=str(tmp_path / "empty"))],
                                               tasks=["zeroshot_classification"]), "cpu")
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="names 'imagenet1k' more than once"):
        EvaluationConfig(datasets=[EvalDataset(name="imagenet1k", root="a"), EvalDataset(name="imagenet1k", root="b")])

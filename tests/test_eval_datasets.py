"""Evaluation through CLIP_benchmark's own loaders, classnames and templates, from local roots in its layouts."""

from __future__ import annotations

from pathlib import Path

import pytest

from clip_fp8 import synthetic
from clip_fp8.config import EvalDataset, EvaluationConfig
from clip_fp8.errors import PipelineInputError
from clip_fp8.tasks.eval_datasets import resolve_eval_source
from clip_fp8.tasks.evaluate import evaluate_model
from clip_fp8.tasks.checkpoints import EMBEDDED_MODELS, load_clip, load_processor
from data_fixtures import WNIDS, write_cifar100_python, write_coco_folder, write_imagenet, write_wds_cifar100, write_wds_classification

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


@pytest.mark.slow
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


def test_the_evaluation_seed_picks_the_subset_and_the_same_seed_the_same_one():
    """evaluation.seed keys the evaluation: it must change which samples are evaluated, and only it."""
    import torch

    from clip_fp8.tasks.eval_datasets import limited

    data = torch.utils.data.TensorDataset(torch.arange(100))
    pick = lambda seed: sorted(int(x[0]) for x in limited(data, 10, seed))
    assert pick(1) == pick(1) and pick(1) != pick(2)
    assert len(pick(1)) == 10 and len(set(pick(1))) == 10

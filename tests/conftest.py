"""Shared fixtures: a real Prefect test server, fresh stores, small real-format data fixtures."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# No run ever reaches a hub: the loaders must work (and fail clearly) offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def prefect_server():
    """A fresh Prefect database for the session. Result storage is not part of the harness, so every
    test gives the flow its own ``output.root``: cache records live there, beside the artifacts."""
    try:
        from prefect.testing.utilities import prefect_test_harness
    except ImportError:  # GPU hosts run only the `gpu` tests, which need no Prefect
        yield
        return
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def fast_config(tmp_path):
    """The embedded default with calibration and evaluation cut down for tests that probe one behaviour."""
    from clip_fp8.config import PipelineConfig

    return PipelineConfig().with_overrides([
        f"output.root={tmp_path / 'out'}",
        "calibration.num_samples=256", "calibration.batch_size=128",
        "evaluation.num_samples=200", "evaluation.batch_size=100",
    ])


def write_coco_folder(root: Path, n_images: int, split: str = "train2017", corrupt: int = 0) -> Path:
    """A COCO folder in the real layout: <split>/<12-digit id>.jpg and annotations/captions_<split>.json."""
    from clip_fp8 import synthetic

    (root / split).mkdir(parents=True)
    (root / "annotations").mkdir()
    images, annotations = [], []
    for i in range(n_images):
        sample = synthetic.make_sample(7, i)
        name = f"{i + 1:012d}.jpg"
        if i < corrupt:
            (root / split / name).write_bytes(b"not a jpeg")
        else:
            sample.image.save(root / split / name, quality=90)
        images.append({"id": i + 1, "file_name": name, "height": 64, "width": 64, "license": 1,
                       "coco_url": "", "flickr_url": "", "date_captured": "2013-11-14 11:18:45"})
        for j, caption in enumerate([sample.caption, f"{sample.caption}."]):
            annotations.append({"id": 1000 * (i + 1) + j, "image_id": i + 1, "caption": caption})
    data = {"info": {"description": "clip-fp8 test fixture"}, "licenses": [], "images": images, "annotations": annotations}
    (root / "annotations" / f"captions_{split}.json").write_text(json.dumps(data))
    return root

"""Calibration data in its real formats: a captions CSV/JSONL folder, WebDataset shards, a `datasets` dataset on disk."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from clip_fp8 import synthetic
from clip_fp8.config import CalibrationConfig
from clip_fp8.errors import PipelineInputError
from clip_fp8.tasks.calibration_data import select_pairs
from clip_fp8.tasks.calibration_sources import iter_calibration_batches, resolve_data_source
from clip_fp8.tasks.checkpoints import EMBEDDED_MODELS, load_processor

N = 12


def jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    synthetic.make_sample(5, i).image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def caption(i: int) -> str:
    return synthetic.make_sample(5, i).caption


def write_folder(root: Path, table: str) -> Path:
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(N):
        (root / "images" / f"{i:04d}.jpg").write_bytes(jpeg(i))
        rows.append({"image": f"images/{i:04d}.jpg", "caption": caption(i)})
    if table == "csv":
        lines = ["image,caption"] + [f'{r["image"]},"{r["caption"]}"' for r in rows]
        (root / "captions.csv").write_text("\n".join(lines) + "\n")
    else:
        (root / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def write_shards(root: Path, per_shard: int = 6) -> Path:
    """WebDataset layout: shard-000000.tar holding <key>.jpg + <key>.txt (and one .json caption)."""
    root.mkdir(parents=True)
    for shard in range(N // per_shard):
        with tarfile.open(root / f"shard-{shard:06d}.tar", "w") as tar:
            for i in range(shard * per_shard, (shard + 1) * per_shard):
                text = caption(i).encode() if i % 5 else json.dumps({"caption": caption(i)}).encode()
                for name, data in ((f"{i:08d}.jpg", jpeg(i)), (f"{i:08d}.{'txt' if i % 5 else 'json'}", text)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return root


def write_hf_dataset(root: Path) -> Path:
    import datasets
    from datasets import Dataset, DatasetDict, Features, Image, Sequence, Value

    features = Features({"img": Image(), "sentences": Sequence(Value("string"))})
    rows = {"img": [{"bytes": jpeg(i), "path": None} for i in range(N)], "sentences": [[caption(i), caption(i) + "."] for i in range(N)]}
    DatasetDict({"validation": Dataset.from_dict(rows, features=features)}).save_to_disk(str(root))
    assert datasets.load_from_disk(str(root))["validation"].num_rows == N
    return root


SOURCES = {
    "folder-csv": (lambda p: f"folder:{write_folder(p, 'csv')}", {}),
    "folder-jsonl": (lambda p: f"folder:{write_folder(p, 'jsonl')}", {}),
    "wds": (lambda p: f"wds:{write_shards(p)}", {}),
    "hf": (lambda p: f"hf:{write_hf_dataset(p)}", {"split": "validation", "image_column": "img", "caption_column": "sentences"}),
}


@pytest.mark.parametrize("kind", SOURCES)
def test_source_selects_seeded_pairs_and_feeds_the_processor(kind, tmp_path):
    make, extra = SOURCES[kind]
    cfg = CalibrationConfig(source=make(tmp_path / "data"), num_samples=8, seed=3, **extra)
    ref = resolve_data_source(cfg)
    manifest = select_pairs(ref, cfg)
    assert len(manifest["pairs"]) == 8 and manifest["skipped"] == 0
    assert manifest == select_pairs(ref, cfg)  # seeded: the same subset every time
    assert select_pairs(ref, cfg.model_copy(update={"seed": 4}))["pairs"] != manifest["pairs"]
    known = {caption(i) for i in range(N)} | {caption(i) + "." for i in range(N)}
    assert all(p["caption"] in known for p in manifest["pairs"])
    batches = list(iter_calibration_batches(manifest, ref.path, load_processor(EMBEDDED_MODELS["tiny-clip-shapes"]), 5))
    assert [len(b["pixel_values"]) for b in batches] == [5, 3]
    assert batches[0]["pixel_values"].shape[1:] == (3, 64, 64)  # the embedded model's processor size


@pytest.mark.parametrize("kind", ["folder-jsonl", "wds", "hf"])
def test_digest_follows_content_not_path(kind, tmp_path):
    make, extra = SOURCES[kind]
    source = make(tmp_path / "a")
    kind_prefix, location = source.split(":", 1)
    shutil.copytree(location, tmp_path / "b")
    digest = resolve_data_source(CalibrationConfig(source=source, **extra)).digest
    assert resolve_data_source(CalibrationConfig(source=f"{kind_prefix}:{tmp_path / 'b'}", **extra)).digest == digest
    if kind == "folder-jsonl":  # one caption edited
        table = tmp_path / "b" / "captions.jsonl"
        table.write_text(table.read_text().replace(caption(0), caption(0) + " edited", 1))
    elif kind == "wds":  # one image replaced
        write_shards(tmp_path / "c")
        shutil.copy(tmp_path / "c" / "shard-000001.tar", tmp_path / "b" / "shard-000000.tar")
    else:  # the dataset re-made with one row fewer
        import datasets

        ds = datasets.load_from_disk(str(tmp_path / "b"))
        datasets.DatasetDict({"validation": ds["validation"].select(range(N - 1))}).save_to_disk(str(tmp_path / "c"))
        shutil.rmtree(tmp_path / "b")
        shutil.move(tmp_path / "c", tmp_path / "b")
    assert resolve_data_source(CalibrationConfig(source=f"{kind_prefix}:{tmp_path / 'b'}", **extra)).digest != digest


def test_wrong_columns_missing_captions_and_offline_hub_are_named(tmp_path):
    hf = write_hf_dataset(tmp_path / "hf")
    with pytest.raises(PipelineInputError, match=r"calibration.image_column 'image' is not a column .*columns: img, sentences"):
        resolve_data_source(CalibrationConfig(source=f"hf:{hf}", split="validation", caption_column="sentences"))
    with pytest.raises(PipelineInputError, match="calibration.split 'train' is not in dataset"):
        resolve_data_source(CalibrationConfig(source=f"hf:{hf}", image_column="img", caption_column="sentences"))
    (tmp_path / "bare").mkdir()
    with pytest.raises(PipelineInputError, match="no captions.csv or captions.jsonl"):
        resolve_data_source(CalibrationConfig(source=f"folder:{tmp_path / 'bare'}"))
    with pytest.raises(PipelineInputError, match=r"could not be loaded .*save_to_disk"):
        resolve_data_source(CalibrationConfig(source="hf:clip-fp8-test/no-such-dataset"))


def test_unreadable_images_in_a_shard_are_skipped_and_counted(tmp_path):
    root = write_shards(tmp_path / "wds")
    with tarfile.open(root / "shard-000002.tar", "w") as tar:
        for name, data in (("bad.jpg", b"not a jpeg"), ("bad.txt", b"a broken image")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    cfg = CalibrationConfig(source=f"wds:{root}", num_samples=N, max_bad_fraction=0.2)
    manifest = select_pairs(resolve_data_source(cfg), cfg)
    assert manifest["skipped"] == 1 and manifest["skipped_examples"] == ["shard-000002.tar#bad.jpg (unreadable)"]

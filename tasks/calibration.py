"""Calibration data: a deterministic, seeded subset of image-caption pairs, and its batches.

The stage's artifact is a manifest (which pairs, with each image's content digest), not the
preprocessed tensors: 8,192 ViT-L/14 inputs are 2.4 GB in FP16, while the manifest is a few hundred
KB and pins the content just as well. Preprocessing runs inside quantization with the model's own
processor, batch by batch.

Sources:
- ``embedded:shapes``: generated on the fly (``clip_fp8.synthetic``); the generator is the data.
- ``coco:<folder>``: a COCO 2014/2017 folder, images plus ``annotations/captions_*.json``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from typing import Iterator

import numpy as np

from clip_fp8 import synthetic
from clip_fp8.artifacts import ArtifactRef, sha256_file, sha256_json
from clip_fp8.config import CalibrationConfig
from clip_fp8.errors import PipelineInputError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def resolve_data_source(cfg: CalibrationConfig) -> ArtifactRef:
    """Locate the source and fingerprint it cheaply (the stage digests the images it selects)."""
    kind, _, location = cfg.source.partition(":")
    if kind == "embedded" and location == "shapes":
        digest = hashlib.sha256(inspect.getsource(synthetic).encode()).hexdigest()
        return ArtifactRef(stage="data_source", path="", digest=digest, meta={"kind": "embedded", "source": cfg.source})
    if kind == "coco":
        folder = Path(location).expanduser()
        if not folder.is_dir():
            raise PipelineInputError(f"calibration.source '{cfg.source}': folder '{folder}' does not exist")
        captions = _find_captions_file(folder, cfg.captions_file, cfg.source)
        images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise PipelineInputError(f"calibration.source '{cfg.source}': no images (.jpg/.png/...) under '{folder}'")
        listing = [(p.relative_to(folder).as_posix(), p.stat().st_size) for p in images]
        digest = sha256_json({"captions": sha256_file(captions), "images": listing})
        return ArtifactRef(
            stage="data_source", path=str(folder.resolve()), digest=digest,
            files={"captions": str(captions.resolve().relative_to(folder.resolve()))},
            meta={"kind": "coco", "source": cfg.source, "images": len(images)},
        )
    raise PipelineInputError(
        f"calibration.source '{cfg.source}' is not a known source; use 'embedded:shapes' or 'coco:<folder>'"
    )


def _find_captions_file(folder: Path, captions_file: str | None, source: str) -> Path:
    if captions_file:
        path = Path(captions_file).expanduser()
        path = path if path.is_absolute() else folder / path
        if not path.is_file():
            raise PipelineInputError(f"calibration.captions_file '{captions_file}' does not exist")
        return path
    found = sorted(folder.glob("annotations/captions_*.json")) + sorted(folder.glob("captions*.json"))
    if not found:
        raise PipelineInputError(
            f"calibration.source '{source}': no captions JSON (annotations/captions_*.json); "
            "set calibration.captions_file"
        )
    return found[0]


def _coco_pairs(source: ArtifactRef) -> list[tuple[str, str]]:
    """Every (image path relative to the folder, caption) pair the captions JSON names and the folder holds."""
    folder = Path(source.path)
    captions_path = folder / source.files["captions"]
    try:
        data = json.loads(captions_path.read_text())
        images = {img["id"]: img["file_name"] for img in data["images"]}
        annotations = data["annotations"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise PipelineInputError(
            f"captions file '{captions_path}' is not COCO captions JSON (needs 'images' and 'annotations'): {exc}"
        ) from None
    split = captions_path.stem.removeprefix("captions_")
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES}
    by_name = {Path(rel).name: rel for rel in on_disk}
    pairs = []
    for ann in sorted(annotations, key=lambda a: a["id"]):
        name = images.get(ann["image_id"])
        if name is None:
            continue
        for candidate in (name, f"{split}/{name}", f"images/{name}"):
            if candidate in on_disk:
                pairs.append((candidate, ann["caption"].strip()))
                break
        else:
            if Path(name).name in by_name:
                pairs.append((by_name[Path(name).name], ann["caption"].strip()))
    return pairs


def select_calibration_pairs(source: ArtifactRef, cfg: CalibrationConfig) -> dict:
    """The manifest: ``cfg.num_samples`` pairs chosen by ``cfg.seed``, one caption per image."""
    from PIL import Image

    rng = np.random.default_rng(cfg.seed)
    if source.meta["kind"] == "embedded":
        return {
            "kind": "embedded", "seed": cfg.seed, "source_digest": source.digest, "skipped": 0,
            "pairs": [{"index": i, "caption": synthetic.make_sample(cfg.seed, i).caption} for i in range(cfg.num_samples)],
        }

    by_image: dict[str, list[str]] = {}
    for image, caption in _coco_pairs(source):
        by_image.setdefault(image, []).append(caption)
    images = sorted(by_image)
    if cfg.num_samples > len(images):
        raise PipelineInputError(
            f"calibration.num_samples={cfg.num_samples} exceeds the {len(images)} captioned images in "
            f"'{source.meta['source']}'; lower calibration.num_samples or add data"
        )
    folder = Path(source.path)
    pairs, skipped = [], []
    for i in rng.permutation(len(images)):
        if len(pairs) == cfg.num_samples:
            break
        rel = images[i]
        try:
            with Image.open(folder / rel) as img:
                img.convert("RGB").load()
        except Exception:
            skipped.append(rel)
            continue
        captions = by_image[rel]
        pairs.append({"image": rel, "sha256": sha256_file(folder / rel), "caption": captions[rng.integers(len(captions))]})
    bad_fraction = len(skipped) / max(1, len(pairs) + len(skipped))
    if bad_fraction > cfg.max_bad_fraction or len(pairs) < cfg.num_samples:
        raise PipelineInputError(
            f"calibration.source '{source.meta['source']}': {len(skipped)} unreadable images "
            f"(e.g. '{skipped[0] if skipped else '-'}'), {len(pairs)} usable of {cfg.num_samples} wanted; "
            f"fix the images or raise calibration.max_bad_fraction ({cfg.max_bad_fraction})"
        )
    return {"kind": "coco", "seed": cfg.seed, "source_digest": source.digest, "skipped": len(skipped),
            "skipped_examples": skipped[:20], "pairs": pairs}


def manifest_digest(manifest: dict) -> str:
    return sha256_json(manifest)


def iter_calibration_batches(manifest: dict, root: str, processor, batch_size: int) -> Iterator[dict]:
    """Preprocessed batches (``pixel_values``, ``input_ids``) in manifest order, via the model's processor."""
    from PIL import Image

    pairs = manifest["pairs"]
    context = processor.tokenizer.model_max_length
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        if manifest["kind"] == "embedded":
            images = [synthetic.make_sample(manifest["seed"], p["index"]).image for p in chunk]
        else:
            images = [Image.open(Path(root) / p["image"]).convert("RGB") for p in chunk]
        batch = processor(images=images, text=[p["caption"] for p in chunk], padding="max_length",
                          truncation=True, max_length=context, return_tensors="pt")
        yield {"pixel_values": batch["pixel_values"], "input_ids": batch["input_ids"]}

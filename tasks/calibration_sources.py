"""Calibration sources: where image-caption pairs come from, how they are read, and their batches.

The calibration_data stage selects from a source into a manifest; quantization and the ONNX check
read the manifest's pairs back through ``iter_calibration_batches``.

Sources (``calibration.source``):
- ``embedded:shapes``: generated on the fly (``clip_fp8.synthetic``); the generator is the data.
- ``coco:<folder>``: a COCO 2014/2017 folder, images plus ``annotations/captions_*.json``.
- ``folder:<folder>``: images plus ``captions.csv`` or ``captions.jsonl`` (columns ``image``, ``caption``).
- ``wds:<folder or .tar>``: WebDataset shards; a sample is the files sharing a key, an image
  (.jpg/.png/.webp) and a caption (.txt, or .json with "caption"/"text").
- ``hf:<dataset>``: a ``datasets`` dataset: a directory written by ``save_to_disk`` or a Hub id;
  ``calibration.split``, ``image_column`` and ``caption_column`` pick the data.
Every image the manifest names carries its content digest; a source's own digest covers its content,
never its path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from clip_fp8 import synthetic
from clip_fp8.artifacts import ArtifactRef, sha256_file, sha256_json
from clip_fp8.config import CalibrationConfig
from clip_fp8.errors import PipelineInputError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def resolve_data_source(cfg: CalibrationConfig) -> ArtifactRef:
    """Locate the source and fingerprint it cheaply (the stage digests the images it selects)."""
    kind, _, location = cfg.source.partition(":")
    if kind == "embedded" and location == "shapes":
        return ArtifactRef(stage="data_source", path="", digest=synthetic.digest(), meta={"kind": "embedded", "source": cfg.source})
    if kind == "coco":
        folder = _existing_folder(location, cfg.source)
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
    if kind == "folder":
        folder = _existing_folder(location, cfg.source)
        captions = _find_captions_table(folder, cfg.captions_file, cfg.source)
        images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        listing = [(p.relative_to(folder).as_posix(), sha256_file(p)) for p in images]
        return ArtifactRef(stage="data_source", path=str(folder.resolve()),
                           digest=sha256_json({"captions": sha256_file(captions), "images": listing}),
                           files={"captions": str(captions.resolve().relative_to(folder.resolve()))},
                           meta={"kind": "folder", "source": cfg.source, "images": len(images)})
    if kind == "wds":
        path = Path(location).expanduser()
        shards = sorted(path.glob("*.tar")) if path.is_dir() else [path] if path.is_file() else []
        if not shards:
            raise PipelineInputError(f"calibration.source '{cfg.source}': no WebDataset shards (*.tar) at '{path}'")
        root = path if path.is_dir() else path.parent
        return ArtifactRef(stage="data_source", path=str(root.resolve()),
                           digest=sha256_json({s.name: sha256_file(s) for s in shards}),
                           files={s.name: s.name for s in shards},
                           meta={"kind": "wds", "source": cfg.source, "shards": len(shards)})
    if kind == "hf":
        dataset = _load_hf_dataset(location, cfg)
        # datasets' own fingerprint: a hash of the data and every transform applied to it, not of where it is.
        local = Path(location).expanduser()
        return ArtifactRef(stage="data_source", path=str(local.resolve()) if local.is_dir() else location,
                           digest=sha256_json({"fingerprint": dataset._fingerprint, "split": cfg.split,
                                               "columns": [cfg.image_column, cfg.caption_column]}),
                           meta={"kind": "hf", "source": cfg.source, "rows": len(dataset)})
    raise PipelineInputError(
        f"calibration.source '{cfg.source}' is not a known source; use 'embedded:shapes', 'coco:<folder>', "
        "'folder:<folder>', 'wds:<shards>' or 'hf:<dataset>'"
    )


def _existing_folder(location: str, source: str) -> Path:
    folder = Path(location).expanduser()
    if not folder.is_dir():
        raise PipelineInputError(f"calibration.source '{source}': folder '{folder}' does not exist")
    return folder


def _explicit_captions_file(folder: Path, captions_file: str | None) -> Path | None:
    """``calibration.captions_file``, absolute or relative to the source folder; None when not set."""
    if not captions_file:
        return None
    path = Path(captions_file).expanduser()
    path = path if path.is_absolute() else folder / path
    if not path.is_file():
        raise PipelineInputError(f"calibration.captions_file '{captions_file}' does not exist")
    return path


def _find_captions_table(folder: Path, captions_file: str | None, source: str) -> Path:
    if (explicit := _explicit_captions_file(folder, captions_file)) is not None:
        return explicit
    for name in ("captions.csv", "captions.jsonl"):
        if (folder / name).is_file():
            return folder / name
    raise PipelineInputError(
        f"calibration.source '{source}': no captions.csv or captions.jsonl in '{folder}' (columns image, caption); "
        "set calibration.captions_file"
    )


def _load_hf_dataset(location: str, cfg: CalibrationConfig):
    import datasets

    path = Path(location).expanduser()
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
            dataset = loaded[cfg.split] if isinstance(loaded, datasets.DatasetDict) else loaded
        else:
            dataset = datasets.load_dataset(location, split=cfg.split)
    except KeyError:
        raise PipelineInputError(f"calibration.split '{cfg.split}' is not in dataset '{location}' "
                                 f"(splits: {', '.join(loaded)})") from None
    except Exception as exc:
        raise PipelineInputError(
            f"calibration.source 'hf:{location}' could not be loaded ({type(exc).__name__}: {str(exc)[:120]}); offline, "
            f"run `datasets.load_dataset('{location}').save_to_disk(DIR)` on a connected machine and pass hf:DIR"
        ) from None
    for field, column in (("image_column", cfg.image_column), ("caption_column", cfg.caption_column)):
        if column not in dataset.column_names:
            raise PipelineInputError(f"calibration.{field} '{column}' is not a column of '{location}' "
                                     f"(columns: {', '.join(dataset.column_names)})")
    return dataset


def _find_captions_file(folder: Path, captions_file: str | None, source: str) -> Path:
    if (explicit := _explicit_captions_file(folder, captions_file)) is not None:
        return explicit
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


def _folder_pairs(source: ArtifactRef) -> list[tuple[str, str]]:
    import csv

    folder = Path(source.path)
    table = folder / source.files["captions"]
    try:
        if table.suffix == ".csv":
            rows = list(csv.DictReader(table.open(newline="")))
        else:
            rows = [json.loads(line) for line in table.read_text().splitlines() if line.strip()]
        return [(str(r["image"]), str(r["caption"]).strip()) for r in rows]
    except (KeyError, json.JSONDecodeError, csv.Error) as exc:
        raise PipelineInputError(
            f"captions file '{table}' needs columns 'image' and 'caption' ({type(exc).__name__}: {exc})") from None


def _wds_samples(source: ArtifactRef) -> dict[str, dict[str, str]]:
    """``shard#key`` -> {'image': member name, 'caption': text} for every complete sample."""
    import tarfile

    samples: dict[str, dict[str, str]] = {}
    for shard in sorted(source.files):
        with tarfile.open(Path(source.path) / shard) as tar:
            for member in tar.getmembers():
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                entry = samples.setdefault(f"{shard}#{key}", {})
                if f".{ext.lower()}" in IMAGE_SUFFIXES:
                    entry["image"] = member.name
                elif ext in ("txt", "json"):
                    raw = tar.extractfile(member).read().decode("utf-8")
                    entry["caption"] = raw.strip() if ext == "txt" else _json_caption(raw)
    return {k: v for k, v in samples.items() if v.get("image") and v.get("caption")}


def _json_caption(raw: str) -> str:
    data = json.loads(raw)
    return str(data.get("caption") or data.get("text") or "").strip()


def source_pairs(source: ArtifactRef, cfg: CalibrationConfig) -> list[tuple[str, str]]:
    kind = source.meta["kind"]
    if kind == "coco":
        return _coco_pairs(source)
    if kind == "folder":
        return _folder_pairs(source)
    if kind == "wds":
        return [(f"{k.split('#')[0]}#{v['image']}", v["caption"]) for k, v in _wds_samples(source).items()]
    dataset = _load_hf_dataset(source.path, cfg)
    captions = dataset[cfg.caption_column]
    # A caption column may hold several captions per image (COCO-style lists): each is a pair.
    return [(str(i), str(c).strip()) for i, cs in enumerate(captions) for c in (cs if isinstance(cs, list) else [cs])]


def image_bytes(source_kind: str, root: str, locator: str, cfg: CalibrationConfig | None = None, cache: dict | None = None) -> bytes:
    """The encoded image a manifest entry names, from whichever container holds it."""
    if source_kind == "wds":
        import tarfile

        shard, member = locator.split("#", 1)
        cache = cache if cache is not None else {}
        tar = cache.get(shard) or cache.setdefault(shard, tarfile.open(Path(root) / shard))
        return tar.extractfile(member).read()
    if source_kind == "hf":
        import datasets

        cache = cache if cache is not None else {}
        if ("hf", root) not in cache:
            cache["hf", root] = _load_hf_dataset(root, cfg).cast_column(cfg.image_column, datasets.Image(decode=False))
        cell = cache["hf", root][int(locator)][cfg.image_column]
        return cell["bytes"] if cell.get("bytes") else Path(cell["path"]).read_bytes()
    return (Path(root) / locator).read_bytes()


def open_image(data: bytes):
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(data))
    return image.convert("RGB")


def iter_calibration_batches(manifest: dict, root: str, processor, batch_size: int) -> Iterator[dict]:
    """Preprocessed batches (``pixel_values``, ``input_ids``) in manifest order, via the model's processor."""
    pairs = manifest["pairs"]
    context = processor.tokenizer.model_max_length
    cache: dict = {}
    hf_cfg = CalibrationConfig(source="hf:", **manifest["hf"]) if manifest["kind"] == "hf" else None
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        if manifest["kind"] == "embedded":
            images = [synthetic.make_sample(manifest["seed"], p["index"]).image for p in chunk]
        else:
            images = [open_image(image_bytes(manifest["kind"], root, p["image"], hf_cfg, cache)) for p in chunk]
        batch = processor(images=images, text=[p["caption"] for p in chunk], padding="max_length",
                          truncation=True, max_length=context, return_tensors="pt")
        yield {"pixel_values": batch["pixel_values"], "input_ids": batch["input_ids"]}

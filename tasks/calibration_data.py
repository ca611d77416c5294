"""Stage calibration_data: a deterministic, seeded subset of image-caption pairs, as a manifest.

The artifact is a manifest (which pairs, with each image's content digest), not preprocessed tensors:
8,192 ViT-L/14 inputs are 2.4 GB in FP16, while the manifest is a few hundred KB and pins the content
just as well. Preprocessing runs inside quantization with the model's own processor, batch by batch.
Unreadable images are skipped, counted and named; too many of them, or too few usable ones, stop here.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np

from clip_fp8 import synthetic
from clip_fp8.artifacts import ArtifactRef
from clip_fp8.config import CalibrationConfig
from clip_fp8.errors import PipelineInputError
from clip_fp8.stage import Reads, StageOutput, stage
from clip_fp8.tasks.calibration_sources import image_bytes, open_image, source_pairs


def select_pairs(source: ArtifactRef, cfg: CalibrationConfig) -> dict:
    """The manifest: ``cfg.num_samples`` pairs chosen by ``cfg.seed``, one caption per image."""
    rng = np.random.default_rng(cfg.seed)
    if source.meta["kind"] == "embedded":
        return {
            "kind": "embedded", "seed": cfg.seed, "source_digest": source.digest, "skipped": 0, "skipped_examples": [],
            "pairs": [{"index": i, "caption": synthetic.make_sample(cfg.seed, i).caption} for i in range(cfg.num_samples)],
        }

    by_image: dict[str, list[str]] = {}
    for image, caption in source_pairs(source, cfg):
        by_image.setdefault(image, []).append(caption)
    images = sorted(by_image)
    where = f"calibration.source '{source.meta['source']}'"
    if cfg.num_samples > len(images):
        raise PipelineInputError(
            f"calibration.num_samples={cfg.num_samples} exceeds the {len(images)} captioned images in {where}; "
            f"lower calibration.num_samples to at most {len(images)} or add data")
    kind, cache = source.meta["kind"], {}
    pairs, skipped = [], []
    for i in rng.permutation(len(images)):
        if len(pairs) == cfg.num_samples:
            break
        rel = images[i]
        try:
            data = image_bytes(kind, source.path, rel, cfg, cache)
            open_image(data).load()
        except FileNotFoundError:
            skipped.append(f"{rel} (missing)")
            continue
        except Exception:
            skipped.append(f"{rel} (unreadable)")
            continue
        captions = by_image[rel]
        pairs.append({"image": rel, "sha256": hashlib.sha256(data).hexdigest(),
                      "caption": captions[rng.integers(len(captions))]})
    tried = len(pairs) + len(skipped)
    examples = ", ".join(f"'{s}'" for s in skipped[:3])
    if len(pairs) < cfg.num_samples:
        # Every image was tried: no max_bad_fraction would help, only fewer samples (or more data).
        raise PipelineInputError(
            f"{where}: only {len(pairs)} usable images for calibration.num_samples={cfg.num_samples} "
            f"({len(skipped)} of {tried} missing or unreadable, e.g. {examples}); "
            f"lower calibration.num_samples to {len(pairs)}, or fix or add images")
    if len(skipped) / max(1, tried) > cfg.max_bad_fraction:
        # Enough usable images were found, but too large a share of those tried was bad.
        needed = math.ceil(100 * len(skipped) / tried) / 100
        raise PipelineInputError(
            f"{where}: {len(skipped)} of {tried} images tried are missing or unreadable (e.g. {examples}), more "
            f"than calibration.max_bad_fraction={cfg.max_bad_fraction}; raise calibration.max_bad_fraction to "
            f"{needed:.2f} to skip them, or fix them")
    manifest = {"kind": kind, "seed": cfg.seed, "source_digest": source.digest, "skipped": len(skipped),
                "skipped_examples": skipped[:20], "pairs": pairs}
    if kind == "hf":  # the loader needs these to find the rows again
        manifest["hf"] = {"split": cfg.split, "image_column": cfg.image_column, "caption_column": cfg.caption_column}
    return manifest


# What ``select_pairs`` reads (not the forward batch size: quantize's; not where the data is: data_source's digest).
SelectionSettings = Reads[CalibrationConfig, "source", "split", "image_column", "caption_column", "num_samples", "seed",
                          "max_bad_fraction"]


@stage(retries=2)
def calibration_data(data_source: ArtifactRef, cfg: SelectionSettings, out_dir: Path) -> StageOutput:
    manifest = select_pairs(data_source, cfg)
    (out_dir / "manifest.json").write_text(json.dumps(manifest))
    note = ""
    if manifest["skipped"]:
        note = (f"{manifest['skipped']} images skipped (" + ", ".join(manifest["skipped_examples"][:3])
                + (", ..." if manifest["skipped"] > 3 else "") + ")")
    facts = {"pairs": len(manifest["pairs"]), "skipped_images": manifest["skipped"],
             "skipped_examples": manifest["skipped_examples"][:5]}
    return StageOutput(files={"manifest": "manifest.json"}, meta={**facts, "note": note}, summary={"calibration": facts})

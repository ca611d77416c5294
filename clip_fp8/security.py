"""Where a worker may read and write: ``CLIP_FP8_ALLOWED_ROOTS``, a setting of the worker, not of the run.

A run's form in the Prefect UI takes paths (the model, the data, the output and promotion folders): without a
bound, anyone who may start a run could point a GPU worker at anything it can read. A worker started with
``CLIP_FP8_ALLOWED_ROOTS=/data`` (``os.pathsep``-separated folders; docker/compose.yaml sets it) refuses, before
any stage, a run naming a local path outside them. Unset: no bound (a laptop's ``clip-fp8 run``).

Which fields are paths is derived from the configuration itself: every field marked ``locator`` (where inputs
come from) or ``destination`` (where outputs go), in every section and list entry. Remote URLs (``s3://...``)
are not local reads (the store's credentials bound them), and neither are Hub ids, open_clip tags or the
embedded sources; a value is a local path when it is absolute, relative with a folder part that exists, or
names an existing file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from pydantic import BaseModel

from clip_fp8.errors import PipelineInputError

ENV = "CLIP_FP8_ALLOWED_ROOTS"
# `kind:rest` source prefixes whose rest is a local path (tasks.calibration_sources and tasks.checkpoints).
PATH_PREFIXES = ("coco:", "folder:", "wds:", "hf:", "open_clip:", "file://")


def allowed_roots() -> list[Path] | None:
    value = os.environ.get(ENV, "").strip()
    if not value:
        return None
    return [Path(p).expanduser().resolve() for p in value.split(os.pathsep) if p.strip()]


def path_fields(config: BaseModel, prefix: str = "") -> Iterator[tuple[str, str, bool]]:
    """(dotted field name, value, is a destination) for every locator or destination field, sections and lists
    included."""
    for name, field in type(config).model_fields.items():
        value = getattr(config, name)
        dotted = f"{prefix}{name}"
        marks = set(field.json_schema_extra or {}) if isinstance(field.json_schema_extra, dict) else set()
        if {"locator", "destination"} & marks and isinstance(value, str) and value:
            yield dotted, value, "destination" in marks
        elif isinstance(value, BaseModel):
            yield from path_fields(value, f"{dotted}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    yield from path_fields(item, f"{dotted}[{i}].")


def local_path(value: str, destination: bool = False) -> Path | None:
    """The local path a field's value names, or None (a URL, a Hub id, a tag, an embedded source). A destination
    that is no URL is a local folder, whether it exists yet or not."""
    if value.startswith("embedded:") or "://" in value and not value.startswith("file://"):
        return None
    rest = next((value[len(p):] for p in PATH_PREFIXES if value.startswith(p)), value)
    if not rest or rest.startswith("{"):  # an open_clip model config given inline
        return None
    path = Path(rest).expanduser()
    if destination or path.is_absolute() or path.exists() or (len(path.parts) > 1 and path.parent.exists() and path.parts[0] in (".", "..")):
        return path.resolve()
    return None  # e.g. laion/CLIP-ViT-L-14-laion2B-s32B-b82K: a Hub id, not a file here


def check_allowed_roots(config: BaseModel) -> None:
    """Refuse, in one line, a run whose configuration names a local path outside the worker's allowed roots."""
    roots = allowed_roots()
    if roots is None:
        return
    for name, value, destination in path_fields(config):
        path = local_path(value, destination)
        if path is not None and not any(path == root or root in path.parents for root in roots):
            raise PipelineInputError(
                f"{name} '{value}' is outside this worker's allowed roots ({os.pathsep.join(map(str, roots))}, "
                f"{ENV}); use a path under them, or ask the worker's operator to allow it")

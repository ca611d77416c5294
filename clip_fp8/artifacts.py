"""Content-addressed artifacts: hashing, atomic publication, and the references stages pass around.

A stage writes into a private temporary directory and publishes it with one ``os.replace`` to
``<root>/store/<stage>/<key>``, so a killed run never leaves a half-written artifact that a later
run trusts. A stage's output is an ``ArtifactRef``: its digest (the content hash) is what
downstream cache keys see; its path is only where it happens to live.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel, Field

CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_tree(root: Path, files: list[Path] | None = None) -> str:
    """Digest of a directory's files: names relative to ``root`` and their contents, in sorted order."""
    root = Path(root)
    if files is None:
        files = [p for p in root.rglob("*") if p.is_file()]
    h = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(b"\0")
        h.update(sha256_file(path).encode())
        h.update(b"\n")
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


class ArtifactRef(BaseModel):
    """A stage output: where it is, what it is (digest), and a few facts about it for the report."""

    stage: str
    path: str
    digest: str
    files: dict[str, str] = Field(default_factory=dict, description="name -> path relative to `path`")
    meta: dict[str, Any] = Field(default_factory=dict)

    def file(self, name: str) -> Path:
        return Path(self.path) / self.files[name]

    def __cache_key__(self) -> str:
        return self.digest


def write_json_atomic(path: Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str))
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class ArtifactStore:
    """``<root>/store/<stage>/<key>/``: one directory per stage output, published atomically."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def objects(self) -> Path:
        return self.root / "store"

    @property
    def results(self) -> Path:
        """Prefect result and cache-key storage: lives beside the artifacts it points to."""
        return self.root / "prefect-results"

    def final_dir(self, stage: str, key: str) -> Path:
        return self.objects / stage / key

    @contextmanager
    def staging(self, stage: str, key: str) -> Iterator[Path]:
        """Yield an empty private directory; on success it becomes ``final_dir(stage, key)``."""
        final = self.final_dir(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp-{key[:16]}-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if final.exists():
            # Same key means same inputs: an earlier (or concurrent) run already published it.
            shutil.rmtree(final)
        os.replace(tmp, final)

    def publish(self, stage: str, key: str, files: dict[str, str], meta: dict[str, Any] | None = None) -> ArtifactRef:
        """Reference a published directory; ``files`` names its entries (files or folders) for consumers."""
        final = self.final_dir(stage, key)
        return ArtifactRef(stage=stage, path=str(final), digest=sha256_tree(final), files=files, meta=meta or {})

"""Content-addressed artifacts: hashing, atomic publication, and the references stages pass around.

A stage writes into a private temporary directory and publishes it with one ``os.replace`` to
``<root>/store/<stage>/<key>``, so a killed run never leaves a half-written artifact that a later
run trusts. A stage's output is an ``ArtifactRef``: its digest (the content hash) is what
downstream cache keys see; its path is only where it happens to live.

``output.root`` may also be an fsspec URL (``s3://bucket/prefix``; credentials and an S3-compatible
endpoint come from the usual ``AWS_*`` environment, e.g. ``AWS_ENDPOINT_URL`` for MinIO). Then stages
still stage and read on local disk (torch, ONNX and TensorRT need files), under a per-host cache
(``CLIP_FP8_CACHE_DIR``, default ``~/.cache/clip-fp8``); each published artifact is uploaded to
``<url>/store/<stage>/<key>/`` with its completion marker written last (object stores have no rename:
a reader trusts only a marked artifact), and a worker on another host downloads what it reads.
Prefect's result and cache records go to ``<url>/prefect-results`` through a saved ``RemoteFileSystem``
block, so any worker sees every cache hit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel, Field

CHUNK = 1 << 20
COMPLETE = ".clip-fp8-complete.json"
# Inside every published artifact: its ArtifactRef, so a run that died after publishing but before Prefect
# recorded the result still finds the artifact under its key (``ArtifactStore.published``).
REF_FILE = ".clip-fp8-ref.json"
CACHE_ENV = "CLIP_FP8_CACHE_DIR"


def is_remote(url: str) -> bool:
    """An fsspec URL other than a plain local path or ``file://``."""
    return "://" in url and not url.startswith("file://")


def cache_base() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "clip-fp8").expanduser()


def upload_dir(local: Path, uri: str) -> None:
    """Copy ``local``'s files under ``uri``; the completion marker goes last. Same key, same bytes: re-uploads are harmless."""
    import fsspec

    fs, base = fsspec.core.url_to_fs(uri)
    if fs.exists(f"{base}/{COMPLETE}"):
        return  # another worker published the same content first
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    for rel in files:
        fs.put_file(str(local / rel), f"{base}/{rel}")
    fs.pipe_file(f"{base}/{COMPLETE}", json.dumps({"files": files}).encode())


def download_dir(uri: str, local: Path) -> Path:
    """Materialise a completed remote artifact at ``local`` (atomically); return ``local``."""
    import fsspec

    fs, base = fsspec.core.url_to_fs(uri)
    try:
        files = json.loads(fs.cat_file(f"{base}/{COMPLETE}"))["files"]
    except FileNotFoundError:
        raise FileNotFoundError(f"artifact '{uri}' is missing or incomplete (no {COMPLETE}); re-run to rebuild it") from None
    with atomic_directory(local, keep_existing=True) as tmp:  # a concurrent reader on this host may finish first
        for rel in files:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{base}/{rel}", str(tmp / rel))
    return local


# Private directories in use by this process (staging, export scratch). An interrupted CLI run exits without
# unwinding the stage threads that own them, so it removes them here (``remove_scratch``) before it exits.
# Once they are removed no new one is made: the stage threads run on until the process exits, and a
# directory one of them made meanwhile (the next graph's export) was left behind.
_SCRATCH: set[Path] = set()
_SCRATCH_LOCK = threading.Lock()
_SCRATCH_CLOSED = threading.Event()


@contextmanager
def scratch_directory(parent: Path | None = None, prefix: str = "clip-fp8-") -> Iterator[Path]:
    """A new empty directory (under ``parent``, else the system temp dir), removed on leaving the block."""
    with _SCRATCH_LOCK:
        if _SCRATCH_CLOSED.is_set():
            raise RuntimeError("this process is stopping (interrupted): no new scratch directory")
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        _SCRATCH.add(path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        with _SCRATCH_LOCK:
            _SCRATCH.discard(path)


def remove_scratch() -> list[Path]:
    """Remove every scratch directory this process still has and refuse new ones (an interrupt); return them."""
    with _SCRATCH_LOCK:
        _SCRATCH_CLOSED.set()
        paths = sorted(_SCRATCH)
        _SCRATCH.clear()
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
    return paths


@contextmanager
def atomic_directory(final: Path, keep_existing: bool = False) -> Iterator[Path]:
    """Yield an empty private directory beside ``final``; on success it becomes ``final`` in one rename,
    on any error it is removed. ``final`` that already exists is replaced (same key, same content), or
    kept when ``keep_existing``."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with scratch_directory(final.parent, prefix=f".tmp-{final.name[:16]}-") as tmp:
        yield tmp
        if final.exists():
            if keep_existing:
                return
            shutil.rmtree(final)
        os.replace(tmp, final)  # the scratch directory is gone: leaving the block removes nothing


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write a file so that readers see the old content or the new, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


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
    manifest: dict[str, dict] = Field(default_factory=dict, description="Each file's SHA-256 and bytes when it was "
                                      "published: what ``clip_fp8.integrity`` checks before the artifact is reused")
    uri: str | None = Field(None, description="Where the artifact lives when the store is remote")

    def local_dir(self) -> Path:
        """The artifact on this host's disk: where it was published, else downloaded into the cache."""
        if self.uri is None or Path(self.path).is_dir():
            return Path(self.path)
        local = cache_base() / "remote" / hashlib.sha256(self.uri.encode()).hexdigest()[:32]
        if local.is_dir():
            return local
        download_dir(self.uri, local)
        from clip_fp8.integrity import check

        if why := check(local, self):  # a bad copy or a damaged object: not read, and not kept
            shutil.rmtree(local, ignore_errors=True)
            raise RuntimeError(f"artifact {self.uri} is corrupt ({why}); clip-fp8 verify lists what to remove")
        return local

    def file(self, name: str) -> Path:
        return self.local_dir() / self.files[name]

    def location(self, name: str) -> str:
        """Where a file is, for reports: its URL in a remote store (nothing downloaded), else its path."""
        return f"{self.uri}/{self.files[name]}" if self.uri else str(Path(self.path) / self.files[name])

    def __cache_key__(self) -> str:
        return self.digest


def write_json_atomic(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, default=str))


class ArtifactStore:
    """``<root>/store/<stage>/<key>/``: one directory per stage output, published atomically.

    ``root`` is a local directory or an fsspec URL; with a URL, ``self.root`` is this host's local
    working copy and ``self.url`` the shared store.
    """

    def __init__(self, root: str | Path):
        self.url = str(root)
        self.remote = is_remote(self.url)
        if self.remote:
            self.url = self.url.rstrip("/")
            self.root = cache_base() / "stores" / hashlib.sha256(self.url.encode()).hexdigest()[:16]
        else:
            self.root = Path(str(root).removeprefix("file://"))

    def upload_run(self, run_dir: Path) -> str | None:
        """Copy a run's report files to the shared store; return where they went."""
        if not self.remote:
            return None
        uri = f"{self.url}/runs/{run_dir.name}"
        import fsspec

        fs, base = fsspec.core.url_to_fs(uri)
        for path in sorted(p for p in run_dir.iterdir() if p.is_file()):
            fs.put_file(str(path), f"{base}/{path.name}")
        return uri

    @property
    def objects(self) -> Path:
        return self.root / "store"

    @property
    def results(self) -> Path:
        """Where Prefect's result and cache records live: beside the artifacts they point to."""
        return self.root / "prefect-results"

    def final_dir(self, stage: str, key: str) -> Path:
        return self.objects / stage / key

    def staging(self, stage: str, key: str):
        """An empty private directory that becomes ``final_dir(stage, key)`` on success (see ``atomic_directory``)."""
        return atomic_directory(self.final_dir(stage, key))

    def publish(self, stage: str, key: str, files: dict[str, str], meta: dict[str, Any] | None = None) -> ArtifactRef:
        """Reference a published directory; ``files`` names its entries (files or folders) for consumers."""
        from clip_fp8.integrity import manifest_of, tree_digest

        final = self.final_dir(stage, key)
        manifest = manifest_of(final)
        ref = ArtifactRef(stage=stage, path=str(final), digest=tree_digest(manifest), files=files, meta=meta or {},
                          manifest=manifest)
        if self.remote:
            ref.uri = f"{self.url}/store/{stage}/{key}"
        write_json_atomic(final / REF_FILE, ref.model_dump(mode="json"))  # after the digest: not part of it
        if self.remote:
            upload_dir(final, ref.uri)
        return ref

    def published(self, stage: str, key: str) -> ArtifactRef | None:
        """The artifact already published under ``key`` on this host, or None. Keys name content, so what
        is there is what the stage would compute; a directory without its ref file (a publisher killed
        between the rename and the ref) is not trusted, and a corrupt one is quarantined: the stage runs again."""
        from clip_fp8.integrity import refuse_corrupt

        try:
            ref = ArtifactRef.model_validate_json((self.final_dir(stage, key) / REF_FILE).read_text())
        except (FileNotFoundError, ValueError):
            return None
        ref.path = str(self.final_dir(stage, key))  # where it is now (the output root may have moved)
        if refuse_corrupt(self.root, Path(ref.path), ref):
            return None
        if self.remote and ref.uri:
            upload_dir(Path(ref.path), ref.uri)  # the publisher may have died before its upload finished
        return ref

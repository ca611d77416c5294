"""Every artifact checked against what was recorded when it was published, before it is reused.

A published artifact's ref (``.clip-fp8-ref.json``) holds a manifest: each file's SHA-256 and size. Before a
stage's artifact is reused (a Prefect cache hit, or an artifact found under its key), ``check`` compares the
directory with it: a missing, truncated, changed or added file makes the artifact corrupt. A corrupt artifact is
moved aside to ``<root>/quarantine/<stage>/`` (kept for a person to look at, never read again), one line says so
naming the stage and path, and the stage runs again. ``verify_store`` does the same for a whole store without
moving anything (``clip-fp8 verify``).

Hashing is the whole check, not sizes alone: a flipped bit keeps the size. Its cost is measured in
docs/benchmarks.md ("Integrity").
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from clip_fp8.artifacts import REF_FILE, ArtifactRef
from clip_fp8.artifacts import sha256_file as file_digest

QUARANTINE = "quarantine"


def manifest_of(root: Path) -> dict[str, dict]:
    """Each file under ``root`` (its ref file aside): relative path -> SHA-256 and bytes."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): {"sha256": file_digest(p), "bytes": p.stat().st_size}
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != REF_FILE}


def tree_digest(manifest: dict[str, dict]) -> str:
    """The artifact's digest from its manifest: ``artifacts.sha256_tree``'s formula, so both agree."""
    h = hashlib.sha256()
    for rel in sorted(manifest):
        h.update(rel.encode())
        h.update(b"\0")
        h.update(manifest[rel]["sha256"].encode())
        h.update(b"\n")
    return h.hexdigest()


def check(path: Path, ref: ArtifactRef) -> str | None:
    """Why the artifact at ``path`` is not what ``ref`` recorded, or None when it is."""
    path = Path(path)
    if not path.is_dir():
        return "its directory is missing"
    recorded = ref.manifest
    if not recorded:  # published before manifests: the digest over the whole tree still tells
        found = manifest_of(path)
        return None if tree_digest(found) == ref.digest else "its content differs from its recorded digest"
    for rel, entry in recorded.items():
        file = path / rel
        if not file.is_file():
            return f"{rel} is missing"
        size = file.stat().st_size
        if size != entry["bytes"]:
            return f"{rel} has {size} bytes, {entry['bytes']} recorded ({'truncated' if size < entry['bytes'] else 'grown'})"
        if file_digest(file) != entry["sha256"]:
            return f"{rel} differs from its recorded SHA-256 (same size: changed in place)"
    extra = sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                   if p.is_file() and p.name != REF_FILE and p.relative_to(path).as_posix() not in recorded)
    return f"{extra[0]} was not part of it" if extra else None


def quarantine(root: Path, path: Path, stage: str) -> Path:
    """Move a corrupt artifact out of the store (one rename), keeping it for a person to look at."""
    target = Path(root) / QUARANTINE / stage / f"{Path(path).name}.{time.strftime('%Y%m%d-%H%M%S')}"
    target.parent.mkdir(parents=True, exist_ok=True)
    Path(path).rename(target)
    return target


def refuse_corrupt(root: Path, path: Path, ref: ArtifactRef) -> bool:
    """True (after quarantining it and saying so in one line) when the artifact at ``path`` is corrupt."""
    why = check(path, ref)
    if why is None:
        return False
    moved = quarantine(root, path, ref.stage) if Path(path).is_dir() else None
    print(f"{ref.stage}: cached artifact {path} is corrupt ({why})"
          + (f"; moved to {moved}" if moved else "") + "; computing it again", flush=True)
    return True


def verify_store(root: Path) -> dict:
    """Every published artifact of the store under ``root`` checked: ``{"checked": n, "corrupt": [(path, why)]}``;
    a directory without its ref file (a publisher killed before it) is never trusted, so not counted."""
    corrupt, checked = [], 0
    for ref_file in sorted(Path(root, "store").glob(f"*/*/{REF_FILE}")):
        checked += 1
        try:
            ref = ArtifactRef.model_validate_json(ref_file.read_text())
        except ValueError as exc:
            corrupt.append((str(ref_file.parent), f"its ref file does not parse ({str(exc).splitlines()[0]})"))
            continue
        if why := check(ref_file.parent, ref):
            corrupt.append((str(ref_file.parent), why))
    return {"checked": checked, "corrupt": corrupt}


def verify_repository(repository: Path) -> dict:
    """Each promoted version's files against the digests its ``provenance.json`` recorded (``files``)."""
    corrupt, checked = [], 0
    for provenance in sorted(Path(repository).glob("*/*/provenance.json")):
        recorded = json.loads(provenance.read_text()).get("files", {})
        checked += 1
        for name, entry in recorded.items():
            file = provenance.parent / name
            if not file.is_file():
                corrupt.append((str(file), "missing"))
            elif file.stat().st_size != entry["bytes"] or file_digest(file) != entry["sha256"]:
                corrupt.append((str(file), "differs from the digest recorded when it was promoted"))
    return {"checked": checked, "corrupt": corrupt}

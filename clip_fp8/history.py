"""Run history: what every run leaves behind, failed ones too, under ``<output.root>/history/``.

One immutable JSON record per run, named ``<UTC time>-<run>-<random>.json``. An append is the creation of
one new file (a rename on a local disk, one object PUT in an fsspec store), so two workers finishing at
the same moment both land and nobody rewrites a shared file. Reading lists the folder and sorts by name
(= by time). Promotion by hand (``clip-fp8 promote``) appends a record of its own kind, so "the last
promoted run of a model" is the newest record, of either kind, that names a promoted version.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from clip_fp8.artifacts import atomic_write, is_remote

HISTORY_DIR = "history"


def model_key(source: str, revision: str | None) -> str:
    """Which model a record is about: the locator the user gave (its content may change from night to night)."""
    return f"{source}@{revision}" if revision else source


def _location(root: str) -> tuple[Any, str]:
    import fsspec

    if is_remote(root):
        fs, base = fsspec.core.url_to_fs(root.rstrip("/"))
        return fs, f"{base}/{HISTORY_DIR}"
    return None, str(Path(str(root).removeprefix("file://")) / HISTORY_DIR)


def append(root: str, record: dict[str, Any]) -> str:
    """Add ``record`` (it gets ``time`` if it has none); return where it was written."""
    record.setdefault("time", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    stamp = record["time"].replace(":", "").replace("-", "").replace("+0000", "Z")
    name = f"{stamp}-{record.get('run', 'record')}-{uuid.uuid4().hex[:8]}.json"
    data = json.dumps(record, indent=1, sort_keys=True, default=str)
    fs, folder = _location(root)
    if fs is None:
        atomic_write(Path(folder) / name, data)
    else:
        fs.pipe_file(f"{folder}/{name}", data.encode())  # one PUT: whole or absent
    return f"{folder}/{name}"


def read(root: str, model: str | None = None, last: int | None = None, kind: str | None = None) -> list[dict[str, Any]]:
    """Records oldest first; only ``model``'s (its key or its source), only the ``last`` N, only of ``kind``."""
    fs, folder = _location(root)
    if fs is None:
        paths = sorted(Path(folder).glob("*.json")) if Path(folder).is_dir() else []
        texts: Iterable[str] = (p.read_text() for p in paths)
    else:
        names = sorted(p for p in fs.ls(folder, detail=False) if p.endswith(".json")) if fs.exists(folder) else []
        texts = (fs.cat_file(p).decode() for p in names)
    records = [json.loads(t) for t in texts]
    if model is not None:
        records = [r for r in records if model in (r.get("model_key"), r.get("model", {}).get("source"))]
    if kind is not None:
        records = [r for r in records if r.get("kind", "run") == kind]
    return records[-last:] if last else records


def last_promoted(records: list[dict[str, Any]], model: str) -> dict[str, Any] | None:
    """The newest record of ``model`` that promoted a version (a run, or a promotion by hand)."""
    for record in reversed(records):
        if record.get("model_key") == model and (record.get("promotion") or {}).get("version") is not None:
            return record
    return None


def latency_b128(record: dict[str, Any]) -> dict[str, float]:
    """Median milliseconds at batch 128 per engine (or PyTorch baseline) in a record."""
    return {row["engine"]: row["median_ms"] for row in record.get("benchmark", {}).get("rows", [])
            if row.get("batch") == 128 and row.get("median_ms") is not None}


def table_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per record, for the CLI and Prefect's table artifact."""
    rows = []
    for r in records:
        gate = r.get("quality_gate") or {}
        worst = min((row["delta"] for row in gate.get("rows", [])), default=None)
        promotion = r.get("promotion") or {}
        rows.append({
            "time": r.get("time", ""), "run": r.get("run", ""), "kind": r.get("kind", "run"),
            "model": r.get("model_key", ""), "status": r.get("status", ""),
            "changed": "—" if r.get("kind", "run") != "run" else "unchanged" if r.get("unchanged") else "changed",
            "gate": "—" if not gate else ("passed" if gate.get("passed") else "failed"),
            "worst_delta": "—" if worst is None else f"{worst:+.4f}",
            "regressed": f"yes ({len(reasons)}: {reasons[0].split(' ')[0].rsplit('/', 1)[-1]}{', ...' if len(reasons) > 1 else ''})"
                         if (reasons := (r.get("regression") or {}).get("reasons")) else "no",
            "promoted": "—" if promotion.get("version") is None else f"v{promotion['version']}"
                        + (" (forced)" if promotion.get("forced") else ""),
            "onnx_fp8_mb": "—" if not r.get("onnx_bytes") else
                           f"{sum(v for k, v in r['onnx_bytes'].items() if k.startswith('fp8')) / 1e6:.2f}",
            "b128_ms": ", ".join(f"{k}={v:.2f}" for k, v in latency_b128(r).items()) or "—",
        })
    return rows


def render_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table (the CLI)."""
    if not rows:
        return "no runs recorded"
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(row[c])) for row in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(row[c]).ljust(widths[c]) for c in columns) for row in rows]
    return "\n".join(line.rstrip() for line in lines)

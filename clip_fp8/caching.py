"""Cache keys from content, settings, code and libraries; never paths, timestamps or run ids.

Prefect's default policy includes the flow run id, so nothing is reused across runs. A stage's key
(``stage_key``) hashes:
- each input's content: ``ArtifactRef``s by digest (not path: an upstream stage that re-ran and wrote the
  same bytes leaves this key as it was, so the run stops there: early cutoff), config sections by the fields
  the stage declares it reads (``clip_fp8.stage.Reads``), never the whole section (locator fields such as a model path excluded: their content arrives as a ref; execution fields such
  as a worker count excluded: they change how fast, not what; flow fields such as the recovery mode
  excluded: they decide which stages run, and a stage that needs one takes it as a parameter of its own);
- the source of every project module the stage's module imports, directly or through other project
  modules, function-local imports included: found by reading the import statements
  (``clip_fp8.imports.import_closure``), so no list of modules per stage can drift from the code;
- the versions of the distributions those modules import (torch, transformers, ModelOpt, onnx, ...),
  found the same way, so a library upgrade re-keys exactly the stages that use it.
Inputs of type ``ArtifactStore`` (where to write) are ignored.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
from pathlib import Path
from typing import Any, Callable, Mapping

from pydantic import BaseModel

from clip_fp8.artifacts import ArtifactStore, sha256_json
from clip_fp8.imports import import_closure


@functools.cache
def _distributions() -> Mapping[str, list[str]]:
    return importlib.metadata.packages_distributions()


@functools.cache
def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def library_versions(import_names: set[str]) -> dict[str, str]:
    """Distribution -> version for top-level import names (e.g. modelopt -> nvidia-modelopt 0.47.0);
    a name nothing installed provides (an optional TensorRT) is recorded as absent."""
    return {dist: _version(dist) for name in sorted(import_names) for dist in _distributions().get(name, []) or [name]}


def code_identity(module: str, sources: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What a stage's code is: digests of its project modules and versions of the libraries they import."""
    modules, external = import_closure(module, sources)
    return {"code": {m: hashlib.sha256(src.encode()).hexdigest() for m, src in modules.items()},
            "libraries": library_versions(external)}


@functools.cache
def stage_code_digest(module: str) -> str:
    # Source files do not change under a running process (a deployment re-imports per flow run).
    return sha256_json(code_identity(module))


def canonical(value: Any, fields: frozenset[str] | None = None) -> Any:
    """The part of a task input that identifies its content (of a section: of the ``fields`` read, if given)."""
    if hasattr(value, "__cache_key__"):
        return {"ref": value.__cache_key__()}
    if isinstance(value, BaseModel):  # recursive, so nested models (evaluation.datasets) drop their locators too
        return {name: canonical(getattr(value, name)) for name, f in type(value).model_fields.items()
                if (fields is None or name in fields)
                and not {"locator", "execution", "flow"} & set(f.json_schema_extra or {})}  # type: ignore[arg-type]
    if isinstance(value, Path):
        raise TypeError(f"a Path ({value}) cannot be part of a cache key; pass an ArtifactRef")
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    return value


def stage_key(fn: Callable, inputs: dict[str, Any]) -> str:
    """The cache key of running stage ``fn`` on ``inputs``."""
    from clip_fp8.stage import fields_read, stage_name

    read = fields_read(fn)
    return sha256_json({
        "stage": stage_name(fn),
        "code": stage_code_digest(fn.__module__),
        "inputs": {k: canonical(v, read.get(k)) for k, v in sorted(inputs.items()) if not isinstance(v, ArtifactStore)},
    })


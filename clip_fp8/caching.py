"""The project's Prefect cache policy: keys from content and settings, never paths, timestamps or run ids.

Prefect's default policy includes the flow run id, so nothing is reused across runs. ``ContentPolicy``
keys a task on:
- each input's content: ``ArtifactRef``s by digest (not path), pydantic sections by their settings
  (locator fields such as a model path excluded: their content arrives as a ref; execution fields such
  as a worker count excluded: they change how fast, not what);
- the source of the module that holds the stage's logic, plus the shared modules it builds on;
- the versions of the libraries that shape the result (torch, transformers, ModelOpt, onnx, ...).
Inputs of type ``ArtifactStore`` (where to write) are ignored.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from pydantic import BaseModel

from clip_fp8.artifacts import ArtifactStore, sha256_json

# Modules every stage builds on; a change in one of them re-keys every stage.
_SHARED_MODULES = ("clip_fp8.artifacts", "clip_fp8.encoders", "clip_fp8.errors")
LIBRARIES = ("torch", "transformers", "nvidia-modelopt", "onnx", "onnxruntime", "open_clip_torch", "clip-benchmark")


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def module_digest(module_name: str) -> str:
    import importlib

    source = inspect.getsource(importlib.import_module(module_name))
    return hashlib.sha256(source.encode()).hexdigest()


def canonical(value: Any) -> Any:
    """The part of a task input that identifies its content."""
    if hasattr(value, "__cache_key__"):
        return {"ref": value.__cache_key__()}
    if isinstance(value, BaseModel):  # recursive, so nested models (evaluation.datasets) drop their locators too
        return {name: canonical(getattr(value, name)) for name, f in type(value).model_fields.items()
                if not {"locator", "execution"} & set(f.json_schema_extra or {})}  # type: ignore[arg-type]
    if isinstance(value, Path):
        raise TypeError(f"a Path ({value}) cannot be part of a cache key; pass an ArtifactRef")
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    return value


@dataclass
class ContentPolicy(CachePolicy):
    """Cache key = stage name + logic-module source + library versions + canonical inputs."""

    logic_module: str = ""
    extra_modules: tuple[str, ...] = field(default_factory=tuple)

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str:
        return stage_key(task_ctx.task.name, self.logic_module, self.extra_modules, inputs)


def stage_key(stage: str, logic_module: str, extra_modules: tuple[str, ...], inputs: dict[str, Any]) -> str:
    payload = {
        "stage": stage,
        "code": {m: module_digest(m) for m in (logic_module, *extra_modules, *_SHARED_MODULES) if m},
        "libraries": library_versions(),
        "inputs": {k: canonical(v) for k, v in sorted(inputs.items()) if not isinstance(v, ArtifactStore)},
    }
    return sha256_json(payload)

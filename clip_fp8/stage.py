"""The stage contract: one module per stage, one plain function named after it, no Prefect.

A stage function takes its inputs (``ArtifactRef``s of earlier stages, config sections, plain values)
and ``out_dir``, an empty private directory. It does all of the stage's work itself (loading, computing,
gating: it raises a named error from ``clip_fp8.errors``), writes its files into ``out_dir`` and returns
a ``StageOutput`` naming them. ``execute`` publishes ``out_dir`` atomically under the stage's cache key
and returns the ``ArtifactRef`` that downstream stages take. The Prefect layer
(``clip_fp8.flows.stage_task``) adds caching, retries, locks and UI artifacts around ``execute``; the
key (``clip_fp8.caching.stage_key``) is computed from the same signature.

    def quantize(model_source: ArtifactRef, calibration: ArtifactRef, ..., out_dir: Path) -> StageOutput:
        ...
        return StageOutput(files={"checkpoint": "checkpoint"}, meta={...}, reports={"quantization": md})
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from clip_fp8.artifacts import ArtifactRef, ArtifactStore, write_json_atomic

OUT_DIR = "out_dir"
SKIPPED_FILE = "skipped.json"


@dataclass
class StageOutput:
    """What a stage left in its ``out_dir``.

    ``files``: name -> path relative to ``out_dir``, for consumers (``ref.file(name)``).
    ``meta``: small facts for the report and for downstream decisions (kept in the ``ArtifactRef``).
    ``reports``: markdown documents by name; the Prefect layer publishes each as a UI artifact.
    ``skip_reason``: the stage had nothing to do here (no TensorRT, disabled); recorded, not an error.
    """

    files: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    reports: dict[str, str] = field(default_factory=dict)
    skip_reason: str | None = None

    @classmethod
    def skipped(cls, reason: str) -> "StageOutput":
        return cls(meta={"skip_reason": reason}, skip_reason=reason)


def stage_name(fn: Callable) -> str:
    """A stage is named by its module, and its entry point carries the same name."""
    module = fn.__module__.rsplit(".", 1)[-1]
    if fn.__name__ != module:
        raise TypeError(f"stage function {fn.__module__}.{fn.__name__} must be named after its module ({module})")
    return module


def stage_parameters(fn: Callable) -> list[inspect.Parameter]:
    """The stage's inputs: its parameters less ``out_dir`` (which the runner provides)."""
    params = inspect.signature(fn).parameters
    if OUT_DIR not in params:
        raise TypeError(f"stage function {fn.__module__}.{fn.__name__} must take an `{OUT_DIR}` parameter")
    return [p for name, p in params.items() if name != OUT_DIR]


def bind_inputs(fn: Callable, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Inputs by name, defaults applied: what the cache key and the stage both see."""
    signature = inspect.Signature(stage_parameters(fn))
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def execute(fn: Callable, store: ArtifactStore, key: str, inputs: dict[str, Any]) -> ArtifactRef:
    """Run one stage into a private directory, publish it as ``<store>/store/<stage>/<key>``, return its ref.

    A stage that raises publishes nothing (earlier artifacts stay as they were); a skipped stage
    publishes a directory holding only its reason, so a skip is cached and reported like any outcome.
    """
    name = stage_name(fn)
    with store.staging(name, key) as tmp:
        output = fn(**inputs, out_dir=tmp)
        if not isinstance(output, StageOutput):
            raise TypeError(f"stage {name} returned {type(output).__name__}, not StageOutput")
        if output.skip_reason is not None:
            write_json_atomic(tmp / SKIPPED_FILE, {"skip_reason": output.skip_reason})
        for doc, markdown in output.reports.items():
            (tmp / f"{doc}.md").write_text(markdown)
    files = {**output.files, **{f"report:{doc}": f"{doc}.md" for doc in output.reports}}
    return store.publish(name, key, files, output.meta)


def reports_of(ref: ArtifactRef) -> dict[str, str]:
    """The markdown documents a stage published beside its files."""
    return {name.removeprefix("report:"): ref.file(name).read_text() for name in ref.files if name.startswith("report:")}


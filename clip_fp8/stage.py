"""The stage contract: one module per stage, one plain function named after it, no Prefect.

A stage function takes its inputs (``ArtifactRef``s of earlier stages, config sections, plain values)
and ``out_dir``, an empty private directory. It does all of the stage's work itself (loading, computing,
gating: it raises a named error from ``clip_fp8.errors``), writes its files into ``out_dir`` and returns
a ``StageOutput`` naming them. ``execute`` publishes ``out_dir`` atomically under the stage's cache key
and returns the ``ArtifactRef`` that downstream stages take. The Prefect layer
(``clip_fp8.flows.stage_task``) adds caching, retries, locks and UI artifacts around ``execute``; the
key (``clip_fp8.caching.stage_key``) is computed from the same signature.

The signature is the stage's one declaration: its name (the module's), its inputs, the config fields it
reads (``Reads[Section, "field", ...]``: only those key it, and reading any other fails the stage naming
it, so the declaration cannot drift from the code) and its retries (``@stage(retries=...)``).

    @stage(retries=1)
    def quantize(model_source: ArtifactRef, calibration: ArtifactRef, ...,
                 calib_cfg: Reads[CalibrationConfig, "batch_size"], out_dir: Path) -> StageOutput:
        ...
        return StageOutput(files={"checkpoint": "checkpoint"}, meta={...}, reports={"quantization": md})
"""

from __future__ import annotations

import inspect
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable

from clip_fp8.artifacts import ArtifactRef, ArtifactStore, write_json_atomic

OUT_DIR = "out_dir"
SKIPPED_FILE = "skipped.json"
SUMMARY, SHOWN = "summary", "shown"  # where an ArtifactRef's meta keeps StageOutput.summary and .shown
DETAILS = "-details"  # a report named so is a UI artifact only, not a section of the run report


@dataclass
class StageOutput:
    """What a stage left in its ``out_dir``.

    ``files``: name -> path relative to ``out_dir``, for consumers (``ref.file(name)``).
    ``meta``: small facts for the report and for downstream decisions (kept in the ``ArtifactRef``).
    ``reports``: markdown documents by name; the Prefect layer publishes each as a UI artifact, and the run
    report shows each as a section (in stage order), except those named ``*-details`` (the UI only).
    ``summary``: what the stage adds to the run's summary.json (dicts merge, a later stage's value wins).
    ``shown``: artifact name -> one of ``files`` ("" = the whole artifact), listed in the summary's artifacts.
    ``skip_reason``: the stage had nothing to do here (no TensorRT, disabled); recorded, not an error.
    """

    files: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    reports: dict[str, str] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    shown: dict[str, str] = field(default_factory=dict)
    skip_reason: str | None = None

    @classmethod
    def skipped(cls, reason: str) -> "StageOutput":
        return cls(meta={"skip_reason": reason}, skip_reason=reason)


class Reads:
    """``Reads[Section, "a", "b"]``: a config section of which the stage reads fields ``a`` and ``b`` only.

    The stage's key holds those fields' values, not the whole section (early cutoff: a change to a field the
    stage does not read leaves its key, and everything after it, as it was); ``execute`` hands the stage a view
    that refuses any other field, naming it."""

    def __init__(self, fields: tuple[str, ...]):
        self.fields = frozenset(fields)

    def __class_getitem__(cls, params):
        section, *fields = params if isinstance(params, tuple) else (params,)
        unknown = sorted(set(fields) - set(section.model_fields))
        if unknown:
            raise TypeError(f"Reads[{section.__name__}, ...]: {section.__name__} has no field {', '.join(unknown)}")
        return Annotated[section, cls(tuple(fields))]


# Every stage function declared in this process (``@stage``), in the order their modules were imported.
STAGES: list[Callable] = []


@dataclass(frozen=True)
class StageSpec:
    """What a stage declares beside its signature: retries for transient failures, and an optional concurrency
    limit named from its inputs (the benchmark's ``gpu:<GPU type>``: one timing per GPU type at a time)."""

    retries: int = 0
    limit: Callable[[dict[str, Any]], str | None] | None = None


def stage(*, retries: int = 0, limit: Callable[[dict[str, Any]], str | None] | None = None):
    """Declare a stage: the function named after its module, with its retries and limit; nothing else registers it."""
    def declare(fn: Callable) -> Callable:
        stage_name(fn)  # named after its module, or a TypeError now
        stage_parameters(fn)
        fn.__stage__ = StageSpec(retries=retries, limit=limit)
        if fn not in STAGES:
            STAGES.append(fn)
        return fn
    return declare


def pipeline_stages() -> list[Callable]:
    """The declared stages of this package (``clip_fp8.tasks``), not a test's or a user's own."""
    return [fn for fn in STAGES if fn.__module__.startswith("clip_fp8.tasks.")]


def spec_of(fn: Callable) -> StageSpec:
    try:
        return fn.__stage__
    except AttributeError:
        raise TypeError(f"{fn.__module__}.{fn.__name__} is not declared a stage (@stage)") from None


def fields_read(fn: Callable) -> dict[str, frozenset[str]]:
    """Parameter -> the config fields a stage declares it reads (``Reads``), for every section parameter."""
    hints = typing.get_type_hints(fn, globalns=vars(sys.modules[fn.__module__]), include_extras=True)
    declared = {}
    for name, hint in hints.items():
        options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        for option in options:
            marks = [m for m in getattr(option, "__metadata__", ()) if isinstance(m, Reads)]
            if marks:
                declared[name] = marks[0].fields
    return declared


class SectionView:
    """A config section as a stage sees it: the fields it declared, and an error naming any other."""

    __slots__ = ("_section", "_fields", "_where")

    def __init__(self, section, fields: frozenset[str], where: str):
        object.__setattr__(self, "_section", section)
        object.__setattr__(self, "_fields", fields)
        object.__setattr__(self, "_where", where)

    def __getattr__(self, name: str):
        section = object.__getattribute__(self, "_section")
        if name in type(section).model_fields and name not in object.__getattribute__(self, "_fields"):
            where = object.__getattribute__(self, "_where")
            raise AttributeError(f"{where} reads field '{name}', which its signature does not declare: add it to "
                                 f"its Reads[...] so that a change to it re-runs the stage")
        if name in ("model_dump", "model_dump_json", "__iter__"):
            raise AttributeError(f"{object.__getattribute__(self, '_where')}: a stage reads named fields, not the "
                                 "whole section")
        return getattr(section, name)

    def __setattr__(self, name, value):
        raise AttributeError("a stage's config is read-only")

    def model_copy(self, update: dict | None = None, **kwargs) -> "SectionView":
        """A copy with ``update`` applied: the updated fields are the stage's own choice, readable too."""
        section = object.__getattribute__(self, "_section").model_copy(update=update, **kwargs)
        return SectionView(section, object.__getattribute__(self, "_fields") | set(update or {}),
                           object.__getattribute__(self, "_where"))

    def __repr__(self) -> str:
        section = object.__getattribute__(self, "_section")
        fields = sorted(object.__getattribute__(self, "_fields"))
        return f"{type(section).__name__}({', '.join(f'{f}={getattr(section, f)!r}' for f in fields)})"


def views(fn: Callable, inputs: dict[str, Any]) -> dict[str, Any]:
    """``inputs`` with each declared section replaced by its ``SectionView``."""
    declared = fields_read(fn)
    return {k: SectionView(v, declared[k], f"stage {stage_name(fn)}: {k}") if k in declared and v is not None else v
            for k, v in inputs.items()}


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
        output = fn(**views(fn, inputs), out_dir=tmp)
        if not isinstance(output, StageOutput):
            raise TypeError(f"stage {name} returned {type(output).__name__}, not StageOutput")
        if output.skip_reason is not None:
            write_json_atomic(tmp / SKIPPED_FILE, {"skip_reason": output.skip_reason})
        for doc, markdown in output.reports.items():
            (tmp / f"{doc}.md").write_text(markdown)
    files = {**output.files, **{f"report:{doc}": f"{doc}.md" for doc in output.reports}}
    meta = {**output.meta, **({SUMMARY: output.summary} if output.summary else {}),
            **({SHOWN: output.shown} if output.shown else {})}
    return store.publish(name, key, files, meta)


def reports_of(ref: ArtifactRef) -> dict[str, str]:
    """The markdown documents a stage published beside its files."""
    return {name.removeprefix("report:"): ref.file(name).read_text() for name in ref.files if name.startswith("report:")}


"""The Prefect layer over the stage functions: one generic wrapper gives every stage the same task.

``stage_task(fn)`` turns a declared stage function (``clip_fp8.stage``, ``@stage``) into a Prefect task
(one per function, made on first use) whose parameters are the function's own (less ``out_dir``, plus the
``store`` to publish into), with:
- caching: ``StagePolicy`` keys it with ``clip_fp8.caching.stage_key`` (content, settings, the source of
  every module it imports, library versions), computed once by Prefect and read back inside the task;
- the retries the stage declares, for transient failures only (``clip_fp8.errors.is_transient`` decides);
- atomic publication (``clip_fp8.stage.execute``) and the stage's markdown reports as UI artifacts,
  also those a failing stage attaches to its error (the audit table, the gate table);
- its imports resolved before it runs, one stage at a time (``clip_fp8.imports.preload``: lazy
  packages are not thread-safe to resolve);
- the Prefect concurrency limit the stage names from its inputs, if any (the benchmark's ``gpu:<GPU name>``);
- wall-clock start and end of each execution, for the run report (cache hits do not execute).
Result records and cache-key locks are per run (``output.root``): ``stage_results`` sets them (locks in the
bucket itself for an ``s3://`` root, so that hosts sharing only the bucket compute each artifact once).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import CachePolicy
from prefect.context import FlowRunContext, TaskRunContext
from prefect.results import ResultStore, resolve_result_storage
from prefect.transactions import get_transaction

from clip_fp8.artifacts import ArtifactRef, ArtifactStore
from clip_fp8.caching import stage_key
from clip_fp8.errors import PipelineError, is_transient
from clip_fp8.imports import preload
from clip_fp8.locking import LeasedFileLockManager
from clip_fp8.stage import (
    bind_inputs, execute, pipeline_stages, reports_of, spec_of, stage_name, stage_parameters,
)

# task run id -> (start, end) wall-clock seconds of executions in this process.
EXECUTIONS: dict[str, tuple[float, float]] = {}
# stage name -> how many of its executions are under way in this process (an interrupt names them).
RUNNING: dict[str, int] = {}
# task run ids that found their artifact already published (a run killed after publishing, before Prefect
# recorded its result): nothing executed, so the report calls them cached.
REUSED: set[str] = set()
_EXECUTIONS_LOCK = threading.Lock()


@dataclass
class StagePolicy(CachePolicy):
    """Prefect's cache key for a stage: ``stage_key`` over the task's bound inputs."""

    fn: Callable | None = None

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str:
        return stage_key(self.fn, inputs)


def warm_keys() -> None:
    """Compute the code part of every stage's key and parse the imports ``preload`` resolves, now, in the
    calling thread (about a second on 2 cores): a flow calls it before it submits a stage, because Python
    3.11's parser is not safe beside another thread's parse (``clip_fp8.imports._parse``); the CLI calls
    it while a Prefect server starts."""
    from clip_fp8.caching import stage_code_digest
    from clip_fp8.imports import parse_closure

    for fn in pipeline_stages():
        stage_code_digest(fn.__module__)
        parse_closure(fn.__module__)


def retry_transient_only(task, task_run, state) -> bool:
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - the point is to classify it
        return is_transient(exc)
    return False


def publish_reports(reports: dict[str, str], stage: str) -> None:
    for key, markdown in reports.items():
        create_markdown_artifact(key=key, markdown=markdown, description=f"clip-fp8 {stage}")


@functools.cache
def stage_task(fn: Callable):
    """The Prefect task of stage ``fn``: same parameters, cached, retried, published (see module docstring)."""
    name = stage_name(fn)
    spec = spec_of(fn)
    retries, limit = spec.retries, spec.limit

    def run_stage(*args, store: ArtifactStore, **kwargs) -> ArtifactRef:
        inputs = bind_inputs(fn, args, kwargs)
        key = get_transaction().key  # the cache key Prefect computed with StagePolicy, not recomputed
        run = TaskRunContext.get()
        if (ref := store.published(name, key)) is not None:
            if run is not None:
                with _EXECUTIONS_LOCK:
                    REUSED.add(str(run.task_run.id))
            return ref
        started = time.time()
        with _EXECUTIONS_LOCK:
            RUNNING[name] = RUNNING.get(name, 0) + 1
        preload(fn.__module__)  # the stage's imports, resolved one thread at a time
        try:
            if limit is not None and (limit_name := limit(inputs)):
                from prefect.concurrency.sync import concurrency

                # strict=False: without the limit (a bare `clip-fp8 run`), run unthrottled.
                with concurrency(limit_name, occupy=1, strict=False):
                    ref = execute(fn, store, key, inputs)
            else:
                ref = execute(fn, store, key, inputs)
        except PipelineError as exc:
            publish_reports(exc.reports, name)
            raise
        finally:
            with _EXECUTIONS_LOCK:
                RUNNING[name] -= 1
                if run is not None:
                    EXECUTIONS[str(run.task_run.id)] = (started, time.time())
        publish_reports(reports_of(ref), name)
        return ref

    params = [*stage_parameters(fn),
              inspect.Parameter("store", inspect.Parameter.KEYWORD_ONLY, annotation=ArtifactStore)]
    run_stage.__signature__ = inspect.Signature(params, return_annotation=ArtifactRef)
    run_stage.__name__ = run_stage.__qualname__ = name
    run_stage.__doc__ = fn.__doc__
    run_stage.__wrapped_stage__ = fn  # the plain function, for tools and tests
    return task(
        run_stage,
        name=name,
        cache_policy=StagePolicy(fn=fn, isolation_level="SERIALIZABLE"),
        persist_result=True,
        retries=retries,
        retry_delay_seconds=[2, 10, 30][:retries] if retries else 0,
        retry_jitter_factor=0.5 if retries else None,
        retry_condition_fn=retry_transient_only,
    )


def result_storage(store: ArtifactStore):
    """Prefect result storage for a store: a local path, or a saved RemoteFileSystem block at
    ``<url>/prefect-results`` (Prefect requires a remote one saved), so every worker sees every cache hit."""
    if not store.remote:
        return store.results.resolve()
    from prefect.filesystems import RemoteFileSystem

    name = f"clip-fp8-results-{hashlib.sha256(store.url.encode()).hexdigest()[:12]}"
    RemoteFileSystem(basepath=f"{store.url}/prefect-results").save(name, overwrite=True)
    return f"remote-file-system/{name}"


def lock_manager(store: ArtifactStore):
    """Where cache-key locks live: in the bucket for an ``s3://`` store (hosts that share only the bucket
    must see each other's locks), else as files beside the store's local root."""
    if store.remote and store.url.startswith("s3://"):
        import fsspec

        from clip_fp8.object_locks import ObjectStoreLockManager

        return ObjectStoreLockManager(fsspec.core.url_to_fs(store.url)[0], f"{store.url}/locks")
    return LeasedFileLockManager(store.root.resolve() / "locks")


class VerifyingResultStore(ResultStore):
    """Prefect's result store, whose cache hit is a hit only when the artifact behind the record is intact
    (``clip_fp8.integrity``): a corrupt one is quarantined and named, and the stage runs again."""

    artifact_root: Optional[Path] = None

    def exists(self, key: str) -> bool:
        return super().exists(key) and self._intact(key)

    async def aexists(self, key: str) -> bool:
        return await super().aexists(key) and self._intact(key)

    def _intact(self, key: str) -> bool:
        from prefect.results import ResultRecord
        from prefect._internal.compatibility.blocks import call_explicitly_sync_block_method

        from clip_fp8.integrity import refuse_corrupt

        try:  # read as Prefect's own exists() does (no lock: the transaction asking holds it)
            record = ResultRecord.deserialize(call_explicitly_sync_block_method(self.result_storage, "read_path", (key,), {}))
        except Exception:  # noqa: BLE001 - not a record this check can read: Prefect decides as before
            return True
        ref = record.result
        if not isinstance(ref, ArtifactRef) or self.artifact_root is None or (ref.uri and not Path(ref.path).is_dir()):
            return True  # another host's artifact: checked when it is downloaded (ArtifactRef.local_dir)
        return not refuse_corrupt(self.artifact_root, Path(ref.path), ref)


@contextmanager
def stage_results(store: ArtifactStore):
    """Within the block, stage tasks keep their result and cache records beside the artifacts (a local
    path, or a RemoteFileSystem block for a URL store) and lock cache keys with leases that a killed run
    cannot keep (``clip_fp8.locking``). Prefect reads both from the flow run's result store, which this
    replaces for the block; the task runner's threads inherit it. Entered in the flow's thread before any
    stage is submitted, it also computes the stages' code keys there (``warm_keys``)."""
    warm_keys()
    context = FlowRunContext.get()
    result_store = VerifyingResultStore(
        result_storage=resolve_result_storage(result_storage(store)), lock_manager=lock_manager(store),
        artifact_root=store.root)
    with context.model_copy(update={"result_store": result_store}):
        yield

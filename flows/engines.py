"""Engines where the GPUs are: the build matrix (``build.targets``).

A TensorRT engine is valid only on the GPU type it was built on. Each target names a GPU type and the work
pool whose workers have it; ``clip-fp8 deploy --target 'GPU=POOL'`` creates the pool and this flow's
deployment for it (``clip-fp8-engines/<gpu slug>``). After surgery the pipeline starts one run of that
deployment per target (``engines_on_target``, a sub-run of the pipeline's in the UI) with the repaired graphs
as parameters; on its worker the run builds both variants and times them (``clip_fp8_engines``: the same
``build`` and ``benchmark`` stage tasks, cache and store as a local build; the benchmark holds the
``gpu:<GPU type>`` concurrency limit), and reports through a one-row table artifact. The parent waits:
a run no worker picks up within ``build.target_timeout`` is cancelled and the target reported ``pending``;
the rest of the pipeline completes either way, and the report shows one table per target.
"""

from __future__ import annotations

import json
import time

from prefect import flow, get_client, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment
from prefect.futures import wait
from prefect.runtime import flow_run
from prefect.states import Cancelled
from prefect.task_runners import ThreadPoolTaskRunner

from clip_fp8.artifacts import ArtifactRef, ArtifactStore
from clip_fp8.config import BuildConfig, BuildTarget, PipelineConfig
from clip_fp8.errors import BuildTargetError, PipelineInputError
from clip_fp8.security import check_allowed_roots
from clip_fp8.flows.stage_task import stage_results, stage_task
from clip_fp8.flows.failures import first_line, one_line, outcome_row
from clip_fp8.tasks.benchmark import benchmark
from clip_fp8.tasks.build import build
from clip_fp8.tasks.tensorrt import Target, gpu_limit_name, resolve_target

ENGINES_FLOW = "clip-fp8-engines"
ENGINES_ENTRYPOINT = "flows/engines.py:clip_fp8_engines"
ENGINES_OUTCOME = "clip-fp8-engines-outcome"
POLL_S = 2.0



def engines_deployment(target: BuildTarget) -> str:
    return f"{ENGINES_FLOW}/{target.slug}"


def engine_target(found: Target, target: BuildTarget) -> Target:
    """What a target's engines are built for: this worker's backend, labelled with the target's GPU type. A worker
    that sees a GPU of another type is refused (its engines would be labelled for a GPU they do not run on); one
    that sees none (TensorRT-RTX builds ahead of time) builds for the target's type."""
    if found.unavailable:
        return found
    if found.gpu not in ("none", target.gpu):
        raise BuildTargetError(
            f"build target '{target.gpu}': a worker of pool '{target.work_pool}' has a {found.gpu}, and an engine is "
            f"valid only on the GPU type it was built on; run only {target.gpu} workers on pool '{target.work_pool}'")
    return found.model_copy(update={"gpu": target.gpu})


def check_targets(cfg: BuildConfig) -> None:
    """Before any stage starts: every target's engines deployment exists, on the target's pool."""
    if not cfg.targets:
        return
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for target in cfg.targets:
            name = engines_deployment(target)
            fix = f"create it with `clip-fp8 deploy --target '{target.gpu}={target.work_pool}'`"
            try:
                deployment = client.read_deployment_by_name(name)
            except ObjectNotFound:
                raise PipelineInputError(f"build.targets: no deployment '{name}' for GPU type '{target.gpu}' on the "
                                         f"Prefect server at {client.api_url}; {fix}") from None
            if deployment.work_pool_name != target.work_pool:
                raise PipelineInputError(f"build.targets: deployment '{name}' runs on pool '{deployment.work_pool_name}', "
                                         f"not '{target.work_pool}'; {fix}")


@flow(name=ENGINES_FLOW, log_prints=True, validate_parameters=True, task_runner=ThreadPoolTaskRunner(max_workers=3))
def clip_fp8_engines(target: BuildTarget, repaired: list[ArtifactRef], model_source: ArtifactRef,
                     torch_fp8: ArtifactRef | None = None, config: PipelineConfig = PipelineConfig()) -> dict:
    """Build and time the repaired graphs' engines on this worker's GPU, for one target of the build matrix."""
    check_allowed_roots(config)
    store = ArtifactStore(config.output.root)
    outcome = {"target": target.gpu, "status": "failed", "error": "", "builds": "[]", "benchmark": ""}
    try:
        built_for = engine_target(resolve_target(config.build), target)
        with stage_results(store):
            builds = [stage_task(build).submit(ref, config.build, built_for, store=store) for ref in repaired]
            timed = stage_task(benchmark).submit(builds, model_source, torch_fp8, config.model, config.benchmark,
                                                 config.serving, built_for, store=store)
            wait([*builds, timed])
        done = [f.state.result() for f in builds if f.state.is_completed()]
        outcome["builds"] = json.dumps([ref.model_dump(mode="json") for ref in done])
        if timed.state.is_completed():
            outcome["benchmark"] = timed.state.result().model_dump_json()
        for future in (*builds, timed):
            future.result()  # the first failure, raised
        outcome["status"] = "completed"
        return outcome
    except BaseException as exc:
        outcome["error"] = one_line(exc)
        raise
    finally:
        create_table_artifact(key=ENGINES_OUTCOME, table=[outcome],
                              description=f"clip-fp8 engines for {target.gpu}: outcome")


@task(name="engines-on-target", cache_policy=NO_CACHE)
def engines_on_target(target: BuildTarget, repaired: list[ArtifactRef], model_source: ArtifactRef,
                      torch_fp8: ArtifactRef | None, config: PipelineConfig) -> dict:
    """Start the target's engines run on its pool and wait for it. ``pending`` (and the run cancelled) when no
    worker picked it up within ``build.target_timeout``; a failed run raises ``BuildTargetError``, carrying what
    it built (``target_result``) for the report."""
    cfg = config.build
    parameters = {"target": target.model_dump(mode="json"), "repaired": [r.model_dump(mode="json") for r in repaired],
                  "model_source": model_source.model_dump(mode="json"),
                  "torch_fp8": torch_fp8.model_dump(mode="json") if torch_fp8 else None,
                  "config": config.model_dump(mode="json")}
    run = run_deployment(engines_deployment(target), parameters=parameters, timeout=0, work_queue_name=target.work_queue,
                         flow_run_name=f"{flow_run.get_name() or 'local'}-{target.slug}",
                         tags=["clip-fp8", "engines", gpu_limit_name(target.gpu)])
    result = {"gpu": target.gpu, "work_pool": target.work_pool, "worker": "", "flow_run": run.name,
              "flow_run_id": str(run.id), "status": "", "reason": "", "builds": [], "benchmark": None}
    print(f"{target.gpu}: started {run.name} on pool '{target.work_pool}'")
    started = time.time()
    with get_client(sync_client=True) as client:
        claimed_at = None
        while True:
            current = client.read_flow_run(run.id)
            state = current.state
            if state is not None and state.is_final():
                break
            if claimed_at is None and state is not None and not state.is_scheduled():
                claimed_at = time.time()  # a worker took it (Pending, then Running)
            if claimed_at is None and time.time() - started > cfg.target_timeout:
                client.set_flow_run_state(run.id, Cancelled(message="no worker picked it up (build.target_timeout)"))
                result.update(status="pending", reason=(
                    f"no worker of pool '{target.work_pool}' picked up {run.name} within {cfg.target_timeout:.0f} s "
                    f"(run cancelled); start one: prefect worker start --pool {target.work_pool}"))
                print(f"{target.gpu}: pending: {result['reason']}")
                return result
            if claimed_at is not None and time.time() - claimed_at > cfg.target_run_timeout:
                raise BuildTargetError(f"build target '{target.gpu}': {run.name} did not finish within "
                                       f"{cfg.target_run_timeout:.0f} s (build.target_run_timeout)")
            time.sleep(POLL_S)
        result["worker"] = current.labels.get("prefect.worker.name", "") if current.labels else ""
        result["work_pool"] = current.work_pool_name or target.work_pool
        row = outcome_row(client, run.id, ENGINES_OUTCOME)
    result["builds"] = json.loads(row.get("builds") or "[]")
    result["benchmark"] = json.loads(row["benchmark"]) if row.get("benchmark") else None
    if not state.is_completed():
        error = row.get("error") or first_line(state.message) or state.name
        result.update(status="failed", reason=error)
        exc = BuildTargetError(f"build target '{target.gpu}' ({run.name} on pool '{result['work_pool']}'): {error}")
        exc.target_result = result  # type: ignore[attr-defined]
        raise exc
    result["status"] = "completed"
    print(f"{target.gpu}: {run.name} completed on worker '{result['worker']}'")
    return result

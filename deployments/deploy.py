"""Create the work pool, the GPU concurrency limit and the deployments. Idempotent: run it as often as you like.

    clip-fp8 deploy [--work-pool gpu] [--nightly-cron "0 2 * * *"] [--timezone Europe/Berlin] [--gpu-name "NVIDIA H100 80GB HBM3"]
                    [--target "NVIDIA H100 80GB HBM3=h100" --target "NVIDIA L40S=l40s" [--target-pool-type kubernetes]]

- ``clip-fp8-on-demand``: no schedule; the run form in the UI is the pipeline's ``PipelineConfig``.
- ``clip-fp8-nightly``: cron with an explicit timezone; production parameters (ViT-L/14, COCO).
  A night with nothing changed completes from the cache in seconds and its report says so.
- Work pool: ``process`` by default; ``docker/`` and ``deployments/job-templates/`` hold templates for
  docker and kubernetes pools with GPUs.
- Global concurrency limit ``gpu:<GPU name>`` with one slot: the benchmark stage takes it, so two runs
  never time engines on the same GPU type at once.
- With ``--models models.yaml``: ``clip-fp8-models-nightly`` (``flows/models_night.py``) on the nightly's
  schedule, one pipeline run per model of the file and one table for all; the single-model nightly is
  then deployed paused.
- With ``--target 'GPU=POOL[/QUEUE]'`` (repeatable): the build matrix (``flows/engines.py``). Per target a work
  pool (``--target-pool-type``: process, or kubernetes from ``job-templates/kubernetes-gpu.json``), the GPU's
  concurrency limit and the deployment ``clip-fp8-engines/<gpu slug>`` on that pool, whose job variables
  take the GPU type from the target (kubernetes: ``gpu_product``, the node selector; docker: a GPU device
  request); the on-demand and nightly runs get ``build.targets`` so that they fan out over the pools.
- With ``--notify-block NAME``: the automation in ``automations/regression-alert.yaml``, sending a
  notification through your Prefect notification block NAME whenever a run regressed.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from pydantic import ValidationError

from clip_fp8.config import BuildConfig, BuildTarget, ModelsFile, PipelineConfig
from clip_fp8.flows.engines import ENGINES_ENTRYPOINT
from clip_fp8.tasks.tensorrt import gpu_info, gpu_limit_name

REPO_ROOT = Path(__file__).resolve().parent.parent
ENTRYPOINT = "flows/pipeline.py:clip_fp8_pipeline"
ON_DEMAND = "clip-fp8-on-demand"
NIGHTLY = "clip-fp8-nightly"
MODELS_ENTRYPOINT = "flows/models_night.py:clip_fp8_models"
MODELS_NIGHTLY = "clip-fp8-models-nightly"
REGRESSION_ALERT = Path(__file__).resolve().parent / "automations" / "regression-alert.yaml"
CRASHED_RUNS = Path(__file__).resolve().parent / "automations" / "crashed-runs.yaml"
# Seconds between a running flow's heartbeats (Prefect's minimum is 30); the zombie automation waits several.
HEARTBEAT_S = 30
JOB_TEMPLATES = Path(__file__).resolve().parent / "job-templates"
POOL_TYPES = ("process", "docker", "kubernetes")


def parse_target(text: str) -> BuildTarget:
    """'NVIDIA H100 80GB HBM3=h100' or '...=gpus/h100' (pool/queue): one target of ``build.targets``."""
    gpu, sep, where = text.rpartition("=")
    pool, _, queue = where.partition("/")
    if not sep or not gpu.strip() or not pool.strip():
        raise ValueError(f"--target '{text}' is not of the form 'GPU type=work pool[/queue]', "
                         "e.g. --target 'NVIDIA H100 80GB HBM3=h100'")
    return BuildTarget(gpu=gpu.strip(), work_pool=pool.strip(), work_queue=queue.strip() or None)


def target_job_variables(pool_type: str, target: BuildTarget) -> dict:
    """The job variables that put a target's engines run on its GPU type: the kubernetes template's node
    selector (GPU feature discovery's ``nvidia.com/gpu.product`` label: the name with dashes), docker's
    device request (the pool's hosts have that GPU), nothing for a process pool (its workers' host has it)."""
    if pool_type == "kubernetes":
        return {"gpu_product": target.gpu.replace(" ", "-"), "gpu_count": 1}
    if pool_type == "docker":
        docker = json.loads((JOB_TEMPLATES / "docker-gpu.json").read_text())
        return {"container_create_kwargs": docker["container_create_kwargs"],
                "labels": {"clip-fp8.gpu": target.gpu}}
    return {}


def production_config() -> PipelineConfig:
    """What the nightly run quantizes: the reference recipe, from paths a GPU worker mounts."""
    return PipelineConfig().with_overrides([
        "model.source=laion/CLIP-ViT-L-14-laion2B-s32B-b82K",
        "calibration.source=coco:/data/coco2017",
        "calibration.num_samples=8192",
        "calibration.batch_size=512",
        "output.root=/data/clip-fp8",
    ])


async def ensure_work_pool(name: str, pool_type: str = "process") -> None:
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    async with get_client() as client:
        try:
            await client.read_work_pool(name)
            return
        except ObjectNotFound:
            pass
        template = (ProcessWorker.get_default_base_job_template() if pool_type == "process" else
                    _template_without_comment(JOB_TEMPLATES / "kubernetes-gpu.json") if pool_type == "kubernetes" else {})
        await client.create_work_pool(WorkPoolCreate(name=name, type=pool_type, base_job_template=template))


def _template_without_comment(path: Path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if k != "_comment"}


async def ensure_concurrency_limit(name: str, slots: int = 1) -> None:
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectNotFound

    async with get_client() as client:
        try:
            await client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            await client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))


async def ensure_regression_alert(block_name: str) -> str:
    """The regression automation, notifying through the notification block ``block_name`` (replaced if it exists)."""
    import yaml
    from prefect import get_client
    from prefect.events.schemas.automations import AutomationCore

    async with get_client() as client:
        block = next((b for b in await client.read_block_documents() if b.name == block_name), None)
        if block is None:
            raise ValueError(f"no Prefect block named '{block_name}'; create a notification block first "
                             "(e.g. `prefect block create slack-webhook`)")
        text = REGRESSION_ALERT.read_text().replace("${NOTIFY_BLOCK_ID}", str(block.id))
        automation = AutomationCore.model_validate(yaml.safe_load(text))
        for existing in await client.read_automations_by_name(automation.name):
            await client.delete_automation(existing.id)
        return str(await client.create_automation(automation))


async def ensure_crash_recovery(crash_after: int, crash_retries: int) -> dict[str, str]:
    """The automations of ``crashed-runs.yaml`` with their bounds filled in (replacing older ones of their names)."""
    import yaml
    from prefect import get_client
    from prefect.events.schemas.automations import AutomationCore

    text = (CRASHED_RUNS.read_text().replace("${CRASH_AFTER}", str(crash_after))
            .replace("${RUN_COUNTS}", json.dumps([str(n) for n in range(crash_retries + 1)])))
    ids = {}
    async with get_client() as client:
        for spec in yaml.safe_load(text):
            automation = AutomationCore.model_validate(spec)
            for existing in await client.read_automations_by_name(automation.name):
                await client.delete_automation(existing.id)
            ids[f"{automation.name} (automation)"] = str(await client.create_automation(automation))
    return ids


def deploy_all(work_pool: str = "gpu", nightly_cron: str = "0 2 * * *", timezone: str = "UTC",
               gpu_names: tuple[str, ...] = (), on_demand_config: PipelineConfig | None = None,
               nightly_config: PipelineConfig | None = None, notify_block: str | None = None,
               models: ModelsFile | None = None, targets: tuple[BuildTarget, ...] = (),
               target_pool_type: str = "process", crash_after: int = 300, crash_retries: int = 2) -> dict[str, str]:
    """Create or update everything; return deployment name -> id."""
    from prefect import flow
    from prefect.schedules import Cron

    try:  # one line for a bad list (the same GPU type twice), before anything is created
        BuildConfig(targets=list(targets))
    except ValidationError as exc:
        raise ValueError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None
    if target_pool_type not in POOL_TYPES:
        raise ValueError(f"--target-pool-type '{target_pool_type}' is not one of {', '.join(POOL_TYPES)}")
    if crash_after < 2 * HEARTBEAT_S or crash_retries < 0:  # before anything is created
        raise ValueError(f"--crash-after {crash_after} s must be at least {2 * HEARTBEAT_S} (two heartbeats: a live run "
                         f"would be marked Crashed) and --crash-retries {crash_retries} at least 0")
    heartbeat = {"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S)}}
    asyncio.run(ensure_work_pool(work_pool))
    local_gpu, _ = gpu_info()
    for gpu in {*gpu_names, *(t.gpu for t in targets), *([local_gpu] if local_gpu != "none" else [])}:
        asyncio.run(ensure_concurrency_limit(gpu_limit_name(gpu)))
    ids = {}
    if targets:  # the build matrix: engines runs on each GPU type's pool, and runs that fan out to them
        with_targets = [f"build.targets={json.dumps([t.model_dump(mode='json') for t in targets])}"]
        on_demand_config = (on_demand_config or PipelineConfig()).with_overrides(with_targets)
        nightly_config = (nightly_config or production_config()).with_overrides(with_targets)
        engines = flow.from_source(source=str(REPO_ROOT), entrypoint=ENGINES_ENTRYPOINT)
        for target in targets:
            asyncio.run(ensure_work_pool(target.work_pool, target_pool_type))
            ids[f"clip-fp8-engines/{target.slug}"] = str(engines.deploy(
                name=target.slug, work_pool_name=target.work_pool, work_queue_name=target.work_queue, build=False,
                push=False, print_next_steps=False, job_variables=_with_env(target_job_variables(target_pool_type, target), heartbeat),
                description=f"Build and time clip-fp8 engines on {target.gpu} (started by the pipeline's runs).",
                tags=["clip-fp8", "engines", gpu_limit_name(target.gpu)]))

    source = flow.from_source(source=str(REPO_ROOT), entrypoint=ENTRYPOINT)
    ids[ON_DEMAND] = str(source.deploy(
        name=ON_DEMAND, work_pool_name=work_pool, build=False, push=False, print_next_steps=False, job_variables=heartbeat,
        parameters={"config": (on_demand_config or PipelineConfig()).model_dump(mode="json")},
        description="Run the clip-fp8 pipeline once; every section of the form is a PipelineConfig section.",
        tags=["clip-fp8", "on-demand"],
    ))
    ids[NIGHTLY] = str(source.deploy(
        name=NIGHTLY, work_pool_name=work_pool, build=False, push=False, print_next_steps=False, job_variables=heartbeat,
        parameters={"config": (nightly_config or production_config()).model_dump(mode="json")},
        schedules=[Cron(nightly_cron, timezone=timezone)], paused=models is not None,
        description="Nightly re-quantization of the production CLIP; unchanged inputs finish from the cache."
        + (f" Paused: {MODELS_NIGHTLY} runs the models file." if models is not None else ""),
        tags=["clip-fp8", "nightly"],
    ))
    if models is not None:
        many = flow.from_source(source=str(REPO_ROOT), entrypoint=MODELS_ENTRYPOINT)
        ids[MODELS_NIGHTLY] = str(many.deploy(
            name=MODELS_NIGHTLY, work_pool_name=work_pool, build=False, push=False, print_next_steps=False,
            job_variables=heartbeat,
            parameters={"models": [m.model_dump(mode="json") for m in models.models],
                        "config": (nightly_config or production_config()).model_dump(mode="json"),
                        "deployment": f"clip-fp8/{ON_DEMAND}"},
            schedules=[Cron(nightly_cron, timezone=timezone)],
            description="Nightly: one clip-fp8 pipeline run per model of the models file, one table for all.",
            tags=["clip-fp8", "nightly", "models"],
        ))
    ids.update(asyncio.run(ensure_crash_recovery(crash_after, crash_retries)))
    if notify_block:
        ids["regression-alert (automation)"] = asyncio.run(ensure_regression_alert(notify_block))
    return ids


def _with_env(job_variables: dict, extra: dict) -> dict:
    return {**job_variables, "env": {**(job_variables.get("env") or {}), **extra["env"]}}

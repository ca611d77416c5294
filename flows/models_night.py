"""Several models a night: each model its own run of the pipeline's deployment, one table for all of them.

``clip-fp8 deploy --models models.yaml`` deploys this flow as ``clip-fp8-models-nightly``. Each entry's
configuration (the nightly's ``config``, the entry's model, then its overrides) is checked first: an
entry whose configuration is broken fails alone, with its message, and starts nothing. The others start
at once as runs of the pipeline's deployment (sub-runs of this one in the UI, each with the model's
name), on whatever workers the pool has. A model whose run fails (a missing checkpoint, a failed gate)
does not stop the others. This run waits for all of them, publishes one table (the ``clip-fp8-models``
artifact: model, run, state, promotable, the first error, the report) and then fails naming the models
that failed, if any did.
"""

from __future__ import annotations

import time

from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.deployments import run_deployment
from prefect.runtime import flow_run

from clip_fp8.config import ModelEntry, PipelineConfig
from clip_fp8.flows.pipeline import OUTCOME_ARTIFACT
from clip_fp8.flows.failures import first_line, outcome_row

PIPELINE_DEPLOYMENT = "clip-fp8/clip-fp8-on-demand"


@flow(name="clip-fp8-models", log_prints=True, validate_parameters=True)
def clip_fp8_models(models: list[ModelEntry], config: PipelineConfig = PipelineConfig(),
                    deployment: str = PIPELINE_DEPLOYMENT, timeout_s: float = 12 * 3600,
                    poll_s: float = 5.0) -> list[dict]:
    """Run the pipeline once per model, all at once; one table of outcomes; fail if any model failed."""
    from prefect import get_client

    rows: dict[str, dict] = {}
    started = {}
    prefix = flow_run.get_name() or "models"
    for entry in models:
        row = {"model": entry.name, "source": entry.source, "run": "", "state": "", "promotable": False,
               "error": "", "report": ""}
        rows[entry.name] = row
        try:
            config_i = entry.config(config)
        except ValueError as exc:  # a bad override: one line naming the entry, and this entry only fails
            row.update(state="Failed", error=first_line(str(exc)))
            print(f"{entry.name}: {row['error']}")
            continue
        run = run_deployment(deployment, parameters={"config": config_i.model_dump(mode="json")}, timeout=0,
                             flow_run_name=f"{entry.name}-{prefix}", tags=["clip-fp8", f"model:{entry.name}"])
        started[entry.name] = run.id
        row["run"] = run.name
        print(f"{entry.name}: started {run.name}")

    deadline = time.time() + timeout_s
    with get_client(sync_client=True) as client:
        pending = dict(started)
        while pending and time.time() < deadline:
            for name, run_id in list(pending.items()):
                run = client.read_flow_run(run_id)
                if run.state is not None and run.state.is_final():
                    rows[name]["state"] = run.state.name
                    if not run.state.is_completed():
                        rows[name]["error"] = first_line(run.state.message)
                    pending.pop(name)
            if pending:
                time.sleep(poll_s)
        for name in pending:
            rows[name].update(state="Pending", error=f"not finished within {timeout_s:.0f} s")
        for name, run_id in started.items():
            outcome = outcome_row(client, run_id, OUTCOME_ARTIFACT)
            rows[name]["promotable"] = bool(outcome.get("promotable", False))
            rows[name]["report"] = outcome.get("report", "")
            if outcome.get("error") and not rows[name]["error"]:
                rows[name]["error"] = outcome["error"]

    table = list(rows.values())
    create_table_artifact(key="clip-fp8-models", table=table,
                          description=f"clip-fp8: {len(table)} models, one pipeline run each")
    failed = [r for r in table if r["state"] != "Completed"]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(table)} models failed: " +
                           "; ".join(f"{r['model']}: {r['error'] or r['state']}" for r in failed))
    return table

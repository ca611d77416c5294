"""Runs of other deployments started by a run: what they left behind, read back through the Prefect API.

A sub-run reports to its parent through a one-row table artifact (a key per kind of run): the parent reads
it by flow-run id, so nothing but the Prefect server has to be shared between their hosts.
"""

from __future__ import annotations

import json


def first_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[0] if lines else ""


def one_line(exc: BaseException) -> str:
    """An error as the run's tables show it: its type and its first line."""
    return f"{type(exc).__name__}: {first_line(str(exc))}"


def failure_of(state) -> BaseException:
    """The exception a failed or crashed task state holds (a crash may hold only a message)."""
    exc = state.result(raise_on_failure=False)
    return exc if isinstance(exc, BaseException) else RuntimeError(str(state.message))


def outcome_row(client, run_id, key: str) -> dict:
    """The one-row table artifact ``key`` that flow run ``run_id`` published, or {} if it got not that far."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]), key=ArtifactFilterKey(any_=[key])))
    if not artifacts:
        return {}
    data = artifacts[0].data
    rows = json.loads(data) if isinstance(data, str) else data
    return rows[0] if rows else {}

"""What a run did, stage by stage: its summary.json, report.md, run folder, history record and outcome artifact.

Nothing here knows a stage by name: each stage publishes what it adds to the summary (``StageOutput.summary``),
the artifacts it shows (``.shown``) and its report sections (``.reports``), and the record merges them in the
order the flow submitted the stages.
"""

from __future__ import annotations

import base64
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import PrefectFuture, wait
from prefect.runtime import flow_run

from clip_fp8 import history
from clip_fp8.artifacts import ArtifactRef, ArtifactStore, atomic_write, write_json_atomic
from clip_fp8.config import PipelineConfig
from clip_fp8.flows.regression_and_promotion import record_run
from clip_fp8.flows.failures import failure_of, one_line
from clip_fp8.flows.report import plot_benchmark, plot_trend, render_markdown
from clip_fp8.flows.stage_task import EXECUTIONS, REUSED
from clip_fp8.stage import DETAILS, SHOWN, SUMMARY, reports_of

# Every run's outcome as a one-row table artifact: what a parent run (flows/models_night.py) reads back.
OUTCOME_ARTIFACT = "clip-fp8-outcome"


def last_attempt(labels, stage: str) -> str | None:
    """The label of the last attempt of a stage that recovery may repeat (``stage``, ``stage~1``, ``stage~2``, ...)."""
    attempts = [label for label in labels if label == stage or label.startswith(f"{stage}~")]
    return max(attempts, key=lambda label: int(label.partition("~")[2] or 0)) if attempts else None


def merge(into: dict, facts: dict) -> None:
    """``facts`` into ``into``: dicts merge key by key (two surgeries' graphs, two builds' engines), else replace."""
    for key, value in facts.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value


class RunRecord:
    """What a run did, stage by stage, and the report, summary and run folder that say so."""

    def __init__(self, store: ArtifactStore, config: PipelineConfig):
        self.store = store
        self.config = config
        self.started = time.time()
        name = config.output.run_name or (
            f"{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}-{flow_run.get_name() or 'local'}")
        self.dir = store.root / "runs" / name
        self.refs: dict[str, ArtifactRef] = {}
        self.failures: list[tuple[str, BaseException]] = []
        self.summary: dict[str, Any] = {
            "run": name, "flow_run_id": str(flow_run.get_id() or ""), "config": config.model_dump(mode="json"),
            "status": "running", "promotable": False, "stages": {}, "metrics": {}, "artifacts": {}, "sections": []}

    def settle(self, futures: dict[str, PrefectFuture]) -> None:
        """Wait for every stage, then record each one's outcome (a failed one does not stop the others)."""
        wait(list(futures.values()))
        for label, future in futures.items():
            state = future.state
            record: dict[str, Any] = {"status": "not run", "seconds": 0.0}
            if execution := EXECUTIONS.get(str(future.task_run_id)):
                start, end = execution
                record.update(seconds=end - start, start_s=start - self.started, end_s=end - self.started)
            if state.is_completed():
                ref = state.result()
                self.refs[label] = ref
                # Not executed in this process: a Prefect cache hit, an artifact found published (REUSED), or a stage
                # an earlier attempt of this flow run completed (a crashed run scheduled again reuses its task runs).
                cached = state.name == "Cached" or str(future.task_run_id) in REUSED \
                    or str(future.task_run_id) not in EXECUTIONS
                record["status"] = "skipped" if "skip_reason" in ref.meta else "cached" if cached else "completed"
                record["note"] = ref.meta.get("skip_reason") or ref.meta.get("note", "")
            elif state.is_failed() or state.is_crashed():
                exc = failure_of(state)
                self.failures.append((label, exc))
                # What a failing stage attached to its error (the gate table, the recovery attempts) goes in the report.
                self.summary.setdefault("failure_markdown", []).extend(getattr(exc, "reports", {}).values())
                record.update(status="failed", note=one_line(exc))
            else:  # an input stage failed, so this one never started
                record["note"] = "an earlier stage it needs did not complete"
            self.summary["stages"][label] = record
        self._collect()
        if not self.failures:
            self.summary["status"] = "completed"

    def settle_targets(self, futures: dict[str, PrefectFuture]) -> None:
        """Each build target's outcome (``flows/engines.py``): its engines and timings, or why it has none."""
        wait(list(futures.values()))
        for gpu, future in futures.items():
            label = f"engines@{gpu}"
            if future.state.is_completed():
                result = future.state.result()
            else:
                exc = failure_of(future.state)
                self.failures.append((label, exc))
                result = getattr(exc, "target_result", None) or {
                    "gpu": gpu, "status": "failed" if future.state.is_failed() else "not run", "reason": one_line(exc),
                    "builds": [], "benchmark": None}
            self.summary.setdefault("targets", {})[gpu] = result
            self.summary["stages"][label] = {"status": result["status"], "seconds": 0.0, "note": result.get("reason", "")}
            for built in result["builds"]:
                self.summary["artifacts"].update({
                    f"engine_{gpu}_{name}": f"{built.get('uri') or built['path']}/{built['files'][name]}"
                    for name in built["meta"].get("engines", {})})

    def _collect(self) -> None:
        """The summary from what each stage published (``StageOutput.summary``, ``.shown`` and its reports), in
        the order the stages were submitted; of a stage recovery repeated, only the last attempt."""
        s, refs = self.summary, self.refs
        final = [label for label in refs if last_attempt(refs, label.partition("~")[0]) == label]
        for label in final:
            ref = refs[label]
            merge(s, ref.meta.get(SUMMARY, {}))
            for name, file in ref.meta.get(SHOWN, {}).items():
                s["artifacts"][name] = ref.location(file) if file else ref.uri or ref.path
            s["sections"] += [markdown for doc, markdown in reports_of(ref).items() if not doc.endswith(DETAILS)]
        if (timed := s.get("benchmark")) and timed.get("rows"):
            self.dir.mkdir(parents=True, exist_ok=True)
            png = plot_benchmark(timed["rows"], self.dir / "benchmark.png")
            s["benchmark_png"] = base64.b64encode(png).decode()
            s["artifacts"]["benchmark_plot"] = str(self.dir / "benchmark.png")

    def fail(self, exc: BaseException) -> None:
        """A failure outside the stages: before any started, resolving the inputs (a locator that does not
        exist), or while waiting (an interrupt)."""
        label = "inputs" if not self.summary["stages"] else "(run)"
        self.summary["stages"].setdefault(label, {"status": "failed", "seconds": time.time() - self.started,
                                                  "note": one_line(exc)})
        self.failures.append((label, exc))

    def raise_first_failure(self) -> None:
        if self.failures:
            raise self.failures[0][1]

    def public_summary(self) -> dict:
        return {k: v for k, v in self.summary.items()
                if not k.endswith(("_markdown", "_png")) and k not in ("history_rows", "sections")}

    def write(self) -> None:
        """report.md, summary.json, links to every artifact (``artifacts/<stage>``) and ``runs/latest``."""
        s = self.summary
        if self.failures:
            s["status"], s["error"] = "failed", one_line(self.failures[0][1])
            s["promotable"] = False
        s["all_cached"] = s["status"] == "completed" and all(
            r["status"] in ("cached", "skipped") for r in s["stages"].values())
        self._record_history()
        s["artifacts"]["report"] = str(self.dir / "report.md")
        s["artifacts"]["summary"] = str(self.dir / "summary.json")
        markdown = render_markdown(s)
        atomic_write(self.dir / "report.md", markdown)
        write_json_atomic(self.dir / "summary.json", self.public_summary())
        self._link_artifacts()
        if self.store.remote:
            print(f"report uploaded: {self.store.upload_run(self.dir)}/report.md")
        create_markdown_artifact(key="clip-fp8-report", markdown=markdown, description=f"clip-fp8 run {self.dir.name}")
        create_table_artifact(key=OUTCOME_ARTIFACT, table=[{
            "run": s["run"], "status": s["status"], "promotable": s["promotable"], "error": s.get("error", ""),
            "report": s["artifacts"]["report"]}], description=f"clip-fp8 run {self.dir.name}: outcome")
        print(f"report: {self.dir / 'report.md'}")
        for _, exc in self.failures:  # for a caller that reports the failure (the CLI's stage table)
            try:
                exc.run_summary = self.public_summary()  # type: ignore[attr-defined]
            except AttributeError:
                pass

    def _record_history(self) -> None:
        """The run's history record, regression check and promotion (``flows/regression_and_promotion.py``), and what the
        report shows of them. A failure here is reported, never hides the run's own outcome."""
        s = self.summary
        calibration = self.refs.get("calibration_data")
        try:
            result = record_run(s, self.config, calibration.digest if calibration else None)
        except Exception as exc:  # noqa: BLE001 - the run's outcome stands; say why history is missing
            s["history_error"] = one_line(exc)
            print(f"history not recorded: {s['history_error']}")
            return
        record = result["record"]
        s["regressed"] = bool(record["regression"]["reasons"])
        s["regression"], s["promotion"] = record["regression"], record["promotion"]
        s["history_rows"] = history.table_rows(result["recent"])
        self.dir.mkdir(parents=True, exist_ok=True)
        png = plot_trend(result["recent"], self.dir / "trend.png")
        s["trend_png"] = base64.b64encode(png).decode()
        s["artifacts"]["trend_plot"] = str(self.dir / "trend.png")
        create_table_artifact(key="clip-fp8-history", table=s["history_rows"],
                              description=f"clip-fp8 runs of {record['model_key']}, newest last")

    def _link_artifacts(self) -> None:
        """Relative links, so the run folder survives a move of the whole output root."""
        links = self.dir / "artifacts"
        links.mkdir(parents=True, exist_ok=True)
        for label, ref in self.refs.items():
            if Path(ref.path).is_dir():
                _replace_symlink(links / label, os.path.relpath(ref.path, links))
        _replace_symlink(self.dir.parent / "latest", self.dir.name)


def _replace_symlink(link: Path, target: str) -> None:
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)  # a reader sees the old link or the new one

"""`clip-fp8`: run the pipeline from a shell, with the same configuration model the Prefect UI uses.

The top layer: it may import everything below it (core, tasks, flows, deployments); nothing imports it.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

# An offline host cannot send Prefect's server telemetry; the attempt only prints an error.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

# Help texts are plain text: as Rich markup, a "[/queue]" in one crashed `deploy --help`.
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="CLIP checkpoints to FP8 TensorRT engines.")


def load_config(config_file: Optional[Path], overrides: list[str], output: Optional[str]):
    from clip_fp8.config import PipelineConfig

    config = PipelineConfig.from_file(config_file) if config_file else PipelineConfig()
    if output:
        overrides = [*overrides, f"output.root={output}"]
    return config.with_overrides(overrides)


def _version(value: bool) -> None:
    if value:
        from clip_fp8 import __version__

        typer.echo(f"clip-fp8 {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """CLIP checkpoints to FP8 TensorRT engines."""


@app.command()
def run(
    config_file: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML or JSON file with PipelineConfig sections."),
    overrides: list[str] = typer.Option([], "--set", "-s", help="Override one field: section.field=value (repeatable)."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Shortcut for --set output.root=DIR."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show the libraries' warnings, progress bars and tracebacks."),
) -> None:
    """Run the whole pipeline once (defaults: the embedded tiny CLIP on generated data, CPU, offline).

    Sections of --set and --config: model, calibration, quantization, evaluation, export, build, benchmark,
    output. `clip-fp8 schema` prints every field with its default and description.

    Exit codes: 0 done; 2 bad input or a failed check (one `error:` line names it); 1 a crash; 130 interrupted
    (re-run the same command to resume from the cache).
    """
    from pydantic import ValidationError as ConfigError

    try:
        config = load_config(config_file, overrides, output)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        typer.echo(f"error: bad configuration: {exc}", err=True)
        raise typer.Exit(2)

    if not verbose:
        from clip_fp8.console import quiet_environment

        quiet_environment()  # before the libraries are imported
    server = TemporaryServer() if TemporaryServer.needed() else None
    from clip_fp8.console import quiet_libraries
    from clip_fp8.errors import PipelineError
    from clip_fp8.flows.pipeline import clip_fp8_pipeline
    from clip_fp8.flows.report import warm_plotting
    from clip_fp8.flows.stage_task import warm_keys

    quiet_libraries()
    _stop_cleanly_on_interrupt(server)
    if server is not None:
        warm_keys()  # while the server starts
        warm_plotting()  # the report's trend plot imports matplotlib: also while the server starts
        server.wait()
    try:
        summary = clip_fp8_pipeline(config)
    except Exception as exc:  # noqa: BLE001 - reported as one line, with the stage table; --verbose re-raises
        if (summary := getattr(exc, "run_summary", None)) is not None:
            _print_stages(summary)
        if verbose and not isinstance(exc, PipelineError):
            raise
        if isinstance(exc, PipelineError):  # named: its message is the one line
            code, line = 2, str(exc)
        else:
            code, line = 1, f"{type(exc).__name__}: {_first_line(exc)} (re-run with --verbose for the traceback)"
        typer.echo(f"error: {line}", err=True)
        if summary is not None:
            typer.echo(f"report: {summary['artifacts']['report']}", err=True)
        raise typer.Exit(code)
    _print_stages(summary)
    typer.echo(f"summary: {summary['artifacts']['summary']}")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else ""


def _stop_cleanly_on_interrupt(server: "TemporaryServer | None") -> None:
    """Ctrl-C (SIGINT) or SIGTERM: stop within seconds, with one line, exit 130, and leave nothing behind.

    The stages run in worker threads that cannot be interrupted mid-computation, and waiting for them is
    what made Ctrl-C take minutes. Instead: give back the cache-key locks this process holds, remove its
    staging and scratch directories, stop its export workers and its temporary server, and exit. Nothing
    published is lost (publication is one rename), so the same command resumes from the cache.
    A SIGINT that the parent shell set to be ignored (a background job) stays ignored.
    """
    import signal

    def stop(signum, frame) -> None:  # noqa: ARG001
        import multiprocessing

        from clip_fp8.artifacts import remove_scratch
        from clip_fp8.flows.stage_task import RUNNING
        from clip_fp8.locking import release_held_locks

        running = sorted(name for name, count in RUNNING.items() if count > 0)
        release_held_locks()
        remove_scratch()
        for child in multiprocessing.active_children():
            child.kill()
        if server is not None:
            server.stop()
        where = f"during {', '.join(running)}" if running else "between stages"
        sys.stderr.write(f"interrupted {where}; re-run the same command to resume\n")
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(130)

    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


def _die_with_parent() -> None:
    """In the server's process before it starts: a SIGKILLed run (no exit handlers) takes its server along."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass


class TemporaryServer:
    """The temporary Prefect server a bare ``clip-fp8 run`` needs (no PREFECT_API_URL set), started the way
    Prefect starts its own (``prefect.server.api.server.SubprocessASGIServer``: uvicorn on the server app,
    UI off) but from here, before the pipeline is imported, so that its start-up overlaps the imports; and
    without importing the server in this process, as Prefect's client would. Its own process session: a Ctrl-C reaches the run, which then stops the server,
    instead of killing the server under a client that would retry against it for minutes.
    """

    def __init__(self) -> None:
        import importlib.util
        import socket
        import subprocess

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        prefect_dir = Path(importlib.util.find_spec("prefect").submodule_search_locations[0])
        self.url = f"http://127.0.0.1:{self.port}/api"
        # Its log is not the console's: stopped while its services flush events (a run all from the cache ends in
        # seconds), it logs tracebacks of the cancelled flush. Shown only if it fails to start.
        import tempfile

        self.log = Path(tempfile.mkstemp(prefix="clip-fp8-prefect-server-", suffix=".log")[1])
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect_dir.parent), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"],
            env={**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"},
            start_new_session=True, preexec_fn=_die_with_parent,
            stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
        )
        os.environ["PREFECT_API_URL"] = self.url  # read when Prefect's settings load, after this
        # Exit handlers run last-registered first: Prefect's log and event workers, registered later,
        # flush to the server before it stops.
        atexit.register(self.stop)

    def wait(self, timeout: float = 120.0) -> None:
        import time
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-3:])
                raise RuntimeError(f"the temporary Prefect server exited with code {self.process.returncode}: {tail} "
                                   f"(log: {self.log})")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"the temporary Prefect server did not answer on {self.url} within {timeout:.0f} s")

    def stop(self) -> None:
        import subprocess

        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.unlink(missing_ok=True)

    @classmethod
    def needed(cls) -> bool:
        allowed = os.environ.get("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true").lower() not in ("0", "false", "no")
        return not os.environ.get("PREFECT_API_URL") and allowed


def _print_stages(summary: dict) -> None:
    import shutil
    import textwrap

    typer.echo(f"\n{'stage':<18}{'status':<11}{'seconds':>9}")
    indent = 18 + 11 + 9 + 2
    width = max(40, shutil.get_terminal_size((120, 24)).columns - indent)
    for name, stage in summary["stages"].items():
        note = textwrap.wrap(stage.get("note", ""), width) or [""]  # whole, wrapped under the note column
        typer.echo(f"{name:<18}{stage['status']:<11}{stage['seconds']:>9.2f}  {note[0]}".rstrip())
        for more in note[1:]:
            typer.echo(" " * indent + more)
    shown = {"baseline": summary.get("metrics", {}).get("baseline")} | (
        summary.get("runtime_metrics") or {"fp8": summary.get("metrics", {}).get("fp8")})
    for variant, metrics in shown.items():
        gated = " (gate)" if variant == summary.get("gate_runtime") else ""
        if metrics:
            typer.echo(f"{variant + gated:>18}: " + ", ".join(f"{k.split('/')[-1]}={v:.4f}" for k, v in metrics.items()))
    typer.echo(f"promotable: {summary['promotable']}")


@app.command("history")
def history_command(
    output: Optional[str] = typer.Option(None, "--output", "-o", help="The runs' output.root (a path or fsspec URL); "
                                         "default: output.root's default."),
    model: Optional[str] = typer.Option(None, help="Only this model (its model.source, or source@revision)."),
    last: Optional[int] = typer.Option(None, min=1, help="Only the last N records."),
) -> None:
    """Print the run history: every run's status, changed/unchanged, gate, regression, promoted version, sizes, latency."""
    from clip_fp8 import history

    rows = history.table_rows(history.read(_output_root(output), model=model, last=last))
    typer.echo(history.render_table(rows))


@app.command()
def verify(
    output: Optional[str] = typer.Option(None, "--output", "-o", help="The output.root whose store to check (a local "
                                         "path); default: output.root's default."),
    repository: Optional[str] = typer.Option(None, help="A promotion repository (local path) to check as well: each "
                                             "version's files against the digests recorded when it was promoted."),
) -> None:
    """Check every artifact of a store (and a promotion repository) against its recorded digests; list what is
    corrupt, exit 2 if anything is. Nothing is moved: a run quarantines and recomputes what it would reuse."""
    from clip_fp8.integrity import verify_repository, verify_store

    root = Path(_output_root(output))
    if not (root / "store").is_dir():
        typer.echo(f"error: {root} has no artifact store (store/); give the run's output.root with -o", err=True)
        raise typer.Exit(2)
    results = [verify_store(root)]
    if repository:
        results.append(verify_repository(Path(repository)))
    corrupt = [entry for r in results for entry in r["corrupt"]]
    for path, why in corrupt:
        typer.echo(f"corrupt: {path}: {why}")
    checked = sum(r["checked"] for r in results)
    typer.echo(f"{len(corrupt)} of {checked} artifacts corrupt")
    if corrupt:
        raise typer.Exit(2)


def _output_root(output: Optional[str]) -> str:
    from clip_fp8.config import OutputConfig

    return output or OutputConfig().root


@app.command()
def promote(
    run_name: str = typer.Argument(..., metavar="RUN", help="The run's name (its folder under <output.root>/runs)."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="The runs' output.root; default: output.root's default."),
    repository: Optional[str] = typer.Option(None, help="Triton model repository; default: the run's promotion.repository."),
    force: bool = typer.Option(False, "--force", help="Promote even if the run failed its gate or regressed (recorded)."),
) -> None:
    """Promote a run by hand to the Triton model repository, with the nightly's checks (--force skips them, on record)."""
    from clip_fp8 import history
    from clip_fp8.artifacts import ArtifactStore
    from clip_fp8.config import PipelineConfig
    from clip_fp8.flows.regression_and_promotion import promotion_blockers, publish

    output = _output_root(output)
    summary_path = ArtifactStore(output).root / "runs" / run_name / "summary.json"
    if not summary_path.is_file():
        typer.echo(f"error: no run '{run_name}' under {output}/runs (see `clip-fp8 history -o {output}`)", err=True)
        raise typer.Exit(2)
    summary = json.loads(summary_path.read_text())
    config = PipelineConfig.model_validate(summary["config"])
    if repository:
        config = config.with_overrides([f"promotion.repository={repository}"])
    record = next((r for r in reversed(history.read(output)) if r.get("run") == run_name and r.get("kind", "run") == "run"), None)
    if record is None or not config.promotion.repository:
        missing = "its history record" if record is None else "a repository (--repository or promotion.repository)"
        typer.echo(f"error: cannot promote run '{run_name}': no {missing}", err=True)
        raise typer.Exit(2)
    blockers = [b for b in promotion_blockers(record, config, by_hand=True) if b != "promotion.repository is not set"]
    why_not = "; ".join(blockers)
    if why_not and not force:
        typer.echo(f"error: run '{run_name}' is not promoted: {why_not}; --force promotes it anyway (recorded)", err=True)
        raise typer.Exit(2)
    done = publish(summary, record, config, forced=force)
    if done.get("version") is None:
        typer.echo(f"error: run '{run_name}' is not promoted: {done['skipped']}", err=True)
        raise typer.Exit(2)
    history.append(output, {"kind": "promotion", "run": run_name, "flow_run_id": record.get("flow_run_id", ""),
                            "model_key": record["model_key"], "promotion": done,
                            "metrics": record.get("metrics", {}), "gpu": record.get("gpu"),
                            "benchmark": record.get("benchmark", {}), "forced_past": why_not or None})
    typer.echo(f"promoted {run_name} as version {done['version']} to {done['repository']}"
               + (" (forced)" if force else ""))


@app.command()
def serve(
    repository: Optional[str] = typer.Argument(None, metavar="[REPOSITORY]",
                                               help="Triton model repository; default: promotion.repository of --config."),
    config_file: Optional[Path] = typer.Option(None, "--config", "-c", help="Config file whose promotion.repository to serve."),
    http_port: int = typer.Option(8000, help="HTTP/REST port (0: any free one)."),
    grpc_port: int = typer.Option(8001, help="gRPC port (0: any free one)."),
    metrics_port: int = typer.Option(8002, help="Prometheus metrics port (0: any free one)."),
    model_config_name: Optional[str] = typer.Option(None, help="Serve each model's configs/NAME.pbtxt where it has one "
                                                    "(onnxruntime, tensorrt: for servers with those backends)."),
) -> None:
    """Serve a promoted repository with tritonserver (on PATH, else nvidia-pytriton's bundled one) until Ctrl-C.

    Exit codes: 130 stopped by Ctrl-C or SIGTERM (the server within 10 s); 2 nothing to serve or no server;
    1 the server stopped by itself.
    """
    import signal
    import time

    from clip_fp8.triton_repository import LATEST
    from clip_fp8.triton_server import ServerError, TritonServer

    if repository is None:
        try:
            repository = load_config(config_file, [], None).promotion.repository
        except (ValueError, FileNotFoundError) as exc:
            typer.echo(f"error: bad configuration: {exc}", err=True)
            raise typer.Exit(2)
    if not repository:
        typer.echo("error: no repository to serve: name one (clip-fp8 serve REPOSITORY) or set promotion.repository "
                   "in --config", err=True)
        raise typer.Exit(2)
    root = Path(repository.removeprefix("file://"))
    if "://" in repository or not (root / LATEST).is_file():
        why = "a remote repository (copy it locally first)" if "://" in repository else \
            f"no {LATEST} there (nothing promoted yet: clip-fp8 promote RUN --repository {repository})"
        typer.echo(f"error: cannot serve {repository}: {why}", err=True)
        raise typer.Exit(2)
    log = root.parent / f".{root.name}.tritonserver.log"
    server = TritonServer(root, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                          model_config_name=model_config_name, log=log)

    def interrupt(signum, frame) -> None:  # noqa: ARG001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        try:
            server.start()
        except ServerError as exc:
            typer.echo(f"error: {exc} (log: {log})", err=True)
            raise typer.Exit(2)
        version = json.loads((root / LATEST).read_text())["version"]
        typer.echo(f"tritonserver serving {root} (version {version}); log: {log}")
        typer.echo(f"  HTTP  http://{server.http_url}\n  gRPC  {server.grpc_url}\n  metrics http://127.0.0.1:{server.metrics_port}/metrics")
        for model in server.index():
            typer.echo(f"  model {model['name']} version {model.get('version', '-')}: {model.get('state', '?')}")
        typer.echo("Ctrl-C stops it.")
        while server.process.poll() is None:
            time.sleep(0.5)
        typer.echo(f"error: tritonserver exited with {server.process.returncode} (log: {log})", err=True)
        raise typer.Exit(1)
    except KeyboardInterrupt:
        code = server.stop()
        typer.echo(f"stopped tritonserver (exit {code})", err=True)
        raise typer.Exit(130)


@app.command()
def deploy(
    work_pool: str = typer.Option("gpu", help="Work pool the deployments run on (created as a process pool if missing)."),
    nightly_cron: str = typer.Option("0 2 * * *", help="Cron of the nightly re-quantization."),
    timezone: str = typer.Option("UTC", help="IANA timezone of the nightly cron."),
    gpu_name: list[str] = typer.Option([], help="GPU type to create a one-slot benchmark limit for (repeatable)."),
    notify_block: Optional[str] = typer.Option(None, help="Prefect notification block to alert through when a run "
                                               "regressed (creates the automation in deployments/automations/)."),
    models: Optional[Path] = typer.Option(None, help="Models file (YAML/JSON: `models:` entries with name, source, "
                                          "revision, overrides): a nightly with one pipeline run per model."),
    target: list[str] = typer.Option([], help="Build target 'GPU type=work pool[/queue]' (repeatable): engines are built "
                                     "and timed on that pool's workers; creates the pool and its engines deployment."),
    target_pool_type: str = typer.Option("process", help="Type of the target pools it creates: process, docker or kubernetes."),
    crash_after: int = typer.Option(300, help="Seconds without a heartbeat after which a run is marked Crashed (its "
                                    "worker or node is gone); at least 60."),
    crash_retries: int = typer.Option(2, help="How many times a crashed run is scheduled again (it resumes from the "
                                      "cache); then it stays Crashed."),
) -> None:
    """Create the work pool, GPU concurrency limits and the on-demand and nightly deployments (idempotent)."""
    from clip_fp8.config import ModelsFile
    from clip_fp8.deployments.deploy import deploy_all, parse_target

    try:
        models_file = ModelsFile.from_file(models) if models else None
        targets = tuple(parse_target(t) for t in target)
        ids = deploy_all(work_pool, nightly_cron, timezone, tuple(gpu_name), notify_block=notify_block, models=models_file,
                         targets=targets, target_pool_type=target_pool_type, crash_after=crash_after,
                         crash_retries=crash_retries)
    except (ValueError, FileNotFoundError) as exc:  # a bad models file; a named thing that does not exist (the block)
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    for name, deployment_id in ids.items():
        typer.echo(f"{name}: {deployment_id}")


@app.command()
def schema() -> None:
    """Print the configuration's JSON schema (the Prefect UI form is generated from it)."""
    from clip_fp8.config import PipelineConfig

    try:
        json.dump(PipelineConfig.model_json_schema(), sys.stdout, indent=1)
        typer.echo()
        sys.stdout.flush()
    except BrokenPipeError:  # `clip-fp8 schema | head`: the reader had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    main()

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

app = typer.Typer(add_completion=False, no_args_is_help=True, help="CLIP checkpoints to FP8 TensorRT engines.")


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
) -> None:
    """Run the whole pipeline once (defaults: the embedded tiny CLIP on generated data, CPU, offline).

    Sections of --set and --config: model, calibration, quantization, evaluation, export, build, benchmark,
    output. `clip-fp8 schema` prints every field with its default and description.
    """
    from pydantic import ValidationError as ConfigError

    try:
        config = load_config(config_file, overrides, output)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        typer.echo(f"error: bad configuration: {exc}", err=True)
        raise typer.Exit(2)

    server = TemporaryServer() if TemporaryServer.needed() else None
    from clip_fp8.errors import PipelineError
    from clip_fp8.flows.pipeline import clip_fp8_pipeline
    from clip_fp8.flows.stage_task import warm_keys

    if server is not None:
        warm_keys()  # while the server starts
        server.wait()
    try:
        summary = clip_fp8_pipeline(config)
    except PipelineError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    _print_stages(summary)
    typer.echo(f"summary: {summary['artifacts']['summary']}")


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
    UI off) but from here, before the pipeline is imported, so that its start-up (~5 s on 2 cores)
    overlaps the imports; and without importing the server in this process, as Prefect's client would
    (another ~5 s). Its own process session: a Ctrl-C reaches the run, which then stops the server,
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
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect_dir.parent), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"],
            env={**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"},
            start_new_session=True, preexec_fn=_die_with_parent,
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
                raise RuntimeError(f"the temporary Prefect server exited with code {self.process.returncode}")
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

    @classmethod
    def needed(cls) -> bool:
        allowed = os.environ.get("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true").lower() not in ("0", "false", "no")
        return not os.environ.get("PREFECT_API_URL") and allowed


def _print_stages(summary: dict) -> None:
    typer.echo(f"\n{'stage':<18}{'status':<11}{'seconds':>9}")
    for name, stage in summary["stages"].items():
        typer.echo(f"{name:<18}{stage['status']:<11}{stage['seconds']:>9.2f}  {stage.get('note', '')[:90]}")
    for variant, metrics in summary.get("metrics", {}).items():
        typer.echo(f"{variant:>8}: " + ", ".join(f"{k.split('/')[-1]}={v:.4f}" for k, v in metrics.items()))
    typer.echo(f"promotable: {summary['promotable']}")


@app.command()
def deploy(
    work_pool: str = typer.Option("gpu", help="Work pool the deployments run on (created as a process pool if missing)."),
    nightly_cron: str = typer.Option("0 2 * * *", help="Cron of the nightly re-quantization."),
    timezone: str = typer.Option("UTC", help="IANA timezone of the nightly cron."),
    gpu_name: list[str] = typer.Option([], help="GPU type to create a one-slot benchmark limit for (repeatable)."),
) -> None:
    """Create the work pool, GPU concurrency limits and the on-demand and nightly deployments (idempotent)."""
    from clip_fp8.deployments.deploy import deploy_all

    for name, deployment_id in deploy_all(work_pool, nightly_cron, timezone, tuple(gpu_name)).items():
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

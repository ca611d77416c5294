"""`clip-fp8`: run the pipeline from a shell, with the same configuration model the Prefect UI uses."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="CLIP checkpoints to FP8 TensorRT engines.")


def load_config(config_file: Optional[Path], overrides: list[str], output: Optional[str]):
    from clip_fp8.config import PipelineConfig

    config = PipelineConfig.from_file(config_file) if config_file else PipelineConfig()
    if output:
        overrides = [*overrides, f"output.root={output}"]
    return config.with_overrides(overrides)


@app.command()
def run(
    config_file: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML or JSON file with PipelineConfig sections."),
    overrides: list[str] = typer.Option([], "--set", "-s", help="Override one field: section.field=value (repeatable)."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Shortcut for --set output.root=DIR."),
) -> None:
    """Run the whole pipeline once (defaults: the embedded tiny CLIP on generated data, CPU, offline)."""
    from pydantic import ValidationError as ConfigError

    try:
        config = load_config(config_file, overrides, output)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        typer.echo(f"error: bad configuration: {exc}", err=True)
        raise typer.Exit(2)

    from clip_fp8.errors import DETERMINISTIC_ERRORS
    from flows.pipeline import clip_fp8_pipeline

    try:
        summary = clip_fp8_pipeline(config)
    except DETERMINISTIC_ERRORS as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    _print_stages(summary)
    typer.echo(f"summary: {summary['artifacts']['summary']}")


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
    from deployments.deploy import deploy_all

    for name, deployment_id in deploy_all(work_pool, nightly_cron, timezone, tuple(gpu_name)).items():
        typer.echo(f"{name}: {deployment_id}")


@app.command()
def schema() -> None:
    """Print the configuration's JSON schema (the Prefect UI form is generated from it)."""
    from clip_fp8.config import PipelineConfig

    json.dump(PipelineConfig.model_json_schema(), sys.stdout, indent=1)
    typer.echo()


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    main()

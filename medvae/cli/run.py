"""`medvae run` (a whole pipeline) and `medvae demo` (the phantom cohort through demo.yaml)."""

from __future__ import annotations

from pathlib import Path

import typer

from medvae.cli.app import app, user_errors
from medvae.config import packaged_pipelines


def _print_paths(state: dict) -> None:
    paths = state["paths"]
    typer.echo(f"\nreport:    {paths['report']}\nsynthetic: {paths['synthetic']}\n")


@app.command("run")
@user_errors
def run(
    pipeline: str = typer.Argument(
        ..., help=f"Pipeline YAML, or a packaged one: {', '.join(packaged_pipelines())}."),
    scans: Path = typer.Option(..., "--scans", help="Scan directory."),
    out: Path = typer.Option(..., "--out", help="Run directory for all stages."),
    quick: bool = typer.Option(
        False, "--quick", help="Tiny counts (2 steps, few samples): check data and config first."),
) -> None:
    """Run discover -> prepare -> train -> evaluate -> generate, skipping finished stages."""
    from medvae.pipeline import run_pipeline

    _print_paths(run_pipeline(pipeline, scans, out, quick=quick))


@app.command()
@user_errors
def demo(
    out: Path = typer.Option(Path("demo_out"), "--out", help="Where the demo writes everything."),
    quick: bool = typer.Option(False, "--quick", help="Tiny counts: the whole pipeline in about a minute."),
) -> None:
    """Write a phantom cohort and run the demo pipeline on it end to end (CPU, minutes)."""
    from medvae.pipeline import demo as run_demo

    _print_paths(run_demo(out, quick=quick))

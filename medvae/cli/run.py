"""`medvae run` (a whole pipeline) and `medvae demo` (the phantom cohort through demo.yaml)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from medvae.cli.app import app, user_errors
from medvae.config import packaged_pipelines


def _wall(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def _print_outcome(state: dict) -> None:
    """Each stage's wall time (skipped stages say so: their time is the earlier run's), then the outputs."""
    table = Table(title="stages")
    table.add_column("stage")
    table.add_column("wall time", justify="right")
    table.add_column("")
    ran = [t["seconds"] for t in state["timings"] if t["ran"]]
    for t in state["timings"]:
        table.add_row(t["stage"], _wall(t["seconds"]), "" if t["ran"] else "up to date, skipped")
    table.add_section()
    table.add_row("total (this run)", _wall(sum(ran)), "")
    console = Console(highlight=False, soft_wrap=True)
    console.print(table)
    # A denoise pipeline has no synthetic data; print the outputs there are.
    paths = state["paths"]
    for name in ("report", "synthetic", "utility"):
        if name in paths:
            console.print(f"{name + ':':<11}{paths[name]}")


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

    _print_outcome(run_pipeline(pipeline, scans, out, quick=quick))


@app.command()
@user_errors
def demo(
    out: Path = typer.Option(Path("demo_out"), "--out", help="Where the demo writes everything."),
    quick: bool = typer.Option(False, "--quick", help="Tiny counts: the whole pipeline in about a minute."),
) -> None:
    """Write a phantom cohort and run the demo pipeline on it end to end (CPU, minutes)."""
    from medvae.pipeline import demo as run_demo

    _print_outcome(run_demo(out, quick=quick))

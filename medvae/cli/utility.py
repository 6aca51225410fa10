"""`medvae utility`: the downstream utility study of synthetic data, with a progress bar."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medvae.cli.app import app, choices, config_with_options, user_errors
from medvae.config import TrainStageConfig, UtilityConfig, load_config
from medvae.errors import ConfigError


def _fractions(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--fractions {text!r}: give comma-separated numbers in (0, 1], e.g. 0.05,0.1,1.0") \
            from None


@app.command()
@user_errors
def utility(
    store: Path = typer.Argument(..., help="Patch store: subsets of its train split, scores on its test split."),
    out: Path = typer.Option(..., "--out", help="Study directory (re-running it resumes)."),
    task: Optional[str] = typer.Option(None, help=f"{choices(UtilityConfig, 'task')} (default classify)"),
    model: Optional[str] = typer.Option(None, help=f"Generator: {choices(UtilityConfig, 'model')} (default vae)."),
    condition: Optional[str] = typer.Option(
        None, help=f"{choices(UtilityConfig, 'condition')} (default: class to classify, mask to segment)"),
    fractions: Optional[str] = typer.Option(None, help="Real fractions of the train split (default 0.05,0.1,1.0)."),
    seeds: Optional[int] = typer.Option(None, help="Seeds per fraction (default 3)."),
    generator_steps: Optional[int] = typer.Option(None, help="Training steps of each generator (default 2000)."),
    downstream_steps: Optional[int] = typer.Option(None, help="Training steps of each downstream model (default 500)."),
    ratio: Optional[float] = typer.Option(
        None, help="Synthetic images per real image of a subset (default 1; a --synthetic store is used whole)."),
    synthetic: Optional[Path] = typer.Option(
        None, "--synthetic", help="A labelled synthetic patch store to use at every fraction instead of generators."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML with TrainStageConfig keys for the generators."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
) -> None:
    """Train a downstream model on real, real+synthetic and synthetic data at several real fractions."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from medvae.utility.study import run_utility

    generator = load_config(config, TrainStageConfig).model_dump(mode="json")
    cfg = config_with_options(None, UtilityConfig, {
        "task": task, "model": model, "condition": condition, "fractions": _fractions(fractions), "seeds": seeds,
        "generator_steps": generator_steps, "downstream_steps": downstream_steps, "ratio": ratio,
        "generator": generator})
    with Progress(TextColumn("[bold]utility {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), transient=True) as bar:
        job = bar.add_task("", total=None)
        summary = run_utility(store, out, cfg, device=device, synthetic=synthetic,
                              progress=lambda done, total, what: bar.update(job, completed=done, total=total,
                                                                            description=what))
    for name, by_fraction in summary["paired_differences"].items():
        for metric in summary["metrics"]:
            cells = ", ".join(f"f={f}: {c[metric]['mean']:+.4g}" for f, c in by_fraction.items()
                              if c[metric]["mean"] is not None)
            typer.echo(f"{name} {metric}: {cells}")
    typer.echo(f"-> {out / 'utility.csv'}, {out / 'utility.json'}, {out / 'report.html'}")

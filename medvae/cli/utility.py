"""`medvae utility`: the downstream utility study of synthetic data, with a progress bar."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medvae.cli.app import app, choices, config_with_options, user_errors
from medvae.config import ARMS, DEFAULT_ARMS, TrainStageConfig, UtilityConfig, load_config
from medvae.errors import ConfigError


def _numbers(text: str | None, option: str, kind: type, example: str) -> list | None:
    if text is None:
        return None
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{option} {text!r}: give comma-separated numbers, e.g. {example}") from None


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [part.strip() for part in text.split(",") if part.strip()]


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
    labels_per_class: Optional[str] = typer.Option(
        None, help="Labelled images per class, instead of fractions (classify), e.g. 10,100."),
    arms: Optional[str] = typer.Option(
        None, help="Comma-separated arms of " + ", ".join(ARMS) + " (default " + ",".join(DEFAULT_ARMS) + ")."),
    synthesis: Optional[str] = typer.Option(
        None, help="neighbours (default) | interpolate: variants of each labelled image; prior: prior samples; "
                   "m2: the cell's M2 model's variants and class samples."),
    unlabelled: Optional[str] = typer.Option(
        None, help="all (default): the generator learns from every train image, without labels; none: the subset."),
    per_image: Optional[int] = typer.Option(None, help="Variants per labelled image (default 10)."),
    generator_run: Optional[Path] = typer.Option(
        None, "--generator-run", help="With --unlabelled all: a `medvae train` run of this store (unconditional) "
                                      "to use as the generator instead of training one."),
    filter_threshold: Optional[float] = typer.Option(
        None, help="Keep a synthetic image when the real arm's network gives its label this probability "
                   "(default 0.5; 0 keeps all)."),
    seeds: Optional[int] = typer.Option(None, help="Seeds per fraction (default 3)."),
    generator_steps: Optional[int] = typer.Option(None, help="Training steps of each generator (default 2000)."),
    downstream_steps: Optional[int] = typer.Option(None, help="Training steps of each downstream model (default 500)."),
    ratio: Optional[float] = typer.Option(
        None, help="Synthetic images per real image of a subset (default 1; a --synthetic store is used whole)."),
    synthetic: Optional[Path] = typer.Option(
        None, "--synthetic", help="A labelled synthetic patch store to use at every fraction instead of generators."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML with TrainStageConfig keys for the generators."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    export_model: Optional[Path] = typer.Option(
        None, "--export-model", help="Write the best arm's network at the largest budget (seed 0) to this directory: "
                                     "model.ts (TorchScript with MONAI metadata) and model.json (class names, input)."),
) -> None:
    """Train a downstream model on real, classically augmented, semi-supervised, real+synthetic and synthetic
    data at several label budgets; the verdict says which arm is best and whether synthetic data helps on top."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from medvae.data.store import open_store
    from medvae.downstream.export import export_model as export
    from medvae.downstream.study import run_utility
    from medvae.downstream.studydir import StudyDir

    generator = load_config(config, TrainStageConfig).model_dump(mode="json")
    cfg = config_with_options(None, UtilityConfig, {
        "task": task, "model": model, "condition": condition, "seeds": seeds,
        "fractions": _numbers(fractions, "--fractions", float, "0.05,0.1,1.0"),
        "labels_per_class": _numbers(labels_per_class, "--labels-per-class", int, "10,100"),
        "arms": _names(arms), "synthesis": synthesis, "unlabelled": unlabelled, "per_image": per_image,
        "filter_threshold": filter_threshold, "generator_run": str(generator_run) if generator_run else None,
        "generator_steps": generator_steps, "downstream_steps": downstream_steps, "ratio": ratio,
        "generator": generator})
    with Progress(TextColumn("[bold]utility {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), transient=True) as bar:
        job = bar.add_task("", total=None)
        summary = run_utility(store, out, cfg, device=device, synthetic=synthetic,
                              progress=lambda done, total, what: bar.update(job, completed=done, total=total,
                                                                            description=what))
    for name, by_budget in summary["paired_differences"].items():
        for metric in summary["metrics"]:
            cells = ", ".join(f"{b}: {c[metric]['mean']:+.4g}" for b, c in by_budget.items()
                              if c[metric]["mean"] is not None)
            typer.echo(f"{name} {metric}: {cells}")
    for v in summary["verdict"]["budgets"]:
        typer.echo(f"{v['sentence']}\n  train and export it: {v['command']}")
    study = StudyDir(out)
    typer.echo(f"-> {study.csv}, {study.json}, {study.report}")
    if export_model is not None:
        typer.echo(f"-> {export(study, open_store(store), export_model)} (the best arm at the largest budget, seed 0)")

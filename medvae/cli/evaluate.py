"""`medvae evaluate`: metrics tables, cohort MMD and the HTML report for one or more runs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medvae.cli.app import app, config_with_options, user_errors
from medvae.config import EvaluateConfig
from medvae.errors import InputError


@app.command("evaluate")
@user_errors
def evaluate_command(
    run: Path = typer.Argument(..., help="Run directory from `medvae train`."),
    store: Path = typer.Option(..., "--store", help="Patch store to evaluate on."),
    out: Path = typer.Option(..., "--out", help="Report directory."),
    split: Optional[str] = typer.Option(None, help="Split to evaluate (default: the config's, else test)."),
    compare: Optional[list[Path]] = typer.Option(None, "--compare", help="Other runs to compare side by side."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML with EvaluateConfig keys."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    utility: Optional[Path] = typer.Option(None, "--utility", help="A `medvae utility` study directory to include."),
    per_image: bool = typer.Option(False, "--per-image",
                                   help="Image sets: also a row per image in metrics.csv and summary.json."),
    prior: Optional[list[str]] = typer.Option(
        None, "--prior", help="A learned prior whose samples are measured beside N(0, I)'s: gmm | diffusion (a spatial "
                              "latent; its fit takes minutes on a CPU); repeat for both (default: the config's, gmm)."),
) -> None:
    """Per-patient (image sets: per-class and per-split) and per-modality metrics, cohort MMD, and an offline
    HTML report."""
    from medvae.downstream.studydir import StudyDir
    from medvae.evaluation.evaluate import run_evaluation
    from medvae.report.reportdir import ReportDir

    cfg = config_with_options(config, EvaluateConfig, {"split": split, "per_image": per_image or None,
                                                         "priors": prior or None})
    compare = list(compare or [])
    for path in [run, *compare]:
        if not path.exists():
            raise InputError(f"{path}: run directory not found; give the --out of `medvae train`")
    study = StudyDir(utility).summary() if utility is not None else None
    run_evaluation(run, store, out, cfg, compare=compare, device=device, utility=study)
    typer.echo(f"report: {ReportDir(out).html}")

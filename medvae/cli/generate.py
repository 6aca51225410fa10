"""`medvae generate`: a synthetic dataset in physical units, with a progress bar and the audit line."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.progress import Progress

from medvae.cli.app import app, choices, config_with_options, user_errors
from medvae.config import GenerateConfig


@app.command()
@user_errors
def generate(
    run: Path = typer.Argument(..., help="Run directory from `medvae train`."),
    n: Optional[int] = typer.Option(None, "--n", help="Number of synthetic images (default 100)."),
    out: Path = typer.Option(..., "--out", help="Output directory."),
    seed: Optional[int] = typer.Option(None, help="Sampling seed (default 0)."),
    format: Optional[str] = typer.Option(
        None, "--format", help=f"{choices(GenerateConfig, 'format')} (default nifti)"),
    batch_size: Optional[int] = typer.Option(None, help="Samples decoded per batch (default 64)."),
    temperature: Optional[float] = typer.Option(None, help="Prior standard deviation multiplier (default 1)."),
    checkpoint: Optional[str] = typer.Option(None, help="best | last | PATH (default best)"),
    prior: Optional[str] = typer.Option(
        None, help=f"{choices(GenerateConfig, 'prior')} (gmm, the default: a Gaussian mixture fitted on the training "
                   "codes; standard: N(0, I); diffusion: a latent diffusion model of the codes, for a spatial latent)"),
    drop_flagged: bool = typer.Option(False, "--drop-flagged", help="Do not write samples flagged by the audit."),
    per_class: bool = typer.Option(False, "--per-class",
                                   help="Class / modality models: balance the samples over classes (else the "
                                        "training proportions)."),
    mix_with: Optional[Path] = typer.Option(None, "--mix-with", help="Real store to mix into an augmented store."),
    anchors: Optional[Path] = typer.Option(
        None, "--from", help="A patch store whose images anchored synthesis varies (--synthesis neighbours)."),
    split: Optional[str] = typer.Option(None, help="The --from store's split (default train)."),
    synthesis: Optional[str] = typer.Option(
        None, help="prior (default): prior samples; neighbours | interpolate: --per-image variants of every "
                   "--from image, labelled as it."),
    per_image: Optional[int] = typer.Option(None, help="Variants per --from image (default 1)."),
    ratio: float = typer.Option(1.0, help="Synthetic-to-real ratio of the augmented store."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML with GenerateConfig keys."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
) -> None:
    """Generate a synthetic dataset in physical units, audit it for memorization."""
    from medvae.synthesis.generate import generate as generate_dataset

    cfg = config_with_options(config, GenerateConfig, {
        "n": n, "seed": seed, "format": format, "batch_size": batch_size, "temperature": temperature,
        "checkpoint": checkpoint, "drop_flagged": drop_flagged or None, "prior": prior,
        "per_class": per_class or None, "synthesis": synthesis, "per_image": per_image, "split": split})
    with Progress(transient=True) as bar:
        task = bar.add_task("generating", total=cfg.n)
        summary = generate_dataset(run, out, cfg, device=device, mix_with=mix_with, ratio=ratio, anchors=anchors,
                                   progress=lambda done, total: bar.update(task, completed=done, total=total))
    c, tm = summary["counts"], summary["timings_s"]
    typer.echo(f"{c['samples']} samples -> {out} ({c['written_files']} files written, {c['skipped_existing']} already "
               f"there); decode {tm['decode']:.1f}s, audit {tm['audit']:.1f}s, write {tm['write']:.1f}s")
    typer.echo(summary["audit"]["summary"])

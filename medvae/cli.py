"""The `medvae` command line. Each subcommand is a thin wrapper over a library call.

A MedvaeError (the user's mistake) prints one line to stderr and exits with code 2.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from medvae.errors import MedvaeError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])
log = logging.getLogger("medvae")


def user_errors(fn):
    """Turn a MedvaeError into one line on stderr and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MedvaeError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(err.exit_code) from None

    return wrapper


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    """medvae: scans -> patches -> VAE / VAE-GAN -> synthetic data and reports."""
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(show_path=False, rich_tracebacks=False, console=None)],
        force=True,
    )


@app.command()
@user_errors
def phantom(
    out: Path = typer.Option(..., "--out", help="Directory to write the phantom cohort into."),
    ct_patients: int = typer.Option(4, help="Number of CT patients (TCIA layout + NIfTI labels)."),
    microscopy_stacks: int = typer.Option(2, help="Number of fluorescence microscopy TIFF stacks."),
    seed: int = typer.Option(0, help="Random seed; the cohort is deterministic per seed."),
    ct_size: int = typer.Option(512, help="In-plane CT matrix size (512 as in real scans)."),
    ct_slices: Optional[int] = typer.Option(None, help="Slices per CT series (default: varies 60-100)."),
) -> None:
    """Write the built-in phantom cohort (CT DICOM series in TCIA layout + microscopy TIFFs)."""
    from medvae.io.phantoms import write_phantom_cohort

    summary = write_phantom_cohort(
        out, ct_patients=ct_patients, microscopy_stacks=microscopy_stacks, seed=seed,
        ct_size=ct_size, ct_slices=ct_slices,
    )
    typer.echo(f"phantom cohort written to {out}: {len(summary['ct'])} CT series (TCIA layout, labels in "
               f"{out / 'labels'}), {len(summary['microscopy'])} microscopy stacks")


@app.command()
@user_errors
def discover(
    scans_dir: Path = typer.Argument(..., help="Scan directory (TCIA, MSD, NIfTI or TIFF folder)."),
    out: Path = typer.Option(..., "--out", help="Manifest CSV to write."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Directory of label maps."),
    modality: str = typer.Option("auto", help="auto|ct|microscopy|mr"),
    reference: Optional[Path] = typer.Option(None, help="Reference manifest to reconcile with."),
    seed: int = typer.Option(0, help="Seed of the patient-level split."),
) -> None:
    """Find scans, validate them, assign patient-level splits, write manifest.csv."""
    from medvae.data.discover import discover_cli

    sys.exit(discover_cli(scans_dir, out, labels=labels, modality=modality, reference=reference, seed=seed))


@app.command()
@user_errors
def prepare(
    manifest: Optional[Path] = typer.Argument(None, help="manifest.csv from `medvae discover`."),
    out: Path = typer.Option(..., "--out", help="Patch store directory to write."),
    patch_size: Optional[int] = typer.Option(None, help="128 or 256."),
    mode: Optional[str] = typer.Option(None, help="resize (whole slice) | tile (native resolution)."),
    stride: Optional[int] = typer.Option(None, help="Tile stride in pixels (tile mode)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML with PrepareConfig keys."),
    workers: Optional[int] = typer.Option(None, help="Volumes processed in parallel."),
    shard: Optional[str] = typer.Option(None, help="i/N: prepare only shard i of N volumes."),
    merge: Optional[list[Path]] = typer.Option(None, "--merge", help="Shard stores to join into --out."),
) -> None:
    """Slice, normalize and patch the manifest's volumes into a memory-mapped patch store."""
    from medvae.data.store import prepare_cli

    sys.exit(prepare_cli(manifest, out, patch_size=patch_size, mode=mode, stride=stride, config=config,
                         workers=workers, shard=shard, merge=merge))


@app.command()
@user_errors
def train(
    store: Path = typer.Argument(..., help="Patch store from `medvae prepare`."),
    model: Optional[str] = typer.Option(
        None, help="vae | vaegan | monai-vae | monai-kl (default: the config's model.name, else vae)"),
    out: Path = typer.Option(..., "--out", help="Run directory (checkpoints, logs)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML with `model:` and `train:` sections."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N | mps"),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many optimizer steps."),
    epochs: Optional[int] = typer.Option(None, help="Number of epochs (when --max-steps is not given)."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size per process."),
    checkpoint_every: Optional[int] = typer.Option(None, help="Steps between periodic checkpoints."),
    resume: bool = typer.Option(False, "--resume", help="Continue from RUN/checkpoints/last.pt."),
) -> None:
    """Train a model on a patch store (multi-GPU: torchrun --nproc_per_node N -m medvae train ...)."""
    from medvae.engine.trainer import train_cli

    train_cli(store, out, model=model, config=config, device=device, max_steps=max_steps, epochs=epochs,
              batch_size=batch_size, checkpoint_every=checkpoint_every, resume=resume)


@app.command()
@user_errors
def evaluate(
    run: Path = typer.Argument(..., help="Run directory from `medvae train`."),
    store: Path = typer.Option(..., "--store", help="Patch store to evaluate on."),
    out: Path = typer.Option(..., "--out", help="Report directory."),
    split: str = typer.Option("test", help="Split to evaluate."),
    compare: Optional[list[Path]] = typer.Option(None, "--compare", help="Other runs to compare side by side."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML with EvaluateConfig keys."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
) -> None:
    """Per-patient and per-modality metrics, cohort MMD, and an offline HTML report."""
    from medvae.evaluate import evaluate_cli

    evaluate_cli(run, store, out, split=split, compare=compare or [], config=config, device=device)


@app.command()
@user_errors
def generate(
    run: Path = typer.Argument(..., help="Run directory from `medvae train`."),
    n: int = typer.Option(..., "--n", help="Number of synthetic images."),
    out: Path = typer.Option(..., "--out", help="Output directory."),
    seed: int = typer.Option(0, help="Sampling seed."),
    format: str = typer.Option("nifti", "--format", help="nifti | tiff | png | npy"),
    batch_size: int = typer.Option(64, help="Samples decoded per batch."),
    temperature: float = typer.Option(1.0, help="Prior standard deviation multiplier."),
    checkpoint: str = typer.Option("best", help="best | last | PATH"),
    drop_flagged: bool = typer.Option(False, "--drop-flagged", help="Do not write samples flagged by the audit."),
    mix_with: Optional[Path] = typer.Option(None, "--mix-with", help="Real store to mix into an augmented store."),
    ratio: float = typer.Option(1.0, help="Synthetic-to-real ratio of the augmented store."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
) -> None:
    """Generate a synthetic dataset in physical units, audit it for memorization."""
    from medvae.generate import generate_cli

    generate_cli(run, out, n=n, seed=seed, format=format, batch_size=batch_size, temperature=temperature,
                 checkpoint=checkpoint, drop_flagged=drop_flagged, mix_with=mix_with, ratio=ratio, device=device)


@app.command("run")
@user_errors
def run_pipeline(
    pipeline: Path = typer.Argument(..., help="Pipeline YAML (see pipelines/)."),
    scans: Path = typer.Option(..., "--scans", help="Scan directory."),
    out: Path = typer.Option(..., "--out", help="Run directory for all stages."),
    quick: bool = typer.Option(
        False, "--quick", help="Tiny counts (2 steps, few samples): check data and config first."),
) -> None:
    """Run discover -> prepare -> train -> evaluate -> generate, skipping finished stages."""
    from medvae.pipeline import run_pipeline as run

    run(pipeline, scans, out, quick=quick)


@app.command()
@user_errors
def demo(out: Path = typer.Option(Path("demo_out"), "--out", help="Where the demo writes everything.")) -> None:
    """Write a phantom cohort and run the demo pipeline on it end to end (CPU, minutes)."""
    from medvae.pipeline import demo as run_demo

    run_demo(out)


if __name__ == "__main__":
    app()

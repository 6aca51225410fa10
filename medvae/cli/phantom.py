"""`medvae phantom`: write the built-in phantom cohort."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medvae.cli.app import app, user_errors


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

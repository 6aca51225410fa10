"""`medvae denoise`: apply a denoise run to whole scans, written back in their own formats."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medvae.cli.app import app, config_with_options, log, user_errors
from medvae.config import DenoiseConfig


@app.command()
@user_errors
def denoise(
    run: Path = typer.Argument(..., help="Run directory of `medvae train --task denoise`."),
    input: Path = typer.Argument(..., help="A scan file, a scan directory or a manifest (.csv)."),
    out: Path = typer.Option(..., "--out", help="Output file (one input file) or directory."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML with DenoiseConfig keys."),
    checkpoint: Optional[str] = typer.Option(None, help="best | last | a step number (default best)."),
    batch_size: Optional[int] = typer.Option(None, help="Slices per forward pass."),
    tile: Optional[int] = typer.Option(None, help="Sliding-window tile size (0: whole slices)."),
    amp: Optional[str] = typer.Option(None, help="auto | bf16 | fp16 | off (default auto: bf16 where the CPU has "
                                                 "AMX / AVX-512 BF16 or the GPU bf16, ~3x faster, outputs within "
                                                 "~1e-2 of fp32's on the window; off: fp32)."),
    samples: Optional[int] = typer.Option(
        None, help="unet-vae runs: the MMSE estimate, the mean of N posterior samples' clean estimates "
                   "(DivNoising; 0: the posterior mean code decoded once)."),
    sd: Optional[bool] = typer.Option(None, "--sd/--no-sd", help="Also write the per-pixel posterior sd as "
                                                               "<stem>_sd beside each output (unet-vae: of the "
                                                               "samples; n2v --posterior runs: closed form)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N | mps"),
) -> None:
    """Denoise every slice of every scan at native resolution (NIfTI keeps its affine, TIFF its µm
    spacing; DICOM series become NIfTI). Existing outputs are skipped, so a re-run resumes."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from medvae.denoising.apply import denoise_scans
    from medvae.devices import select_device

    cfg = config_with_options(config, DenoiseConfig, {"checkpoint": checkpoint, "batch_size": batch_size,
                                                      "tile": tile, "amp": amp,
                                                      "samples": samples, "sd": sd})
    with Progress(TextColumn("[bold]denoise {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("slices"), TimeRemainingColumn()) as progress:
        bar = progress.add_task("", total=None)

        def on_file(src, dst, skipped):
            progress.update(bar, description=f"{src.name}{' (done before)' if skipped else ''}", completed=0,
                            total=None)

        done = denoise_scans(run, input, out, cfg, device=select_device(device),
                             on_batch=lambda n: progress.advance(bar, n), on_file=on_file)
    new = [d for d in done if not d["skipped"]]
    log.info("denoised %d scans (%d slices), %d already done; outputs under %s", len(new),
             sum(d["slices"] for d in new), len(done) - len(new), out)

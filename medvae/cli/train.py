"""`medvae train`: a YAML config (if any), the command-line options on top, then the trainer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from medvae.cli.app import app, choices, config_with_options, log, user_errors
from medvae.config import ModelConfigBase, NoiseConfig, TrainStageConfig, VAEConfig


@app.command()
@user_errors
def train(
    store: Path = typer.Argument(..., help="Patch store from `medvae prepare`."),
    model: Optional[str] = typer.Option(
        None, help=f"{choices(ModelConfigBase, 'name')} (default: the config's model.name, else vae)"),
    out: Path = typer.Option(..., "--out", help="Run directory (checkpoints, logs)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML with `model:` and `train:` sections."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N | mps"),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many optimizer steps."),
    epochs: Optional[int] = typer.Option(None, help="Number of epochs (when --max-steps is not given)."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size per process."),
    checkpoint_every: Optional[int] = typer.Option(None, help="Steps between periodic checkpoints."),
    resume: bool = typer.Option(False, "--resume", help="Continue from RUN/checkpoints/last.pt."),
    task: Optional[str] = typer.Option(
        None, help=f"{choices(TrainStageConfig, 'task')} (denoise: noisy input -> clean target)."),
    noise: Optional[str] = typer.Option(
        None, help=f"denoise task, objective supervised: {choices(NoiseConfig, 'kind')}"),
    objective: Optional[str] = typer.Option(
        None, help=f"denoise task: {choices(TrainStageConfig, 'objective')} (supervised: a clean store and simulated "
                   "noise; n2v, n2s, divnoising, sure: a store of noisy scans as they are, no clean images; sure: "
                   "PG-SURE with the calibrated noise model, a network that sees every pixel)"),
    posterior: Optional[bool] = typer.Option(
        None, "--posterior/--no-posterior", help="denoise task, objective n2v / n2s: the network predicts a prior and "
        "the estimate is the posterior mean under the noise model (default: on when one is given or calibrated)."),
    condition: Optional[str] = typer.Option(
        None, help=f"{choices(ModelConfigBase, 'condition')} (default auto: modality when the store has several; "
                   "mask: a joint image + label-map model)"),
    latent: Optional[str] = typer.Option(
        None, help=f"vae / vaegan: {choices(VAEConfig, 'latent')} (default vector; spatial: a 4 x size/8 x size/8 map, "
                   "the latent a diffusion prior models: generate / evaluate --prior diffusion)"),
) -> None:
    """Train a model on a patch store (multi-GPU: torchrun --nproc_per_node N -m medvae train ...).

    --task denoise without --model trains dae (unet-vae for --objective divnoising)."""
    from medvae.errors import ConfigError
    from medvae.pipeline import train_stage
    from medvae.training.rundir import RunDir

    cfg = config_with_options(config, TrainStageConfig, {
        "model.name": model, "train.max_steps": max_steps, "train.epochs": epochs,
        "train.batch_size": batch_size, "train.checkpoint_every": checkpoint_every, "task": task,
        "objective": objective, "posterior": posterior, "noise.kind": noise, "model.condition": condition,
        "model.latent": latent})
    if noise is not None and cfg.objective != "supervised":
        raise ConfigError(f"--noise does not apply to objective {cfg.objective}: it trains on the store's noisy scans "
                          "as they are; leave --noise out")
    summary = train_stage(store, out, cfg, device=device, resume=resume)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    checkpoints = RunDir(out).checkpoints
    if rank0 and cfg.task == "denoise" and cfg.objective != "supervised":
        m = summary["metrics"]
        shown = ", ".join(f"val {k} {v:.4g}" for k, v in m.items()) or "no val split"
        log.info("trained %s to denoise (%s, no clean images) for %d steps: %s; checkpoints in %s", cfg.model.name,
                 cfg.objective, summary["step"], shown, checkpoints)
    elif rank0 and cfg.task == "denoise":
        m = summary["metrics"]
        log.info("trained %s to denoise (%s) for %d steps: val PSNR %.2f dB (noisy %.2f dB), SSIM %.3f; "
                 "checkpoints in %s", cfg.model.name, cfg.noise.kind, summary["step"], m.get("psnr", float("nan")),
                 m.get("noisy_psnr", float("nan")), m.get("ssim", float("nan")), checkpoints)
    elif rank0:
        m = summary["metrics"]
        log.info("trained %s for %d steps: val ELBO %.1f nats, SSIM %.3f, PSNR %.1f dB; checkpoints in %s",
                 cfg.model.name, summary["step"], m.get("elbo", float("nan")), m.get("ssim", float("nan")),
                 m.get("psnr", float("nan")), checkpoints)

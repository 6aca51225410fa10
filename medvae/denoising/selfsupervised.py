"""Denoising without clean images: the self-supervised objectives of the denoise task, trained on a
store of the user's noisy scans as they are (no noise is added; ``noise`` does not apply).

- ``n2v`` / ``n2s`` (:class:`BlindSpotTask`): the input is the noisy batch with blind-spot masks
  (:mod:`medvae.denoising.masks`), the target the same noisy batch, and the training pair's
  per-pixel ``weight`` keeps only the masked pixels in the loss (Krull et al. 2019; Batson & Royer
  2019). Since the noise of a pixel is independent of its neighbours' and has mean zero, the
  network's best prediction of a hidden noisy pixel is its clean value. Validation: the same loss
  on held-out noisy patches with fixed masks, as ``blindspot_mse`` and ``blindspot_psnr`` = 10 log10(1 / mse)
  (best.pt); both contain the noise variance, so they rank checkpoints, not the denoising quality.
  The held-out patches are the val split, or, in a store without one (a user's noisy image alone),
  ``blindspot.holdout`` of the train patches, evenly spaced and never trained on (``held_out``), so
  best.pt is chosen by the objective itself and a longer budget cannot lose to a shorter one.
- ``--posterior`` (``posterior``; auto: on when a noise model is given or calibrated): the network
  (dae with ``model.prior``) predicts a Gaussian prior over each clean pixel, mean and log-variance,
  trained by the blind-spot objective as the Gaussian likelihood of the masked noisy pixel under
  prior ⊗ noise, N(y; μ, σ_p² + a·μ + b); ``medvae denoise`` returns the posterior mean given the
  noisy pixel, (σ_n² μ + σ_p² y) / (σ_n² + σ_p²), and ``--sd`` its sd (Laine et al. 2019). Validation
  adds ``blindspot_ll``, that likelihood per masked pixel (nats, higher is better), which keeps best.pt.
- ``divnoising`` (:class:`DivNoisingTask`, Prakash et al. 2021): unet-vae without skips or input
  residual learns the noisy batch itself under a Poisson–Gaussian noise model as the decoder's
  likelihood (model.likelihood ``poisson-gaussian``, variance ``a·s + b``), so the latent must
  explain the signal and the noise model the noise; the decoder's mean is the clean estimate, and
  ``medvae denoise --samples N`` averages N posterior samples (MMSE). Validation: the val ELBO
  (best.pt), NLL and KL.

- ``sure`` (:class:`medvae.denoising.sure.SureTask`): a dae that sees every pixel, trained by PG-SURE with the
  noise model (:func:`resolve_sure`: calibrated when not given, float32); best.pt by the held-out SURE.

:func:`check_config` refuses a config that cannot work before anything is trained;
:func:`build_task` builds the task of any denoise objective (``supervised``: DenoiseTask).
:func:`resolve_noise_model` calibrates divnoising's and the posterior's (a, b) from the store when the config
has none, and resolves ``posterior``.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from medvae.config import DENOISERS, TrainConfig, TrainStageConfig
from medvae.data.loader import Batch
from medvae.data.store import PatchStore, even_positions
from medvae.denoising import calibration, masks
from medvae.denoising.noise import step_generator
from medvae.denoising.supervised import VAL_SEED_OFFSET, DenoiseTask, random_crop
from medvae.denoising.sure import SureTask
from medvae.errors import ConfigError
from medvae.training.tasks import TrainingPair
from medvae.training.validate import over_batches, validate

log = logging.getLogger(__name__)
MAX_HIDDEN_SHARE = 0.25  # of a StructN2V input's pixels replaced by random values (check_config)
NO_NOISE = 1e-8  # a calibrated variance at mid-grey at or below this: a clean store (no posterior correction)


def check_config(cfg: TrainStageConfig) -> None:
    """Raise ConfigError for a config whose run could not give a denoiser (before the first step):
    an objective without the denoise task, a model that cannot denoise whole slices, divnoising
    with a path from the noisy input to the output besides the latent, struct masks outside n2v, the supervised
    task's noise.flips / noise.target on a self-supervised objective."""
    m, obj = cfg.model, cfg.objective
    if cfg.task != "denoise":
        if obj != "supervised":
            raise ConfigError(f"objective {obj} trains a denoiser: give --task denoise (task is {cfg.task})")
        return
    if m.name not in DENOISERS:
        raise ConfigError(f"model {m.name} cannot denoise whole slices (it is not fully convolutional): --task "
                          f"denoise trains {' or '.join(DENOISERS)}; leave --model out for "
                          f"{'unet-vae' if obj == 'divnoising' else 'dae'}")
    if obj == "divnoising":
        if m.name != "unet-vae":
            raise ConfigError(f"objective divnoising is a VAE with the noise model as its likelihood: it needs "
                              f"model unet-vae, not {m.name}")
        if m.skip_connections or m.input_residual:
            raise ConfigError("objective divnoising needs model.skip_connections and model.input_residual false: "
                              "either lets the decoder copy the noisy input, and the VAE then learns the noise")
        if m.likelihood != "poisson-gaussian":
            raise ConfigError(f"objective divnoising needs model.likelihood poisson-gaussian (the noise model), "
                              f"not {m.likelihood}")
    if obj == "sure":
        if m.name != "dae" or m.prior:
            raise ConfigError(f"objective sure takes finite differences of the network's output: it needs the "
                              f"deterministic model dae without model.prior, not {m.name}"
                              f"{' with prior' if m.name == 'dae' else ''}; leave --model out")
        if cfg.train.amp in ("bf16", "fp16"):
            raise ConfigError(f"objective sure differences outputs 1e-3 apart, below {cfg.train.amp}'s resolution: "
                              "set train.amp off (or auto, which trains sure in float32)")
    if obj != "supervised" and (cfg.noise.flips or cfg.noise.target != "clean"):
        raise ConfigError(f"noise.flips and noise.target shape the supervised objective's (noisy, clean) pairs; "
                          f"objective {obj} trains on the noisy store as it is: leave them out")
    bs = cfg.blindspot
    if bs.struct != "none" and obj != "n2v":
        raise ConfigError(f"blindspot.struct {bs.struct} is a StructN2V mask: objective n2v only")
    hidden = masks.hidden_share(bs.fraction, bs.struct, bs.struct_length) if obj == "n2v" else 0.0
    if hidden > MAX_HIDDEN_SHARE:
        raise ConfigError(f"blindspot.struct {bs.struct} ({bs.struct_length} px) at fraction {bs.fraction:.4g} hides "
                          f"{hidden:.0%} of every input with random values (a 3 x 3 box at 1/16: 22 dB on real CT, "
                          f"n2v 36): lower blindspot.fraction to at most "
                          f"{MAX_HIDDEN_SHARE * bs.fraction / hidden:.4g} or shorten struct_length")
    if cfg.posterior and (obj not in ("n2v", "n2s") or m.name != "dae"):
        raise ConfigError(f"posterior is the blind-spot network's prior combined with the noisy pixel: objective "
                          f"n2v or n2s with model dae, not {obj} with {m.name}; leave posterior out")


def calibrate_noise_model(store: PatchStore, max_patches: int = 64) -> tuple[float, float]:
    """(a, b) of the store's Poisson–Gaussian noise, variance ``a·s + b`` on its [0, 1] scale, fitted
    (:func:`medvae.denoising.calibration.estimate_noise`, Foi et al. 2008) on the level sets of up to
    ``max_patches`` evenly spaced training patches (every patch when the store has no train split)."""
    rows = store.select(split="train") if "train" in store.splits else store.select()
    rows = rows[even_positions(len(rows), min(max_patches, len(rows)))]
    try:
        cal = calibration.estimate_noise(store.get(rows))
    except ValueError as e:
        raise ConfigError(f"{store.path}: no noise model could be calibrated from its patches ({e}); set "
                          "model.noise_a and model.noise_b (variance a·s + b on the [0, 1] scale)") from e
    return float(cal.a), float(cal.b)


def resolve_noise_model(store: PatchStore, cfg: TrainStageConfig) -> TrainStageConfig:
    """``cfg`` with ``model.noise_a`` / ``noise_b`` set when the likelihood is poisson-gaussian and the
    config lacks them (:func:`calibrate_noise_model`), and ``posterior`` resolved (:func:`resolve_posterior`);
    the run's config.yaml and checkpoints keep them."""
    cfg = resolve_sure(resolve_posterior(store, cfg), store)
    m = cfg.model
    if m.likelihood != "poisson-gaussian" or (m.noise_a is not None and m.noise_b is not None):
        return cfg
    a, b = calibrate_noise_model(store)
    log.info("noise model calibrated from %s: variance %.4g·s + %.4g (set model.noise_a / noise_b to override)",
             store.path, a, b)
    cfg = cfg.model_copy(deep=True)
    cfg.model.noise_a, cfg.model.noise_b = float(a), float(b)
    return cfg


def resolve_posterior(store: PatchStore, cfg: TrainStageConfig) -> TrainStageConfig:
    """``cfg`` with ``posterior`` True or False (a denoise n2v / n2s run of the dae; others as given). Auto
    (None) is on when the model gives its noise model or one can be calibrated from the store, else off;
    True without one calibrates it or refuses (ConfigError). On: the dae predicts a prior (``model.prior``)
    under the likelihood poisson-gaussian with the noise model's (a, b)."""
    m = cfg.model
    if cfg.task != "denoise" or cfg.objective not in ("n2v", "n2s") or m.name != "dae" or cfg.posterior is False:
        return cfg
    a, b = m.noise_a, m.noise_b
    if a is None or b is None:
        try:
            a, b = calibrate_noise_model(store)
            a, b = max(a, 0.0), max(b, 0.0)  # the fit may cross 0 (a black level); the model's variance may not
            if 0.5 * a + b <= NO_NOISE:
                raise ConfigError(f"{store.path}: the calibrated noise variance is {0.5 * a + b:.3g} at mid-grey: "
                                  "no noise to combine a prior with; set model.noise_a and model.noise_b")
        except ConfigError:
            if cfg.posterior:
                raise
            log.info("%s: no noise model could be calibrated; %s without posterior correction", store.path,
                     cfg.objective)
            return cfg.model_copy(update={"posterior": False})  # (assignment would re-run the config's validators)
        log.info("noise model calibrated from %s: variance %.4g·s + %.4g; %s predicts a prior and denoises with "
                 "the posterior mean (posterior: false turns it off)", store.path, a, b, cfg.objective)
    model = m.model_copy(update={"prior": True, "likelihood": "poisson-gaussian", "noise_a": float(a),
                                 "noise_b": float(b)})
    return cfg.model_copy(update={"posterior": True, "model": model})


def resolve_sure(cfg: TrainStageConfig, store: PatchStore) -> TrainStageConfig:
    """``cfg`` of a denoise ``sure`` run with its noise model (``model.noise_a`` / ``noise_b`` calibrated from
    the store as the posterior's are when not given; ConfigError when the store has no noise to estimate) and
    ``train.amp`` auto as off (SURE's finite differences need float32); other configs as given."""
    if cfg.task != "denoise" or cfg.objective != "sure":
        return cfg
    m, update = cfg.model, {}
    if m.noise_a is None or m.noise_b is None:
        a, b = calibrate_noise_model(store)
        a, b = max(a, 0.0), max(b, 0.0)  # the fit may cross 0 (a black level); a variance may not
        if 0.5 * a + b <= NO_NOISE:
            raise ConfigError(f"{store.path}: the calibrated noise variance is {0.5 * a + b:.3g} at mid-grey: SURE "
                              "needs the noise model; set model.noise_a and model.noise_b")
        log.info("noise model calibrated from %s: variance %.4g·s + %.4g (set model.noise_a / noise_b to override)",
                 store.path, a, b)
        update["model"] = m.model_copy(update={"noise_a": float(a), "noise_b": float(b)})
    if cfg.train.amp == "auto":
        update["train"] = cfg.train.model_copy(update={"amp": "off"})
    return cfg.model_copy(update=update) if update else cfg


def build_task(store: PatchStore, cfg: TrainStageConfig):
    """The training task of a denoise config's objective (:func:`check_config` first)."""
    check_config(cfg)
    seed, crop = cfg.train.seed, cfg.noise.crop
    if cfg.objective == "supervised":
        return DenoiseTask(store, cfg.noise, seed)
    if cfg.objective == "divnoising":
        return DivNoisingTask(store, seed, crop)
    if cfg.objective == "sure":
        m = cfg.model
        if m.noise_a is None or m.noise_b is None:
            raise ConfigError("objective sure needs its noise model: model.noise_a and model.noise_b "
                              "(resolve_noise_model calibrates them from the store)")
        return SureTask(store, m.noise_a, m.noise_b, seed, crop, held_out_rows(store, cfg.blindspot.holdout))
    return BlindSpotTask(store, cfg.objective, cfg.blindspot, seed, crop, posterior=bool(cfg.posterior))


def held_out_rows(store: PatchStore, fraction: float) -> np.ndarray | None:
    """The rows a blind-spot run validates on in place of a val split: None when the store has one (or
    ``fraction`` is 0), else ``fraction`` of the train rows (at least one), evenly spaced (the same rows
    every run and every resume), which the trainer leaves out of the training batches."""
    if "val" in store.splits or fraction <= 0:
        return None
    rows = store.select(split="train") if "train" in store.splits else store.select()
    return rows[even_positions(len(rows), max(1, round(fraction * len(rows))))]


class BlindSpotTask:
    """n2v / n2s on a store of noisy patches (module docstring); one per training run.

    Args:
        store: the noisy patch store.
        objective: ``n2v`` or ``n2s``.
        cfg: BlindSpotConfig (fraction, replacement, radius, grid, struct).
        seed: the run's ``train.seed``: masks of step s come from ``(seed, s)`` alone.
        crop: train on random crops of this size (``noise.crop``; 0: whole patches).
    """

    name = "denoise"
    conditional = False

    def __init__(self, store: PatchStore, objective: str, cfg, seed: int, crop: int = 0, posterior: bool = False):
        if objective not in ("n2v", "n2s"):
            raise ValueError(f"not a blind-spot objective: {objective!r}")
        self.store, self.objective, self.cfg, self.seed, self.crop = store, objective, cfg, int(seed), int(crop)
        # best.pt: the objective itself on the held-out patches (the posterior's loss is its likelihood)
        self.best_key = "blindspot_ll" if posterior else "blindspot_psnr"
        self.held_out = held_out_rows(store, cfg.holdout)

    def masked(self, x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(network input, mask)`` of the noisy batch ``x`` (:mod:`medvae.denoising.masks`)."""
        c = self.cfg
        if self.objective == "n2s":
            return masks.n2s(x, gen, c.grid)
        return masks.n2v(x, gen, c.fraction, c.replace, c.radius, c.struct, c.struct_length)

    def training_pair(self, batch: Batch, step: int) -> TrainingPair:
        gen = step_generator(self.seed, step, batch.x.device)
        (x,) = random_crop(self.crop, gen, batch.x)
        x_in, mask = self.masked(x.float(), gen)
        return TrainingPair(x_in.to(x.dtype), x, masks.loss_weight(mask))

    def validate(self, model: torch.nn.Module, tc: TrainConfig, device: torch.device,
                 channels_last: bool = False) -> dict[str, float]:
        """``blindspot_mse`` (mean over the held-out patches of the masked pixels' squared error against
        their noisy values) and ``blindspot_psnr``, with the same masks every time; a prior network also
        ``blindspot_ll``: its training likelihood per masked pixel (nats)."""

        def batch_metrics(i: int, rows: np.ndarray) -> dict[str, torch.Tensor]:
            x = torch.from_numpy(self.store.get(rows)).to(device)
            x_in, mask = self.masked(x, step_generator(self.seed + VAL_SEED_OFFSET, i, device))
            out = model(x_in)
            m = mask.expand_as(x).float()
            n = m.flatten(1).sum(1).clamp_min(1)
            metrics = {"blindspot_mse": ((out.x_hat.float() - x) ** 2 * m).flatten(1).sum(1) / n}
            if getattr(out, "prior_logvar", None) is not None:  # the loss itself, on the masked pixels
                ll = model.likelihood.log_prob(x, logits=out.logits, weight=m, prior_logvar=out.prior_logvar)
                metrics["blindspot_ll"] = ll / n
            return metrics

        val = over_batches(model, self.store, tc.batch_size, tc.val_batches, batch_metrics, torch.float64,
                           rows=self.held_out)
        if not val:
            return {}
        mse = val["blindspot_mse"]
        return {**val, "blindspot_psnr": float(10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-12))))}


class DivNoisingTask:
    """DivNoising on a store of noisy patches: the VAE learns the noisy batch under its noise-model
    likelihood; validation is the val ELBO (best.pt), NLL and KL (module docstring).

    Args:
        store: the noisy patch store.
        seed: the run's ``train.seed`` (crops of step s from ``(seed, s)``; validation's posterior noise).
        crop: train on random crops of this size (0: whole patches).
    """

    name = "denoise"
    best_key = "elbo"
    conditional = False

    def __init__(self, store: PatchStore, seed: int, crop: int = 0):
        self.store, self.seed, self.crop = store, int(seed), int(crop)

    def training_pair(self, batch: Batch, step: int) -> TrainingPair:
        (x,) = random_crop(self.crop, step_generator(self.seed, step, batch.x.device), batch.x)
        return TrainingPair(x, x)

    def validate(self, model: torch.nn.Module, tc: TrainConfig, device: torch.device,
                 channels_last: bool = False) -> dict[str, float]:
        out = validate(model, self.store, tc.batch_size, tc.val_batches, device, seed=self.seed,
                       channels_last=channels_last)
        return {k: v for k, v in out.items() if k in ("elbo", "nll", "kl")}

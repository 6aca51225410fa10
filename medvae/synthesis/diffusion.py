"""A latent diffusion prior: a denoising diffusion model over a spatial latent's codes (Rombach et al. 2022).

The Gaussian mixture (:mod:`medvae.synthesis.prior`) models the encoder's codes as a few ellipsoids; over a
spatial latent (``model.latent: spatial``, monai-kl, unet-vae) of thousands of dimensions it can afford
diagonal covariances only and loses the codes' spatial structure. Here MONAI's ``DiffusionModelUNet`` learns
to denoise the frozen encoder's posterior means of the training split (standardised per channel, as latent
diffusion scales its latents), with the noise schedule of MONAI's ``DDIMScheduler`` (``scaled_linear_beta``,
LDM's betas; velocity prediction), and samples by DDIM with ``eta = 0``: a deterministic map from the initial
noise, so a sample still depends only on ``(seed, i)`` (:mod:`medvae.synthesis.sampling` draws that noise).
A class / modality model's prior takes the condition id as the U-Net's class embedding.

Fitting is seeded: a fit that is killed starts again and ends where it would have. The fitted prior is a
dict of tensors and plain values (``torch.load(weights_only=True)``), saved beside the mixtures in the run's
``priors/``.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from medvae.config import DiffusionPriorConfig

log = logging.getLogger(__name__)
BETAS = {"schedule": "scaled_linear_beta", "beta_start": 0.0015, "beta_end": 0.0195}  # LDM's


def build_unet(shape: tuple[int, int, int], cfg: DiffusionPriorConfig, n_conditions: int = 0) -> DiffusionModelUNet:
    """The noise-predicting U-Net for latents of ``shape (c, h, w)``: ``cfg.channels`` per level (no attention),
    a class embedding of ``n_conditions`` ids when > 0."""
    chs = tuple(cfg.channels)
    return DiffusionModelUNet(
        spatial_dims=2, in_channels=shape[0], out_channels=shape[0], channels=chs,
        num_res_blocks=cfg.res_blocks, attention_levels=(False,) * len(chs),
        norm_num_groups=math.gcd(*chs, 32), num_class_embeds=n_conditions or None,
    )


def scheduler(cfg: DiffusionPriorConfig) -> DDIMScheduler:
    """The DDIM scheduler (``cfg.train_timesteps``, LDM's betas, v-prediction, no clipping) set to
    ``cfg.sample_steps``."""
    sched = DDIMScheduler(num_train_timesteps=cfg.train_timesteps, clip_sample=False, prediction_type="v_prediction",
                          **BETAS)
    sched.set_timesteps(cfg.sample_steps)
    return sched


class DiffusionPrior:
    """A fitted latent diffusion prior: the U-Net, the per-channel ``shift``/``scale`` of the codes, its config."""

    def __init__(self, net: DiffusionModelUNet, shape: tuple[int, int, int], shift: torch.Tensor,
                 scale: torch.Tensor, cfg: DiffusionPriorConfig, info: dict) -> None:
        self.net, self.shape, self.cfg, self.info = net.eval(), tuple(shape), cfg, info
        self.shift, self.scale = shift.float().reshape(1, -1, 1, 1), scale.float().reshape(1, -1, 1, 1)

    @torch.no_grad()
    def transform(self, eps: torch.Tensor, u: torch.Tensor | None = None,
                  ids: torch.Tensor | None = None) -> torch.Tensor:
        """eps: (B, D) standard normal (the initial noise, D = c·h·w; ``u`` unused), ids: (B,) condition ids
        -> z: (B, D) float32 codes by DDIM (eta 0) from that noise."""
        device = next(self.net.parameters()).device
        x = eps.float().reshape(len(eps), *self.shape).to(device)
        labels = None if self.net.num_class_embeds is None else (
            torch.zeros(len(eps), dtype=torch.long) if ids is None else ids.long()).to(device)
        sched = scheduler(self.cfg)
        for t in sched.timesteps:
            out = self.net(x, timesteps=torch.full((len(x),), int(t), device=device), class_labels=labels)
            x, _ = sched.step(out, int(t), x)
        z = x * self.scale.to(device) + self.shift.to(device)
        return z.flatten(1).float().cpu()

    def to(self, device: torch.device | str) -> DiffusionPrior:
        self.net.to(device)
        return self

    def state_dict(self) -> dict:
        return {"kind": "diffusion", "shape": list(self.shape), "shift": self.shift.flatten(),
                "scale": self.scale.flatten(), "config": self.cfg.model_dump(mode="json"),
                "n_conditions": int(self.net.num_class_embeds or 0),
                "net": self.net.state_dict(), **self.info}

    @classmethod
    def from_state(cls, state: dict) -> DiffusionPrior:
        cfg = DiffusionPriorConfig(**state["config"])
        shape = tuple(int(s) for s in state["shape"])
        net = build_unet(shape, cfg, int(state["n_conditions"]))
        net.load_state_dict(state["net"])
        info = {k: v for k, v in state.items()
                if k not in ("kind", "shape", "shift", "scale", "config", "n_conditions", "net")}
        return cls(net, shape, state["shift"], state["scale"], cfg, info)


@torch.enable_grad()  # evaluation samples under no_grad
def fit_diffusion(codes: np.ndarray, shape: tuple[int, int, int], cfg: DiffusionPriorConfig,
                  ids: np.ndarray | None = None, n_conditions: int = 1,
                  device: torch.device | str = "cpu") -> DiffusionPrior:
    """Train the U-Net on ``codes (N, c·h·w)`` (standardised per channel) noised at a uniform timestep,
    ``cfg.steps`` AdamW steps with cosine decay and an EMA of the weights (the prior samples with the EMA), all
    draws from ``cfg.seed``. It predicts the velocity ``v = sqrt(ab)·eps - sqrt(1 - ab)·x0`` (Salimans & Ho 2022):
    a noise prediction's error is multiplied by ``1 / sqrt(ab)`` (~70 at the last timestep) in DDIM's first
    estimates of x0, a velocity's is not (an undertrained eps-network's samples had 10x the codes' spread)."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.as_tensor(codes, dtype=torch.float32).reshape(len(codes), *shape)
    shift = x.mean(dim=(0, 2, 3))
    scale = x.std(dim=(0, 2, 3)).clamp_min(1e-6)
    x = ((x - shift[None, :, None, None]) / scale[None, :, None, None]).to(device)
    labels = None if ids is None else torch.as_tensor(ids, dtype=torch.long).to(device)
    with torch.random.fork_rng(devices=[]):  # the U-Net's initial weights from cfg.seed, the caller's RNG untouched
        torch.manual_seed(cfg.seed)
        net = build_unet(shape, cfg, n_conditions if ids is not None else 0).to(device)
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay))
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.0)
    lr = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    sched = scheduler(cfg)
    losses = []
    for _ in range(cfg.steps):
        rows = torch.randint(len(x), (cfg.batch_size,), generator=gen).to(device)
        noise = torch.randn((cfg.batch_size, *shape), generator=gen).to(device)
        t = torch.randint(cfg.train_timesteps, (cfg.batch_size,), generator=gen).to(device)
        x0 = x[rows]
        out = net(sched.add_noise(x0, noise, t), timesteps=t, class_labels=None if labels is None else labels[rows])
        loss = F.mse_loss(out, sched.get_velocity(x0, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr.step()
        ema.update_parameters(net)
        losses.append(loss.detach())  # on the device: no sync per step
    info = {"n_fit": int(len(codes)), "final_loss": float(torch.stack(losses[-max(1, len(losses) // 10):]).mean())}
    log.info("fitted a diffusion prior on %d codes of shape %s: %d steps, final loss %.4f", len(codes), shape,
             cfg.steps, info["final_loss"])
    return DiffusionPrior(ema.module.cpu(), shape, shift, scale, cfg, info)

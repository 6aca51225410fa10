"""Which step and loss each model family trains with: the model family decides, not a list of names."""

from __future__ import annotations

import torch
from torch import nn

from medvae.config import TrainConfig
from medvae.models import DAE, VAEGAN
from medvae.training import losses
from medvae.training.adversarial import AdversarialStep
from medvae.training.distributed import DistInfo
from medvae.training.step import Loss, TrainStep


def build_step(model: nn.Module, tc: TrainConfig, device: torch.device, info: DistInfo,
               amp_dtype: torch.dtype | None, total_steps: int, task_loss: Loss | None = None) -> TrainStep:
    """The step of ``model``'s family: a deterministic denoiser its likelihood loss, every VAE-like model the
    VAE loss, and the VAE–GAN that loss with its critic (:class:`medvae.training.adversarial.AdversarialStep`).
    ``task_loss``: a task's own loss in place of the family's (``Task.loss``: PG-SURE)."""
    if task_loss is not None:
        loss = task_loss
    elif isinstance(model, DAE):
        def loss(x, out, beta, weight):  # no latent: beta does not apply
            return losses.denoiser_loss(x, out, model.likelihood, weight=weight)
    else:
        def loss(x, out, beta, weight):
            return losses.vae_loss(x, out, model.likelihood, beta=beta, free_bits=tc.free_bits, weight=weight,
                                   frequency_weight=tc.frequency_weight, frequency_alpha=tc.frequency_alpha)
    step = AdversarialStep if isinstance(model, VAEGAN) else TrainStep
    return step(model, loss, tc, device, info, amp_dtype, total_steps)

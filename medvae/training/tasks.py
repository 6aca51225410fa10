"""What a training run optimizes: a task turns a batch into ``(input, target)`` and scores validation.

The trainer is task-agnostic: it calls :meth:`Task.training_pair` every step and
:meth:`Task.validate` at every checkpoint, and keeps ``best.pt`` by the task's ``best_key``.
:class:`ReconstructTask` (the VAE's own objective: the input is its target) is the default;
``medvae.denoising.task.DenoiseTask`` (noisy input, clean target) is the other one.
"""

from __future__ import annotations

from typing import Protocol

import torch

from medvae.config import TrainConfig
from medvae.data.loader import Batch
from medvae.data.store import PatchStore
from medvae.training.validate import validate


class Task(Protocol):
    """The trainer's view of a task.

    name: the ``task`` of the TrainStageConfig it implements (``reconstruct`` | ``denoise``).
    best_key: the validation metric (higher is better) that selects ``best.pt``.
    conditional: whether models of this task take the store's class / modality condition.
    """

    name: str
    best_key: str
    conditional: bool

    def training_pair(self, batch: Batch, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input, target)`` of training step ``step`` (0-based) for ``batch``."""

    def validate(self, model: torch.nn.Module, tc: TrainConfig, device: torch.device,
                 channels_last: bool) -> dict[str, float]:
        """Validation metrics of ``model`` (an empty dict when there is nothing to validate on)."""


class ReconstructTask:
    """The VAE objective: reconstruct the batch; validation reports the ELBO (selects best.pt),
    SSIM, PSNR and MSE on the val split (:func:`medvae.training.validate.validate`)."""

    name = "reconstruct"
    best_key = "elbo"
    conditional = True

    def __init__(self, store: PatchStore, seed: int):
        self.store, self.seed = store, int(seed)

    def training_pair(self, batch: Batch, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return batch.x, batch.x

    def validate(self, model: torch.nn.Module, tc: TrainConfig, device: torch.device,
                 channels_last: bool) -> dict[str, float]:
        return validate(model, self.store, tc.batch_size, tc.val_batches, device, seed=self.seed,
                        channels_last=channels_last)

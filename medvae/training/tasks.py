"""What a training run optimizes: a task turns a batch into a :class:`TrainingPair` ``(input, target,
weight)`` and scores validation.

The trainer is task-agnostic: it calls :meth:`Task.training_pair` every step and
:meth:`Task.validate` at every checkpoint, and keeps ``best.pt`` by the task's ``best_key``.
:class:`ReconstructTask` (the VAE's own objective: the input is its target) is the default;
``medvae.denoising.supervised.DenoiseTask`` (noisy input, clean target) and the self-supervised tasks of
``medvae.denoising.selfsupervised`` (a blind-spot input whose loss counts only its masked pixels:
``weight``; DivNoising) are the others. A pair's ``weight`` multiplies each pixel's term of the
likelihood (``Likelihood.log_prob(weight=...)``); None, the default, is every pixel 1, so a task
that gives none trains exactly as before the weight existed. A task may still return a plain
``(input, target)`` tuple.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch

from medvae.config import TrainConfig
from medvae.data.loader import Batch
from medvae.data.store import PatchStore
from medvae.training.validate import validate


class TrainingPair(NamedTuple):
    """One step's training data: the model's ``input``, the ``target`` its likelihood scores, both
    ``(B, C, H, W)``, and an optional per-pixel ``weight`` of that likelihood (broadcastable to the
    target, >= 0; None: every pixel 1)."""

    input: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor | None = None


class Task(Protocol):
    """The trainer's view of a task.

    name: the ``task`` of the TrainStageConfig it implements (``reconstruct`` | ``denoise``).
    best_key: the validation metric (higher is better) that selects ``best.pt``.
    conditional: whether models of this task take the store's class / modality condition.
    held_out: optional (a task may lack it): store rows the task validates on in place of a val split, which
        the trainer leaves out of the training batches (a blind-spot run on a store without a val split);
        None or absent: none.
    loss: optional: the task's own :data:`medvae.training.step.Loss` in place of the model family's
        (PG-SURE, whose estimate needs several outputs of the model: its input stacks them along the batch).
    """

    name: str
    best_key: str
    conditional: bool

    def training_pair(self, batch: Batch, step: int) -> TrainingPair | tuple[torch.Tensor, torch.Tensor]:
        """:class:`TrainingPair` (or ``(input, target)``) of training step ``step`` (0-based) for ``batch``;
        a function of the batch and ``step`` alone (no hidden RNG state), so resume stays exact."""

    def validate(self, model: torch.nn.Module, tc: TrainConfig, device: torch.device,
                 channels_last: bool) -> dict[str, float]:
        """Validation metrics of ``model`` (an empty dict when there is nothing to validate on): the task's
        per-batch metrics through the one scaffold, :func:`medvae.training.validate.over_batches`."""


class ReconstructTask:
    """The VAE objective: reconstruct the batch; validation reports the ELBO (selects best.pt),
    SSIM, PSNR and MSE on the val split (:func:`medvae.training.validate.validate`)."""

    name = "reconstruct"
    best_key = "elbo"
    conditional = True

    def __init__(self, store: PatchStore, seed: int):
        self.store, self.seed = store, int(seed)

    def training_pair(self, batch: Batch, step: int) -> TrainingPair:
        return TrainingPair(batch.x, batch.x)

    def validate(self, model: torch.nn.Module, tc: TrainConfig, device: torch.device,
                 channels_last: bool) -> dict[str, float]:
        return validate(model, self.store, tc.batch_size, tc.val_batches, device, seed=self.seed,
                        channels_last=channels_last)

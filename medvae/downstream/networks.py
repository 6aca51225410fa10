"""The downstream model of the utility study: one small MONAI network per task, trained for a fixed
number of steps, scored on real test patches.

Every arm goes through the same :func:`train_downstream` with the same seed, step budget, batch
size and learning rate, so the arms differ only in their data and augmentation:

- each step takes ``batch_size`` real images, epoch permutations drawn from a generator seeded with
  the seed, with their augmentation from a second seeded generator; so ``real`` and
  ``real+synthetic`` (and ``real+classical`` and ``real+classical+synthetic``) see the same real
  images in the same order with the same flips or warps, and the real images equally often;
- a ``+synthetic`` arm adds ``min(share · batch_size, n_synthetic)`` synthetic images to every batch,
  drawn from a third generator;
- the ``synthetic`` arm puts the synthetic set where the real one was (so a copy of the real set
  trains to exactly the real arm's weights);
- augmentation is a random horizontal flip, or the classical draw (:mod:`medvae.downstream.augment`)
  in the ``+classical`` arms, applied to the synthetic images of that arm too.

The initial weights come from the seed as well.

Metrics (better direction in :data:`medvae.metrics.table.UTILITY_METRICS`):

- classify: ``accuracy`` and ``macro_f1``, scikit-learn's ``accuracy_score`` and ``f1_score(average="macro")``
  (F1 = 2TP / (2TP + FP + FN) per class, averaged over the classes present in the truth or the
  predictions).
- segment: ``dice`` and ``hd95`` (pixels) from ``monai.metrics`` per test patch and foreground
  label, averaged over the (patch, label) pairs whose ground truth holds the label. A label missed
  entirely (empty prediction) has Dice 0 and HD95 the patch diagonal, the largest distance
  possible, rather than an undefined value that would hide the miss.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from medvae.config import AugmentConfig
from medvae.data.conditions import condition_ids
from medvae.data.store import PatchStore
from medvae.downstream.augment import augment
from medvae.errors import InputError


@dataclass
class LabelledSet:
    """Training or test data of one arm in memory.

    Attributes:
        images: ``(N, C, H, W)`` float32 in [0, 1].
        targets: ``(N,)`` int64 class ids (classify) or ``(N, 1, H, W)`` int64 label maps (segment).
    """

    images: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return len(self.images)

    def __add__(self, other: LabelledSet) -> LabelledSet:
        return LabelledSet(torch.cat([self.images, other.images]), torch.cat([self.targets, other.targets]))


def from_store(store: PatchStore, rows: np.ndarray, task: str, classes: list[str]) -> LabelledSet:
    """Rows of a store as a LabelledSet; class names are mapped to their positions in ``classes`` (the
    real store's), so a synthetic store with its own class list still means the same classes."""
    images = torch.from_numpy(store.get(np.asarray(rows, dtype=np.int64)))
    if task == "segment":
        if store.labels is None:
            raise InputError(f"{store.path}: no labels.npy; --task segment needs a label map per patch")
        return LabelledSet(images, torch.from_numpy(np.asarray(store.labels[rows])).long())
    return LabelledSet(images, torch.from_numpy(condition_ids(store, rows, "class", tuple(classes))))


def build_net(task: str, channels: int, size: int, n_out: int) -> torch.nn.Module:
    """A small MONAI network: a strided-conv ``Classifier`` or a 2D ``BasicUNet`` (n_out = classes / labels + 1)."""
    from monai.networks.nets import BasicUNet, Classifier  # MONAI's networks are slow to import

    if task == "classify":
        return Classifier(in_shape=(channels, size, size), classes=n_out, channels=(16, 32, 64), strides=(2, 2, 2))
    return BasicUNet(spatial_dims=2, in_channels=channels, out_channels=n_out, features=(8, 8, 16, 32, 64, 8))


def _loss(task: str):
    if task == "classify":
        return torch.nn.CrossEntropyLoss()
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True)


def flip(x: torch.Tensor, y: torch.Tensor, task: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random horizontal flip per image (label maps alike)."""
    mirrored = torch.rand(len(x), generator=gen) < 0.5
    x = torch.where(mirrored[:, None, None, None], x.flip(-1), x)
    if task == "segment":
        y = torch.where(mirrored[:, None, None, None], y.flip(-1), y)
    return x, y


def _augmented(x, y, task: str, gen: torch.Generator, classical: AugmentConfig | None):
    if classical is None:
        return flip(x, y, task, gen)
    x, maps = augment(x, classical, gen, y if task == "segment" else None)
    return x, (maps if task == "segment" else y)


class BatchStream:
    """Seeded epoch permutations of a labelled set, ``n`` items at a time (each arm's real, synthetic and
    unlabelled batches; ``gen`` also draws the stream's augmentation)."""

    def __init__(self, data: LabelledSet, n: int, seed: int):
        self.data, self.n, self.gen = data, min(n, len(data)), torch.Generator().manual_seed(seed)
        self.order, self.pos = torch.randperm(len(data), generator=self.gen), 0

    @classmethod
    def unlabelled(cls, images: torch.Tensor, n: int, seed: int) -> BatchStream:
        """A stream of unlabelled ``images`` (N, C, H, W) (its targets are zeros, never read)."""
        return cls(LabelledSet(images, torch.zeros(len(images), dtype=torch.long)), n, seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pos + self.n > len(self.order):
            self.order, self.pos = torch.randperm(len(self.data), generator=self.gen), 0
        idx = self.order[self.pos:self.pos + self.n]
        self.pos += self.n
        return self.data.images[idx], self.data.targets[idx]


def train_downstream(task: str, data: LabelledSet, n_out: int, steps: int, batch_size: int, lr: float, seed: int,
                     device: torch.device | str = "cpu", synthetic: LabelledSet | None = None, share: float = 3.0,
                     classical: AugmentConfig | None = None, net: torch.nn.Module | None = None,
                     param_groups: list[dict] | None = None,
                     unlabelled_loss: Callable[[torch.nn.Module], torch.Tensor] | None = None) -> torch.nn.Module:
    """Train the task's network for exactly ``steps`` Adam steps; returns it in eval mode.

    Args:
        data: the images in the role of the real set (``batch_size`` of them per step).
        synthetic: added to every batch, ``min(share · batch_size, len(synthetic))`` images per step (none
            when it is empty: the filter kept no candidate).
        classical: the classical augmentation (else a random horizontal flip), on both.
        net: a network to train instead of the task's :func:`build_net` (the latent arm's encoder + head), with
            the caller's initial weights, on ``device`` already.
        param_groups: Adam's parameter groups (each may set its own ``lr``); None: every parameter at ``lr``.
        unlabelled_loss: a term added to every step's loss, given the network (FixMatch's consistency on
            unlabelled images, :mod:`medvae.downstream.semisupervised`); its draws must come from its own
            generators.

    Initial weights, batch order and augmentation come from ``seed`` alone (the global RNG is left as it
    was); the ``data`` stream and its augmentation do not depend on ``synthetic``.
    """
    device = torch.device(device)
    if net is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = build_net(task, data.images.shape[1], data.images.shape[-1], n_out).to(device)
    opt = torch.optim.Adam(param_groups or net.parameters(), lr=lr)
    loss_fn = _loss(task)
    real = BatchStream(data, batch_size, seed)
    real_aug = torch.Generator().manual_seed(seed + 1)
    has_extra = synthetic is not None and len(synthetic) > 0
    extra = BatchStream(synthetic, max(1, round(share * batch_size)), seed + 2) if has_extra else None
    net.train()
    for _ in range(steps):
        x, y = _augmented(*real.next(), task, real_aug, classical)
        if extra is not None:
            sx, sy = _augmented(*extra.next(), task, extra.gen, classical)
            x, y = torch.cat([x, sx]), torch.cat([y, sy])
        loss = loss_fn(net(x.to(device)), y.to(device))
        if unlabelled_loss is not None:
            loss = loss + unlabelled_loss(net)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval()


@torch.no_grad()
def probabilities(net: torch.nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Softmax outputs on the CPU: ``(N, classes)`` or ``(N, labels, H, W)``."""
    device = next(net.parameters()).device
    return torch.cat([torch.softmax(net(images[i:i + batch_size].to(device)).float(), 1).cpu()
                      for i in range(0, len(images), batch_size)])


def predict(net: torch.nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Argmax predictions on the CPU: ``(N,)`` class ids or ``(N, 1, H, W)`` label maps."""
    pred = probabilities(net, images, batch_size).argmax(1)
    return pred if pred.ndim == 1 else pred[:, None]


def classification_metrics(y_true, y_pred) -> dict[str, float]:
    """``accuracy`` and ``macro_f1`` of integer labels (scikit-learn's; F1 averaged over the classes present in
    either array, 0 for a class never predicted or never true)."""
    from sklearn.metrics import accuracy_score, f1_score  # scikit-learn is slow to import; only when scoring

    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0))}


def segmentation_metrics(pred: torch.Tensor, truth: torch.Tensor, n_out: int) -> dict[str, float]:
    """Mean ``dice`` and ``hd95`` (pixels) of label maps ``(N, 1, H, W)`` over (patch, label) pairs with
    the label in the truth; NaN when no test patch holds a foreground label."""
    from monai.metrics import DiceMetric, HausdorffDistanceMetric
    from monai.networks.utils import one_hot

    p, g = one_hot(pred.long(), n_out), one_hot(truth.long(), n_out)
    dice = DiceMetric(include_background=False, reduction="none", ignore_empty=True)(p, g)
    with warnings.catch_warnings():  # empty truth or prediction: warned per pair, handled below
        warnings.filterwarnings("ignore", "the (ground truth|prediction) of class", UserWarning)
        warnings.filterwarnings("ignore", ".*always_return_as_numpy", FutureWarning)  # MONAI 1.5's own internal call
        hd = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")(p, g)
    present = g[:, 1:].flatten(2).any(-1)
    missed = present & ~p[:, 1:].flatten(2).any(-1)
    hd = torch.where(missed, math.hypot(*truth.shape[-2:]), hd)
    if not present.any():
        return {"dice": math.nan, "hd95": math.nan}
    return {"dice": float(dice[present].mean()), "hd95": float(hd[present].mean())}


def score_downstream(task: str, net: torch.nn.Module, test: LabelledSet, n_out: int) -> dict[str, float]:
    """The task's metrics of ``net`` on the real test data."""
    pred = predict(net, test.images)
    if task == "classify":
        return classification_metrics(test.targets.numpy(), pred.numpy())
    return segmentation_metrics(pred, test.targets, n_out)

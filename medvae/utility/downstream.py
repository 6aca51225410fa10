"""The downstream model of the utility study: one small MONAI network per task, trained for a fixed
number of steps, scored on real test patches.

Every arm (real, real+synthetic, synthetic) goes through the same :func:`train_downstream` with the
same seed, step budget, batch size, learning rate and augmentation (a random horizontal flip), so
the arms differ only in the data. Batches are epoch permutations of the training set drawn from a
generator seeded with the seed, and the initial weights come from the same seed: two arms given the
same data train to the same weights.

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
from dataclasses import dataclass

import numpy as np
import torch

from medvae.data.conditions import condition_ids
from medvae.data.store import PatchStore
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


def train_downstream(task: str, data: LabelledSet, n_out: int, steps: int, batch_size: int, lr: float, seed: int,
                     device: torch.device | str = "cpu") -> torch.nn.Module:
    """Train the task's network on ``data`` for exactly ``steps`` Adam steps; returns it in eval mode.

    Initial weights, batch order and flips come from ``seed`` alone (the global RNG is left as it was).
    """
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_net(task, data.images.shape[1], data.images.shape[-1], n_out).to(device)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    loss_fn = _loss(task)
    batch = min(batch_size, len(data))
    order, pos = torch.randperm(len(data), generator=gen), 0
    net.train()
    for _ in range(steps):
        if pos + batch > len(order):
            order, pos = torch.randperm(len(data), generator=gen), 0
        idx = order[pos:pos + batch]
        pos += batch
        x, y = data.images[idx], data.targets[idx]
        flip = torch.rand(len(idx), generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if task == "segment":
            y = torch.where(flip[:, None, None, None], y.flip(-1), y)
        loss = loss_fn(net(x.to(device)), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval()


@torch.no_grad()
def predict(net: torch.nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Argmax predictions on the CPU: ``(N,)`` class ids or ``(N, 1, H, W)`` label maps."""
    device = next(net.parameters()).device
    out = [net(images[i:i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(images), batch_size)]
    pred = torch.cat(out)
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

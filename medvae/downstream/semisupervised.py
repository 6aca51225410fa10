"""The utility study's semi-supervised arms: ``pseudo`` (self-training) and ``fixmatch`` (Sohn et al. 2020),
and each ``+synthetic``. They learn from the cell's labelled subset and the unlabelled pool (every train
image without its label, the images the study's generator learns from).

Both train the study's downstream network (:func:`medvae.downstream.networks.train_downstream`) with the
seed, steps, real batches and classical augmentation of the ``real+classical`` arm — the strongest
supervised arm — so they differ from it only in what they add:

- ``pseudo``: the teacher — the cell's ``real+classical`` network (whether or not the study runs that
  arm), then each round's student — labels the pool. Classify: per class, the ``k`` most confident
  predictions with probability ≥ ``pseudo_threshold``, ``k`` the same for every class (the smallest
  class's count above the threshold), so the pseudo set is class-balanced (an empty set when a class has
  none). Segment: the teacher's label map of every slice whose mean max-probability over its predicted
  foreground pixels is ≥ the threshold (slices with no predicted foreground are left out: their
  confidence would be the background's, and they would teach "nothing here" on unlabelled patients).
  The student trains on the real batches plus the pseudo set as the extra stream, as a ``+synthetic``
  arm adds its synthetic set (``synthetic_share · batch_size`` per step). ``pseudo_rounds`` rounds.
- ``fixmatch``: each step also takes ``unlabelled_ratio · batch_size`` pool images from its own
  seeded stream (the real stream is untouched): a weak view (the classical flips and a shift of up to
  12.5 %) predicts without gradient; a strong view (``UtilityConfig.strong``: larger affine, elastic,
  noise, contrast, coarse dropout) is trained by cross-entropy against the weak view's argmax where its
  probability is ≥ ``fixmatch_threshold``, summed over those images and divided by all of them (the
  paper's ℓ_u), weighted by ``unlabelled_weight``. Only the confident strong views go through the network
  (the others add 0 to the loss and its gradient). Segment: the same per pixel (:class:`_Consistency`).
- ``+synthetic``: the cell's filtered synthetic set joins the extra stream (pseudo: with the pseudo set).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F

from medvae.config import AugmentConfig, UtilityConfig
from medvae.downstream.augment import augment, for_modality
from medvae.downstream.networks import BatchStream, LabelledSet, probabilities, train_downstream

ARMS = ("pseudo", "fixmatch", "pseudo+synthetic", "fixmatch+synthetic")
_CHUNK = 1024  # pool images labelled at a time (segmentation probabilities are per pixel)
IGNORE = -100  # F.cross_entropy's ignore_index: a FixMatch target below the confidence threshold


def balanced_confident(probs: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-balanced confident pseudo-labels.

    Args:
        probs: ``(N, K)`` class probabilities.
        threshold: the least probability of a kept prediction.

    Returns:
        ``(idx, labels)``: per class (ascending), the ``k`` images predicted as it with the highest
        probability (ties: the earlier image), ``k`` the smallest per-class count at or above ``threshold``.
    """
    conf, label = probs.max(1)
    above = [torch.nonzero((label == c) & (conf >= threshold))[:, 0] for c in range(probs.shape[1])]
    k = min(len(i) for i in above)
    idx = torch.cat([i[torch.sort(conf[i], descending=True, stable=True).indices[:k]] for i in above])
    return idx, label[idx]


def confident_maps(probs: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Confident pseudo label maps: ``probs`` ``(N, L, H, W)`` → ``(idx, maps (n, 1, H, W))`` of the slices
    with predicted foreground whose mean max-probability over those pixels is ≥ ``threshold``."""
    conf, maps = probs.max(1)
    fg = maps > 0
    n_fg = fg.sum((1, 2))
    mean = (conf * fg).sum((1, 2)) / n_fg.clamp(min=1)
    idx = torch.nonzero((n_fg > 0) & (mean >= threshold))[:, 0]
    return idx, maps[idx][:, None]


def pseudo_set(teacher: torch.nn.Module, pool: torch.Tensor, task: str, threshold: float) -> LabelledSet:
    """The teacher's confident labels of the pool images ``(N, C, H, W)`` (rules in the module docstring)."""
    if task == "classify":
        idx, labels = balanced_confident(probabilities(teacher, pool), threshold)
        return LabelledSet(pool[idx], labels)
    parts = []
    for i in range(0, len(pool), _CHUNK):
        idx, maps = confident_maps(probabilities(teacher, pool[i:i + _CHUNK]), threshold)
        parts.append(LabelledSet(pool[i:i + _CHUNK][idx], maps))
    return functools.reduce(operator.add, parts)


def fixmatch_loss(weak_logits: torch.Tensor,
                  strong_logits: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                  threshold: float) -> torch.Tensor:
    """FixMatch's ℓ_u = (1/μB) Σ_b 1[max softmax(weak_b) ≥ τ] · CE(strong_b, argmax weak_b); for label maps
    the same per pixel, divided by all pixels (the masked cross-entropy of FixMatch for segmentation).

    Args:
        weak_logits: ``(μB, K)`` or ``(μB, K, H, W)`` logits of the weak views (no gradient needed).
        strong_logits: given the ``(μB,)`` bool mask of the images with a confident prediction (classify: the
            image; segment: at least one pixel) and their targets (``IGNORE`` where not confident), the strong
            views' logits of those images only and the targets as the strong view sees them (segment: warped
            alike), so the other images never go through the network.
        threshold: τ.
    """
    conf, target = torch.softmax(weak_logits.detach().float(), 1).max(1)
    target = torch.where(conf >= threshold, target, IGNORE)
    keep = (target != IGNORE).flatten(1).any(1) if target.dim() > 1 else target != IGNORE
    if not keep.any():
        return weak_logits.new_zeros(())
    logits, kept = strong_logits(keep, target[keep])
    return F.cross_entropy(logits.float(), kept, ignore_index=IGNORE, reduction="sum") / target.numel()


class _Consistency:
    """FixMatch's unlabelled term of each step, given the network (``train_downstream``'s ``unlabelled_loss``).
    Classify: weak and strong views of each pool image. Segment: the strong view is drawn on top of the weak
    one, its geometry applied to the weak view's label map (nearest), so a pixel's target stays its own;
    pixels the warp brings in from outside the image are ignored."""

    def __init__(self, task: str, pool: torch.Tensor, n: int, seed: int, weak: AugmentConfig,
                 strong: AugmentConfig, threshold: float, weight: float):
        # the pool's own stream and augmentation draws: the real batches are those of the other arms
        self.stream = BatchStream.unlabelled(pool, n, seed)
        self.task, self.weak, self.strong, self.threshold, self.weight = task, weak, strong, threshold, weight

    def __call__(self, net: torch.nn.Module) -> torch.Tensor:
        u, _ = self.stream.next()
        gen = self.stream.gen
        weak, _ = augment(u, self.weak, gen)
        device = next(net.parameters()).device
        if self.task == "classify":
            strong, _ = augment(u, self.strong, gen)
            with torch.no_grad():
                weak_logits = net(weak.to(device))
            return self.weight * fixmatch_loss(
                weak_logits, lambda keep, t: (net(strong[keep.cpu()].to(device)), t), self.threshold)

        def strong_maps(keep: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            shifted = torch.where(target == IGNORE, 0, target + 1)[:, None].cpu()  # 0: ignored, also the padding
            x, maps = augment(weak[keep.cpu()], self.strong, gen, labels=shifted)
            maps = maps[:, 0].to(device)
            return net(x.to(device)), torch.where(maps == 0, IGNORE, maps - 1)

        with torch.no_grad():
            weak_logits = net(weak.to(device))
        return self.weight * fixmatch_loss(weak_logits, strong_maps, self.threshold)


def weak_view(classical: AugmentConfig) -> AugmentConfig:
    """FixMatch's weak augmentation: the classical flips and a shift of up to 12.5 % of the side."""
    return AugmentConfig(flip_lr=classical.flip_lr, flip_ud=classical.flip_ud, rotate_deg=0.0, scale=0.0,
                         translate=0.125, elastic_prob=0.0, noise_prob=0.0)


def train_arm(arm: str, real: LabelledSet, pool: torch.Tensor, teacher: Callable[[], torch.nn.Module],
              synthetic: LabelledSet | None, cfg: UtilityConfig, seed: int, n_out: int, device: str,
              classical: AugmentConfig, modality: str) -> tuple[torch.nn.Module, dict]:
    """Train one of :data:`ARMS` in a cell.

    Args:
        real: the labelled subset. pool: ``(N, C, H, W)`` every train image, unlabelled.
        teacher: the cell's ``real+classical`` network (trained on first call; pseudo's first teacher).
        synthetic: the cell's filtered synthetic set (``+synthetic`` arms), else None.
        classical: the classical augmentation, modality defaults filled in. modality: the store's.

    Returns:
        The network (eval mode) and what the arm's result records besides its metrics.
    """
    def fit(extra: LabelledSet | None, unlabelled_loss=None) -> torch.nn.Module:
        return train_downstream(cfg.task, real, n_out, cfg.downstream_steps, cfg.batch_size, cfg.lr, seed, device,
                                synthetic=extra, share=cfg.synthetic_share, classical=classical,
                                unlabelled_loss=unlabelled_loss)

    if arm.startswith("pseudo"):
        net, sizes = teacher(), []
        for _ in range(cfg.pseudo_rounds):
            labelled = pseudo_set(net, pool, cfg.task, cfg.pseudo_threshold)
            sizes.append(len(labelled))
            extra = labelled if synthetic is None else labelled + synthetic
            net = fit(extra if len(extra) else None)
        return net, {"n_pseudo": sizes}
    strong = for_modality(cfg.strong, modality, strong=True)
    term = _Consistency(cfg.task, pool, cfg.unlabelled_ratio * cfg.batch_size, seed + 3, weak_view(classical), strong,
                        cfg.fixmatch_threshold, cfg.unlabelled_weight)
    return fit(synthetic, term), {"n_unlabelled": len(pool)}

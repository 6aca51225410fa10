"""Classical augmentation of the utility study's ``+classical`` arms, drawn per image, applied per batch.

The transforms are MONAI's ``RandFlip``, ``RandAffine`` (rotation, isotropic scale, translation),
``Rand2DElastic`` and ``RandGaussianNoise``, with their parameter conventions; FixMatch's strong view
adds ``RandAdjustContrast`` and ``RandCoarseDropout`` (off in the classical draw). MONAI applies them to
one image at a time, which costs 1–2 ms per image on a CPU core (measured: 67 ms for the affine and
134 ms for the elastic warp of a batch of 64 images of 32²) — several times the downstream network's
own step. Here the parameters are drawn per image and the whole batch moves in one ``affine_grid`` +
``grid_sample`` call; the affine warp equals MONAI's ``Affine`` with the same parameters (tests).

Label maps (segmentation) get the same geometric warp with nearest-neighbour sampling, and no noise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from medvae.config import AugmentConfig

# What a user of each modality would reach for first (Frid-Adar et al. 2018 use flips, rotations,
# scaling and translation for liver CT; microscopy has no up or left).
MODALITY_DEFAULTS: dict[str, dict] = {
    "image": {"flip_lr": True, "flip_ud": False, "rotate_deg": 10.0, "scale": 0.1, "translate": 0.06},
    "ct": {"flip_lr": False, "flip_ud": False, "rotate_deg": 10.0, "scale": 0.1, "translate": 0.06},
    "mr": {"flip_lr": False, "flip_ud": False, "rotate_deg": 10.0, "scale": 0.1, "translate": 0.06},
    "microscopy": {"flip_lr": True, "flip_ud": True, "rotate_deg": 180.0, "scale": 0.1, "translate": 0.06},
}


# FixMatch's strong view: the same flips, a larger shift (up to 12.5 %, as Sohn et al. 2020) and rotation. Chosen
# on held-out train images of Fashion-MNIST (10 labels per class, 600 steps): rotations of 15 degrees and
# scale 0.1 beat RandAugment's 30 degrees and 0.2 by 1 point.
STRONG_MODALITY_DEFAULTS: dict[str, dict] = {
    m: {**d, "rotate_deg": max(d["rotate_deg"], 15.0), "scale": 0.1, "translate": 0.125}
    for m, d in MODALITY_DEFAULTS.items()}


def for_modality(cfg: AugmentConfig, modality: str, strong: bool = False) -> AugmentConfig:
    """``cfg`` with the modality's geometric defaults (``strong``: FixMatch's strong view's) where the user
    left a field unset (None)."""
    table = STRONG_MODALITY_DEFAULTS if strong else MODALITY_DEFAULTS
    defaults = table.get(modality, table["image"])
    return cfg.model_copy(update={k: v for k, v in defaults.items() if getattr(cfg, k) is None})


def affine_matrices(rotate: torch.Tensor, scale: torch.Tensor, translate: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, 2, 3)`` matrices for ``affine_grid`` (normalized coordinates, align_corners=False) of MONAI's
    ``Affine(rotate_params=rotate, scale_params=(scale, scale), translate_params=translate)``: as in
    MONAI, the matrix maps output coordinates (about the centre) to where the input is sampled,
    ``R(rotate) · (scale · p + translate)``.

    Args:
        rotate: (B,) radians. scale: (B,) factors (1 = unchanged). translate: (B, 2) pixels (rows, cols).
        size: the square image's side in pixels.
    """
    cos, sin = torch.cos(rotate), torch.sin(rotate)
    r = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    a, t = r * scale[:, None, None], (r @ translate[..., None])[..., 0] * (2.0 / size)
    # MONAI's matrix acts on (row, col); affine_grid's on (x = col, y = row): swap the axes.
    return torch.cat([a.flip(-1).flip(-2), t.flip(-1)[..., None]], -1)


def _elastic(b: int, size: int, spacing: int, magnitude: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``(B, H, W, 2)`` smooth displacements in normalized units: uniform control-point offsets of up to
    ``magnitude`` pixels every ``spacing`` pixels, bicubically interpolated (as Rand2DElastic's B-spline
    control grid)."""
    n = max(2, math.ceil(size / spacing) + 1)
    ctrl = (torch.rand(b, 2, n, n, generator=gen) * 2 - 1) * magnitude[:, None, None, None] * (2.0 / size)
    return F.interpolate(ctrl, size=(size, size), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)


def augment(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator,
            labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One random draw per image of flips, affine, elastic warp, Gaussian noise, contrast (gamma) and
    coarse dropout (the last two only where their probability is above 0: the draws of a config without
    them are those of before they existed).

    Args:
        x: (B, C, H, W) float images in [0, 1] (H = W), on the CPU.
        cfg: AugmentConfig with every field set (:func:`for_modality`).
        gen: CPU generator: the draws depend on it alone.
        labels: (B, 1, H, W) integer label maps warped alike (nearest), or None.

    Returns:
        The augmented images, clipped to [0, 1], and the warped label maps (or None).
    """
    b, size = x.shape[0], x.shape[-1]
    u = torch.rand(b, 7, generator=gen)
    if cfg.flip_lr:
        flip = u[:, 0] < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        labels = None if labels is None else torch.where(flip[:, None, None, None], labels.flip(-1), labels)
    if cfg.flip_ud:
        flip = u[:, 1] < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-2), x)
        labels = None if labels is None else torch.where(flip[:, None, None, None], labels.flip(-2), labels)
    rotate = (u[:, 2] * 2 - 1) * math.radians(cfg.rotate_deg)
    scale = 1.0 + (u[:, 3] * 2 - 1) * cfg.scale
    translate = (torch.rand(b, 2, generator=gen) * 2 - 1) * cfg.translate * size
    grid = F.affine_grid(affine_matrices(rotate, scale, translate, size), list(x.shape), align_corners=False)
    if cfg.elastic_prob > 0:
        on = (u[:, 4] < cfg.elastic_prob).float()
        grid = grid + _elastic(b, size, cfg.elastic_spacing, on * cfg.elastic_magnitude, gen)
    x = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if labels is not None:
        labels = F.grid_sample(labels.float(), grid, mode="nearest", padding_mode="zeros",
                               align_corners=False).to(labels.dtype)
    if cfg.noise_prob > 0:
        noisy = (u[:, 5] < cfg.noise_prob)[:, None, None, None]
        x = torch.where(noisy, x + cfg.noise_std * torch.randn(x.shape, generator=gen), x)
    x = x.clamp_(0, 1)
    if cfg.contrast_prob > 0:
        x = _contrast(x, u[:, 6] < cfg.contrast_prob, cfg.contrast_gamma, gen)
    if cfg.dropout_prob > 0:
        x = _coarse_dropout(x, cfg, gen)
    return x, labels


def _contrast(x: torch.Tensor, on: torch.Tensor, gamma: tuple[float, float], gen: torch.Generator) -> torch.Tensor:
    """MONAI's ``AdjustContrast``: ``((x - min) / (max - min + 1e-7)) ** g · (max - min) + min`` per image,
    ``g`` uniform in ``gamma``, where ``on`` (B,) holds."""
    g = gamma[0] + torch.rand(len(x), generator=gen) * (gamma[1] - gamma[0])
    lo, hi = x.amin((1, 2, 3), keepdim=True), x.amax((1, 2, 3), keepdim=True)
    span = hi - lo
    out = ((x - lo) / (span + 1e-7)) ** g[:, None, None, None] * span + lo
    return torch.where(on[:, None, None, None], out, x)


def _coarse_dropout(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """MONAI's ``RandCoarseDropout`` (fill 0): ``dropout_holes`` squares of side ``dropout_size`` × the image
    side at uniform places (inside the image), in each image with probability ``dropout_prob``."""
    b, size = x.shape[0], x.shape[-1]
    side = max(1, round(cfg.dropout_size * size))
    on = torch.rand(b, generator=gen) < cfg.dropout_prob
    corner = (torch.rand(b, cfg.dropout_holes, 2, generator=gen) * (size - side + 1)).long()  # (B, holes, 2)
    pos = torch.arange(size)
    rows = (pos >= corner[..., :1]) & (pos < corner[..., :1] + side)  # (B, holes, H)
    cols = (pos >= corner[..., 1:]) & (pos < corner[..., 1:] + side)  # (B, holes, W)
    hole = (rows[..., :, None] & cols[..., None, :]).any(1) & on[:, None, None]  # (B, H, W)
    return x.masked_fill(hole[:, None], 0.0)

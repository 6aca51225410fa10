"""The batched classical augmentation against MONAI's per-image transforms."""

import math

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Affine

from medvae.config import AugmentConfig
from medvae.downstream.augment import affine_matrices, augment, for_modality


def test_batched_affine_equals_monai_affine_per_image():
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    params = [(0.3, 1.1, (2.0, -3.0)), (-0.5, 0.9, (0.0, 4.0)), (1.2, 1.05, (-1.5, 2.5))]
    m = affine_matrices(torch.tensor([p[0] for p in params]), torch.tensor([p[1] for p in params]),
                        torch.tensor([p[2] for p in params]), 32)
    ours = F.grid_sample(x, F.affine_grid(m, [3, 1, 32, 32], align_corners=False), padding_mode="zeros",
                         align_corners=False)
    for i, (rotate, scale, translate) in enumerate(params):
        ref = Affine(rotate_params=rotate, scale_params=(scale, scale), translate_params=translate,
                     padding_mode="zeros", image_only=True)(x[i])
        torch.testing.assert_close(ours[i], torch.as_tensor(ref), atol=1e-5, rtol=0)


def test_labels_follow_the_images_and_keep_their_values():
    gen = torch.Generator().manual_seed(1)
    labels = torch.zeros(8, 1, 32, 32, dtype=torch.int64)
    labels[:, :, 8:24, 10:20] = 2
    labels[:, :, 12:16, 12:16] = 1
    x = labels.float() / 2  # the image is the label map itself
    cfg = for_modality(AugmentConfig(noise_prob=0.0), "ct")
    y, warped = augment(x, cfg, gen, labels)
    assert set(warped.unique().tolist()) <= {0, 1, 2}
    # bilinear vs nearest sampling of the same warp: the image and its labels agree away from edges
    assert (warped.float() / 2 - y).abs().lt(0.26).float().mean() > 0.97


def test_identity_when_every_transform_is_off():
    cfg = AugmentConfig(flip_lr=False, flip_ud=False, rotate_deg=0, scale=0, translate=0, elastic_prob=0,
                        noise_prob=0)
    x = torch.rand(4, 1, 16, 16)
    y, _ = augment(x, cfg, torch.Generator().manual_seed(0))
    torch.testing.assert_close(y, x, atol=1e-6, rtol=0)


def test_draws_depend_on_the_generator_only():
    cfg = for_modality(AugmentConfig(), "image")
    x = torch.rand(6, 1, 32, 32)
    a, _ = augment(x, cfg, torch.Generator().manual_seed(5))
    b, _ = augment(x, cfg, torch.Generator().manual_seed(5))
    c, _ = augment(x, cfg, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1


def test_modality_defaults_fill_only_unset_fields():
    cfg = for_modality(AugmentConfig(rotate_deg=5.0), "microscopy")
    assert cfg.rotate_deg == 5.0 and cfg.flip_ud is True and cfg.flip_lr is True
    assert for_modality(AugmentConfig(), "ct").flip_lr is False
    assert math.isclose(for_modality(AugmentConfig(), "image").translate, 0.06)
    assert np.isfinite(cfg.scale)

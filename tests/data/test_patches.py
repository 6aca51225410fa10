import numpy as np
import pytest
import torch
from skimage.transform import resize

from medvae.config import PrepareConfig
from medvae.data.patches import extract_patches, resize_slices


def test_resize_matches_skimage_on_smooth_image():
    yy, xx = np.mgrid[0:512, 0:512] / 512.0
    img = (0.5 + 0.25 * np.sin(6 * xx) * np.cos(4 * yy)).astype(np.float32)
    ours = resize_slices(img[None, None], 128)[0, 0]
    ref = resize(img, (128, 128), order=1, anti_aliasing=True)
    assert np.abs(ours - ref)[4:-4, 4:-4].max() < 2e-3


def test_resize_linear_ramp_closed_form():
    # bilinear + antialias is a symmetric filter: a linear ramp maps to its values at the new pixel centres
    x = np.arange(512, dtype=np.float32)
    ramp = np.tile(x, (3, 1, 512, 1))  # (Z=3, C=1, 512, 512), value = column index
    out = resize_slices(ramp, 128)
    centres = (np.arange(128) + 0.5) * 4 - 0.5
    np.testing.assert_allclose(out[:, 0, 10, 4:-4], np.broadcast_to(centres[4:-4], (3, 120)), atol=1e-3)


def test_resize_mode_one_patch_per_slice_with_foreground_and_spacing():
    Z, Y, X = 5, 64, 64
    img = torch.rand(1, Z, Y, X)
    fg = torch.zeros(Z, Y, X, dtype=torch.bool)
    fg[1, :32] = True  # 0.5
    fg[3, :8] = True  # 0.125
    cfg = PrepareConfig(patch_size=128, mode="resize", foreground_threshold=0.2)
    p = extract_patches(img, fg, cfg, spacing_yx=(0.8, 0.7))
    assert len(p) == 1 and p.slice_index.tolist() == [1] and p.foreground_fraction.tolist() == [0.5]
    assert p.images.shape == (1, 1, 128, 128) and p.spacing == pytest.approx((0.8 * 64 / 128, 0.7 * 64 / 128))


def test_tile_positions_and_contents_equal_source():
    rng = np.random.default_rng(0)
    vol = rng.random((1, 3, 300, 280)).astype(np.float32)
    fg = torch.from_numpy(vol[0] > 0.0)  # all foreground
    cfg = PrepareConfig(patch_size=128, mode="tile", stride=64, foreground_threshold=0.0)
    p = extract_patches(torch.from_numpy(vol), fg, cfg, spacing_yx=(1.0, 2.0))
    ny, nx = (300 - 128) // 64 + 1, (280 - 128) // 64 + 1
    assert len(p) == 3 * ny * nx and p.spacing == (1.0, 2.0)
    for i in range(len(p)):
        z, y, x = p.slice_index[i], p.y[i], p.x[i]
        np.testing.assert_array_equal(p.images[i], vol[:, z, y : y + 128, x : x + 128])
    assert sorted(set(p.y.tolist())) == list(range(0, ny * 64, 64))


def test_tile_foreground_fraction_hand_count_and_filter():
    Z, Y, X = 2, 256, 256
    fg = torch.zeros(Z, Y, X, dtype=torch.bool)
    fg[0, 0:100, 0:50] = True  # tile (0, 0): 5000 / 16384
    fg[1, 200:256, 130:256] = True  # tile (128, 128): 56 * 126 / 16384
    cfg = PrepareConfig(patch_size=128, mode="tile", foreground_threshold=0.05)
    p = extract_patches(torch.rand(1, Z, Y, X), fg, cfg, spacing_yx=(1.0, 1.0))
    got = {(int(z), int(y), int(x)): float(f) for z, y, x, f in zip(p.slice_index, p.y, p.x, p.foreground_fraction)}
    assert got.keys() == {(0, 0, 0), (1, 128, 128)}
    assert got[(0, 0, 0)] == pytest.approx(5000 / 16384) and got[(1, 128, 128)] == pytest.approx(56 * 126 / 16384)


@pytest.mark.parametrize("mode", ["resize", "tile"])
def test_labels_aligned_with_images(mode):
    Z, Y, X = 4, 256, 256
    img = torch.zeros(1, Z, Y, X)
    lab = torch.zeros(1, Z, Y, X, dtype=torch.uint8)
    img[0, 2, 150:158, 170:178] = 1.0  # a bright 8x8 block with label 1 on slice 2
    lab[0, 2, 150:158, 170:178] = 1
    fg = torch.ones(Z, Y, X, dtype=torch.bool)
    cfg = PrepareConfig(patch_size=128, mode=mode, foreground_threshold=0.0)
    p = extract_patches(img, fg, cfg, spacing_yx=(1.0, 1.0), label=lab)
    assert p.labels.shape == (len(p), 1, 128, 128) and p.labels.dtype == np.uint8
    hot = np.flatnonzero(p.labels.reshape(len(p), -1).max(1))
    assert len(hot) == 1 and p.slice_index[hot[0]] == 2
    i = hot[0]
    bright = p.images[i, 0] > 0.5
    assert bright.any() and (p.labels[i, 0][bright] == 1).all()
    np.testing.assert_array_equal(np.argwhere(p.labels[i, 0]).mean(0).round(),
                                  np.argwhere(bright).mean(0).round())


def test_slice_step():
    cfg = PrepareConfig(slice_step=3, foreground_threshold=0.0)
    p = extract_patches(torch.rand(1, 10, 32, 32), torch.ones(10, 32, 32, dtype=torch.bool), cfg, (1.0, 1.0))
    assert p.slice_index.tolist() == [0, 3, 6, 9]


@pytest.mark.parametrize("shape,size", [((3, 1, 512, 512), 128), ((2, 1, 500, 333), 64), ((2, 1, 97, 40), 32),
                                        ((1, 1, 30, 20), 64)])
def test_label_resize_is_torchs_nearest_exact(shape, size):
    """Labels are resized by gathering rows and columns in their own type: the pixels of
    F.interpolate(mode="nearest-exact") on the float values, for shrinking and growing, any aspect."""
    import torch.nn.functional as F

    lab = torch.randint(0, 7, shape, dtype=torch.uint8)
    ref = F.interpolate(lab.float(), size=(size, size), mode="nearest-exact")
    out = resize_slices(lab, size, label=True)
    assert out.dtype == np.uint8 and np.array_equal(out.astype(np.float32), ref.numpy())
    flt = torch.rand(shape) * 5
    ref = F.interpolate(flt, size=(size, size), mode="nearest-exact")
    assert np.array_equal(resize_slices(flt, size, label=True), ref.numpy())


@pytest.mark.parametrize("shape,size", [((3, 1, 512, 512), 128), ((2, 2, 500, 333), 64), ((2, 1, 97, 40), 32),
                                        ((2, 1, 64, 80), 128), ((5, 1, 28, 28), 64), ((4, 3, 30, 20), 32)])
def test_resize_is_torchs_antialiased_bilinear(shape, size):
    """Pillow (planes of 64² and more) and torch's batched call (smaller planes) are one filter: the values of
    F.interpolate(mode="bilinear", antialias=True) to float32 rounding, shrinking and growing, any aspect."""
    import torch.nn.functional as F

    x = torch.rand(shape)
    ref = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).numpy()
    out = resize_slices(x.numpy(), size)
    assert out.dtype == np.float32 and out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=0, atol=5e-7)

"""Volume -> 2D slices along z -> 32/64/128/256 patches, vectorized over all slices of a volume (numpy).

Two modes (``PrepareConfig.mode``):

- ``resize`` (and ``auto``): each whole ``(Y, X)`` slice is resized to ``(P, P)`` (bilinear with antialiasing,
  i.e. a triangle filter widened by the downscale factor, as PIL does; label maps with
  nearest-exact). One patch per slice at ``y = x = 0``; a patch pixel covers
  ``(sy * Y / P, sx * X / P)``. Non-square slices are stretched (the spacing records it).
- ``tile``: native-resolution ``P x P`` tiles at a stride (default ``P``) from a strided view;
  a remainder narrower than a tile at the bottom/right edge is dropped, and a slice smaller than
  a tile is zero-padded (background) to one tile.

The foreground fraction of a patch is the mean of the foreground mask over the pixels the patch
covers (the whole slice in resize mode); patches below ``config.foreground_threshold`` are dropped.

Inputs are numpy arrays or CPU tensors (read as numpy without a copy). Nothing here imports torch
at module level: a scan's slices are resized by Pillow (its C resampler, the filter torch's
``antialias=True`` copies), so ``medvae prepare`` of a CT series never loads torch (about a second).
Planes smaller than :data:`PIL_MIN_PIXELS` (2D image sets: thousands of 28² images) are resized by
torch in one batched call instead, where Pillow's per-call cost would dominate; both give the same
filter (tested against each other and against scikit-image).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medvae.config import PrepareConfig
from medvae.errors import InputError

PIL_MIN_PIXELS = 64 * 64  # planes with at least this many pixels are resized by Pillow, one by one


@dataclass
class Patches:
    """Patches of one volume, with where each came from.

    Attributes:
        images: float32 ``(N, C, P, P)`` in [0, 1].
        labels: uint8 ``(N, 1, P, P)`` or None.
        slice_index, y, x: int64 ``(N,)``: z index of the slice and top-left pixel of the patch in
            the (unresized) slice.
        foreground_fraction: float32 ``(N,)``.
        spacing: ``(sy, sx)`` in-plane size of a patch pixel.
    """

    images: np.ndarray
    labels: np.ndarray | None
    slice_index: np.ndarray
    y: np.ndarray
    x: np.ndarray
    foreground_fraction: np.ndarray
    spacing: tuple[float, float]

    def __len__(self) -> int:
        return int(self.images.shape[0])


def nearest_exact_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output pixel of ``F.interpolate(mode="nearest-exact")`` along one axis:
    ``min(floor((i + 0.5) * n_in / n_out), n_in - 1)`` in float32, as torch computes it."""
    scale = np.float32(n_in) / np.float32(n_out)
    idx = np.floor((np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale).astype(np.int64)
    return np.minimum(idx, n_in - 1)


def _gather(x: np.ndarray, axis: int, idx: np.ndarray) -> np.ndarray:
    """``x.take(idx, axis)``; an evenly spaced ``idx`` (every 4th pixel from 512 to 128) as a strided
    view, which reads only the rows it keeps."""
    step = int(idx[1] - idx[0]) if len(idx) > 1 else 1
    if step > 0 and bool((idx == idx[0] + step * np.arange(len(idx))).all()):
        index = [slice(None)] * x.ndim
        index[axis] = slice(int(idx[0]), int(idx[-1]) + 1, step)
        return x[tuple(index)]
    return x.take(idx, axis=axis)


def _resize_bilinear(x: np.ndarray, size: int) -> np.ndarray:
    """``(N, C, Y, X)`` -> float32 ``(N, C, size, size)``, bilinear with antialiasing (PIL's filter)."""
    n, c, h, w = x.shape
    if h * w < PIL_MIN_PIXELS:  # many tiny planes: one batched torch call (imported only here)
        import torch
        import torch.nn.functional as F

        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        return F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False).numpy()
    from PIL import Image

    out = np.empty((n, c, size, size), dtype=np.float32)
    for i in range(n):
        for j in range(c):
            plane = Image.fromarray(np.ascontiguousarray(x[i, j], dtype=np.float32), mode="F")
            out[i, j] = np.asarray(plane.resize((size, size), Image.Resampling.BILINEAR))
    return out


def resize_slices(x, size: int, label: bool = False) -> np.ndarray:
    """Resize every slice of ``x: (Z, C, Y, X)`` to ``(Z, C, size, size)``.

    Images: bilinear, antialiased when shrinking, float32; labels: nearest-exact (class values kept),
    as a gather of the source rows and columns in ``x``'s own type (``F.interpolate``'s pixels, tested).
    """
    x = np.asarray(x)
    if tuple(x.shape[-2:]) == (size, size):
        return x
    if label:
        rows, cols = nearest_exact_index(x.shape[-2], size), nearest_exact_index(x.shape[-1], size)
        return _gather(_gather(x, -2, rows), -1, cols)
    return _resize_bilinear(x, size)


def tile_slices(x: np.ndarray, size: int, stride: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All ``size x size`` tiles at ``stride`` of ``x: (Z, C, Y, X)`` as a view.

    Returns:
        tiles ``(Z, nY, nX, C, size, size)`` (a strided view, no copy), tile rows ``ys (nY,)`` and
        columns ``xs (nX,)`` of the top-left pixels.
    """
    pad_y, pad_x = max(0, size - x.shape[-2]), max(0, size - x.shape[-1])
    if pad_y or pad_x:
        x = np.pad(x, ((0, 0), (0, 0), (0, pad_y), (0, pad_x)))
    t = np.lib.stride_tricks.sliding_window_view(x, (size, size), axis=(2, 3))[:, :, ::stride, ::stride]
    ys = np.arange(t.shape[2], dtype=np.int64) * stride
    xs = np.arange(t.shape[3], dtype=np.int64) * stride
    return t.transpose(0, 2, 3, 1, 4, 5), ys, xs


def labels_to_uint8(lab) -> np.ndarray:
    """Class values (any dtype) -> uint8, rounded; NaN and negatives -> 0, above 255 -> 255."""
    lab = np.asarray(lab)
    if lab.dtype == np.uint8:
        return lab
    t = np.nan_to_num(lab.astype(np.float32), nan=0.0)
    return np.round(np.clip(t, 0, 255, out=t), out=t).astype(np.uint8)


def extract_patches(image, foreground, config: PrepareConfig, spacing_yx: tuple[float, float],
                    label=None) -> Patches:
    """Cut a normalized volume into the store's patches.

    Args:
        image: ``(C, Z, Y, X)`` float in [0, 1] (numpy or a CPU tensor).
        foreground: bool ``(Z, Y, X)`` (from the raw values, see normalize.foreground_mask).
        config: patch_size, mode, stride, slice_step, foreground_threshold.
        spacing_yx: in-plane ``(sy, sx)`` of the volume.
        label: ``(1, Z, Y, X)`` or ``(Z, Y, X)`` class values on the image's grid, or None.
    """
    image, foreground = np.asarray(image), np.asarray(foreground)
    size, thr = int(config.patch_size), float(config.foreground_threshold)
    step = max(1, int(config.slice_step))
    zs = np.arange(0, image.shape[1], step)
    img = image[:, ::step].transpose(1, 0, 2, 3)  # (Z', C, Y, X) view: slices are the batch
    fg = foreground[::step]  # (Z', Y, X) bool view
    lab = None
    if label is not None:
        label = np.asarray(label)
        lab = (label if label.ndim == 4 else label[None])[:, ::step].transpose(1, 0, 2, 3)
    Y, X = img.shape[-2:]
    if config.mode in ("resize", "auto"):  # auto: volumes' slices are resized
        # per slice: count_nonzero over a whole array is 8x faster than its reduction along axes
        counts = np.fromiter((np.count_nonzero(f) for f in fg), dtype=np.int64, count=len(fg))
        frac = counts.astype(np.float32) / np.float32(Y * X)  # (Z',)
        keep = np.flatnonzero(frac >= np.float32(thr))
        every = len(keep) == len(zs)  # no copy of the volume when all slices stay
        images = resize_slices(img if every else img[keep], size)
        labels = resize_slices(lab if every else lab[keep], size, label=True) if lab is not None else None
        n = len(keep)
        ys = xs = np.zeros(n, dtype=np.int64)
        spacing = (spacing_yx[0] * Y / size, spacing_yx[1] * X / size)
        slice_index, frac = zs[keep], frac[keep]
    elif config.mode == "tile":
        stride = int(config.stride or size)
        tiles, ty, tx = tile_slices(img, size, stride)  # (Z', nY, nX, C, P, P)
        fg_tiles, _, _ = tile_slices(fg[:, None], size, stride)  # (Z', nY, nX, 1, P, P) view
        frac_all = np.count_nonzero(fg_tiles, axis=(-3, -2, -1)).astype(np.float32) / np.float32(size * size)
        kz, ky, kx = np.nonzero(frac_all >= np.float32(thr))  # slice, tile row, tile column of each kept tile
        images = tiles[kz, ky, kx]  # gathers only the kept tiles
        labels = tile_slices(lab, size, stride)[0][kz, ky, kx] if lab is not None else None
        slice_index, ys, xs = zs[kz], ty[ky], tx[kx]
        frac = frac_all[kz, ky, kx]
        spacing = (float(spacing_yx[0]), float(spacing_yx[1]))
    else:
        raise InputError(f"patch mode {config.mode!r} is for 2D image sets; volumes take auto | resize | tile")
    return Patches(
        images=np.ascontiguousarray(images, dtype=np.float32),
        labels=np.ascontiguousarray(labels_to_uint8(labels)) if labels is not None else None,
        slice_index=np.asarray(slice_index, dtype=np.int64),
        y=np.asarray(ys, dtype=np.int64),
        x=np.asarray(xs, dtype=np.int64),
        foreground_fraction=np.asarray(frac, dtype=np.float32),
        spacing=(float(spacing[0]), float(spacing[1])),
    )

"""2D image sets -> normalized patches, one manifest row at a time, vectorized over its images.

A row is one image file, one IDX file or one npz split (:mod:`medvae.data.image_sets`). Its
images are read whole by :mod:`medvae.io.images2d` (70,000 IDX images are one array), then:

- **normalized** to [0, 1]: modality ``image`` by its dtype's range (uint8 / 255, uint16 / 65535,
  floats already in [0, 1] kept, other floats by the row's min and max), so an image set keeps
  its grey levels exactly; ``microscopy`` / ``mr`` per image between the configured percentiles;
  ``ct`` by the HU window;
- **fitted** to the patch size: ``pad`` centres the image on a zero (black) canvas and refuses an
  image larger than the patch; ``resize`` resizes the whole image (bilinear, antialiased, as
  volumes' slices); ``tile`` cuts native tiles; ``auto`` pads an image that fits and is more than
  half the patch (28² -> 32²) and resizes any other (28² -> 128², 300² -> 128²);
- **kept**: every image of a set becomes a patch (no foreground filter: the dataset chose its
  images); the foreground fraction recorded is the fraction of non-zero pixels.

Each image is its own patient in the store: an image row's patient id, or ``<row id>-<index>``
for IDX / npz rows. Class names: labels.csv or folder names for image rows, the label ids as
text for IDX / npz (Fashion-MNIST's ten names when the folder is called ``*fashion*``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medvae.config import PrepareConfig
from medvae.data.patches import extract_patches
from medvae.errors import InputError
from medvae.io.images2d import read_idx, read_image, read_npz_split

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
UNIT = "grey level"


@dataclass
class ImageSetPatches:
    """The patches of one image-set row.

    Attributes:
        images: float32 ``(N, C, P, P)`` in [0, 1].
        slice_index: int64 ``(N,)`` the image's index in its file (0 for an image file).
        foreground_fraction: float32 ``(N,)``.
        patient_id, classes: object ``(N,)`` per image ("" where the set has no classes).
        class_names: the row's classes in label-id order (IDX / npz) or its one class.
        low, high, unit: physical = low + x * (high - low).
        spacing: ``(sy, sx)`` of a patch pixel in source pixels.
    """

    images: np.ndarray
    slice_index: np.ndarray
    foreground_fraction: np.ndarray
    patient_id: np.ndarray
    classes: np.ndarray
    class_names: list[str]
    low: float
    high: float
    unit: str
    spacing: tuple[float, float]


def _class_names(ids: np.ndarray, path: str, fmt: str) -> tuple[np.ndarray, list[str]]:
    """Label ids -> per-image names and the names in id order."""
    uniq = np.unique(ids)
    fashion = fmt == "idx" and "fashion" in Path(path).parent.name.lower() and uniq.min() >= 0 and uniq.max() < 10
    table = {int(i): FASHION_MNIST_CLASSES[int(i)] if fashion else str(int(i)) for i in uniq}
    lut = np.asarray([table[int(i)] for i in uniq], dtype=object)
    return lut[np.searchsorted(uniq, ids)], [table[int(i)] for i in uniq]


def read_row(fmt: str, path: str, label_path: str, split: str, patient_id: str,
             class_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """``(images (N, C, H, W) raw dtype, patient ids (N,), class names (N,), classes in order)``."""
    if fmt == "image":
        x = read_image(path)[None]
        return x, np.asarray([patient_id], dtype=object), np.asarray([class_name], dtype=object), \
            [class_name] if class_name else []
    if fmt == "idx":
        x = read_idx(path)
        if x.ndim != 4:
            raise InputError(f"{path}: an IDX labels file, not images")
        y = read_idx(label_path) if label_path else None
        if y is not None and len(y) != len(x):
            raise InputError(f"{label_path}: {len(y)} labels for the {len(x)} images of {path}")
    elif fmt == "npz":
        x, y = read_npz_split(path, split)
    else:
        raise ValueError(f"not an image-set format: {fmt!r}")
    n = len(x)
    width = len(str(max(n - 1, 0)))
    ids = np.char.add(f"{patient_id}-", np.char.zfill(np.arange(n).astype(str), width)).astype(object)
    if y is None:
        return x, ids, np.full(n, "", dtype=object), []
    names, order = _class_names(np.asarray(y).astype(np.int64), path, fmt)
    return x, ids, names, order


def normalize(x: np.ndarray, modality: str, config: PrepareConfig) -> tuple[np.ndarray, float, float, str]:
    """Raw ``(N, C, H, W)`` -> float32 in [0, 1] and the (low, high, unit) that map it back."""
    if modality in ("microscopy", "mr"):
        flat = x.reshape(len(x), -1).astype(np.float32)
        lo, hi = np.percentile(flat, list(config.microscopy_percentiles), axis=1)  # per image
        lo_, hi_ = lo[:, None, None, None], hi[:, None, None, None]
        out = (np.clip(x, lo_, hi_) - lo_) / np.where(hi_ > lo_, hi_ - lo_, 1.0)
        return out.astype(np.float32), float(np.median(lo)), float(np.median(hi)), \
            "counts" if modality == "microscopy" else "a.u."
    if modality == "ct":
        lo, hi = (float(v) for v in config.ct_window)
        unit = "HU"
    elif x.dtype == np.bool_:
        lo, hi, unit = 0.0, 1.0, UNIT
    elif np.issubdtype(x.dtype, np.integer):
        info = np.iinfo(x.dtype)
        lo, hi, unit = float(min(info.min, 0)), float(info.max), UNIT
    else:
        lo, hi, unit = float(np.nanmin(x)), float(np.nanmax(x)), UNIT
        if lo >= 0.0 and hi <= 1.0:
            lo, hi = 0.0, 1.0
    scale = np.float32(1.0 / (hi - lo) if hi > lo else 0.0)
    out = (np.clip(x.astype(np.float32), lo, hi) - np.float32(lo)) * scale
    return out, lo, hi, unit


def fit_mode(height: int, width: int, size: int, mode: str) -> str:
    """The mode used for an image of ``height x width``: ``auto`` resolved to ``pad`` or ``resize``."""
    if mode != "auto":
        return mode
    return "pad" if max(height, width) <= size and 2 * max(height, width) > size else "resize"


def pad_to(x: np.ndarray, size: int, where: str) -> np.ndarray:
    """Centre ``(N, C, H, W)`` on a zero ``(N, C, size, size)`` canvas; InputError if it does not fit."""
    h, w = x.shape[-2:]
    if h > size or w > size:
        raise InputError(f"{where}: {h}x{w} images do not fit a {size}x{size} patch with --mode pad; "
                         "use --mode resize or a larger --patch-size")
    top, left = (size - h) // 2, (size - w) // 2
    out = np.zeros((*x.shape[:2], size, size), dtype=np.float32)
    out[..., top:top + h, left:left + w] = x
    return out


def image_set_patches(fmt: str, path: str, label_path: str, split: str, patient_id: str, class_name: str,
                      modality: str, config: PrepareConfig) -> ImageSetPatches:
    """Read, normalize and fit one image-set row (see the module doc)."""
    raw, ids, classes, order = read_row(fmt, path, label_path, split, patient_id, class_name)
    x, low, high, unit = normalize(raw, modality, config)
    del raw
    size = int(config.patch_size)
    h, w = x.shape[-2:]
    mode = fit_mode(h, w, size, config.mode)
    if mode == "pad":
        images = pad_to(x, size, path)
        index, spacing = np.arange(len(x)), (1.0, 1.0)
        fg = np.count_nonzero(x.reshape(len(x), -1), axis=1) / float(h * w)
    else:  # resize / tile: the volume path, each image a slice, nothing dropped
        cfg = config.model_copy(update={"mode": mode, "foreground_threshold": 0.0, "slice_step": 1})
        vol = torch.from_numpy(x).permute(1, 0, 2, 3)  # (C, N, H, W)
        p = extract_patches(vol, (vol != 0).any(dim=0), cfg, (1.0, 1.0))
        images, index, spacing, fg = p.images, p.slice_index, p.spacing, p.foreground_fraction
    return ImageSetPatches(images=np.ascontiguousarray(images, dtype=np.float32),
                           slice_index=np.asarray(index, dtype=np.int64) if fmt != "image" else
                           np.zeros(len(index), dtype=np.int64),
                           foreground_fraction=np.asarray(fg, dtype=np.float32), patient_id=ids[index],
                           classes=classes[index], class_names=order, low=low, high=high, unit=unit,
                           spacing=(float(spacing[0]), float(spacing[1])))

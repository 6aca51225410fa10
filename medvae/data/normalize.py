"""Loading and normalizing one volume for prepare, vectorized over the whole volume, without MONAI.

:func:`load_normalized` reads a scan (and its label map) with medvae's readers and returns what the
MONAI chain of :mod:`medvae.data.transforms` returns for it: the same float32 ``(C, Z, Y, X)`` in
[0, 1], the foreground mask, the normalization constants and the spacing, value for value (a test
checks it against the chain). It is what ``medvae prepare`` runs: three in-place tensor operations
over the whole volume, and no import of MONAI, whose package loads every submodule (networks,
losses, pyplot, scipy.stats; about 1.6 s) on its first import. torch is imported inside the
functions that compute with it: prepare's CT slice items use the CT constants, :func:`clip_scale_`
on numpy and :func:`read_label` without loading torch (about a second of a small prepare).

The pieces (:func:`foreground_mask`, :func:`normalization_constants`, :func:`clip_scale_`) are also
the steps of the MONAI chain, so both paths share one definition of each.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from medvae.config import PrepareConfig

if TYPE_CHECKING:
    import torch

UNITS = {"ct": "HU", "mr": "a.u.", "microscopy": "counts", "image": "grey level"}
# MR has no absolute intensity scale (unlike HU): it is normalized like microscopy, per volume by
# percentiles, with an Otsu foreground; only CT uses the HU window and body threshold.
PERCENTILE_MODALITIES = ("microscopy", "mr")
_SLAB_VOXELS = 1 << 19  # voxels of a slab normalized at once (2 MiB of float32: within a core's L2 cache)


def foreground_mask(img: torch.Tensor | np.ndarray, modality: str, config: PrepareConfig) -> torch.Tensor:
    """Bool ``(Z, Y, X)`` foreground of a raw ``(C, Z, Y, X)`` or ``(Z, Y, X)`` volume.

    CT: value > ``config.ct_body_hu`` (the body, not the air around it); microscopy / MR: value >
    the stack's Otsu threshold (:func:`otsu_threshold`); any channel above it counts.
    """
    import torch

    t = torch.as_tensor(img)
    if t.ndim == 3:
        t = t[None]
    return _above(t, foreground_threshold(t, modality, config))


def foreground_threshold(t: torch.Tensor, modality: str, config: PrepareConfig) -> float:
    """The raw value above which a voxel is foreground (:func:`foreground_mask`)."""
    if modality in PERCENTILE_MODALITIES:
        return otsu_threshold(t)
    return float(config.ct_body_hu)


def _above(t: torch.Tensor, thr: float) -> torch.Tensor:
    """Bool ``(Z, Y, X)``: any channel of ``t (C, Z, Y, X)`` above ``thr``."""
    return t[0] > thr if t.shape[0] == 1 else (t > thr).any(dim=0)


def otsu_threshold(img: torch.Tensor | np.ndarray) -> float:
    """Otsu threshold of the whole stack (skimage.filters.threshold_otsu); constant stack -> its value."""
    arr = np.asarray(img.numpy() if hasattr(img, "numpy") else img)  # a tensor, or numpy already
    lo, hi = float(arr.min()), float(arr.max())
    if lo == hi:
        return hi  # nothing above it: an empty stack has no foreground
    from skimage.filters import threshold_otsu  # microscopy / MR only: CT never needs scikit-image here

    return float(threshold_otsu(arr))


def percentiles(t: torch.Tensor, q: tuple[float, float]) -> tuple[float, float]:
    """The ``q`` percentiles of the whole tensor, computed as MONAI's ``percentile`` does (numpy above a
    million values, ``torch.quantile`` below, the result in the tensor's dtype), so the constants equal
    those of ``ScaleIntensityRangePercentiles``."""
    import torch

    qs = np.asarray(q, dtype=np.float64)
    if t.numel() > 1_000_000:  # MONAI's switch (pytorch#64947: quantile's size limit)
        res = torch.as_tensor(np.percentile(t.numpy(), qs)).to(t.dtype)
    else:
        res = torch.quantile(t, torch.as_tensor(qs / 100.0).to(t.dtype))
    lo, hi = (float(v) for v in res.ravel().tolist())
    return lo, hi


def normalization_constants(img, modality: str, config: PrepareConfig) -> dict:
    """Constants mapping normalized [0, 1] values back to physical units.

    Args:
        img: the raw volume (HU for CT; counts for microscopy). Ignored for CT.
    Returns:
        ``{"low", "high", "unit"}``: CT the window ``config.ct_window`` in HU; microscopy and MR the
        volume's ``config.microscopy_percentiles`` (computed as ScaleIntensityRangePercentiles does).
    """
    if modality in PERCENTILE_MODALITIES:
        import torch

        t = torch.as_tensor(img)
        t = t.as_tensor() if hasattr(t, "as_tensor") else t  # MetaTensor -> plain
        low, high = percentiles(t, tuple(config.microscopy_percentiles))
    else:
        low, high = (float(v) for v in config.ct_window)
    return {"low": low, "high": high, "unit": UNITS.get(modality, "a.u.")}


def clip_scale_(t: torch.Tensor | np.ndarray, low: float, high: float) -> torch.Tensor | np.ndarray:
    """``t -> (clip(t, low, high) - low) / (high - low)`` in place (``high == low`` maps to 0): the values
    of MONAI's ``ScaleIntensityRange(low, high, 0, 1, clip=True)`` in three in-place operations. A numpy
    array takes numpy's same operations (the Python scalars computed in the array's type, as torch does)."""
    scale = 1.0 / (high - low) if high > low else 0.0
    if isinstance(t, np.ndarray):
        np.clip(t, low, high, out=t)
        np.subtract(t, low, out=t)
        np.multiply(t, scale, out=t)
        return t
    t.clamp_(low, high).sub_(low)
    t.mul_(scale)
    return t


def spacing_zyx(affine: np.ndarray | None, spacing) -> tuple[float, float, float]:
    """Voxel size ``(z, y, x)``: the world step of each array axis of an array-order affine (columns
    z, y, x), or ``spacing`` itself where there is no affine."""
    if affine is None:
        return tuple(float(s) for s in spacing)
    aff = np.asarray(affine, dtype=np.float64)
    return tuple(float(s) for s in np.sqrt((aff[:3, :3] ** 2).sum(axis=0)))


def array_affine(vol) -> np.ndarray:
    """4x4 affine from a Volume's array index ``(z, y, x)`` to world coordinates."""
    if vol.affine is not None:
        return np.asarray(vol.affine, dtype=np.float64)[:, [2, 1, 0, 3]]
    return np.diag([*map(float, vol.spacing), 1.0])


def _channels_first(vol) -> torch.Tensor:
    import torch

    arr = np.asarray(vol.array, dtype=np.float32)
    t = torch.from_numpy(arr)
    return t if t.ndim == 4 else t[None]


def read_label(path: str) -> np.ndarray:
    """A label map ``(Z, Y, X)`` (or ``(C, Z, Y, X)``) of class values; a NIfTI keeps its stored type (uint8
    labels stay a quarter of float32 through reorientation and patch cutting, and become the same uint8
    patches)."""
    from medvae.io import load_volume
    from medvae.io.formats import scan_format
    from medvae.io.nifti import read_nifti

    vol = read_nifti(path, keep_dtype=True) if scan_format(path) == "nifti" else load_volume(path)
    return np.ascontiguousarray(vol.array)


def _label(path: str) -> torch.Tensor:
    """:func:`read_label` as a ``(1, Z, Y, X)`` tensor."""
    import torch

    t = torch.from_numpy(read_label(path))
    return t if t.ndim == 4 else t[None]


def load_normalized(path: str, modality: str, config: PrepareConfig, label_path: str = "") -> dict:
    """A scan (and its label map) loaded and normalized for prepare.

    Returns:
        ``image``: float32 ``(C, Z, Y, X)`` in [0, 1]; ``label``: ``(1, Z, Y, X)`` class values in the
        file's type (only with ``label_path``; the chain gives the same values as float32);
        ``foreground``: bool ``(Z, Y, X)`` from the raw values; ``normalization``: ``{"low", "high",
        "unit"}``; ``spacing``: ``(z, y, x)`` — as ``build_transforms(modality, config, with_label)``
        gives for ``{"image": path, "label": label_path}``.
    """
    import torch

    from medvae.io import load_volume

    vol = load_volume(path)
    image = _channels_first(vol)  # the reader's own float32 array: normalized in place, no copy
    out = {"spacing": spacing_zyx(array_affine(vol), vol.spacing)}
    if label_path:
        out["label"] = _label(label_path)
    thr = foreground_threshold(image, modality, config)
    norm = out["normalization"] = normalization_constants(image, modality, config)
    # the mask and the scaling a few slices at a time: each slab is read once from memory for both
    fg = out["foreground"] = torch.empty(image.shape[1:], dtype=torch.bool)
    step = max(1, _SLAB_VOXELS // max(1, image[0, 0].numel()))
    for z in range(0, image.shape[1], step):
        slab = image[:, z : z + step]
        if slab.shape[0] == 1:
            torch.gt(slab[0], thr, out=fg[z : z + step])
        else:
            fg[z : z + step] = _above(slab, thr)
        clip_scale_(slab, norm["low"], norm["high"])
    out["image"] = image
    return out

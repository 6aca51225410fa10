"""``VolumeReader``: medvae's readers as one MONAI ``ImageReader``, for ``LoadImage(d)(reader=...)``.

It reads whatever :func:`medvae.io.load_volume` reads (a DICOM series directory, or the folder of
a given ``.dcm`` file; ``.nii`` / ``.nii.gz``; ``.tif`` / ``.tiff``), with an optional patient id::

    LoadImaged(keys=["image"], reader=VolumeReader(), image_only=False)({"image": series_dir})

This module imports MONAI (seconds), so nothing else in ``medvae.io`` imports it: plain reads
do not need MONAI.

Axis convention: the array is medvae's ``(Z, Y, X)`` (``(C, Z, Y, X)`` for TIFF channels), not
the ``(i, j, k) = (x, y, z)`` order MONAI's own NibabelReader/PydicomReader return. The meta
``affine`` is permuted to match (column ``a`` is the world step of array axis ``a``, RAS for
CT/MR, ``diag(spacing)`` for microscopy), so ``MetaTensor.pixdim == Volume.spacing`` and MONAI's
spatial transforms see the same geometry. LoadImage itself applies no axis reversal, and CT/MR
arrays already come out in the LPS convention of :mod:`medvae.io.orient` (MONAI's ``"SPL"``
axcodes for this axis order), so no ``Orientationd`` is needed after this reader.
Meta keys: ``spacing`` (z, y, x), ``patient_id``, ``modality``, ``series_uid``, ``orientation``,
``affine``/``original_affine``, ``spatial_shape``, ``original_channel_dim``, ``space``,
``warnings`` (one ``"; "``-joined string, so the default collate works).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from monai.data import ImageReader
from monai.utils import ensure_tuple

from medvae.errors import InputError
from medvae.io import load_volume
from medvae.io.formats import scan_format
from medvae.io.volume import Volume


def _array_affine(vol: Volume) -> np.ndarray:
    """4x4 affine from array index ``(z, y, x)`` to world coordinates."""
    if vol.affine is not None:
        return np.asarray(vol.affine, dtype=np.float64)[:, [2, 1, 0, 3]]
    return np.diag([*map(float, vol.spacing), 1.0])


def _meta(vol: Volume) -> dict:
    affine = _array_affine(vol)
    spatial = vol.array.shape[-3:]
    return {
        "spacing": np.asarray(vol.spacing, dtype=np.float64),
        "patient_id": vol.patient_id,
        "modality": vol.modality,
        "series_uid": vol.series_uid,
        "orientation": vol.orientation,
        "source": vol.source,
        "affine": affine,
        "original_affine": affine.copy(),
        "spatial_shape": np.asarray(spatial),
        "original_channel_dim": 0 if vol.array.ndim == 4 else float("nan"),
        "space": "RAS",
        "warnings": "; ".join(vol.warnings),
    }


def _get_data(volumes: Volume | Sequence[Volume]) -> tuple[np.ndarray, dict]:
    vols = [volumes] if isinstance(volumes, Volume) else list(volumes)
    meta = _meta(vols[0])
    if len(vols) == 1:
        return vols[0].array, meta
    for v in vols[1:]:
        if v.array.shape[-3:] != vols[0].array.shape[-3:]:
            raise ValueError(f"cannot stack {v.source} of shape {v.array.shape} with {vols[0].source}")
    # Several files: stacked (or concatenated, for channel stacks) as channels, as MONAI does.
    arrays = [v.array if v.array.ndim == 4 else v.array[None] for v in vols]
    meta["original_channel_dim"] = 0
    return np.concatenate(arrays, axis=0), meta


def _scan_path(filename: os.PathLike | str) -> Path:
    """The path ``load_volume`` reads for ``filename``: a ``.dcm`` file stands for its series folder."""
    p = Path(os.fspath(filename))
    return p.parent if p.suffix.lower() == ".dcm" and p.is_file() else p


class VolumeReader(ImageReader):
    """Reads any scan medvae reads (DICOM series, NIfTI, TIFF) through :func:`medvae.io.load_volume`.

    Args:
        patient_id: id stored in the meta dict; default: the reader's own (TCIA patient folder
            name for DICOM, the file stem for NIfTI and TIFF).
    """

    def __init__(self, patient_id: str | None = None):
        super().__init__()
        self.patient_id = patient_id

    def verify_suffix(self, filename: Sequence[os.PathLike] | os.PathLike) -> bool:
        paths = [_scan_path(f) for f in ensure_tuple(filename)]
        try:
            return bool(paths) and all(scan_format(p) in ("dicom", "nifti", "tiff") for p in paths)
        except InputError:
            return False

    def read(self, data: Sequence[os.PathLike] | os.PathLike, **kwargs):
        vols = [load_volume(_scan_path(f), patient_id=self.patient_id) for f in ensure_tuple(data)]
        return vols if len(vols) > 1 else vols[0]

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        return _get_data(img)

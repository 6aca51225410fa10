"""The in-memory volume every reader returns, and the header-only description discovery uses."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Volume:
    """A scan in memory.

    Attributes:
        array: float32 ``(Z, Y, X)``, or ``(C, Z, Y, X)`` when the stack has channels. CT in HU.
        spacing: ``(z, y, x)`` voxel size, mm for CT/MR, µm for microscopy.
        patient_id: the study's id (folder or file stem), never a DICOM PatientName.
        modality: ``ct`` | ``mr`` | ``microscopy``.
        source: the file or directory read.
        orientation: the codes of the array's ``(x, y, z)`` = (column, row, slice) directions.
            ``"LPS"`` for axial CT/MR: ``array[z, y, x]`` with z toward Superior, y toward
            Posterior, x toward patient Left (DICOM's axial display); a DICOM series acquired in
            another plane keeps its slices: ``"LIP"`` coronal, ``"PIL"`` sagittal (see ``plane``);
            ``"ZYX"`` for microscopy.
        affine: 4x4 voxel-index (x, y, z order as in NIfTI) to world (mm) matrix, when known.
        series_uid: DICOM SeriesInstanceUID, or "".
        warnings: problems that did not stop the read (gaps, skipped files, ...).
        plane: the patient plane of the slices ``array[k]``: ``axial`` | ``coronal`` |
            ``sagittal`` | ``oblique`` (a DICOM series' acquisition plane); "" when not recorded
            (microscopy, and NIfTI, which is always reoriented to ``LPS``).
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    patient_id: str
    modality: str
    source: str
    orientation: str = ""
    affine: np.ndarray | None = None
    series_uid: str = ""
    warnings: list[str] = field(default_factory=list)
    plane: str = ""


@dataclass
class VolumeInfo:
    """What a header-only look at a scan tells (for discovery: fast, no pixel decoding).

    Attributes:
        shape: ``(Z, Y, X)`` of the volume the full read would return (channels excluded).
        spacing: ``(z, y, x)`` in mm (CT/MR) or µm (microscopy).
        n_channels: 1 unless the stack has channels.
        modality: ``ct`` | ``mr`` | ``microscopy``.
        series_uid: DICOM SeriesInstanceUID, or "".
        warnings: problems that would not stop the full read.
        plane: ``axial`` | ``coronal`` | ``sagittal`` | ``oblique``, or "" (see ``Volume.plane``).
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    n_channels: int = 1
    modality: str = ""
    series_uid: str = ""
    warnings: list[str] = field(default_factory=list)
    plane: str = ""

"""Synthetic cohorts for the demo, the tests and the benchmarks, written in the real formats.

CT: abdominal phantoms as DICOM CT series in the TCIA Pancreas-CT layout with NIfTI pancreas
labels; microscopy: fluorescence nuclei stacks as ImageJ TIFFs. Everything is deterministic
per seed, and patient ``i`` depends only on ``(seed, i)``, so a larger cohort extends a smaller
one. The DICOMs carry a FAKE identity (name, birth date, id) so privacy tests mean something.

What the images look like is ``medvae.io.phantom_images``; this module writes the files and the
layout.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medvae.io.phantom_images import (  # noqa: F401  (TISSUES re-exported with the images' makers)
    TISSUES,
    CTPhantom,
    make_ct_phantom,
    make_microscopy_stack,
    phantom_rng,
)
from medvae.io.writers import write_nifti, write_tiff

FAKE_NAMES = (
    "ALICE",
    "BOB",
    "CAROL",
    "DAVID",
    "ERIN",
    "FRANK",
    "GRACE",
    "HEIDI",
    "IVAN",
    "JUDY",
    "MALLORY",
    "NIAJ",
    "OLIVIA",
    "PEGGY",
    "RUPERT",
    "SYBIL",
    "TRENT",
    "VICTOR",
    "WALTER",
)
UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root; suffixes are SHA-512 of seed + ids


def _uid(seed: int, *parts) -> str:
    return str(generate_uid(UID_ROOT, entropy_srcs=["medvae-phantom", str(seed), *map(str, parts)]))


def fake_identity(seed: int, index: int) -> dict:
    """The FAKE identity written into patient ``index``'s DICOMs (never a real person)."""
    h = hashlib.sha256(f"medvae-phantom:{seed}:{index}".encode()).hexdigest()
    rng = phantom_rng(seed, "identity", index)
    birth = f"{int(rng.integers(1935, 2000))}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
    return {
        "PatientName": f"PHANTOM^{FAKE_NAMES[index % len(FAKE_NAMES)]}",
        "PatientID": f"PHX{h[:8].upper()}",
        "PatientBirthDate": birth,
        "PatientSex": "FM"[index % 2],
        "AccessionNumber": f"ACC{h[8:14].upper()}",
    }


def write_dicom_series(
    ph: CTPhantom, directory: Path, seed: int, index: int, signed: bool = False
) -> list[Path]:
    """Write ``ph`` as a CT Image Storage series (one file per slice, explicit VR little endian).

    Stored values are HU + 1024 (RescaleIntercept -1024, slope 1) as uint16, or int16 when
    ``signed``. File ``1-001.dcm`` is the most superior slice, as in TCIA downloads.
    """
    nz, ny, nx = ph.hu.shape
    dz, dy, dx = ph.spacing
    b = Dataset()
    for key, value in fake_identity(seed, index).items():
        setattr(b, key, value)
    study_date = f"2015{int(index % 12) + 1:02d}{int(index % 27) + 1:02d}"
    b.SOPClassUID = CTImageStorage
    b.StudyInstanceUID = _uid(seed, index, "study")
    b.SeriesInstanceUID = _uid(seed, index, "series")
    b.FrameOfReferenceUID = _uid(seed, index, "frame")
    b.StudyDate = b.SeriesDate = b.ContentDate = study_date
    b.StudyTime = b.SeriesTime = "101500"
    b.StudyID, b.SeriesNumber, b.AcquisitionNumber = "1", 2, 1
    b.Modality, b.Manufacturer, b.InstitutionName = "CT", "medvae phantom", "PHANTOM HOSPITAL"
    b.StudyDescription, b.SeriesDescription = "Pancreas phantom", "Pancreas"
    b.BodyPartExamined, b.PatientPosition, b.KVP = "ABDOMEN", "HFS", 120
    b.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    b.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    b.PixelSpacing = [dy, dx]
    b.SliceThickness = dz
    b.Rows, b.Columns = ny, nx
    b.SamplesPerPixel, b.PhotometricInterpretation = 1, "MONOCHROME2"
    b.BitsAllocated, b.BitsStored, b.HighBit = 16, 16, 15
    b.PixelRepresentation = int(signed)
    b.RescaleIntercept, b.RescaleSlope, b.RescaleType = -1024, 1, "HU"
    b.WindowCenter, b.WindowWidth = 40, 400
    stored = (ph.hu.astype(np.int32) + 1024).astype(np.int16 if signed else np.uint16)
    paths = []
    for n, k in enumerate(range(nz - 1, -1, -1), start=1):  # superior first
        ds = Dataset()
        ds.update(b)
        ds.SOPInstanceUID = _uid(seed, index, "slice", k)
        ds.InstanceNumber = n
        zpos = round(ph.origin[2] + k * dz, 4)
        ds.ImagePositionPatient = [ph.origin[0], ph.origin[1], zpos]
        ds.SliceLocation = zpos
        ds.PixelData = stored[k].tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = directory / f"1-{n:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def write_phantom_cohort(
    out,
    ct_patients: int = 4,
    microscopy_stacks: int = 2,
    seed: int = 0,
    ct_size: int = 512,
    ct_slices: int | None = None,
) -> dict:
    """Write the phantom cohort and return a summary (counts + paths).

    ``out/Pancreas-CT/PANCREAS_0001/<study>/<series>/1-001.dcm ...``, ``out/labels/label0001.nii.gz``,
    ``out/microscopy/stack_001.tif``. Each patient folder appears complete or not at all
    (written under a temporary name, then renamed).
    """
    out = Path(out)
    ct_root, label_root, mic_root = out / "Pancreas-CT", out / "labels", out / "microscopy"
    summary = {
        "out": str(out),
        "seed": seed,
        "ct_patients": ct_patients,
        "microscopy_stacks": microscopy_stacks,
        "ct": [],
        "microscopy": [],
    }
    for i in range(ct_patients):
        pid, num = f"PANCREAS_{i + 1:04d}", f"{i + 1:04d}"
        ph = make_ct_phantom(seed, i, ct_size, ct_slices)
        ct_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=ct_root, prefix=f".{pid}."))
        try:
            h = int(hashlib.sha256(f"{seed}:{i}".encode()).hexdigest()[:10], 16)
            series = (
                tmp
                / f"{(i % 12) + 1:02d}-{(i % 27) + 1:02d}-2015-PANCREAS{num}-Pancreas-{h % 90000 + 10000}"
                / f"Pancreas-{(h // 90000) % 90000 + 10000}"
            )
            series.mkdir(parents=True)
            write_dicom_series(ph, series, seed, i, signed=bool(i % 2))
            _replace_dir(tmp, ct_root / pid)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        label = label_root / f"label{num}.nii.gz"
        # pancreas label map on the DICOM grid: voxel axes (column, row, slice), RAS affine
        write_nifti(label, ph.label, ph.spacing, ph.origin)
        summary["ct"].append(
            {
                "patient_id": pid,
                "series": str(ct_root / pid / series.relative_to(tmp)),
                "label": str(label),
                "shape": list(ph.hu.shape),
                "spacing": list(ph.spacing),
            }
        )
    for i in range(microscopy_stacks):
        stack, _, spacing = make_microscopy_stack(seed, i)
        path = mic_root / f"stack_{i + 1:03d}.tif"
        mic_root.mkdir(parents=True, exist_ok=True)
        write_tiff(path, stack, "ZYX", spacing, unit="um")  # ImageJ hyperstack, µm
        summary["microscopy"].append(
            {"path": str(path), "shape": list(stack.shape), "spacing": list(spacing)}
        )
    return summary

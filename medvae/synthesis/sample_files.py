"""The files of one synthetic sample: where they go and how each is written (physical units, previews,
label maps), in the formats of medvae.io.writers."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medvae.data.store import PatchStore
from medvae.io.writers import write_npy, write_png, write_slice


def to_file_dtype(phys: np.ndarray, modality: str) -> np.ndarray:
    """Physical values -> the file's integer type: uint16 counts (microscopy), int16 HU (else)."""
    if modality == "microscopy":
        return np.clip(np.rint(phys), 0, 65535).astype(np.uint16)
    return np.clip(np.rint(phys), -32768, 32767).astype(np.int16)


def sample_files(sample_id: str, modality: str, fmt: str, cls: str = "", mask: bool = False) -> dict[str, str]:
    """Relative paths of one sample's files: ``path`` (the main file, "" for png), ``mask`` (the label map
    of a joint model, else "") and ``preview``; a class model's samples go to ``<modality>/<class>/``."""
    base = f"synthetic/{modality}/{cls + '/' if cls else ''}{sample_id}"
    if fmt == "png":
        ext = ""
    elif fmt == "npy":
        ext = ".npy"
    elif fmt == "tiff" or modality == "microscopy":
        ext = ".tif"
    else:
        ext = ".nii.gz"
    mask_path = f"{base}_mask{ext or '.png'}" if mask else ""
    return {"path": base + ext if ext else "", "mask": mask_path, "preview": base + ".png"}


def write_file(path: Path, x01: np.ndarray, store: PatchStore, modality: str) -> None:
    """One file of a sample ``x01: (C, H, W)`` in [0, 1], by suffix: preview, raw, or physical units;
    a ``*_mask`` file gets the label map (``x01`` is then ``(1, H, W)`` uint8 labels), in the image's geometry."""
    if path.name.split(".")[0].endswith("_mask"):
        if path.suffix in (".png", ".npy"):
            (write_png if path.suffix == ".png" else write_npy)(path, x01)
        else:
            write_slice(path, x01, store.spacing(modality), "um" if modality == "microscopy" else "mm",
                        description="medvae synthetic label map")
    elif path.suffix == ".png":
        write_png(path, x01)
    elif path.suffix == ".npy":
        write_npy(path, x01.astype(np.float32))
    else:  # .tif / .nii.gz
        write_slice(path, to_file_dtype(store.to_physical(x01, modality), modality), store.spacing(modality),
                    "um" if modality == "microscopy" else "mm", description="medvae synthetic")


def write_sample(out: Path, files: dict[str, str], x01: np.ndarray, mask: np.ndarray | None, store: PatchStore,
                  modality: str) -> tuple[int, int]:
    """Write the files of one sample that do not exist yet; returns ``(written, already there)``."""
    written = skipped = 0
    for key, rel in files.items():
        if not rel:
            continue
        if (out / rel).exists():  # written atomically, so complete
            skipped += 1
        else:
            write_file(out / rel, mask if key == "mask" else x01, store, modality)
            written += 1
    return written, skipped

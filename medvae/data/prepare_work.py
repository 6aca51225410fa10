"""prepare's work items, run in the workers: a whole volume, or a CT series as runs of slices.

- :func:`start_volume` is every volume's first item. A CT DICOM series whose slices
  :class:`medvae.io.dicom_pixels.SliceReader` decodes apart (native single-frame files: scanners'
  CT, the TCIA layout) comes back as :class:`SeriesChunks`: its headers parsed once, its label map
  read once and kept as ``.npy`` in the run's temporary folder, and its slice ranges of
  :data:`CHUNK_SLICES`; each range is then one :func:`prepare_chunk` item (decode, HU window,
  foreground, patches, the chunk's ``.npy`` files). Any other volume (MR and microscopy, whose
  percentiles and Otsu threshold are of the whole volume; NIfTI, TIFF, 2D image sets, compressed
  DICOM) is prepared whole (:func:`process_volume`) in that first item.
- The ranges depend on the series alone, never on ``--workers``, and every step on a CT slice is
  per slice (the window and the foreground per voxel, the resize or the tiles per slice), so a
  store is the same byte for byte with any number of workers and the same as the whole-volume path
  (tests check both). Three series on two workers are thus split evenly (one series per item
  could gain at most 1.5x).
- Items never raise: a failure comes back as the message ``"<file>: <what>"``. A chunk whose file
  cannot be decoded returns None, and the volume is then prepared whole, which skips that file,
  says so and re-plans the geometry (``read_dicom_series``'s contract).

The readers and the patch cutter are imported inside the items, not at module level; torch only by
the whole-volume item (:func:`medvae.data.normalize.load_normalized`): importing it takes about a
second, and a CT series' items, a store that is up to date, a merge, or the parent of a
multi-worker run never need it. MONAI is not imported at all: :mod:`medvae.data.normalize`
normalizes with the same values as the MONAI chain of :mod:`medvae.data.transforms`.
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medvae.config import PrepareConfig
from medvae.data.manifest import IMAGE_SET_FORMATS
from medvae.data.prepare_tasks import INDEX_ARRAYS, PreparedVolume, VolumeTask
from medvae.data.store import to_stored
from medvae.errors import InputError, MedvaeError

log = logging.getLogger(__name__)

CHUNK_SLICES = 32  # slices of one chunk item (rounded up to a multiple of slice_step): 32 MiB of 512² float32


def _failure(task: VolumeTask, err: Exception) -> str:
    log.debug("volume %s failed", task.path, exc_info=True)
    what = str(err) if isinstance(err, MedvaeError) else f"{type(err).__name__}: {err}"
    return what if task.path in what else f"{task.path}: {what}"


def _label_mismatch(task: VolumeTask, label_shape, image_shape) -> InputError:
    return InputError(f"{task.label_path}: label shape {tuple(label_shape)} differs from the image's "
                      f"{tuple(image_shape)} ({task.path}); check the label belongs to it")


# --------------------------------------------------------------------------- a whole volume
def process_volume(position: int, task: VolumeTask, digest: str, config: dict,
                   tmpdir: str) -> PreparedVolume | str:
    """Load, normalize and cut one volume; write its chunk(s) to ``tmpdir``."""
    from medvae.data.normalize import load_normalized
    from medvae.data.patches import extract_patches

    try:
        cfg = PrepareConfig(**config)
        if task.format in IMAGE_SET_FORMATS:
            return _process_image_set(position, task, digest, cfg, tmpdir)
        d = load_normalized(task.path, task.modality, cfg, task.label_path)
        image, label = d["image"], d.get("label")
        if label is not None and label.shape[1:] != image.shape[1:]:
            raise _label_mismatch(task, label.shape[1:], image.shape[1:])
        p = extract_patches(image, d["foreground"], cfg, tuple(d["spacing"][1:]), label)
        chunk = str(Path(tmpdir) / f"{position:06d}")
        np.save(f"{chunk}.patches.npy", to_stored(p.images, cfg.dtype))
        if p.labels is not None:
            np.save(f"{chunk}.labels.npy", p.labels)
        norm = d["normalization"]
        return PreparedVolume(task, position, digest, chunk, len(p), int(image.shape[0]), int(image.shape[1]),
                              p.labels is not None, list(p.spacing), norm["low"], norm["high"], norm["unit"],
                              {c: getattr(p, c) for c in INDEX_ARRAYS})
    except Exception as err:  # noqa: BLE001 -- one bad volume must not stop the cohort
        return _failure(task, err)


def _process_image_set(position: int, task: VolumeTask, digest: str, cfg: PrepareConfig,
                       tmpdir: str) -> PreparedVolume:
    from medvae.data.image_patches import image_set_patches

    p = image_set_patches(task.format, task.path, task.label_path, task.split, task.patient_id, task.class_name,
                          task.modality, cfg)
    chunk = str(Path(tmpdir) / f"{position:06d}")
    np.save(f"{chunk}.patches.npy", to_stored(p.images, cfg.dtype))
    n = len(p.images)
    index = {"slice_index": p.slice_index, "y": np.zeros(n, np.int64), "x": np.zeros(n, np.int64),
             "foreground_fraction": p.foreground_fraction, "patient_id": p.patient_id, "class": p.classes}
    return PreparedVolume(task, position, digest, chunk, n, int(p.images.shape[1]), n, False, list(p.spacing),
                          p.low, p.high, p.unit, index, classes=p.class_names)


# --------------------------------------------------------------------------- a CT series by slice ranges
@dataclass(frozen=True)
class SeriesChunks:
    """A CT series planned for slice items: its reader, label file, in-plane spacing and ranges."""

    task: VolumeTask
    position: int
    digest: str
    reader: object  # medvae.io.dicom_pixels.SliceReader (picklable: paths, offsets, decoder options)
    label_file: str  # the label map (Z, Y, X) as .npy in the run's temporary folder; "" without one
    spacing_yx: tuple[float, float]
    chunks: tuple[tuple[int, int], ...]  # volume slice ranges [z0, z1)
    label: np.ndarray | None = None  # the label map itself instead, when the items run in this process

    @property
    def n_slices(self) -> int:
        return self.chunks[-1][1]


@dataclass(frozen=True)
class PatchChunk:
    """One slice range's patches (in ``prefix``.patches.npy / .labels.npy) and their index columns."""

    prefix: str
    n: int
    index: dict[str, np.ndarray]  # INDEX_ARRAYS, slice_index in the volume's numbering
    spacing: tuple[float, float]
    low: float
    high: float
    unit: str


def start_volume(position: int, task: VolumeTask, digest: str, config: dict, tmpdir: str,
                 in_process: bool = False) -> SeriesChunks | PreparedVolume | str:
    """A volume's first item: a CT series planned for slice items, else the whole volume prepared.

    ``in_process``: the slice items run in this process, so a label map stays in memory (no file).
    """
    if task.format == "dicom" and task.modality == "ct":
        try:
            planned = _plan_chunks(position, task, digest, PrepareConfig(**config), tmpdir, in_process)
        except Exception as err:  # noqa: BLE001 -- one bad volume must not stop the cohort
            return _failure(task, err)
        if planned is not None:
            return planned
    return process_volume(position, task, digest, config, tmpdir)


def _plan_chunks(position: int, task: VolumeTask, digest: str, cfg: PrepareConfig, tmpdir: str,
                 in_process: bool) -> SeriesChunks | None:
    from medvae.data.normalize import array_affine, read_label, spacing_zyx
    from medvae.io.dicom import plan_series
    from medvae.io.dicom_pixels import slice_reader

    plan = plan_series(task.path)
    reader = slice_reader(plan)
    if reader is None:
        return None
    for w in plan.warnings:
        log.warning(w)
    shape = reader.shape_zyx
    label_file, label = "", None
    if task.label_path:
        label = read_label(task.label_path)  # (Z, Y, X) class values in the file's type
        if label.shape != shape:
            raise _label_mismatch(task, label.shape, shape)
        label_file = str(Path(tmpdir) / f"{position:06d}.label.npy")
        if not in_process:  # the workers memory-map their slices of it
            np.save(label_file, label)
            label = None
    geometry = types.SimpleNamespace(affine=plan.reorient.affine, spacing=plan.reorient.spacing_zyx)
    spacing = spacing_zyx(array_affine(geometry), geometry.spacing)  # as load_normalized gives it
    step = max(1, int(cfg.slice_step))
    size = -(-CHUNK_SLICES // step) * step  # ranges start on kept slices
    chunks = tuple((z, min(z + size, shape[0])) for z in range(0, shape[0], size))
    return SeriesChunks(task, position, digest, reader, label_file, (float(spacing[1]), float(spacing[2])), chunks,
                        label)


def prepare_chunk(series: SeriesChunks, i: int, config: dict, tmpdir: str) -> PatchChunk | str | None:
    """Slices ``series.chunks[i]``: decoded, normalized and cut, as :func:`process_volume` does them.

    Returns None when a file of the range cannot be decoded (the caller prepares the volume whole).
    In numpy throughout: a CT series is prepared without importing torch (about a second of start-up).
    """
    from medvae.data.normalize import clip_scale_, foreground_threshold, normalization_constants
    from medvae.data.patches import extract_patches

    task = series.task
    try:
        cfg = PrepareConfig(**config)
        z0, z1 = series.chunks[i]
        hu, failed = series.reader.read_z(z0, z1)
        if failed:
            log.debug("%s: cannot decode %s; preparing the series whole", task.path, failed)
            return None
        # foreground_mask's predicate (HU > the body threshold, in float32), then the HU window in place
        fg = np.greater(hu, np.float32(foreground_threshold(hu, "ct", cfg)))
        norm = normalization_constants(hu, "ct", cfg)
        clip_scale_(hu, norm["low"], norm["high"])
        label = series.label
        if label is None and series.label_file:  # a worker: only its slices of the file are read
            label = np.load(series.label_file, mmap_mode="r")
        label = label[z0:z1] if label is not None else None
        p = extract_patches(hu[None], fg, cfg, series.spacing_yx, label)
        prefix = str(Path(tmpdir) / f"{series.position:06d}.{i:04d}")
        np.save(f"{prefix}.patches.npy", to_stored(p.images, cfg.dtype))
        if p.labels is not None:
            np.save(f"{prefix}.labels.npy", p.labels)
        index = {c: getattr(p, c) for c in INDEX_ARRAYS}
        index["slice_index"] = index["slice_index"] + z0
        return PatchChunk(prefix, len(p), index, p.spacing, norm["low"], norm["high"], norm["unit"])
    except Exception as err:  # noqa: BLE001 -- one bad volume must not stop the cohort
        return _failure(task, err)


def combine_chunks(series: SeriesChunks, chunks: list[PatchChunk]) -> PreparedVolume:
    """The volume of ``series`` from its chunks' results, in slice order."""
    first = chunks[0]
    index = {c: np.concatenate([ch.index[c] for ch in chunks]) for c in INDEX_ARRAYS}
    return PreparedVolume(series.task, series.position, series.digest, [ch.prefix for ch in chunks if ch.n],
                          sum(ch.n for ch in chunks), 1, series.n_slices, bool(series.label_file),
                          list(first.spacing), first.low, first.high, first.unit, index)

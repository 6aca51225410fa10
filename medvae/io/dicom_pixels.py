"""DICOM pixels: one slice's stored values in HU, and a series' slices decoded in any process.

- :func:`decode` / :func:`to_units`: a slice's stored values by pydicom's decoders, rescaled to HU
  exactly as pydicom's ``apply_modality_lut`` (in float32 in place where that is bit-identical).
- :class:`SliceReader`: where each slice's pixel bytes lie in its file (the byte offset of the
  native ``PixelData`` value, known from the header parse) and the series' pydicom decoder
  options, so that any process decodes any range of slices with pydicom's ``Decoder.as_array``
  on those bytes alone: no header is parsed a second time (a parse is half the cost of reading a
  slice) and no pydicom Dataset is pickled. ``medvae prepare`` splits a series into slice ranges
  with it. A series whose pixels are compressed, multi-frame, float or rescaled through a Modality
  LUT has none (:func:`slice_reader` returns None): it is decoded with its datasets, whole.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.pixels import apply_rescale, get_decoder, pixel_array
from pydicom.uid import UID

from medvae.io.dicom_geometry import SeriesPlan, Slice
from medvae.io.orient import Reorientation

_PIXEL_DATA = 0x7FE00010
_DECODER_KEYS = ("BitsAllocated", "BitsStored", "PixelRepresentation", "PhotometricInterpretation")


def decode(s: Slice, frames: dict[int, np.ndarray | Exception]) -> np.ndarray:
    """Stored pixel values of one slice, ``(rows, cols)``, by pydicom's decoders.

    ``view_only``: native (uncompressed) data comes back as a read-only view of the pixel bytes,
    no copy; the caller copies it into the volume while applying the rescale. A multi-frame file
    is decoded once, on its first frame, and kept in ``frames`` (by dataset id) until its last
    frame is copied.
    """
    if s.frame is None:
        arr = pixel_array(s.ds, view_only=True)
        if arr.ndim != 2:
            raise ValueError(f"expected one grayscale frame, got pixel array of shape {arr.shape}")
        return arr
    key = id(s.ds)
    if key not in frames:
        try:
            frames[key] = pixel_array(s.ds, view_only=True)
        except Exception as e:  # remembered, so the file's other frames fail fast
            frames[key] = e
    arr = frames[key]
    if isinstance(arr, Exception):
        raise arr
    if arr.ndim == 2:  # a one-frame file
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"expected grayscale frames, got pixel array of shape {arr.shape}")
    return arr[s.frame]


@functools.lru_cache(maxsize=256)
def _float32_exact(dtype: np.dtype, slope: float, intercept: float) -> bool:
    """True when ``stored * slope + intercept`` is exact in float32 for every value of ``dtype``.

    Then float32 arithmetic gives the very values of pydicom's float64 ``apply_modality_lut`` cast
    to float32: with q a power of two making ``slope * q`` and ``intercept * q`` integers, every
    intermediate is an integer times 1/q below 2**24 in magnitude, exact in both precisions.
    """
    if dtype.kind not in "ui" or dtype.itemsize > 2:
        return False
    info = np.iinfo(dtype)
    vmax = max(abs(int(info.min)), int(info.max))
    for e in range(16):
        q = 2.0**e
        if (slope * q).is_integer() and (intercept * q).is_integer():
            return vmax * abs(slope) * q + abs(intercept) * q < 2**24
    return False


def file_rescale(ds: pydicom.Dataset) -> tuple[float, float] | None:
    """The file's (RescaleSlope, RescaleIntercept) as pydicom applies them; None: a Modality LUT."""
    if ds.get("ModalityLUTSequence"):
        return None
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        return float(ds.RescaleSlope), float(ds.RescaleIntercept)
    return 1.0, 0.0


def to_units(out: np.ndarray, raw: np.ndarray, rescale: tuple[float, float] | None,
             ds: pydicom.Dataset | None = None) -> None:
    """``out[...] = raw * slope + intercept`` (HU for CT), equal to pydicom's ``apply_modality_lut``.

    pydicom computes in float64 (a new array per slice); when that is exact in float32 (integer or
    dyadic slope and intercept, 8/16-bit data: CT as written by scanners) the rescale runs in float32
    in place in ``out``, several times faster and bit-identical. Otherwise pydicom's own float64 path
    is used, then cast to float32. ``rescale`` None: the Modality LUT of ``ds``.
    """
    if rescale is None:
        out[...] = apply_rescale(raw, ds)
        return
    slope, intercept = rescale
    if _float32_exact(raw.dtype, slope, intercept):
        # integer -> float32 is exact below 2**24; the first operation converts as it computes (one pass
        # instead of a copy and then an operation), with the same float32 result
        if slope != 1.0:
            np.multiply(raw, np.float32(slope), out=out, casting="unsafe")
            if intercept != 0.0:
                out += np.float32(intercept)
        elif intercept != 0.0:
            np.add(raw, np.float32(intercept), out=out, casting="unsafe")
        else:
            np.copyto(out, raw, casting="unsafe")
    else:
        out[...] = raw.astype(np.float64) * slope + intercept


@functools.lru_cache(maxsize=8)
def _decoder(transfer_syntax: str):
    return get_decoder(UID(transfer_syntax))


@dataclass(frozen=True)
class SliceReader:
    """A series' slices, decodable in any process from their files' bytes (see the module docstring).

    The lists are in stack order (``k``: increasing position along the normal); ``reorient`` takes
    the stack to the volume's array order (:func:`medvae.io.orient.plan_acquisition`: ``k`` stays
    the slice axis, at most flipped), so volume slices ``z0:z1`` are one run of stack slices.
    """

    paths: tuple[str, ...]
    offsets: tuple[int, ...]  # byte offset of each file's PixelData value
    rescales: tuple[tuple[float, float], ...]
    names: tuple[str, ...]  # each slice's file, as messages name it
    rows: int
    cols: int
    options: tuple[tuple[str, object], ...]  # pydicom decoder options (rows, columns, bits, ...)
    reorient: Reorientation

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return self.reorient.shape_zyx

    def _stack_range(self, z0: int, z1: int) -> range:
        k_flipped = self.reorient.ornt[2, 1] < 0
        n = len(self.paths)
        return range(n - z1, n - z0) if k_flipped else range(z0, z1)

    def decode_into(self, stack: np.ndarray, ks) -> list[int]:
        """HU of stack slices ``ks`` into ``stack[i]`` (``i``-th of ``ks``); the positions ``i`` that failed."""
        opts = dict(self.options)
        opts["transfer_syntax_uid"] = UID(opts["transfer_syntax_uid"])  # kept as str: pickles small
        decoder = _decoder(opts["transfer_syntax_uid"])
        nbytes = self.rows * self.cols * int(opts["bits_allocated"]) // 8
        failed = []
        for i, k in enumerate(ks):
            try:
                with open(self.paths[k], "rb") as f:
                    f.seek(self.offsets[k])
                    buf = f.read(nbytes)
                if len(buf) != nbytes:
                    raise ValueError(f"{len(buf)} pixel bytes, expected {nbytes}")
                raw = decoder.as_array(buf, **opts, view_only=True)[0]
                to_units(stack[i], raw.reshape(self.rows, self.cols), self.rescales[k])
            except Exception:  # a truncated or corrupt file: the caller names it
                failed.append(i)
        return failed

    def read_z(self, z0: int, z1: int) -> tuple[np.ndarray, list[str]]:
        """Volume slices ``z0:z1`` in HU, float32 ``(z1 - z0, Y, X)`` in the volume's array order, and the
        files that could not be decoded (their slices are left undefined: the caller reads the series whole)."""
        ks = self._stack_range(z0, z1)
        stack = np.empty((len(ks), self.rows, self.cols), dtype=np.float32)
        failed = self.decode_into(stack, ks)
        return np.ascontiguousarray(self.reorient.apply_kji(stack)), [self.names[ks[i]] for i in failed]


def slice_reader(plan: SeriesPlan) -> SliceReader | None:
    """A :class:`SliceReader` of ``plan``'s slices, or None where pydicom must decode them with their
    datasets: compressed, big-endian or deflated data, multi-frame files, float pixels, a Modality LUT,
    slices that differ in size or bit layout, or a reorientation that moves the slice axis."""
    ts = getattr(getattr(plan.slices[0].ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is None or ts.is_compressed or ts.is_deflated or not ts.is_little_endian:
        return None
    if int(plan.reorient.ornt[2, 0]) != 2:
        return None
    rows, cols = plan.slices[0].shape
    layout = None
    offsets, rescales = [], []
    for s in plan.slices:
        ds = s.ds
        elem = ds._dict.get(_PIXEL_DATA)  # the raw element: its value's offset in the file
        tell = getattr(elem, "value_tell", None)
        if s.frame is not None or s.shape != (rows, cols) or tell is None or not getattr(elem, "is_raw", False):
            return None
        if getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None) != ts:
            return None
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1 or int(ds.get("NumberOfFrames", 1) or 1) != 1:
            return None
        here = tuple(ds.get(k) for k in _DECODER_KEYS)
        layout = layout or here
        bits = here[0]
        if here != layout or bits not in (8, 16) or elem.length != rows * cols * bits // 8:
            return None
        rescale = s.rescale if s.rescale is not None else file_rescale(ds)
        if rescale is None:
            return None
        offsets.append(int(tell))
        rescales.append(rescale)
    options = {"rows": rows, "columns": cols, "samples_per_pixel": 1, "bits_allocated": int(layout[0]),
               "bits_stored": int(layout[1]), "pixel_representation": int(layout[2]),
               "photometric_interpretation": str(layout[3]), "number_of_frames": 1, "pixel_keyword": "PixelData",
               "transfer_syntax_uid": str(ts)}
    return SliceReader(tuple(str(s.path) for s in plan.slices), tuple(offsets), tuple(rescales),
                       tuple(str(s.named) for s in plan.slices), rows, cols, tuple(options.items()), plan.reorient)

"""Microscopy TIFF stacks (tifffile): ImageJ hyperstacks, OME-TIFF and plain multi-page TIFFs.

Axes of the file's first series are mapped to ``(C, Z, Y, X)``: ImageJ/OME ``C`` and RGB
samples ``S`` become channels (alpha dropped), ``Z`` and generic page axes (``Q``, ``I``) the
stack, ``T`` and any other axis keep their first index with a warning. ``C`` of 1 is dropped,
so a single-channel stack is ``(Z, Y, X)`` and a single 2D image ``(1, Y, X)``. Values are
converted to float32 unscaled. Pixel size in µm comes from OME ``PhysicalSize*`` or from the
ImageJ ``spacing``/``unit`` with the X/YResolution tags; without it spacing is 1 with a warning.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile

from medvae.errors import InputError
from medvae.io.formats import scan_stem
from medvae.io.volume import Volume, VolumeInfo

log = logging.getLogger(__name__)

_UM_PER_UNIT = {
    "nm": 1e-3, "nanometer": 1e-3, "µm": 1.0, "μm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0,
    "micrometer": 1.0, "\\u00b5m": 1.0, "mm": 1e3, "millimeter": 1e3, "cm": 1e4, "centimeter": 1e4,
    "m": 1e6, "meter": 1e6, "inch": 25400.0,
}
_CHANNEL_AXES = "CS"
_STACK_AXES = "ZQI"


@dataclass
class _Layout:
    """How the first series' axes map to (C, Z, Y, X), and the pixel size, without pixels."""

    path: Path
    axes: str
    shape: tuple[int, ...]
    index: tuple  # selects the kept part of the series array (first T, first of other axes)
    order: list[int]  # axes of the indexed array, as (C, Z, Y, X) positions (missing ones added)
    n_channels: int
    drop_alpha: bool
    shape_zyx: tuple[int, int, int]
    spacing: tuple[float, float, float]
    warnings: list[str] = field(default_factory=list)


def _unit_scale(unit: str | None) -> float | None:
    if unit is None:
        return None
    return _UM_PER_UNIT.get(str(unit).strip().lower().replace("\\u00b5", "µ"), None)


def _ome_spacing(tif: tifffile.TiffFile) -> dict[str, float]:
    """µm pixel size from the first OME ``Image``'s ``Pixels`` ``PhysicalSize{X,Y,Z}`` (and ``...Unit``)."""
    try:
        image = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
        pixels = (image[0] if isinstance(image, list) else image)["Pixels"]
    except Exception:  # no or malformed OME-XML: no pixel size
        return {}
    out = {}
    for ax in "XYZ":
        value = pixels.get(f"PhysicalSize{ax}")
        scale = _unit_scale(pixels.get(f"PhysicalSize{ax}Unit", "µm"))
        if value is not None and scale is not None and float(value) > 0:
            out[ax] = float(value) * scale
    return out


_RESUNITS = (tifffile.RESUNIT.INCH, tifffile.RESUNIT.CENTIMETER, tifffile.RESUNIT.MILLIMETER,
             tifffile.RESUNIT.MICROMETER)
_DEFAULT_DPI = (72.0, 96.0, 150.0, 300.0)


def _imagej_spacing(tif: tifffile.TiffFile) -> dict[str, float]:
    """µm pixel size from the X/YResolution tags (``TiffPage.get_resolution``), in ImageJ's ``unit``
    for ImageJ files, else in the TIFF ResolutionUnit; Z from ImageJ's ``spacing``."""
    page = tif.pages.first
    ij = tif.imagej_metadata or {}
    if ij:
        um_per_unit = _unit_scale(ij.get("unit"))
        if um_per_unit is None:
            return {}
        per_um = [r / um_per_unit for r in page.get_resolution()]
    else:
        if page.resolutionunit not in _RESUNITS:  # NONE: the tags are no physical size
            return {}
        if page.resolutionunit == tifffile.RESUNIT.INCH and round(page.get_resolution()[0], 3) in _DEFAULT_DPI:
            return {}  # a screen/print dpi written by default, not a microscope's pixel size
        if page.get_resolution() == (1, 1):  # tifffile's default when no resolution was given
            return {}
        per_um = page.get_resolution(tifffile.RESUNIT.MICROMETER)
    out = {ax: 1.0 / r for ax, tag, r in zip("XY", ("XResolution", "YResolution"), per_um)
           if tag in page.tags and r > 0}
    if ij and float(ij.get("spacing", 0) or 0) > 0:
        out["Z"] = float(ij["spacing"]) * um_per_unit
    return out


def _layout(path: str | os.PathLike) -> _Layout:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such TIFF file")
    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.series or len(tif.pages) == 0:
                raise InputError(f"{path}: TIFF holds no images (zero pages)")
            series = tif.series[0]
            n_series = len(tif.series)
            axes, shape = series.axes, tuple(int(s) for s in series.shape)
            sizes = _ome_spacing(tif) if tif.is_ome else _imagej_spacing(tif)
    except InputError:
        raise
    except Exception as e:  # tifffile raises TiffFileError, ValueError, struct errors, ...
        raise InputError(f"{path}: not a readable TIFF file ({type(e).__name__}: {e})") from None
    if not shape or any(s == 0 for s in shape):
        raise InputError(f"{path}: TIFF image of shape {shape} (axes {axes}) is empty")
    if "Y" not in axes or "X" not in axes:
        raise InputError(f"{path}: TIFF series axes {axes!r} lack Y and X")

    warnings: list[str] = []
    if n_series > 1:
        warnings.append(f"{path}: holds {n_series} image series; reading the first only")
    index: list = []
    kept: list[str] = []
    stack_axis = next((a for a in _STACK_AXES if a in axes), None)
    for ax, n in zip(axes, shape):
        if ax in "YX" or ax in _CHANNEL_AXES or ax == stack_axis:
            index.append(slice(None))
            kept.append(ax)
        else:
            index.append(0)
            if n > 1:
                what = "time points" if ax == "T" else f"{ax!r} axis entries"
                warnings.append(f"{path}: {n} {what} (axes {axes}); using the first only")
    # Several channel axes (C and S) are merged into one C axis after the transpose.
    n_channels = int(np.prod([n for ax, n in zip(axes, shape) if ax in _CHANNEL_AXES], dtype=int))
    drop_alpha = False
    if "S" in axes and shape[axes.index("S")] in (2, 4) and "C" not in axes:
        drop_alpha = True  # gray+alpha or RGBA
        n_channels -= 1
    target = [a for a in "CS" if a in kept] + ([stack_axis] if stack_axis else []) + ["Y", "X"]
    order = [kept.index(a) for a in target]
    ny, nx = shape[axes.index("Y")], shape[axes.index("X")]
    nz = shape[axes.index(stack_axis)] if stack_axis else 1
    if {"X", "Y"} - set(sizes):
        warnings.append(f"{path}: no physical pixel size in the TIFF metadata; spacing set to 1 (unitless)")
    spacing = (sizes.get("Z", 1.0), sizes.get("Y", sizes.get("X", 1.0)), sizes.get("X", sizes.get("Y", 1.0)))
    return _Layout(
        path, axes, shape, tuple(index), order, n_channels, drop_alpha, (nz, ny, nx), spacing, warnings
    )


def inspect_tiff(path: str | os.PathLike) -> VolumeInfo:
    """Header-only description of a TIFF stack: ``(Z, Y, X)`` shape, µm spacing, channels."""
    lay = _layout(path)
    for w in lay.warnings:
        log.warning(w)
    return VolumeInfo(
        shape=lay.shape_zyx, spacing=lay.spacing, n_channels=lay.n_channels, modality="microscopy",
        warnings=list(lay.warnings),
    )


def _read_array(lay: _Layout) -> np.ndarray:
    try:
        data = tifffile.imread(lay.path, series=0)
    except Exception as e:
        raise InputError(f"{lay.path}: cannot read the TIFF pixel data ({type(e).__name__}: {e})") from None
    data = np.asarray(data)[lay.index].transpose(lay.order)
    spatial = data.ndim - _n_channel_axes(lay)  # 3 with a stack axis, 2 for a single image
    lead = data.shape[: data.ndim - spatial]
    data = data.reshape((int(np.prod(lead, dtype=int)),) + data.shape[data.ndim - spatial:])
    if spatial == 2:
        data = data[:, None]  # a single 2D image: Z = 1
    if lay.drop_alpha:
        data = data[:-1]
    out = data.astype(np.float32, copy=False)
    return out[0] if out.shape[0] == 1 else out


def _n_channel_axes(lay: _Layout) -> int:
    return sum(1 for ax in lay.axes if ax in _CHANNEL_AXES)


def read_tiff_stack(path: str | os.PathLike, patient_id: str | None = None) -> Volume:
    """Read a microscopy TIFF stack.

    Returns:
        Volume: ``array (Z, Y, X)`` or ``(C, Z, Y, X)`` float32, ``spacing (z, y, x)`` µm,
        ``modality "microscopy"``, ``orientation "ZYX"``, no affine.

    Raises:
        InputError: missing, unreadable, empty or zero-page TIFF (message names the file).
    """
    lay = _layout(path)
    array = np.ascontiguousarray(_read_array(lay))
    for w in lay.warnings:
        log.warning(w)
    return Volume(
        array=array,
        spacing=lay.spacing,
        patient_id=patient_id if patient_id is not None else scan_stem(lay.path),
        modality="microscopy",
        source=str(lay.path),
        orientation="ZYX",
        affine=None,
        warnings=list(lay.warnings),
    )

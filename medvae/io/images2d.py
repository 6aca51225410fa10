"""2D image sets: single images (PNG 8/16-bit, JPEG, BMP, single-page TIFF), IDX files, npz files.

Header-only ``*_info`` functions serve discovery (no pixel decoding); the ``read_*`` functions
return the images in their own dtype, as ``(N, C, H, W)`` arrays (channels first, as the patch
store), with no normalization: that is the data layer's job.

- Single images are read with Pillow (TIFF with tifffile: Pillow reads only some 16-bit TIFFs).
  Palette and grey+alpha images become grey, RGBA becomes RGB (alpha dropped), 16-bit PNGs
  stay uint16.
- IDX (MNIST / Fashion-MNIST, LeCun's format): a 4-byte magic ``0 0 <type> <ndim>``, ``ndim``
  big-endian uint32 sizes, then the values in C order; ``.gz`` files are read through gzip. The
  whole file is one ``np.frombuffer`` (70,000 images in well under a second); a header whose
  sizes do not match the data is an InputError naming the file and both counts.
- npz: MedMNIST's ``{train,val,test}_images`` / ``{...}_labels`` or the Keras-style
  ``x_{train,val,test}`` / ``y_{...}``; shapes are read from the members' ``.npy`` headers
  without loading the arrays.
"""

from __future__ import annotations

import gzip
import os
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medvae.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")  # TIFF is a 2D image only inside an image set
IDX_IMAGES = re.compile(r"(?P<prefix>.*?)[-._]?images?[-.]idx3[-.]ubyte(?P<gz>\.gz)?", re.IGNORECASE)
IDX_LABELS = re.compile(r"(?P<prefix>.*?)[-._]?labels?[-.]idx1[-.]ubyte(?P<gz>\.gz)?", re.IGNORECASE)
NPZ_SPLITS = ("train", "val", "test")
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


@dataclass
class ImageInfo:
    """What a header tells of a 2D image set member: ``n`` images of ``(height, width)``, ``channels``."""

    n: int
    height: int
    width: int
    channels: int
    dtype: str


# --------------------------------------------------------------------------- single images
def _pil_channels(mode: str) -> int:
    return 3 if mode in ("RGB", "RGBA", "CMYK", "YCbCr", "P;RGB", "LAB", "HSV") else 1


def image_info(path: str | os.PathLike) -> ImageInfo:
    """Size, channels and dtype of one image file from its header (Pillow opens lazily)."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if p.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        try:
            with tifffile.TiffFile(p) as tif:
                page = tif.pages[0]
                shape, n_pages = page.shape, len(tif.pages)
                dtype = str(page.dtype)
        except Exception as err:  # noqa: BLE001 -- any unreadable TIFF is the user's file problem
            raise InputError(f"{p}: not a readable TIFF image ({type(err).__name__}: {err})") from None
        if n_pages > 1:
            raise InputError(f"{p}: a TIFF with {n_pages} pages is a stack, not a 2D image; "
                             "put stacks in their own folder (read as microscopy stacks)")
        h, w = shape[:2]
        return ImageInfo(1, int(h), int(w), 3 if len(shape) == 3 and shape[2] in (3, 4) else 1, dtype)
    try:
        with Image.open(p) as im:
            mode, (w, h) = im.mode, im.size
            if mode == "P":
                mode = "RGB" if im.palette and im.palette.mode.startswith("RGB") else "L"
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise InputError(f"{p}: not a readable image ({err})") from None
    dtype = "uint16" if mode.startswith("I;16") or mode == "I" else "float32" if mode == "F" else "uint8"
    return ImageInfo(1, int(h), int(w), _pil_channels(mode), dtype)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """One image as ``(C, H, W)`` in its own dtype (uint8, uint16 or float32); C is 1 or 3.

    Raises:
        InputError: the file is missing, truncated or not an image (the message names it).
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if p.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        try:
            arr = tifffile.imread(p, key=0)
        except Exception as err:  # noqa: BLE001
            raise InputError(f"{p}: not a readable TIFF image ({type(err).__name__}: {err})") from None
    else:
        try:
            with Image.open(p) as im:
                im.load()
                if im.mode == "P":
                    im = im.convert("RGBA" if "transparency" in im.info else "RGB")
                    if not np.ptp(np.asarray(im)[..., :3], axis=-1).any():  # a grey palette
                        im = im.convert("L")
                elif im.mode in ("LA", "1"):
                    im = im.convert("L")
                elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                    im = im.convert("RGB")
                arr = np.asarray(im)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise InputError(f"{p}: not a readable image ({err})") from None
    if arr.dtype == np.int32 or arr.dtype.byteorder == ">":  # Pillow's "I" / "I;16B" modes
        arr = arr.astype(np.uint16 if arr.max(initial=0) < 65536 and arr.min(initial=0) >= 0 else np.float32)
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        return np.ascontiguousarray(arr[..., :3].transpose(2, 0, 1))
    raise InputError(f"{p}: image of shape {arr.shape} is not a 2D grey or RGB image")


def convert_channels(x: np.ndarray, channels: int) -> np.ndarray:
    """``(N, C, H, W)`` grey <-> RGB: grey repeated to 3 channels; RGB to grey by ITU-R 601-2 luma
    (Pillow's ``convert("L")`` weights 0.299, 0.587, 0.114). Any dtype; same array when C matches."""
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 1 and channels == 3:
        return np.repeat(x, 3, axis=1)
    if x.shape[1] == 3 and channels == 1:
        w = np.asarray([0.299, 0.587, 0.114], dtype=np.float32)[None, :, None, None]
        grey = (x.astype(np.float32) * w).sum(axis=1, keepdims=True)
        return np.rint(grey).astype(x.dtype) if np.issubdtype(x.dtype, np.integer) else grey.astype(x.dtype)
    raise ValueError(f"cannot convert {x.shape[1]} channels to {channels}")


# --------------------------------------------------------------------------- IDX
def _open(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _idx_header(raw: bytes, path: Path) -> tuple[np.dtype, tuple[int, ...], int]:
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise InputError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise InputError(f"{path}: IDX header truncated")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.dtype(_IDX_TYPES[raw[2]]), tuple(int(s) for s in shape), 4 + 4 * ndim


def _data_size(p: Path) -> int:
    """Uncompressed size of a file: gzip keeps it (mod 2**32) in its last 4 bytes."""
    if not p.name.lower().endswith(".gz"):
        return p.stat().st_size
    with open(p, "rb") as f:
        f.seek(-4, os.SEEK_END)
        return struct.unpack("<I", f.read(4))[0]


def idx_info(path: str | os.PathLike) -> ImageInfo:
    """Count and image size from an IDX header (reads 16 bytes; gzip decompresses only those).

    The header's count is checked against the file's size (for ``.gz``, the size gzip records),
    so a truncated or mislabelled file is found at discovery, not half-way through prepare.
    """
    p = Path(path)
    try:
        with _open(p) as f:
            raw = f.read(4 + 4 * 4)
        size = _data_size(p)
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise InputError(f"{p}: cannot be read ({err})") from None
    dtype, shape, start = _idx_header(raw, p)
    want = start + int(np.prod(shape)) * dtype.itemsize
    if size % 2**32 != want % 2**32:
        raise InputError(f"{p}: the IDX header says {shape[0]} items of shape {shape[1:]} ({want} bytes) but the "
                         f"file holds {size} bytes; the file is truncated or corrupt")
    if len(shape) == 1:
        return ImageInfo(shape[0], 0, 0, 0, str(dtype))
    if len(shape) != 3:
        raise InputError(f"{p}: IDX array of {len(shape)} dimensions; expected images (N, rows, cols)")
    return ImageInfo(shape[0], shape[1], shape[2], 1, str(dtype))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file as an array: images ``(N, 1, H, W)``, labels ``(N,)``, in the file's dtype.

    Raises:
        InputError: bad magic, or the header's sizes do not match the bytes in the file.
    """
    p = Path(path)
    try:
        with _open(p) as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise InputError(f"{p}: cannot be read ({err})") from None
    dtype, shape, start = _idx_header(raw, p)
    want = int(np.prod(shape)) * dtype.itemsize
    have = len(raw) - start
    if have != want:
        n_fit = have // (int(np.prod(shape[1:])) * dtype.itemsize) if len(shape) > 1 else have // dtype.itemsize
        raise InputError(f"{p}: the IDX header says {shape[0]} items of shape {shape[1:]} ({want} bytes) but the "
                         f"file holds {have} bytes ({n_fit} items); the file is truncated or corrupt")
    arr = np.frombuffer(raw, dtype=dtype, offset=start).reshape(shape)
    arr = arr.astype(dtype.newbyteorder("="), copy=False)
    return arr[:, None] if arr.ndim == 3 else arr


def idx_pairs(names: list[str]) -> list[tuple[str, str | None]]:
    """(images file, labels file or None) for the IDX image files among ``names``, by prefix."""
    labels = {}
    for n in names:
        m = IDX_LABELS.fullmatch(n)
        if m:
            labels[m["prefix"].lower()] = n
    out = []
    for n in sorted(names):
        m = IDX_IMAGES.fullmatch(n)
        if m:
            out.append((n, labels.get(m["prefix"].lower())))
    return out


def idx_split(name: str) -> str:
    """The dataset's own split from an IDX file name: ``train`` | ``test`` (``t10k``) | ``val``, else ``""``."""
    prefix = (IDX_IMAGES.fullmatch(name) or IDX_LABELS.fullmatch(name) or {"prefix": name})["prefix"].lower()
    if "t10k" in prefix or "test" in prefix:
        return "test"
    if "val" in prefix:
        return "val"
    return "train" if "train" in prefix else ""


# --------------------------------------------------------------------------- npz
def _npz_keys(split: str) -> list[tuple[str, str]]:
    return [(f"{split}_images", f"{split}_labels"), (f"x_{split}", f"y_{split}")]


def npz_info(path: str | os.PathLike) -> dict[str, tuple[str, str | None, ImageInfo]]:
    """Per split present: ``(images key, labels key or None, ImageInfo)``, from the .npy headers.

    Raises:
        InputError: not a zip/npz, or none of the expected keys (the message lists what it holds).
    """
    p = Path(path)
    try:
        with zipfile.ZipFile(p) as z:
            shapes = {}
            for name in z.namelist():
                if not name.endswith(".npy"):
                    continue
                with z.open(name) as f:
                    version = np.lib.format.read_magic(f)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    shape, _, dtype = read(f)
                shapes[name[:-4]] = (tuple(shape), str(dtype))
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise InputError(f"{p}: not a readable .npz file ({err})") from None
    out = {}
    for split in NPZ_SPLITS:
        for ik, lk in _npz_keys(split):
            if ik in shapes:
                shape, dtype = shapes[ik]
                if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3, 4)):
                    raise InputError(f"{p}: '{ik}' has shape {shape}; expected (N, H, W) or (N, H, W, 1|3)")
                ch = 1 if len(shape) == 3 or shape[3] == 1 else 3
                out[split] = (ik, lk if lk in shapes else None, ImageInfo(shape[0], shape[1], shape[2], ch, dtype))
                break
    if not out:
        raise InputError(f"{p}: no image arrays; expected train_images/val_images/test_images (MedMNIST) or "
                         f"x_train/x_test (with *_labels / y_*), found keys {sorted(shapes) or 'none'}")
    return out


def read_npz_split(path: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    """``(images (N, C, H, W) in the file's dtype, labels (N,) int64 or None)`` of one split."""
    p = Path(path)
    info = npz_info(p)
    if split not in info:
        raise InputError(f"{p}: no '{split}' images (it holds {sorted(info)})")
    ik, lk, meta = info[split]
    with np.load(p, allow_pickle=False) as z:
        x = z[ik]
        y = z[lk] if lk else None
    x = x[:, None] if x.ndim == 3 else np.ascontiguousarray(x[..., :3].transpose(0, 3, 1, 2))
    if y is not None:
        y = np.asarray(y).reshape(len(y), -1)
        if y.shape[0] != meta.n:
            raise InputError(f"{p}: '{lk}' has {y.shape[0]} labels for {meta.n} images")
        y = y[:, 0].astype(np.int64) if y.shape[1] == 1 else y.argmax(1).astype(np.int64)  # one-hot -> id
    return x, y

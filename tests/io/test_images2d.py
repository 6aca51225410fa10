"""2D image readers: values checked against Pillow / numpy, IDX files written by tests.factories (struct + gzip)."""


import numpy as np
import pytest
import tifffile
from PIL import Image

from medvae.errors import InputError
from medvae.io.images2d import (
    convert_channels,
    idx_info,
    idx_pairs,
    idx_split,
    image_info,
    npz_info,
    read_idx,
    read_image,
    read_npz_split,
)
from tests.factories import write_idx


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_png_8_and_16_bit_grey_and_rgb(tmp_path, rng):
    g8 = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    g16 = rng.integers(0, 65536, (20, 30), dtype=np.uint16)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(g8).save(tmp_path / "g8.png")
    Image.fromarray(g16).save(tmp_path / "g16.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([rgb, np.full((20, 30), 7, np.uint8)])).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_image(tmp_path / "g8.png"), g8[None])
    x16 = read_image(tmp_path / "g16.png")
    assert x16.dtype == np.uint16
    np.testing.assert_array_equal(x16, np.asarray(Image.open(tmp_path / "g16.png")).astype(np.uint16)[None])
    np.testing.assert_array_equal(x16[0], g16)
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.png"), rgb.transpose(2, 0, 1))
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), rgb.transpose(2, 0, 1))  # alpha dropped
    info = image_info(tmp_path / "rgb.png")
    assert (info.height, info.width, info.channels, info.dtype) == (20, 30, 3, "uint8")
    assert image_info(tmp_path / "g16.png").dtype == "uint16"


def test_jpeg_bmp_palette_and_single_page_tiff(tmp_path, rng):
    g = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    Image.fromarray(g).save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(g).save(tmp_path / "a.bmp")
    Image.fromarray(g).convert("P").save(tmp_path / "p.png")
    tifffile.imwrite(tmp_path / "a.tif", (g.astype(np.uint16) * 100))
    np.testing.assert_array_equal(read_image(tmp_path / "a.jpg")[0], np.asarray(Image.open(tmp_path / "a.jpg")))
    np.testing.assert_array_equal(read_image(tmp_path / "a.bmp")[0], g)
    np.testing.assert_array_equal(read_image(tmp_path / "p.png"),
                                  np.asarray(Image.open(tmp_path / "p.png").convert("L"))[None])
    np.testing.assert_array_equal(read_image(tmp_path / "a.tif")[0], g.astype(np.uint16) * 100)
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((5, 8, 8), np.uint8), photometric="minisblack")
    with pytest.raises(InputError, match="stack.tif.*5 pages"):
        image_info(tmp_path / "stack.tif")


def test_corrupt_png_names_the_file(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes((tmp_path / "ok.png").read_bytes()[:30])
    (tmp_path / "junk.png").write_bytes(b"not a png at all")
    for name in ("bad.png", "junk.png"):
        with pytest.raises(InputError, match=name):
            read_image(tmp_path / name)
    with pytest.raises(InputError, match="junk.png"):
        image_info(tmp_path / "junk.png")


@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip_and_names(tmp_path, rng, gz):
    x = rng.integers(0, 256, (50, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, 50, dtype=np.uint8)
    ext = ".gz" if gz else ""
    write_idx(tmp_path / f"train-images-idx3-ubyte{ext}", x, gz)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{ext}", y, gz)
    got = read_idx(tmp_path / f"train-images-idx3-ubyte{ext}")
    assert got.shape == (50, 1, 28, 28) and got.dtype == np.uint8
    np.testing.assert_array_equal(got[:, 0], x)
    np.testing.assert_array_equal(read_idx(tmp_path / f"train-labels-idx1-ubyte{ext}"), y)
    info = idx_info(tmp_path / f"train-images-idx3-ubyte{ext}")
    assert (info.n, info.height, info.width) == (50, 28, 28)
    assert idx_pairs([f"train-labels-idx1-ubyte{ext}", f"train-images-idx3-ubyte{ext}", "t10k-images-idx3-ubyte"]) == [
        ("t10k-images-idx3-ubyte", None), (f"train-images-idx3-ubyte{ext}", f"train-labels-idx1-ubyte{ext}")]
    assert idx_split("t10k-images-idx3-ubyte.gz") == "test" and idx_split("train-images-idx3-ubyte") == "train"


@pytest.mark.parametrize("gz", [True, False])
def test_idx_header_count_not_matching_the_size(tmp_path, rng, gz):
    x = rng.integers(0, 256, (10, 4, 4), dtype=np.uint8)
    path = tmp_path / ("bad-images-idx3-ubyte" + (".gz" if gz else ""))
    write_idx(path, x, gz, count=12)
    with pytest.raises(InputError, match=r"bad-images-idx3-ubyte.*12 items.*truncated or corrupt"):
        idx_info(path)
    with pytest.raises(InputError, match=r"bad-images-idx3-ubyte.*12 items.*\(10 items\)"):
        read_idx(path)


def test_npz_medmnist_and_keras_styles(tmp_path, rng):
    tr, te = rng.integers(0, 256, (6, 28, 28), np.uint8), rng.integers(0, 256, (4, 28, 28, 3), np.uint8)
    np.savez(tmp_path / "pathmnist.npz", train_images=tr, train_labels=np.arange(6)[:, None] % 3,
             test_images=te, test_labels=np.array([[0], [1], [2], [0]]))
    np.savez(tmp_path / "keras.npz", x_train=tr, y_train=np.arange(6) % 2, x_test=tr[:2], y_test=np.array([1, 0]))
    info = npz_info(tmp_path / "pathmnist.npz")
    assert sorted(info) == ["test", "train"] and info["test"][2].channels == 3 and info["train"][2].n == 6
    x, y = read_npz_split(tmp_path / "pathmnist.npz", "test")
    np.testing.assert_array_equal(x, te.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(y, [0, 1, 2, 0])
    x, y = read_npz_split(tmp_path / "keras.npz", "train")
    np.testing.assert_array_equal(x[:, 0], tr)
    np.testing.assert_array_equal(y, np.arange(6) % 2)
    np.savez(tmp_path / "other.npz", a=tr, b=y)
    with pytest.raises(InputError, match=r"other.npz: no image arrays.*found keys \['a', 'b'\]"):
        npz_info(tmp_path / "other.npz")
    (tmp_path / "broken.npz").write_bytes(b"PK not really")
    with pytest.raises(InputError, match="broken.npz"):
        npz_info(tmp_path / "broken.npz")


def test_convert_channels_matches_pillow(rng):
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    grey = convert_channels(rgb.transpose(2, 0, 1)[None], 1)[0, 0]
    want = np.asarray(Image.fromarray(rgb).convert("L")).astype(int)
    assert np.abs(grey.astype(int) - want).max() <= 1  # Pillow rounds in fixed point
    g = rng.random((2, 1, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(convert_channels(g, 3), np.repeat(g, 3, axis=1))

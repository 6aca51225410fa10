"""2D image sets end to end in the data layer: discovery rows, prepare values, classes, loader batches."""


import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from medvae.cli import app
from medvae.config import PrepareConfig
from medvae.data.discover import run_discovery
from medvae.data.loader import PatchBatches
from medvae.data.manifest import read_manifest, write_manifest
from medvae.data.prepare import prepare
from tests.factories import write_idx, write_idx_set


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture
def image_folder(tmp_path):
    """train/ and test/ ImageFolders of 28x28 grey PNGs (classes cat, dog), plus the bad cases."""
    rng = np.random.default_rng(0)
    root = tmp_path / "set"
    imgs = {}
    for split, n in (("train", 4), ("test", 2)):
        for cls in ("cat", "dog"):
            for i in range(n):
                a = rng.integers(0, 256, (28, 28), dtype=np.uint8)
                imgs[f"{split}/{cls}/{i}"] = a
                _png(root / split / cls / f"{i}.png", a)
    big = rng.integers(0, 256, (40, 36), dtype=np.uint8)  # another size: resized, with a warning
    _png(root / "train" / "cat" / "big.png", big)
    rgb = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)  # RGB among grey: converted, with a warning
    _png(root / "train" / "dog" / "rgb.png", rgb)
    (root / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root, imgs, big, rgb


def test_image_folder_discovery_rows(image_folder):
    root, imgs, _, _ = image_folder
    rows = {r.patient_id: r for r in run_discovery(root).rows}
    ok = [r for r in rows.values() if r.ok]
    assert len(ok) == len(imgs) + 2
    r = rows["train/cat/0"]
    assert (r.format, r.modality, r.split, r.class_, r.n_images) == ("image", "image", "train", "cat", 1)
    assert rows["test/dog/1"].split == "test" and rows["test/dog/1"].class_ == "dog"
    assert rows["train/dog/broken"].status == "problem" and "broken.png" in rows["train/dog/broken"].problem
    assert "big.png: 40x36 pixels" in rows["train/cat/big"].problem and rows["train/cat/big"].ok
    assert "rgb.png: RGB in a grey set" in rows["train/dog/rgb"].problem


def test_image_folder_prepare_pads_converts_and_keeps_classes(image_folder, tmp_path):
    root, imgs, big, rgb = image_folder
    manifest = tmp_path / "m.csv"
    write_manifest(run_discovery(root).rows, manifest)
    assert read_manifest(manifest)[0].class_ in ("cat", "dog")
    store = prepare(manifest, tmp_path / "store", PrepareConfig(patch_size=32, dtype="uint16"))
    assert store.patches.shape == (len(imgs) + 2, 1, 32, 32) and store.classes == ["cat", "dog"]
    row = int(np.flatnonzero(store.index["patient_id"] == "train/cat/1")[0])
    x = store.get(row)[0]
    np.testing.assert_allclose(x[2:30, 2:30], imgs["train/cat/1"] / 255.0, atol=1 / 65535)  # centred, x/255
    assert x[:2].max() == 0 and x[:, 30:].max() == 0
    assert store.index["class"][row] == "cat" and store.index["split"][row] == "train"
    # the 40x36 image is resized (auto mode: it does not fit 32²), values from the same resize as volumes
    b = store.get(int(np.flatnonzero(store.index["patient_id"] == "train/cat/big")[0]))[0]
    want = torch.nn.functional.interpolate(torch.from_numpy(big / 255.0).float()[None, None], size=(32, 32),
                                           mode="bilinear", antialias=True, align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(b, want, atol=2e-5)
    # the RGB image is converted to grey with Pillow's weights
    g = store.get(int(np.flatnonzero(store.index["patient_id"] == "train/dog/rgb")[0]))[0, 2:30, 2:30]
    want = (rgb.astype(np.float32) / 255.0) @ np.float32([0.299, 0.587, 0.114])
    np.testing.assert_allclose(g, want, atol=1e-4)
    assert any("broken.png" in p for p in store.meta["problems"])
    assert sorted(store.class_ids(store.select("test")).tolist()) == [0, 0, 1, 1]
    batch = next(iter(PatchBatches(store, split="train", batch_size=4, condition=("class", ("cat", "dog")))))
    assert batch.x.shape == (4, 1, 32, 32) and batch.ids.dtype == torch.int64
    np.testing.assert_array_equal(batch.ids.numpy(), store.class_ids(batch.rows))
    res = CliRunner().invoke(app, ["prepare", str(manifest), "--out", str(tmp_path / "store"), "--patch-size", "32",
                                   "--config", str(_yaml(tmp_path, "dtype: uint16\n"))])
    assert res.exit_code == 0, res.output
    assert "patches per class and split" in res.output and "cat" in res.output


def _yaml(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_labels_csv_with_missing_file_and_subject(tmp_path):
    root = tmp_path / "flat"
    rng = np.random.default_rng(1)
    for i in range(5):
        _png(root / f"im{i}.png", rng.integers(0, 256, (16, 16), dtype=np.uint8))
    (root / "labels.csv").write_text("file,class,subject\n" + "".join(
        f"im{i}.png,{'a' if i % 2 else 'b'},s{i // 2}\n" for i in range(5)) + "gone.png,a,s9\n")
    rows = run_discovery(root).rows
    missing = [r for r in rows if not r.ok]
    assert len(missing) == 1 and "labels.csv line 7 names gone.png, which does not exist" in missing[0].problem
    ok = {r.path.rsplit("/", 1)[1]: r for r in rows if r.ok}
    assert ok["im3.png"].class_ == "a" and ok["im3.png"].patient_id == "s1"
    assert ok["im2.png"].split == ok["im3.png"].split  # one subject, one split
    assert {r.split for r in ok.values()} == {"train", "val", "test"}  # 3 subjects, 3 splits


def test_idx_and_npz_discover_and_prepare_vectorized(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "fashion-mnist"
    root.mkdir()
    xtr, ytr = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8), rng.integers(0, 10, 30, dtype=np.uint8)
    xte, yte = rng.integers(0, 256, (10, 28, 28), dtype=np.uint8), rng.integers(0, 10, 10, dtype=np.uint8)
    write_idx_set(root, "train", xtr, ytr)
    write_idx_set(root, "t10k", xte, yte)
    np.savez(root / "organamnist.npz", train_images=xtr[:6], train_labels=ytr[:6, None], val_images=xtr[6:9],
             val_labels=ytr[6:9, None])
    np.savez(root / "nokeys.npz", images=xtr)
    rows = {r.patient_id: r for r in run_discovery(root).rows}
    assert rows["fashion-mnist-train"].n_images == 30 and rows["fashion-mnist-test"].split == "test"
    assert rows["organamnist-val"].split == "val" and rows["organamnist-val"].n_images == 3
    assert rows["nokeys"].status == "problem" and "nokeys.npz: no image arrays" in rows["nokeys"].problem
    write_manifest(rows.values(), tmp_path / "m.csv")
    store = prepare(tmp_path / "m.csv", tmp_path / "s", PrepareConfig(patch_size=32, mode="resize", dtype="uint16"))
    assert len(store) == 30 + 10 + 6 + 3
    test = store.select("test")
    assert store.index["patient_id"][test][:2].tolist() == ["fashion-mnist-test-0", "fashion-mnist-test-1"]
    want = torch.nn.functional.interpolate(torch.from_numpy(xte / 255.0).float()[:, None], size=(32, 32),
                                           mode="bilinear", antialias=True, align_corners=False).numpy()
    np.testing.assert_allclose(store.get(test), want, atol=2e-5)
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert store.index["class"][test].tolist() == [names[i] for i in yte]
    assert store.index["slice_index"][test].tolist() == list(range(10))
    pad = prepare(tmp_path / "m.csv", tmp_path / "p", PrepareConfig(patch_size=32, mode="pad"))
    np.testing.assert_allclose(pad.get(pad.select("test"))[:, 0, 2:30, 2:30], xte / 255.0, atol=2e-3)  # float16
    counts = pad.class_counts()
    assert counts[("val", str(ytr[6]))] >= 1, counts


def test_idx_bad_header_is_a_problem_row(tmp_path):
    root = tmp_path / "mnist"
    root.mkdir()
    write_idx(root / "train-images-idx3-ubyte", np.zeros((5, 8, 8), np.uint8), count=7)
    rows = run_discovery(root).rows
    assert len(rows) == 1 and rows[0].status == "problem"
    assert "train-images-idx3-ubyte: the IDX header says 7 items" in rows[0].problem


def test_root_labels_csv_covers_split_folders(tmp_path):
    root = tmp_path / "set"
    for split in ("train", "test"):
        for i in range(2):
            _png(root / split / f"{i}.png", np.full((8, 8), 10 * i, np.uint8))
    (root / "labels.csv").write_text("file,class\ntrain/0.png,a\ntrain/1.png,b\ntest/0.png,a\ntest/1.png,b\n"
                                     "test/9.png,b\n")
    rows = run_discovery(root).rows
    ok = {(r.split, r.path.rsplit("/", 1)[1]): r.class_ for r in rows if r.ok}
    assert ok == {("train", "0.png"): "a", ("train", "1.png"): "b", ("test", "0.png"): "a", ("test", "1.png"): "b"}
    bad = [r for r in rows if not r.ok]
    assert len(bad) == 1 and "line 6 names test/9.png, which does not exist" in bad[0].problem

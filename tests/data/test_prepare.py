"""prepare / merge / CLI on a small phantom cohort (128x128 CT, 20 slices) and hand-built NIfTIs."""

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from medvae.cli import app
from medvae.config import PrepareConfig
from medvae.data import store as store_module
from medvae.data.manifest import ManifestRow, write_manifest
from medvae.data.prepare import merge_stores, prepare
from medvae.data.store import open_store
from medvae.errors import StoreError
from medvae.io import load_volume
from tests.factories import phantom_cohort

TILE = PrepareConfig(patch_size=128, mode="tile", foreground_threshold=0.05)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    s = phantom_cohort(root, ct_patients=3, microscopy_stacks=1, seed=0, ct_size=128, ct_slices=12)
    splits = ["train", "val", "test"]
    rows = [ManifestRow(c["patient_id"], "ct", "dicom", c["series"], c["label"], split=splits[i])
            for i, c in enumerate(s["ct"])]
    rows += [ManifestRow("stack_001", "microscopy", "tiff", s["microscopy"][0]["path"], split="train")]
    rows += [ManifestRow("PANCREAS_0025", status="problem", problem="empty patient folder")]
    manifest = write_manifest(rows, root / "manifest.csv")
    return root, manifest, s


def test_prepare_tile_contents_labels_and_physical(cohort, tmp_path):
    root, manifest, s = cohort
    store = prepare(manifest, tmp_path / "store", TILE)
    assert isinstance(store.patches, np.memmap) and store.patches.dtype == np.float16
    assert len(store.index["patient_id"]) == len(store) == store.meta["n_patches"] > 0
    assert store.modalities == ["ct", "microscopy"] and store.labels is not None
    assert any("PANCREAS_0025" in p for p in store.meta["problems"])
    lo, hi = TILE.ct_window
    ct = s["ct"][0]
    vol, lab = load_volume(ct["series"]), load_volume(ct["label"]).array
    rows = np.flatnonzero(store.index["patient_id"] == ct["patient_id"])
    assert len(rows) == 12  # 128x128 slices: one tile each, all with body
    for r in rows:
        z, y, x = store.index["slice_index"][r], store.index["y"][r], store.index["x"][r]
        hu = vol.array[z, y : y + 128, x : x + 128]
        np.testing.assert_allclose(store.patches[r, 0], (np.clip(hu, lo, hi) - lo) / (hi - lo), atol=1e-3)
        np.testing.assert_array_equal(store.labels[r, 0], lab[z, y : y + 128, x : x + 128])
        frac = (hu > TILE.ct_body_hu).mean()
        assert store.index["foreground_fraction"][r] == pytest.approx(frac, abs=1e-5)
        inside = (hu > lo) & (hu < hi)
        np.testing.assert_allclose(store.to_physical(store.patches[r, 0], "ct")[inside], hu[inside],
                                   atol=(hi - lo) * 2**-11)
    assert store.spacing("ct") == pytest.approx(np.median([c["spacing"][1] for c in s["ct"]]) * np.ones(2))
    assert store.meta["normalization"]["ct"] == {"low": lo, "high": hi, "unit": "HU"}
    # microscopy: per-stack percentiles, inverted by to_physical with that stack's constants
    m = load_volume(s["microscopy"][0]["path"]).array
    p1, p2 = np.percentile(m, TILE.microscopy_percentiles)
    mrows = store.select(modality="microscopy")
    assert set(store.index["split"][mrows]) == {"train"}
    r = mrows[0]
    z, y, x = store.index["slice_index"][r], store.index["y"][r], store.index["x"][r]
    src = m[z, y : y + 128, x : x + 128]
    np.testing.assert_allclose(store.patches[r, 0], np.clip((src - p1) / (p2 - p1), 0, 1), atol=1e-3)
    phys = store.to_physical(store.patches[r, 0], "microscopy", patient_id="stack_001")
    inside = (src > p1) & (src < p2)
    np.testing.assert_allclose(phys[inside], src[inside], atol=(p2 - p1) * 2**-11 + 1e-3)


def test_reuse_when_unchanged_rebuild_on_config_change(cohort, tmp_path, caplog):
    root, manifest, _ = cohort
    cfg = PrepareConfig(patch_size=128, mode="resize", dtype="uint16")
    first = prepare(manifest, tmp_path / "s", cfg)
    mtime = (tmp_path / "s" / "patches.npy").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="medvae.data.prepare"):
        again = prepare(manifest, tmp_path / "s", cfg.model_copy(update={"workers": 3}))
    assert "up to date" in caplog.text
    assert (tmp_path / "s" / "patches.npy").stat().st_mtime_ns == mtime and again.content_hash == first.content_hash
    changed = prepare(manifest, tmp_path / "s", cfg.model_copy(update={"ct_window": (-1000.0, 1000.0)}))
    assert changed.content_hash != first.content_hash
    assert (tmp_path / "s" / "patches.npy").stat().st_mtime_ns != mtime
    assert changed.meta["normalization"]["ct"]["low"] == -1000.0 and changed.patches.dtype == np.uint16


def test_crash_before_store_json_leaves_incomplete_store(cohort, tmp_path, monkeypatch):
    root, manifest, _ = cohort

    def crash(path, obj):
        raise RuntimeError("killed")

    monkeypatch.setattr(store_module, "write_json", crash)
    with pytest.raises(RuntimeError):
        prepare(manifest, tmp_path / "s", TILE)
    assert (tmp_path / "s" / "patches.npy").exists() and not (tmp_path / "s" / "store.json").exists()
    with pytest.raises(StoreError, match="incomplete"):
        open_store(tmp_path / "s")
    assert not list((tmp_path / "s").glob(".prepare-*"))  # chunks cleaned up


def test_shards_merge_to_single_prepare(cohort, tmp_path):
    root, manifest, _ = cohort
    single = prepare(manifest, tmp_path / "single", TILE)
    parts = [prepare(manifest, tmp_path / f"part{i}", TILE, shard=f"{i}/2") for i in (1, 2)]
    assert 0 < len(parts[0]) < len(single) and len(parts[0]) + len(parts[1]) == len(single)
    merged = merge_stores([p.path for p in parts], tmp_path / "merged")
    np.testing.assert_array_equal(np.asarray(merged.patches), np.asarray(single.patches))
    np.testing.assert_array_equal(np.asarray(merged.labels), np.asarray(single.labels))
    for col in single.index:
        np.testing.assert_array_equal(merged.index[col], single.index[col])
    assert merged.content_hash == single.content_hash
    with pytest.raises(StoreError, match="overlap"):
        merge_stores([parts[0].path, parts[0].path], tmp_path / "bad")


def test_corrupt_volume_reported_rest_processed(cohort, tmp_path, caplog):
    root, _, s = cohort
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    rows = [ManifestRow("BROKEN", "ct", "nifti", str(bad), split="train"),
            ManifestRow(s["ct"][1]["patient_id"], "ct", "dicom", s["ct"][1]["series"], split="val")]
    manifest = write_manifest(rows, tmp_path / "m.csv")
    with caplog.at_level(logging.ERROR, logger="medvae.data.prepare"):
        store = prepare(manifest, tmp_path / "s", TILE.model_copy(update={"workers": 2}))
    assert "broken.nii.gz" in caplog.text and any("broken.nii.gz" in p for p in store.meta["problems"])
    assert store.patients() == [s["ct"][1]["patient_id"]] and store.labels is None
    # nothing usable -> exit code 2 with the reason
    only_bad = write_manifest(rows[:1], tmp_path / "bad.csv")
    res = CliRunner().invoke(app, ["prepare", str(only_bad), "--out", str(tmp_path / "s2"), "--mode", "tile"])
    assert res.exit_code == 2 and "broken.nii.gz" in res.output


def test_planted_voxel_label_aligned_across_orientations(tmp_path):
    # image stored in LPS-ish voxel order, label stored with x and z flipped (RAS-ish): same world grid
    shape = (160, 140, 6)  # (i, j, k)
    img = np.full(shape, -1000.0, dtype=np.float32)
    img[20:150, 10:130, :] = 40.0  # body
    img[100:104, 30:34, 4] = 1000.0  # a bright block on slice k=4
    aff = np.diag([-0.8, -0.8, 2.0, 1.0])
    aff[:3, 3] = [60.0, 50.0, -10.0]
    nib.save(nib.Nifti1Image(img, aff), tmp_path / "img.nii.gz")
    lab = np.zeros(shape, dtype=np.uint8)
    lab[100:104, 30:34, 4] = 1
    flip = np.eye(4)
    flip[0, 0], flip[0, 3], flip[2, 2], flip[2, 3] = -1, shape[0] - 1, -1, shape[2] - 1
    nib.save(nib.Nifti1Image(lab[::-1, :, ::-1].copy(), aff @ flip), tmp_path / "lab.nii.gz")
    manifest = write_manifest([ManifestRow("P1", "ct", "nifti", "img.nii.gz", "lab.nii.gz", split="train")],
                              tmp_path / "m.csv")  # relative paths: resolved against the manifest's folder
    for mode in ("tile", "resize"):
        store = prepare(manifest, tmp_path / mode, PrepareConfig(mode=mode, stride=32, foreground_threshold=0.0))
        hot = np.flatnonzero(np.asarray(store.labels).reshape(len(store), -1).max(1))
        assert len(hot) >= 1 and set(store.index["slice_index"][hot]) == {4}
        for r in hot:
            bright = store.get(int(r))[0] > 0.5
            labelled = np.asarray(store.labels[r, 0]) == 1
            if mode == "tile":  # native resolution: the same pixels
                np.testing.assert_array_equal(labelled, bright)
            else:  # resized: the same place, within a pixel
                np.testing.assert_allclose(np.argwhere(labelled).mean(0), np.argwhere(bright).mean(0), atol=1.0)


@pytest.fixture(scope="module")
def long_series(tmp_path_factory):
    """Three CT series of 70 slices (three slice items each) with labels: more items than workers."""
    root = tmp_path_factory.mktemp("long")
    s = phantom_cohort(root, ct_patients=3, microscopy_stacks=0, seed=1, ct_size=64, ct_slices=70)
    rows = [ManifestRow(c["patient_id"], "ct", "dicom", c["series"], c["label"], split="train") for c in s["ct"]]
    return write_manifest(rows, root / "manifest.csv"), s


@pytest.mark.parametrize("cfg", [PrepareConfig(patch_size=32, mode="resize", foreground_threshold=0.05),
                                 PrepareConfig(patch_size=32, mode="tile", stride=16, slice_step=3,
                                               dtype="uint16")], ids=["resize", "tile-step3"])
def test_slice_items_give_the_whole_volume_store_with_any_workers(long_series, tmp_path, cfg):
    """Series split into slice ranges: 1 and 2 workers write the same bytes, and each volume's patches equal
    the whole-volume path (load_normalized + extract_patches on the full series: the reference)."""
    from medvae.data.normalize import load_normalized
    from medvae.data.patches import extract_patches
    from medvae.data.prepare_work import CHUNK_SLICES
    from medvae.data.store import to_stored

    manifest, s = long_series
    assert 70 > 2 * CHUNK_SLICES  # several items per series
    one = prepare(manifest, tmp_path / "w1", cfg.model_copy(update={"workers": 1}))
    two = prepare(manifest, tmp_path / "w2", cfg.model_copy(update={"workers": 2}))
    for name in ("patches.npy", "labels.npy", "index.csv"):
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name
    assert one.content_hash == two.content_hash
    assert [v["first_row"] for v in one.meta["volumes"]] == [v["first_row"] for v in two.meta["volumes"]]
    for c in s["ct"]:
        d = load_normalized(c["series"], "ct", cfg, c["label"])
        p = extract_patches(d["image"], d["foreground"], cfg, tuple(d["spacing"][1:]), d["label"])
        rows = np.flatnonzero(one.index["patient_id"] == c["patient_id"])
        assert len(rows) == len(p) > 0
        np.testing.assert_array_equal(np.asarray(one.patches[rows]), to_stored(p.images, cfg.dtype))
        np.testing.assert_array_equal(np.asarray(one.labels[rows]), p.labels)
        for col in ("slice_index", "y", "x"):
            np.testing.assert_array_equal(one.index[col][rows], getattr(p, col))
        np.testing.assert_allclose(one.index["foreground_fraction"][rows], p.foreground_fraction, atol=1e-4)  # csv
        vol = next(v for v in one.meta["volumes"] if v["patient_id"] == c["patient_id"])
        assert vol["n_slices"] == 70 and vol["spacing"] == pytest.approx(list(p.spacing))


def test_slice_item_that_cannot_decode_falls_back_to_the_whole_read(long_series, tmp_path, monkeypatch, caplog):
    """A file unreadable when its range is decoded: the series is prepared whole, which skips that file and
    names it (read_dicom_series' contract); the other series are untouched."""
    from medvae.io import dicom_pixels

    manifest, s = long_series
    rows = [ManifestRow(c["patient_id"], "ct", "dicom", c["series"], split="train") for c in s["ct"]]  # no labels
    manifest = write_manifest(rows, tmp_path / "m.csv")
    cfg = PrepareConfig(patch_size=32, mode="resize", foreground_threshold=0.0, workers=1)
    ref = prepare(manifest, tmp_path / "ref", cfg)
    victim = sorted(Path(s["ct"][1]["series"]).iterdir())[5]
    backup = victim.read_bytes()
    real_read_z = dicom_pixels.SliceReader.read_z

    def read_z(self, z0, z1):  # the file breaks between planning and decoding
        if str(victim) in self.paths:
            victim.write_bytes(backup[:150])
        return real_read_z(self, z0, z1)

    monkeypatch.setattr(dicom_pixels.SliceReader, "read_z", read_z)
    try:
        with caplog.at_level(logging.WARNING):
            store = prepare(manifest, tmp_path / "s", cfg)
    finally:
        victim.write_bytes(backup)  # the cohort is shared by the module's tests
    assert victim.name in caplog.text  # skipped and named by the whole-series read
    p1 = s["ct"][1]["patient_id"]
    assert (store.index["patient_id"] == p1).sum() == (ref.index["patient_id"] == p1).sum() - 1
    for c in (s["ct"][0], s["ct"][2]):
        a = np.flatnonzero(store.index["patient_id"] == c["patient_id"])
        b = np.flatnonzero(ref.index["patient_id"] == c["patient_id"])
        np.testing.assert_array_equal(np.asarray(store.patches[a]), np.asarray(ref.patches[b]))

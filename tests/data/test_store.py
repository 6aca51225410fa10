import json

import numpy as np
import pytest

from medvae.data.store import (
    FORMAT_VERSION,
    even_positions,
    open_store,
    read_rows,
    write_derived_store,
    write_store,
    write_store_json,
)
from medvae.errors import StoreError
from tests.factories import row_store


def test_round_trip_memmap(tmp_path):
    store, x = row_store(tmp_path / "s", n=12, c=2, labels=True)
    again = open_store(tmp_path / "s")
    assert isinstance(again.patches, np.memmap) and again.patches.shape == (12, 2, 8, 8)
    np.testing.assert_array_equal(np.asarray(again.patches), x.astype(np.float16))
    np.testing.assert_allclose(again.get([3, 1]), x[[3, 1]], atol=1e-3)
    assert len(again.index["patient_id"]) == 12 and again.index["slice_index"][5] == 5
    assert again.meta["n_patches"] == 12 and again.content_hash == store.content_hash
    assert again.modalities == ["ct", "microscopy"]
    assert again.patients("val") == sorted({f"P{i % 5}" for i in range(12) if i % 3 == 1})


def test_uint16_get_scaled(tmp_path):
    store, x = row_store(tmp_path / "s", n=6, dtype="uint16")
    assert store.patches.dtype == np.uint16
    np.testing.assert_allclose(store.get(slice(None)), x, atol=1 / 65535)


def test_incomplete_store_refused(tmp_path):
    row_store(tmp_path / "s")
    (tmp_path / "s" / "store.json").unlink()  # as if prepare crashed before writing it
    with pytest.raises(StoreError, match="incomplete"):
        open_store(tmp_path / "s")
    with pytest.raises(StoreError, match="no patch store"):
        open_store(tmp_path / "missing")


def test_size_mismatch_refused(tmp_path):
    row_store(tmp_path / "s", n=10)
    meta = json.loads((tmp_path / "s" / "store.json").read_text())
    meta["n_patches"] = 11
    (tmp_path / "s" / "store.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="11 patches"):
        open_store(tmp_path / "s")


def test_to_physical_inverts_ct_window(tmp_path):
    store, _ = row_store(tmp_path / "s", n=3)
    meta = json.loads((tmp_path / "s" / "store.json").read_text())
    meta["normalization"]["ct"] = {"low": -160.0, "high": 240.0, "unit": "HU"}
    (tmp_path / "s" / "store.json").write_text(json.dumps(meta))
    store = open_store(tmp_path / "s")
    hu = np.array([-160.0, -100.0, 0.0, 40.0, 240.0])
    x01 = np.asarray((hu + 160) / 400, dtype=np.float16)
    np.testing.assert_allclose(store.to_physical(x01, "ct"), hu, atol=400 * 2**-11)


def test_read_rows_returns_rows_in_the_order_asked(tmp_path):
    store, x = row_store(tmp_path / "s", n=20)
    rows = np.array([17, 3, 3, 0, 12])
    np.testing.assert_array_equal(read_rows(store.patches, rows), np.asarray(store.patches)[rows])
    np.testing.assert_array_equal(store.get(rows), x[rows].astype(np.float16).astype(np.float32))


def test_one_store_json_writer(tmp_path):
    """write_store fills the same store.json keys prepare writes (both go through write_store_json),
    keeps extra keys, and refuses a store.json without its required keys."""
    row_store(tmp_path / "s", n=4)
    meta = json.loads((tmp_path / "s" / "store.json").read_text())
    assert set(meta) == {"format_version", "config", "content_hash", "n_patches", "patch_size", "channels",
                         "dtype", "normalization", "spacing", "volumes", "shard", "problems", "created", "classes"}
    assert meta["format_version"] == FORMAT_VERSION and meta["n_patches"] == 4 and meta["problems"] == []
    with pytest.raises(ValueError, match="n_patches"):
        write_store_json(tmp_path / "t", {"content_hash": "x", "patch_size": 8, "channels": 1, "dtype": "float16"})


@pytest.mark.parametrize("n,k", [(0, 5), (1, 3), (5, 5), (5, 9), (6, 3), (10, 1), (10, 4), (2000, 8), (1001, 1000)])
def test_even_positions(n, k):
    got = even_positions(n, k)
    m = min(k, n)
    # by definition: round(i (n - 1) / (m - 1)) for i < m (halves to even), no position twice
    want = sorted({round(i * (n - 1) / (m - 1)) for i in range(m)}) if m > 1 else [0] * m
    assert got.dtype == np.int64 and got.tolist() == want
    assert len(got) == m and (m < 2 or (got[0] == 0 and got[-1] == n - 1))
    assert even_positions(10, 4).tolist() == [0, 3, 6, 9] and even_positions(6, 3).tolist() == [0, 2, 5]
    assert even_positions(3, 0).tolist() == []


@pytest.mark.parametrize("dtype", ["float16", "uint16"])
def test_derived_store_keeps_rows_meta_classes_and_labels(tmp_path, dtype, caplog):
    _, x = row_store(tmp_path / "s0", n=9, dtype=dtype, labels=True)
    src0 = open_store(tmp_path / "s0")
    index = {**src0.index, "class": np.array(["b", "a", ""] * 3, dtype=object), "has_label": [1, 0, 1] * 3}
    meta = {"dtype": dtype, "classes": ["b", "a"], "normalization": {"ct": {"low": -1.0, "high": 1.0, "unit": "HU"}},
            "spacing": {"ct": [0.5, 0.5]}, "config": {"patch_size": 8}, "volumes": [{"patient_id": "P0"}]}
    src = write_store(tmp_path / "src", x, index, meta, labels=np.asarray(src0.labels))
    rows = np.array([7, 2, 4])
    added = np.full((2, 1, 8, 8), 0.25, np.float32)
    masks = np.ones((2, 1, 8, 8), np.uint8)
    out = write_derived_store(tmp_path / "d", src, rows, columns={"split": "train", "row": rows},
                              added=added, added_columns={"modality": "ct", "class": ["c", "a"]},
                              added_labels=masks, meta={"derived": True})
    assert {k: out.meta[k] for k in ("normalization", "spacing", "config", "volumes", "dtype", "derived")} == \
        {**{k: meta[k] for k in ("normalization", "spacing", "config", "volumes", "dtype")}, "derived": True}
    assert out.classes == ["b", "a", "c"]  # the source's ids kept, the new name after them
    np.testing.assert_array_equal(out.class_ids(), [*src.class_ids(rows), 2, 1])
    np.testing.assert_array_equal(np.asarray(out.patches[:3]), np.asarray(src.patches)[rows])  # as stored
    np.testing.assert_allclose(out.get([3, 4]), added, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(out.labels), np.concatenate([np.asarray(src.labels)[rows], masks]))
    assert out.index["has_label"].tolist() == [0, 1, 0, 1, 1] and out.index["row"].tolist()[:3] == ["7", "2", "4"]
    assert out.index["split"].tolist() == ["train"] * 5 and out.index["patient_id"].tolist()[3:] == ["synthetic"] * 2
    assert out.index["slice_index"].tolist() == [7, 2, 4, -1, -1]
    # added patches without label maps: the store cannot say which pixels are labelled -> no labels, a warning
    out = write_derived_store(tmp_path / "e", src, rows, added=added, added_columns={"modality": "ct"})
    assert out.labels is None and (out.index["has_label"] == 0).all() and "without labels" in caplog.text
    assert out.index["class"].tolist() == ["a", "", "a", "", ""] and out.classes == ["b", "a"]
    with pytest.raises(ValueError, match="modality"):
        write_derived_store(tmp_path / "f", src, [], added=added)

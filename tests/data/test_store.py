import json

import numpy as np
import pytest

from medvae.data.store import open_store
from medvae.errors import StoreError
from tests.data.test_loader import small_store


def test_round_trip_memmap(tmp_path):
    store, x = small_store(tmp_path / "s", n=12, c=2, labels=True)
    again = open_store(tmp_path / "s")
    assert isinstance(again.patches, np.memmap) and again.patches.shape == (12, 2, 8, 8)
    np.testing.assert_array_equal(np.asarray(again.patches), x.astype(np.float16))
    np.testing.assert_allclose(again.get([3, 1]), x[[3, 1]], atol=1e-3)
    assert len(again.index["patient_id"]) == 12 and again.index["slice_index"][5] == 5
    assert again.meta["n_patches"] == 12 and again.content_hash == store.content_hash
    assert again.modalities == ["ct", "microscopy"]
    assert again.patients("val") == sorted({f"P{i % 5}" for i in range(12) if i % 3 == 1})


def test_uint16_get_scaled(tmp_path):
    store, x = small_store(tmp_path / "s", n=6, dtype="uint16")
    assert store.patches.dtype == np.uint16
    np.testing.assert_allclose(store.get(slice(None)), x, atol=1 / 65535)


def test_incomplete_store_refused(tmp_path):
    small_store(tmp_path / "s")
    (tmp_path / "s" / "store.json").unlink()  # as if prepare crashed before writing it
    with pytest.raises(StoreError, match="incomplete"):
        open_store(tmp_path / "s")
    with pytest.raises(StoreError, match="no patch store"):
        open_store(tmp_path / "missing")


def test_size_mismatch_refused(tmp_path):
    small_store(tmp_path / "s", n=10)
    meta = json.loads((tmp_path / "s" / "store.json").read_text())
    meta["n_patches"] = 11
    (tmp_path / "s" / "store.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="11 patches"):
        open_store(tmp_path / "s")


def test_to_physical_inverts_ct_window(tmp_path):
    store, _ = small_store(tmp_path / "s", n=3)
    meta = json.loads((tmp_path / "s" / "store.json").read_text())
    meta["normalization"]["ct"] = {"low": -160.0, "high": 240.0, "unit": "HU"}
    (tmp_path / "s" / "store.json").write_text(json.dumps(meta))
    store = open_store(tmp_path / "s")
    hu = np.array([-160.0, -100.0, 0.0, 40.0, 240.0])
    x01 = np.asarray((hu + 160) / 400, dtype=np.float16)
    np.testing.assert_allclose(store.to_physical(x01, "ct"), hu, atol=400 * 2**-11)

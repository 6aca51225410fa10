import hashlib
import json

import pytest

from medvae.files import atomic_open, sha256_file, write_json


def test_atomic_open_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_open(path) as f:
        f.write("half of the new")
        raise RuntimeError("crash mid-write")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # no temp file left behind


def test_write_json_and_hash(tmp_path):
    path = tmp_path / "x.json"
    write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_atomic_files_get_umask_permissions_not_0600(tmp_path):
    import os

    umask = os.umask(0)
    os.umask(umask)
    path = tmp_path / "shared.txt"
    with atomic_open(path) as f:
        f.write("x")
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask

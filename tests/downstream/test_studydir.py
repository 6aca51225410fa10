"""StudyDir: the one owner of a utility study's layout."""

import json

import pytest

from medvae.downstream.studydir import StudyDir
from medvae.errors import InputError


def test_layout_and_summary(tmp_path):
    study = StudyDir(tmp_path / "study")
    cell = study.cell("10pc", 2)
    assert cell.path == tmp_path / "study" / "cells" / "10pc_s2"
    assert cell.result("real+synthetic") == cell.path / "real+synthetic.json"
    with pytest.raises(InputError, match="no utility.json"):
        study.summary()
    study.path.mkdir()
    study.json.write_text(json.dumps({"arms": {}}))
    assert study.summary() == {"arms": {}}

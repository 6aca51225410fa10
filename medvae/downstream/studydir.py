"""A utility study's directory: the one owner of its layout.

    DIR/study.json                 the settings the results depend on (a re-run with others is refused)
    DIR/utility.csv, utility.json, utility.png, report.html   the outputs
    DIR/unlabelled_store/          every train image without labels (``unlabelled: all``)
    DIR/generator/                 the study's one generator run (``unlabelled: all``)
    DIR/cells/<budget>_s<seed>/    one cell: ``real_store/``, ``synthetic_store/``, ``generator/`` (a cell's
                                   own generator run), ``<arm>.json`` per finished arm and ``<arm>.pt``, its
                                   network as TorchScript (studies made before have none)

The study (:mod:`medvae.downstream.study`), ``medvae utility``, the pipeline and ``medvae evaluate
--utility`` find these paths here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from medvae.errors import InputError


class CellDir:
    """One (budget, seed) cell of a study."""

    def __init__(self, path: Path):
        self.path = path
        self.real_store = path / "real_store"
        self.synthetic_store = path / "synthetic_store"
        self.generator = path / "generator"
        self.m2 = path / "m2"  # the cell's M2 model (medvae.downstream.m2): the m2 arm and synthesis m2

    def result(self, arm: str) -> Path:
        """Where the arm's result is written once it is finished."""
        return self.path / f"{arm}.json"

    def network(self, arm: str) -> Path:
        """Where the arm's trained network is saved (TorchScript, :mod:`medvae.downstream.export`)."""
        return self.path / f"{arm}.pt"


class StudyDir:
    """The study directory ``path``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.settings = self.path / "study.json"
        self.csv = self.path / "utility.csv"
        self.json = self.path / "utility.json"
        self.png = self.path / "utility.png"
        self.report = self.path / "report.html"
        self.unlabelled_store = self.path / "unlabelled_store"
        self.generator = self.path / "generator"

    def cell(self, budget: str, seed: int) -> CellDir:
        """The cell of label budget ``budget`` (its key: ``0.05``, ``10pc``) and seed ``seed``."""
        return CellDir(self.path / "cells" / f"{budget}_s{seed}")

    def summary(self) -> dict:
        """The finished study's utility.json.

        Raises:
            InputError: the directory holds no finished study.
        """
        if not self.json.is_file():
            raise InputError(f"{self.path}: no utility.json; run `medvae utility` into it first")
        return json.loads(self.json.read_text(encoding="utf-8"))

"""A training run's directory: the one reader and writer of its files.

    RUN/config.yaml          the resolved TrainStageConfig (model in_channels / image_size from the store)
    RUN/run.json             {"store", "store_hash", "model", "task", "status": "running"|"done", "step",
                              "total_steps", "world_size", "device"}
    RUN/train_log.jsonl      one JSON object per logged step
    RUN/checkpoints/         last.pt, best.pt, step_00001000.pt (medvae.training.checkpoint)
    RUN/priors/              fitted sampling priors per checkpoint (medvae.synthesis.prior)

Generation, denoising, evaluation and the utility study open runs through :class:`RunDir`, so the
layout is known in one place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from medvae.config import TrainStageConfig, parse_config
from medvae.data.store import PatchStore, open_store
from medvae.errors import InputError
from medvae.files import write_json, write_text
from medvae.training.checkpoint import resolve_checkpoint


class RunDir:
    """The run directory ``path`` (given as the run or as one of its checkpoint files)."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        self.path = path.parent.parent if path.is_file() and path.suffix == ".pt" else path

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def log_path(self) -> Path:
        return self.path / "train_log.jsonl"

    @property
    def priors(self) -> Path:
        return self.path / "priors"

    def checkpoint(self, which: str = "best") -> Path:
        """``best`` | ``last`` | ``step_N`` | a path (:func:`medvae.training.checkpoint.resolve_checkpoint`)."""
        return resolve_checkpoint(self.path, which)

    # ------------------------------------------------------------------ run.json
    def info(self) -> dict:
        """run.json, or {} before training has written it."""
        path = self.path / "run.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def write_info(self, info: dict) -> None:
        write_json(self.path / "run.json", info)

    @property
    def done(self) -> bool:
        return self.info().get("status") == "done"

    def store(self) -> PatchStore:
        """The patch store the run trained on (named in run.json)."""
        store = self.info().get("store")
        if not store:
            raise InputError(f"{self.path}: no run.json naming the training store; give the --out of `medvae train`")
        return open_store(store)

    # ------------------------------------------------------------------ config.yaml
    def config(self) -> TrainStageConfig:
        """The resolved training config the run was trained with."""
        path = self.path / "config.yaml"
        if not path.is_file():
            raise InputError(f"{self.path}: no config.yaml; give the --out of `medvae train`")
        return parse_config(yaml.safe_load(path.read_text(encoding="utf-8")), TrainStageConfig, str(path))

    def write_config(self, cfg: TrainStageConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_text(self.path / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))

    @property
    def task(self) -> str:
        """``reconstruct`` | ``denoise`` (from run.json; config.yaml for runs written before it said)."""
        info = self.info()
        if "task" in info:
            return info["task"]
        return self.config().task if (self.path / "config.yaml").is_file() else "reconstruct"

"""A training run's directory: the one owner of its layout, and the reader and writer of run.json and
config.yaml.

    RUN/config.yaml          the resolved TrainStageConfig (model in_channels / image_size from the store)
    RUN/run.json             {"store", "store_hash", "model", "task", "status": "running"|"done", "step",
                              "total_steps", "world_size", "device", "precision": "bf16"|"fp16"|"fp32"};
                             "store" is the training store's path; "precision" what train.amp resolved to
                             (absent in runs written before it was recorded)
    RUN/train_log.jsonl      one JSON object per logged step
    RUN/checkpoints/         last.pt, best.pt, step_00001000.pt (the file format: medvae.training.checkpoint)
    RUN/priors/              <checkpoint stem>-<sha256[:12]>.pt: fitted sampling priors (medvae.synthesis.prior)
    RUN/pool_codes-<sha256[:12]>.npz   a generator's codes of the utility study's unlabelled pool
                             (medvae.downstream.synthetic_sets)

Training, generation, denoising, evaluation, the pipeline and the utility study find these paths
here and nowhere else, so the layout is known in one place. The caches are keyed by the content
of the checkpoint they belong to, so best.pt and last.pt each get their own, and a checkpoint that
changed (training went on) is computed again.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import yaml

from medvae.config import TrainStageConfig, parse_config
from medvae.data.store import PatchStore, open_store
from medvae.errors import CheckpointError, InputError
from medvae.files import sha256_file, write_json, write_text

log = logging.getLogger(__name__)


class RunDir:
    """The run directory ``path`` (given as the run or as one of its checkpoint files)."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        self.path = path.parent.parent if path.is_file() and path.suffix == ".pt" else path

    # ------------------------------------------------------------------ paths
    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def log_path(self) -> Path:
        return self.path / "train_log.jsonl"

    @property
    def priors(self) -> Path:
        return self.path / "priors"

    @property
    def info_path(self) -> Path:
        return self.path / "run.json"

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    def checkpoint_path(self, name: str | int) -> Path:
        """Where checkpoint ``name`` is written: ``last`` | ``best`` -> ``last.pt`` | ``best.pt``, a step
        (int) -> its periodic ``step_00001000.pt``."""
        return self.checkpoints / (f"step_{name:08d}.pt" if isinstance(name, int) else f"{name}.pt")

    def prior_path(self, checkpoint: str | os.PathLike) -> Path:
        """The sampling prior of ``checkpoint`` (one of this run's): ``priors/<stem>-<sha256[:12]>.pt``."""
        checkpoint = Path(checkpoint)
        return self.priors / f"{checkpoint.stem}-{sha256_file(checkpoint)[:12]}.pt"

    def pool_codes_path(self, checkpoint: str | os.PathLike) -> Path:
        """The utility study's cache of ``checkpoint``'s pool codes: ``pool_codes-<sha256[:12]>.npz``."""
        return self.path / f"pool_codes-{sha256_file(checkpoint)[:12]}.npz"

    def checkpoint(self, which: str = "best") -> Path:
        """Find a checkpoint of the run.

        Args:
            which: ``"best"``, ``"last"``, a ``"step_00001000"``-like name, or a path (absolute, relative
                to the working directory, or relative to ``RUN/checkpoints``). ``"best"`` falls back to
                ``last.pt`` (with a warning) when no validation has kept a best checkpoint yet.

        Raises:
            CheckpointError: nothing matching exists; the message names what was looked for.
        """
        ckdir = self.checkpoints
        if which in ("best", "last"):
            path = self.checkpoint_path(which)
            if path.is_file():
                return path
            last = self.checkpoint_path("last")
            if which == "best" and last.is_file():
                log.warning("%s has no best.pt; using last.pt", ckdir)
                return last
            if not self.path.is_dir():
                raise CheckpointError(f"{self.path}: run directory not found; give the --out of `medvae train`")
            raise CheckpointError(f"{path}: no {which} checkpoint in this run; "
                                  "has `medvae train` written one yet?")
        candidates = [Path(which), ckdir / which, ckdir / f"{which}.pt"]
        for cand in candidates:
            if cand.is_file():
                return cand
        raise CheckpointError(f"checkpoint '{which}' not found (looked for {', '.join(map(str, candidates))})")

    # ------------------------------------------------------------------ run.json
    def info(self) -> dict:
        """run.json, or {} before training has written it."""
        path = self.info_path
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def write_info(self, info: dict) -> None:
        write_json(self.info_path, info)

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
        path = self.config_path
        if not path.is_file():
            raise InputError(f"{self.path}: no config.yaml; give the --out of `medvae train`")
        return parse_config(yaml.safe_load(path.read_text(encoding="utf-8")), TrainStageConfig, str(path))

    def write_config(self, cfg: TrainStageConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_text(self.config_path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))

    @property
    def task(self) -> str:
        """``reconstruct`` | ``denoise`` (from run.json; config.yaml for runs written before it said)."""
        info = self.info()
        if "task" in info:
            return info["task"]
        return self.config().task if self.config_path.is_file() else "reconstruct"

"""The training loop: validation, checkpoints with exact resume, JSONL / TensorBoard logging and a
rich progress bar around :class:`medvae.training.step.TrainStep` (AMP, channels_last, torch.compile,
DDP under torchrun, clipping, NaN guard, LR schedules, EMA).

One "step" is one batch and the step of the model's family (:func:`medvae.training.families.build_step`):
the model's update and, for the VAE–GAN from ``disc_start`` on, its critic's. A step whose loss or
gradient norm is not finite is skipped (no optimizer step) but still counts as a step, so
``max_steps`` bounds the run and the LR schedule and data order stay functions of the step; after
``max_bad_steps`` skipped steps training stops with a TrainingError. On CUDA the guard's decision
stays on the device (:meth:`medvae.training.step.TrainStep.update`): the skip itself happens in the
step, and the trainer reads the decisions back, counts and warns at each report (every ``log_every``
steps, each checkpoint and the last step), so the limit stops a run at most ``log_every - 1`` steps
late; nothing else waits for the GPU.

What a step optimizes and how validation scores it is the run's task
(:mod:`medvae.training.tasks`; reconstruct by default), so the loop has no task branches.

Run directory (:class:`medvae.training.rundir.RunDir`): config.yaml, run.json, train_log.jsonl
(append-only; a resume cuts the entries past the checkpoint, so the log equals an uninterrupted
run's), checkpoints/ (last.pt every checkpoint_every steps and at the end, best.pt by the task's
validation score, step_00001000.pt periodic) and tensorboard/ when that package is installed.

``--resume`` restores model, optimizers, GradScaler, schedules, EMA, RNG states and the data
position from ``last.pt``, all taken after the step they belong to, so a run killed with SIGKILL and
resumed ends at the same step with the same losses. ``--resume`` on a run without a checkpoint
starts from scratch with a warning (so job scripts can always pass it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError

from medvae.config import AnyModelConfig, MonaiConfig, TrainStageConfig, VAEConfig, parse_model_config
from medvae.data.conditions import resolve_condition
from medvae.data.loader import Batch, PatchBatches
from medvae.data.store import PatchStore, open_store
from medvae.devices import select_device
from medvae.errors import CheckpointError, ConfigError, TrainingError
from medvae.models import build_model
from medvae.models.vae import stage_channels
from medvae.training import checkpoint as ck
from medvae.training.distributed import DistInfo, init_distributed, shutdown
from medvae.training.families import build_step
from medvae.training.rundir import RunDir
from medvae.training.runtime import autocast, precision_name, resolve_amp, seed_everything
from medvae.training.schedule import ema_state_dict
from medvae.training.step import StepRecord
from medvae.training.tasks import ReconstructTask, Task, TrainingPair

log = logging.getLogger(__name__)


def resolve_config(cfg: TrainStageConfig, store: PatchStore, conditional: bool = True) -> TrainStageConfig:
    """A copy of ``cfg`` whose model takes its input shape from the store's ``store.json`` and whose
    ``auto`` condition is resolved (none when the task takes no condition: ``conditional`` False)."""
    cfg = cfg.model_copy(deep=True)
    t = cfg.train
    for key in ("batch_size", "checkpoint_every", "log_every", "epochs"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key} is {getattr(t, key)}; it must be at least 1")
    if t.max_steps is not None and t.max_steps < 1:
        raise ConfigError(f"train.max_steps is {t.max_steps}; it must be at least 1")
    try:
        kind = cfg.model.condition
        if not conditional or (kind == "auto" and not isinstance(cfg.model, VAEConfig)):
            kind = "none"  # only the ConvVAE family takes a class / modality condition
        kind, names = resolve_condition(kind, store)
        cfg.model.condition, cfg.model.condition_names = kind, names
        cfg.model.in_channels = int(store.meta["channels"]) + (kind == "mask")
        cfg.model.image_size = int(store.meta["patch_size"])
        cfg.model.channels = cfg.model.resolved_channels()  # the run's config.yaml and checkpoints name the widths
    except ValidationError as err:
        raise ConfigError(f"{store.path}: patch size {store.meta['patch_size']} is not one the models take "
                          f"({err.errors()[0]['msg']}); prepare the store with --patch-size 32, 64, 128 or 256"
                          ) from None
    return cfg


def _same_model_dump(model: AnyModelConfig) -> dict:
    """``model`` as JSON with ``channels`` as the widths the network has at each level, so a checkpoint from
    before the patch-size defaults (``channels: [32, 64, 128, 256]`` at 32²: levels 32/64/128) matches the
    resolved default of today (``[32, 64, 128]``): the same network."""
    out = model.model_dump(mode="json")
    if isinstance(model, (VAEConfig, MonaiConfig)):  # down to an 8×8 map (the denoisers: one width per level)
        out["channels"] = stage_channels(model)
    return out


def train(store: PatchStore | str | os.PathLike, out: str | os.PathLike, cfg: TrainStageConfig,
          device: str = "auto", resume: bool = False, task: Task | None = None) -> dict:
    """Train ``cfg.model`` on the store's train split; write the run directory ``out``.

    Under ``torchrun`` (WORLD_SIZE > 1) every process calls this; each reads its shard of every
    epoch, gradients are averaged over ranks, and rank 0 alone writes files and logs.

    Args:
        store: PatchStore or its directory.
        out: run directory (created).
        cfg: TrainStageConfig; ``model.in_channels`` / ``image_size`` are taken from the store.
        device: ``auto | cpu | cuda | cuda:N | mps`` (under torchrun: CUDA device = LOCAL_RANK).
        resume: continue from ``out/checkpoints/last.pt``.
        task: what to optimize (:mod:`medvae.training.tasks`); None: :class:`ReconstructTask`. Its
            ``name`` must be ``cfg.task``.

    Returns:
        Summary dict: ``step``, ``epoch``, ``bad_steps``, ``metrics`` (last validation),
        ``best_score`` (best validation value of the task's ``best_key``), ``checkpoint`` (path of
        last.pt), ``images_per_s``.
    """
    store = store if isinstance(store, PatchStore) else open_store(store)
    task = ReconstructTask(store, cfg.train.seed) if task is None else task
    if task.name != cfg.task:
        raise ConfigError(f"the config's task is {cfg.task} but a {task.name} task was given; build the "
                          "task from the config (medvae.pipeline.train_stage)")
    dev = select_device(device)
    info = init_distributed(dev.type)
    if dev.type == "cuda" and info.enabled:
        dev = torch.device("cuda", info.local_rank)
    try:
        return _Trainer(store, Path(out), resolve_config(cfg, store, task.conditional), dev, info, task,
                        resume).run()
    finally:
        shutdown(info)


class _Meter:
    """Training throughput: images per second of step time, validation and checkpoints excluded."""

    def __init__(self, step: int, images_per_step: int):
        self.images_per_step = images_per_step
        self.restart(step)

    def rate(self, step: int) -> float:
        """images/s from the last restart to ``step``."""
        return (step - self.step) * self.images_per_step / max(time.perf_counter() - self.since, 1e-9)

    def restart(self, step: int) -> None:
        self.step, self.since = step, time.perf_counter()


class _Trainer:
    def __init__(self, store: PatchStore, out: Path, cfg: TrainStageConfig, device: torch.device,
                 info: DistInfo, task: Task, resume: bool):
        self.store, self.out, self.cfg, self.device, self.info, self.task = store, out, cfg, device, info, task
        t = self.tc = cfg.train
        self.run_dir = RunDir(out)
        self.log_path = self.run_dir.log_path
        self.amp_dtype = resolve_amp(t.amp, device)
        self.channels_last = t.channels_last and device.type == "cuda"

        seed_everything(t.seed)  # same initial weights on every rank (and DDP broadcasts rank 0's anyway)
        model = build_model(cfg.model)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.to(device)
        self.batches = PatchBatches(store, "train", batch_size=t.batch_size, seed=t.seed,
                                    rank=info.rank, world_size=info.world_size, device=device,
                                    condition=(cfg.model.condition, tuple(cfg.model.condition_names)))
        held_out = getattr(task, "held_out", None)  # the task validates on these train rows: never trained on
        if held_out is not None:
            self.batches.indices = np.setdiff1d(self.batches.indices, held_out)
        if len(self.batches) == 0:
            n = len(self.batches.indices) // info.world_size
            raise ConfigError(f"{store.path}: the train split has {n} patches per process, fewer than the "
                              f"batch size {t.batch_size}; lower --batch-size or add training data")
        self.total_steps = t.max_steps if t.max_steps is not None else t.epochs * len(self.batches)
        self.steps = build_step(self.model, t, device, info, self.amp_dtype, self.total_steps,
                                getattr(task, "loss", None))
        self.eval_model = None  # a copy holding the EMA weights, built on first validation
        self.step = self.bad_steps = 0
        self.best_score = -math.inf
        self.metrics: dict[str, float] = {}
        self.images_per_s = 0.0
        self._pending: list[StepRecord] = []  # steps whose skip decision is not read back yet (CUDA)
        # after the model is built: each rank draws its own noise from here on
        seed_everything(t.seed + 1_000_003 * info.rank)
        if resume:
            self._resume()
        elif info.is_main and self.run_dir.checkpoint_path("last").exists():
            log.warning("%s holds an earlier run; starting over (pass --resume to continue it)", out)
            for old in self.run_dir.checkpoints.glob("*.pt"):
                old.unlink()
            self.log_path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ resume / checkpoints
    def _resume(self) -> None:
        path = self.run_dir.checkpoint_path("last")
        if not path.exists():
            log.warning("--resume: %s has no checkpoint yet; starting from scratch", self.out)
            return
        c = ck.load_checkpoint(path, map_location="cpu")
        if c.get("store_hash") != self.store.content_hash:
            raise CheckpointError(
                f"{path}: trained on a store with hash {c.get('store_hash')}, but {self.store.path} has hash "
                f"{self.store.content_hash}; resume on the same store or start a new run in another --out")
        # validated first, so a checkpoint from before a ModelConfig key existed gets its default; one from
        # before conditioning existed holds an unconditional model
        saved = parse_model_config({"condition": "none", **c["model_config"]}, f"{path}: model_config")
        if _same_model_dump(saved) != _same_model_dump(self.cfg.model):
            raise CheckpointError(f"{path}: the checkpoint's model config differs from the one given; "
                                  "resume with the run's own config.yaml")
        self.step, self.bad_steps = int(c["step"]), int(c.get("bad_steps", 0))
        self.model.load_state_dict(c["model_state"])
        self.steps.load_state_dict(c, self.step, self.bad_steps)
        self.batches.load_state_dict(c["data_state"])
        ck.set_rng_state(c["rng"])
        if self.info.rank > 0:  # the checkpoint holds rank 0's RNG; other ranks re-derive their own
            seed_everything(self.tc.seed + 1_000_003 * self.info.rank + self.step)
        self.best_score = float(c.get("best_score", c.get("best_elbo", -math.inf)))  # best_elbo: format 1
        self.metrics = dict(c.get("metrics", {}))
        if self.info.is_main:
            ck.truncate_log(self.log_path, self.step)
        log.info("resumed %s at step %d (epoch %d)", self.out, self.step, self.batches.epoch)

    def _checkpoint(self, names: list[str | int]) -> None:
        state = {
            "format_version": ck.FORMAT_VERSION,
            "model_config": self.cfg.model.model_dump(mode="json"),
            "train_config": self.tc.model_dump(mode="json"),
            "model_state": self.model.state_dict(),
            **self.steps.state_dict(),  # optimizer_states, scaler_state, scheduler_states, ema_state
            "step": self.step,
            "epoch": self.batches.epoch,
            "bad_steps": self.bad_steps,
            "best_score": self.best_score,
            "rng": ck.rng_state(),
            "data_state": self.batches.state_dict(),
            "store_hash": self.store.content_hash,
            "metrics": {k: float(v) for k, v in self.metrics.items()},
        }
        for name in names:
            ck.save_checkpoint(self.run_dir.checkpoint_path(name), state)

    def _save(self, last: bool) -> None:
        """After a validation: last.pt (and step_*.pt when due) if ``last``, best.pt when the task's
        validation score improved and the step may select it (a VAE–GAN's, once its critic has trained);
        run.json follows."""
        names: list[str | int] = ["last"] if last else []
        if self.step % self.tc.checkpoint_every == 0:
            names.append(self.step)
        if self.steps.selectable(self.step) and self.metrics.get(self.task.best_key, -math.inf) > self.best_score:
            self.best_score = self.metrics[self.task.best_key]
            names.append("best")
        if names:
            self._checkpoint(names)
            self._write_run_json("running")

    def _write_run_json(self, status: str) -> None:
        self.run_dir.write_info({
            "store": str(self.store.path.resolve()), "store_hash": self.store.content_hash,
            "model": self.cfg.model.name, "task": self.task.name, "status": status, "step": self.step,
            "total_steps": self.total_steps, "world_size": self.info.world_size, "device": str(self.device),
            "precision": precision_name(self.amp_dtype), "best_key": self.task.best_key,
            "best_score": self.best_score if math.isfinite(self.best_score) else None})

    # ------------------------------------------------------------------ events of the loop
    def _train_step(self, batch: Batch) -> StepRecord:
        """One optimizer step on ``batch`` (``self.step`` is not advanced here). Its skip decision is
        counted at once when the step has read it (off CUDA), else at the next report (:meth:`_settle`)."""
        if not self.model.training:
            self.model.train()
        x, target, weight = TrainingPair(*self.task.training_pair(batch, self.step))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.model.conditioned_on(batch.ids):
            record = self.steps.step(x, self.step, target=target, weight=weight)
        record.step = self.step
        self._pending.append(record)
        if record.bad is not None:
            self._settle()
        return record

    def _settle(self) -> None:
        """Read back the skip decisions of the steps since the last report (one sync; on CUDA) and count
        them, so the NaN guard's count, warnings and limit hold at every report and checkpoint."""
        pending, self._pending = self._pending, []
        unread = [r for r in pending if r.bad is None]
        if unread:
            flags = torch.stack([r.flags for r in unread]).float().tolist()
            for record, (loss_bad, norm_bad) in zip(unread, flags, strict=True):
                record.settle(loss_bad, norm_bad)
        for record in pending:
            self._count_bad(record)

    def _count_bad(self, record: StepRecord) -> None:
        """Count a skipped step, warn, and stop past ``max_bad_steps``."""
        if not record.bad:
            return
        t = self.tc
        self.bad_steps += 1
        log.warning("step %d: non-finite %s; step skipped (%d/%d bad steps)", record.step, record.problem,
                    self.bad_steps, t.max_bad_steps)
        if self.bad_steps > t.max_bad_steps:
            raise TrainingError(
                f"{self.bad_steps} training steps had a non-finite loss or gradient (limit max_bad_steps="
                f"{t.max_bad_steps}); lower train.lr, use amp: off or bf16, or check the store's data "
                f"({self.store.path})")

    def _validate(self) -> dict:
        """Validation metrics of the EMA weights (the model's when EMA is off); rank 0 only."""
        model = self.model
        ema = self.steps.ema
        if ema is not None:
            if self.eval_model is None:
                with torch.random.fork_rng(devices=[]):  # the training's RNG stream stays untouched
                    self.eval_model = build_model(self.cfg.model)
                if self.channels_last:
                    self.eval_model = self.eval_model.to(memory_format=torch.channels_last)
                self.eval_model.to(self.device)
            self.eval_model.load_state_dict(ema_state_dict(ema, self.model))
            model = self.eval_model
        with autocast(self.device, self.amp_dtype):
            return self.task.validate(model, self.tc, self.device, self.channels_last)

    def _log(self, entry: dict, val: dict | None) -> None:
        """Append the step's entry (with ``val_*`` metrics after a validation) to the log."""
        entry = {"step": self.step, "epoch": self.batches.epoch, **entry,
                 "images_per_s": round(self.images_per_s, 2), "bad_steps": self.bad_steps,
                 **({f"val_{k}": v for k, v in val.items()} if val is not None else {})}
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        if self.tb is not None:
            for k, v in entry.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, entry["step"])

    def _batches(self):
        """This rank's batches, epoch after epoch, on the device, until ``total_steps``."""
        while self.step < self.total_steps:
            for batch in self.batches:
                yield batch
                if self.step >= self.total_steps:
                    return

    def _start_files(self) -> None:
        """config.yaml, run.json ("running") and the TensorBoard writer; rank 0 only."""
        self.tb = None
        if not self.info.is_main:
            return
        self.run_dir.write_config(self.cfg)
        self._write_run_json("running")
        log.info("training %s in %s on %s (amp: %s)", self.out, precision_name(self.amp_dtype), self.device,
                 self.tc.amp)
        with contextlib.suppress(ImportError):
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out / "tensorboard"), purge_step=self.step + 1)

    def _progress(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        return Progress(TextColumn("[bold]train {task.fields[model]}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]:.4g}  {task.fields[ips]:.0f} img/s"),
                        TimeRemainingColumn(), disable=not (self.info.is_main and sys.stderr.isatty()))

    def _report(self, entry: dict, meter: _Meter, validate: bool, save_last: bool) -> None:
        """Log the step, after validating when ``validate``; then checkpoints (rank 0 writes).
        Throughput counts step time only: the meter restarts after validation and saving."""
        self.images_per_s = meter.rate(self.step)
        if self.info.is_main:
            if validate:
                self.metrics = self._validate()
            self._log(entry, self.metrics if validate else None)
            if validate:
                self._save(last=save_last)
        meter.restart(self.step)

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        """Step, log every ``log_every`` steps, validate and checkpoint every ``checkpoint_every``
        steps, at the end of every epoch (epoch-bounded runs) and at the last step."""
        t, main = self.tc, self.info.is_main
        self._start_files()  # rank 0
        started, t0 = self.step, time.perf_counter()
        meter = _Meter(self.step, t.batch_size * self.info.world_size)
        with self._progress() as progress:
            bar = progress.add_task("train", total=self.total_steps, completed=self.step,
                                    model=self.cfg.model.name, loss=float("nan"), ips=0.0)
            for batch in self._batches():
                record = self._train_step(batch)
                self.step += 1
                checkpoint = self.step % t.checkpoint_every == 0 or self.step == self.total_steps
                epoch_end = t.max_steps is None and self.batches.position == len(self.batches)
                if checkpoint or epoch_end or self.step % t.log_every == 0:
                    self._settle()
                    entry = record.entry()
                    self._report(entry, meter, validate=checkpoint or epoch_end, save_last=checkpoint)
                    progress.update(bar, completed=self.step, loss=entry["loss"], ips=self.images_per_s)
                else:  # the values stay unread between reports (the device path waits for nothing)
                    progress.update(bar, completed=self.step)
        if main:
            self._write_run_json("done")
            if self.tb is not None:
                self.tb.close()
        elapsed = time.perf_counter() - t0
        return {"step": self.step, "epoch": self.batches.epoch, "bad_steps": self.bad_steps,
                "metrics": dict(self.metrics), "best_score": self.best_score,
                "checkpoint": str(self.run_dir.checkpoint_path("last")),
                "images_per_s": (self.step - started) * meter.images_per_step / max(elapsed, 1e-9)}

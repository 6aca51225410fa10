"""The training loop: AMP, channels_last, torch.compile, DDP (torchrun), clipping, NaN guard, EMA,
validation, checkpoints with exact resume, JSONL / TensorBoard logging and a rich progress bar.

One "step" is one batch: a generator (VAE) update and, for the VAE–GAN from ``disc_start`` on, a
discriminator update. A step whose loss or gradient norm is not finite is skipped (no optimizer
step) but still counts as a step, so ``max_steps`` bounds the run and the LR schedule and data
order stay functions of the step; after ``max_bad_steps`` skipped steps training stops with a
TrainingError.

Run directory::

    RUN/config.yaml          resolved TrainStageConfig (model in_channels / image_size from the store)
    RUN/run.json             {"store", "store_hash", "model", "status": "running"|"done", "step"}
    RUN/train_log.jsonl      one JSON object per logged step (append-only; a resume cuts the
                             entries past the checkpoint, so the log equals an uninterrupted run's)
    RUN/checkpoints/         last.pt (every checkpoint_every steps and at the end), best.pt
                             (best validation ELBO), step_00001000.pt (periodic)
    RUN/tensorboard/         event files, when the tensorboard package is installed

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

import torch
import yaml
from pydantic import ValidationError

from medvae.config import TrainStageConfig
from medvae.data.loader import PatchBatches
from medvae.data.store import PatchStore, open_store
from medvae.devices import select_device
from medvae.engine import checkpoint as ck
from medvae.engine.distributed import DistInfo, all_reduce_mean, broadcast_module, init_distributed, shutdown
from medvae.engine.runtime import compile_model, resolve_amp, seed_everything
from medvae.engine.schedule import EMA, WarmupCosine, beta_at
from medvae.engine.validate import validate
from medvae.errors import CheckpointError, ConfigError, TrainingError
from medvae.files import write_json, write_text

log = logging.getLogger(__name__)


def resolve_config(cfg: TrainStageConfig, store: PatchStore) -> TrainStageConfig:
    """A copy of ``cfg`` whose model takes its input shape from the store's ``store.json``."""
    cfg = cfg.model_copy(deep=True)
    t = cfg.train
    for key in ("batch_size", "checkpoint_every", "log_every", "epochs"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key} is {getattr(t, key)}; it must be at least 1")
    if t.max_steps is not None and t.max_steps < 1:
        raise ConfigError(f"train.max_steps is {t.max_steps}; it must be at least 1")
    try:
        cfg.model.in_channels = int(store.meta["channels"])
        cfg.model.image_size = int(store.meta["patch_size"])
    except ValidationError as err:
        raise ConfigError(f"{store.path}: patch size {store.meta['patch_size']} is not one the models take "
                          f"({err.errors()[0]['msg']}); prepare the store with --patch-size 128 or 256"
                          ) from None
    return cfg


def train(store: PatchStore | str | os.PathLike, out: str | os.PathLike, cfg: TrainStageConfig,
          device: str = "auto", resume: bool = False) -> dict:
    """Train ``cfg.model`` on the store's train split; write the run directory ``out``.

    Under ``torchrun`` (WORLD_SIZE > 1) every process calls this; each reads its shard of every
    epoch, gradients are averaged over ranks, and rank 0 alone writes files and logs.

    Args:
        store: PatchStore or its directory.
        out: run directory (created).
        cfg: TrainStageConfig; ``model.in_channels`` / ``image_size`` are taken from the store.
        device: ``auto | cpu | cuda | cuda:N | mps`` (under torchrun: CUDA device = LOCAL_RANK).
        resume: continue from ``out/checkpoints/last.pt``.

    Returns:
        Summary dict: ``step``, ``epoch``, ``bad_steps``, ``metrics`` (last validation),
        ``best`` (best validation ELBO), ``checkpoint`` (path of last.pt), ``images_per_s``.
    """
    store = store if isinstance(store, PatchStore) else open_store(store)
    dev = select_device(device)
    info = init_distributed(dev.type)
    if dev.type == "cuda" and info.enabled:
        dev = torch.device("cuda", info.local_rank)
    try:
        return _Trainer(store, Path(out), resolve_config(cfg, store), dev, info, resume).run()
    finally:
        shutdown(info)


class _Trainer:
    def __init__(self, store: PatchStore, out: Path, cfg: TrainStageConfig, device: torch.device,
                 info: DistInfo, resume: bool):
        from medvae.models import build_model

        self.store, self.out, self.cfg, self.device, self.info = store, out, cfg, device, info
        t = self.tc = cfg.train
        self.ckdir = ck.checkpoint_dir(out)
        self.log_path = out / "train_log.jsonl"
        self.amp_dtype = resolve_amp(t.amp, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.channels_last = t.channels_last and device.type == "cuda"

        seed_everything(t.seed)  # same initial weights on every rank (and broadcast below anyway)
        model = build_model(cfg.model)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.to(device)
        broadcast_module(self.model, info)
        self.gen_params = [p for p in self.model.generator_parameters() if p.requires_grad]
        disc = getattr(self.model, "discriminator", None)
        self.disc_params = [p for p in disc.parameters() if p.requires_grad] if disc is not None else []
        adamw = dict(betas=tuple(t.betas), weight_decay=t.weight_decay)
        self.optimizers = {"generator": torch.optim.AdamW(self.gen_params, lr=t.lr, **adamw)}
        if self.disc_params:
            self.optimizers["discriminator"] = torch.optim.AdamW(self.disc_params, lr=t.disc_lr, **adamw)

        self.batches = PatchBatches(store, "train", batch_size=t.batch_size, seed=t.seed,
                                    rank=info.rank, world_size=info.world_size, device=device)
        if len(self.batches) == 0:
            n = len(self.batches.indices) // info.world_size
            raise ConfigError(f"{store.path}: the train split has {n} patches per process, fewer than the "
                              f"batch size {t.batch_size}; lower --batch-size or add training data")
        self.total_steps = t.max_steps if t.max_steps is not None else t.epochs * len(self.batches)
        self.schedulers = {k: WarmupCosine(o, t.warmup_steps, self.total_steps)
                           for k, o in self.optimizers.items()}
        self.ema = EMA(self.model, t.ema_decay, self.gen_params) if t.ema_decay > 0 else None
        self.eval_model = None  # a copy holding the EMA weights, built on first validation
        self.step = self.bad_steps = 0
        self.best_elbo = -math.inf
        self.metrics: dict[str, float] = {}
        # after the model is built: each rank draws its own noise from here on
        seed_everything(t.seed + 1_000_003 * info.rank)
        if resume:
            self._resume()
        elif info.is_main and (self.ckdir / "last.pt").exists():
            log.warning("%s holds an earlier run; starting over (pass --resume to continue it)", out)
            for old in self.ckdir.glob("*.pt"):
                old.unlink()
            self.log_path.unlink(missing_ok=True)
        if t.compile:
            compile_model(self.model, discriminator=t.r1_gamma == 0)
        self.images_per_s = 0.0

    # ------------------------------------------------------------------ resume / checkpoints
    def _resume(self) -> None:
        path = self.ckdir / "last.pt"
        if not path.exists():
            log.warning("--resume: %s has no checkpoint yet; starting from scratch", self.out)
            return
        c = ck.load_checkpoint(path, map_location="cpu")
        if c.get("store_hash") != self.store.content_hash:
            raise CheckpointError(
                f"{path}: trained on a store with hash {c.get('store_hash')}, but {self.store.path} has hash "
                f"{self.store.content_hash}; resume on the same store or start a new run in another --out")
        if c["model_config"] != self.cfg.model.model_dump(mode="json"):
            raise CheckpointError(f"{path}: the checkpoint's model config differs from the one given; "
                                  "resume with the run's own config.yaml")
        self.model.load_state_dict(c["model_state"])
        for k, o in self.optimizers.items():
            o.load_state_dict(c["optimizer_states"][k])
        for k, s in self.schedulers.items():
            s.load_state_dict(c["scheduler_states"][k])
        if c.get("scaler_state"):
            self.scaler.load_state_dict(c["scaler_state"])
        if self.ema is not None and c.get("ema_state") is not None:
            self.ema.load_state_dict(c["ema_state"])
        self.batches.load_state_dict(c["data_state"])
        ck.set_rng_state(c["rng"])
        if self.info.rank > 0:  # the checkpoint holds rank 0's RNG; other ranks re-derive their own
            seed_everything(self.tc.seed + 1_000_003 * self.info.rank + int(c["step"]))
        self.step, self.bad_steps = int(c["step"]), int(c.get("bad_steps", 0))
        self.best_elbo = float(c.get("best_elbo", -math.inf))
        self.metrics = dict(c.get("metrics", {}))
        if self.info.is_main:
            ck.truncate_log(self.log_path, self.step)
        log.info("resumed %s at step %d (epoch %d)", self.out, self.step, self.batches.epoch)

    def _checkpoint(self, names: list[str]) -> None:
        state = {
            "format_version": ck.FORMAT_VERSION,
            "model_config": self.cfg.model.model_dump(mode="json"),
            "train_config": self.tc.model_dump(mode="json"),
            "model_state": self.model.state_dict(),
            "ema_state": self.ema.state_dict(self.model) if self.ema is not None else None,
            "optimizer_states": {k: o.state_dict() for k, o in self.optimizers.items()},
            "scaler_state": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "scheduler_states": {k: s.state_dict() for k, s in self.schedulers.items()},
            "step": self.step,
            "epoch": self.batches.epoch,
            "bad_steps": self.bad_steps,
            "best_elbo": self.best_elbo,
            "rng": ck.rng_state(),
            "data_state": self.batches.state_dict(),
            "store_hash": self.store.content_hash,
            "metrics": {k: float(v) for k, v in self.metrics.items()},
        }
        for name in names:
            ck.save_checkpoint(self.ckdir / name, state)

    def _save(self, due_ckpt: bool) -> None:
        """After a validation: last.pt and step_*.pt when due, best.pt when the val ELBO improved."""
        names = ["last.pt"] if due_ckpt else []
        if self.step % self.tc.checkpoint_every == 0:
            names.append(ck.step_name(self.step))
        if self.metrics.get("elbo", -math.inf) > self.best_elbo:
            self.best_elbo = self.metrics["elbo"]
            names.append("best.pt")
        if names:
            self._checkpoint(names)
            self._write_run_json("running")

    def _write_run_json(self, status: str) -> None:
        write_json(self.out / "run.json", {
            "store": str(self.store.path.resolve()), "store_hash": self.store.content_hash,
            "model": self.cfg.model.name, "status": status, "step": self.step,
            "total_steps": self.total_steps, "world_size": self.info.world_size, "device": str(self.device)})

    # ------------------------------------------------------------------ one step
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _backward(self, loss: torch.Tensor, params: list, opt, scalars: dict) -> tuple[dict, torch.Tensor]:
        """Scaled backward, cross-rank gradient mean, unscale and clip; returns (mean scalars, grad norm)."""
        self.scaler.scale(loss).backward()
        names = list(scalars)
        reduced = all_reduce_mean(params, [scalars[n] for n in names], self.info)
        self.scaler.unscale_(opt)
        max_norm = self.tc.grad_clip if self.tc.grad_clip > 0 else math.inf
        gnorm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return dict(zip(names, reduced, strict=False)), gnorm

    def _train_step(self, x: torch.Tensor) -> dict:
        from medvae.losses import discriminator_loss, generator_loss

        t, step = self.tc, self.step
        lrs = {k: s.set_step(step) for k, s in self.schedulers.items()}
        beta = beta_at(step, t.beta, t.beta_warmup_steps)
        opt_g = self.optimizers["generator"]
        opt_g.zero_grad(set_to_none=True)
        with self._autocast():
            loss, terms, aux = generator_loss(self.model, x, step=step, beta=beta, cfg=t)
        terms = {"loss": loss.detach(), **{k: v for k, v in terms.items() if k != "loss"}}
        terms, gnorm = self._backward(loss, self.gen_params, opt_g, terms)
        checks = [terms["loss"], gnorm]
        d_step = bool(self.disc_params) and step >= t.disc_start
        if d_step:
            opt_d = self.optimizers["discriminator"]
            opt_d.zero_grad(set_to_none=True)  # drops the grads D got from the generator loss
            with self._autocast():
                d_loss, d_terms = discriminator_loss(self.model, x, aux, step=step, cfg=t)
            d_terms = {"d_loss": d_loss.detach(), **{k: v for k, v in d_terms.items() if k != "d_loss"}}
            d_terms, d_norm = self._backward(d_loss, self.disc_params, opt_d, d_terms)
            terms.update(d_terms)
            checks += [d_terms["d_loss"], d_norm]
        finite = torch.isfinite(torch.stack([c.float() for c in checks])).tolist()  # the step's one sync
        # With fp16 a non-finite *gradient* at a finite loss is the GradScaler's overflow probe: it
        # skips that step itself and lowers the scale. Anything else non-finite is a bad step.
        losses_ok = finite[0] and (not d_step or finite[2])
        bad = not losses_ok or (not self.scaler.is_enabled() and not all(finite))
        if bad:
            for o in self.optimizers.values():
                o.zero_grad(set_to_none=True)
            self.bad_steps += 1
            log.warning("step %d: non-finite %s; step skipped (%d/%d bad steps)", step,
                        "loss" if not losses_ok else "gradient norm", self.bad_steps, t.max_bad_steps)
            if self.bad_steps > t.max_bad_steps:
                raise TrainingError(
                    f"{self.bad_steps} training steps had a non-finite loss or gradient (limit max_bad_steps="
                    f"{t.max_bad_steps}); lower train.lr, use amp: off or bf16, or check the store's data "
                    f"({self.store.path})")
        else:
            self.scaler.step(opt_g)
            if d_step:
                self.scaler.step(self.optimizers["discriminator"])
            if self.ema is not None:
                self.ema.update(self.model)
        self.scaler.update()
        values = torch.stack([v.float() for v in terms.values()] + [gnorm.float()]).tolist()
        out = dict(zip([*terms, "grad_norm"], values, strict=False))
        out.update(lr=lrs["generator"], beta=beta, skipped=int(bad))
        if "discriminator" in lrs:
            out["disc_lr"] = lrs["discriminator"]
        return out

    # ------------------------------------------------------------------ the loop
    def _validate(self) -> dict:
        model = self.model
        if self.ema is not None:
            if self.eval_model is None:
                from medvae.models import build_model

                with torch.random.fork_rng(devices=[]):  # the training's RNG stream stays untouched
                    self.eval_model = build_model(self.cfg.model)
                if self.channels_last:
                    self.eval_model = self.eval_model.to(memory_format=torch.channels_last)
                self.eval_model.to(self.device)
            self.eval_model.load_state_dict(self.ema.state_dict(self.model))
            model = self.eval_model
        with self._autocast():
            return validate(model, self.store, self.tc.batch_size, self.tc.val_batches, self.device,
                            seed=self.tc.seed, channels_last=self.channels_last)

    def _log(self, entry: dict) -> None:
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        if self.tb is not None:
            for k, v in entry.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, entry["step"])

    def run(self) -> dict:
        t, main = self.tc, self.info.is_main
        self.tb = None
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            resolved = yaml.safe_dump(self.cfg.model_dump(mode="json"), sort_keys=False)
            write_text(self.out / "config.yaml", resolved)
            self._write_run_json("running")
            with contextlib.suppress(ImportError):
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.out / "tensorboard"), purge_step=self.step + 1)
        n_img = t.batch_size * self.info.world_size
        started = self.step
        t0 = time.perf_counter()
        tick, tick_step = t0, self.step
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        progress = Progress(TextColumn("[bold]train {task.fields[model]}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]:.4g}  {task.fields[ips]:.0f} img/s"),
                            TimeRemainingColumn(), disable=not (main and sys.stderr.isatty()))
        with progress:
            task = progress.add_task("train", total=self.total_steps, completed=self.step,
                                     model=self.cfg.model.name, loss=float("nan"), ips=0.0)
            it = iter(self.batches)
            while self.step < self.total_steps:
                x = next(it, None)
                if x is None:  # epoch done: PatchBatches moved to the next one
                    it = iter(self.batches)
                    continue
                x = x.to(self.device, non_blocking=True)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                self.model.train()
                entry = self._train_step(x)
                self.step += 1
                epoch_end = t.max_steps is None and self.batches.position == len(self.batches)
                due_ckpt = self.step % t.checkpoint_every == 0 or self.step == self.total_steps
                validated = due_ckpt or epoch_end
                due_log = self.step % t.log_every == 0 or validated
                if due_log:  # throughput of training steps only (validation / checkpoints excluded)
                    dt = max(time.perf_counter() - tick, 1e-9)
                    self.images_per_s = (self.step - tick_step) * n_img / dt
                if main and validated:
                    self.metrics = self._validate()
                if main and due_log:
                    self._log({"step": self.step, "epoch": self.batches.epoch, **entry,
                               "images_per_s": round(self.images_per_s, 2), "bad_steps": self.bad_steps,
                               **({f"val_{k}": v for k, v in self.metrics.items()} if validated else {})})
                if main and validated:
                    self._save(due_ckpt)
                if due_log:
                    tick, tick_step = time.perf_counter(), self.step
                progress.update(task, completed=self.step, loss=entry["loss"], ips=self.images_per_s)
        if main:
            self._write_run_json("done")
            if self.tb is not None:
                self.tb.close()
        elapsed = time.perf_counter() - t0
        return {"step": self.step, "epoch": self.batches.epoch, "bad_steps": self.bad_steps,
                "metrics": dict(self.metrics), "best": {"elbo": self.best_elbo},
                "checkpoint": str(self.ckdir / "last.pt"),
                "images_per_s": (self.step - started) * n_img / max(elapsed, 1e-9)}

"""One training step: a model, its family's loss and one optimizer, with AMP, DDP, clipping, one NaN
guard, the LR schedule and EMA. The VAE–GAN's step adds its critic on top
(:class:`medvae.training.adversarial.AdversarialStep`); :func:`medvae.training.families.build_step`
picks the step and the loss of a model's family.

:class:`TrainStep` owns everything a step changes (optimizers, GradScaler, schedulers, EMA) and
hands it to checkpoints as the checkpoint's ``optimizer_states`` / ``scaler_state`` /
``scheduler_states`` / ``ema_state`` entries.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import nn

from medvae.config import TrainConfig
from medvae.training.distributed import DistInfo, all_reduce_mean, wrap_ddp
from medvae.training.runtime import autocast, compile_model
from medvae.training.schedule import (
    beta_at,
    ema_model,
    ema_state_dict,
    load_ema_state,
    load_scheduler_state,
    warmup_cosine,
)

# (target, the model's forward output, KL weight beta, per-pixel weight or None) -> (loss, {term: tensor});
# the terms may hold their graph (the step detaches them)
Loss = Callable[[torch.Tensor, object, float, "torch.Tensor | None"], tuple[torch.Tensor, dict]]


def device_path(device: torch.device, amp_dtype: torch.dtype | None) -> bool:
    """Whether the NaN guard's flag stays on the device (CUDA without fp16: the fused AdamW takes it as its
    found_inf): a host read-back per step would make the CPU wait for the GPU at every step."""
    return device.type == "cuda" and amp_dtype != torch.float16


class TrainStep:
    """Runs training steps of ``model``; ``step(x, i)`` returns the step's :class:`StepRecord`.

    Under torchrun the model (minus ``exclude``) is wrapped in DistributedDataParallel
    (:func:`medvae.training.distributed.wrap_ddp`) and the loss works on the wrapper's ``forward`` output.

    Args:
        model: a medvae model on its device.
        loss: its family's :data:`Loss`.
        tc: TrainConfig (optimizer, schedules and guard settings).
        device: the model's device.
        info: this process's DistInfo.
        amp_dtype: autocast dtype or None (fp16 turns on the GradScaler).
        total_steps: length of the LR schedule.
        exclude: a submodule another optimizer trains (the VAE–GAN's critic): left out of this step's
            optimizer, EMA and DDP wrapper.
    """

    # the optimizers' log names of their gradient norms
    norm_names = {"generator": "grad_norm"}
    # the optimizers' log names of their learning rates
    lr_names = {"generator": "lr"}
    # values the guard checks but the log leaves out
    unlogged: tuple[str, ...] = ()
    # the loss terms the NaN guard checks (with the gradient norms)
    loss_names = ("loss",)

    def __init__(self, model: nn.Module, loss: Loss, tc: TrainConfig, device: torch.device, info: DistInfo,
                 amp_dtype: torch.dtype | None, total_steps: int, exclude: nn.Module | None = None):
        self.model, self.loss, self.tc, self.device, self.info = model, loss, tc, device, info
        self.amp_dtype, self.total_steps = amp_dtype, total_steps
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        # CUDA without fp16 (device_path): the fused AdamW takes the NaN guard's flag. Elsewhere the flag is
        # read at once (free on a CPU, whose tensors are computed as the call returns) and the optimizer is
        # the multi-tensor AdamW: on a CPU bit for bit the per-parameter loop, in a few calls instead of ~8
        # per parameter tensor; fp16's GradScaler decides on the host.
        self.fused = device_path(device, amp_dtype)
        skip = {id(p) for p in exclude.parameters()} if exclude is not None else set()
        self.params = [p for p in model.parameters() if p.requires_grad and id(p) not in skip]
        self.optimizers = {"generator": self.adamw(self.params, tc.lr)}
        self.schedulers = {"generator": warmup_cosine(self.optimizers["generator"], tc.warmup_steps, total_steps)}
        self.ema, self._ema_view = ema_model(model, tc.ema_decay, exclude) if tc.ema_decay > 0 else (None, None)
        if tc.compile:
            compile_model(model)
        self.generator = wrap_ddp(model, info, device, ignore=exclude)

    def adamw(self, params: list[nn.Parameter], lr: float) -> torch.optim.AdamW:
        """An AdamW of the run's settings on this device's kernels (see ``fused``)."""
        impl = {"fused": True} if self.fused else {"foreach": True} if self.device.type == "cpu" else {}
        return torch.optim.AdamW(params, lr=lr, betas=tuple(self.tc.betas), weight_decay=self.tc.weight_decay,
                                 **impl)

    # ------------------------------------------------------------------ checkpoint entries
    def state_dict(self) -> dict:
        """The checkpoint entries of the step's state (weights_only-loadable)."""
        return {
            "optimizer_states": {k: o.state_dict() for k, o in self.optimizers.items()},
            "scaler_state": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "scheduler_states": {k: s.state_dict() for k, s in self.schedulers.items()},
            "ema_state": ema_state_dict(self.ema, self.model) if self.ema is not None else None,
        }

    def load_state_dict(self, ckpt: dict, step: int, bad_steps: int) -> None:
        """Restore from a checkpoint written after ``step`` steps, ``bad_steps`` of them skipped."""
        for k, o in self.optimizers.items():
            impl = [(g["foreach"], g["fused"]) for g in o.param_groups]
            o.load_state_dict(ckpt["optimizer_states"][k])
            for g, (foreach, fused) in zip(o.param_groups, impl, strict=True):  # this device's kernels, not
                g["foreach"], g["fused"] = foreach, fused                     # the saving device's
        for k, s in self.schedulers.items():
            load_scheduler_state(s, ckpt["scheduler_states"][k], step)
        if ckpt.get("scaler_state"):
            self.scaler.load_state_dict(ckpt["scaler_state"])
        if self.ema is not None and ckpt.get("ema_state") is not None:
            load_ema_state(self.ema, ckpt["ema_state"], n_updates=step - bad_steps)

    # ------------------------------------------------------------------ one step
    def step(self, x: torch.Tensor, step: int, target: torch.Tensor | None = None,
             weight: torch.Tensor | None = None) -> StepRecord:
        """Train on batch ``x`` (this rank's share) as step ``step`` (0-based), toward ``target``
        (default ``x``; the clean batch when ``x`` is its noisy copy), the likelihood's pixels
        weighted by ``weight`` (None: all 1).

        The NaN guard: a step whose loss or gradient norm is not finite on any rank is skipped (no
        optimizer or EMA update) on every rank; the schedules advance anyway.

        Returns:
            the step's :class:`StepRecord`: the rank-mean loss terms, the gradient norms, ``lr`` (and
            ``disc_lr``), ``beta``, and (once settled) whether the step was skipped and why.
        """
        extra = {self.lr_names[k]: s.get_last_lr()[0] for k, s in self.schedulers.items()}
        extra["beta"] = beta = beta_at(step, self.tc.beta, self.tc.beta_warmup_steps)
        terms, norms = self.backward(x, step, beta, x if target is None else target, weight)
        names = [*terms, *(self.norm_names[k] for k in norms)]
        values = all_reduce_mean(torch.stack([v.float() for v in [*terms.values(), *norms.values()]]), self.info)
        flags = self.guard(names, values)
        self.update(norms, flags.any())
        self.scaler.update()
        with warnings.catch_warnings():  # a skipped first step: "scheduler.step() before optimizer.step()"
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            for s in self.schedulers.values():
                s.step()
        record = StepRecord(names, values, flags, extra, self.unlogged)
        if not self.fused:
            record.settle(*flags.tolist())
        return record

    def backward(self, x: torch.Tensor, step: int, beta: float, target: torch.Tensor,
                 weight: torch.Tensor | None) -> tuple[dict, dict]:
        """Gradients of the model's loss on this rank's batch ``x``, averaged over ranks, unscaled and
        clipped; no optimizer step. Returns the loss terms (``loss`` first) and ``{optimizer: grad norm}``."""
        self.zero_grad()
        with autocast(self.device, self.amp_dtype):
            out = self.generator(x)
            loss, terms = self.loss(target, out, beta, weight)
        norms = {"generator": self.clipped_backward(loss, self.params, "generator")}
        return detached(loss, terms), norms

    def selectable(self, step: int) -> bool:
        """Whether the weights after ``step`` steps may become best.pt (always, but see AdversarialStep)."""
        return True

    def zero_grad(self) -> None:
        for o in self.optimizers.values():
            o.zero_grad(set_to_none=True)

    def clipped_backward(self, loss: torch.Tensor, params: list, name: str) -> torch.Tensor:
        """Scaled backward (DDP averages the gradients on the way), unscale and clip; the grad norm."""
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizers[name])
        max_norm = self.tc.grad_clip if self.tc.grad_clip > 0 else math.inf
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def guard(self, names: list[str], values: torch.Tensor) -> torch.Tensor:
        """The NaN guard's flags ``[loss not finite, gradient not finite]`` (a device tensor). With fp16 a
        non-finite *gradient* at a finite loss is the GradScaler's overflow probe, which skips that step
        itself and lowers the scale: not a bad step."""
        finite = torch.isfinite(values)
        loss_at = [i for i, n in enumerate(names) if n in self.loss_names]
        norm_at = [i for i, n in enumerate(names) if n in self.norm_names.values()]
        norm_bad = ~finite[norm_at].all() & (not self.scaler.is_enabled())
        return torch.stack([~finite[loss_at].all(), norm_bad])

    def update(self, norms: dict, bad: torch.Tensor) -> None:
        """The optimizer steps of the optimizers that have gradients (``norms``' keys) and the EMA, unless
        ``bad`` (a 0-d flag).

        Fused (CUDA): the flag stays on the device: the fused AdamW skips the update (and its step count)
        where ``found_inf`` is 1, as under a GradScaler; the EMA moves by ``(1 - decay) * ok``, i.e. not at
        all on a skipped step. Elsewhere the flag is read back (free on a CPU).
        """
        if not self.fused:
            if bool(bad):
                self.zero_grad()
                return
            for name in norms:
                self.scaler.step(self.optimizers[name])
            if self.ema is not None:
                self.ema.update_parameters(self._ema_view)
            return
        found_inf = bad.to(torch.float32)
        for name in norms:
            opt = self.optimizers[name]
            opt.grad_scale, opt.found_inf = None, found_inf
            try:
                opt.step()
            finally:
                del opt.grad_scale, opt.found_inf
        if self.ema is not None:
            ok = 1.0 - found_inf
            with torch.no_grad():
                ema = [p.detach() for p in self.ema.module.parameters()]
                torch._foreach_lerp_(ema, [p.detach() for p in self._ema_view.parameters()],
                                     [(1.0 - self.tc.ema_decay) * ok] * len(ema))
                self.ema.n_averaged.add_(ok.to(self.ema.n_averaged.dtype))


def detached(loss: torch.Tensor, terms: dict) -> dict:
    """The log's terms of a loss: ``loss`` first, then the others, without their graphs."""
    return {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items() if k != "loss"}}


class StepRecord:
    """What one training step reports: its loss terms and gradient norms, and whether it was skipped.

    The values and the NaN guard's flags ``[loss not finite, gradient not finite]`` may stay on the
    device until :meth:`settle` (the skip decision: at once off CUDA, else read back by the trainer for
    many steps at once) and :meth:`entry` (the values).
    """

    def __init__(self, names: list[str], values: torch.Tensor, flags: torch.Tensor, extra: dict,
                 unlogged: tuple[str, ...] = ()):
        self.names, self.values, self.flags, self.extra, self.unlogged = names, values, flags, extra, unlogged
        self.bad: bool | None = None  # None: not settled yet
        self.problem: str | None = None
        self.step = -1  # set by the trainer

    def settle(self, loss_bad: float, norm_bad: float) -> None:
        """Set the skip decision from its flags, read back by the caller."""
        self.bad = bool(loss_bad or norm_bad)
        self.problem = None if not self.bad else "loss" if loss_bad else "gradient norm"

    def entry(self) -> dict:
        """The log entry: the loss terms, ``grad_norm``, ``lr``, ``beta``, ``skipped`` (``disc_lr``)."""
        if self.bad is None:
            self.settle(*self.flags.float().tolist())
        out = {k: v for k, v in zip(self.names, self.values.tolist(), strict=True) if k not in self.unlogged}
        rest = dict(self.extra)
        out.update(lr=rest.pop("lr"), beta=rest.pop("beta"), skipped=int(self.bad))
        return {**out, **rest}  # a second optimizer's learning rate (the critic's disc_lr) last

"""One training step: the generator (VAE) update and, for a VAE–GAN from ``disc_start`` on, the
discriminator update, with AMP, DDP, clipping, the NaN guard, LR schedules and EMA.

:class:`TrainStep` owns everything a step changes (optimizers, GradScaler, schedulers, EMA) and
hands it to checkpoints as the checkpoint's ``optimizer_states`` / ``scaler_state`` /
``scheduler_states`` / ``ema_state`` entries.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import torch
from torch import nn

from medvae.config import TrainConfig
from medvae.training import losses
from medvae.training.distributed import DistInfo, all_reduce_mean, wrap_ddp
from medvae.training.runtime import compile_model
from medvae.training.schedule import (
    beta_at,
    ema_model,
    ema_state_dict,
    load_ema_state,
    load_scheduler_state,
    warmup_cosine,
)


def device_path(device: torch.device, amp_dtype: torch.dtype | None) -> bool:
    """Whether steps keep the NaN guard on the device (CUDA, unless fp16's GradScaler decides): a host
    read-back per step would make the CPU wait for the GPU at every step."""
    return device.type == "cuda" and amp_dtype != torch.float16


@contextlib.contextmanager
def frozen(module: nn.Module | None):
    """``module``'s parameters get no gradients inside the block (the critic while the generator
    loss runs: its gradients there would be thrown away)."""
    params = [p for p in module.parameters() if p.requires_grad] if module is not None else []
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class TrainStep:
    """Runs training steps of ``model``; ``step(x, i)`` returns the step's scalars for the log.

    Under torchrun the generator (the model minus its discriminator) and the discriminator are each
    wrapped in DistributedDataParallel (:func:`medvae.training.distributed.wrap_ddp`); the losses
    work on the generator wrapper's ``forward`` output, and the critic's loss on one forward of
    the critic wrapper.

    Args:
        model: a medvae model on its device (discriminator included for the VAE–GAN).
        tc: TrainConfig (optimizer, schedules, GAN and guard settings).
        device: the model's device.
        info: this process's DistInfo.
        amp_dtype: autocast dtype or None (fp16 turns on the GradScaler).
        total_steps: length of the LR schedule.
    """

    def __init__(self, model: nn.Module, tc: TrainConfig, device: torch.device, info: DistInfo,
                 amp_dtype: torch.dtype | None, total_steps: int):
        self.model, self.tc, self.device, self.info, self.amp_dtype = model, tc, device, info, amp_dtype
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        self.critic = getattr(model, "discriminator", None)
        self.gen_params = [p for p in model.generator_parameters() if p.requires_grad]
        self.disc_params = [p for p in self.critic.parameters() if p.requires_grad] if self.critic else []
        # The device path (CUDA without fp16) keeps the NaN guard on the device: the fused AdamW takes its
        # found_inf flag, so no step waits for the GPU. fp16 keeps the host path (its GradScaler decides).
        self.deferred = device_path(device, amp_dtype)
        # CPU: the multi-tensor AdamW (the same arithmetic, bit for bit, as the per-parameter loop torch
        # picks on a CPU, in a few calls instead of ~8 per parameter tensor); CUDA: fused on the device
        # path, else torch's default (multi-tensor).
        impl = {"fused": True} if self.deferred else {"foreach": True} if device.type == "cpu" else {}
        adamw = dict(betas=tuple(tc.betas), weight_decay=tc.weight_decay, **impl)
        self.optimizers = {"generator": torch.optim.AdamW(self.gen_params, lr=tc.lr, **adamw)}
        if self.disc_params:
            self.optimizers["discriminator"] = torch.optim.AdamW(self.disc_params, lr=tc.disc_lr, **adamw)
        self.schedulers = {k: warmup_cosine(o, tc.warmup_steps, total_steps) for k, o in self.optimizers.items()}
        self.ema, self._ema_view = ema_model(model, tc.ema_decay) if tc.ema_decay > 0 else (None, None)
        if tc.compile:
            compile_model(model, discriminator=tc.r1_gamma == 0)
        self.generator = wrap_ddp(model, info, device, ignore=self.critic)
        self.discriminator = wrap_ddp(self.critic, info, device) if self.critic is not None else None

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
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _backward(self, loss: torch.Tensor, params: list, name: str) -> torch.Tensor:
        """Scaled backward (DDP averages the gradients on the way), unscale and clip; the grad norm."""
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizers[name])
        max_norm = self.tc.grad_clip if self.tc.grad_clip > 0 else math.inf
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def backward(self, x: torch.Tensor, step: int, beta: float, target: torch.Tensor | None = None,
                 weight: torch.Tensor | None = None) -> tuple[dict, list[torch.Tensor]]:
        """Gradients of step ``step`` on this rank's batch ``x``, averaged over ranks, unscaled and
        clipped; no optimizer step. Returns this rank's loss terms and the gradient norms.
        ``target``: what the output should match (the clean batch of the denoise task; default x);
        ``weight``: per-pixel weights of the likelihood term (None: every pixel 1)."""
        t = self.tc
        target = x if target is None else target
        critic_on = self.critic is not None and step >= t.disc_start
        for o in self.optimizers.values():
            o.zero_grad(set_to_none=True)
        with frozen(self.critic if critic_on else None):
            with self._autocast():
                out = self.generator(x, n_prior=x.shape[0] if critic_on else 0)
                loss, terms = losses.generator_loss(
                    target, out, self.model.likelihood, beta=beta, free_bits=t.free_bits, discriminator=self.critic,
                    last_layer=self.model.last_decoder_weight, gan_loss=t.gan_loss, adv_weight=t.adv_weight,
                    fm_weight=t.feature_matching_weight, weight=weight)
            norms = [self._backward(loss, self.gen_params, "generator")]
        terms = {"loss": loss.detach(), **{k: v for k, v in terms.items() if k != "loss"}}
        if critic_on:
            fake = torch.cat([out.x_hat.detach(), out.x_prior.detach()], 0)
            with self._autocast():
                d_loss, d_terms = losses.discriminator_loss(self.discriminator, target, fake, gan_loss=t.gan_loss,
                                                            r1_gamma=t.r1_gamma)
            norms.append(self._backward(d_loss, self.disc_params, "discriminator"))
            terms.update({"d_loss": d_loss.detach(), **{k: v for k, v in d_terms.items() if k != "d_loss"}})
        return terms, norms

    def step(self, x: torch.Tensor, step: int, target: torch.Tensor | None = None,
             weight: torch.Tensor | None = None) -> StepRecord:
        """Train on batch ``x`` (this rank's share) as step ``step`` (0-based), toward ``target``
        (default ``x``; the clean batch when ``x`` is its noisy copy), the likelihood's pixels
        weighted by ``weight`` (None: all 1).

        A step whose loss or gradient norm is not finite on any rank is skipped (no optimizer or
        EMA update) on every rank; the schedules advance anyway. On the host path (CPU, MPS,
        fp16) the decision reads the step's values back once (free on a CPU, whose tensors are
        computed as the call returns); on the device path (CUDA) it stays on the device: the
        fused optimizer and the EMA take the step's ``found_inf`` flag, and nothing waits for the
        GPU until the trainer reads the record (every ``log_every`` steps).

        Returns:
            the step's :class:`StepRecord`: the rank-mean loss terms, ``grad_norm``, ``lr`` (and
            ``disc_lr``), ``beta`` and whether the step was skipped, and what was not finite.
        """
        lrs = {k: s.get_last_lr()[0] for k, s in self.schedulers.items()}
        beta = beta_at(step, self.tc.beta, self.tc.beta_warmup_steps)
        terms, norms = self.backward(x, step, beta, target, weight)
        names = [*terms, "grad_norm", "d_grad_norm"][: len(terms) + len(norms)]
        values = all_reduce_mean(torch.stack([v.float() for v in [*terms.values(), *norms]]), self.info)
        d_on = "d_loss" in terms
        loss_at = [names.index("loss")] + ([names.index("d_loss")] if d_on else [])
        norm_at = [i for i, n in enumerate(names) if n in ("grad_norm", "d_grad_norm")]
        if self.deferred:
            finite = torch.isfinite(values)
            # [loss not finite, gradient not finite]; with fp16 (host path only) a non-finite gradient
            # at a finite loss would be the GradScaler's own overflow probe
            flags = torch.stack([~finite[loss_at].all(), ~finite[norm_at].all()])
            bad = flags.any()
            self._update(bad, d_on)
            host, problem = None, flags
        else:
            host = values.tolist()  # the step's one host sync
            losses_ok = all(math.isfinite(host[i]) for i in loss_at)
            norms_ok = all(math.isfinite(host[i]) for i in norm_at)
            # With fp16 a non-finite *gradient* at a finite loss is the GradScaler's overflow probe: it
            # skips that step itself and lowers the scale. Anything else non-finite is a bad step.
            bad = not losses_ok or (not self.scaler.is_enabled() and not norms_ok)
            if bad:
                for o in self.optimizers.values():
                    o.zero_grad(set_to_none=True)
            else:
                self.scaler.step(self.optimizers["generator"])
                if d_on:
                    self.scaler.step(self.optimizers["discriminator"])
                if self.ema is not None:
                    self.ema.update_parameters(self._ema_view)
            problem = None if not bad else "loss" if not losses_ok else "gradient norm"
        self.scaler.update()
        with warnings.catch_warnings():  # a skipped first step: "scheduler.step() before optimizer.step()"
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            for s in self.schedulers.values():
                s.step()
        extra = {"lr": lrs["generator"], "beta": beta}
        if "discriminator" in lrs:
            extra["disc_lr"] = lrs["discriminator"]
        return StepRecord(names, values, host, bad, problem, extra)

    def _update(self, bad: torch.Tensor, d_on: bool) -> None:
        """The device path's optimizer and EMA updates, masked by the 0-d flag ``bad`` (no host sync).

        The fused AdamW skips the update (and its step count) where ``found_inf`` is 1, as under a
        GradScaler; the EMA moves by ``(1 - decay) * ok``, i.e. not at all on a skipped step.
        """
        found_inf = bad.to(torch.float32)
        for name in ("generator", "discriminator") if d_on else ("generator",):
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


class StepRecord:
    """What one training step reports: its loss terms and gradient norms, and whether it was skipped.

    On the host path everything is read already (``host``, ``bad``, ``problem``). On the device path
    the values and the flags ``[loss not finite, gradient not finite]`` stay on the device until
    :meth:`settle` (the skip decision, read back by the trainer for many steps at once) and
    :meth:`entry` (the values).
    """

    def __init__(self, names: list[str], values: torch.Tensor, host: list[float] | None,
                 bad: bool | torch.Tensor, problem: str | None | torch.Tensor, extra: dict):
        self.names, self.values, self.host, self.extra = names, values, host, extra
        self.deferred = host is None
        self.flags = problem if self.deferred else None
        self.bad: bool | None = None if self.deferred else bool(bad)
        self.problem: str | None = None if self.deferred else problem
        self.step = -1  # set by the trainer

    def settle(self, loss_bad: float, norm_bad: float) -> None:
        """Set the skip decision from its flags, read back by the caller (many records, one sync)."""
        self.bad = bool(loss_bad or norm_bad)
        self.problem = None if not self.bad else "loss" if loss_bad else "gradient norm"

    def entry(self) -> dict:
        """The log entry: the loss terms, ``grad_norm``, ``lr``, ``beta``, ``skipped`` (``disc_lr``)."""
        if self.host is None:
            self.host = self.values.tolist()
        if self.bad is None:
            self.settle(*self.flags.float().tolist())
        out = dict(zip(self.names, self.host, strict=True))
        out.pop("d_grad_norm", None)
        out.update(lr=self.extra["lr"], beta=self.extra["beta"], skipped=int(self.bad))
        if "disc_lr" in self.extra:
            out["disc_lr"] = self.extra["disc_lr"]
        return out

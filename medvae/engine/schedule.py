"""Schedules that are pure functions of the step (LR warm-up + cosine, KL annealing) and EMA weights.

Being functions of the step, the schedules resume exactly: the checkpoint's step is their state.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_factor: float = 0.0) -> float:
    """Multiplier of the base LR at optimizer step ``step`` (0-based).

    Linear warm-up from 1/warmup to 1 over ``warmup_steps``, then cosine decay to ``min_factor``
    at ``total_steps``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * t))


def beta_at(step: int, beta: float, warmup_steps: int) -> float:
    """KL weight at ``step``: linear annealing from 0 to ``beta`` over ``warmup_steps``."""
    if warmup_steps <= 0:
        return beta
    return beta * min(1.0, step / warmup_steps)


class WarmupCosine:
    """Sets the LR of an optimizer's param groups from the step; ``state_dict`` for checkpoints."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
        self.optimizer = optimizer
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.last_lr = list(self.base_lrs)

    def set_step(self, step: int) -> float:
        """Set the LR for optimizer step ``step``; returns the first group's LR."""
        f = lr_factor(step, self.warmup_steps, self.total_steps)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs, strict=False):
            g["lr"] = base * f
        self.last_lr = [g["lr"] for g in self.optimizer.param_groups]
        return self.last_lr[0]

    def state_dict(self) -> dict:
        return {"warmup_steps": self.warmup_steps, "total_steps": self.total_steps,
                "base_lrs": list(self.base_lrs), "last_lr": list(self.last_lr)}

    def load_state_dict(self, state: dict) -> None:
        # total_steps is not restored: a resumed run may be given a longer --max-steps
        self.base_lrs = list(state["base_lrs"])
        self.last_lr = list(state["last_lr"])


class EMA:
    """Exponential moving average of the generator's weights (the discriminator is not averaged).

    ``state_dict()`` is a complete model state dict (averaged generator parameters, current
    buffers and discriminator), so ``model.load_state_dict(ema.state_dict())`` gives the EMA model.
    """

    def __init__(self, model: nn.Module, decay: float, generator_params):
        self.decay = decay
        gen_ids = {id(p) for p in generator_params}
        self.names = [n for n, p in model.named_parameters() if id(p) in gen_ids]
        params = dict(model.named_parameters())
        self.shadow = {n: params[n].detach().clone().float() for n in self.names}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        shadow = [self.shadow[n] for n in self.names]
        current = [params[n].detach().float() for n in self.names]
        torch._foreach_lerp_(shadow, current, 1.0 - self.decay)

    def state_dict(self, model: nn.Module) -> dict:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for n in self.names:
            state[n] = self.shadow[n].to(state[n].dtype).clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        for n in self.names:
            self.shadow[n].copy_(state[n])

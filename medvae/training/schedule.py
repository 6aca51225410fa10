"""Schedules that are functions of the step (LR warm-up + cosine, KL annealing) and EMA weights.

The LR schedule is a ``torch.optim.lr_scheduler.LambdaLR`` whose lambda is :func:`lr_factor`;
the EMA is a ``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn``, over the
trained model's parameters (a VAE–GAN's critic is not averaged). Both resume exactly from their
checkpointed states.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


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


# --------------------------------------------------------------------------- LR schedule
def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """``LambdaLR`` with :func:`lr_factor`: the LR of step ``s`` is ``base * lr_factor(s)``.

    Call ``scheduler.step()`` once per training step (skipped steps too), after the optimizer.
    The lambda is a plain closure, so ``state_dict`` does not hold ``total_steps``: a run resumed
    with a longer ``max_steps`` continues on the longer cosine (see :func:`load_scheduler_state`).
    """

    def factor(step: int) -> float:
        return lr_factor(step, warmup_steps, total_steps)

    return LambdaLR(optimizer, factor)


def load_scheduler_state(scheduler: LambdaLR, state: dict, step: int) -> None:
    """Restore a scheduler saved after ``step`` steps and set the optimizer's LR from the lambda.

    The LR is recomputed rather than taken from the optimizer's saved state, so a resumed run given
    another ``max_steps`` uses its own schedule from the next step on. Also reads the state of the
    hand-written scheduler of medvae <= 0.1 (``base_lrs`` and ``last_lr`` only).
    """
    state = dict(state)
    if "last_epoch" not in state:  # medvae <= 0.1: {"warmup_steps", "total_steps", "base_lrs", "last_lr"}
        state = {"base_lrs": list(state["base_lrs"]), "last_epoch": step,
                 "lr_lambdas": [None] * len(scheduler.lr_lambdas)}
    scheduler.load_state_dict(state)
    scheduler.last_epoch = step
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports


# --------------------------------------------------------------------------- EMA
class GeneratorView(nn.Module):
    """The model's submodules, parameters and buffers except ``exclude`` (a submodule another optimizer
    trains: the VAE–GAN's critic), under the model's own names (so its state_dict keys are a subset of
    the model's). Shares the tensors."""

    def __init__(self, model: nn.Module, exclude: nn.Module | None = None) -> None:
        super().__init__()
        for name, child in model.named_children():
            if child is not exclude:
                self.add_module(name, child)
        for name, p in model.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in model.named_buffers(recurse=False):
            self.register_buffer(name, b)


def ema_model(model: nn.Module, decay: float, exclude: nn.Module | None = None
              ) -> tuple[AveragedModel, GeneratorView]:
    """An ``AveragedModel`` of the model without ``exclude`` (:class:`GeneratorView`) with
    ``get_ema_multi_avg_fn(decay)``, and the view of ``model`` to pass to its ``update_parameters`` after
    every optimizer step.

    The average starts at the current weights (``W_0^EMA = W_0``; the first update then gives
    ``decay * W_0 + (1 - decay) * W_1``). Buffers are not averaged: they follow the model.
    """
    view = GeneratorView(model, exclude)
    ema = AveragedModel(view, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)
    ema.update_parameters(view)  # n_averaged 0 -> 1: a copy of W_0
    return ema, view


def ema_state_dict(ema: AveragedModel, model: nn.Module) -> dict:
    """The checkpoint's ``ema_state``: ``model``'s full state dict with the averaged generator
    parameters in place of the current ones (discriminator and buffers as they are), so
    ``model.load_state_dict(ema_state_dict(...))`` gives the EMA model."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, p in ema.module.named_parameters(remove_duplicate=False):
        state[name] = p.detach().to(state[name].dtype).clone()
    return state


def load_ema_state(ema: AveragedModel, state: dict, n_updates: int) -> None:
    """Restore :func:`ema_state_dict`'s averaged parameters; ``n_updates``: EMA updates done."""
    with torch.no_grad():
        for name, p in ema.module.named_parameters():
            p.copy_(state[name])
    ema.n_averaged.fill_(1 + n_updates)

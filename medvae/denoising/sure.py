"""``--objective sure``: training a denoiser that sees every pixel on the noisy store alone, by PG-SURE, an
unbiased estimate of its clean-image MSE under Poisson–Gaussian noise.

Noise (our [0, 1] scale): y = s + n with E[n | s] = 0 and Var[n | s] = a·s + b, the calibrated noise model
(``model.noise_a`` / ``noise_b``; :func:`medvae.denoising.selfsupervised.calibrate_noise_model`): ``a`` is the
Poisson gain (image units per photon, γ below), ``b`` the Gaussian read-noise variance (σ²). For a denoiser f
and N pixels, PG-SURE (PURE / PG-URE of Le Montagner, Angelini & Olivo-Marin 2014, "An unbiased risk estimator
for image denoising in the presence of mixed Poisson–Gaussian noise", IEEE TIP 23(3), eq. 19; the form of
deepinv 0.5's ``SurePGLoss``) with Monte-Carlo derivatives (Ramani, Blu & Unser 2008, "Monte-Carlo SURE"):

    SURE(f, y) = ‖f(y) − y‖² / N − a·mean(y) − b
               + 2 / (N τ₁) · (u ⊙ (a·y + b))ᵀ (f(y + τ₁ u) − f(y))                       (divergence)
               − 2 a b / (N τ₂²) · vᵀ (f(y + τ₂ v) + f(y − τ₂ v) − 2 f(y))                  (second order)

with u a ±1 (Rademacher) probe, so E_u of the divergence term is 2/N · Σᵢ (a yᵢ + b) ∂fᵢ/∂yᵢ (its O(τ₁) remainder
has mean 0: E[uᵢ uⱼ uₖ] = 0), and v a two-point probe with E v = 0, E v² = 1, E v³ = 1 (v = −√((1−p)/p) with
probability p = ½ + ½/√5, else √(p/(1−p))), so E_v of the last term is −2ab/N · Σᵢ ∂²fᵢ/∂yᵢ². τ₁ = 10⁻³ and
τ₂ = 10⁻² on the [0, 1] scale (deepinv's defaults for data in [0, 1]). For Gaussian noise (a = 0) this is the
MC-SURE of Ramani et al., ‖f(y) − y‖²/N − b + 2b/N · div f(y); with a = 0 or b = 0 the second-order term is 0
and not computed. Then E_n[SURE] = E_n‖f(y) − s‖² / N: exactly for a linear f (and any τ₁), and to first order
in a for others (the paper's Taylor step: the Poisson part's bias is a²/N · Σᵢ sᵢ ∂²fᵢ/∂yᵢ²).

Training (:class:`SureTask`): each step's input stacks y, y + τ₁u and (second order) y ± τ₂v along the batch, so
one forward (through the DDP wrapper) gives every f the estimate needs; the target carries y and the probes
(drawn from ``(train.seed, step)``), and the task's :meth:`SureTask.loss` is the batch mean of SURE, float32
(reduced precision would drown the τ₁-sized differences: :func:`medvae.denoising.selfsupervised.resolve_sure`
trains sure in float32). The network is n2v's (dae, N2V2 settings) without a blind spot. best.pt: the same
estimate on held-out noisy patches (the val split, or ``blindspot.holdout`` of the train patches:
:func:`medvae.denoising.selfsupervised.held_out_rows`) with fixed probes, as ``sure_mse`` and ``sure_psnr`` =
10 log10(1 / sure_mse), an estimate of the PSNR against the unseen clean patches (higher is better).
``medvae denoise`` applies the network as it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from medvae.config import TrainConfig
from medvae.data.loader import Batch
from medvae.data.store import PatchStore
from medvae.denoising.noise import step_generator
from medvae.denoising.supervised import VAL_SEED_OFFSET, random_crop
from medvae.training.tasks import TrainingPair
from medvae.training.validate import over_batches

TAU1 = 1e-3  # divergence step on the [0, 1] scale
TAU2 = 1e-2  # second-derivative step
_P = 0.5 + 0.5 / math.sqrt(5.0)  # the skewed probe's probability of its negative value (E v³ = 1)


def rademacher(like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """±1 with probability ½ each, float32, ``like``'s shape, drawn on ``gen``'s device, moved to ``like``'s."""
    u = torch.randint(0, 2, like.shape, generator=gen, device=gen.device, dtype=torch.int8)
    return (2.0 * u.float() - 1.0).to(like.device)


def skewed_probe(like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The second-order probe: mean 0, variance 1, third moment 1 (module docstring), float32."""
    neg = torch.rand(like.shape, generator=gen, device=gen.device) < _P
    return torch.where(neg, -math.sqrt((1 - _P) / _P), math.sqrt(_P / (1 - _P))).float().to(like.device)


def second_order(a: float, b: float) -> bool:
    """Whether the second-order term is there (a > 0 and b > 0); else it is 0 and costs no forward."""
    return a > 0 and b > 0


def probes(y: torch.Tensor, a: float, b: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(u, v)``: the divergence's ±1 probe and (second order only, else None) the skewed probe, ``y``'s shape."""
    u = rademacher(y, gen)
    return u, skewed_probe(y, gen) if second_order(a, b) else None


def perturbed(y: torch.Tensor, u: torch.Tensor, v: torch.Tensor | None, tau1: float = TAU1,
              tau2: float = TAU2) -> torch.Tensor:
    """The inputs whose outputs SURE needs, stacked along the batch: y, y + τ₁u (and y + τ₂v, y − τ₂v)."""
    parts = [y, y + tau1 * u] + ([y + tau2 * v, y - tau2 * v] if v is not None else [])
    return torch.cat(parts)


def pg_sure(y: torch.Tensor, outputs: torch.Tensor, u: torch.Tensor, v: torch.Tensor | None, a: float, b: float,
            tau1: float = TAU1, tau2: float = TAU2) -> torch.Tensor:
    """PG-SURE per image, ``(B,)`` float32 (module docstring), from the noisy ``y`` ``(B, C, H, W)``, the
    denoiser's ``outputs`` on :func:`perturbed` ``(y, u, v)`` and the probes. Mean over pixels: an estimate of
    the MSE against the clean image on the [0, 1] scale."""
    y, u, f = y.float(), u.float(), outputs.float()
    n = y.shape[0]
    f0, f1 = f[:n], f[n:2 * n]
    a, b = max(float(a), 0.0), max(float(b), 0.0)
    risk = (f0 - y) ** 2 - a * y - b + (2.0 / tau1) * u * (a * y + b) * (f1 - f0)
    if v is not None and second_order(a, b):
        fp, fm = f[2 * n:3 * n], f[3 * n:4 * n]
        risk = risk - (2.0 * a * b / tau2 ** 2) * v.float() * (fp + fm - 2.0 * f0)
    return risk.flatten(1).mean(1)


def sure(f: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor, a: float, b: float, gen: torch.Generator,
         tau1: float = TAU1, tau2: float = TAU2) -> torch.Tensor:
    """PG-SURE ``(B,)`` of the denoiser ``f`` (a tensor -> tensor function of a batch) at ``y``, probes from ``gen``."""
    u, v = probes(y, a, b, gen)
    return pg_sure(y, f(perturbed(y.float(), u, v, tau1, tau2)), u, v, a, b, tau1, tau2)


class SureTask:
    """PG-SURE training of a denoiser on a store of noisy patches (module docstring); one per training run.

    Args:
        store: the noisy patch store.
        a, b: the noise variance a·s + b on the [0, 1] scale (the run's ``model.noise_a`` / ``noise_b``).
        seed: the run's ``train.seed``: the probes (and crop) of step s come from ``(seed, s)`` alone.
        crop: train on random crops of this size (``noise.crop``; 0: whole patches).
        held_out: store rows validated on in place of a val split (never trained on), or None.
    """

    name = "denoise"
    best_key = "sure_psnr"
    conditional = False

    def __init__(self, store: PatchStore, a: float, b: float, seed: int, crop: int = 0,
                 held_out: np.ndarray | None = None):
        self.store, self.a, self.b = store, max(float(a), 0.0), max(float(b), 0.0)
        self.seed, self.crop, self.held_out = int(seed), int(crop), held_out
        self.parts = 4 if second_order(self.a, self.b) else 2  # forwards per image

    def training_pair(self, batch: Batch, step: int) -> TrainingPair:
        """Input: the perturbed stack (``parts`` × B images); target: y and its probes, stacked (the loss
        splits them); no pixel weight."""
        gen = step_generator(self.seed, step, batch.x.device)
        (y,) = random_crop(self.crop, gen, batch.x)
        y = y.float()
        u, v = probes(y, self.a, self.b, gen)
        target = torch.cat([y, u] + ([v] if v is not None else []))
        return TrainingPair(perturbed(y, u, v), target)

    def loss(self, target: torch.Tensor, out, beta: float, weight: torch.Tensor | None):
        """The step's loss in place of the model family's (:data:`medvae.training.step.Loss`): the batch mean
        of PG-SURE (a per-pixel MSE estimate) of the model's ``out.x_hat`` on the perturbed stack."""
        n = target.shape[0] // (self.parts // 2 + 1)
        y, u = target[:n], target[n:2 * n]
        v = target[2 * n:3 * n] if self.parts == 4 else None
        risk = pg_sure(y, out.x_hat, u, v, self.a, self.b).mean()
        return risk, {"sure_mse": risk}

    def validate(self, model: torch.nn.Module, tc: TrainConfig, device: torch.device,
                 channels_last: bool = False) -> dict[str, float]:
        """``sure_mse`` (mean PG-SURE over the held-out patches, the same probes every time, float32) and
        ``sure_psnr`` = 10 log10(1 / sure_mse)."""

        def batch_metrics(i: int, rows: np.ndarray) -> dict[str, torch.Tensor]:
            y = torch.from_numpy(self.store.get(rows)).to(device).float()
            u, v = probes(y, self.a, self.b, step_generator(self.seed + VAL_SEED_OFFSET, i, device))
            with torch.autocast(device.type, enabled=False):
                out = model(perturbed(y, u, v)).x_hat
            return {"sure_mse": pg_sure(y, out, u, v, self.a, self.b)}

        val = over_batches(model, self.store, tc.batch_size, tc.val_batches, batch_metrics, torch.float64,
                           rows=self.held_out)
        if not val:
            return {}
        return {**val, "sure_psnr": 10.0 * math.log10(1.0 / max(val["sure_mse"], 1e-12))}

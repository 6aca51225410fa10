"""Learned priors for sampling: a Gaussian mixture on the aggregate posterior (Ghosh et al. 2020), or a
latent diffusion model of it (:mod:`medvae.synthesis.diffusion`; :func:`prior_for` fits and caches either).

A VAE's decoder is trained on codes from q(z|x), whose aggregate over the training set is rarely
N(0, I): prior samples from N(0, I) fall into its "holes" and decode to implausible images.
Ex-post density estimation fits a density to the encoder means of the training split and
samples from that instead. The mixture is fitted with scikit-learn's ``GaussianMixture`` (full
covariances, seeded) the first time a checkpoint is sampled with it, and saved in the run's
``priors/`` (:meth:`medvae.training.rundir.RunDir.prior_path`), a dict of tensors that loads with
``torch.load(weights_only=True)``.

Sampling is a deterministic transform of given noise, so generation keeps its "sample i depends
only on (seed, i)" contract: component ``k = F⁻¹(u)`` from a uniform ``u`` (inverse CDF of the
weights) and ``z = mean_k + L_k · eps`` from a standard normal ``eps``.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from medvae.config import DiffusionPriorConfig
from medvae.data.conditions import model_inputs
from medvae.data.store import PatchStore
from medvae.errors import CheckpointError, InputError
from medvae.files import atomic_path, sha256_json
from medvae.synthesis.diffusion import DiffusionPrior, fit_diffusion
from medvae.training.rundir import RunDir

log = logging.getLogger(__name__)
FULL_MAX_DIM = 512  # a full covariance above this many latent dimensions is too large and too poorly determined


class GaussianMixturePrior:
    """Fitted mixtures, one per condition id (one in all for an unconditional model): ``weights (C, K)``,
    ``means (C, K, D)``, ``scale (C, K, D, D)`` lower-triangular (full covariances) or ``(C, K, D)`` (diagonal:
    above FULL_MAX_DIM dimensions) (float64; a condition with fewer components pads with weight 0)."""

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, scale: torch.Tensor, info: dict):
        if weights.dim() == 1:  # one mixture
            weights, means, scale = weights[None], means[None], scale[None]
        self.weights, self.means, self.scale, self.info = weights.double(), means.double(), scale.double(), info
        self.diagonal = self.scale.dim() == 3

    def transform(self, eps: torch.Tensor, u: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """eps: (B, D) standard normal, u: (B,) uniform in [0, 1), ids: (B,) condition ids (None: 0)
        -> z: (B, D) float32 samples of each row's mixture."""
        ids = torch.zeros(len(eps), dtype=torch.long) if ids is None else ids.long().cpu()
        cdf = torch.cumsum(self.weights[ids], 1)
        k = torch.searchsorted(cdf, (u.double()[:, None]).clamp(max=cdf[:, -1:] - 1e-12), right=True)[:, 0]
        scale = self.scale[ids, k]
        z = self.means[ids, k] + (scale * eps.double() if self.diagonal else
                                  torch.einsum("bij,bj->bi", scale, eps.double()))
        return z.float()

    def state_dict(self) -> dict:
        return {"kind": "gmm", "weights": self.weights, "means": self.means,
                "scale_diag" if self.diagonal else "scale_tril": self.scale, **self.info}


SamplingPrior = GaussianMixturePrior | DiffusionPrior  # each maps (eps, u, ids) to latents: ``transform``


@torch.no_grad()
def encoder_means(model, store: PatchStore, split: str = "train", max_patches: int = 20_000,
                  batch_size: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """Posterior means ``(N, D)`` float64 of up to ``max_patches`` patches of ``split`` (seeded subset)
    and their condition ids ``(N,)`` (None for a model without id condition)."""
    rows = store.select(split=split)
    if len(rows) > max_patches:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_patches, replace=False))
    device = next(model.parameters()).device
    codes, ids = [], []
    for i in range(0, len(rows), batch_size):
        x, y = model_inputs(store, rows[i:i + batch_size], model.config)
        y = None if y is None else torch.from_numpy(y)
        with model.conditioned_on(y):
            codes.append(model.encode(torch.from_numpy(x).to(device))[0].double().cpu())
        ids.append(y)
    return torch.cat(codes).numpy(), None if ids[0] is None else torch.cat(ids).numpy()


def _fit_one(codes: np.ndarray, components: int, seed: int):
    from sklearn.mixture import GaussianMixture  # scikit-learn is slow to import; only when fitting

    k = max(1, min(components, len(codes) // 2))
    full = codes.shape[1] <= FULL_MAX_DIM
    gm = GaussianMixture(n_components=k, covariance_type="full" if full else "diag", reg_covar=1e-5,
                         random_state=seed, max_iter=200).fit(codes)
    scale = np.linalg.cholesky(gm.covariances_) if full else np.sqrt(gm.covariances_)
    return gm.weights_, gm.means_, scale, float(gm.score(codes)) * len(codes)


def fit_gmm(codes: np.ndarray, components: int = 10, seed: int = 0, ids: np.ndarray | None = None,
            n_conditions: int = 1) -> GaussianMixturePrior:
    """Fit a Gaussian mixture (components capped at N // 2; full covariances up to FULL_MAX_DIM dimensions,
    diagonal above) to ``codes (N, D)``, one per condition id in ``ids`` (0..n_conditions-1) when given; a
    condition with fewer than 2 codes gets N(0, I)."""
    ids = np.zeros(len(codes), dtype=np.int64) if ids is None else np.asarray(ids)
    d = codes.shape[1]
    fits = []
    for c in range(n_conditions):
        mine = codes[ids == c]
        if len(mine) < 2:  # a class kept with one patch in a small subset: its prior stays N(0, I)
            log.warning("condition %d has %d training codes, too few for a mixture: it samples N(0, I)", c, len(mine))
            fits.append((np.ones(1), np.zeros((1, d)), np.eye(d)[None] if d <= FULL_MAX_DIM else np.ones((1, d)),
                         0.0))
        else:
            fits.append(_fit_one(mine, components, seed))
    k = max(len(f[0]) for f in fits)
    weights, means = np.zeros((n_conditions, k)), np.zeros((n_conditions, k, d))
    scales = np.ones((n_conditions, k, d)) if d > FULL_MAX_DIM else np.tile(np.eye(d), (n_conditions, k, 1, 1))
    for c, (w, m, scale, _) in enumerate(fits):
        weights[c, :len(w)], means[c, :len(w)], scales[c, :len(w)] = w, m, scale
    info = {"n_fit": int(len(codes)), "components": int(k),
            "mean_log_likelihood": float(sum(f[3] for f in fits) / len(codes))}
    return GaussianMixturePrior(torch.from_numpy(weights), torch.from_numpy(means), torch.from_numpy(scales), info)


def prior_for(checkpoint: str | os.PathLike, model, store: PatchStore, components: int = 10, seed: int = 0,
              kind: str = "gmm", diffusion: DiffusionPriorConfig | None = None) -> SamplingPrior | None:
    """The sampling prior ``kind`` of ``checkpoint``'s model: None for ``standard`` (N(0, I)); for ``gmm`` the
    Gaussian mixture, for ``diffusion`` the latent diffusion model (:mod:`medvae.synthesis.diffusion`, config
    ``diffusion``; a spatial latent only) — loaded, or fitted on the training split's encoder means and saved
    (atomically) in the run's priors (:meth:`~medvae.training.rundir.RunDir.prior_path`: keyed by the
    checkpoint's content, and a diffusion prior by its config)."""
    if kind == "standard":
        return None
    shape = getattr(model, "latent_shape", None)
    if kind == "diffusion" and shape is None:
        raise InputError(f"{checkpoint}: the diffusion prior needs a spatial latent; train with model.latent: spatial "
                         "(vae / vaegan), monai-kl or unet-vae, or use --prior gmm")
    cfg = diffusion or DiffusionPriorConfig()
    path = RunDir(checkpoint).prior_path(checkpoint)
    if kind == "diffusion":
        path = path.with_name(f"{path.stem}-diffusion-{sha256_json(cfg.model_dump(mode='json'))[:8]}.pt")
    device = next(model.parameters()).device
    if path.is_file():
        return load_prior(path, device)
    if store.select(split="train").size < 2:
        raise InputError(f"{store.path}: no training patches to fit the {kind} prior on; use the standard prior "
                         "(--prior standard)")
    model.eval()
    codes, ids = encoder_means(model, store, seed=seed)
    n_conditions = len(model.config.condition_names) if ids is not None else 1
    if kind == "diffusion":
        prior = fit_diffusion(codes, shape, cfg, ids, n_conditions, device)
    else:
        prior = fit_gmm(codes, components, seed, ids, n_conditions)
        log.info("fitted a %d-component Gaussian mixture prior on %d training codes: %s", prior.info["components"],
                 prior.info["n_fit"], path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(prior.state_dict(), tmp)
    return prior.to(device) if kind == "diffusion" else prior


def load_prior(path: str | os.PathLike, device: torch.device | str = "cpu") -> SamplingPrior:
    """A saved prior (``torch.load(weights_only=True)``): a mixture, or a diffusion prior on ``device``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("kind") == "diffusion":
            return DiffusionPrior.from_state(state).to(device)
        scale = state["scale_tril"] if "scale_tril" in state else state["scale_diag"]
        info = {k: v for k, v in state.items() if k not in ("kind", "weights", "means", "scale_tril", "scale_diag")}
        return GaussianMixturePrior(state["weights"], state["means"], scale, info)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user-facing problem
        raise CheckpointError(f"{path}: unreadable prior ({err}); delete it to fit it again") from None

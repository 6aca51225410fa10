"""Learned priors for sampling: a Gaussian mixture on the aggregate posterior (Ghosh et al. 2020).

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

from medvae.data.conditions import model_inputs
from medvae.data.store import PatchStore
from medvae.errors import CheckpointError, InputError
from medvae.files import atomic_path
from medvae.training.rundir import RunDir

log = logging.getLogger(__name__)


class GaussianMixturePrior:
    """Fitted mixtures, one per condition id (one in all for an unconditional model): ``weights (C, K)``,
    ``means (C, K, D)``, ``scale_tril (C, K, D, D)`` (float64; a condition with fewer components pads
    with weight 0)."""

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, scale_tril: torch.Tensor, info: dict):
        if weights.dim() == 1:  # one mixture
            weights, means, scale_tril = weights[None], means[None], scale_tril[None]
        self.weights, self.means, self.scale_tril, self.info = weights.double(), means.double(), \
            scale_tril.double(), info

    def transform(self, eps: torch.Tensor, u: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """eps: (B, D) standard normal, u: (B,) uniform in [0, 1), ids: (B,) condition ids (None: 0)
        -> z: (B, D) float32 samples of each row's mixture."""
        ids = torch.zeros(len(eps), dtype=torch.long) if ids is None else ids.long().cpu()
        cdf = torch.cumsum(self.weights[ids], 1)
        k = torch.searchsorted(cdf, (u.double()[:, None]).clamp(max=cdf[:, -1:] - 1e-12), right=True)[:, 0]
        z = self.means[ids, k] + torch.einsum("bij,bj->bi", self.scale_tril[ids, k], eps.double())
        return z.float()

    def state_dict(self) -> dict:
        return {"kind": "gmm", "weights": self.weights, "means": self.means, "scale_tril": self.scale_tril,
                **self.info}


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
    gm = GaussianMixture(n_components=k, covariance_type="full", reg_covar=1e-5, random_state=seed,
                         max_iter=200).fit(codes)
    return gm.weights_, gm.means_, np.linalg.cholesky(gm.covariances_), float(gm.score(codes)) * len(codes)


def fit_gmm(codes: np.ndarray, components: int = 10, seed: int = 0, ids: np.ndarray | None = None,
            n_conditions: int = 1) -> GaussianMixturePrior:
    """Fit a full-covariance Gaussian mixture (components capped at N // 2) to ``codes (N, D)``, one per
    condition id in ``ids`` (0..n_conditions-1) when given; a condition with fewer than 2 codes gets N(0, I)."""
    ids = np.zeros(len(codes), dtype=np.int64) if ids is None else np.asarray(ids)
    d = codes.shape[1]
    fits = []
    for c in range(n_conditions):
        mine = codes[ids == c]
        if len(mine) < 2:  # a class kept with one patch in a small subset: its prior stays N(0, I)
            log.warning("condition %d has %d training codes, too few for a mixture: it samples N(0, I)", c, len(mine))
            fits.append((np.ones(1), np.zeros((1, d)), np.eye(d)[None], 0.0))
        else:
            fits.append(_fit_one(mine, components, seed))
    k = max(len(f[0]) for f in fits)
    weights, means = np.zeros((n_conditions, k)), np.zeros((n_conditions, k, d))
    tril = np.tile(np.eye(d), (n_conditions, k, 1, 1))
    for c, (w, m, chol, _) in enumerate(fits):
        weights[c, :len(w)], means[c, :len(w)], tril[c, :len(w)] = w, m, chol
    info = {"n_fit": int(len(codes)), "components": int(k),
            "mean_log_likelihood": float(sum(f[3] for f in fits) / len(codes))}
    return GaussianMixturePrior(torch.from_numpy(weights), torch.from_numpy(means), torch.from_numpy(tril), info)


def prior_for(checkpoint: str | os.PathLike, model, store: PatchStore, components: int = 10,
              seed: int = 0) -> GaussianMixturePrior:
    """The Gaussian-mixture prior of ``checkpoint``'s model: loaded, or fitted on the training split's
    encoder means and saved (atomically) in the run's priors (:meth:`~medvae.training.rundir.RunDir.prior_path`:
    keyed by the checkpoint's content)."""
    path = RunDir(checkpoint).prior_path(checkpoint)
    if path.is_file():
        return load_prior(path)
    if store.select(split="train").size < 2:
        raise InputError(f"{store.path}: no training patches to fit the mixture prior on; use the standard prior "
                         "(--prior standard)")
    model.eval()
    codes, ids = encoder_means(model, store, seed=seed)
    prior = fit_gmm(codes, components, seed, ids, len(model.config.condition_names) if ids is not None else 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(prior.state_dict(), tmp)
    log.info("fitted a %d-component Gaussian mixture prior on %d training codes: %s", prior.info["components"],
             prior.info["n_fit"], path)
    return prior


def load_prior(path: str | os.PathLike) -> GaussianMixturePrior:
    """A saved prior (``torch.load(weights_only=True)``)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        info = {k: v for k, v in state.items() if k not in ("kind", "weights", "means", "scale_tril")}
        return GaussianMixturePrior(state["weights"], state["means"], state["scale_tril"], info)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user-facing problem
        raise CheckpointError(f"{path}: unreadable prior ({err}); delete it to fit it again") from None

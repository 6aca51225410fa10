"""Real-anchored synthesis: variants of given real images, decoded from codes near theirs.

Prior samples of a class are prototypes of that class: a classifier already knows them (the real
classifier agreed with their labels 92.5 % of the time on Fashion-MNIST) and they add nothing it
lacks. Anchored synthesis starts from a real image instead (DAGAN, Antoniou et al. 2018): its
posterior mean ``mu_i`` is moved toward or away from other codes and decoded, and every variant
keeps its anchor's label (a joint image + mask model decodes its own mask with it).

- ``neighbours``: toward the anchor's K nearest codes in a pool, ``z = mu_i + lam (mu_j - mu_i)``
  with ``lam ~ U(lam_low, lam_high)``. The pool is every training image the generator saw — with
  unlabelled images, codes the labelled subset lacks — so the variants carry what the generator
  learned from images whose labels nobody gave; their labels are the anchor's, and a filter
  (the utility study's) drops the variants a classifier of the labelled subset disagrees with.
- ``interpolate``: between the anchor and a same-class anchor (DeVries & Taylor 2017 found
  extrapolation best): ``lam ~ U(-0.5, 0.5)``, negative values moving away from the neighbour.
- posterior noise ``temperature · sigma_i · eps`` is added to either (0 by default).

Variant ``v`` of anchor ``i`` depends only on ``(seed, i)`` and the pool, so a subset of anchors
gives the same variants for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from medvae.data.conditions import model_inputs
from medvae.data.store import PatchStore

MODES = ("neighbours", "interpolate")


@torch.no_grad()
def encode(model, images: np.ndarray | torch.Tensor, ids: np.ndarray | None = None,
           batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Posterior ``(mu, logvar)``, each ``(N, D)`` float32 numpy, of images ``(N, C, H, W)`` in [0, 1]
    (condition ``ids (N,)`` for a conditional model)."""
    model.eval()
    device = next(model.parameters()).device
    mus, logvars = [], []
    for start in range(0, len(images), batch_size):
        x = torch.as_tensor(np.asarray(images[start:start + batch_size]), dtype=torch.float32).to(device)
        y = None if ids is None else torch.as_tensor(ids[start:start + batch_size]).to(device)
        with model.conditioned_on(y):
            mu, logvar = model.encode(x)
        mus.append(mu.float().flatten(1).cpu())
        logvars.append(logvar.float().flatten(1).cpu())
    d = int(model.latent_dim)
    if not mus:
        return np.zeros((0, d), np.float32), np.zeros((0, d), np.float32)
    return torch.cat(mus).numpy(), torch.cat(logvars).numpy()


def nearest(anchors: np.ndarray, pool: np.ndarray, k: int, exclude: np.ndarray | None = None,
            anchor_groups: np.ndarray | None = None, pool_groups: np.ndarray | None = None,
            chunk: int = 256) -> np.ndarray:
    """Indices ``(N, k)`` into ``pool`` of each anchor's k nearest pool codes (Euclidean), nearest first.

    Args:
        anchors: (N, D) codes. pool: (M, D) codes.
        exclude: (N,) pool index of each anchor itself (or -1), never its own neighbour.
        anchor_groups, pool_groups: when given, only pool codes of the anchor's own group (class) count.
    Pools with fewer than k candidates repeat the nearest ones; an anchor with no candidate at all
    gets itself (index -1 maps to no move).
    """
    pool_t = torch.from_numpy(np.asarray(pool, np.float32))
    p2 = (pool_t * pool_t).sum(1)
    out = np.empty((len(anchors), k), dtype=np.int64)
    for s in range(0, len(anchors), chunk):
        a = torch.from_numpy(np.asarray(anchors[s:s + chunk], np.float32))
        d2 = (a * a).sum(1)[:, None] - 2 * a @ pool_t.T + p2[None]
        if exclude is not None:
            ex = torch.as_tensor(exclude[s:s + chunk])
            hit = ex >= 0
            d2[hit.nonzero()[:, 0], ex[hit]] = float("inf")
        if anchor_groups is not None:
            d2[torch.as_tensor(anchor_groups[s:s + chunk][:, None] != pool_groups[None])] = float("inf")
        kk = min(k, d2.shape[1])
        dist, idx = torch.topk(d2, kk, largest=False)
        idx[~torch.isfinite(dist)] = -1
        idx = idx.numpy()
        # fewer than k candidates: cycle through those there are
        for r in range(len(idx)):
            found = idx[r][idx[r] >= 0]
            out[s + r] = np.resize(found, k) if found.size else -1
    return out


def variant_latents(mu: np.ndarray, logvar: np.ndarray, pool: np.ndarray, neighbours: np.ndarray, mode: str,
                    seed: int, lam_range: tuple[float, float] = (0.5, 1.0), temperature: float = 0.0,
                    first_anchor: int = 0) -> np.ndarray:
    """Codes ``(N * K, D)`` float32 of K variants of each anchor, anchor-major (variant v of anchor i
    at row ``i * K + v``).

    Args:
        mu, logvar: (N, D) the anchors' posteriors.
        pool: (M, D) codes the neighbour indices point into.
        neighbours: (N, K) pool indices (-1: no neighbour, the code stays the anchor's).
        mode: ``neighbours`` (lam ~ U(lam_range)) or ``interpolate`` (lam ~ U(-0.5, 0.5)).
        seed: with the anchor's index ``first_anchor + i`` the only source of randomness.
        temperature: scale of the posterior noise added to every variant.
    """
    if mode not in MODES:
        raise ValueError(f"unknown anchored synthesis {mode!r}; choose one of {MODES}")
    n, k = neighbours.shape
    lo, hi = lam_range if mode == "neighbours" else (-0.5, 0.5)
    out = np.empty((n, k, mu.shape[1]), np.float32)
    for i in range(n):
        rng = np.random.default_rng([seed, first_anchor + i])
        lam = rng.uniform(lo, hi, (k, 1))
        eps = rng.standard_normal((k, mu.shape[1]))
        target = np.where((neighbours[i] >= 0)[:, None], pool[np.maximum(neighbours[i], 0)], mu[i])
        out[i] = mu[i] + lam * (target - mu[i]) + temperature * np.exp(0.5 * logvar[i]) * eps
    return out.reshape(n * k, -1)


@dataclass
class Anchors:
    """Real images of a store to vary, with their codes and neighbours: ``len(self)`` = N × K samples,
    sample ``i`` being variant ``i mod K`` of anchor ``i // K``."""

    store: PatchStore
    rows: np.ndarray  # (N,) the anchors' rows in ``store``
    mu: np.ndarray  # (N, D)
    logvar: np.ndarray  # (N, D)
    pool: np.ndarray  # (M, D) codes the neighbour indices point into
    neighbours: np.ndarray  # (N, K)
    ids: np.ndarray | None  # (N,) the model's condition ids of the anchors (class / modality models)

    @classmethod
    def of(cls, model, store: PatchStore, rows: np.ndarray, per_image: int, pool: np.ndarray | None = None,
           pool_exclude: np.ndarray | None = None, same_class: bool = False) -> Anchors:
        """Encode ``rows`` of ``store`` and find each one's ``per_image`` neighbours: in ``pool`` (codes of
        other images; ``pool_exclude[i]`` is anchor i's own position there, or -1) when given, else among
        the anchors themselves (of the anchor's class with ``same_class``)."""
        rows = np.asarray(rows, dtype=np.int64)
        x, ids = model_inputs(store, rows, model.config)
        mu, logvar = encode(model, x, ids)
        if pool is not None:
            near = nearest(mu, pool, per_image, exclude=pool_exclude)
        else:
            groups = store.class_ids(rows) if same_class and store.classes else None
            pool = mu
            near = nearest(mu, mu, per_image, exclude=np.arange(len(rows)), anchor_groups=groups, pool_groups=groups)
        return cls(store, rows, mu, logvar, pool, near, ids)

    def __len__(self) -> int:
        return len(self.rows) * self.neighbours.shape[1]

    def latents(self, start: int, stop: int, mode: str, seed: int, lam_range: tuple[float, float] = (0.5, 1.0),
                temperature: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Codes ``(stop - start, D)`` of samples ``start..stop-1`` and their condition ids (or None)."""
        k = self.neighbours.shape[1]
        first, last = start // k, (stop - 1) // k + 1
        z = variant_latents(self.mu[first:last], self.logvar[first:last], self.pool, self.neighbours[first:last],
                            mode, seed, lam_range, temperature, first_anchor=first)
        z = torch.from_numpy(z[start - first * k: stop - first * k])
        return z, None if self.ids is None else torch.from_numpy(self.ids[np.arange(start, stop) // k])

    def source_rows(self, start: int, stop: int) -> np.ndarray:
        """The anchor row in ``store`` of samples ``start..stop-1``."""
        return self.rows[np.arange(start, stop) // self.neighbours.shape[1]]

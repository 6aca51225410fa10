"""The ``m2`` arm and ``synthesis: m2``: a cell's M2 model (:class:`medvae.models.m2.M2`, Kingma et al. 2014).

**Model.** q(y|x) is the downstream network (:func:`medvae.downstream.networks.build_net`, the same
initial weights from the seed as the real arm's); q(z|x,y) and p(x|y,z) are a class-conditional ConvVAE
(``cfg.m2``: channels, latent, likelihood).

**Training** (:func:`train_m2`), per cell: ``cfg.m2.steps`` Adam steps, each on ``batch_size`` labelled
images of the subset (the real arms' seeded stream and flips) and ``m2.unlabelled_batch`` images of the
unlabelled pool (every train image, no label), the loss

    mean over labelled [−ELBO(x, y) − α·log q(y|x)] + mean over unlabelled U(x)

— the paper's J^α (eq. 9) with each part averaged over its batch instead of summed over its set, so α
weighs the classification term per labelled image against its ELBO in nats. The model is written once,
atomically, to the cell's ``m2/model.pt`` and reused by the arm and the synthesis (a re-run reloads it).

**The arm's network** is the trained q(y|x). **Synthesis** (:func:`m2_candidates`): for each labelled
image, ``m2.per_image`` posterior samples z ~ q(z|x, y) decoded with its label y (real-anchored
variants), and ``m2.prior_ratio × |subset|`` class-balanced prior samples z ~ N(0, I) decoded with their
class; labelled by construction, then thinned by the study's filter and audit as any candidates.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from medvae.config import UtilityConfig, VAEConfig
from medvae.data.store import PatchStore
from medvae.downstream.networks import BatchStream, LabelledSet, build_net, flip, from_store
from medvae.downstream.subsets import SOURCE_ROW
from medvae.downstream.synthetic_sets import Candidates
from medvae.errors import ConfigError
from medvae.files import atomic_path
from medvae.models.distributions import reparameterize, standard_normal
from medvae.models.m2 import M2
from medvae.models.vae import ConvVAE
from medvae.synthesis.sampling import balanced_conditions

MODEL_FILE = "model.pt"


def build_m2(channels: int, size: int, classes: list[str], cfg: UtilityConfig, seed: int) -> M2:
    """A fresh M2: the downstream classifier (built first, from ``seed``: the real arm's initial weights) and a
    class-conditional ConvVAE of ``cfg.m2``'s size."""
    vae_cfg = VAEConfig(in_channels=channels, image_size=size, latent_dim=cfg.m2.latent_dim,
                        channels=tuple(cfg.m2.channels), likelihood=cfg.m2.likelihood, condition="class",
                        condition_names=tuple(classes))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifier = build_net("classify", channels, size, len(classes))
        return M2(ConvVAE(vae_cfg), classifier)


def train_m2(real: LabelledSet, unlabelled: torch.Tensor, classes: list[str], cfg: UtilityConfig, seed: int,
             device: str = "cpu") -> M2:
    """M2 trained on the labelled ``real`` set and the ``unlabelled`` images (N, C, H, W); in eval mode."""
    model = build_m2(real.images.shape[1], real.images.shape[-1], classes, cfg, seed).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.m2.lr)
    labelled, flips = BatchStream(real, cfg.batch_size, seed), torch.Generator().manual_seed(seed + 1)
    pool = BatchStream.unlabelled(unlabelled, cfg.m2.unlabelled_batch, seed + 3)
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 4)  # the reparameterization noise
        for _ in range(cfg.m2.steps):
            x, y = flip(*labelled.next(), "classify", flips)
            u, _ = flip(*pool.next(), "classify", pool.gen)
            loss = model.labelled_loss(x.to(device), y.to(device), cfg.m2.alpha).mean() \
                + model.unlabelled_loss(u.to(device)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


def cell_m2(directory: str | os.PathLike, real_store: PatchStore, unlabelled: torch.Tensor, classes: list[str],
            cfg: UtilityConfig, seed: int, device: str = "cpu") -> M2:
    """The cell's M2: loaded from ``directory/model.pt`` when finished, else trained on the cell's labelled
    ``real_store`` and the unlabelled pool and written there atomically."""
    if not cfg.pools_unlabelled:
        raise ConfigError("the m2 arm and synthesis m2 need task classify with unlabelled: all (M2 learns from "
                          "every train image)")
    path = Path(directory) / MODEL_FILE
    real = from_store(real_store, real_store.select("train"), "classify", classes)
    if path.is_file():
        model = build_m2(real.images.shape[1], real.images.shape[-1], classes, cfg, seed).to(device)
        model.load_state_dict(torch.load(path, map_location=device, weights_only=True))
        return model.eval()
    model = train_m2(real, unlabelled, classes, cfg, seed, device)
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)
    return model


@torch.no_grad()
def m2_candidates(model: M2, subset: PatchStore, cfg: UtilityConfig, seed: int, batch_size: int = 512) -> Candidates:
    """Posterior variants of every labelled image of ``subset`` (decoded with its class) and class-balanced
    prior samples, labelled by construction (class ids of ``subset.classes``, the model's classes)."""
    vae, device = model.vae, next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed + 5)
    ids = torch.from_numpy(subset.class_ids(np.arange(len(subset)))).long()
    x = torch.from_numpy(subset.get(slice(None)))
    with vae.conditioned_on(ids.to(device)):
        mu, logvar = vae.encode(x.to(device))
    k = cfg.m2.per_image
    z = reparameterize(mu.repeat_interleave(k, 0).cpu(), logvar.repeat_interleave(k, 0).cpu(), gen)
    n_prior = round(cfg.m2.prior_ratio * len(subset))
    prior_ids = balanced_conditions(n_prior, model.n_classes).long()
    z = torch.cat([z, standard_normal((n_prior, vae.latent_dim), "cpu", gen)])
    y = torch.cat([ids.repeat_interleave(k), prior_ids])
    images = []
    for i in range(0, len(z), batch_size):
        with vae.conditioned_on(y[i:i + batch_size].to(device)):
            images.append(vae.decode(z[i:i + batch_size].to(device)).float().cpu())
    anchors = np.asarray(subset.index[SOURCE_ROW], dtype=np.int64)
    source = np.concatenate([np.repeat(anchors, k), np.full(n_prior, -1, dtype=np.int64)])
    shape = (0, *x.shape[1:])
    return Candidates(torch.cat(images).numpy() if images else np.zeros(shape, np.float32), y.numpy(), None, source)

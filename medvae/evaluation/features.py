"""A domain feature network for sample metrics (FID, KID, precision/recall, density/coverage).

ImageNet Inception weights cannot be downloaded here and describe neither CT nor fluorescence,
so medvae trains its own small feature network on the *real training split* of the store:

- a classifier of the store's ``class`` column when it has one (features: the penultimate layer);
- otherwise an autoencoder (MSE), whose encoder's pooled features summarise each patch.

Images are area-downsampled to at most ``FEATURE_SIZE``² first. Training is seeded and short
(``steps``), and the weights are cached in ``STORE/features/<key>.pt`` (weights only; the key
hashes the store's content hash and these settings), so every model evaluated on a store is
scored with the same network and the scores are comparable.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medvae.data.store import PatchStore
from medvae.files import atomic_path, sha256_json

log = logging.getLogger(__name__)
FEATURE_SIZE = 64
WIDTHS = (16, 32, 64, 128)  # feature dimension: the last width


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(8, c_out), nn.SiLU(),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU())


class FeatureNet(nn.Module):
    """Strided conv encoder -> global average pool: ``(B, C, H, W)`` in [0, 1] -> ``(B, 128)`` features.

    ``head`` is a linear classifier (``n_classes > 0``) or a small decoder back to the input.
    """

    def __init__(self, channels: int, n_classes: int = 0):
        super().__init__()
        widths = (channels, *WIDTHS)
        self.encoder = nn.Sequential(*(_block(a, b) for a, b in zip(widths[:-1], widths[1:])))
        self.n_classes = n_classes
        if n_classes:
            self.head = nn.Linear(WIDTHS[-1], n_classes)
        else:  # decoder of the encoder's (B, 128, H/16, W/16) map
            ups = [nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(a, b, 3, padding=1), nn.SiLU())
                   for a, b in zip(WIDTHS[::-1][:-1], WIDTHS[::-1][1:])]
            self.head = nn.Sequential(*ups, nn.Upsample(scale_factor=2), nn.Conv2d(WIDTHS[0], channels, 3, padding=1))

    @staticmethod
    def prepare(x: torch.Tensor) -> torch.Tensor:
        """Area-downsample to at most FEATURE_SIZE² and centre on 0."""
        if x.shape[-1] > FEATURE_SIZE:
            x = F.adaptive_avg_pool2d(x, FEATURE_SIZE)
        return x.float() * 2 - 1

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.prepare(x)).mean((-2, -1))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """A classifier's logits ``(B, n_classes)``, in the order of :func:`classifier_names`."""
        return self.head(self.features(x))

    def loss(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        h = self.encoder(self.prepare(x))
        if self.n_classes:
            return F.cross_entropy(self.head(h.mean((-2, -1))), y)
        target = self.prepare(x)
        return F.mse_loss(self.head(h)[..., :target.shape[-2], :target.shape[-1]], target)


def classifier_names(store: PatchStore) -> list[str]:
    """The classes the store's feature network tells apart, in its output order (sorted), or [] when it is
    an autoencoder (no ``class`` column, fewer than two classes or an unlabelled patch in the train split)."""
    if "class" not in store.index:
        return []
    names = store.index["class"][store.select(split="train")].astype(str)
    if len(set(names)) < 2 or (names == "").any():
        return []
    return sorted(set(names))


def _classes(store: PatchStore, rows: np.ndarray) -> tuple[torch.Tensor | None, int]:
    uniq = classifier_names(store)
    if not uniq:
        return None, 0
    names = store.index["class"][rows].astype(str)
    return torch.as_tensor([uniq.index(n) for n in names]), len(uniq)


def feature_net(store: PatchStore, steps: int = 400, batch_size: int = 64, seed: int = 0,
                device: torch.device | str = "cpu") -> FeatureNet:
    """The store's feature network: loaded from ``STORE/features/`` or trained on its train split."""
    rows = store.select(split="train")
    labels, n_classes = _classes(store, rows)
    settings = {"store": store.content_hash, "steps": steps, "batch_size": batch_size, "seed": seed,
                "classes": n_classes, "widths": WIDTHS, "size": FEATURE_SIZE, "version": 1}
    path = Path(store.path) / "features" / f"{sha256_json(settings)[:16]}.pt"
    channels = int(store.meta["channels"])
    with torch.random.fork_rng(devices=[]):  # the caller's RNG stream stays untouched
        torch.manual_seed(seed)
        net = FeatureNet(channels, n_classes)
        if path.is_file():
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return net.to(device).eval()
        net.to(device).train()
        opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
        rng = np.random.default_rng(seed)
        kind = f"{n_classes}-class classifier" if n_classes else "autoencoder"
        log.info("training the store's feature network (%s, %d steps) on %d training patches", kind, steps,
                 len(rows))
        for _ in range(steps):
            pick = rng.choice(len(rows), min(batch_size, len(rows)), replace=False)
            x = torch.from_numpy(store.get(rows[pick])).to(device)
            loss = net.loss(x, labels[pick].to(device) if labels is not None else None)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    path.parent.mkdir(exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(net.state_dict(), tmp)
    return net.eval()


@torch.no_grad()
def embed(net: FeatureNet, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """``(N, C, H, W)`` in [0, 1] -> ``(N, 128)`` float32 features on the CPU."""
    device = next(net.parameters()).device
    return torch.cat([net.features(images[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(images), batch_size)]) if len(images) else torch.zeros(0, WIDTHS[-1])

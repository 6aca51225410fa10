"""Sharpness of a model's reconstructions and samples against the real split: the radially averaged power
spectrum (:mod:`medvae.metrics.spectrum`) per modality, and over the whole split when it has several.

The real images and their reconstructions ``decode(mu)`` are the ones the per-patch pass already holds
(:func:`medvae.evaluation.evaluate.patch_metrics` hands each batch to a :class:`SpectrumCollector`); the
samples are the prior samples of the cohort and sample metrics. Nothing is decoded for this.
"""

from __future__ import annotations

import numpy as np
import torch

from medvae.metrics.spectrum import HIGH_CUTOFF, band_edges, radial_power, ratio_above, share_above

ALL = "ALL"  # the whole split's group (only when the split has several modalities)


def spectrum_bands(size: int) -> int:
    """Bands for ``size``² patches: 16 at 32² (each two DCT steps wide), 32 from 64²; even, so the 0.25
    cycles/pixel cutoff is a band edge."""
    return max(2, min(32, size // 2))


class SpectrumCollector:
    """Per-image spectra (``radial_power(per_image=True)``) of the real images and their reconstructions,
    batch by batch, in store-row order."""

    def __init__(self, n_bands: int):
        self.n_bands = n_bands
        self._real: list[torch.Tensor] = []
        self._recon: list[torch.Tensor] = []

    def add(self, x: torch.Tensor, recon: torch.Tensor) -> None:
        """One batch: ``x`` and ``recon`` ``(B, C, H, W)`` image channels, on any device."""
        self._real.append(radial_power(x, self.n_bands, per_image=True))
        self._recon.append(radial_power(recon, self.n_bands, per_image=True))

    def spectra(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(real, recon)``: ``(N, n_bands)`` float64 each, N the images added."""
        empty = torch.zeros(0, self.n_bands, dtype=torch.float64)
        return torch.cat([empty, *self._real]), torch.cat([empty, *self._recon])


def _per_image(images: torch.Tensor, n_bands: int, batch_size: int, device: torch.device) -> torch.Tensor:
    """``(N, n_bands)`` spectra of ``images`` (``(N, C, H, W)``), ``batch_size`` at a time on ``device``."""
    return torch.cat([torch.zeros(0, n_bands, dtype=torch.float64),
                      *(radial_power(images[i:i + batch_size].to(device), n_bands, per_image=True)
                        for i in range(0, len(images), batch_size))])


def sharpness(collector: SpectrumCollector, modalities: np.ndarray, samples: dict[str, dict[str, torch.Tensor]],
              size: int, batch_size: int, device: torch.device) -> dict:
    """The spectra and high-band figures of real images, reconstructions and samples, per modality.

    Args:
        collector: the per-patch pass's spectra of the evaluated rows.
        modalities: ``(N,)`` each evaluated row's modality (the collector's order).
        samples: modality -> prior name -> ``(n, C, H, W)`` samples in [0, 1]
            (:func:`medvae.evaluation.sample_quality.prior_samples`; one tensor may serve several modalities).
        size: the patches' side.

    Returns:
        ``{"cutoff", "band_edges" (cycles/pixel), "groups": {modality (and "ALL" with several): {"n_real",
        "real", "reconstruction" (mean power per band), "samples": {prior: power}, "n_samples": {prior: n},
        "high_band_share" (the real images'), "high_band_ratio_recon", "high_band_ratio_samples": {prior}}}}``.
    """
    real, recon = collector.spectra()
    n_bands = collector.n_bands
    cache: dict[int, torch.Tensor] = {}  # an unconditional model's samples are shared by every modality

    def of(x: torch.Tensor) -> torch.Tensor:
        if id(x) not in cache:
            cache[id(x)] = _per_image(x, n_bands, batch_size, device)
        return cache[id(x)]

    members = {mod: (modalities == mod, samples[mod]) for mod in sorted(set(modalities.tolist()))}
    if len(members) > 1:  # the whole split: every row, and every distinct sample set once
        distinct = {id(x): (prior, x) for by_prior in samples.values() for prior, x in by_prior.items()}
        pooled: dict[str, list[torch.Tensor]] = {}
        for prior, x in distinct.values():
            pooled.setdefault(prior, []).append(x)
        members[ALL] = (np.ones(len(modalities), bool), pooled)
    groups = {}
    for name, (mask, by_prior) in members.items():
        sel = torch.from_numpy(mask)
        r, c = real[sel].mean(0), recon[sel].mean(0)
        fake = {prior: (torch.cat([of(x) for x in xs]) if isinstance(xs, list) else of(xs))
                for prior, xs in by_prior.items()}
        groups[name] = {
            "n_real": int(mask.sum()), "real": r.tolist(), "reconstruction": c.tolist(),
            "samples": {p: f.mean(0).tolist() for p, f in fake.items()},
            "n_samples": {p: int(len(f)) for p, f in fake.items()},
            "high_band_share": share_above(r, size, HIGH_CUTOFF),
            "high_band_ratio_recon": ratio_above(c, r, size, HIGH_CUTOFF),
            "high_band_ratio_samples": {p: ratio_above(f.mean(0), r, size, HIGH_CUTOFF) for p, f in fake.items()}}
    return {"cutoff": HIGH_CUTOFF, "band_edges": band_edges(n_bands).tolist(), "groups": groups}

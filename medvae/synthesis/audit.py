"""Memorization audit: how close is each synthetic sample to its nearest training patch?

A generative model that reproduces a training patch leaks that patient's data. For every
sample we measure the distance to its nearest patch of the store's *train* split in two spaces
(``medvae.metrics.distances.pixel_features``: 32x32 area-downsampled pixels, and
``medvae.metrics.distances.random_conv_features``: a fixed random conv net), and compare it with how
close *real* patches of different patients come to each other: the threshold is the
``percentile``-th percentile of real-to-real nearest-neighbour distances where the neighbour
must belong to another training patient (same modality). A sample closer to a training patch
than that in both spaces is flagged: it is nearer to one patient than patients are to each
other. (Pixel space alone would flag the blurry, mean-like samples of an untrained or weak VAE,
which sit close to many patches but copy none.)

Distances are computed in blocks (``torch.cdist`` on chunks with a running minimum) against
training features computed once, so a 100k-patch store needs ~600 MB of features and no
N x M matrix. The distance to the arg-min neighbour is recomputed exactly (difference norm), so
an exact copy measures 0 instead of the ~1e-3 round-off of the matrix-product form of cdist.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medvae.errors import InputError
from medvae.files import atomic_path

log = logging.getLogger(__name__)
SPACES = ("pixel", "feature")
MIN_THRESHOLD = 1e-4  # exact copies (distance ~0) are flagged even when no threshold can be calibrated


@torch.no_grad()
def features(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Audit features of images ``x: (B, C, H, W)`` in [0, 1] -> ``{space: (B, D) float32}``."""
    from medvae.metrics.distances import pixel_features, random_conv_features

    return {"pixel": pixel_features(x), "feature": random_conv_features(x)}


@torch.no_grad()
def nearest(queries: torch.Tensor, refs: torch.Tensor, query_groups: torch.Tensor | None = None,
            ref_groups: torch.Tensor | None = None, query_block: int = 2048,
            ref_block: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean nearest neighbour of each query among ``refs``, in blocks.

    Args:
        queries: (Q, D); refs: (R, D), same device.
        query_groups, ref_groups: optional (Q,) / (R,) int group ids (patients); a reference of the
            query's own group is never its neighbour (distance inf, index -1 when none is left).
        query_block, ref_block: block sizes; memory is O(query_block * ref_block).

    Returns:
        ``(dist (Q,) float32, index (Q,) int64)`` on the queries' device.
    """
    q_n, r_n = queries.shape[0], refs.shape[0]
    best = torch.full((q_n,), float("inf"), device=queries.device)
    arg = torch.full((q_n,), -1, dtype=torch.long, device=queries.device)
    for qs in range(0, q_n, query_block):
        q = queries[qs:qs + query_block].float()
        b_best, b_arg = best[qs:qs + query_block], arg[qs:qs + query_block]
        for rs in range(0, r_n, ref_block):
            d = torch.cdist(q, refs[rs:rs + ref_block].float())
            if query_groups is not None:
                same = query_groups[qs:qs + query_block, None] == ref_groups[None, rs:rs + ref_block]
                d = d.masked_fill(same, float("inf"))
            m, a = d.min(dim=1)
            better = m < b_best
            b_best[better] = m[better]
            b_arg[better] = a[better] + rs
    found = arg >= 0
    # exact distance to the chosen neighbour (cdist's |a|^2 + |b|^2 - 2ab form loses ~1e-3 near 0)
    best[found] = (queries[found].float() - refs[arg[found]].float()).norm(dim=1)
    return best, arg


@dataclass
class TrainReference:
    """Audit features of a store's train split and the calibrated thresholds.

    Attributes:
        feats: space -> (N, D) features of the train patches, on the audit device.
        patient, modality: (N,) str arrays of the train patches' index rows.
        rows: (N,) their row numbers in the store.
        thresholds: modality -> space -> distance below which a sample is flagged.
        real_nn: space -> real-to-real between-patient NN distances (the calibration sample).
        notes: warnings about the calibration (e.g. a modality with one training patient).
    """

    feats: dict[str, torch.Tensor]
    patient: np.ndarray
    modality: np.ndarray
    rows: np.ndarray
    percentile: float
    thresholds: dict[str, dict[str, float]] = field(default_factory=dict)
    real_nn: dict[str, np.ndarray] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@torch.no_grad()
def build_reference(store, device: torch.device, percentile: float = 1.0, max_calibration: int = 2000,
                    batch: int = 512, seed: int = 0) -> TrainReference:
    """Features of every train patch of ``store`` and the between-patient calibration.

    Args:
        store: an open PatchStore.
        percentile: of real-to-real between-patient NN distances (per modality), the threshold.
        max_calibration: real patches (sampled with ``seed``) whose NN distance is measured.
    Raises:
        InputError: the store has no train patches to audit against.
    """
    rows = store.select(split="train")
    if rows.size == 0:
        raise InputError(f"{store.path}: no patches in the train split; the memorization audit needs them")
    chunks: dict[str, list[torch.Tensor]] = {s: [] for s in SPACES}
    for start in range(0, rows.size, batch):
        x = torch.from_numpy(store.get(rows[start:start + batch])).to(device)
        for s, f in features(x).items():
            chunks[s].append(f)
    ref = TrainReference(feats={s: torch.cat(c) for s, c in chunks.items()},
                         patient=store.index["patient_id"][rows].astype(str),
                         modality=store.index["modality"][rows].astype(str), rows=rows, percentile=percentile)
    _calibrate(ref, max_calibration, seed)
    return ref


def _calibrate(ref: TrainReference, max_calibration: int, seed: int) -> None:
    """Per-modality thresholds from NN distances between patches of different train patients."""
    n = ref.patient.size
    pick = np.sort(np.random.default_rng(seed).choice(n, size=min(n, max_calibration), replace=False))
    _, codes = np.unique(ref.patient, return_inverse=True)
    device = ref.feats["pixel"].device
    real = {s: [] for s in SPACES}
    per_mod: dict[str, dict[str, np.ndarray]] = {}
    groups = torch.as_tensor(codes, device=device)
    for mod in sorted(set(ref.modality.tolist())):
        same_mod = np.flatnonzero(ref.modality == mod)
        q = pick[ref.modality[pick] == mod]
        per_mod[mod] = {}
        for s in SPACES:
            d, _ = nearest(ref.feats[s][q], ref.feats[s][same_mod], groups[q], groups[same_mod])
            d = d.cpu().numpy()
            per_mod[mod][s] = d[np.isfinite(d)]
            real[s].append(per_mod[mod][s])
    ref.real_nn = {s: np.concatenate(v) for s, v in real.items()}
    for mod, dists in per_mod.items():
        ref.thresholds[mod] = {}
        for s in SPACES:
            if dists[s].size:
                thr = float(np.percentile(dists[s], ref.percentile))
            elif ref.real_nn[s].size:
                thr = float(np.percentile(ref.real_nn[s], ref.percentile))
                ref.notes.append(f"{mod}: fewer than 2 training patients; thresholds pooled over modalities")
            else:
                thr = 0.0
                ref.notes.append(f"{mod}: no between-patient pairs at all; the audit flags exact copies only")
            ref.thresholds[mod][s] = max(thr, MIN_THRESHOLD)
    ref.notes = list(dict.fromkeys(ref.notes))
    for note in ref.notes:
        log.warning("audit: %s", note)


@torch.no_grad()
def audit_batch(ref: TrainReference, feats: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Nearest training patch of each sample; modality = the pixel-space neighbour's modality.

    Args:
        feats: space -> (B, D) features of the samples (``features(x)``).
    Returns:
        ``{"pixel", "feature"}`` distances, ``patient`` and ``modality`` of the pixel-space
        neighbour, and ``flagged`` (closer than the modality's thresholds in both spaces).
    """
    out: dict[str, np.ndarray] = {}
    for s in SPACES:
        d, idx = nearest(feats[s], ref.feats[s])
        out[s] = d.cpu().numpy()
        if s == "pixel":
            idx = idx.cpu().numpy()
            out["patient"], out["modality"] = ref.patient[idx], ref.modality[idx]
    thr = {s: np.array([ref.thresholds[m][s] for m in out["modality"]]) for s in SPACES}
    # both spaces: a copy is close in both, while a blurry mean-like VAE sample is close to many
    # patches in pixel space only (and far from all of them in feature space)
    out["flagged"] = (out["pixel"] < thr["pixel"]) & (out["feature"] < thr["feature"])
    return out


def summary_line(ref: TrainReference, n: int, flagged: int, dropped: bool) -> str:
    """One line for the log and the CLI: flagged count, percentile and thresholds per modality."""
    thr = "; ".join(f"{m}: pixel {t['pixel']:.4g}, feature {t['feature']:.4g}"
                    for m, t in ref.thresholds.items())
    return (f"memorization audit: {flagged}/{n} samples closer to a training patch than the "
            f"percentile {ref.percentile:g} of real between-patient nearest-neighbour distances "
            f"({thr}){'; flagged samples not written' if dropped and flagged else ''}")


def summarize(ref: TrainReference, sample_nn: dict[str, np.ndarray], flagged: int, dropped: bool,
              figure: str | None = None) -> dict:
    """The audit of ``n`` samples as a JSON-ready dict (generation.json's ``audit``).

    Args:
        sample_nn: space -> (n,) nearest-training-patch distances of the samples.
        flagged: how many were flagged; dropped: whether flagged samples were left unwritten.
        figure: file name of the ``plot_audit`` figure, recorded as ``figure``.
    """
    def median(v: np.ndarray) -> float | None:
        return float(np.median(v)) if v.size else None

    n = int(sample_nn["pixel"].size)
    return {"summary": summary_line(ref, n, flagged, dropped), "percentile": ref.percentile,
            "thresholds": ref.thresholds, "flagged": flagged, "train_patches": int(ref.rows.size),
            "calibration_pairs": int(ref.real_nn["pixel"].size), "notes": ref.notes,
            "sample_nn_median": {s: median(v) for s, v in sample_nn.items()},
            "real_nn_median": {s: median(v) for s, v in ref.real_nn.items()}, "figure": figure}


def plot_audit(path: str | Path, ref: TrainReference, sample_nn: dict[str, np.ndarray]) -> None:
    """Histograms of sample NN distances vs real between-patient NN distances, threshold lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # not pyplot: no global state, no GUI backend, faster import

    fig = Figure(figsize=(10, 3.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, s in zip(axes, SPACES):
        both = np.concatenate([ref.real_nn[s], sample_nn[s]])
        bins = np.linspace(0.0, float(both.max()) * 1.05 if both.size else 1.0, 40)
        for values, label in ((ref.real_nn[s], "real → other patients"), (sample_nn[s], "synthetic → train")):
            if values.size:  # an empty histogram with density=True divides by zero
                ax.hist(values, bins=bins, alpha=0.6, density=True, label=label)
        for m, t in ref.thresholds.items():
            ax.axvline(t[s], color="k", ls="--", lw=1)
            ax.text(t[s], ax.get_ylim()[1] * 0.9, f" {m} p{ref.percentile:g}", fontsize=8)
        space = "32x32 pixels" if s == "pixel" else "random conv features"
        ax.set_xlabel(f"nearest-neighbour distance ({space})")
        ax.set_ylabel("density")
    axes[0].legend(fontsize=8)
    fig.suptitle("Memorization audit")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png", metadata={"Software": None})

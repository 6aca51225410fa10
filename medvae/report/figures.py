"""Report figures: matplotlib (Agg) -> base64 PNG strings embedded in the HTML.

Images arrive in physical units. CT is shown in grey in HU, windowed to the store's
normalization window; microscopy with a perceptual colormap; error maps as |original - recon|
in the same units with their own colour bar.
"""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ACCENT = "#2b6cb0"
SYNTH = "#dd6b20"
plt.rcParams.update({
    "font.size": 9, "axes.spines.top": False, "axes.spines.right": False, "axes.titlesize": 10,
    "figure.dpi": 100, "savefig.bbox": "tight", "savefig.pad_inches": 0.05,
})


def to_png(fig) -> str:
    """A matplotlib figure as a base64 PNG string (the figure is closed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _display(modality: str, norm: dict) -> dict:
    if modality in ("ct", "image"):  # CT in HU and plain 2D image sets in grey
        return {"cmap": "gray", "vmin": float(norm["low"]), "vmax": float(norm["high"])}
    return {"cmap": "magma", "vmin": float(norm["low"]), "vmax": float(norm["high"])}


def _first_channel(img: np.ndarray) -> np.ndarray:
    return img[0] if img.ndim == 3 else img


def triptych(items: list[dict], modality: str, norm: dict) -> str:
    """Rows of original / reconstruction / error map (one row per item: best, worst...)."""
    disp = _display(modality, norm)
    unit = norm.get("unit", "")
    fig, axes = plt.subplots(len(items), 3, figsize=(7.6, 2.6 * len(items)), squeeze=False, layout="constrained")
    for row, it in zip(axes, items):
        orig, rec = _first_channel(it["original"]), _first_channel(it["reconstruction"])
        err = np.abs(orig - rec)
        title = f"{it['kind']} · slice {it['slice_index']} · SSIM {it['ssim']:.3f}"
        for ax, img, label in ((row[0], orig, "original"), (row[1], rec, "reconstruction")):
            im = ax.imshow(img, **disp)
            ax.set_title(f"{label}\n{title}" if label == "original" else label)
        fig.colorbar(im, ax=row[1], fraction=0.046, pad=0.02, label=unit)  # shared by original and recon
        im = row[2].imshow(err, cmap="inferno", vmin=0, vmax=max(float(np.percentile(err, 99.5)), 1e-6))
        row[2].set_title("|error|")
        fig.colorbar(im, ax=row[2], fraction=0.046, pad=0.02, label=unit)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    return to_png(fig)


def worst_grid(items: list[dict], modality: str, norm: dict, ncols: int = 4) -> str:
    """Input / reconstruction / |error| of each item (``original``, ``reconstruction`` in physical units,
    ``ssim``, ``class``), ``ncols`` triplets a row, each captioned with its class and SSIM.

    One error scale (the 99.5th percentile of every item's error) and one colour bar for the grid, so
    the tiles' errors compare at a glance.
    """
    disp = _display(modality, norm)
    errs = [np.abs(_first_channel(it["original"]) - _first_channel(it["reconstruction"])) for it in items]
    vmax = max(float(np.percentile(np.concatenate([e.ravel() for e in errs]), 99.5)), 1e-6)
    ncols = max(1, min(ncols, len(items)))
    nrows = -(-len(items) // ncols)
    # a narrow empty column between triplets keeps each image's three tiles together
    ratios = ([1, 1, 1, 0.3] * ncols)[:-1]
    fig = plt.figure(figsize=(sum(ratios) * 1.05 + 0.6, nrows * 1.35 + 0.3), layout="constrained")
    grid = fig.add_gridspec(nrows, len(ratios), width_ratios=ratios)
    axes = []
    for i, (it, err) in enumerate(zip(items, errs)):
        r, c = divmod(i, ncols)
        tiles = [fig.add_subplot(grid[r, 4 * c + j]) for j in range(3)]
        tiles[0].imshow(_first_channel(it["original"]), **disp)
        tiles[1].imshow(_first_channel(it["reconstruction"]), **disp)
        im = tiles[2].imshow(err, cmap="inferno", vmin=0, vmax=vmax)
        label = f"{it['class']} · " if it.get("class") else ""
        tiles[1].set_title(f"{label}SSIM {it['ssim']:.3f}", fontsize=8)
        for ax in tiles:
            ax.set_xticks([])
            ax.set_yticks([])
        axes += tiles
    fig.colorbar(im, ax=axes, fraction=0.02, pad=0.01, label=f"|error| {norm.get('unit', '')}".strip())
    fig.suptitle("each image: input · reconstruction · |error|", fontsize=9)
    return to_png(fig)


def image_grid(images: np.ndarray, modality: str, norm: dict, ncols: int = 8, title: str = "",
               row_labels: list[str] | None = None) -> str:
    """Grid of (N, C, H, W) images (physical units)."""
    disp = _display(modality, norm)
    n = len(images)
    nrows = max(1, -(-n // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.15 * ncols, 1.15 * nrows + (0.3 if title else 0)),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        for s in ax.spines.values():
            s.set_visible(False)
        if i < n:
            ax.imshow(_first_channel(images[i]), **disp)
    if row_labels:
        for ax, lab in zip(axes[:, 0], row_labels):
            ax.set_ylabel(lab, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title)
    fig.subplots_adjust(wspace=0.04, hspace=0.04)
    return to_png(fig)


def histograms(hist: dict, modality: str) -> str:
    """Real vs synthetic intensity densities in physical units."""
    edges = np.asarray(hist["edges"])
    centers = 0.5 * (edges[1:] + edges[:-1])
    fig, ax = plt.subplots(figsize=(5.2, 2.6))
    ax.fill_between(centers, hist["real"], step="mid", alpha=0.35, color=ACCENT, label="real")
    ax.step(centers, hist["synthetic"], where="mid", color=SYNTH, lw=1.6, label="synthetic")
    ax.set_xlabel(f"intensity ({hist.get('unit', '')})")
    ax.set_ylabel("density")
    ax.set_title(f"{modality}: intensity distribution")
    ax.legend(frameon=False)
    return to_png(fig)


def distributions(per_patient: dict[str, dict[str, np.ndarray]], metrics=("ssim", "psnr", "mae")) -> str:
    """Per-patient box plots of per-patch metrics (one panel per metric)."""
    pids = list(per_patient)
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.4 * len(metrics), 0.35 * len(pids) + 1.2),
                             squeeze=False)
    for ax, m in zip(axes[0], metrics):
        data = [np.asarray(per_patient[p][m])[np.isfinite(per_patient[p][m])] for p in pids]
        ax.boxplot(data, orientation="horizontal", widths=0.6, patch_artist=True, showfliers=True,
                   boxprops={"facecolor": "#bee3f8", "edgecolor": ACCENT},
                   medianprops={"color": SYNTH}, flierprops={"markersize": 2})
        ax.set_yticks(range(1, len(pids) + 1), pids if ax is axes[0][0] else [""] * len(pids))
        ax.set_title(m.upper().replace("_", "-"))
        ax.invert_yaxis()
    return to_png(fig)


def latent_map(points: np.ndarray, labels: list[str], by: str, explained: list[float]) -> str:
    """Scatter of the test codes' first two principal components, one colour per label (class, modality,
    patient); a legend up to 20 labels."""
    names = sorted(set(labels))
    fig, ax = plt.subplots(figsize=(5.6, 4.4))
    cmap = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    labels = np.asarray(labels)
    for i, name in enumerate(names):
        sel = labels == name
        ax.scatter(points[sel, 0], points[sel, 1], s=5, alpha=0.6, color=cmap(i % cmap.N), label=name or None,
                   linewidths=0)
    ax.set_xlabel(f"PC 1 ({100 * explained[0]:.0f}% of variance)")
    ax.set_ylabel(f"PC 2 ({100 * explained[1]:.0f}% of variance)" if len(explained) > 1 else "PC 2")
    ax.set_title(f"test codes (posterior means){' by ' + by if by else ''}")
    if by and len(names) <= 20:
        ax.legend(frameon=False, fontsize=7, markerscale=2.5, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return to_png(fig)


def spectrum(spec: dict, prior_labels: dict[str, str]) -> str:
    """Log power against spatial frequency per band (summary.json ``spectrum``): real, reconstructions and each
    prior's samples, a panel per modality (and the whole split), the high-band cutoff marked."""
    edges = np.asarray(spec["band_edges"])
    centres = 0.5 * (edges[1:] + edges[:-1])
    groups = spec["groups"]
    fig, axes = plt.subplots(1, len(groups), figsize=(4.6 * len(groups), 3.2), squeeze=False, sharey=True,
                             layout="constrained")
    styles = {"standard": {"ls": "-"}, "gmm": {"ls": "--"}, "diffusion": {"ls": "-."}}
    for ax, (name, g) in zip(axes[0], groups.items()):
        ax.semilogy(centres, g["real"], color=ACCENT, lw=2.2, label="real")
        ax.semilogy(centres, g["reconstruction"], color="#2f855a", lw=1.6, label="reconstructions")
        for prior, power in g["samples"].items():
            ax.semilogy(centres, power, color=SYNTH, lw=1.4, label=f"samples {prior_labels.get(prior, prior)}",
                        **styles.get(prior, {"ls": ":"}))
        ax.axvline(spec["cutoff"], color="#718096", lw=1, ls=":")
        ax.text(spec["cutoff"], 1.0, f" {spec['cutoff']:g} cycles/px", transform=ax.get_xaxis_transform(),
                va="top", fontsize=7, color="#4a5568")
        ax.set_xlabel("spatial frequency (cycles/pixel)")
        ax.set_title("whole split" if name == "ALL" else name)
    axes[0][0].set_ylabel("power per coefficient")
    axes[0][-1].legend(frameon=False, fontsize=7)
    return to_png(fig)

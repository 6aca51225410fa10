"""`medvae evaluate`: per-patch metrics -> per-patient and per-modality tables, cohort MMD, report.

For one run (and any ``--compare`` runs) on one split of a patch store:

- per patch (batched, no grad, on the device): reconstruction SSIM, MS-SSIM, PSNR, MSE, MAE of
  ``decode(mu)`` (the deterministic reconstruction); ELBO (one seeded sample of z, analytic
  KL); KL; and IWAE log-likelihood (k = ``config.iwae_k``) with its bits/dim on a subset of
  ``IWAE_PER_PATIENT`` evenly spaced patches per patient, evenly thinned to at most
  ``config.iwae_max_patches`` (k decodes per patch are the dominant cost; the ``n`` column says
  how many patches each IWAE figure averages);
- per patient and per modality: mean, sd and n of each metric, and the worst patches (SSIM).
  Patients are grouped with one sort; report.html shows sections for ``config.report_patients``
  of them only (the worst and best halves by mean SSIM, listed in ``report_patients`` of
  summary.json), while metrics.csv and summary.json keep every patient;
- per class (a store with classes): mean, sd, n and 95 % interval of each metric;
- an image set (:func:`medvae.evaluation.class_tables.is_image_set`: every patient one patch) has no
  per-patient tables unless ``config.per_image`` asks (each would repeat one image's numbers); it
  gets per-split tables (the other splits on up to ``config.split_patches`` images, no IWAE) and
  the split's ``config.worst_images`` worst reconstructions instead;
- per modality (cohort): unbiased MMD² with a permutation p-value between ``mmd_samples`` real
  patches and as many model samples, on downsampled-pixel and random-conv features, and the
  Wasserstein-1 distance between their intensity distributions in physical units. A
  modality-conditioned model is sampled per modality; an unconditional model's samples are
  compared with each modality's patches.
- per modality (and the whole split when it has several): sharpness, the radially averaged power spectrum
  of the real patches, their reconstructions and the prior samples (:mod:`medvae.evaluation.sharpness`;
  the spectra of the per-patch pass's own images, nothing decoded again);
- the test codes: a 2D PCA map of the posterior means, coloured by class, modality or patient.

Writes ``metrics.csv`` (tidy: run, patient_id, modality, split, metric, value, n, prior; sd as
metric ``<name>_sd``; modality and cohort rows have patient_id ``ALL``, class rows ``class:<name>``),
``summary.json`` and ``report.html``.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from medvae.config import EvaluateConfig
from medvae.data.conditions import model_inputs
from medvae.data.store import PatchStore, even_positions, open_store
from medvae.denoising.evaluate import evaluate_denoise
from medvae.devices import select_device
from medvae.errors import InputError
from medvae.evaluation.class_tables import class_stats, grouped_stats, is_image_set, split_rows, worst_images
from medvae.evaluation.sample_quality import class_samples, classified_samples, prior_samples, sample_quality
from medvae.evaluation.sharpness import SpectrumCollector, sharpness, spectrum_bands
from medvae.evaluation.tables import CSV_COLUMNS, compare_table, identical_weights, jsonable, tidy_rows, weights_sha256
from medvae.metrics import distances as D
from medvae.metrics import elbo as L
from medvae.metrics import images as M
from medvae.metrics.stats import finite_stats
from medvae.metrics.table import ALL_METRICS, PATCH_METRICS
from medvae.report import write_report
from medvae.report.reportdir import ReportDir
from medvae.training.checkpoint import load_model
from medvae.training.rundir import RunDir
from medvae.training.validate import reconstruct

log = logging.getLogger(__name__)

IWAE_PER_PATIENT = 8  # patches per patient that get the k-sample IWAE bound
TRAVERSAL_STEPS = (-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0)  # prior standard deviations around the mean code
HIST_BINS = 64
# what summary.json keeps of each compared run
_COMPARED = ("per_modality", "per_class", "per_split", "cohort", "checkpoint", "step", "weights_sha256",
             "sample_quality", "spectrum")



@contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Adds the seconds the block takes to ``timings[stage]`` (summary.json ``timings``: where evaluation's time
    goes, so a slow stage is visible without a profiler)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


# --------------------------------------------------------------------------- per patch
@torch.no_grad()
def patch_metrics(model, store, rows: np.ndarray, cfg: EvaluateConfig, device: torch.device,
                  iwae_rows: np.ndarray | None = None, seed: int = 0,
                  timings: dict[str, float] | None = None,
                  spectra: SpectrumCollector | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Per-patch metrics of ``model`` on store rows ``rows``; the IWAE's seconds added to ``timings["iwae"]``;
    each batch's images and reconstructions handed to ``spectra`` (its seconds in ``timings["spectrum"]``).

    Returns:
        ``(per_patch, codes)``: metric name -> (len(rows),) float64, with IWAE and bits/dim NaN
        except on ``iwae_rows`` (a subset of ``rows``; all when None); and the posterior means
        ``(len(rows), D)`` float32.
        Reconstruction metrics compare the image channels (a joint model's mask channel is in the ELBO only).
    """
    gen = torch.Generator().manual_seed(seed)  # CPU generator: the same z on every device
    # the IWAE's samples from their own stream: the ELBO's z do not move with iwae_k or the IWAE subset
    iwae_gen = torch.Generator().manual_seed(seed + 1)
    timings = {} if timings is None else timings
    iwae_rows = rows if iwae_rows is None else iwae_rows
    out: dict[str, list] = {k: [] for k in PATCH_METRICS}
    mus = []
    channels = int(store.meta["channels"])
    for start in range(0, len(rows), cfg.batch_size):
        batch = rows[start:start + cfg.batch_size]
        x, ids = model_inputs(store, batch, model.config)
        x = torch.from_numpy(x).to(device)
        bounds, recon, mu, logvar = reconstruct(model, x, None if ids is None else torch.from_numpy(ids).to(device),
                                                gen)
        mus.append(mu.float().cpu())
        for name, fn in (("ssim", M.ssim), ("ms_ssim", M.ms_ssim), ("psnr", M.psnr), ("mse", M.mse), ("mae", M.mae)):
            out[name].append(fn(recon[:, :channels], x[:, :channels]))
        if spectra is not None:
            with timed(timings, "spectrum"):
                spectra.add(x[:, :channels], recon[:, :channels])
        out["elbo"].append(bounds["elbo"])
        out["kl"].append(bounds["kl"])
        iw = torch.full((len(batch),), float("nan"), device=device)
        sel = torch.from_numpy(np.isin(batch, iwae_rows)).to(device)
        if sel.any():
            sel_ids = None if ids is None else torch.from_numpy(ids[sel.cpu().numpy()]).to(device)
            with timed(timings, "iwae"), model.conditioned_on(sel_ids):
                # one batch of decodes per call: 4x that was 1.7x slower per decode on the CPU (cache-bound)
                iw[sel] = L.iwae_log_likelihood(model, x[sel], k=cfg.iwae_k, batch_chunk=cfg.batch_size,
                                                generator=iwae_gen, posterior=(mu[sel], logvar[sel]))
        out["iwae"].append(iw)
        out["bpd"].append(L.bits_per_dim(iw, x[0].numel()))
    return {k: torch.cat(v).double().cpu().numpy() for k, v in out.items()}, torch.cat(mus).numpy()


def group_rows(patient_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Patient id -> positions (ascending) into ``patient_ids``, with one stable sort (no per-patient scan)."""
    ids = patient_ids.astype(str)
    order = np.argsort(ids, kind="stable")
    uniq, starts = np.unique(ids[order], return_index=True)
    return dict(zip(uniq.tolist(), np.split(order, starts[1:])))


def _iwae_subset(groups: dict[str, np.ndarray], rows: np.ndarray, per_patient: int, cap: int) -> np.ndarray:
    """Up to ``per_patient`` evenly spaced rows of each patient, then evenly thinned to ``cap`` (at least 1)."""
    picks = [rows[pos][even_positions(len(pos), per_patient)] for pos in groups.values()]
    out = np.sort(np.concatenate(picks)) if picks else rows[:0]
    return out[even_positions(len(out), max(cap, 1))]


def report_patients(per_patient: dict, n: int) -> list[str]:
    """The patients report.html shows: all when at most ``n``, else the worst and best halves by mean SSIM."""
    if len(per_patient) <= n:
        return list(per_patient)
    ssim = {p: v["metrics"]["ssim"]["mean"] for p, v in per_patient.items()}
    ranked = sorted(ssim, key=lambda p: (not math.isfinite(ssim[p]), ssim[p], p))
    worst = ranked[: (n + 1) // 2]
    best = ranked[len(ranked) - n // 2:] if n // 2 else []
    return worst + best[::-1]


# --------------------------------------------------------------------------- cohort
def cohort_metrics(store, rows: np.ndarray, samples: torch.Tensor, modality: str, cfg: EvaluateConfig,
                   device: torch.device, seed: int = 0) -> tuple[dict, dict]:
    """MMD (pixel and random-conv features) and intensity W1 between real rows and samples.

    Returns ``(metrics, histogram data)``.
    """
    rng = np.random.default_rng(seed)
    real_rows = np.sort(rng.choice(rows, min(cfg.mmd_samples, len(rows)), replace=False))
    real = torch.from_numpy(store.get(real_rows))
    feats = {}
    for name, fn in (("pixel", D.pixel_features), ("randconv", D.random_conv_features)):
        bs = cfg.batch_size
        feats[name] = tuple(torch.cat([fn(imgs[i:i + bs].to(device)) for i in range(0, len(imgs), bs)])
                            for imgs in (real, samples))
    res: dict = {"n_real": int(len(real_rows)), "n_samples": int(len(samples))}
    for name, (fx, fy) in feats.items():
        if len(fx) >= 2 and len(fy) >= 2:
            stat, p = D.mmd_test(fx, fy, permutations=cfg.mmd_permutations, seed=seed)
        else:
            stat, p = float("nan"), float("nan")
        res[f"mmd2_{name}"], res[f"mmd_p_{name}"] = stat, p
    norm = store.normalization(modality)
    real_phys = store.to_physical(real.numpy(), modality)
    fake_phys = store.to_physical(samples.numpy(), modality)
    res["intensity_w1"] = D.intensity_wasserstein(real_phys, fake_phys)
    res["unit"] = norm.get("unit", "")
    edges = np.linspace(float(norm["low"]), float(norm["high"]), HIST_BINS + 1)
    hist = {"edges": edges.tolist(), "unit": res["unit"],
            "real": np.histogram(real_phys, edges, density=True)[0].tolist(),
            "synthetic": np.histogram(fake_phys, edges, density=True)[0].tolist()}
    return res, hist


# --------------------------------------------------------------------------- one run
def evaluate_run(run, store, cfg: EvaluateConfig, device: torch.device, with_figures: bool = True) -> dict:
    """All metrics of one run on ``cfg.split`` of ``store``; figures data when ``with_figures``."""
    start = time.perf_counter()
    ckpt = Path(run) if Path(run).is_file() else RunDir(run).checkpoint("best")  # a checkpoint file, or the run's
    model, meta = load_model(ckpt, device=device)
    if device.type in ("cpu", "cuda"):  # oneDNN's / cuDNN's own layout: IWAE's decodes ~1.5x faster on the CPU;
        model = model.to(memory_format=torch.channels_last)  # the same arithmetic up to float rounding
    name = Path(run).resolve().name if Path(run).is_dir() else Path(run).stem
    if meta.get("store_hash") and meta["store_hash"] != store.content_hash:
        log.warning("%s was trained on another store (hash %s…, this store %s…); metrics are "
                    "out-of-store", name, str(meta["store_hash"])[:12], store.content_hash[:12])
    rows = store.select(split=cfg.split)
    if rows.size == 0:
        raise InputError(f"{store.path}: no patches in split '{cfg.split}'; the store has {store.splits}. "
                         "Use --split with one of those")
    pids = store.index["patient_id"][rows].astype(str)
    mods = store.index["modality"][rows].astype(str)
    log.info("evaluating %s (%s) on %d %s patches of %d patients", name, ckpt.name, len(rows), cfg.split,
             len(set(pids)))
    groups = group_rows(pids)
    iwae_rows = _iwae_subset(groups, rows, IWAE_PER_PATIENT, cfg.iwae_max_patches)
    timings: dict[str, float] = {}
    spectra = SpectrumCollector(spectrum_bands(int(store.meta["patch_size"])))
    with timed(timings, "per_patch"):
        per, codes = patch_metrics(model, store, rows, cfg, device, iwae_rows, timings=timings, spectra=spectra)
    timings["per_patch"] -= timings.get("iwae", 0.0) + timings.get("spectrum", 0.0)  # run inside; their own rows

    image_set = is_image_set(store)
    per_patient, per_modality = {}, {}
    # An image set's "patients" are single images: their entries repeat each image's own numbers, so only when asked.
    patients = groups if not image_set or cfg.per_image else {}
    for pid, m in patients.items():
        order = np.argsort(per["ssim"][m])
        prow = rows[m]
        worst = [{"row": int(prow[i]), "slice_index": int(store.index["slice_index"][prow[i]]),
                  "y": int(store.index["y"][prow[i]]), "x": int(store.index["x"][prow[i]]),
                  "ssim": float(per["ssim"][m][i])} for i in order[:cfg.worst_patches]]
        per_patient[pid] = {"modality": str(mods[m][0]), "n_patches": int(len(m)),
                            "metrics": {k: finite_stats(v[m]) for k, v in per.items()},
                            "worst_patches": worst, "best_row": int(prow[order[-1]])}
    cohort, hists = {}, {}
    modalities = sorted(set(mods.tolist()))
    with timed(timings, "prior_samples"):
        by_prior = prior_samples(model, ckpt, store, modalities, cfg)
    for mod in modalities:
        m = mods == mod
        per_modality[mod] = {"n_patches": int(m.sum()), "n_patients": len(set(pids[m])),
                             "metrics": {k: finite_stats(v[m]) for k, v in per.items()}}
        with timed(timings, "mmd"):
            cohort[mod], hists[mod] = cohort_metrics(store, rows[m], by_prior[mod]["standard"], mod, cfg, device)
    with timed(timings, "spectrum"):
        spectrum = sharpness(spectra, mods, by_prior, int(store.meta["patch_size"]), cfg.batch_size, device)
    quality = {}
    if cfg.sample_metrics:
        with timed(timings, "sample_quality"):
            quality = sample_quality(store, {mod: rows[mods == mod] for mod in cohort}, by_prior, cfg, device)
    with timed(timings, "other_splits"):
        per_split = split_stats(model, store, cfg, rows, per, device) if image_set else {}

    result = {"run": name, "checkpoint": str(ckpt), "step": meta.get("step"),
              "weights_sha256": weights_sha256(model),
              "model": (meta.get("model_config") or {}).get("name"), "split": cfg.split,
              "condition": model.config.condition,
              "store": str(store.path),
              "store_hash_matches": meta.get("store_hash") in (None, store.content_hash),
              "image_set": image_set,
              "per_patient": per_patient, "per_modality": per_modality,
              "per_class": class_stats(store, rows, per),
              "per_split": per_split,
              "cohort": cohort, "sample_quality": quality, "spectrum": spectrum,
              "report_patients": [] if image_set else report_patients(per_patient, cfg.report_patients),
              "worst_images": worst_images(store, rows, per["ssim"], cfg.worst_images) if image_set else []}
    if with_figures:
        fig_start = time.perf_counter()
        shown = {p: per_patient[p] for p in result["report_patients"]}
        result["_figures"] = _figure_data(model, store, shown, by_prior, hists, per, groups, codes, mods, device)
        result["_figures"]["latent_map"] = latent_map(store, rows, codes)
        result["_figures"]["worst"] = _worst_figure(model, store, result["worst_images"], device)
        if model.config.condition == "class":  # a row per class: the class condition
            result["_figures"]["class_samples"] = {
                "kind": "condition", "names": list(model.config.condition_names), "modality": modalities[0],
                **class_samples(model, ckpt, store, cfg)}
        elif model.config.condition == "none" and quality:  # a row per class the feature classifier assigns
            classified = classified_samples(store, by_prior[modalities[0]], cfg, device)
            if classified:
                result["_figures"]["class_samples"] = {"kind": "classified", "modality": modalities[0],
                                                       **classified}
        timings["figures"] = time.perf_counter() - fig_start
    timings["total"] = time.perf_counter() - start
    result["timings"] = timings
    return result


def split_stats(model, store: PatchStore, cfg: EvaluateConfig, rows: np.ndarray, per: dict[str, np.ndarray],
                device: torch.device) -> dict[str, dict[str, dict]]:
    """Reconstruction metrics per split and modality: the evaluated split's from its per-patch metrics
    ``per`` (of ``rows``), every other split's on up to ``cfg.split_patches`` evenly spaced patches.

    The other splits get no IWAE (k decodes per patch; the evaluated split's subset is what it is
    capped for). Train against test is the view of what an image-set model memorised.

    Returns:
        ``{split: {modality: {"n_patches", "n_split", "metrics": {metric: interval stats}}}}``.
    """
    out = {}
    for split in store.splits:
        if split == cfg.split:
            r, p = rows, per
        else:
            r, _ = split_rows(store, split, cfg.split_patches)
            p, _ = patch_metrics(model, store, r, cfg, device, iwae_rows=r[:0])
            p = {k: v for k, v in p.items() if k not in ("iwae", "bpd")}
        mods = store.index["modality"][r].astype(str)
        in_split = store.index["modality"][store.select(split=split)].astype(str)
        out[split] = {mod: {"n_patches": g["n_patches"], "n_split": int((in_split == mod).sum()),
                            "metrics": g["metrics"]} for mod, g in grouped_stats(p, mods, mods).items()}
    return out


def latent_map(store: PatchStore, rows: np.ndarray, mu: np.ndarray, max_points: int = 4000) -> dict:
    """The test codes' first two principal components, coloured by class (a store with classes), else
    modality (several), else patient (at most 20); evenly thinned to ``max_points``."""
    keep = even_positions(len(rows), max_points)
    centred = mu.astype(np.float64) - mu.mean(0)
    _, sv, vt = np.linalg.svd(centred, full_matrices=False)
    explained = (sv ** 2 / max(float((sv ** 2).sum()), 1e-12))[:2]
    sub = rows[keep]
    if store.classes and "class" in store.index:
        by, labels = "class", store.index["class"][sub].astype(str)
    elif len(set(store.index["modality"][rows].tolist())) > 1:
        by, labels = "modality", store.index["modality"][sub].astype(str)
    elif len(set(store.index["patient_id"][rows].tolist())) <= 20:
        by, labels = "patient", store.index["patient_id"][sub].astype(str)
    else:
        by, labels = "", np.full(len(sub), "")
    return {"points": (centred[keep] @ vt[:2].T).astype(np.float32), "labels": labels.tolist(), "by": by,
            "explained": explained.tolist()}


@torch.no_grad()
def _traversal(model, codes: np.ndarray, condition_id: int, channels: int, device) -> tuple[np.ndarray, list[int]]:
    """Decoded images moving each of the 4 dims whose posterior means vary most over ``codes`` from -3 to +3
    around their mean (condition ``condition_id`` for a conditional model); and those dims."""
    mu = torch.from_numpy(codes).double()
    z0 = mu.mean(0).float().to(device)
    dims = torch.argsort(mu.var(0, correction=0), descending=True)[: min(4, mu.shape[1])].tolist()
    steps = torch.tensor(TRAVERSAL_STEPS, device=device)
    z = z0.repeat(len(dims) * len(steps), 1)
    for i, d in enumerate(dims):
        z[i * len(steps):(i + 1) * len(steps), d] = z0[d] + steps
    ids = torch.full((len(z),), condition_id, dtype=torch.long, device=device) if model.conditional else None
    with model.conditioned_on(ids):
        return model.decode(z).float()[:, :channels].cpu().numpy(), dims


@torch.no_grad()
def _reconstructions(model, store, rows: np.ndarray, device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Store rows ``rows`` in one batch: images and ``decode(mu)`` ``(N, C, H, W)`` in [0, 1] (image channels;
    a joint model's mask channel dropped) and their SSIM ``(N,)``."""
    channels = int(store.meta["channels"])
    if len(rows) == 0:
        empty = np.zeros((0, channels, 1, 1), np.float32)
        return empty, empty, np.zeros(0)
    x, ids = model_inputs(store, rows, model.config)
    x = torch.from_numpy(x).to(device)
    with model.conditioned_on(None if ids is None else torch.from_numpy(ids).to(device)):
        mu, _ = model.encode(x)
        x, recon = x[:, :channels], model.decode(mu).float()[:, :channels]
    return x.cpu().numpy(), recon.cpu().numpy(), M.ssim(recon, x).cpu().numpy()


def _worst_figure(model, store, worst: list[dict], device) -> list[dict]:
    """Original and reconstruction in physical units of each of the ``worst`` images (summary entries)."""
    rows = np.array([w["row"] for w in worst], dtype=np.int64)
    x, recon, _ = _reconstructions(model, store, rows, device)
    out = []
    for w, xi, ri in zip(worst, x, recon):
        mod = str(store.index["modality"][w["row"]])
        out.append({**w, "modality": mod, "original": store.to_physical(xi, mod),
                    "reconstruction": store.to_physical(ri, mod)})
    return out


@torch.no_grad()
def _figure_data(model, store, per_patient, by_prior, hists, per, groups, codes, row_modalities, device) -> dict:
    """Arrays the report draws: best/worst triptychs of the shown patients, samples, a latent
    traversal, histograms."""
    picks = []
    for pid, p in per_patient.items():
        picks += [(pid, "best", p["best_row"]), (pid, "worst", p["worst_patches"][0]["row"])]
    rows = np.array([r for _, _, r in picks], dtype=np.int64)
    x, recon, ssim_vals = _reconstructions(model, store, rows, device)
    channels = int(store.meta["channels"])
    tri = {}
    for (pid, kind, row), xi, ri, s in zip(picks, x, recon, ssim_vals):
        mod = per_patient[pid]["modality"]
        tri.setdefault(pid, []).append({
            "kind": kind, "slice_index": int(store.index["slice_index"][row]), "ssim": float(s),
            "original": store.to_physical(xi, mod), "reconstruction": store.to_physical(ri, mod)})
    mods = sorted(by_prior)
    kind, names = model.config.condition, list(model.config.condition_names)
    trav, dims = {}, {}
    for mod in mods:  # a modality model traverses each modality's codes under its id; others share one traversal
        if kind == "modality" or not trav:
            own = row_modalities == mod if kind == "modality" else np.ones(len(codes), bool)
            trav[mod], dims[mod] = _traversal(model, codes[own], names.index(mod) if kind == "modality" else 0,
                                              channels, device)
        else:
            trav[mod], dims[mod] = next(iter(trav.values())), next(iter(dims.values()))
    return {"triptychs": tri, "samples": {m: by_prior[m]["standard"][:16].numpy() for m in mods},
            "samples_gmm": {m: by_prior[m]["gmm"][:16].numpy() for m in mods if "gmm" in by_prior[m]},
            "samples_diffusion": {m: by_prior[m]["diffusion"][:16].numpy() for m in mods if "diffusion" in by_prior[m]},
            "traversal": trav, "conditional": kind,
            "traversal_dims": dims, "traversal_steps": TRAVERSAL_STEPS, "histograms": hists,
            "modalities": mods,
            "distributions": {pid: {k: per[k][groups[pid]] for k in ("ssim", "psnr", "mae")}
                              for pid in per_patient},
            "normalization": {m: store.normalization(m) for m in mods}}


def _unique_names(results: list[dict]) -> None:
    seen: dict[str, int] = {}
    for r in results:
        n = seen.get(r["run"], 0)
        seen[r["run"]] = n + 1
        if n:
            r["run"] = f"{r['run']}#{n + 1}"


def run_evaluation(run, store, out, config: EvaluateConfig | None = None, compare=(), device="auto",
                   utility: dict | None = None) -> dict:
    """Evaluate ``run`` (and ``compare`` runs) on ``store``; write metrics.csv, summary.json, report.html.

    Args:
        run: run directory of `medvae train` (its best checkpoint) or a checkpoint file.
        store: patch store directory or an open PatchStore.
        out: report directory (created).
        config: EvaluateConfig (split, iwae_k, mmd_samples, mmd_permutations, batch_size, worst_patches).
        compare: more runs, evaluated alike and tabulated side by side.
        device: auto | cpu | cuda | cuda:N | mps.
        utility: a `medvae utility` study's utility.json (``StudyDir.summary()``); a section of the report.

    Returns:
        The summary dict written to summary.json.
    """

    cfg = config or EvaluateConfig()
    store = store if isinstance(store, PatchStore) else open_store(store)
    dev = select_device(device)
    if RunDir(run).task == "denoise":  # a denoise run: methods against noisy input and classical denoisers
        if compare:
            raise InputError("--compare is not supported for denoise runs; evaluate each run on its own")
        return evaluate_denoise(run, store, out, cfg, dev)
    report = ReportDir(out)
    report.path.mkdir(parents=True, exist_ok=True)
    results = [evaluate_run(r, store, cfg, dev, with_figures=(i == 0)) for i, r in enumerate([run, *compare])]
    _unique_names(results)
    figures = results[0].pop("_figures")

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in results:
        w.writerows(tidy_rows(r))

    summary = dict(results[0])
    summary["metric_info"] = {k: {"unit": m.unit, "direction": m.better} for k, m in ALL_METRICS.items()}
    summary["iwae_patches_per_patient"] = IWAE_PER_PATIENT
    summary["config"] = cfg.model_dump(mode="json")
    # seconds per stage of the evaluation (compared runs: their own evaluation in ``compared_runs``), up to the
    # report's rendering, which starts after summary.json is written (logged)
    summary["timings"] = {**results[0]["timings"], "compared_runs": sum(r["timings"]["total"] for r in results[1:])}
    if compare:
        summary["compare"] = {"runs": [r["run"] for r in results], "table": compare_table(results),
                              "results": {r["run"]: {k: r[k] for k in _COMPARED}
                                          for r in results[1:]},
                              "identical_weights": identical_weights(results)}
    if utility is not None:
        summary["utility"] = utility
    start = time.perf_counter()
    report.write(buf.getvalue(), jsonable(summary), lambda path: write_report(summary, figures, path))
    log.info("evaluation took %.1f s, its report %.1f s more", summary["timings"]["total"],
             time.perf_counter() - start)
    return summary

"""Outputs of an evaluation: metrics.csv rows, the side-by-side table of compared runs, and the check
that compared runs are different models."""

from __future__ import annotations

import hashlib
import logging
import math

from medvae.metrics.table import ALL_METRICS, COHORT_METRICS, PATCH_METRICS, SAMPLE_METRICS

log = logging.getLogger(__name__)
ALL = "ALL"  # patient_id of per-modality and cohort rows
CLASS_PREFIX = "class:"  # patient_id of per-class rows: class:<name> (the columns stay those of every run)
CSV_COLUMNS = ("run", "patient_id", "modality", "split", "metric", "value", "n", "prior")


def _stat_rows(run: str, pid: str, mod: str, split: str, metrics: dict) -> list[tuple]:
    out = []
    for k, s in metrics.items():
        out += [(run, pid, mod, split, k, s["mean"], s["n"], ""),
                (run, pid, mod, split, f"{k}_sd", s["sd"], s["n"], "")]
    return out


def tidy_rows(res: dict) -> list[tuple]:
    """metrics.csv rows of one run result; ``prior`` names the samples a sample metric was computed on.

    In order: per patient (an image set's per image only when evaluated with ``per_image``), per class
    (patient_id ``class:<name>``), per modality with the cohort and sample metrics (patient_id ``ALL``),
    the sharpness per modality (and modality ``ALL``: the whole split, when it has several), then an image
    set's other splits per modality (patient_id ``ALL``, their split).
    """
    out = []
    run, split = res["run"], res["split"]
    for pid, p in res["per_patient"].items():
        out += _stat_rows(run, pid, p["modality"], split, p["metrics"])
    for name, p in res.get("per_class", {}).items():
        out += _stat_rows(run, CLASS_PREFIX + name, p["modality"], split, p["metrics"])
    for mod, p in res["per_modality"].items():
        out += _stat_rows(run, ALL, mod, split, p["metrics"])
        c = res["cohort"][mod]
        out += [(run, ALL, mod, split, k, c[k], min(c["n_real"], c["n_samples"]), "standard")
                for k in COHORT_METRICS]
        for prior, q in res.get("sample_quality", {}).get(mod, {}).items():
            out += [(run, ALL, mod, split, k, q[k], q["n"], prior) for k in (*SAMPLE_METRICS, "kid_sd")]
    out += _spectrum_rows(run, split, res.get("spectrum", {}))
    for other, by_mod in res.get("per_split", {}).items():
        if other != split:  # the evaluated split's rows are the per-modality rows above
            for mod, p in by_mod.items():
                out += _stat_rows(run, ALL, mod, other, p["metrics"])
    return out


def _spectrum_rows(run: str, split: str, spectrum: dict) -> list[tuple]:
    """The real split's high-band share, and the reconstructions' and each prior's samples' high-band ratio."""
    out = []
    for mod, g in spectrum.get("groups", {}).items():
        out += [(run, ALL, mod, split, "high_band_share", g["high_band_share"], g["n_real"], ""),
                (run, ALL, mod, split, "high_band_ratio_recon", g["high_band_ratio_recon"], g["n_real"], "")]
        out += [(run, ALL, mod, split, "high_band_ratio_samples", v, g["n_samples"][prior], prior)
                for prior, v in g["high_band_ratio_samples"].items()]
    return out


def _compared_value(r: dict, mod: str, k: str, prior: str) -> float | None:
    if k in PATCH_METRICS:
        v = r["per_modality"][mod]["metrics"][k]["mean"]
    elif k in COHORT_METRICS:
        v = r["cohort"][mod][k]
    else:
        v = r.get("sample_quality", {}).get(mod, {}).get(prior, {}).get(k)
    return None if v is None or not math.isfinite(v) else float(v)


def compare_table(results: list[dict]) -> list[dict]:
    """Side-by-side rows: one per (modality, metric, prior), values per run, best run marked.

    ``prior`` is ``""`` for reconstruction metrics, ``standard`` for MMD / W1 (N(0, I) samples) and
    ``standard``, ``gmm`` or ``diffusion`` for the sample metrics.
    """
    table = []
    keys = [(k, "") for k in PATCH_METRICS] + [(k, "standard") for k in COHORT_METRICS] + \
        [(k, prior) for prior in ("standard", "gmm", "diffusion") for k in SAMPLE_METRICS]
    for mod in sorted({m for r in results for m in r["per_modality"]}):
        for k, prior in keys:
            metric = ALL_METRICS[k]
            vals = {r["run"]: _compared_value(r, mod, k, prior) for r in results if mod in r["per_modality"]}
            finite = {n: v for n, v in vals.items() if v is not None}
            if k in SAMPLE_METRICS and not finite:
                continue  # sample metrics off
            best = None
            if metric.direction and len(finite) > 1 and len(set(finite.values())) > 1:  # no star for a tie
                best = (max if metric.direction > 0 else min)(finite, key=finite.get)
            unit = results[0]["cohort"][mod].get("unit", metric.unit) if k == "intensity_w1" else metric.unit
            table.append({"modality": mod, "metric": k, "prior": prior, "unit": unit,
                          "direction": metric.direction, "values": vals, "best": best})
    return table


def identical_weights(results: list[dict]) -> list[list[str]]:
    """Groups of runs whose evaluated generator weights are identical (a comparison of a model with
    itself: e.g. a VAE–GAN checkpoint saved before its critic ever trained), each logged loudly."""
    groups: dict[str, list[str]] = {}
    for r in results:
        groups.setdefault(r["weights_sha256"], []).append(r["run"])
    same = [names for names in groups.values() if len(names) > 1]
    for names in same:
        log.warning("%s have IDENTICAL weights: their columns in the comparison are one model, not %d",
                    " and ".join(names), len(names))
    return same


def weights_sha256(model) -> str:
    """SHA-256 of the generator's weights (the critic excluded), in parameter-name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if not name.startswith("discriminator."):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def jsonable(obj):
    """NaN/inf -> None so summary.json is strict JSON."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj

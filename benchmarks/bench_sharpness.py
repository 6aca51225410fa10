"""Sharp samples at 128² (issue #28): the ConvVAE against the VAE–GAN on real 128² slices, equal steps.

Runs ``pipelines/sharp128.yaml`` (``medvae run``) on two scan folders it writes under ``--work``:

- ``mni152``: the MNI152 T1 template nilearn ships (``--mni152 FILE``, default nilearn's own file when
  nilearn is importable), split into 5 "patients" by interleaving its axial slices (patient k holds slices
  k, k + 5, ...: every patient spans the whole brain at 5 mm, so the split's test slices are brain slices
  like the training ones), written as an MSD task folder (T1: modality mr);
- ``ct``: the built-in phantom cohort, 16 abdominal CT series (``medvae phantom``).

Per data set and model it prints, from the evaluation's summary.json (test split, the store's feature
network): the samples' and reconstructions' high-band power ratio (1.0 = as sharp as the real split),
FID, recall and coverage (mixture prior and N(0, I)), reconstruction SSIM, and the training seconds per
step, then the issue's goals as VAE–GAN against VAE ratios. ``--pipeline latent_diffusion128`` runs that
pipeline instead (a spatial-latent VAE–GAN; its N(0, I), mixture and diffusion priors side by side). Run:
``.venv/bin/python benchmarks/bench_sharpness.py [--work DIR] [--mni152 FILE] [--pipeline NAME] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEDVAE = [sys.executable, "-m", "medvae"]
PATIENTS = 5  # MNI152 slices interleaved into this many patients


def mni152_scans(template: Path, out: Path) -> Path:
    """The template's axial slices as ``PATIENTS`` interleaved volumes in an MSD task folder (made once)."""
    import nibabel as nib
    import numpy as np

    images = out / "imagesTr"
    if images.is_dir() and len(list(images.glob("*.nii.gz"))) == PATIENTS:
        return out
    images.mkdir(parents=True, exist_ok=True)
    img = nib.as_closest_canonical(nib.load(str(template)))  # RAS: axis 2 runs inferior -> superior
    data = np.asarray(img.dataobj)
    for k in range(PATIENTS):
        affine = img.affine.copy()
        affine[:3, 2] *= PATIENTS  # every PATIENTS-th slice: the slice spacing grows alike
        affine[:3, 3] += img.affine[:3, 2] * k
        nib.save(nib.Nifti1Image(data[:, :, k::PATIENTS], affine), str(images / f"MNI152_{k}.nii.gz"))
    (out / "dataset.json").write_text(json.dumps({"name": "MNI152 T1 (interleaved)", "modality": {"0": "T1"}}))
    return out


def ct_scans(out: Path) -> Path:
    """The phantom cohort's 16 CT series (made once)."""
    if not (out / "labels").is_dir():
        subprocess.run([*MEDVAE, "phantom", "--out", str(out), "--ct-patients", "16", "--microscopy-stacks", "0"],
                       check=True)
    return out


def default_template() -> Path | None:
    try:
        from nilearn.datasets import MNI152_FILE_PATH
    except ImportError:
        return None
    return Path(MNI152_FILE_PATH)


def model_rows(run: Path) -> dict[str, dict]:
    """Per model: the figures the table prints, from the run's report/summary.json and state.json."""
    summary = json.loads((run / "report" / "summary.json").read_text())
    state = json.loads((run / "state.json").read_text())
    results = {summary["run"]: summary, **summary.get("compare", {}).get("results", {})}
    rows = {}
    for path, res in results.items():
        name = Path(path).name
        mod = next(iter(res["per_modality"]))
        quality = res.get("sample_quality", {}).get(mod, {})
        group = res["spectrum"]["groups"][mod]
        steps = json.loads((run / "models" / name / "run.json").read_text())["step"]  # trained, not best.pt's
        row = {"modality": mod, "ssim": res["per_modality"][mod]["metrics"]["ssim"]["mean"],
               "best_step": res.get("step"),  # the evaluated checkpoint (best.pt by val ELBO)
               "ratio_recon": group["high_band_ratio_recon"], "train_s_per_step": None,
               "real_fid": quality.get("real", {}).get("fid")}
        for prior in ("gmm", "standard", "diffusion"):
            row[f"ratio_{prior}"] = group["high_band_ratio_samples"].get(prior)
            for m in ("fid", "recall", "coverage"):
                row[f"{m}_{prior}"] = quality.get(prior, {}).get(m)
        seconds = state.get(f"train:{name}", {}).get("seconds")
        if seconds and steps:
            row["train_s_per_step"] = seconds / steps
        rows[name] = row
    return rows


def ratio(a, b):
    return a / b if a is not None and b else None


def fmt(v, digits: int = 3) -> str:
    return "—" if v is None else str(v) if isinstance(v, int) else f"{v:.{digits}f}"


def print_table(data: str, rows: dict[str, dict]) -> None:
    cols = ["ratio_gmm", "ratio_standard", "ratio_recon", "fid_gmm", "fid_standard", "recall_gmm", "coverage_gmm",
            "ssim", "best_step", "train_s_per_step"]
    if any(r["fid_diffusion"] is not None for r in rows.values()):
        cols[2:2] = ["ratio_diffusion"]
        cols[6:6] = ["fid_diffusion", "recall_diffusion", "coverage_diffusion"]
    print(f"\n{data} ({next(iter(rows.values()))['modality']}, test split; real-vs-real FID floor "
          f"{fmt(next(iter(rows.values()))['real_fid'], 4)})")
    print("| model | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(fmt(r[c], 4 if c.startswith("fid") else 3) for c in cols) + " |")
    for name in [n for n in rows if n.startswith("vaegan") and "vae" in rows]:
        v, g = rows["vae"], rows[name]
        print(f"  {name} against vae:")
        checks = [
            ("VAE–GAN samples keep ≥ 0.8 of the real high-band share (mixture prior)", g["ratio_gmm"],
             g["ratio_gmm"] is not None and g["ratio_gmm"] >= 0.8),
            ("FID (mixture) ≤ 0.5× the VAE's", ratio(g["fid_gmm"], v["fid_gmm"]),
             ratio(g["fid_gmm"], v["fid_gmm"]) is not None and ratio(g["fid_gmm"], v["fid_gmm"]) <= 0.5),
            ("recall ≥ the VAE's", (g["recall_gmm"] or 0) - (v["recall_gmm"] or 0),
             (g["recall_gmm"] or 0) >= (v["recall_gmm"] or 0)),
            ("coverage ≥ the VAE's", (g["coverage_gmm"] or 0) - (v["coverage_gmm"] or 0),
             (g["coverage_gmm"] or 0) >= (v["coverage_gmm"] or 0)),
            ("reconstruction SSIM at most 0.01 below the VAE's", g["ssim"] - v["ssim"], g["ssim"] >= v["ssim"] - 0.01),
            ("training cost per step ≤ 1.5× the VAE's", ratio(g["train_s_per_step"], v["train_s_per_step"]),
             (ratio(g["train_s_per_step"], v["train_s_per_step"]) or 9) <= 1.5),
        ]
        for text, value, ok in checks:
            print(f"    {'holds' if ok else 'MISSES'}: {text} ({fmt(value)})")
    for name, r in rows.items():
        if r["fid_diffusion"] is not None and r["fid_gmm"]:
            q = r["fid_diffusion"] / r["fid_gmm"]
            print(f"  {'holds' if q <= 0.7 else 'MISSES'}: {name}: diffusion prior FID ≤ 0.7× the mixture's on the "
                  f"same decoder ({q:.3f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "bench_out" / "sharpness")
    ap.add_argument("--mni152", type=Path, default=None, help="the MNI152 T1 NIfTI (default: nilearn's, if installed)")
    ap.add_argument("--data", nargs="+", default=["mni152", "ct"], choices=["mni152", "ct"])
    ap.add_argument("--quick", action="store_true", help="medvae run --quick: tiny counts, checks the path")
    ap.add_argument("--pipeline", default="sharp128",
                    help="sharp128 (VAE against VAE–GAN) or latent_diffusion128 (a spatial latent's priors)")
    args = ap.parse_args()
    template = args.mni152 or default_template()
    out = {}
    for data in args.data:
        if data == "mni152":
            if template is None or not template.is_file():
                print("mni152: no template; pip install nilearn (into any venv) and pass --mni152 "
                      "<nilearn>/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
                continue
            scans = mni152_scans(template, args.work / "mni152_scans")
        else:
            scans = ct_scans(args.work / "ct_scans")
        run = args.work / (f"quick_{data}" if args.quick else data)
        if args.pipeline != "sharp128":
            run = run.with_name(f"{run.name}_{args.pipeline}")
        t0 = time.perf_counter()
        subprocess.run([*MEDVAE, "run", args.pipeline, "--scans", str(scans), "--out", str(run),
                        *(["--quick"] if args.quick else [])], check=True)
        rows = model_rows(run)
        print_table(data, rows)
        print(f"  wall time {time.perf_counter() - t0:.0f} s")
        out[data] = rows
    (args.work / f"bench_{args.pipeline}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

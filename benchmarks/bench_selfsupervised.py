"""Self-supervised denoising (n2v, divnoising) trained on the noisy image only, against the supervised dae
trained on clean -> simulated noise of similar images, on a real fluorescence image with Poisson–Gaussian
noise at 5, 20 and 100 photons (at the image's brightest pixel; read noise 2 photons).

The clean reference: a 512² fluorescence image of nuclei. scikit-image's ``human_mitosis`` when its data
is installed (it downloads on first use), else the one StarDist ships (``stardist/data/images/img2d.tif``,
Kaggle DSB 2018, in the ``stardist`` wheel from PyPI: ``pip download stardist --no-deps`` and give the
wheel to ``--image``), or any 2D TIFF given to ``--image``. It is scaled to [0, 1] by its maximum.

- test region: the right half (512 x 256); every method is scored there (PSNR / SSIM against the clean image,
  outputs clipped to [0, 1]).
- ``n2v`` (N2V2 defaults: median replacement, blur-pool, no top skip; 1/16 of the pixels masked; no
  posterior), ``n2v-posterior`` (the same network predicting a Gaussian prior, mean and log-variance, the
  noise model calibrated from the noisy image as ``medvae train`` does; the estimate is the posterior mean
  given each noisy pixel, Laine et al. 2019), ``sure`` (n2v's network without a blind spot, trained by
  PG-SURE with the noise model calibrated from the noisy image, ``medvae.denoising.sure``; best.pt by the
  held-out SURE estimate; ``sure-known``: with the simulation's own (a, b); ``sure-topskip``: with the
  full-resolution skip) and
  ``divnoising`` (unet-vae with the Poisson–Gaussian likelihood, the simulation's own (a, b); MMSE of
  ``--samples`` posterior samples)
  train per level on 64² tiles of the *noisy* image (all of it: the data a user has) and nothing else.
- ``supervised``: a dae per level trained on clean 64² tiles of the left half with that level's noise drawn
  afresh per patch (the denoise task; CARE's setting: pairs acquired like the images to restore), n2v's
  network, widths and steps: only the objective differs.
- references measured in the same run: the noisy input and every method of
  ``medvae.denoising.classical.METHODS`` as it runs them (Noise2Self-tuned TV / wavelet / NLM; BM3D and
  Anscombe + BM3D when installed).

The peer ``careamics`` (``--peer careamics``): CAREamics 0.3.5 Noise2Void with its N2V2 configuration
(``benchmarks/careamics_peer.py``), trained on the same noisy image with the same number of optimizer
steps and batch size (16) on 64² patches, applied to the same right half, scored the same way. CAREamics
pins torchvision/lightning versions of its own, so it runs in a separate venv (``--peer-python``)::

    python3 -m venv .venv-careamics
    .venv-careamics/bin/pip install torch==2.13.0       # the CPU wheel (a plain torch pulls CUDA)
    .venv-careamics/bin/pip install --no-deps careamics==0.3.5
    .venv-careamics/bin/pip install "bioimageio-core>=0.9,<=0.11" "lightning>=2.2,<=2.6.6"
        "microssim<=0.0.5" "pydantic>=2.11,<=2.14.1" "torchmetrics>0.7,<1.9" "zarr>=3,<4"
        matplotlib pillow psutil pyyaml scikit-image tifffile      # (one line)

The peers ``deepinv-sure-pg``, ``deepinv-n2n``, ``deepinv-r2r`` (``--peer``): deepinv 0.5.0's SurePGLoss,
Neighbor2Neighbor and R2RLoss training n2v's own network with the same steps and batch
(``benchmarks/deepinv_peer.py``; the simulation's (a, b)), in a venv of their own (``--deepinv-python``)::

    python3 -m venv venv-deepinv
    venv-deepinv/bin/pip install torch==2.13.0 deepinv==0.5.0 pydantic pyyaml

(careamics 0.3.5 requires torchvision<=0.26, i.e. torch 2.11, so ``pip install torch==2.13.0
careamics==0.3.5`` is refused; N2V never calls torchvision, and careamics_peer.py stands in an empty
package for it.) Arrays travel as ``.npy`` files in a temporary directory.

Prints the table (dB per level and method) and wall times, writes ``--out``/bench_selfsupervised.json.
:func:`selfsupervised_rows` is the callable other benchmarks use (bench_denoise.py's table). Run under the
shared CPU lock: ``flock /tmp/medvae-cpu.lock .venv/bin/python benchmarks/bench_selfsupervised.py``.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # medvae and tests.factories of this checkout

from medvae.config import OBJECTIVE_MODEL_DEFAULTS, TrainStageConfig  # noqa: E402
from medvae.denoising import classical  # noqa: E402
from medvae.metrics import images as M  # noqa: E402
from medvae.pipeline import train_stage  # noqa: E402
from medvae.training.checkpoint import load_model  # noqa: E402
from medvae.training.rundir import RunDir  # noqa: E402
from tests.factories import patch_store  # noqa: E402

READ_NOISE = 2.0
PEER_PYTHON = {"careamics": ".venv-careamics/bin/python", "deepinv": "venv-deepinv/bin/python"}
DEEPINV_PEERS = ("deepinv-sure-pg", "deepinv-n2n", "deepinv-r2r")
# divnoising only when named: 1.9 / 0.8 / 0.5 dB below n2v at 5 / 20 / 100 photons (150 steps, docs/denoising.md)
DEFAULT_METHODS = ("supervised", "n2v", "n2v-posterior", "sure")
STARDIST_IMAGE = "stardist/data/images/img2d.tif"


def load_clean(image: str | None) -> tuple[np.ndarray, str]:
    """The clean reference in [0, 1] (max-scaled) and where it came from (module docstring)."""
    import tifffile

    if image is None:
        try:
            from skimage.data import human_mitosis

            return _unit(human_mitosis()), "skimage.data.human_mitosis"
        except Exception:  # noqa: BLE001 - its data needs a download (pooch); try StarDist's next
            import importlib.util

            spec = importlib.util.find_spec("stardist")
            if spec is None or not spec.submodule_search_locations:
                raise SystemExit("no fluorescence image: skimage's human_mitosis needs a download and stardist is "
                                 "not installed; give --image FILE.tif or the stardist wheel (pip download "
                                 "stardist --no-deps)") from None
            path = Path(spec.submodule_search_locations[0]) / "data" / "images" / "img2d.tif"
            return _unit(tifffile.imread(path)), str(path)
    if image.endswith(".whl"):
        with zipfile.ZipFile(image) as z:
            return _unit(tifffile.imread(io.BytesIO(z.read(STARDIST_IMAGE)))), f"{Path(image).name}:{STARDIST_IMAGE}"
    return _unit(tifffile.imread(image)), image


def _unit(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img, np.float32)
    img = img if img.ndim == 2 else img.reshape(-1, *img.shape[-2:])[0]
    return (img - min(float(img.min()), 0.0)) / float(img.max() - min(float(img.min()), 0.0))


def simulate(clean: np.ndarray, photons: float, seed: int) -> np.ndarray:
    """Poisson(photons · clean) + N(0, read²) photons, back on the [0, 1] scale (the denoise task's
    poisson-gaussian with low 0, high 1): variance clean / photons + read² / photons²."""
    rng = np.random.default_rng(seed)
    return ((rng.poisson(clean * photons) + READ_NOISE * rng.standard_normal(clean.shape)) / photons).astype(np.float32)


def tiles(img: np.ndarray, size: int, stride: int) -> np.ndarray:
    h, w = img.shape
    return np.stack([img[y:y + size, x:x + size] for y in range(0, h - size + 1, stride)
                     for x in range(0, w - size + 1, stride)])[:, None]


def _store(path: Path, patches: np.ndarray, n_val: int, tag: str):
    """Patches as a store; the last ``n_val`` (evenly spread) form the val split."""
    n = len(patches)
    val = set(np.linspace(0, n - 1, n_val).round().astype(int).tolist())
    return patch_store(path, patches, patient_id=["img"] * n, modality="microscopy",
                       split=["val" if i in val else "train" for i in range(n)], source="bench", content_hash=tag,
                       normalization={"microscopy": {"low": 0.0, "high": 1.0, "unit": "counts"}},
                       spacing={"microscopy": [1.0, 1.0]})


def _train_cfg(steps: int, **extra) -> dict:
    return {"batch_size": 16, "max_steps": steps, "lr": 1e-3, "warmup_steps": 20,
            "checkpoint_every": max(steps // 4, 1), "log_every": 50, "val_batches": 2, "betas": [0.9, 0.99],
            "amp": "off", **extra}


def configs(steps: int, photons: float) -> dict[str, TrainStageConfig]:
    """The trainings at one level: n2v (N2V2 defaults, without and with the posterior), sure (PG-SURE),
    divnoising (the simulation's noise model), and the supervised dae on clean tiles with that level's noise."""
    # every self-supervised objective trains the product's default network (config.OBJECTIVE_MODEL_DEFAULTS: 16/32/64,
    # N2V2's blur-pool and no top skip); the supervised dae trains the same network: only the objective differs.
    # The dae's default input residual (sigmoid(logit(noisy) + f)) starts from the noisy image, which at 5 photons
    # is mostly 0 or above 1, and 150 steps do not undo it (18.4 dB measured)
    return {
        "supervised": TrainStageConfig.model_validate({
            "task": "denoise", "noise": {"kind": "poisson-gaussian", "levels": [photons, photons],
                                         "read_noise": READ_NOISE, "crop": 64},
            "model": OBJECTIVE_MODEL_DEFAULTS["n2v"], "train": _train_cfg(steps)}),
        # 1/16 of the pixels masked (N2V: 1/64): four times the loss pixels per step, for a short CPU budget
        "n2v": TrainStageConfig.model_validate({
            "task": "denoise", "objective": "n2v", "posterior": False, "blindspot": {"fraction": 1 / 16},
            "train": _train_cfg(steps)}),
        # the noise model calibrated from the noisy image itself (model.noise_a / noise_b not given)
        "n2v-posterior": TrainStageConfig.model_validate({
            "task": "denoise", "objective": "n2v", "posterior": True, "blindspot": {"fraction": 1 / 16},
            "train": _train_cfg(steps)}),
        # PG-SURE: every pixel in view, the noise model calibrated from the noisy image (model.noise_a / b not given)
        "sure": TrainStageConfig.model_validate({
            "task": "denoise", "objective": "sure", "train": _train_cfg(steps)}),
        # the same with the simulation's own (a, b): what calibration costs
        "sure-known": TrainStageConfig.model_validate({
            "task": "denoise", "objective": "sure", "train": _train_cfg(steps),
            "model": {"noise_a": 1 / photons, "noise_b": READ_NOISE**2 / photons**2}}),
        # with the full-resolution skip N2V2 removes (a blind-spot network's checkerboard; sure has no blind spot)
        "sure-topskip": TrainStageConfig.model_validate({
            "task": "denoise", "objective": "sure", "model": {"top_skip": True}, "train": _train_cfg(steps)}),
        "divnoising": TrainStageConfig.model_validate({
            "task": "denoise", "objective": "divnoising",
            "model": {"channels": [16, 32, 64], "latent_channels": 16, "noise_a": 1 / photons,
                      "noise_b": READ_NOISE**2 / photons**2},
            "train": _train_cfg(steps, beta_warmup_steps=max(steps // 4, 1), ema_decay=0.0)})}


def _estimate(run: Path) -> dict:
    """A sure run's own estimate of its PSNR, best.pt's held-out ``sure_psnr`` (no clean image), beside the true one."""
    info = json.loads((run / "run.json").read_text())
    return {"sure_psnr_estimate": info["best_score"]} if info.get("best_key") == "sure_psnr" else {}


@torch.no_grad()
def apply(run: Path, noisy: np.ndarray, samples: int = 0) -> tuple[np.ndarray, float]:
    """The run's best checkpoint on a whole noisy image; (denoised, seconds)."""
    model, _ = load_model(RunDir(run).checkpoint("best"), device="cpu")
    x = torch.from_numpy(noisy)[None, None]
    t0 = time.perf_counter()
    if samples:
        y = model.denoise(x, samples=samples, generator=torch.Generator().manual_seed(0))
    else:
        y = model.denoise(x)
    return y[0, 0].numpy(), time.perf_counter() - t0


def scores(out: np.ndarray, clean: np.ndarray) -> dict[str, float]:
    o = torch.from_numpy(np.clip(out, 0, 1)[None, None].astype(np.float32))
    c = torch.from_numpy(clean[None, None])
    return {"psnr": float(M.psnr(o, c)[0]), "ssim": float(M.ssim(o, c)[0])}


def selfsupervised_rows(clean: np.ndarray, levels=(5.0, 20.0, 100.0), steps: int = 500,
                        out: Path = Path("bench_out/selfsupervised"), samples: int = 16,
                        methods=DEFAULT_METHODS, references=classical.METHODS,
                        log=print) -> list[dict]:
    """Train and score every method at every level on ``clean`` (module docstring).

    Returns rows ``{method, photons, psnr, ssim, train_s, denoise_s}`` (references and the noisy input have
    ``train_s`` 0).
    """
    h, w = clean.shape
    test = (slice(None), slice(w // 2, None))
    rows: list[dict] = []
    clean_store = None
    if "supervised" in methods:  # clean tiles of the left half only; the test half is never seen
        clean_store = _store(out / "store-clean", tiles(clean[:, : w // 2], 64, 16), 16, "bench-ss-clean")
    for li, photons in enumerate(levels):
        noisy = simulate(clean, photons, seed=100 + li)
        ref = clean[test]
        rows.append({"method": "noisy", "photons": photons, **scores(noisy[test], ref), "train_s": 0.0,
                     "denoise_s": 0.0})
        for m in references:
            if m in classical.missing_methods():
                continue
            t0 = time.perf_counter()
            den = classical.denoise(m, noisy[test][None, None].astype(np.float32))[0, 0]
            rows.append({"method": m, "photons": photons, **scores(den, ref), "train_s": 0.0,
                         "denoise_s": time.perf_counter() - t0})
        if clean_store is not None:
            run = out / f"supervised-{photons:g}"
            t0 = time.perf_counter()
            train_stage(clean_store, run, configs(steps, photons)["supervised"], device="cpu", resume=True)
            train_s = time.perf_counter() - t0
            den, sec = apply(run, noisy[:, w // 2:])
            rows.append({"method": "supervised dae", "photons": photons, **scores(den, ref), "train_s": train_s,
                         "denoise_s": sec})
            log(f"  {photons:g} photons: supervised dae {rows[-1]['psnr']:.2f} dB after {train_s:.0f} s of training")
        store = None
        for m in ("n2v", "n2v-posterior", "sure", "sure-known", "sure-topskip", "divnoising"):
            if m not in methods:
                continue
            if store is None:  # the noisy image, all of it: the only data a self-supervised model sees
                store = _store(out / f"store-noisy-{photons:g}", tiles(noisy, 64, 32), 16,
                               f"bench-ss-noisy-{photons:g}")
            run = out / f"{m}-{photons:g}"
            t0 = time.perf_counter()
            train_stage(store, run, configs(steps, photons)[m], device="cpu", resume=True)
            train_s = time.perf_counter() - t0
            den, sec = apply(run, noisy[:, w // 2:], samples if m == "divnoising" else 0)
            name = {"divnoising": f"divnoising (MMSE of {samples})", "n2v": "n2v (N2V2)",
                    "n2v-posterior": "n2v --posterior (N2V2)", "sure": "sure (PG-SURE)",
                    "sure-known": "sure (PG-SURE, the true a, b)", "sure-topskip": "sure (PG-SURE, top skip)"}[m]
            rows.append({"method": name, "photons": photons, **scores(den, ref), "train_s": train_s,
                         "denoise_s": sec, **_estimate(run)})
            log(f"  {photons:g} photons: {name} {rows[-1]['psnr']:.2f} dB after {train_s:.0f} s of training")
        for peer in ("careamics", *DEEPINV_PEERS):
            if peer not in methods:
                continue
            if peer == "careamics":
                script, extra, name = "careamics_peer.py", [], "careamics n2v (N2V2)"
            else:
                loss = peer.removeprefix("deepinv-")
                script, name = "deepinv_peer.py", f"deepinv {loss} (n2v's network)"
                extra = ["--loss", loss, "--gain", str(1 / photons), "--sigma", str(READ_NOISE / photons)]
            try:
                den, info = run_peer(script, PEER_PYTHON[peer.split("-")[0]], noisy, noisy[:, w // 2:], steps, extra)
            except Exception as e:  # noqa: BLE001 - the peer's failure is reported, the bench goes on
                log(f"  {photons:g} photons: {peer} failed: {e}")
                continue
            rows.append({"method": name, "photons": photons, **scores(den, ref), "train_s": info["train_s"],
                         "denoise_s": info["denoise_s"], "peer": info})
            log(f"  {photons:g} photons: {name} {rows[-1]['psnr']:.2f} dB after {info['train_s']:.0f} s of "
                f"training ({info['steps']} steps)")
    return rows


def run_peer(script: str, python: str, noisy: np.ndarray, region: np.ndarray, steps: int, extra: list[str],
             batch_size: int = 16) -> tuple[np.ndarray, dict]:
    """A peer (``benchmarks/<script>`` run by its own venv's ``python``) trained on ``noisy`` for ``steps`` steps of
    ``batch_size`` 64² patches and applied to ``region``; (denoised region, the peer's JSON line)."""
    path = Path(__file__).resolve().parent / script
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        np.save(t / "noisy.npy", noisy)
        np.save(t / "region.npy", region)
        proc = subprocess.run([python, str(path), "--train", str(t / "noisy.npy"), "--predict",
                               str(t / "region.npy"), "--out", str(t / "out.npy"), "--steps", str(steps),
                               "--batch-size", str(batch_size), "--threads", str(torch.get_num_threads()), *extra],
                              capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{script} exited {proc.returncode}: {proc.stderr[-2000:]}")
        return np.load(t / "out.npy"), json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    levels = sorted({r["photons"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["photons"]): r for r in rows}
    lines = ["| method | " + " | ".join(f"{p:g} photons PSNR / SSIM" for p in levels) + " | train s | denoise s |",
             "|---|" + "---|" * (len(levels) + 2)]
    for m in methods:
        vals = [cell.get((m, p)) for p in levels]
        train = max((v["train_s"] for v in vals if v), default=0.0)
        den = np.mean([v["denoise_s"] for v in vals if v])
        lines.append(f"| {m} | " + " | ".join(f"{v['psnr']:.2f} / {v['ssim']:.3f}" if v else "-" for v in vals)
                     + f" | {train:.0f} | {den:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--image", default=None, help="a 2D fluorescence TIFF, or the stardist wheel")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--samples", type=int, default=16, help="divnoising posterior samples (MMSE)")
    ap.add_argument("--levels", type=float, nargs="*", default=[5.0, 20.0, 100.0])
    ap.add_argument("--methods", nargs="*", default=list(DEFAULT_METHODS))
    ap.add_argument("--peer", nargs="*", default=[], choices=["careamics", *DEEPINV_PEERS],
                    help="peers trained on the same noisy image with the same steps (each in its own venv)")
    ap.add_argument("--peer-python", default=PEER_PYTHON["careamics"], help="the CAREamics venv's python")
    ap.add_argument("--deepinv-python", default=PEER_PYTHON["deepinv"], help="the deepinv venv's python")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="10 steps, 2 samples: checks the script only")
    ap.add_argument("--out", type=Path, default=Path("bench_out/selfsupervised"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clean, source = load_clean(args.image)
    steps, samples = (10, 2) if args.quick else (args.steps, args.samples)
    out = args.out / ("quick" if args.quick else f"steps{steps}")
    t0 = time.perf_counter()
    PEER_PYTHON.update(careamics=args.peer_python, deepinv=args.deepinv_python)
    rows = selfsupervised_rows(clean, args.levels, steps, out, samples, [*args.methods, *args.peer])
    total = time.perf_counter() - t0
    print(f"\nclean reference: {source} {clean.shape}; scored on the right half; {steps} steps per training, "
          f"{torch.get_num_threads()} threads, {total:.0f} s in all\n")
    print(table(rows))
    best_ref = {p: max((r["psnr"] for r in rows if r["photons"] == p and r["method"] in classical.METHODS),
                       default=float("nan")) for p in args.levels}
    for r in rows:
        if r["method"] not in ("noisy", *classical.METHODS):
            print(f"{r['method']} at {r['photons']:g} photons: {r['psnr'] - best_ref[r['photons']]:+.2f} dB over the "
                  f"best of {' / '.join(classical.METHODS)}")
    (out / "bench_selfsupervised.json").write_text(json.dumps({
        "source": source, "steps": steps, "samples": samples, "seconds": total, "rows": rows,
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()}}, indent=2))


if __name__ == "__main__":
    main()

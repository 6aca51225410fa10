"""The classical denoisers medvae is compared with, all blind (nothing about the noise is given).

- ``tv``: total variation, Chambolle (``skimage.restoration.denoise_tv_chambolle``), weight tuned by
  Noise2Self (below) over ``{0.5, 1, 2, 4}·σ̂``.
- ``wavelet``: BayesShrink soft thresholding (``denoise_wavelet``, sigma σ̂ rescaled, levels as
  scikit-image chooses), the wavelet tuned among db1, db2, db4, sym4; needs PyWavelets. (Not its
  sigma: BayesShrink's error is sharply non-monotone in sigma and the Noise2Self loss is nearly flat
  along it, so a sigma grid picked badly; the wavelet family it ranks as the true error does.)
- ``nlm``: non-local means (``denoise_nl_means``, fast mode, 5×5 patches, distance 6, sigma σ̂),
  ``h`` tuned over ``{0.4, 0.6, 0.8, 1.0, 1.2}·σ̂``.
- ``bm3d``: BM3D (the ``bm3d`` package, ``sigma_psd`` = σ̂), when installed.
- ``gat-bm3d``: for photon (Poisson–Gaussian) noise: the noise variance ``a·x + b`` is calibrated
  from the image itself (:func:`medvae.denoising.calibration.estimate_noise`), the generalized
  Anscombe transform makes it ≈ 1 everywhere, BM3D runs at σ = 1, and the closed-form exact
  unbiased inverse (Mäkitalo & Foi 2013) maps back (:mod:`medvae.denoising.calibration`). Needs bm3d.

σ̂ is scikit-image's ``estimate_sigma`` (wavelet-domain median absolute deviation) of the noisy
image. Tuning (:func:`tune`) is Noise2Self's self-supervised J-invariant loss, scikit-image's
``calibrate_denoiser`` (stride 4, approximate loss), on the central ``TUNE_CROP``² crop of the image
(cheap on 512² slices); the chosen parameters then run the plain denoiser on the whole image (the
J-invariant denoiser itself is for the loss: it costs stride² runs and denoises worse).

Images are 2D float arrays on the store's [0, 1] scale; noisy inputs may leave [0, 1].
:data:`METHODS` is the one list of method names (evaluation, the benchmarks).
"""

from __future__ import annotations

import functools
import importlib.util
import time
from collections.abc import Callable

import numpy as np

from medvae.denoising import calibration

METHODS = ("tv", "wavelet", "nlm", "bm3d", "gat-bm3d")
REQUIRES = {"wavelet": "pywt", "bm3d": "bm3d", "gat-bm3d": "bm3d"}  # method -> module it needs
INSTALL_HINT = "pip install 'medvae[denoise]' (bm3d, PyWavelets)"
SLOW = ("bm3d", "gat-bm3d")  # timed once, not best of two
TUNE_CROP = 128
TUNE_STRIDE = 4
# method -> (the parameter Noise2Self tunes, its grid: numbers are multiples of σ̂)
GRIDS: dict[str, tuple[str, tuple]] = {"tv": ("weight", (0.5, 1.0, 2.0, 4.0)),
                                       "wavelet": ("wavelet", ("db1", "db2", "db4", "sym4")),
                                       "nlm": ("h", (0.4, 0.6, 0.8, 1.0, 1.2))}


def available(method: str) -> bool:
    """Whether ``method``'s package is importable."""
    mod = REQUIRES.get(method)
    return mod is None or importlib.util.find_spec(mod) is not None


def missing_methods() -> dict[str, str]:
    """method -> why it is skipped, for the methods whose package is not installed."""
    return {m: f"needs the {REQUIRES[m]} package; {INSTALL_HINT}" for m in METHODS if not available(m)}


def estimate_sigma(img: np.ndarray) -> float:
    """Blind noise sigma of a 2D image (scikit-image's wavelet MAD estimator; never below 1e-4)."""
    from skimage.restoration import estimate_sigma as est

    return max(float(est(img, channel_axis=None)), 1e-4)


def _tv(img: np.ndarray, weight: float) -> np.ndarray:
    from skimage.restoration import denoise_tv_chambolle

    return denoise_tv_chambolle(img, weight=weight)


def _wavelet(img: np.ndarray, wavelet: str, sigma: float) -> np.ndarray:
    from skimage.restoration import denoise_wavelet

    return denoise_wavelet(img, sigma=sigma, wavelet=wavelet, method="BayesShrink", mode="soft", rescale_sigma=True)


def _nlm(img: np.ndarray, h: float, sigma: float) -> np.ndarray:
    from skimage.restoration import denoise_nl_means

    return denoise_nl_means(img, h=h, sigma=sigma, fast_mode=True, patch_size=5, patch_distance=6)


def _base(method: str, sigma: float) -> Callable[..., np.ndarray]:
    """The denoiser whose GRIDS parameter is tuned (its other arguments bound)."""
    if method == "tv":
        return _tv
    if method == "wavelet":
        return functools.partial(_wavelet, sigma=sigma)
    if method == "nlm":
        return functools.partial(_nlm, sigma=sigma)
    raise ValueError(f"{method!r} has no tuned parameter; tuned methods: {tuple(GRIDS)}")


def tuning_crop(img: np.ndarray, size: int = TUNE_CROP) -> np.ndarray:
    """The central ``size``² crop of a 2D image (the image when it is smaller)."""
    h, w = img.shape
    y0, x0 = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return img[y0:y0 + size, x0:x0 + size]


def grid(method: str, sigma: float) -> dict[str, list[float]]:
    """The parameter grid of ``method`` for noise sigma ``sigma``."""
    param, values = GRIDS[method]
    return {param: [v * sigma if isinstance(v, float) else v for v in values]}


def tune(method: str, img: np.ndarray, sigma: float) -> dict[str, float]:
    """The grid parameters with the least Noise2Self J-invariant loss (scikit-image's
    ``calibrate_denoiser``) on :func:`tuning_crop` of ``img``."""
    from skimage.restoration import calibrate_denoiser

    _, (tested, losses) = calibrate_denoiser(tuning_crop(img), _base(method, sigma), grid(method, sigma),
                                             stride=TUNE_STRIDE, extra_output=True)
    return dict(tested[int(np.argmin(losses))])


def _tuned(method: str) -> Callable[[np.ndarray, float], np.ndarray]:
    def run(img: np.ndarray, sigma: float) -> np.ndarray:
        return _base(method, sigma)(img, **tune(method, img, sigma))

    run.__name__ = method
    return run


tv, wavelet, nlm = _tuned("tv"), _tuned("wavelet"), _tuned("nlm")


def bm3d(img: np.ndarray, sigma: float) -> np.ndarray:
    import bm3d as _bm3d

    return np.asarray(_bm3d.bm3d(img, sigma_psd=sigma), dtype=np.float32)


def gat_bm3d(img: np.ndarray, sigma: float, noise: tuple[float, float] | None = None) -> np.ndarray:
    """Generalized Anscombe -> BM3D at σ = 1 -> exact unbiased inverse, with ``noise`` = (a, b), or
    (a, b) calibrated from ``img`` (``sigma²`` as b when the calibration finds no noise)."""
    if noise is None:
        cal = calibration.estimate_noise(img)
        a, b = cal.a, cal.b
    else:
        a, b = noise
    if a <= 0 and b <= 0:
        a, b = 0.0, sigma * sigma
    d = calibration.gat(img, a, b)
    shift = float(np.median(d))  # BM3D works in float32: near-Gaussian noise (tiny a) gives large offsets
    den = bm3d(d - shift, 1.0).astype(np.float64) + shift
    return calibration.inverse_gat(den, a, b).astype(np.float32)


FUNCTIONS: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {"tv": tv, "wavelet": wavelet, "nlm": nlm,
                                                                      "bm3d": bm3d, "gat-bm3d": gat_bm3d}


def denoise(method: str, images: np.ndarray) -> np.ndarray:
    """Denoise every 2D image of ``images`` ``(N, C, H, W)`` channel by channel with ``method``."""
    fn = FUNCTIONS[method]
    out = np.empty(images.shape, np.float32)
    for idx in np.ndindex(*images.shape[:2]):
        img = np.asarray(images[idx], dtype=np.float64)
        out[idx] = fn(img, estimate_sigma(img))
    return out


def seconds_per_slice(method: str, image: np.ndarray, repeats: int = 1) -> float:
    """Wall time of ``method`` on one 2D ``image`` (sigma estimate, calibration and tuning included),
    best of ``repeats``."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        denoise(method, image[None, None])
        best = min(best, time.perf_counter() - t0)
    return best

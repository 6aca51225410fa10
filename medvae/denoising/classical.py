"""The classical denoisers medvae is compared with, all blind (noise sigma estimated per image).

- ``tv``: total variation, Chambolle (``skimage.restoration.denoise_tv_chambolle``), weight = σ̂.
- ``wavelet``: BayesShrink soft thresholding (``denoise_wavelet``, db1, levels as scikit-image
  chooses, sigma rescaled); needs PyWavelets.
- ``nlm``: non-local means (``denoise_nl_means``, fast mode, 5×5 patches, distance 6, h = 0.8 σ̂,
  the parameters of scikit-image's own example).
- ``bm3d``: BM3D (the ``bm3d`` package, ``sigma_psd`` = σ̂), when installed.

σ̂ is scikit-image's ``estimate_sigma`` (wavelet-domain median absolute deviation) of the noisy
image. Images are 2D float arrays on the store's [0, 1] scale; noisy inputs may leave [0, 1].
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable

import numpy as np

METHODS = ("tv", "wavelet", "nlm", "bm3d")
REQUIRES = {"wavelet": "pywt", "bm3d": "bm3d"}  # method -> module it needs
INSTALL_HINT = "pip install 'medvae[denoise]' (bm3d, PyWavelets)"


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


def tv(img: np.ndarray, sigma: float) -> np.ndarray:
    from skimage.restoration import denoise_tv_chambolle

    return denoise_tv_chambolle(img, weight=sigma)


def wavelet(img: np.ndarray, sigma: float) -> np.ndarray:
    from skimage.restoration import denoise_wavelet

    return denoise_wavelet(img, sigma=sigma, method="BayesShrink", mode="soft", rescale_sigma=True)


def nlm(img: np.ndarray, sigma: float) -> np.ndarray:
    from skimage.restoration import denoise_nl_means

    return denoise_nl_means(img, h=0.8 * sigma, sigma=sigma, fast_mode=True, patch_size=5, patch_distance=6)


def bm3d(img: np.ndarray, sigma: float) -> np.ndarray:
    import bm3d as _bm3d

    return np.asarray(_bm3d.bm3d(img, sigma_psd=sigma), dtype=np.float32)


FUNCTIONS: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {"tv": tv, "wavelet": wavelet, "nlm": nlm,
                                                                      "bm3d": bm3d}


def denoise(method: str, images: np.ndarray) -> np.ndarray:
    """Denoise every 2D image of ``images`` ``(N, C, H, W)`` channel by channel with ``method``."""
    fn = FUNCTIONS[method]
    out = np.empty(images.shape, np.float32)
    for idx in np.ndindex(*images.shape[:2]):
        img = np.asarray(images[idx], dtype=np.float64)
        out[idx] = fn(img, estimate_sigma(img))
    return out


def seconds_per_slice(method: str, image: np.ndarray, repeats: int = 1) -> float:
    """Wall time of ``method`` on one 2D ``image`` (sigma estimate included), best of ``repeats``."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        denoise(method, image[None, None])
        best = min(best, time.perf_counter() - t0)
    return best

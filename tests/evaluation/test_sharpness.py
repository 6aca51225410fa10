"""evaluation.sharpness: per modality and over the whole split, equal to medvae.metrics.spectrum on the images."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from medvae.evaluation.sharpness import SpectrumCollector, sharpness, spectrum_bands
from medvae.metrics.spectrum import high_band_ratio, high_band_share, radial_power


def test_two_modalities_and_the_whole_split_equal_direct_calls():
    rng = np.random.default_rng(0)
    real = torch.from_numpy(rng.random((10, 1, 32, 32), dtype=np.float32))
    # reconstructions and samples blurred with scipy: their high-band ratios fall below 1
    recon = torch.from_numpy(ndimage.gaussian_filter(real.numpy(), sigma=(0, 0, 1, 1)))
    shared = torch.from_numpy(ndimage.gaussian_filter(rng.random((6, 1, 32, 32), dtype=np.float32), (0, 0, 2, 2)))
    mods = np.array(["ct"] * 4 + ["mr"] * 6)
    n_bands = spectrum_bands(32)
    collector = SpectrumCollector(n_bands)
    for batch in (slice(0, 3), slice(3, 10)):  # batches that straddle the modalities
        collector.add(real[batch], recon[batch])
    samples = {"ct": {"standard": shared}, "mr": {"standard": shared}}  # an unconditional model's: one set
    res = sharpness(collector, mods, samples, 32, batch_size=4, device=torch.device("cpu"))
    assert list(res["groups"]) == ["ct", "mr", "ALL"] and res["cutoff"] == 0.25
    for name, sel in (("ct", mods == "ct"), ("mr", mods == "mr"), ("ALL", np.ones(10, bool))):
        g, x = res["groups"][name], real[torch.from_numpy(sel)]
        assert g["n_real"] == int(sel.sum()) and g["n_samples"] == {"standard": 6}  # the shared set once
        assert g["high_band_share"] == pytest.approx(high_band_share(x, 0.25, n_bands), rel=1e-9)
        assert g["high_band_ratio_recon"] == pytest.approx(
            high_band_ratio(recon[torch.from_numpy(sel)], x, 0.25, n_bands), rel=1e-9)
        assert g["high_band_ratio_samples"]["standard"] == pytest.approx(
            high_band_ratio(shared, x, 0.25, n_bands), rel=1e-9)
        np.testing.assert_allclose(g["samples"]["standard"], radial_power(shared, n_bands).numpy(), rtol=1e-9)
        assert g["high_band_ratio_recon"] < 0.5 and g["high_band_ratio_samples"]["standard"] < 0.5
    assert spectrum_bands(32) == 16 and spectrum_bands(64) == 32 and spectrum_bands(256) == 32


def test_a_modality_models_own_samples_pool_in_the_whole_split():
    rng = np.random.default_rng(1)
    real = torch.from_numpy(rng.random((6, 1, 32, 32), dtype=np.float32))
    own = {m: torch.from_numpy(rng.random((n, 1, 32, 32), dtype=np.float32)) for m, n in (("ct", 5), ("mr", 7))}
    collector = SpectrumCollector(8)
    collector.add(real, real)
    res = sharpness(collector, np.array(["ct"] * 3 + ["mr"] * 3), {m: {"standard": x} for m, x in own.items()},
                    32, batch_size=4, device=torch.device("cpu"))
    whole = res["groups"]["ALL"]
    assert whole["n_samples"] == {"standard": 12} and whole["high_band_ratio_recon"] == pytest.approx(1.0)
    assert whole["high_band_ratio_samples"]["standard"] == pytest.approx(
        high_band_ratio(torch.cat([own["ct"], own["mr"]]), real, 0.25, 8), rel=1e-9)
    assert res["groups"]["mr"]["high_band_ratio_samples"]["standard"] == pytest.approx(
        high_band_ratio(own["mr"], real[3:], 0.25, 8), rel=1e-9)

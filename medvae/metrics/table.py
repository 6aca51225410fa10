"""Every reported metric once: its label, unit, better direction and a one-line definition.

``medvae.evaluation.evaluate`` computes and tabulates them in this order; the report and summary.json take
labels, units, directions and explanations from here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    label: str
    unit: str
    direction: int  # +1 higher is better, -1 lower is better, 0 no preferred direction
    explain: str

    @property
    def better(self) -> str:
        return {1: "higher", -1: "lower", 0: "none"}[self.direction]


PATCH_METRICS = {  # per patch, then averaged per patient and per modality
    "ssim": Metric("SSIM", "unitless", +1,
                   "Structural similarity of each patch and its reconstruction decode(mu): Gaussian window 11, "
                   "σ 1.5, K1 0.01, K2 0.03, averaged over the valid region (as scikit-image). 1 = identical."),
    "ms_ssim": Metric("MS-SSIM", "unitless", +1,
                      "Multi-scale SSIM: contrast-structure at successively 2× downsampled scales and SSIM at the "
                      "coarsest; 4 scales at 128 px (standard weights renormalised). 1 = identical."),
    "psnr": Metric("PSNR", "dB", +1, "Peak signal-to-noise ratio 10·log10(1 / MSE) on the [0, 1] scale."),
    "mse": Metric("MSE", "[0,1]²", -1, "Mean squared error on the [0, 1] intensity scale."),
    "mae": Metric("MAE", "[0,1]", -1,
                  "Mean absolute error on the [0, 1] intensity scale (× window width for physical units)."),
    "elbo": Metric("ELBO", "nats", +1,
                   "Evidence lower bound log p(x|z) − KL with one sample of z: a lower bound on the "
                   "log-likelihood per patch."),
    "kl": Metric("KL", "nats", 0,
                 "KL(q(z|x) ‖ N(0, I)): information the code carries about the patch; neither high nor low "
                 "is better by itself."),
    "iwae": Metric("IWAE log-lik.", "nats", +1,
                   "Importance-weighted bound with k samples: a tighter lower bound on log p(x) per patch "
                   "(continuous density on [0, 1])."),
    "bpd": Metric("bits/dim", "bits/dim", -1,
                  "−IWAE / (pixels · ln 2): negative log-likelihood per pixel in bits (continuous density; "
                  "can be negative)."),
}

COHORT_METRICS = {  # per modality: real patches against model samples
    "mmd2_pixel": Metric("MMD² pixels", "kernel units", -1,
                         "Unbiased MMD² between real patches and prior samples on 32×32 area-downsampled pixels, "
                         "Gaussian kernels at 0.5/1/2 × the median distance. ≈ 0 when the distributions match."),
    "mmd_p_pixel": Metric("MMD p (pixels)", "p-value", 0,
                          "Permutation-test p-value of the MMD² on pixels: small = samples distinguishable from "
                          "real."),
    "mmd2_randconv": Metric("MMD² random-conv", "kernel units", -1,
                            "As MMD² pixels, on 512-d features of a fixed seeded random conv net (no downloaded "
                            "weights)."),
    "mmd_p_randconv": Metric("MMD p (random-conv)", "p-value", 0,
                             "Permutation-test p-value of the random-conv MMD²."),
    "intensity_w1": Metric("intensity W₁", "physical units", -1,
                           "Wasserstein-1 distance between real and synthetic intensity distributions in physical "
                           "units (HU for CT)."),
}

SAMPLE_METRICS = {  # per modality and prior, on the store's own feature network (medvae.evaluation.features)
    "fid": Metric("FID", "feature units²", -1,
                  "Fréchet distance between Gaussians fitted to real and sample features. Compare it with the "
                  "real-vs-real floor at the same n; only comparable between runs on the same store."),
    "kid": Metric("KID", "feature units", -1,
                  "Unbiased MMD² with the cubic polynomial kernel, mean over random subsets (sd as kid_sd); "
                  "≈ 0 when the distributions match, less biased by n than FID."),
    "precision": Metric("precision", "fraction", +1,
                        "Fraction of samples inside the real patches' 3-NN balls: are samples realistic?"),
    "recall": Metric("recall", "fraction", +1,
                     "Fraction of real patches inside the samples' 3-NN balls: do samples cover the data?"),
    "density": Metric("density", "ratio", +1,
                      "Mean number of real 5-NN balls holding a sample, over 5: fidelity robust to outliers "
                      "(≈ 1 for matching distributions)."),
    "coverage": Metric("coverage", "fraction", +1,
                       "Fraction of real 5-NN balls holding at least one sample: diversity robust to outliers."),
}

SPECTRUM_METRICS = {  # per modality: sharpness from the radially averaged power spectrum (medvae.metrics.spectrum)
    "high_band_share": Metric("high-band share (real)", "fraction", 0,
                              "Share of the real patches' power at or above 0.25 cycles/pixel (orthonormal DCT, "
                              "each image's mean removed): how much fine detail the modality has."),
    "high_band_ratio_recon": Metric("high-band ratio (reconstructions)", "ratio", 0,
                                    "High-band share of the reconstructions decode(mu) over the real patches': "
                                    "1.0 = as sharp as real, below 1 blurrier, above 1 noisier."),
    "high_band_ratio_samples": Metric("high-band ratio (samples)", "ratio", 0,
                                      "High-band share of the prior samples over the real patches': 1.0 = as "
                                      "sharp as real, below 1 blurrier, above 1 noisier or with artefacts."),
}

ALL_METRICS = {**PATCH_METRICS, **COHORT_METRICS, **SAMPLE_METRICS, **SPECTRUM_METRICS}

DENOISE_METRICS = {  # denoise runs (medvae.denoising.evaluate): each method's output against the clean patch
    "psnr": Metric("PSNR", "dB", +1, "10·log10(1 / MSE) of the denoised (clipped to [0, 1]) and the clean patch."),
    "ssim": Metric("SSIM", "unitless", +1, PATCH_METRICS["ssim"].explain.replace("its reconstruction decode(mu)",
                                                                                   "the clean patch")),
    "mae": Metric("MAE", "[0,1]", -1, PATCH_METRICS["mae"].explain),
    "seconds_per_512_slice": Metric("time / 512² slice", "s", -1,
                                    "Wall time to denoise one 512×512 slice (medvae: best of 3 after a warm-up; "
                                    "classical: best of 2, noise estimate included) on the evaluating machine."),
}

UTILITY_METRICS = {  # the utility study's downstream scores on the real test split (medvae.downstream)
    "accuracy": Metric("accuracy", "unitless", +1, "Fraction of real test patches whose class is predicted."),
    "macro_f1": Metric("macro F1", "unitless", +1, "Per-class F1 = 2TP / (2TP + FP + FN), averaged over classes."),
    "dice": Metric("Dice", "unitless", +1, "2|P ∩ G| / (|P| + |G|) per test patch and foreground label present."),
    "hd95": Metric("HD95", "px", -1, "95th percentile of the symmetric surface distance (patch diagonal if missed)."),
}
TASK_METRICS = {"classify": ("accuracy", "macro_f1"), "segment": ("dice", "hd95")}

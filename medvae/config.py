"""Configuration models for every stage. YAML loading rejects unknown keys, naming key and file.

Configs name options ("vae", "hinge", "resize"); the ``build_*`` functions map names to code. Each
list of names is written once, here, as a ``Literal`` type (``ModelName``, ``LikelihoodName``...): the
fields validate against it, and the code and the command line's help read the tuple back with
``typing.get_args`` (nested Literals come out flat, in order).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Literal, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, ValidationError, model_validator

from medvae.errors import ConfigError

# --------------------------------------------------------------------------- the lists of names
Modality = Literal["ct", "microscopy", "mr", "image"]  # of a manifest row / store patch ("image": a 2D image set)
ScanModality = Literal["ct", "microscopy", "mr"]  # of a volume (what `medvae denoise` reads)
PatchSize = Literal[32, 64, 128, 256]
PrepareMode = Literal["auto", "resize", "tile", "pad"]
ConditionalModel = Literal["vae", "vaegan"]  # take a class / modality id (medvae.data.conditions)
DenoiserModel = Literal["unet-vae", "dae"]  # fully convolutional (medvae.models.denoisers): whole slices, any size
ModelName = Literal[ConditionalModel, "monai-vae", "monai-kl", DenoiserModel]
DENOISERS = get_args(DenoiserModel)
# medvae.models.distributions; poisson-gaussian: the noisy pixel given the clean estimate s, N(s, a·s + b) (DivNoising)
LikelihoodName = Literal["gaussian", "bernoulli", "cbernoulli", "l1", "l2", "poisson-gaussian"]
Condition = Literal["auto", "none", "class", "modality", "mask"]
Task = Literal["reconstruct", "denoise"]
# autocast precision (medvae.training.runtime.resolve_amp): auto is bf16 where the device has it (CPUs with AMX /
# AVX-512 BF16, GPUs from Ampere), fp16 on older GPUs, float32 elsewhere; off is float32
Amp = Literal["auto", "bf16", "fp16", "off"]
# denoise task: supervised (clean store, simulated noise) or on the noisy store itself (medvae.denoising.selfsupervised)
Objective = Literal["supervised", "n2v", "n2s", "divnoising", "sure"]
NoiseKind = Literal["gaussian", "poisson-gaussian", "ct-lowdose"]  # medvae.denoising.noise
Prior = Literal["standard", "gmm", "diffusion"]
SampleFormat = Literal["nifti", "tiff", "png", "npy"]
UtilityTask = Literal["classify", "segment"]
UtilityCondition = Literal["class", "mask", "none"]


class StrictModel(BaseModel):
    """A config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- ingestion
class SplitConfig(StrictModel):
    """Patient-level split fractions; a patient's split depends only on its id and the seed."""

    train: float = 0.7
    val: float = 0.15
    test: float = 0.15
    seed: int = 0

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitConfig:
        total = self.train + self.val + self.test
        if min(self.train, self.val, self.test) < 0 or abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be non-negative and sum to 1, got {total:g}")
        return self


class DiscoverConfig(StrictModel):
    modality: Literal["auto", Modality] = "auto"
    split: SplitConfig = Field(default_factory=SplitConfig)


class PrepareConfig(StrictModel):
    """How volumes become normalized 2D patches."""

    patch_size: PatchSize = 128
    # auto: volumes resize whole slices; 2D image sets pad an image that fits and is over half the
    # patch (28² -> 32²), else resize. pad: centre on a black canvas (image sets only).
    mode: PrepareMode = "auto"
    stride: int | None = None  # tile mode; default = patch_size (no overlap)
    ct_window: tuple[float, float] = (-160.0, 240.0)  # HU; abdominal W400/L40. MAISI uses (-1000, 1000)
    microscopy_percentiles: tuple[float, float] = (1.0, 99.8)  # per stack, as CSBDeep
    foreground_threshold: float = 0.1  # drop patches whose foreground fraction is below this
    ct_body_hu: float = -500.0  # HU above which a CT pixel is body (foreground)
    slice_step: int = 1  # take every n-th slice along z
    dtype: Literal["float16", "uint16"] = "float16"
    workers: int = Field(0, ge=0)  # processes, one volume each; 0: one per CPU core


# --------------------------------------------------------------------------- models
# Default widths per resolution when a config gives no `channels`, sized to the patch. ConvVAE, VAE–GAN and the
# MONAI baselines go down to an 8×8 map, so their depth follows the patch: 3 levels at 32², 4 at 64², 5 at 128²,
# 6 at 256² (the last width repeats): the widths each size had before. A narrower 32² default (16/32/64: 1.8 M
# parameters against 4.1 M, 3.4× the images/s) was measured and not kept: at the same 400 steps on
# Fashion-MNIST it lost 25 nats of test ELBO, 0.024 SSIM and 6% MSE (README "Speed").
DEFAULT_CHANNELS: dict[int, tuple[int, ...]] = {
    32: (32, 64, 128),
    64: (32, 64, 128, 256),
    128: (32, 64, 128, 256, 256),
    256: (32, 64, 128, 256, 256, 256),
}
# unet-vae / dae: one entry per level at any patch size (they denoise whole slices of any size, not patches)
DENOISER_CHANNELS: tuple[int, ...] = (32, 64, 128, 256)


def default_channels(name: str, image_size: int) -> tuple[int, ...]:
    """The widths a model of ``name`` takes at ``image_size``² when its config gives no ``channels``."""
    if name in DENOISERS:
        return DENOISER_CHANNELS
    return DEFAULT_CHANNELS[int(image_size)]


class ModelConfigBase(StrictModel):
    """What every model family's config holds; stored with its weights in every checkpoint.

    A family's config (below) adds its own options, so a VAE config cannot carry a denoiser's. Old
    configs and checkpoints hold one flat dict with every family's keys: :meth:`_foreign_keys` drops
    another family's keys that hold their old default and refuses the others.
    """

    name: ModelName = "vae"
    in_channels: int = 1
    image_size: PatchSize = 128
    # widths per resolution; None: sized to the patch (default_channels; resolved into the run's config)
    channels: tuple[int, ...] | None = None
    res_units: int = 1  # residual units per stage
    norm_groups: int = Field(8, ge=1)  # GroupNorm groups
    upsample: Literal["nearest", "pixelshuffle", "transpose"] = "nearest"
    likelihood: LikelihoodName = "gaussian"
    fixed_scale: float = 0.1  # sigma for l1/l2 (Laplace/Gaussian with fixed scale)
    # likelihood poisson-gaussian: the noise variance a·s + b of a pixel whose clean value is s, on the store's
    # [0, 1] scale (Foi et al. 2008); None: not known (divnoising calibrates it from the noisy store, or refuses)
    noise_a: float | None = Field(None, ge=0)
    noise_b: float | None = Field(None, ge=0)
    # Conditioning (the ids: medvae.data.conditions; the embedding: medvae.models.vae). auto: modality when the
    # store holds several (one model never mixes CT and microscopy), else none. class / modality (vae / vaegan):
    # an embedding of the id joins the encoder's features and the decoder's latent, the VAE–GAN critic is a
    # projection critic, the mixture prior is fitted per id. mask: a joint image + label-map model (one more
    # channel: label / max label).
    condition: Condition = "auto"
    condition_names: tuple[str, ...] = ()  # filled from the store by the trainer: class / modality / label names

    def resolved_channels(self) -> tuple[int, ...]:
        """``channels`` as given, else the default for this model at ``image_size`` (:func:`default_channels`)."""
        return tuple(self.channels) if self.channels else default_channels(self.name, self.image_size)

    @model_validator(mode="before")
    @classmethod
    def _foreign_keys(cls, data):
        """Drop another family's keys that hold their default (a flat config of medvae <= 0.3); refuse the
        others, naming the key and the families that take it."""
        if not isinstance(data, dict):
            return data
        own = cls.model_fields
        out = {}
        for key, value in data.items():
            if key in own or key not in _FAMILY_KEYS:
                out[key] = value  # unknown keys stay: extra="forbid" names them
            elif value != _FAMILY_KEYS[key][1] and not _same_default(value, _FAMILY_KEYS[key][1]):
                raise ValueError(f"model.{key} is an option of {_FAMILY_KEYS[key][0]}, not of model "
                                 f"{data.get('name', 'vae')}; remove it or choose such a model")
        return out


class VAEConfig(ModelConfigBase):
    """``vae``: the ConvVAE (medvae.models.vae)."""

    name: Literal["vae"] = "vae"
    latent_dim: int = 128
    condition_dim: int = 32  # width of the condition embedding (condition class / modality)
    # vector: a latent_dim code from a linear layer on the 8x8 bottleneck. spatial: a spatial_channels x
    # spatial_size² map from 1x1 convolutions, as in latent diffusion (4 channels at 1/8 of the image side, Stable
    # Diffusion's; latent_dim unused): the latent a diffusion prior (prior: diffusion) models with a U-Net
    latent: Literal["vector", "spatial"] = "vector"
    spatial_channels: int = Field(4, ge=1)
    spatial_size: int | None = Field(None, ge=1)  # None: image_size // 8

    @model_validator(mode="after")
    def _check_spatial(self):
        ratio = self.image_size / self.resolved_spatial_size()
        if self.latent == "spatial" and (ratio < 1 or ratio != 2 ** round(math.log2(ratio))):
            raise ValueError(f"model.spatial_size={self.spatial_size} must be image_size ({self.image_size}) "
                             "divided by a power of 2, e.g. image_size // 8")
        return self

    def resolved_spatial_size(self) -> int:
        """The spatial latent's side: ``spatial_size``, else image_size // 8."""
        return int(self.spatial_size or self.image_size // 8)


class VAEGANConfig(VAEConfig):
    """``vaegan``: the ConvVAE and a PatchGAN critic (medvae.models.vaegan)."""

    name: Literal["vaegan"] = "vaegan"
    disc_channels: int = 64
    disc_layers: int = 3
    spectral_norm: bool = False


class MonaiConfig(ModelConfigBase):
    """``monai-vae`` / ``monai-kl``: MONAI's VarAutoEncoder and AutoencoderKL (medvae.models.monai)."""

    name: Literal["monai-vae", "monai-kl"] = "monai-vae"
    latent_dim: int = 128


class _DenoiserBase(ModelConfigBase):
    """The fully convolutional denoisers (medvae.models.denoisers): any size divisible by 2^(stages-1)."""

    # N2V2's fixes (Höck et al. 2022) for blind-spot training: no skip at the top (full-resolution) level and
    # anti-aliased downsampling (conv, then a [1 2 1]² blur with stride 2, instead of a strided conv)
    top_skip: bool = True
    downsample: Literal["conv", "blurpool"] = "conv"
    input_residual: bool = True  # output = sigmoid(logit(input) + f(input)); off for divnoising (no copy path)
    # 0: no normalization. GroupNorm's statistics of a 64² training patch are not those of a whole 512² slice,
    # and the norm before the output conv pulls a flat image toward one level; without it the levels come back,
    # but training is less stable (sure collapses at 5 photons; docs/denoising.md)
    norm_groups: int = Field(8, ge=0)


class DAEConfig(_DenoiserBase):
    """``dae``: the deterministic denoising U-Net (always with skips)."""

    name: Literal["dae"] = "dae"
    # n2v / n2s --posterior (Laine et al. 2019): the output is a Gaussian prior over the clean value, a mean and a
    # log-variance per pixel (2 x in_channels output channels), trained with the likelihood poisson-gaussian as
    # N(noisy; mean, prior variance + a·mean + b); `denoise` returns the posterior mean given the noisy pixel
    prior: bool = False


class UNetVAEConfig(_DenoiserBase):
    """``unet-vae``: the U-Net with a spatial Gaussian latent at its bottleneck."""

    name: Literal["unet-vae"] = "unet-vae"
    skip_connections: bool = True  # U-Net skips from encoder to decoder
    latent_channels: int = 8  # channels of the spatial latent


FAMILY_CONFIGS: dict[str, type[ModelConfigBase]] = {
    "vae": VAEConfig, "vaegan": VAEGANConfig, "monai-vae": MonaiConfig, "monai-kl": MonaiConfig,
    "dae": DAEConfig, "unet-vae": UNetVAEConfig,
}


def _family_tag(data) -> str:
    name = data.get("name", "vae") if isinstance(data, dict) else getattr(data, "name", "vae")
    return name if name in FAMILY_CONFIGS else None  # an unknown name: pydantic lists the names it knows


# A model's config: one family's config, chosen by `name` ("vae" when absent).
ModelConfig = Annotated[
    Annotated[VAEConfig, Tag("vae")] | Annotated[VAEGANConfig, Tag("vaegan")]
    | Annotated[MonaiConfig, Tag("monai-vae")] | Annotated[MonaiConfig, Tag("monai-kl")]
    | Annotated[DAEConfig, Tag("dae")] | Annotated[UNetVAEConfig, Tag("unet-vae")],
    Discriminator(_family_tag),
]
AnyModelConfig = VAEConfig | VAEGANConfig | MonaiConfig | DAEConfig | UNetVAEConfig

# every family's key (beyond the shared ones) -> (the families that take it, its default)
_FAMILY_KEYS: dict[str, tuple[str, object]] = {}
for _name, _cls in FAMILY_CONFIGS.items():
    for _key, _field in _cls.model_fields.items():
        if _key not in ModelConfigBase.model_fields:
            names = _FAMILY_KEYS.get(_key, ("", None))[0]
            if _name not in names.split(" / "):
                _FAMILY_KEYS[_key] = (f"{names} / {_name}" if names else _name, _field.default)


def _same_default(value, default) -> bool:
    return isinstance(value, (list, tuple)) and isinstance(default, tuple) and tuple(value) == default


def parse_model_config(data: dict | BaseModel, source: str = "model config") -> AnyModelConfig:
    """``data`` (a dict, or another family's config) as its family's config; ConfigError naming ``source``."""
    if isinstance(data, BaseModel):
        data = data.model_dump()
    try:
        return _MODEL_ADAPTER.validate_python(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


_MODEL_ADAPTER = TypeAdapter(ModelConfig)
MODEL_KEYS = frozenset(k for c in FAMILY_CONFIGS.values() for k in c.model_fields)  # of every family


def flat_model_dump(cfg: ModelConfigBase) -> dict:
    """``cfg`` as the flat dict of medvae <= 0.3 (every family's key, another family's at its default), for
    keys that must not change with the families (a pipeline's train-stage key)."""
    flat = {k: list(f.default) if isinstance(f.default, tuple) else f.default
            for c in FAMILY_CONFIGS.values() for k, f in c.model_fields.items()}
    return _without_defaults({**flat, **cfg.model_dump(mode="json")}, _ADDED_MODEL_KEYS, flat)


def _without_defaults(dump: dict, keys: tuple[str, ...], defaults: dict) -> dict:
    """``dump`` without those of ``keys`` that hold their value in ``defaults``: keys added to a config since its
    dumps were first hashed, so the hashes of configs that leave them at their defaults stay as they were."""
    return {k: v for k, v in dump.items() if not (k in keys and v == defaults[k])}


# Model keys added after the flat dict was frozen: the dae's prior (n2v --posterior), the ConvVAE's spatial latent
_ADDED_MODEL_KEYS = ("prior", "latent", "spatial_channels", "spatial_size")
_ADDED_TRAIN_KEYS = ("frequency_weight", "frequency_alpha")  # the focal frequency loss
_ADDED_NOISE_KEYS = ("flips", "target")  # the supervised denoise task's symmetries and Noise2Noise target


class TrainConfig(StrictModel):
    batch_size: int = 64
    lr: float = 2e-4
    disc_lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0
    max_steps: int | None = None
    epochs: int = 10
    warmup_steps: int = 100  # linear LR warm-up, then cosine decay
    beta: float = 1.0  # KL weight after warm-up
    beta_warmup_steps: int = 1000  # KL annealing from 0 to beta
    free_bits: float = 0.0  # nats per latent dimension; 0 disables
    grad_clip: float = 1.0
    amp: Amp = "auto"  # fp16 trains with a GradScaler
    channels_last: bool = True
    compile: bool = False
    ema_decay: float = 0.0  # 0 disables EMA weights
    checkpoint_every: int = 500
    log_every: int = 10
    seed: int = 0
    max_bad_steps: int = 20  # non-finite steps tolerated before stopping
    # VAE-GAN
    gan_loss: Literal["hinge", "lsgan"] = "hinge"
    adv_weight: float = 0.5  # multiplies the adaptive weight
    feature_matching_weight: float = 1.0
    # vae / vaegan: the focal frequency loss of the reconstructions (Jiang et al. 2021; summed over frequencies
    # like the NLL over pixels), a decoder loss against blur that needs no pretrained network; 0: off
    frequency_weight: float = Field(0.0, ge=0)
    frequency_alpha: float = Field(1.0, ge=0)
    disc_start: int = 500  # discriminator warm-up: adversarial terms start here
    r1_gamma: float = 0.0  # 0 disables R1 penalty
    val_batches: int = 8  # validation batches per epoch


class NoiseConfig(StrictModel):
    """How the denoise task corrupts clean patches (medvae.denoising.noise); a level range is sampled per patch."""

    kind: NoiseKind = "gaussian"
    # gaussian: sigma on the [0, 1] scale; poisson-gaussian: photons at the normalization's `high`
    # (fewer = noisier); ct-lowdose: dose fraction of `ct_photons`. None = the kind's default range.
    levels: tuple[float, float] | None = None
    eval_levels: list[float] | None = None  # levels `medvae evaluate` reports; None = low, mid, high of levels
    read_noise: float = 2.0  # poisson-gaussian: camera read-noise sigma in photons
    ct_photons: float = 2.0e7  # ct-lowdose: incident photons per detector bin at full dose
    ct_angles: int = 0  # ct-lowdose: projection angles over 180 degrees; 0 = one per patch row
    crop: int = 0  # train on random crops of this size, cut after the noise (unet-vae / dae); 0 = whole patches
    # supervised: each training pair turned by one of the square's 8 symmetries (flips, 90° turns), drawn per step
    flips: bool = False
    # supervised: the target is the clean patch, or (noisy: Noise2Noise, Lehtinen et al. 2018) a second noisy copy
    # of it at the same level, drawn independently: needs no clean image, only two independent acquisitions
    target: Literal["clean", "noisy"] = "clean"


class BlindSpotConfig(StrictModel):
    """Masking of the self-supervised objectives n2v / n2s (medvae.denoising.masks)."""

    # n2v: share of pixels masked per patch, one per cell of a grid of side round(1 / sqrt(fraction))
    # (N2V's stratified sampling; 1/64: 64 pixels of a 64² patch)
    fraction: float = Field(1 / 64, gt=0, le=0.25)
    # n2v: a masked pixel takes the value of a random unmasked neighbour (N2V) or the median of its unmasked
    # neighbours (N2V2); neighbours within `radius` (5x5 at 2)
    replace: Literal["random", "median"] = "median"
    radius: int = Field(2, ge=1, le=5)
    grid: int = Field(4, ge=2, le=8)  # n2s: J-invariant grid masking, one of grid² phases masked per patch
    # StructN2V (Broaddus et al. 2020): also hide the pixels along a line through each masked pixel (given random
    # values, no loss), for noise correlated along rows (horizontal) or columns (vertical), or in a square around
    # it (box: noise correlated with its near neighbours in every direction, as filtered back-projection's); n2v only
    struct: Literal["none", "horizontal", "vertical", "box"] = "none"
    struct_length: int = Field(5, ge=3, le=15)  # the line's (square's side) in pixels, masked pixel in the middle
    # early stopping without clean data: a store with no val split validates (and keeps best.pt) on this fixed share
    # of its train patches, evenly spaced and never trained on; 0: no held-out patches (then no best.pt)
    holdout: float = Field(1 / 16, ge=0, lt=0.5)


# The model settings each denoise objective takes when the config does not name them: a model that can denoise
# whole slices (dae; unet-vae for divnoising), N2V2's architecture, an L2 loss and no input residual (N2V's
# plain U-Net) for the self-supervised objectives, and DivNoising's VAE: no path from the noisy input to the
# output but the latent. The self-supervised dae is sized for a CPU: 16/32/64 (1,500 steps of 16 64² patches in
# ~4.6 min on 2 cores, 4.8x faster than 32/64/128/256 and +0.06 dB). It keeps GroupNorm, though the norm before
# its output conv pulls a flat image toward one level (norm_groups 0 removes that, but sure collapses without
# it at 5 photons and n2v trails by 1 dB at 150 steps; docs/denoising.md)
_SELF_SUPERVISED_DAE = {"name": "dae", "top_skip": False, "downsample": "blurpool", "likelihood": "l2",
                        "input_residual": False, "channels": (16, 32, 64)}
OBJECTIVE_MODEL_DEFAULTS: dict[str, dict] = {
    "supervised": {"name": "dae"},
    "n2v": _SELF_SUPERVISED_DAE,
    "n2s": _SELF_SUPERVISED_DAE,
    "divnoising": {"name": "unet-vae", "skip_connections": False, "input_residual": False,
                   "likelihood": "poisson-gaussian"},
    # PG-SURE (medvae.denoising.sure): n2v's network without a blind spot (the likelihood is not its loss)
    "sure": _SELF_SUPERVISED_DAE,
}


class TrainStageConfig(StrictModel):
    model: ModelConfig = Field(default_factory=VAEConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    task: Task = "reconstruct"  # denoise: noisy input -> clean target
    # denoise task: supervised (the store is clean, `noise` corrupts it) or self-supervised on a store of noisy
    # scans as they are (n2v, n2s, divnoising, sure: `noise` does not apply)
    objective: Objective = "supervised"
    noise: NoiseConfig = Field(default_factory=NoiseConfig)
    blindspot: BlindSpotConfig = Field(default_factory=BlindSpotConfig)
    # n2v / n2s: the network predicts a Gaussian prior (mean, log-variance) and the estimate is the posterior mean
    # under the Poisson–Gaussian noise model (model.noise_a / noise_b; calibrated from the noisy store when not
    # given). None (auto): on when a noise model is given or can be calibrated; false: off (the plain blind-spot
    # L2 network). The run's config.yaml records what was resolved.
    posterior: bool | None = None

    def stable_dump(self) -> dict:
        """``model_dump(mode="json")`` with the model as the flat dict of medvae <= 0.3 (:func:`flat_model_dump`):
        what up-to-date keys and saved settings compare, so runs and studies from before the model families
        are not redone. The posterior correction's fields (``posterior``, ``blindspot.holdout``; ``model.prior``
        in :func:`flat_model_dump`) are left out at their defaults except in a blind-spot run, the one whose
        training they change: other runs keep their keys, a blind-spot run from before them is redone."""
        dump = {**self.model_dump(mode="json"), "model": flat_model_dump(self.model)}
        dump["train"] = _without_defaults(dump["train"], _ADDED_TRAIN_KEYS, TrainConfig().model_dump(mode="json"))
        dump["noise"] = _without_defaults(dump["noise"], _ADDED_NOISE_KEYS, NoiseConfig().model_dump(mode="json"))
        if not (self.task == "denoise" and self.objective in ("n2v", "n2s")):
            if self.posterior is None:
                del dump["posterior"]
            if self.blindspot.holdout == BlindSpotConfig().holdout:
                del dump["blindspot"]["holdout"]
        return dump

    @model_validator(mode="before")
    @classmethod
    def _objective_defaults(cls, data):
        """A denoise config takes its objective's model settings (OBJECTIVE_MODEL_DEFAULTS) for every key it
        does not give: without `model.name` a denoise run trains dae (unet-vae for divnoising), never the
        ConvVAE, which cannot denoise a whole slice."""
        if not isinstance(data, dict) or data.get("task") != "denoise":
            return data
        model = data.get("model")
        if isinstance(model, BaseModel):
            model = model.model_dump(exclude_unset=True)
        model = dict(model) if isinstance(model, dict) else {} if model is None else model
        if isinstance(model, dict):
            defaults = OBJECTIVE_MODEL_DEFAULTS.get(data.get("objective", "supervised"), {})
            model = {**defaults, **model}
            family = FAMILY_CONFIGS.get(model["name"])  # only the keys the chosen model has (check_config
            if family is not None:                       # names a model that cannot denoise)
                model = {k: v for k, v in model.items() if k in family.model_fields or k not in defaults}
        return {**data, "model": model}


# --------------------------------------------------------------------------- evaluation / generation
class DiffusionPriorConfig(StrictModel):
    """The latent diffusion prior (``prior: diffusion``, medvae.synthesis.diffusion) of a spatial-latent model:
    MONAI's DiffusionModelUNet on the frozen encoder's codes, DDIM sampling. Sized for a 2-core CPU at a
    4 x 16 x 16 latent (128² images; ~0.5 s a step, 15 minutes); on a GPU raise steps and channels."""

    steps: int = Field(2000, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    ema_decay: float = Field(0.995, ge=0, lt=1)
    channels: tuple[int, ...] = (32, 64, 64)  # per U-Net level (MONAI's attention sits at the middle block)
    res_blocks: int = Field(1, ge=1)
    train_timesteps: int = Field(1000, ge=2)
    sample_steps: int = Field(50, ge=1)  # DDIM steps per sample
    seed: int = 0


class EvaluateConfig(StrictModel):
    split: str = "test"
    iwae_k: int = 64
    mmd_samples: int = 1000  # model samples per modality for cohort MMD
    mmd_permutations: int = 200
    batch_size: int = 128
    worst_patches: int = 4
    sample_metrics: bool = True  # FID, KID, precision/recall, density/coverage on the store's feature network
    feature_steps: int = 400  # training steps of that network (cached in STORE/features/)
    prior_components: int = Field(10, ge=1)  # of the Gaussian-mixture prior compared with N(0, I)
    # learned priors whose samples are measured beside N(0, I)'s (each needs a train split; diffusion a spatial
    # latent, its fit takes minutes on a CPU)
    priors: tuple[Literal["gmm", "diffusion"], ...] = ("gmm",)
    diffusion: DiffusionPriorConfig = Field(default_factory=DiffusionPriorConfig)
    denoise_patches: int = 96  # denoise runs: evenly spaced patches of the split every method denoises
    # IWAE on at most this many patches (8 per patient, evenly thinned beyond; the report gives n and sd): k decodes
    # each are evaluation's dominant cost (on all 1,000 images of a 32² split: 3.7 of its 4 minutes on a CPU core)
    iwae_max_patches: int = 200
    report_patients: int = 20  # report.html shows sections for at most this many patients (worst and best half)
    # Image sets (every patient one patch, evaluation.class_tables.is_image_set): per-image rows in metrics.csv and
    # per_patient in summary.json only when asked (10,000 test images are 32 MB of rows), the report's grid of the
    # split's worst reconstructions, and the other splits' reconstruction metrics on evenly spaced images.
    per_image: bool = False
    worst_images: int = Field(16, ge=1)
    split_patches: int = Field(1000, ge=1)


class DenoiseConfig(StrictModel):
    """`medvae denoise RUN INPUT --out OUTPUT`: whole slices at native resolution."""

    checkpoint: str = "best"
    batch_size: int = 0  # slices per forward pass; 0 = auto: 1 on CPU (512² activations are cache-bound), 8 on GPU
    tile: int = 0  # 0 = whole slices; else MONAI sliding-window tiles of this size (memory-bound GPUs)
    overlap: float = 0.25  # sliding-window overlap (gaussian blending)
    modality: Literal["auto", ScanModality] = "auto"
    # autocast for the model: bf16 is ~3x faster on a CPU with AMX, its outputs within ~1e-2 of fp32's on the
    # [0, 1] scale; off (fp32) keeps the outputs of releases before auto was the default
    amp: Amp = "auto"
    # unet-vae runs: 0 decodes the posterior mean code once; N > 0 returns the MMSE estimate, the mean of the clean
    # estimates of N posterior samples (DivNoising), drawn from a generator seeded with `seed` for every scan
    samples: int = Field(0, ge=0)
    # also write each scan's per-pixel posterior sd as <stem>_sd beside it: unet-vae runs the sd of `samples` >= 2
    # posterior samples, n2v --posterior runs (dae with model.prior) the closed-form Gaussian posterior sd
    sd: bool = False
    seed: int = 0


class GenerateConfig(StrictModel):
    n: int = 100
    seed: int = 0
    format: SampleFormat = "nifti"
    batch_size: int = 64
    temperature: float = 1.0
    checkpoint: str = "best"
    audit_percentile: float = 1.0  # flag samples closer than this percentile of real-real NN distances
    drop_flagged: bool = False
    # N(0, I), a Gaussian mixture fitted on the training codes, or a diffusion model of them (a spatial latent)
    prior: Prior = "gmm"
    prior_components: int = Field(10, ge=1)
    diffusion: DiffusionPriorConfig = Field(default_factory=DiffusionPriorConfig)
    per_class: bool = False  # class / modality models: balanced over classes (default: the training proportions)
    # prior: samples of the prior; neighbours / interpolate: per_image variants of every image of a store's
    # split (generate(..., anchors=STORE); medvae.synthesis.anchored)
    synthesis: Literal["prior", "neighbours", "interpolate"] = "prior"
    per_image: int = Field(1, ge=1)
    split: str = "train"  # the anchors' split
    neighbour_range: tuple[float, float] = (0.5, 1.0)
    posterior_temperature: float = Field(0.0, ge=0)


T = TypeVar("T", bound=BaseModel)


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = first["loc"]
    # a model config's location holds its family's tag after "model" (model.vae.latent_dim): not a key
    loc = [p for i, p in enumerate(loc) if not (p in FAMILY_CONFIGS and (i == 0 or loc[i - 1] == "model"))]
    key = ".".join(str(p) for p in loc) or "(top level)"
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}'; remove it or fix its spelling"
    return f"{source}: bad value for '{key}': {first['msg']}"


def parse_config(data: dict | None, model: type[T], source: str = "config") -> T:
    """Validate a dict against ``model``; raise ConfigError naming the key and ``source``."""
    try:
        return model.model_validate(data or {})
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def load_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping; a missing or malformed file raises ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; check the path")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]}); fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    return data


def load_config(path: str | os.PathLike | None, model: type[T]) -> T:
    """Load ``model`` from a YAML file (defaults when ``path`` is None)."""
    if path is None:
        return model()
    return parse_config(load_yaml(path), model, str(path))


# --------------------------------------------------------------------------- utility study
class AugmentConfig(StrictModel):
    """Classical augmentation of the utility study's ``+classical`` arms, drawn per image with MONAI's
    RandFlip / RandAffine / Rand2DElastic / RandGaussianNoise conventions (medvae.downstream.augment).
    A geometric field left None takes the store's modality's default (``augment.MODALITY_DEFAULTS``)."""

    flip_lr: bool | None = None
    flip_ud: bool | None = None
    rotate_deg: float | None = Field(None, ge=0, le=180)  # uniform in ±rotate_deg
    scale: float | None = Field(None, ge=0, lt=1)  # isotropic factor uniform in 1 ± scale
    translate: float | None = Field(None, ge=0, lt=0.5)  # per axis, uniform in ± translate × side
    elastic_prob: float = Field(0.3, ge=0, le=1)
    elastic_spacing: int = Field(8, ge=2)  # pixels between control points
    elastic_magnitude: float = Field(1.0, ge=0)  # largest control-point offset, pixels
    noise_prob: float = Field(0.3, ge=0, le=1)
    noise_std: float = Field(0.02, ge=0)  # on the [0, 1] scale
    # FixMatch's strong view (UtilityConfig.strong); off by default, so the +classical arms are as before
    contrast_prob: float = Field(0.0, ge=0, le=1)  # RandAdjustContrast: per-image min-max gamma
    contrast_gamma: tuple[float, float] = (0.5, 2.0)  # gamma uniform in this range
    dropout_prob: float = Field(0.0, ge=0, le=1)  # RandCoarseDropout: square holes filled with 0
    dropout_holes: int = Field(1, ge=1)
    dropout_size: float = Field(0.25, gt=0, le=1)  # hole side, fraction of the image side


# The utility study's arms (medvae.downstream.study): supervised on the labelled subset (real, +classical),
# with synthetic images (+synthetic, synthetic), and semi-supervised, learning from the unlabelled train
# images too (pseudo, fixmatch, latent, m2; medvae.downstream.semisupervised / medvae.downstream.latent).
Arm = Literal["real", "real+classical", "real+synthetic", "real+classical+synthetic", "synthetic",
              "pseudo", "fixmatch", "latent", "m2", "pseudo+synthetic", "fixmatch+synthetic"]
ARMS: tuple[str, ...] = Arm.__args__
DEFAULT_ARMS = ("real", "real+classical", "real+synthetic", "real+classical+synthetic", "synthetic")
# FixMatch's strong view (Sohn et al. 2020: RandAugment-like, then Cutout), beyond the classical draw; the
# geometric fields come per modality (medvae.downstream.augment.STRONG_MODALITY_DEFAULTS)
STRONG_AUGMENT = {"elastic_prob": 0.5, "elastic_magnitude": 2.0, "noise_prob": 0.5, "noise_std": 0.05,
                  "contrast_prob": 0.5, "dropout_prob": 1.0, "dropout_size": 0.125}
_AUGMENT_STRONG_FIELDS = ("contrast_prob", "contrast_gamma", "dropout_prob", "dropout_holes", "dropout_size")
_SEMI_FIELDS = ("pseudo_rounds", "pseudo_threshold", "fixmatch_threshold", "unlabelled_ratio", "unlabelled_weight",
                "strong", "latent_encoder_lr", "m2", "diffusion")


class M2Config(StrictModel):
    """The ``m2`` arm's and ``synthesis: m2``'s model (Kingma et al. 2014 M2, medvae.downstream.m2): a
    class-conditional ConvVAE and the downstream classifier as q(y|x), trained per cell on its labelled
    subset and the unlabelled pool."""

    # sized for a 2-core CPU (~150 s per cell at 32²): each step decodes unlabelled_batch × classes images
    steps: int = Field(200, ge=1)  # Adam steps (each: batch_size labelled + unlabelled_batch unlabelled images)
    unlabelled_batch: int = Field(16, ge=1)  # unlabelled images per step (each decoded once per class)
    # weight of -log q(y|x) per labelled image against its ELBO in nats; 10 and 50 chosen between on 2,000 held-out
    # Fashion-MNIST train images at 10 labels per class: 74.95 / 74.7 % (within noise)
    alpha: float = Field(10.0, ge=0)
    lr: float = Field(1e-3, gt=0)
    latent_dim: int = Field(32, ge=1)
    channels: list[int] = Field(default_factory=lambda: [8, 16, 32])
    likelihood: LikelihoodName = "bernoulli"
    per_image: int = Field(10, ge=0)  # synthesis m2: posterior variants per labelled image (decoded with its label)
    prior_ratio: float = Field(1.0, ge=0)  # synthesis m2: class-balanced prior samples per labelled image


class UtilityConfig(StrictModel):
    """`medvae utility`: does synthetic data help a downstream model trained on few labels?

    For each label budget (``fractions`` of the train split, or ``labels_per_class``) and seed, the
    labelled subset is drawn; a generator learns from the train images (every one, unlabelled,
    with ``unlabelled: all``; else the subset) and synthesizes labelled images; one downstream network
    (same steps, seed and real batches) is trained on each arm and scored on the real test split
    (medvae.downstream.study).
    """

    task: UtilityTask = "classify"
    model: ConditionalModel = "vae"  # the generator
    condition: UtilityCondition | None = None  # None: what the task and synthesis need
    fractions: list[float] = Field(default_factory=lambda: [0.05, 0.1, 1.0])  # of the train split, in (0, 1]
    labels_per_class: list[int] | None = None  # classify: labelled images per class, instead of fractions
    seeds: int = Field(3, ge=1)
    arms: list[Arm] = Field(default_factory=lambda: list(DEFAULT_ARMS))
    # neighbours | interpolate: variants of each labelled image (medvae.synthesis.anchored);
    # prior: samples of the generator's mixture prior
    synthesis: Literal["neighbours", "interpolate", "prior", "m2"] = "neighbours"  # m2: the cell's M2 model
    # all: the generator learns from every train image, without labels (classify; a segmentation
    # generator makes image + mask pairs and learns from the labelled patients only)
    unlabelled: Literal["all", "none"] = "all"
    per_image: int = Field(10, ge=1)  # neighbours / interpolate: variants per labelled image
    neighbour_range: tuple[float, float] = (0.5, 1.0)  # neighbours: lam ~ U(range), 1 = the neighbour's code
    posterior_temperature: float = Field(0.0, ge=0)  # neighbours / interpolate: posterior noise on each variant
    ratio: float = Field(1.0, gt=0)  # prior: synthetic images per real image of the subset
    filter_threshold: float = Field(0.5, ge=0, le=1)  # classify: keep a sample whose label the real arm's net
    #                                                   gives probability >= this (0 keeps all)
    drop_flagged: bool = True  # drop samples the memorization audit flags as near-copies of training images
    synthetic_share: float = Field(3.0, gt=0)  # synthetic images per real image in each batch, at most
    generator_steps: int = Field(2000, ge=1)  # train.max_steps of each generator
    # unlabelled: all: a run of `medvae train` on this store (unconditional) to use as the generator instead of
    # training one; in a pipeline, the name of one of its models
    generator_run: str | None = None
    prior: Prior = "gmm"
    prior_components: int = Field(10, ge=1)
    diffusion: DiffusionPriorConfig = Field(default_factory=DiffusionPriorConfig)  # prior: diffusion
    temperature: float = Field(1.0, gt=0)  # prior synthesis
    downstream_steps: int = Field(500, ge=1)  # the same for every arm
    batch_size: int = Field(32, ge=1)  # real images per downstream batch
    lr: float = Field(1e-3, gt=0)  # downstream Adam learning rate
    classical: AugmentConfig = Field(default_factory=AugmentConfig)  # the +classical arms
    # The semi-supervised arms pseudo / fixmatch (+synthetic) (medvae.downstream.semisupervised)
    pseudo_rounds: int = Field(1, ge=1)  # self-training rounds; each round's student is the next teacher
    pseudo_threshold: float = Field(0.9, ge=0, le=1)  # keep a pseudo-label whose probability is >= this
    # tau: weak-view confidence for the consistency loss; the paper's 0.95 assumes ~10^6 steps: with a study's
    # few hundred, 0.8 scored 1.2 points higher on held-out train images (Fashion-MNIST, 10 labels per class)
    fixmatch_threshold: float = Field(0.8, ge=0, le=1)
    unlabelled_ratio: int = Field(3, ge=1)  # mu: unlabelled images per labelled one in each fixmatch step
    unlabelled_weight: float = Field(1.0, ge=0)  # lambda_u: weight of the consistency loss
    strong: AugmentConfig = Field(default_factory=lambda: AugmentConfig(**STRONG_AUGMENT))  # fixmatch's strong view
    generator: TrainStageConfig = Field(default_factory=TrainStageConfig)  # model / train settings of generators
    # the latent (M1) and m2 arms and synthesis m2 (medvae.downstream.latent, medvae.downstream.m2); left out of
    # the settings hash while at their defaults, so a study made before them resumes
    # latent arm: Adam lr of the fine-tuned encoder (the head's: lr); 1e-3 against 1e-4 on 2,000 held-out
    # Fashion-MNIST train images at 10 labels per class: 74.3 / 73.0 %
    latent_encoder_lr: float = Field(1e-3, gt=0)
    m2: M2Config = Field(default_factory=lambda: M2Config())

    @model_validator(mode="before")
    @classmethod
    def _generator_family(cls, data):
        """The generators are the study's ``model`` (medvae.downstream.synthetic_sets sets the name), so a
        ``generator.model`` that names no model is read as that family: its keys (a vaegan's
        ``disc_channels``...) are checked against the model the study trains, not against the default vae."""
        generator = data.get("generator", {}) if isinstance(data, dict) else None
        if not isinstance(generator, dict):
            return data
        study, model = data.get("model", cls.model_fields["model"].default), generator.get("model", {})
        if study not in FAMILY_CONFIGS or not isinstance(model, dict) or "name" in model:
            return data
        return {**data, "generator": {**generator, "model": {"name": study, **model}}}

    @model_validator(mode="before")
    @classmethod
    def _strong_defaults(cls, data):
        """A ``strong:`` that names some fields keeps the strong view's defaults (STRONG_AUGMENT) for the others,
        not the classical ones."""
        if isinstance(data, dict) and isinstance(data.get("strong"), dict):
            return {**data, "strong": {**STRONG_AUGMENT, **data["strong"]}}
        return data

    def stable_dump(self, exclude: set[str] | None = None) -> dict:
        """``model_dump(mode="json", exclude=exclude)`` with the generator's config as
        :meth:`TrainStageConfig.stable_dump`: what a study's settings and a pipeline's utility key compare.
        Fields added with the semi-supervised arms (and the diffusion prior) are left out while at their default,
        so a study made before them keeps its settings hash and resumes."""
        dump = {**self.model_dump(mode="json", exclude=exclude), "generator": self.generator.stable_dump()}
        for name in _SEMI_FIELDS:
            if name in dump and getattr(self, name) == type(self).model_fields[name].get_default(
                    call_default_factory=True):
                del dump[name]
        if "classical" in dump:
            default = AugmentConfig()
            for name in _AUGMENT_STRONG_FIELDS:
                if getattr(self.classical, name) == getattr(default, name):
                    del dump["classical"][name]
        return dump

    @model_validator(mode="after")
    def _check(self) -> UtilityConfig:
        if not self.fractions or any(not 0.0 < f <= 1.0 for f in self.fractions):
            raise ValueError(f"fractions must be in (0, 1], got {self.fractions}")
        if self.labels_per_class is not None:
            if self.task != "classify":
                raise ValueError("labels_per_class needs task classify (segmentation subsets are whole patients)")
            if not self.labels_per_class or min(self.labels_per_class) < 1:
                raise ValueError(f"labels_per_class must be positive counts, got {self.labels_per_class}")
        if not self.arms:
            raise ValueError("arms is empty; name at least one of " + ", ".join(ARMS))
        if self.condition not in (None, self.generator_condition):
            raise ValueError(f"task {self.task} with synthesis {self.synthesis} and unlabelled {self.unlabelled} "
                             f"trains a generator with condition {self.generator_condition}, not {self.condition}")
        if self.generator_run is not None and not self.pools_unlabelled:
            raise ValueError("generator_run needs task classify with unlabelled: all (one generator of every "
                             "train image); the other generators are trained per cell")
        lo, hi = self.neighbour_range
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"neighbour_range must satisfy 0 <= low <= high <= 1, got {self.neighbour_range}")
        return self

    @property
    def pools_unlabelled(self) -> bool:
        """Whether one generator learns from every train image without labels (classify, ``unlabelled: all``)."""
        return self.task == "classify" and self.unlabelled == "all"

    @property
    def generator_condition(self) -> str:
        """``mask`` (segment: joint image + mask pairs); ``class`` for prior samples of a generator of the
        labelled subset; ``none`` otherwise (anchored variants take their anchor's label, and a generator
        of unlabelled images has no labels to be conditioned on)."""
        if self.task == "segment":
            return "mask"
        return "class" if self.synthesis == "prior" and not self.pools_unlabelled else "none"

    @property
    def budgets(self) -> list[tuple[str, float | None, int | None]]:
        """``(key, fraction, labels per class)`` of each label budget, smallest first."""
        if self.labels_per_class is not None:
            return [(f"{n}pc", None, n) for n in sorted(set(self.labels_per_class))]
        return [(f"{f:g}", f, None) for f in sorted(set(self.fractions))]


# --------------------------------------------------------------------------- pipelines
PACKAGED_PIPELINES = Path(__file__).resolve().parent / "pipelines"  # the pipeline YAMLs shipped in the wheel


def packaged_pipelines() -> list[str]:
    """Names of the packaged pipelines (``medvae run NAME``), sorted."""
    return sorted(p.stem for p in PACKAGED_PIPELINES.glob("*.yaml"))


class PipelineGenerateConfig(GenerateConfig):
    model: str = ""  # which of `models` to sample from; default: the last one listed
    mix_ratio: float | None = None  # also write an augmented store with this synthetic:real ratio


class PipelineConfig(StrictModel):
    """A whole `medvae run` pipeline: one store, several models, one evaluation and generation."""

    labels: str | None = None  # label directory, relative to --scans (found automatically if None)
    reference: str | None = None  # reference manifest (e.g. data_manifests/tcia_pancreas_ct.csv)
    device: str = "auto"  # auto | cpu | cuda
    discover: DiscoverConfig = Field(default_factory=DiscoverConfig)
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    models: dict[str, TrainStageConfig] = Field(default_factory=lambda: {"vae": TrainStageConfig()})
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    generate: PipelineGenerateConfig = Field(default_factory=PipelineGenerateConfig)
    # Ablations: "model.latent_dim": [32, 128], "train.beta": [0.5, 1.0], ... Every model above is trained
    # once per combination of values (named e.g. "vae[latent_dim=32,beta=0.5]") and all are compared.
    sweep: dict[str, list] = Field(default_factory=dict)
    utility: UtilityConfig | None = None  # a downstream utility study on the store (medvae.downstream), in RUN/utility

"""The denoisers (``dae``, ``unet-vae``): fully convolutional U-Nets that denoise whole slices at any
size, their configs and their :class:`Denoiser` interface."""

from medvae.config import DAEConfig, UNetVAEConfig
from medvae.models.denoisers.dae import DAE
from medvae.models.denoisers.interface import Denoiser, DenoiserOutput
from medvae.models.denoisers.unet import pad_to_multiple
from medvae.models.denoisers.unet_vae import UNetVAE

__all__ = ["DAE", "DAEConfig", "Denoiser", "DenoiserOutput", "UNetVAE", "UNetVAEConfig", "pad_to_multiple"]

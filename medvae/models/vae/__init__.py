"""The VAE family: the convolutional VAE (``vae``), its config and the base class and interface every
VAE-like model shares."""

from medvae.config import VAEConfig
from medvae.models.vae.base import VAEBase
from medvae.models.vae.conv import BOTTLENECK, ConvVAE, stage_channels
from medvae.models.vae.interface import VAEOutput, VariationalModel

__all__ = ["BOTTLENECK", "ConvVAE", "VAEBase", "VAEConfig", "VAEOutput", "VariationalModel", "stage_channels"]

"""The VAE–GAN family (``vaegan``): the ConvVAE with a PatchGAN critic, and its config."""

from medvae.config import VAEGANConfig
from medvae.models.vaegan.discriminator import PatchDiscriminator
from medvae.models.vaegan.model import VAEGAN

__all__ = ["PatchDiscriminator", "VAEGAN", "VAEGANConfig"]

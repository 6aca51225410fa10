"""The semi-supervised generator M2 (Kingma et al. 2014): a class-conditional VAE whose label is a latent
variable for unlabelled images (:mod:`medvae.models.m2.model`)."""

from medvae.models.m2.model import M2

__all__ = ["M2"]

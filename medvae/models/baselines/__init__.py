"""The MONAI baselines (``monai-vae``, ``monai-kl``) and their config. The networks
(:mod:`medvae.models.baselines.networks`) import MONAI, which is slow: import them only to build one."""

from medvae.config import MonaiConfig

__all__ = ["MonaiConfig"]

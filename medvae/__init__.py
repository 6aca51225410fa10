"""medvae: scans -> normalized 2D patches -> VAE / VAE-GAN -> synthetic datasets and reports."""

__version__ = "0.1.0"

from medvae.errors import ConfigError, InputError, MedvaeError  # noqa: E402

__all__ = ["__version__", "MedvaeError", "InputError", "ConfigError"]

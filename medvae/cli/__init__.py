"""The `medvae` command line: one module per command, each a thin wrapper over a library call.

This is the only layer that prints for the user or sets an exit code: library code raises
``MedvaeError`` subclasses, and :func:`medvae.cli.app.user_errors` turns one into a single line on
stderr and exit code 2. Commands import the heavy stages (torch, MONAI, scipy) inside their
bodies, so `medvae --help` and a typo answer at once.
"""

from medvae.cli import denoise, discover, evaluate, generate, phantom, prepare, run, train, utility  # noqa: F401 (registers)
from medvae.cli.app import app

__all__ = ["app"]

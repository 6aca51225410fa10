"""`python -m medvae` (used by torchrun: `torchrun --nproc_per_node 2 -m medvae train ...`)."""

from medvae.cli import app

app()

"""M2 of Kingma et al. 2014 ("Semi-supervised learning with deep generative models", section 3.1.2).

The generative model p(x, y, z) = p(y) p(z) p(x | y, z) with p(y) uniform over the K classes, p(z) =
N(0, I) and p(x | y, z) the class-conditional ConvVAE's decoder; the inference model q(y | x) (a
classifier) and q(z | x, y) (the ConvVAE's encoder with the class embedding appended to its features).

Bounds, one z per (image, class) (the posterior mean in eval mode), in nats:

- labelled (eq. 6): ELBO(x, y) = E_q(z|x,y)[log p(x | y, z)] + log p(y) − KL(q(z | x, y) || p(z));
  the loss per labelled image is −ELBO(x, y) − α·log q(y | x) (eq. 9's classification term);
- unlabelled (eq. 7): U(x) = Σ_y q(y | x)·(−ELBO(x, y)) − H(q(·| x)), i.e. −U(x) = Σ_y q(y|x)·ELBO(x, y) +
  H(q(·|x)) is the bound on log p(x); every class is decoded at once, as a batch of B·K.

The classifier is given by the caller (the layer that owns the downstream network picks it), so the arm's
network of a study can be the same network as every other arm's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medvae.models.distributions import kl_normal, reparameterize
from medvae.models.vae import ConvVAE


class M2(nn.Module):
    """q(y|x) ``classifier`` and the class-conditional ``vae`` (q(z|x,y), p(x|y,z)).

    Args:
        vae: a ConvVAE with ``condition: class`` (its ``condition_names`` are the K classes).
        classifier: images (B, C, H, W) -> logits (B, K).
    """

    def __init__(self, vae: ConvVAE, classifier: nn.Module) -> None:
        super().__init__()
        if not vae.conditional:
            raise ValueError("M2 needs a class-conditional ConvVAE (condition: class)")
        self.vae, self.classifier = vae, classifier
        self.n_classes = len(vae.config.condition_names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """q(y | x)'s logits (B, K)."""
        return self.classifier(x)

    def elbo(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """ELBO(x, y) of images (B, C, H, W) with classes y (B,): (B,) nats (eq. 6)."""
        return self._elbo(self.vae.features(x), x, y)

    def _elbo(self, h: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The ELBO from the encoder's features h (B, F) (computed once per image, shared by the classes)."""
        with self.vae.conditioned_on(y):
            mu, logvar = self.vae.posterior(h)
            z = reparameterize(mu, logvar) if self.training else mu
            logits = self.vae.decode_logits(z)
        return self.vae.likelihood.log_prob(x, logits=logits) - kl_normal(mu, logvar) - math.log(self.n_classes)

    def labelled_loss(self, x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
        """−ELBO(x, y) − α·log q(y | x) per labelled image: (B,) nats."""
        return -self.elbo(x, y) + alpha * F.cross_entropy(self.classifier(x), y, reduction="none")

    def unlabelled_loss(self, x: torch.Tensor) -> torch.Tensor:
        """U(x) = Σ_y q(y|x)·(−ELBO(x, y)) − H(q(·|x)) per unlabelled image (B,) (eq. 7), all K classes decoded
        as one batch of B·K (image-major: row b·K + k is image b with class k)."""
        b, k = len(x), self.n_classes
        log_q = F.log_softmax(self.classifier(x), 1)
        y = torch.arange(k, device=x.device).repeat(b)
        elbo = self._elbo(self.vae.features(x).repeat_interleave(k, 0), x.repeat_interleave(k, 0), y).view(b, k)
        q = log_q.exp()
        return (q * (log_q - elbo)).sum(1)  # Σ q·(−ELBO) + Σ q·log q, the latter being −H

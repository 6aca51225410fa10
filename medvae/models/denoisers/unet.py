"""The U-Net both denoisers are built on: ``unet-vae`` (a VAE with a spatial latent and optional
U-Net skips, :mod:`medvae.models.denoisers.unet_vae`) and ``dae`` (a deterministic denoising
autoencoder with skips, :mod:`medvae.models.denoisers.dae`).

Both are U-shaped stacks of the ConvVAE's blocks (residual units, strided-conv downsampling,
nearest-neighbour upsampling + conv: no transposed convolutions, so no checkerboard artefacts) and
take any image whose height and width are multiples of ``2 ** (len(channels) - 1)``, so a model
trained on 128² patches denoises whole 512² slices at native resolution (callers pad other sizes, and
mirror a margin around a whole slice: :func:`pad_to_multiple`). The output is a residual on the input in logit space,
``sigmoid(logit(x_in) + f(x_in))``, so an untrained model starts near the identity
(``input_residual``; DivNoising turns it off, and the skips, so that the latent is the only path
from the noisy input to the output).

Options for self-supervised training (DAEConfig / UNetVAEConfig): ``top_skip`` False drops the skip at full
resolution and ``downsample: blurpool`` replaces the strided convs by anti-aliased ones, N2V2's
two architecture fixes (Höck et al. 2022).

The layers are attributes of the model itself (not of a submodule), so the state_dict keys of both
models are the ones their checkpoints have always had.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medvae.config import DAEConfig, UNetVAEConfig
from medvae.errors import ConfigError
from medvae.models.blocks import Downsample, ResUnit, Upsample, group_norm

_IN_CLAMP = 0.005  # logit of the input is taken on [0.005, 0.995]


BORDER_MARGIN = 16  # px of mirrored image around a whole slice: the zero padding of the convs sits outside it


def pad_to_multiple(x: torch.Tensor, multiple: int, margin: int = 0) -> tuple[torch.Tensor, tuple[slice, slice]]:
    """Reflect-pad ``(B, C, H, W)`` by ``margin`` on every side and at the bottom / right to multiples of
    ``multiple``; returns the padded tensor and the ``(rows, cols)`` slices that crop it back to ``x``.

    The margin keeps the image's own borders away from the convolutions' zero padding: without it a
    network trained on patches darkened or brightened the first rows and columns of a whole slice (by up to
    a fifth of a flat image's level after a short n2v training; 16 px bring it within the noise)."""
    h, w = x.shape[-2:]
    ph, pw = (-(h + 2 * margin)) % multiple, (-(w + 2 * margin)) % multiple
    if margin or ph or pw:
        pads = (margin, margin + pw, margin, margin + ph)
        mode = "reflect" if max(pads[2:]) < h and max(pads[:2]) < w else "replicate"
        x = F.pad(x, pads, mode=mode)
    return x, (slice(margin, margin + h), slice(margin, margin + w))


class UNetLayers:
    """The U-Net's layers and passes, mixed into an ``nn.Module`` (the dae, unet-vae).

    :meth:`_build_unet` registers stem, encoder, bottleneck, (unet-vae: latent heads), decoder and
    output conv on the model, in the order that fixes their initial weights.
    """

    config: DAEConfig | UNetVAEConfig

    def _build_unet(self, config: DAEConfig | UNetVAEConfig, variational: bool) -> None:
        """Register the layers. ``variational``: a spatial Gaussian latent at the bottleneck (unet-vae)."""
        chs, g, r = list(config.resolved_channels()), config.norm_groups, config.res_units
        self.skips = config.skip_connections if variational else True  # the dae always has its skips
        self.n_down = len(chs) - 1
        self.multiple = 2 ** self.n_down
        self.stem = nn.Conv2d(config.in_channels, chs[0], 3, padding=1)
        self.enc = nn.ModuleList(nn.Sequential(*[ResUnit(c, c, g) for _ in range(r)]) for c in chs[:-1])
        self.down = nn.ModuleList(Downsample(chs[k], chs[k + 1], config.downsample) for k in range(self.n_down))
        self.mid = nn.Sequential(*[ResUnit(chs[-1], chs[-1], g) for _ in range(max(r, 1))])
        if variational:
            lc = config.latent_channels
            self.to_stats = nn.Sequential(group_norm(chs[-1], g), nn.SiLU(), nn.Conv2d(chs[-1], 2 * lc, 1))
            self.from_latent = nn.Conv2d(lc, chs[-1], 3, padding=1)
        self.up = nn.ModuleList(Upsample(chs[k + 1], chs[k], config.upsample) for k in range(self.n_down))
        # the skip of level k is used unless skips are off, or k is the top level and top_skip is off (N2V2)
        self.skip_at = [self.skips and (k > 0 or config.top_skip) for k in range(self.n_down)]
        self.fuse = nn.ModuleList(ResUnit(2 * chs[k] if self.skip_at[k] else chs[k], chs[k], g)
                                  for k in range(self.n_down))
        self.out_norm = nn.Sequential(group_norm(chs[0], g), nn.SiLU())
        self.out_conv = nn.Conv2d(chs[0], config.in_channels, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)  # start at the identity (the residual is 0)
        nn.init.zeros_(self.out_conv.bias)

    @property
    def last_decoder_weight(self) -> nn.Parameter:
        return self.out_conv.weight

    def _check_input(self, x: torch.Tensor) -> None:
        ch, m = self.config.in_channels, self.multiple
        if x.dim() != 4 or x.shape[1] != ch or x.shape[-2] % m or x.shape[-1] % m:
            raise ConfigError(f"{self.config.name} expects (B, {ch}, H, W) with H and W multiples of {m}, got "
                              f"{tuple(x.shape)}; pad the image (medvae.models.denoisers.pad_to_multiple)")

    def _encode_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x -> (bottleneck features, the skip features of every level)."""
        self._check_input(x)
        h = self.stem(x)
        feats = []
        for block, down in zip(self.enc, self.down):
            h = block(h)
            feats.append(h)
            h = down(h)
        return self.mid(h), feats

    def _decode(self, h: torch.Tensor, feats: list[torch.Tensor] | None, x_in: torch.Tensor | None) -> torch.Tensor:
        """Bottleneck features -> logits; ``feats`` None: no skip features (zeros); ``x_in``: the input the
        output is a residual on (``input_residual``)."""
        for k in reversed(range(self.n_down)):
            h = self.up[k](h)
            if self.skip_at[k]:
                h = torch.cat([h, feats[k] if feats is not None else torch.zeros_like(h)], 1)
            h = self.fuse[k](h)
        out = self.out_conv(self.out_norm(h))
        if x_in is not None and self.config.input_residual:
            out = out + torch.logit(x_in.float().clamp(_IN_CLAMP, 1 - _IN_CLAMP)).to(out.dtype)
        return out

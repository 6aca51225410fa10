"""Blind-spot masks of the self-supervised objectives: a noisy batch becomes a network input in which
the masked pixels' own values appear nowhere, and the mask says which pixels the loss counts.

- ``n2v`` (Krull et al. 2019): one pixel per cell of a grid of side ``round(1 / sqrt(fraction))`` at
  a random place in its cell (N2V's stratified sampling); each takes the value of a random
  neighbour within ``radius`` (N2V) or the median of its neighbours (N2V2, Höck et al. 2022),
  chosen among the pixels that are not hidden themselves. Only unmasked pixels are sources, so a
  masked pixel's value is in no position of the input: the network's output there cannot depend
  on it, whatever its receptive field (checked with autograd in tests/denoising/test_masks.py).
  With ``struct`` (StructN2V, Broaddus et al. 2020) the ``struct_length - 1`` pixels along a row
  (horizontal) or column (vertical) through each masked pixel (or the square of that side around it: box) are
  hidden as well, with values
  uniform in [0, 1] (the store's scale, independent of the data), so noise correlated along
  that line cannot be predicted from the line either; the loss stays on the centres.
- ``n2s`` (Batson & Royer 2019): J-invariant grid masking; of the ``grid²`` phases of a grid one,
  random per image, is masked: ``J = {(y, x): y ≡ py, x ≡ px (mod grid)}``, each of its pixels
  replaced by the weighted mean of its 8 neighbours (kernel ``[[½, 1, ½], [1, 0, 1], [½, 1, ½]] / 6``,
  Noise2Self's interpolation), none of which is in J, so the output on J does not depend on x_J.

Everything is drawn from the caller's ``torch.Generator`` (the trainer's ``(seed, step)``
generator), so a resumed run masks exactly as an uninterrupted one. Inputs are differentiable
functions of the batch (indexing, median, convolution), which is what the tests take gradients of.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_INTERP = torch.tensor([[0.5, 1.0, 0.5], [1.0, 0.0, 1.0], [0.5, 1.0, 0.5]]) / 6.0


def grid_side(fraction: float) -> int:
    """The side of n2v's stratification grid for a masked ``fraction`` of the pixels (at least 2)."""
    return max(2, int(round(1.0 / math.sqrt(fraction))))


def stratified(b: int, h: int, w: int, fraction: float, gen: torch.Generator) -> torch.Tensor:
    """``(B, 1, H, W)`` bool: one pixel per ``s x s`` cell (s = :func:`grid_side`), uniform within
    the cell (cells cut off by the border keep their pixel only when it falls inside)."""
    s = grid_side(fraction)
    ny, nx = -(-h // s), -(-w // s)
    dev = gen.device
    oy = torch.randint(0, s, (b, ny, nx), generator=gen, device=dev)
    ox = torch.randint(0, s, (b, ny, nx), generator=gen, device=dev)
    ys = torch.arange(ny, device=dev).view(1, ny, 1) * s + oy
    xs = torch.arange(nx, device=dev).view(1, 1, nx) * s + ox
    canvas = torch.zeros(b, ny * s * nx * s, dtype=torch.bool, device=dev)
    canvas.scatter_(1, (ys * (nx * s) + xs).flatten(1), True)  # one index per cell: no collisions
    return canvas.view(b, ny * s, nx * s)[:, :h, :w].unsqueeze(1)


def struct_hidden(mask: torch.Tensor, struct: str, length: int) -> torch.Tensor:
    """The pixels StructN2V hides beside each masked pixel: ``length // 2`` either side along a row
    (``horizontal``), a column (``vertical``) or both (``box``), the masked pixels themselves excluded."""
    half = length // 2
    rows, cols = (half if struct != "horizontal" else 0), (half if struct != "vertical" else 0)
    k, pad = (2 * rows + 1, 2 * cols + 1), (cols, cols, rows, rows)
    line = F.max_pool2d(F.pad(mask.float(), pad), kernel_size=k, stride=1) > 0
    return line & ~mask


def hidden_share(fraction: float, struct: str, length: int) -> float:
    """The share of an n2v input's pixels masked or hidden (``struct``): one per grid cell times the masked pixel
    and its line (``length``) or square (``length²``)."""
    per_mask = {"none": 1, "horizontal": length, "vertical": length, "box": length * length}[struct]
    return per_mask / grid_side(fraction) ** 2


def _neighbour_offsets(radius: int, device) -> torch.Tensor:
    r = torch.arange(-radius, radius + 1, device=device)
    dy, dx = torch.meshgrid(r, r, indexing="ij")
    keep = (dy != 0) | (dx != 0)
    return torch.stack([dy[keep], dx[keep]], 1)  # (K, 2), the centre left out


def n2v_input(x: torch.Tensor, mask: torch.Tensor, gen: torch.Generator, replace: str = "median",
              radius: int = 2, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` with each pixel of ``mask`` replaced from its neighbourhood (module docstring).

    Args:
        x: (B, C, H, W) noisy batch.
        mask: (B, 1, H, W) bool, the pixels the loss will count.
        gen: the step's generator.
        replace: ``random`` (a uniformly chosen unmasked neighbour, N2V) or ``median`` (the median
            of the unmasked neighbours per channel, N2V2; torch's lower median, an actual value).
        radius: the neighbourhood is ``(2 radius + 1)²`` without the centre.
        hidden: (B, 1, H, W) bool, more pixels that may not be sources (StructN2V's lines), or None.

    Returns:
        (B, C, H, W): the network's input. A masked pixel with no eligible neighbour (possible
        only with dense struct lines) gets a value uniform in [0, 1].
    """
    b, c, h, w = x.shape
    blocked = mask if hidden is None else mask | hidden
    bi, _, yi, xi = mask.nonzero(as_tuple=True)  # (N,) each
    off = _neighbour_offsets(radius, x.device)
    yn, xn = yi[:, None] + off[:, 0], xi[:, None] + off[:, 1]  # (N, K)
    inside = (yn >= 0) & (yn < h) & (xn >= 0) & (xn < w)
    yc, xc = yn.clamp(0, h - 1), xn.clamp(0, w - 1)
    ok = inside & ~blocked[bi[:, None], 0, yc, xc]
    xt = x.permute(0, 2, 3, 1)  # (B, H, W, C)
    fallback = torch.rand((len(bi), c), generator=gen, device=gen.device).to(x.device, x.dtype)
    if replace == "random":
        score = torch.rand(ok.shape, generator=gen, device=gen.device).to(x.device)
        pick = torch.where(ok, score, torch.full_like(score, -1.0)).argmax(1)  # (N,)
        vals = xt[bi, yc[torch.arange(len(bi)), pick], xc[torch.arange(len(bi)), pick]]  # (N, C)
    elif replace == "median":
        nb = xt[bi[:, None], yc, xc]  # (N, K, C)
        nb = torch.where(ok[..., None], nb, torch.full_like(nb, float("nan")))
        vals = nb.nanmedian(1).values
    else:
        raise ValueError(f"unknown replacement {replace!r}; random or median")
    vals = torch.where(ok.any(1, keepdim=True), vals, fallback)
    return xt.index_put((bi, yi, xi), vals).permute(0, 3, 1, 2)


def n2v(x: torch.Tensor, gen: torch.Generator, fraction: float, replace: str = "median", radius: int = 2,
        struct: str = "none", struct_length: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input, mask)`` of n2v / N2V2 (StructN2V with ``struct``) for the noisy batch ``x``."""
    b, c, h, w = x.shape
    mask = stratified(b, h, w, fraction, gen).to(x.device)
    hidden = struct_hidden(mask, struct, struct_length) if struct != "none" else None
    x_in = n2v_input(x, mask, gen, replace, radius, hidden)
    if hidden is not None:
        noise = torch.rand((b, c, h, w), generator=gen, device=gen.device).to(x.device, x.dtype)
        x_in = torch.where(hidden, noise, x_in)
    return x_in, mask


def n2s(x: torch.Tensor, gen: torch.Generator, grid: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input, mask)`` of Noise2Self's J-invariant grid masking (one random phase per image)."""
    b, c, h, w = x.shape
    phase = torch.randint(0, grid, (2, b, 1, 1, 1), generator=gen, device=gen.device).to(x.device)
    yy = torch.arange(h, device=x.device).view(1, 1, h, 1)
    xx = torch.arange(w, device=x.device).view(1, 1, 1, w)
    mask = (yy % grid == phase[0]) & (xx % grid == phase[1])
    kernel = _INTERP.to(x.device, x.dtype).expand(c, 1, 3, 3)
    interp = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), kernel, groups=c)
    return torch.where(mask, interp, x), mask


def loss_weight(mask: torch.Tensor) -> torch.Tensor:
    """Per-pixel likelihood weights of a blind-spot batch: the masked pixels, scaled so that each
    image's weights sum to its pixel count (the loss keeps the scale of a whole-image loss)."""
    m = mask.float()
    n = m.flatten(1).sum(1).clamp_min(1.0).view(-1, 1, 1, 1)
    return m * (m[0].numel() / n)

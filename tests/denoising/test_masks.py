"""Blind-spot masks: a masked pixel's own value reaches no output at that pixel (autograd through the
masking and a real denoiser), J-invariance of Noise2Self's grid, N2V's stratification."""

import numpy as np
import pytest
import torch

from medvae.config import parse_model_config
from medvae.denoising import masks
from medvae.models import build_model


def _net(name="dae", channels=1, **kw):
    """A small N2V2-style denoiser with a random (not zero) output layer, so every path carries signal."""
    torch.manual_seed(0)
    latent = {"latent_channels": 2} if name == "unet-vae" else {}
    m = build_model(parse_model_config(dict(name=name, channels=(8, 16, 32), norm_groups=4, image_size=32,
                                            top_skip=False,
                                            downsample="blurpool", in_channels=channels, **latent, **kw))).eval()
    torch.nn.init.normal_(m.out_conv.weight, std=0.2)
    return m


def _noisy(b=2, c=1, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (0.5 + 0.2 * torch.randn(b, c, size, size, generator=g)).requires_grad_(True)


def _grad_at(model, x, x_in, b, y, xx):
    """d output[b, :, y, x] (summed over channels) / d x, through the masking."""
    return torch.autograd.grad(model(x_in).x_hat[b, :, y, xx].sum(), x, retain_graph=True)[0]


@pytest.mark.parametrize("replace", ["random", "median"])
@pytest.mark.parametrize("struct", ["none", "horizontal", "vertical", "box"])
@pytest.mark.parametrize("name", ["dae", "unet-vae"])
def test_n2v_output_at_a_masked_pixel_has_zero_gradient_wrt_its_input(replace, struct, name):
    model, x = _net(name, channels=2), _noisy(c=2)
    x_in, mask = masks.n2v(x, torch.Generator().manual_seed(1), 1 / 16, replace, radius=2, struct=struct,
                           struct_length=5)
    assert mask.shape == (2, 1, 32, 32) and 100 <= int(mask.sum()) <= 128
    hidden = masks.struct_hidden(mask, struct, 5) if struct != "none" else torch.zeros_like(mask)
    b, _, ys, xs = mask.nonzero(as_tuple=True)
    for k in range(0, len(b), 23):  # a spread of the masked pixels, border ones included
        g = _grad_at(model, x, x_in, b[k], ys[k], xs[k])
        assert torch.all(g[b[k], :, ys[k], xs[k]] == 0), (replace, struct, k)  # the pixel never sees itself
        line = hidden[b[k], 0] & {"horizontal": torch.zeros_like(hidden[0, 0]).index_fill_(0, ys[k], True),
                                  "vertical": torch.zeros_like(hidden[0, 0]).index_fill_(1, xs[k], True),
                                  "box": torch.ones_like(hidden[0, 0]), "none": hidden[0, 0]}[struct]
        if struct != "none":  # nor the pixels along its correlation line
            assert torch.all(g[b[k]][:, line] == 0)
        assert g[b[k]].abs().sum() > 0  # it does see its unmasked surroundings
    # control: without the mask the same output depends on its own pixel
    g = torch.autograd.grad(model(x).x_hat[b[0], :, ys[0], xs[0]].sum(), x)[0]
    assert torch.all(g[b[0], :, ys[0], xs[0]] != 0)


def test_n2v_masked_value_appears_nowhere_in_the_input():
    x = _noisy().detach()
    x_in, mask = masks.n2v(x, torch.Generator().manual_seed(3), 1 / 16, "random", radius=2)
    jac = torch.autograd.functional.jacobian(lambda t: masks.n2v(t, torch.Generator().manual_seed(3), 1 / 16,
                                                                 "random", radius=2)[0], x)
    jac = jac.reshape(x.numel(), x.numel())  # d input_i / d x_j
    m = mask.expand_as(x).flatten()
    assert torch.all(jac[:, m] == 0)  # no input position holds a masked pixel's value
    assert torch.all(jac[m][:, ~m].sum(1) == 1)  # each masked position holds one unmasked neighbour's value
    assert torch.equal(x_in.flatten()[~m], x.flatten()[~m])


def test_n2s_output_on_j_does_not_depend_on_x_j():
    model, x = _net(), _noisy(size=32)
    for grid in (2, 4):
        x_in, mask = masks.n2s(x, torch.Generator().manual_seed(grid), grid)
        assert int(mask.sum()) == 2 * (32 // grid) ** 2
        out = model(x_in).x_hat
        g = torch.autograd.grad((out * mask).sum(), x)[0]
        assert torch.all(g[mask.expand_as(g)] == 0) and g.abs().sum() > 0
        # the J-invariance itself: other values on J give the same output on J
        other = x.detach().clone()
        other[mask.expand_as(other)] = torch.rand(int(mask.sum()))
        x_other, _ = masks.n2s(other, torch.Generator().manual_seed(grid), grid)
        torch.testing.assert_close(model(x_other).x_hat[mask.expand_as(out)], out[mask.expand_as(out)], rtol=0,
                                   atol=1e-6)


def test_stratified_mask_one_pixel_per_cell_and_loss_weight():
    mask = masks.stratified(3, 64, 48, 1 / 64, torch.Generator().manual_seed(0))
    cells = mask[:, 0].reshape(3, 8, 8, 6, 8).sum((2, 4))  # 8 x 8 cells
    assert torch.all(cells == 1)
    w = masks.loss_weight(mask)
    torch.testing.assert_close(w.flatten(1).sum(1), torch.full((3,), 64.0 * 48))
    assert torch.all(w[~mask] == 0)
    odd = masks.stratified(2, 30, 30, 1 / 16, torch.Generator().manual_seed(1))  # cells cut by the border
    assert 49 <= int(odd.sum()) // 2 <= 64 and masks.grid_side(1 / 16) == 4


@pytest.mark.parametrize("struct,shape", [("horizontal", (1, 5)), ("vertical", (5, 1)), ("box", (5, 5))])
def test_struct_hidden_is_the_masks_dilation_by_the_line_or_square_as_scipy_makes_it(struct, shape):
    from scipy.ndimage import binary_dilation

    mask = masks.stratified(2, 24, 24, 1 / 16, torch.Generator().manual_seed(5))
    hidden = masks.struct_hidden(mask, struct, 5)
    for b in range(2):
        m = mask[b, 0].numpy()
        assert np.array_equal(hidden[b, 0].numpy(), binary_dilation(m, np.ones(shape, bool)) & ~m)
    # hidden_share is what they would cover without overlaps: an upper bound, near the share at length 3
    share = float((masks.struct_hidden(mask, struct, 3) | mask).float().mean())
    assert 0.6 * masks.hidden_share(1 / 16, struct, 3) <= share <= masks.hidden_share(1 / 16, struct, 3)

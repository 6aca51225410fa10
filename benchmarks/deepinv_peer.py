"""deepinv's self-supervised losses on medvae's own n2v network, as peers of bench_selfsupervised.py; run with
the peer venv's python.

deepinv 0.5.0 (``pip install torch==2.13.0 deepinv==0.5.0 pydantic pyyaml`` in a venv of its own, as
bench_selfsupervised.py's docstring says) trains **the same U-Net** the bench's n2v trains — medvae's ``dae``
with the self-supervised defaults (``config.OBJECTIVE_MODEL_DEFAULTS["n2v"]``: 16/32/64, no GroupNorm, N2V2's
blur-pool, no top skip), imported from this checkout (it needs torch and pydantic only) — with the same budget:
``--steps`` Adam steps of ``--batch-size`` 64² patches, lr 1e-3 with 20 warm-up steps and a cosine decay,
betas (0.9, 0.99). Patches are random crops of the noisy image (the bench's n2v takes tiles at stride 32).
Only the loss differs:

- ``sure-pg``: ``deepinv.loss.SurePGLoss`` (Le Montagner et al. 2014) with the second-order term, at the
  Poisson–Gaussian (a, b) given (the simulation's own: deepinv has no calibration);
- ``n2n``: ``deepinv.loss.Neighbor2Neighbor`` (Huang et al. 2021), no noise model;
- ``r2r``: ``deepinv.loss.R2RLoss`` (Pang et al. 2021, generalized), alpha 0.15, 5 samples at inference.
  deepinv re-corrupts Gaussian, Poisson or Gamma noise only: a Gaussian of the image's mean variance
  a·mean(y) + b stands in for the Poisson–Gaussian noise.

The bench writes the noisy image and the region to denoise as ``.npy`` and runs::

    venv-deepinv/bin/python benchmarks/deepinv_peer.py --loss sure-pg --train noisy.npy --predict test.npy \
        --out denoised.npy --steps 150 --gain 0.05 --sigma 0.1

The region is denoised whole (medvae's ``denoise``: mirrored margin, padded to the network's multiple).
Prints one JSON line: seconds of training and prediction, the deepinv / torch versions.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's medvae (the network only)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--loss", choices=["sure-pg", "n2n", "r2r"], required=True)
    ap.add_argument("--train", type=Path, required=True, help="the noisy image (.npy, 2D)")
    ap.add_argument("--predict", type=Path, required=True, help="the region to denoise (.npy, 2D)")
    ap.add_argument("--out", type=Path, required=True, help="the denoised region (.npy)")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--gain", type=float, required=True, help="Poisson gain a (variance a·s + b)")
    ap.add_argument("--sigma", type=float, required=True, help="read-noise sd, sqrt(b)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from careamics_peer import torchvision_stub  # the index's torchvision 0.28 is not built for the CPU torch

    torchvision_stub()
    import deepinv as dinv
    import torch

    from medvae.config import OBJECTIVE_MODEL_DEFAULTS, DAEConfig
    from medvae.models.denoisers.dae import DAE

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    noisy = torch.from_numpy(np.load(args.train).astype(np.float32))
    region = torch.from_numpy(np.load(args.predict).astype(np.float32))
    net = DAE(DAEConfig(**OBJECTIVE_MODEL_DEFAULTS["n2v"], image_size=args.patch))
    physics = dinv.physics.Denoising(noise_model=dinv.physics.PoissonGaussianNoise(gain=args.gain, sigma=args.sigma))

    model = _Net(net)
    if args.loss == "sure-pg":
        loss = dinv.loss.SurePGLoss(sigma=args.sigma, gain=args.gain, second_derivative=True)
    elif args.loss == "n2n":
        loss = dinv.loss.Neighbor2Neighbor()
    else:
        sigma = math.sqrt(args.gain * float(noisy.clamp(min=0).mean()) + args.sigma**2)
        loss = dinv.loss.R2RLoss(noise_model=dinv.physics.GaussianNoise(sigma=sigma), alpha=0.15, eval_n_samples=5)
        model = loss.adapt_model(model)

    opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.9, 0.99))
    warmup = 20
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    gen = torch.Generator().manual_seed(args.seed)
    h, w = noisy.shape
    p = args.patch
    t0 = time.perf_counter()
    net.train()
    if args.loss == "r2r":
        model.train()  # one re-corrupted sample per step (eval: the mean of 5)
    for _ in range(args.steps):
        ys = torch.randint(0, h - p + 1, (args.batch_size,), generator=gen)
        xs = torch.randint(0, w - p + 1, (args.batch_size,), generator=gen)
        y = torch.stack([noisy[a:a + p, b:b + p] for a, b in zip(ys.tolist(), xs.tolist())])[:, None]
        if args.loss == "sure-pg":
            value = loss(y=y, x_net=model(y, physics), physics=physics, model=model)
        elif args.loss == "n2n":
            value = loss(y=y, physics=physics, model=model)
        else:
            value = loss(x_net=model(y, physics, update_parameters=True), y=y, physics=physics, model=model)
        opt.zero_grad(set_to_none=True)
        value.mean().backward()
        opt.step()
        sched.step()
    train_s = time.perf_counter() - t0
    net.eval()
    if args.loss == "r2r":
        model.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        x = region[None, None]
        if args.loss == "r2r":  # the R2R model averages its re-corrupted samples; pad as denoise does
            from medvae.models.denoisers.unet import BORDER_MARGIN, pad_to_multiple

            xp, (rows, cols) = pad_to_multiple(x, net.multiple, BORDER_MARGIN)
            out = model(xp, physics)[..., rows, cols]
        else:
            out = net.denoise(x)
    np.save(args.out, out[0, 0].float().numpy())
    print(json.dumps({"train_s": train_s, "denoise_s": time.perf_counter() - t0, "steps": args.steps,
                      "loss": args.loss, "deepinv": dinv.__version__, "torch": torch.__version__}))


class _Net:
    """medvae's dae as the ``model(y, physics)`` deepinv's losses call (and R2R's model wraps)."""

    def __init__(self, net) -> None:
        self.net = net

    def __call__(self, y, physics=None):
        return self.net(y).x_hat


if __name__ == "__main__":
    main()

"""CAREamics Noise2Void as the peer of bench_selfsupervised.py's n2v; run with the peer venv's python.

CAREamics pins its own torchvision and lightning, so it lives in its own venv and never in the project's
(``bench_selfsupervised.py``'s docstring has the install). The bench writes the noisy image and the region
to denoise as ``.npy`` files and runs::

    .venv-careamics/bin/python benchmarks/careamics_peer.py --train noisy.npy --predict test.npy \
        --out denoised.npy --steps 150 --batch-size 16

Training: CAREamics' own N2V2 configuration (``create_advanced_n2v_config(use_n2v2=True)``: median
replacement, blur-pool U-Net without the top skip; its default U-Net, masking percentage, mean/std
normalization, flips and 90° rotations, Adam and ReduceLROnPlateau), 2D ``YX`` data, 64² patches, exactly
``--steps`` optimizer steps of ``--batch-size`` patches (Lightning ``max_steps``), on the noisy image and
nothing else; ``n_val_patches`` of it are held out for CAREamics' validation loss, as its users do.
Prediction: the whole ``--predict`` array in one pass (no tiling). Prints one JSON line: seconds of
training and prediction, the CAREamics / torch versions and the configuration's key values.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


class _Stub:
    """Stands for any torchvision attribute; fails only when called."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *a, **k):
        raise RuntimeError(f"{self.name}: torchvision is stubbed in the CAREamics peer (N2V never calls it)")

    def __getattr__(self, attr: str):
        return _Stub(f"{self.name}.{attr}")


def torchvision_stub() -> None:
    """CAREamics 0.3.5 pins torchvision<=0.26 (torch 2.11) and imports it at module level for its LVAE code,
    as torchmetrics and lightning do for features N2V never uses; the index has no CPU torchvision for torch
    2.13, so an empty stand-in package (every ``torchvision.*`` module, every attribute a :class:`_Stub`) is
    installed. A real torchvision is used when one imports."""
    import importlib.abc
    import importlib.machinery
    import sys
    import types

    try:
        import torchvision  # noqa: F401

        return
    except Exception:  # noqa: BLE001 - absent, or built for another torch
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]

    class StubModule(types.ModuleType):
        def __getattr__(self, attr: str):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return _Stub(f"{self.__name__}.{attr}")

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, fullname, path=None, target=None):
            if fullname == "torchvision" or fullname.startswith("torchvision."):
                return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
            return None

        def create_module(self, spec):
            mod = StubModule(spec.name)
            mod.__path__ = []
            mod.__version__ = "0.0+stub"
            return mod

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, Finder())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=Path, required=True, help="the noisy image (.npy, 2D)")
    ap.add_argument("--predict", type=Path, required=True, help="the region to denoise (.npy, 2D)")
    ap.add_argument("--out", type=Path, required=True, help="the denoised region (.npy)")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--masked-percentage", type=float, default=None,
                    help="CAREamics' masked_pixel_percentage (default: its own, 0.2 %%)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    torchvision_stub()
    import careamics
    import torch
    from careamics import CAREamist
    from careamics.config.factories.n2v_factory import create_advanced_n2v_config

    torch.set_num_threads(args.threads)
    train = np.load(args.train).astype(np.float32)
    pred = np.load(args.predict).astype(np.float32)
    extra = {} if args.masked_percentage is None else {"masked_pixel_percentage": args.masked_percentage}
    cfg = create_advanced_n2v_config(
        experiment_name="medvae_peer", data_type="array", axes="YX", patch_size=[args.patch, args.patch],
        batch_size=args.batch_size, num_epochs=10**6, use_n2v2=True, num_workers=0, seed=args.seed,
        trainer_params={"max_steps": args.steps, "enable_progress_bar": False,
                        "accelerator": "cpu", "enable_model_summary": False}, **extra)
    with tempfile.TemporaryDirectory() as work:
        model = CAREamist(cfg, work_dir=work)
        t0 = time.perf_counter()
        model.train(train_data=train)
        train_s = time.perf_counter() - t0
        steps_done = int(model.trainer.global_step)
        t0 = time.perf_counter()
        out, _ = model.predict(pred, data_type="array", axes="YX", batch_size=1)
        denoise_s = time.perf_counter() - t0
    den = np.asarray(out[0] if isinstance(out, list) else out, np.float32).reshape(pred.shape)
    np.save(args.out, den)
    alg = cfg.algorithm_config
    print(json.dumps({
        "train_s": train_s, "denoise_s": denoise_s, "steps": steps_done, "batch_size": args.batch_size,
        "careamics": careamics.__version__, "torch": torch.__version__,
        "model": {k: getattr(alg.model, k, None) for k in ("architecture", "depth", "num_channels_init", "n2v2")},
        "n2v": {k: getattr(alg.n2v_config, k, None) for k in ("strategy", "roi_size", "masked_pixel_percentage")}},
        default=str))


if __name__ == "__main__":
    main()

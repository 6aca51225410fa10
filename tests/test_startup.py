"""Start-up of the commands that neither draw nor train: which modules their processes import.

`medvae prepare` is run on a small series far more often than it runs for minutes, so its start-up
is most of its time. Importing MONAI loads all of its submodules (networks, losses, pyplot,
scipy.stats: about 1.6 s on the 2-core machine), so the prepare path never imports it; `--help`
does not even import torch, and neither does the prepare of a CT DICOM series (numpy and Pillow
cut its patches; torch's import is about a second). The guard is on the modules a fresh process
has imported (a wall-clock bound would be a timed test); `benchmarks/bench_prepare.py --startup` measures the seconds.
"""

import json
import subprocess
import sys

import pytest

from medvae.data.manifest import ManifestRow, write_manifest
from medvae.io.phantoms import write_phantom_cohort

HEAVY = ("monai", "matplotlib", "scipy.stats", "sklearn", "skimage")  # skimage: CT never needs it


def _imported_by(argv: list[str]) -> set[str]:
    """The top-level names plus the HEAVY entries imported by a fresh `medvae ...` process."""
    code = ("import json, sys\nfrom medvae.cli import app\nsys.argv = ['medvae', *json.loads(sys.argv[1])]\n"
            "try:\n    app()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(argv)], capture_output=True, text=True,
                         check=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                          "PYTHONPATH": ":".join(p for p in sys.path if p)})
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_prepare_help_imports_neither_torch_nor_the_stages():
    mods = _imported_by(["prepare", "--help"])
    assert not {"torch", "numpy", *HEAVY} & mods


@pytest.mark.parametrize("mode", ["resize", "tile"])
def test_prepare_of_a_ct_series_imports_no_torch_monai_pyplot_or_scipy_stats(tmp_path, mode):
    s = write_phantom_cohort(tmp_path / "scans", ct_patients=1, microscopy_stacks=0, seed=0, ct_size=64,
                             ct_slices=4)
    manifest = write_manifest([ManifestRow(c["patient_id"], "ct", "dicom", c["series"], c["label"], split="train")
                               for c in s["ct"]], tmp_path / "manifest.csv")
    mods = _imported_by(["prepare", str(manifest), "--out", str(tmp_path / "store"), "--patch-size", "32",
                         "--mode", mode])
    assert (tmp_path / "store" / "store.json").is_file()
    assert "pydicom" in mods and "nibabel" in mods  # it did the work
    assert not {"torch", *HEAVY} & mods, {"torch", *HEAVY} & mods

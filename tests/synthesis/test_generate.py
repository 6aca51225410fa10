"""Synthetic dataset generation: determinism, physical units and headers, resume, mixing.

A stub model (the model interface, decode only) stands in for a trained run: a fixed random
projection of the latent (or a constant image) lets every expected value be computed by hand.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch

import medvae.training.runtime as runtime
from medvae.config import GenerateConfig
from medvae.data.store import open_store, write_store
from medvae.errors import InputError
from medvae.files import sha256_file
from medvae.synthesis import generate as gen
from medvae.synthesis.sampling import decode_latents, latents
from tests.factories import store_index

SIZE = 32
CT_NORM = {"low": -160.0, "high": 240.0, "unit": "HU"}
MIC_NORM = {"low": 100.0, "high": 4000.0, "unit": "counts"}
CT_SPACING, MIC_SPACING = [0.8, 0.7], [0.3, 0.25]  # (sy, sx)
# (patient, modality, split, level): patients are flat images at distinct levels (+ 2% noise)
PATIENTS = [("P1", "ct", "train", 0.1), ("P2", "ct", "train", 0.3), ("P3", "ct", "train", 0.5),
            ("P4", "ct", "test", 0.45), ("S1", "microscopy", "train", 0.75),
            ("S2", "microscopy", "train", 0.95)]
PER_PATIENT = 6


def _store_arrays(labels: bool = False, classes: str = ""):
    rng = np.random.default_rng(0)
    patches, columns, masks = [], {k: [] for k in ("patient_id", "modality", "split", "slice_index", "source")}, []
    for pid, mod, split, level in PATIENTS:
        for s in range(PER_PATIENT):
            patches.append(np.clip(level + 0.02 * rng.standard_normal((1, SIZE, SIZE)), 0, 1))
            masks.append((rng.random((1, SIZE, SIZE)) > 0.5).astype(np.uint8))
            for k, v in zip(columns, (pid, mod, split, s, f"{pid}.nii.gz")):
                columns[k].append(v)
    index = store_index(len(patches), **columns)
    meta = {"normalization": {"ct": CT_NORM, "microscopy": MIC_NORM},
            "spacing": {"ct": CT_SPACING, "microscopy": MIC_SPACING}, "content_hash": "teststore"}
    n = len(patches)
    index["has_label"] = [int(labels)] * n
    if classes:  # as an image set's store: a class per patch ("some": one patch has none), names in label order
        index["class"] = [["shirt", "shoe", "bag"][i % 3] if i != 7 or classes == "all" else "" for i in range(n)]
        meta["classes"] = ["shirt", "shoe", "bag"]
    return np.stack(patches).astype(np.float32), index, meta, (np.stack(masks) if labels else None)


class StubModel(torch.nn.Module):
    """decode(z) = sigmoid(z @ W) (a fixed random projection), or a constant image, or planted copies."""

    def __init__(self, latent_dim=8, channels=1, constant=None, planted=None):
        super().__init__()
        self.latent_dim = latent_dim
        self.config = SimpleNamespace(in_channels=channels, image_size=SIZE, condition="none", condition_names=())
        g = torch.Generator().manual_seed(1)
        self.w = torch.randn(latent_dim, channels * SIZE * SIZE, generator=g) * 3.0
        self.constant = constant
        self.planted = planted or {}  # sample index -> (seed, image (C, H, W)) decoded for that sample's z

    def conditioned_on(self, ids):
        return contextlib.nullcontext()

    def parameters(self):  # the device the generation runs on
        return iter([self.w])

    def eval(self):
        return self

    def encode(self, x):
        """A fixed random projection of the pixels: (mu, logvar = 0)."""
        e = torch.randn(x[0].numel(), self.latent_dim, generator=torch.Generator().manual_seed(2)) / 32.0
        mu = x.flatten(1).float() @ e
        return mu, torch.zeros_like(mu)

    def decode(self, z):
        x = torch.sigmoid(z @ self.w.to(z.device)).view(-1, self.config.in_channels, SIZE, SIZE)
        if self.constant is not None:
            x = torch.full_like(x, self.constant)
        for i, (seed, img) in self.planted.items():
            hit = (z == latents(seed, i, i + 1, self.latent_dim).to(z.device)).all(dim=1)
            x[hit] = torch.as_tensor(img, dtype=x.dtype, device=x.device)
        return x


@pytest.fixture
def make_run(tmp_path, monkeypatch):
    """Build a run dir (dummy checkpoint + run.json) over a tiny two-modality store; returns RUN."""

    def make(model, labels=False, name="run", classes=""):
        patches, index, meta, masks = _store_arrays(labels, classes)
        store = write_store(tmp_path / f"{name}_store", patches, index, meta, labels=masks)
        run = tmp_path / name
        (run / "checkpoints").mkdir(parents=True)
        (run / "checkpoints" / "best.pt").write_bytes(b"stub checkpoint " + name.encode())
        info = {"store": str(store.path), "store_hash": store.content_hash}
        (run / "run.json").write_text(json.dumps(info))
        monkeypatch.setattr(gen, "_load_model", lambda path, device: (model, dict(info)))
        # the expected values are the stub's float32 arithmetic: amp auto must not pick bf16 on a CPU with AMX
        monkeypatch.setattr(runtime, "bf16_supported", lambda device: False)
        return run

    return make


def _manifest(out):
    with open(out / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def _hashes(out):
    return {p.relative_to(out): sha256_file(p) for p in sorted((out / "synthetic").rglob("*")) if p.is_file()}


def test_latents_do_not_depend_on_batching():
    whole = latents(3, 0, 600, 16)
    parts = torch.cat([latents(3, a, min(a + 77, 600), 16) for a in range(0, 600, 77)])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, latents(4, 0, 600, 16))
    assert torch.allclose(latents(3, 0, 10, 16, temperature=0.5), whole[:10] * 0.5)


def test_same_seed_same_bytes_different_seed_differs(make_run, tmp_path):
    run = make_run(StubModel())
    cfg = GenerateConfig(prior="standard", n=12, seed=5, batch_size=5)
    gen.generate(run, tmp_path / "a", cfg, device="cpu")
    gen.generate(run, tmp_path / "b", cfg.model_copy(update={"batch_size": 4}), device="cpu")
    gen.generate(run, tmp_path / "c", cfg.model_copy(update={"seed": 6}), device="cpu")
    a, b, c = (_hashes(tmp_path / d) for d in "abc")
    assert len(a) == 24 and a == b  # 12 samples x (physical file + PNG preview); batch size irrelevant
    assert set(a) & set(c) and all(a[k] != c[k] for k in set(a) & set(c))
    assert (tmp_path / "a" / "manifest.csv").read_bytes() == (tmp_path / "b" / "manifest.csv").read_bytes()


def test_ct_sample_in_hu_with_store_spacing(make_run, tmp_path):
    run = make_run(StubModel(constant=0.25))  # nearest training patches: CT patient at level 0.3
    gen.generate(run, tmp_path / "out", GenerateConfig(prior="standard", n=3), device="cpu")
    rows = _manifest(tmp_path / "out")
    assert [r["modality"] for r in rows] == ["ct"] * 3
    img = nib.load(tmp_path / "out" / rows[0]["path"])
    data = np.asanyarray(img.dataobj)
    assert data.dtype == np.int16 and data.shape == (SIZE, SIZE, 1)
    assert np.all(data == round(-160 + 0.25 * 400))  # HU = low + x (high - low) = -60
    assert img.header.get_zooms() == pytest.approx((CT_SPACING[1], CT_SPACING[0], 1.0))
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    assert img.header.get_xyzt_units()[0] == "mm"


def test_microscopy_sample_uint16_tiff_with_um_spacing(make_run, tmp_path):
    run = make_run(StubModel(constant=0.8))  # nearest: microscopy stack at level 0.75
    gen.generate(run, tmp_path / "out", GenerateConfig(prior="standard", n=2), device="cpu")
    row = _manifest(tmp_path / "out")[0]
    assert row["modality"] == "microscopy" and row["path"].endswith(".tif")
    with tifffile.TiffFile(tmp_path / "out" / row["path"]) as tif:
        page = tif.pages[0]
        data = page.asarray()
        assert tif.is_imagej and tif.imagej_metadata["unit"] == "um"
        xres, yres = page.tags["XResolution"].value, page.tags["YResolution"].value
    assert data.dtype == np.uint16 and np.all(data == round(100 + 0.8 * 3900))
    assert xres[1] / xres[0] == pytest.approx(MIC_SPACING[1], rel=1e-6)
    assert yres[1] / yres[0] == pytest.approx(MIC_SPACING[0], rel=1e-6)


def test_resume_rewrites_only_missing_files(make_run, tmp_path):
    run = make_run(StubModel())
    out = tmp_path / "out"
    cfg = GenerateConfig(prior="standard", n=10, seed=2, batch_size=4)
    gen.generate(run, out, cfg, device="cpu")
    before = _hashes(out)
    files = sorted(before)
    deleted = files[::4]
    for rel in deleted:
        (out / rel).unlink()
    for rel in set(files) - set(deleted):
        os.utime(out / rel, ns=(1_000_000_000, 1_000_000_000))  # an mtime no rewrite could keep
    summary = gen.generate(run, out, cfg, device="cpu")
    assert _hashes(out) == before
    assert summary["counts"]["written_files"] == len(deleted)
    for rel in set(files) - set(deleted):
        assert (out / rel).stat().st_mtime_ns == 1_000_000_000
    with pytest.raises(InputError, match="other settings"):
        gen.generate(run, out, cfg.model_copy(update={"seed": 3}), device="cpu")


def test_audit_flags_planted_training_copy_only(make_run, tmp_path):
    model = StubModel()
    run = make_run(model)
    store = open_store(json.loads((run / "run.json").read_text())["store"])
    model.planted = {3: (0, store.get(7))}  # sample 3 decodes to a patch of training patient P2, exactly
    out = tmp_path / "out"
    summary = gen.generate(run, out, GenerateConfig(prior="standard", n=16, seed=0, batch_size=6), device="cpu")
    rows = _manifest(out)
    flagged = [r["id"] for r in rows if r["flagged"] == "1"]
    assert flagged == ["000003"]
    assert float(rows[3]["nearest_train_distance"]) < 1e-3 and rows[3]["nearest_train_patient"] == "P2"
    assert summary["audit"]["flagged"] == 1 and "1/16" in summary["audit"]["summary"]
    assert (out / "audit.png").stat().st_size > 1000
    # --drop-flagged: the copy is not written, its manifest row stays with an empty path
    summary = gen.generate(run, tmp_path / "dropped",
                           GenerateConfig(prior="standard", n=16, drop_flagged=True, batch_size=6), device="cpu")
    rows = _manifest(tmp_path / "dropped")
    assert rows[3]["path"] == "" and summary["counts"]["dropped"] == 1
    assert not list((tmp_path / "dropped" / "synthetic").rglob("000003*"))


def test_mixed_store_loads_with_the_regular_loader(make_run, tmp_path):
    from medvae.data.loader import PatchBatches

    run = make_run(StubModel())
    real = open_store(json.loads((run / "run.json").read_text())["store"])
    n_train = real.select(split="train").size
    summary = gen.generate(run, tmp_path / "out", GenerateConfig(prior="standard", n=5, batch_size=8), device="cpu",
                           mix_with=real.path, ratio=1.5)
    mixed = open_store(tmp_path / "out" / "augmented_store")
    n_syn = round(1.5 * n_train)  # more than the 5 generated: the rest are decoded for the store only
    assert len(mixed) == len(real) + n_syn
    assert (mixed.index["source"] == "synthetic").sum() == n_syn
    assert (mixed.index["source"] == "real").sum() == len(real)
    assert summary["augmented_store"]["n_synthetic"] == n_syn
    batches = PatchBatches(mixed, split="train", batch_size=n_train + n_syn, shuffle=False)
    assert len(batches) == 1
    x = next(iter(batches)).x[-1]
    assert x.shape == (1, SIZE, SIZE) and x.dtype == torch.float32
    assert 0 <= float(x.min()) <= float(x.max()) <= 1
    # the synthetic rows hold the decoded samples (float16 store)
    z = latents(0, 0, 1, 8)
    first = np.flatnonzero(mixed.index["source"] == "synthetic")[0]
    np.testing.assert_allclose(mixed.get(first), StubModel().decode(z)[0].numpy(), atol=1e-3)


def test_manifest_columns(make_run, tmp_path):
    run = make_run(StubModel())
    gen.generate(run, tmp_path / "out", GenerateConfig(prior="standard", n=2), device="cpu")
    with open(tmp_path / "out" / "manifest.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header == ["id", "modality", "class", "path", "mask", "preview", "seed", "checkpoint_sha256", "latent_norm",
                      "nearest_train_distance", "nearest_train_distance_features", "nearest_train_patient",
                      "flagged", "source_row"]


def test_mixing_with_a_labelled_store_drops_its_labels(make_run, tmp_path, caplog):
    run = make_run(StubModel(), labels=True)  # synthetic patches have no masks
    gen.generate(run, tmp_path / "out", GenerateConfig(prior="standard", n=4), device="cpu",
                 mix_with=tmp_path / "run_store", ratio=0.1)
    mixed = open_store(tmp_path / "out" / "augmented_store")
    assert mixed.labels is None and (mixed.index["source"] == "synthetic").sum() == 3  # 0.1 x 30 train
    assert (mixed.index["has_label"] == 0).all()  # no row has a label map in the store
    assert "without labels" in caplog.text


def _real_rows_kept(mixed, real):
    """The augmented store's first rows are the real store's, unchanged: patches as stored, label maps, every
    index column (``source`` moved to ``origin``) and the class ids."""
    n = len(real)
    np.testing.assert_array_equal(np.asarray(mixed.patches[:n]), np.asarray(real.patches))
    for col, values in real.index.items():
        got = mixed.index["origin" if col == "source" else col][:n]
        assert got.tolist() == values.tolist(), col
    assert set(mixed.index["source"][:n]) == {"real"} and mixed.classes[:len(real.classes)] == real.classes
    np.testing.assert_array_equal(mixed.class_ids(np.arange(n)), real.class_ids())
    if real.labels is not None:
        np.testing.assert_array_equal(np.asarray(mixed.labels[:n]), np.asarray(real.labels))


def test_mixing_keeps_the_classes_of_a_labelled_image_store(make_run, tmp_path):
    run = make_run(StubModel(), classes="some")  # an unconditional model: its samples have no class
    real = open_store(tmp_path / "run_store")
    gen.generate(run, tmp_path / "out", GenerateConfig(prior="standard", n=4, format="png"), device="cpu",
                 mix_with=real.path, ratio=0.2)
    mixed = open_store(tmp_path / "out" / "augmented_store")
    _real_rows_kept(mixed, real)
    assert mixed.classes == real.classes and (real.class_ids() >= 0).sum() == len(real) - 1
    syn = np.flatnonzero(mixed.index["source"] == "synthetic")
    assert len(syn) == 6 and (mixed.class_ids(syn) == -1).all()  # 0.2 x 30 train rows, no class
    # a class-conditioned model's samples keep the class they were generated for
    model = StubModel()
    model.config.condition, model.config.condition_names = "class", ("shirt", "shoe", "bag")
    run = make_run(model, classes="all", name="classes")
    gen.generate(run, tmp_path / "out2", GenerateConfig(prior="standard", n=12, format="png"), device="cpu",
                 mix_with=real.path, ratio=0.2)
    mixed = open_store(tmp_path / "out2" / "augmented_store")
    _real_rows_kept(mixed, real)
    made = {r["id"]: r["class"] for r in _manifest(tmp_path / "out2")}
    syn = np.flatnonzero(mixed.index["source"] == "synthetic")
    want = [made[o.split("/")[1]] for o in mixed.index["origin"][syn]]
    assert mixed.index["class"][syn].tolist() == want and set(want) <= set(real.classes)


def test_mixing_keeps_the_masks_of_a_masked_store(make_run, tmp_path):
    from medvae.data.conditions import split_joint

    model = StubModel(channels=2)  # a joint image + mask model: each sample comes with its label map
    model.config.condition, model.config.condition_names = "mask", ("0", "1")
    run = make_run(model, labels=True)
    real = open_store(tmp_path / "run_store")
    gen.generate(run, tmp_path / "out", GenerateConfig(prior="standard", n=4, format="png"), device="cpu",
                 mix_with=real.path, ratio=0.2)
    mixed = open_store(tmp_path / "out" / "augmented_store")
    _real_rows_kept(mixed, real)
    assert (mixed.index["has_label"] == 1).all()
    for row in np.flatnonzero(mixed.index["source"] == "synthetic"):  # the mask decoded from that sample's latent
        i = int(mixed.index["origin"][row].split("/")[1])
        _, mask = split_joint(model.decode(latents(0, i, i + 1, 8)).numpy(), ("0", "1"))
        np.testing.assert_array_equal(mixed.labels[row], mask[0])


def test_model_channels_must_match_the_store(make_run, tmp_path):
    run = make_run(StubModel(channels=2))  # e.g. an image + mask model over a one-channel store
    with pytest.raises(InputError, match="2-channel"):
        gen.generate(run, tmp_path / "out", GenerateConfig(prior="standard", n=2), device="cpu")


def test_png_only_and_npy_formats(make_run, tmp_path):
    run = make_run(StubModel())
    gen.generate(run, tmp_path / "png", GenerateConfig(prior="standard", n=3, format="png"), device="cpu")
    assert {p.suffix for p in (tmp_path / "png" / "synthetic").rglob("*.*")} == {".png"}
    gen.generate(run, tmp_path / "npy", GenerateConfig(prior="standard", n=3, format="npy"), device="cpu")
    row = _manifest(tmp_path / "npy")[0]
    x = np.load(tmp_path / "npy" / row["path"])
    np.testing.assert_allclose(x, StubModel().decode(latents(0, 0, 1, 8))[0].numpy(), atol=1e-6)


def test_cli_writes_dataset_and_rejects_bad_format(make_run, tmp_path):
    from typer.testing import CliRunner

    from medvae.cli import app

    run = make_run(StubModel())
    base = ["generate", str(run), "--n", "3", "--prior", "standard", "--out"]
    res = CliRunner().invoke(app, [*base, str(tmp_path / "out"), "--seed", "1"])
    assert res.exit_code == 0, res.output
    assert "0/3 samples" in res.output and len(_manifest(tmp_path / "out")) == 3
    res = CliRunner().invoke(app, [*base, str(tmp_path / "x"), "--format", "jpg"])
    assert res.exit_code == 2 and "format" in res.output


def test_anchored_variants_of_a_store(make_run, tmp_path):
    """--from STORE --synthesis neighbours: per_image variants of every train image, each decoded from
    mu_i + lam (mu_j - mu_i) toward one of its nearest codes (closed form), with its row as provenance."""
    from medvae.synthesis import anchored

    model = StubModel()
    run = make_run(model)
    store = open_store(tmp_path / "run_store")
    cfg = GenerateConfig(synthesis="neighbours", per_image=2, neighbour_range=(0.3, 0.3), format="npy")
    summary = gen.generate(run, tmp_path / "out", cfg, device="cpu", anchors=store.path)
    train = store.select("train")
    rows = _manifest(tmp_path / "out")
    assert summary["counts"]["samples"] == len(rows) == 2 * len(train)
    assert [int(r["source_row"]) for r in rows] == np.repeat(train, 2).tolist()
    assert [r["modality"] for r in rows] == np.repeat(store.index["modality"][train], 2).tolist()
    mu, _ = model.encode(torch.from_numpy(store.get(train)))
    mu = mu.numpy()
    near = anchored.nearest(mu, mu, 2, exclude=np.arange(len(train)))
    for i in (0, 5, len(rows) - 1):
        a, v = divmod(i, 2)
        z = mu[a] + 0.3 * (mu[near[a, v]] - mu[a])
        want = model.decode(torch.from_numpy(z[None]).float())[0].numpy()
        np.testing.assert_allclose(np.load(tmp_path / "out" / rows[i]["path"]), want, atol=1e-5)
    with pytest.raises(InputError, match="needs --from"):
        gen.generate(run, tmp_path / "x", GenerateConfig(synthesis="neighbours"), device="cpu")


def test_decoder_runs_under_auto_autocast_and_images_come_back_float32(make_run, tmp_path, monkeypatch):
    run = make_run(StubModel())
    cfg = GenerateConfig(prior="standard", n=4, format="npy")
    assert gen.generate(run, tmp_path / "fp32", cfg, device="cpu")["precision"] == "fp32"
    monkeypatch.setattr(runtime, "bf16_supported", lambda device: True)
    assert gen.generate(run, tmp_path / "bf16", cfg, device="cpu")["precision"] == "bf16"
    z = latents(0, 0, 4, 8)
    ref, low = decode_latents(StubModel(), z), decode_latents(StubModel(), z, amp_dtype=torch.bfloat16)
    assert low.dtype == torch.float32 and not torch.equal(low, ref)
    torch.testing.assert_close(low, ref, rtol=0, atol=5e-2)

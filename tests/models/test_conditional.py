"""Conditional models end to end: modality / class ids and joint image + mask, trained, sampled and written."""

import csv

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch

from medvae.config import GenerateConfig, TrainStageConfig, parse_model_config
from medvae.data.conditions import condition_ids, model_inputs, resolve_condition, split_joint
from medvae.data.store import open_store
from medvae.errors import ConfigError
from medvae.models import build_model
from medvae.synthesis.generate import generate
from medvae.synthesis.sampling import sample_images
from medvae.training.checkpoint import load_model
from medvae.training.rundir import RunDir
from medvae.training.trainer import train
from tests.factories import patch_store

SIZE, PER_GROUP = 32, 24



def _store(path, labels=False):
    """Bright CT discs (class 'disc') and dark microscopy squares (class 'square'), each with its mask."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    x, masks, index = [], [], {k: [] for k in ("patient_id", "modality", "split", "slice_index", "classes")}
    for g, (mod, cls, level) in enumerate((("ct", "disc", 0.85), ("microscopy", "square", 0.15))):
        for i in range(PER_GROUP):
            c, r = rng.uniform(10, 22, 2), rng.uniform(4, 8)
            inside = ((yy - c[0]) ** 2 + (xx - c[1]) ** 2 < r * r) if cls == "disc" else \
                (np.abs(yy - c[0]) < r) & (np.abs(xx - c[1]) < r)
            x.append((level + 0.1 * inside + 0.02 * rng.standard_normal((SIZE, SIZE)))[None])
            masks.append(inside[None].astype(np.uint8) * (g + 1))
            for k, v in zip(index, (f"{mod}{i // 4}", mod, "val" if i % 6 == 0 else "train", i, cls)):
                index[k].append(v)
    return patch_store(path, np.clip(np.stack(x), 0, 1), labels=np.stack(masks) if labels else None,
                       class_names=["disc", "square"], source="synthetic-test", content_hash=f"cond-{labels}",
                       **index)


def _train(store, out, condition, name="vae", steps=60):
    cfg = TrainStageConfig.model_validate({
        "model": {"name": name, "channels": [8, 16], "latent_dim": 8, "condition": condition,
                  **({"disc_channels": 8, "disc_layers": 2} if name == "vaegan" else {})},
        "train": {"batch_size": 8, "max_steps": steps, "lr": 3e-3, "warmup_steps": 2, "beta_warmup_steps": 10,
                  "checkpoint_every": steps, "log_every": 10, "val_batches": 1, "disc_start": steps // 2}})
    train(store, out, cfg, device="cpu")
    return load_model(RunDir(out).checkpoint("last"), device="cpu")[0]


def _manifest(out):
    with open(out / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_auto_is_modality_for_a_mixed_store_and_each_modality_is_generated_as_itself(tmp_path):
    store = _store(tmp_path / "store")
    assert resolve_condition("auto", store) == ("modality", ("ct", "microscopy"))
    model = _train(store, tmp_path / "run", "auto", name="vaegan", steps=80)
    assert model.config.condition == "modality" and model.discriminator.projection is not None
    summary = generate(tmp_path / "run", tmp_path / "gen", GenerateConfig(
        n=8, prior="standard", per_class=True, format="npy", checkpoint="last"), device="cpu")
    assert summary["counts"]["per_modality"] == {"ct": 4, "microscopy": 4}
    rows = _manifest(tmp_path / "gen")
    means = {m: np.mean([np.load(tmp_path / "gen" / r["path"]).mean() for r in rows if r["modality"] == m])
             for m in ("ct", "microscopy")}
    # each id's samples sit nearer its own modality's training intensity than the other's (0.85 vs 0.15 + shapes)
    real = {m: float(store.get(store.select("train", m)).mean()) for m in ("ct", "microscopy")}
    assert abs(means["ct"] - real["ct"]) < abs(means["ct"] - real["microscopy"]) / 2
    assert abs(means["microscopy"] - real["microscopy"]) < abs(means["microscopy"] - real["ct"]) / 2


def test_class_model_writes_balanced_class_folders_and_a_class_column(tmp_path):
    store = _store(tmp_path / "store")
    _train(store, tmp_path / "run", "class", steps=20)
    summary = generate(tmp_path / "run", tmp_path / "gen", GenerateConfig(
        n=6, prior="gmm", per_class=True, format="png", checkpoint="last"), device="cpu")
    assert summary["counts"]["per_class"] == {"disc": 3, "square": 3}
    rows = _manifest(tmp_path / "gen")
    assert [r["class"] for r in rows] == ["disc", "square"] * 3
    assert all(f"/{r['class']}/" in r["preview"] and (tmp_path / "gen" / r["preview"]).is_file() for r in rows)


def test_mask_model_generates_aligned_label_maps_with_the_image_geometry(tmp_path):
    store = _store(tmp_path / "store", labels=True)
    model = _train(store, tmp_path / "run", "mask", steps=20)
    assert model.config.in_channels == 2 and model.config.condition_names == ("0", "1", "2")
    x, ids = model_inputs(store, [0, 30], model.config)
    assert ids is None and x.shape == (2, 2, SIZE, SIZE)
    np.testing.assert_allclose(x[:, 1:] * 2, store.labels[[0, 30]])  # label / max label
    summary = generate(tmp_path / "run", tmp_path / "gen", GenerateConfig(n=3, prior="standard", format="nifti",
                                                                         checkpoint="last"),
                       device="cpu", mix_with=store.path, ratio=0.25)
    augmented = open_store(tmp_path / "gen" / "augmented_store")  # the synthetic patches keep their masks
    n_syn = summary["augmented_store"]["n_synthetic"]
    assert n_syn > 0 and augmented.labels.shape == (len(store) + n_syn, 1, SIZE, SIZE)
    np.testing.assert_array_equal(augmented.labels[:len(store)], store.labels)
    for r in _manifest(tmp_path / "gen"):  # NIfTI beside CT, TIFF beside microscopy, same geometry
        image, mask = tmp_path / "gen" / r["path"], tmp_path / "gen" / r["mask"]
        assert mask.name == image.name.replace(".", "_mask.", 1)
        if image.suffix == ".tif":
            with tifffile.TiffFile(image) as a, tifffile.TiffFile(mask) as b:
                assert a.pages[0].shape == b.pages[0].shape
                assert a.pages[0].tags["XResolution"].value == b.pages[0].tags["XResolution"].value
                labels = b.asarray()
        else:
            a, b = nib.load(image), nib.load(mask)
            assert a.shape == b.shape
            np.testing.assert_array_equal(a.affine, b.affine)
            labels = np.asarray(b.dataobj)
        assert set(np.unique(labels)) <= {0, 1, 2}


def test_split_joint_rounds_the_mask_channel_to_labels():
    x = np.zeros((1, 2, 2, 2), np.float32)
    x[0, 1] = [[0.2, 0.3], [0.74, 1.0]]
    img, mask = split_joint(x, ("0", "1", "2"))
    assert img.shape == (1, 1, 2, 2) and mask.tolist() == [[[[0, 1], [1, 2]]]]


def test_a_conditional_model_refuses_to_run_without_its_condition():
    model = build_model(parse_model_config(dict(image_size=32, channels=(8,), latent_dim=4, condition="class",
                                    condition_names=("a", "b"))))
    with pytest.raises(ConfigError, match="outside `conditioned_on"):
        model.decode(torch.zeros(2, 4))
    with pytest.raises(ConfigError, match="give a condition id"):
        sample_images(model, 2)
    assert sample_images(model, 2, conditions=torch.tensor([1, 0])).shape == (2, 1, 32, 32)
    with pytest.raises(ConfigError, match="give a condition id"), model.conditioned_on(None):
        pass
    with pytest.raises(ConfigError, match="takes no class condition"):
        build_model(parse_model_config(dict(name="monai-kl", image_size=32, latent_dim=64, condition="class",
                                condition_names=("a",))))


def test_condition_ids_follow_the_models_names_not_the_store_order(tmp_path):
    store = _store(tmp_path / "store")  # classes "disc" (rows 0-23) then "square" (24-47)
    np.testing.assert_array_equal(condition_ids(store, [0, 30, 1], "class", ("square", "disc")), [1, 0, 1])
    np.testing.assert_array_equal(condition_ids(store, [30, 0], "modality", ("ct", "microscopy")), [1, 0])
    with pytest.raises(ConfigError, match=r"class \['square'\] unknown to the model"):
        condition_ids(store, [0, 30], "class", ("disc",))
    assert condition_ids(store, [0], "none", ()) is None

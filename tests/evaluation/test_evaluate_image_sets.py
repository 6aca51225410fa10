"""Image sets (every image its own "patient", one patch each) are evaluated per class and per split.

- an IDX set end to end from the command line: discover -> 32² store -> train (no config) -> evaluate,
  without and with ``--per-image``;
- a labelled store written directly, a tiny class-conditioned checkpoint: the per-class and
  per-split tables against numpy over the per-image rows, the worst images, the report's sections.
"""

import csv
import json

import numpy as np
import pytest
import torch
from scipy import stats
from typer.testing import CliRunner

from medvae.cli import app
from medvae.config import EvaluateConfig, parse_model_config
from medvae.data.store import open_store, write_store
from medvae.evaluation.class_tables import is_image_set
from medvae.evaluation.evaluate import patch_metrics, report_patients, run_evaluation
from medvae.evaluation.features import feature_net
from medvae.evaluation.sample_quality import classified_samples
from medvae.evaluation.tables import CLASS_PREFIX
from medvae.metrics.table import PATCH_METRICS
from medvae.models import build_model
from medvae.training.checkpoint import load_model, save_checkpoint
from tests.factories import patch_store, random_idx_set

CLASSES = ["circle", "square", "noise"]
CFG = EvaluateConfig(split="test", iwae_k=2, iwae_max_patches=6, mmd_samples=16, mmd_permutations=5, batch_size=16,
                     feature_steps=5, prior_components=2, worst_images=5, split_patches=12)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_idx_set_discover_prepare_train_evaluate(tmp_path):
    scans = tmp_path / "fashion-mnist"
    random_idx_set(scans, {"train": 96, "t10k": 40})
    cli = CliRunner()

    def ok(*args):
        res = cli.invoke(app, [str(a) for a in args])
        assert res.exit_code == 0, res.output
        return res.output

    ok("discover", scans, "--out", tmp_path / "m.csv")
    out = ok("prepare", tmp_path / "m.csv", "--out", tmp_path / "store", "--patch-size", 32)
    assert "patches per class and split" in out and "Ankle boot" in out
    assert is_image_set(open_store(tmp_path / "store"))
    for model in ("vae", "monai-kl"):  # no --config: image size and channels from the store
        ok("train", tmp_path / "store", "--model", model, "--out", tmp_path / model, "--max-steps", 2,
           "--batch-size", 8)
    (tmp_path / "ev.yaml").write_text("iwae_k: 2\niwae_max_patches: 5\nmmd_samples: 16\nmmd_permutations: 5\n"
                                      "report_patients: 6\nworst_images: 6\nfeature_steps: 5\n")
    ok("evaluate", tmp_path / "vae", "--store", tmp_path / "store", "--out", tmp_path / "report",
       "--compare", tmp_path / "monai-kl", "--config", tmp_path / "ev.yaml")
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["image_set"] and summary["per_patient"] == {} and summary["report_patients"] == []
    assert summary["per_modality"]["image"]["n_patches"] == 40
    assert summary["per_modality"]["image"]["metrics"]["iwae"]["n"] == 5
    assert sum(c["n_patches"] for c in summary["per_class"].values()) == 40
    assert set(summary["per_split"]) == {"train", "test"} and summary["per_split"]["train"]["image"]["n_split"] == 96
    assert len(summary["worst_images"]) == 6
    assert set(summary["compare"]["results"]["monai-kl"]["per_class"]) == set(summary["per_class"])
    rows = _rows(tmp_path / "report" / "metrics.csv")
    assert {r["patient_id"] for r in rows} == {"ALL"} | {CLASS_PREFIX + c for c in summary["per_class"]}
    html = (tmp_path / "report" / "report.html").read_text()
    assert 'class="patient"' not in html and 'id="patients"' not in html and 'id="distributions"' not in html
    assert 'id="classes"' in html and 'id="worst"' in html and "40 images" in html
    assert "as the store's feature classifier labels the samples" in html  # an unconditional model's class rows
    assert {r["metric"] for r in summary["compare"]["table"]} >= {"ssim", "iwae", "elbo", "kl", "mse", "mmd2_pixel"}

    # --per-image: a row per image as well (the same per-class rows)
    ok("evaluate", tmp_path / "vae", "--store", tmp_path / "store", "--out", tmp_path / "per_image",
       "--config", tmp_path / "ev.yaml", "--per-image")
    per_image = _rows(tmp_path / "per_image" / "metrics.csv")
    images = {r["patient_id"] for r in per_image} - {"ALL"} - {CLASS_PREFIX + c for c in summary["per_class"]}
    assert len(images) == 40 and len(json.loads((tmp_path / "per_image" / "summary.json").read_text())
                                     ["per_patient"]) == 40
    vae_rows = [r for r in rows if r["run"] == "vae"]
    assert [r for r in per_image if r["patient_id"] not in images] == vae_rows


def test_report_patients_keeps_all_when_few():
    pp = {f"p{i}": {"metrics": {"ssim": {"mean": float(i)}}} for i in range(5)}
    assert report_patients(pp, 10) == list(pp)
    assert report_patients(pp, 3) == ["p0", "p1", "p4"]


# --------------------------------------------------------------------------- a labelled store, direct
def _labelled_store(path, images_per_patient=1):
    """32² images of three classes: 30 test, 24 train; one patch per image, each image its own patient
    (an image set) or ``images_per_patient`` consecutive images one patient (a patient cohort)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32] / 32
    imgs, ids, splits, classes = [], [], [], []
    for split, n in (("test", 30), ("train", 24)):
        for i in range(n):
            cls = CLASSES[(i * 7) % 3]
            cy, cx, r = rng.uniform(0.3, 0.7, 2).tolist() + [rng.uniform(0.1, 0.3)]
            if cls == "circle":
                img = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) * 0.8 + 0.1
            elif cls == "square":
                img = ((abs(yy - cy) < r) & (abs(xx - cx) < r)) * 0.7 + 0.2
            else:
                img = rng.uniform(0, 1, (32, 32))
            imgs.append(img)
            ids.append(f"{split}-{i // images_per_patient}")
            splits.append(split)
            classes.append(cls)
    return patch_store(path, np.stack(imgs)[:, None], classes=classes, class_names=CLASSES, content_hash="labelled",
                       normalization={"image": {"low": 0.0, "high": 255.0, "unit": ""}}, patient_id=ids,
                       modality="image", split=splits, source="set.idx")


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgset")
    store = _labelled_store(root / "store")
    torch.manual_seed(0)
    cfg = parse_model_config(dict(name="vae", image_size=32, channels=(8, 16), latent_dim=8, condition="class",
                      condition_names=tuple(CLASSES)))
    save_checkpoint(root / "run" / "checkpoints" / "best.pt", {
        "model_config": cfg.model_dump(mode="json"), "model_state": build_model(cfg).state_dict(), "step": 3,
        "store_hash": "labelled"})
    per_image = run_evaluation(root / "run", store.path, root / "per_image", CFG.model_copy(update={"per_image": True}),
                         device="cpu")
    default = run_evaluation(root / "run", store.path, root / "default", CFG, device="cpu")
    return store, root, per_image, default


def test_per_class_tables_equal_numpy_over_the_images_of_each_class(labelled):
    store, root, per_image, _ = labelled
    rows = _rows(root / "per_image" / "metrics.csv")
    test = store.select(split="test")
    cls = dict(zip(store.index["patient_id"][test].tolist(), store.index["class"][test].tolist()))
    assert {r["patient_id"] for r in rows} >= set(cls)  # every image has its rows with --per-image
    for metric in ("ssim", "psnr", "mse", "elbo"):
        value = {r["patient_id"]: float(r["value"]) for r in rows if r["metric"] == metric and r["patient_id"] in cls}
        for name in CLASSES:
            v = np.array([value[p] for p, c in cls.items() if c == name])
            mean, sd = v.mean(), v.std(ddof=1)
            lo, hi = stats.t.interval(0.95, len(v) - 1, loc=mean, scale=sd / np.sqrt(len(v)))
            got = per_image["per_class"][name]["metrics"][metric]
            assert got["n"] == len(v) == 10
            assert got["mean"] == pytest.approx(mean, rel=1e-9) and got["sd"] == pytest.approx(sd, rel=1e-9)
            assert (got["ci_low"], got["ci_high"]) == pytest.approx((lo, hi), rel=1e-9)
            csv_rows = {r["metric"]: r for r in rows if r["patient_id"] == CLASS_PREFIX + name}
            assert float(csv_rows[metric]["value"]) == pytest.approx(mean, rel=1e-6)
            assert float(csv_rows[f"{metric}_sd"]["value"]) == pytest.approx(sd, rel=1e-6)
            assert csv_rows[metric]["modality"] == "image" and int(csv_rows[metric]["n"]) == 10
    assert list(per_image["per_class"]) == CLASSES  # the store's label order


def test_no_per_image_rows_without_the_option(labelled):
    store, root, per_image, default = labelled
    rows = _rows(root / "default" / "metrics.csv")
    assert {r["patient_id"] for r in rows} == {"ALL"} | {CLASS_PREFIX + c for c in CLASSES}
    assert default["per_patient"] == {} and len(per_image["per_patient"]) == 30
    with_images = _rows(root / "per_image" / "metrics.csv")
    assert len(with_images) == len(rows) + 30 * 2 * len(PATCH_METRICS)  # mean and sd of every metric per image
    saved, saved_images = (json.loads((root / d / "summary.json").read_text()) for d in ("default", "per_image"))
    assert saved["per_patient"] == {} and list(saved["per_class"]) == CLASSES
    assert saved["per_class"] == saved_images["per_class"] and saved["per_split"] == saved_images["per_split"]


def test_per_split_and_worst_images(labelled):
    store, root, per_image, default = labelled
    # The train split on split_patches (12) evenly spaced of its 24 images, no IWAE, against numpy over
    # patch_metrics of exactly those rows.
    train = default["per_split"]["train"]["image"]
    assert train["n_patches"] == 12 and train["n_split"] == 24 and "iwae" not in train["metrics"]
    picked = store.select(split="train")[np.unique(np.linspace(0, 23, 12).round().astype(int))]
    model, _ = load_model(root / "run" / "checkpoints" / "best.pt")
    per, _ = patch_metrics(model, store, picked, CFG, torch.device("cpu"), iwae_rows=picked[:0])
    # rel 1e-5: the evaluation's model is channels_last, this one contiguous (float32 sums in another order)
    assert train["metrics"]["ssim"]["mean"] == pytest.approx(per["ssim"].mean(), rel=1e-5)
    test = default["per_split"]["test"]["image"]
    assert test["n_patches"] == test["n_split"] == 30
    assert test["metrics"]["ssim"]["mean"] == pytest.approx(default["per_modality"]["image"]["metrics"]["ssim"]["mean"])
    rows = _rows(root / "default" / "metrics.csv")
    train_rows = {r["metric"]: r for r in rows if r["split"] == "train"}
    assert train_rows["ssim"]["patient_id"] == "ALL" and int(train_rows["ssim"]["n"]) == 12
    # the worst images: the lowest SSIMs of the per-image rows, lowest first
    ssim = {p: v["metrics"]["ssim"]["mean"] for p, v in per_image["per_patient"].items()}
    worst = sorted(ssim, key=ssim.get)[:5]
    assert [w["patient_id"] for w in default["worst_images"]] == worst
    assert all(w["class"] in CLASSES for w in default["worst_images"])


def test_image_set_report(labelled):
    _, root, _, _ = labelled
    html = (root / "default" / "report.html").read_text()
    assert 'id="patients"' not in html and 'class="patient"' not in html and 'id="distributions"' not in html
    table = html[html.index('id="classes"'):html.index('id="worst"')]
    assert all(f"<td>{c}</td>" in table for c in CLASSES) and table.count("±") >= 6 * (len(CLASSES) + 2)
    assert "A row per class" in html and 'id="latents"' in html
    assert "30 images" in html and "with <code>--per-image</code>" in html


def test_the_rule(tmp_path):
    img = np.zeros((4, 1, 32, 32), np.float32)
    base = {"modality": ["ct"] * 4, "split": ["test"] * 4, "slice_index": [0, 1, 2, 3], "y": [0] * 4, "x": [0] * 4,
            "foreground_fraction": [1.0] * 4, "source": ["s"] * 4}
    assert is_image_set(write_store(tmp_path / "a", img, {"patient_id": ["a", "b", "c", "d"], **base}, {}))
    assert not is_image_set(write_store(tmp_path / "b", img, {"patient_id": ["a", "a", "c", "d"], **base}, {}))


def test_a_labelled_patient_cohort_keeps_its_patients(labelled, tmp_path):
    """The same images two to a patient are a patient cohort: per-patient rows (each the mean and sd of its
    two images' rows in the image set's --per-image evaluation), patient sections, no split tables or worst
    grid, and the per-class tables of the same patches."""
    store, root, per_image, _ = labelled
    cohort = _labelled_store(tmp_path / "cohort", images_per_patient=2)
    assert not is_image_set(cohort)
    res = run_evaluation(root / "run", cohort.path, tmp_path / "report", CFG, device="cpu")
    assert not res["image_set"] and res["per_split"] == {} and res["worst_images"] == []
    assert sorted(res["per_patient"]) == sorted(f"test-{j}" for j in range(15)) == sorted(res["report_patients"])
    rows, image_rows = _rows(tmp_path / "report" / "metrics.csv"), _rows(root / "per_image" / "metrics.csv")
    for metric in ("ssim", "ms_ssim", "psnr", "mse", "mae"):  # no ELBO: its z draws follow the IWAE subset
        image = {r["patient_id"]: float(r["value"]) for r in image_rows if r["metric"] == metric}
        mean = {r["patient_id"]: r for r in rows if r["metric"] == metric}
        sd = {r["patient_id"]: float(r["value"]) for r in rows if r["metric"] == f"{metric}_sd"}
        for j in range(15):
            pair = np.array([image[f"test-{2 * j}"], image[f"test-{2 * j + 1}"]])
            assert float(mean[f"test-{j}"]["value"]) == pytest.approx(pair.mean(), rel=1e-9)
            assert sd[f"test-{j}"] == pytest.approx(pair.std(ddof=1), rel=1e-9, abs=1e-12)
            assert int(mean[f"test-{j}"]["n"]) == 2
        for name in CLASSES:
            got, want = (r["per_class"][name]["metrics"][metric] for r in (res, per_image))
            assert got == pytest.approx(want)
    html = (tmp_path / "report" / "report.html").read_text()
    assert 'id="patients"' in html and html.count('class="patient"') == 15 and 'id="distributions"' in html
    assert "<h2>Classes</h2>" in html and "Per split" not in html and 'id="worst"' not in html


def test_classified_samples_a_row_per_class_the_feature_classifier_assigns(labelled):
    """An unconditional model's samples in rows by the feature classifier's label: the counts and each row's
    first samples against the classifier's argmax over all samples, NaN (blank) cells beyond a class's count."""
    store = labelled[0]
    x = torch.from_numpy(store.get(store.select(split="test")))
    x = (x + 0.1 * torch.rand(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    got = classified_samples(store, {"standard": x}, CFG, torch.device("cpu"), per_class=4)
    net = feature_net(store, steps=CFG.feature_steps, device="cpu")  # the cached network of the evaluations
    with torch.no_grad():
        label = np.asarray(sorted(CLASSES))[net.classify(x).argmax(1).numpy()]
    assert got["names"] == CLASSES and got["n"] == {"standard": 30}
    assert got["counts"]["standard"] == [int((label == c).sum()) for c in CLASSES]
    for k, name in enumerate(CLASSES):
        want = x[np.flatnonzero(label == name)[:4]].numpy()
        cells = got["standard"][4 * k:4 * k + 4]
        np.testing.assert_array_equal(cells[:len(want)], want)
        assert np.isnan(cells[len(want):]).all()

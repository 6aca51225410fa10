"""Discovery of TCIA, MSD, flat NIfTI and TIFF layouts; problems as rows; privacy; --reference."""

import json
import logging

import nibabel as nib
import numpy as np
import pydicom
import pytest
import tifffile
from typer.testing import CliRunner

from medvae.cli import app
from medvae.data.discover import discover, run_discovery
from medvae.data.manifest import ManifestRow, assign_split, assign_splits, read_manifest, write_manifest
from medvae.errors import InputError
from medvae.io.phantoms import write_phantom_cohort


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory):
    """Phantom cohort (TCIA layout + labels + microscopy) with an empty patient folder and a stray file."""
    root = tmp_path_factory.mktemp("scans")
    write_phantom_cohort(root, ct_patients=3, microscopy_stacks=1, seed=1, ct_size=64, ct_slices=8)
    (root / "Pancreas-CT" / "PANCREAS_0004").mkdir()  # empty, as TCIA's PANCREAS_0025
    (root / "notes.txt").write_text("not a scan")
    (root / "Pancreas-CT" / ".DS_Store").write_bytes(b"junk")
    return root


def _nifti(path, shape=(20, 18, 6), zooms=(0.8, 0.7, 2.5), dtype=np.int16):
    affine = np.diag([*zooms, 1.0])
    data = np.arange(np.prod(shape), dtype=dtype).reshape(shape)
    nib.save(nib.Nifti1Image(data, affine), str(path))


def test_tcia_layout_with_labels_empty_patient_and_microscopy(phantom_root):
    found = run_discovery(phantom_root)
    rows = {r.patient_id: r for r in found.rows}
    assert sorted(rows) == ["PANCREAS_0001", "PANCREAS_0002", "PANCREAS_0003", "PANCREAS_0004", "stack_001"]
    empty = rows["PANCREAS_0004"]
    assert empty.status == "problem" and "PANCREAS_0004" in empty.problem and empty.modality == "ct"
    for pid in ("PANCREAS_0001", "PANCREAS_0002", "PANCREAS_0003"):
        row = rows[pid]
        assert row.ok and (row.modality, row.format, row.n_slices) == ("ct", "dicom", 8)
        assert row.label_path.endswith(f"labels/label{pid[-4:]}.nii.gz")
        ds = pydicom.dcmread(
            next((phantom_root / "Pancreas-CT" / pid).rglob("*.dcm")), stop_before_pixels=True
        )
        assert row.series_uid == ds.SeriesInstanceUID
        assert (row.spacing_z, row.spacing_y, row.spacing_x) == pytest.approx(
            (float(ds.SliceThickness), float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1]))
        )
        assert row.path.endswith(f"Pancreas-CT/{pid}")
    stack = rows["stack_001"]
    assert (stack.modality, stack.format, stack.n_slices, stack.label_path) == ("microscopy", "tiff", 24, "")
    usable = assign_splits([r.patient_id for r in found.rows if r.ok], 0)  # 4 patients: every split gets one
    assert all(r.split == usable.get(r.patient_id, assign_split(r.patient_id, 0)) for r in found.rows)
    assert {r.split for r in found.rows if r.ok} == {"train", "val", "test"}
    assert [p.name for p in found.ignored] == ["notes.txt"]
    assert found.unused_labels == []


def test_modality_filter(phantom_root):
    assert {r.patient_id for r in discover(phantom_root, modality="microscopy")} == {"stack_001"}
    assert {r.plane for r in discover(phantom_root, modality="ct") if r.ok} == {"axial"}  # from the DICOM geometry
    assert {r.modality for r in discover(phantom_root, modality="ct")} == {"ct"}


def test_cli_manifest_summary_and_privacy(phantom_root, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "manifest.csv"
    res = _discover_cli(phantom_root, out)
    assert res.exit_code == 0, res.output
    text = out.read_text()
    assert len(read_manifest(out)) == 5
    assert "PANCREAS_0004" in res.output and "problem" in res.output and "notes.txt" in res.output
    # The DICOMs do carry an identity ...
    identity = set()
    for f in (phantom_root / "Pancreas-CT").rglob("*.dcm"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        identity |= {
            str(ds.PatientName),
            str(ds.PatientName).split("^")[1],
            ds.PatientID,
            ds.PatientBirthDate,
        }
    assert len(identity) == 12 and all(len(s) >= 3 for s in identity)
    # ... that never reaches the manifest, stdout, stderr or the log.
    for s in identity:
        assert s not in text and s not in res.output and s not in caplog.text, s


def test_labels_option_and_explicit_patient_folder(phantom_root, tmp_path):
    rows = discover(phantom_root / "Pancreas-CT", labels=phantom_root / "labels")
    assert {r.patient_id: bool(r.label_path) for r in rows} == {
        "PANCREAS_0001": True,
        "PANCREAS_0002": True,
        "PANCREAS_0003": True,
        "PANCREAS_0004": False,
    }
    one = discover(phantom_root / "Pancreas-CT" / "PANCREAS_0002")  # a single patient folder
    assert [(r.patient_id, r.ok, r.n_slices) for r in one] == [("PANCREAS_0002", True, 8)]
    with pytest.raises(InputError, match="--labels"):
        discover(phantom_root, labels=tmp_path / "nowhere")


def test_msd_layout(tmp_path):
    root = tmp_path / "Task07_Pancreas"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True)
    for pid in ("pancreas_001", "pancreas_004"):
        _nifti(root / "imagesTr" / f"{pid}.nii.gz")
        _nifti(root / "labelsTr" / f"{pid}.nii.gz", dtype=np.uint8)
        (root / "imagesTr" / f"._{pid}.nii.gz").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
        (root / "labelsTr" / f"._{pid}.nii.gz").write_bytes(b"\x00\x05\x16\x07")
    _nifti(root / "imagesTs" / "pancreas_002.nii.gz")
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "name": "Pancreas",
                "modality": {"0": "CT"},
                "numTraining": 3,
                "numTest": 1,
                "training": [
                    {"image": f"./imagesTr/{p}.nii.gz", "label": f"./labelsTr/{p}.nii.gz"}
                    for p in ("pancreas_001", "pancreas_004", "pancreas_005")
                ],
                "test": ["./imagesTs/pancreas_002.nii.gz"],
            }
        )
    )
    found = run_discovery(tmp_path)  # the MSD folder found one level down
    rows = {r.patient_id: r for r in found.rows}
    assert sorted(rows) == ["pancreas_001", "pancreas_002", "pancreas_004", "pancreas_005"]
    assert rows["pancreas_001"].ok and rows["pancreas_001"].label_path.endswith(
        "labelsTr/pancreas_001.nii.gz"
    )
    assert rows["pancreas_002"].ok and rows["pancreas_002"].label_path == ""
    assert rows["pancreas_005"].status == "problem" and "dataset.json" in rows["pancreas_005"].problem
    hdr = nib.load(root / "imagesTr" / "pancreas_001.nii.gz").header
    zx, zy, zz = (float(z) for z in hdr.get_zooms())
    r = rows["pancreas_004"]
    assert (r.modality, r.format, r.n_slices) == ("ct", "nifti", 6)
    assert (r.spacing_z, r.spacing_y, r.spacing_x) == pytest.approx((zz, zy, zx))
    assert found.ignored == []  # ._ junk is silently skipped

    assert discover(tmp_path, modality="microscopy") == []  # NIfTI CT is not microscopy


def test_nnunet_channel_suffix(tmp_path):
    for sub in ("imagesTr", "labelsTr"):
        (tmp_path / sub).mkdir()
    _nifti(tmp_path / "imagesTr" / "case_7_0000.nii.gz")
    _nifti(tmp_path / "labelsTr" / "case_7.nii.gz", dtype=np.uint8)
    (row,) = discover(tmp_path)
    assert row.patient_id == "case_7" and row.label_path.endswith("labelsTr/case_7.nii.gz")


def test_flat_nifti_folder_with_unknown_file(tmp_path):
    _nifti(tmp_path / "case_a.nii.gz")
    _nifti(tmp_path / "case_b.nii", shape=(10, 12, 4))
    (tmp_path / "readme.md").write_text("hello")
    (tmp_path / "broken.nii.gz").write_bytes(b"not gzip at all")
    found = run_discovery(tmp_path, modality="mr")
    rows = {r.patient_id: r for r in found.rows}
    assert rows["case_a"].ok and rows["case_a"].modality == "mr" and rows["case_b"].n_slices == 4
    assert rows["broken"].status == "problem" and "broken.nii.gz" in rows["broken"].problem
    assert [p.name for p in found.ignored] == ["readme.md"]


def test_tiff_folder(tmp_path):
    for i, dz in enumerate((1.5, 2.0)):
        tifffile.imwrite(
            tmp_path / f"cells_{i}.tif",
            np.zeros((5, 32, 40), np.uint16),
            imagej=True,
            resolution=(1 / 0.25, 1 / 0.25),
            metadata={"spacing": dz, "unit": "um", "axes": "ZYX"},
        )
    rows = discover(tmp_path)
    assert [(r.patient_id, r.modality, r.format, r.n_slices) for r in rows] == [
        ("cells_0", "microscopy", "tiff", 5),
        ("cells_1", "microscopy", "tiff", 5),
    ]
    assert (rows[1].spacing_z, rows[1].spacing_y, rows[1].spacing_x) == pytest.approx((2.0, 0.25, 0.25))


def test_missing_and_empty_directories(tmp_path, capsys):
    with pytest.raises(InputError, match="no such directory") as err:
        discover(tmp_path / "absent")
    assert str(tmp_path / "absent") in str(err.value)
    (tmp_path / "empty").mkdir()
    res = _discover_cli(tmp_path / "empty", tmp_path / "m.csv")
    assert res.exit_code == 2 and f"error: no scans found in {tmp_path / 'empty'}" in res.output
    assert not (tmp_path / "m.csv").exists()
    only_empty = tmp_path / "tcia" / "PANCREAS_0025"
    only_empty.mkdir(parents=True)
    assert _discover_cli(tmp_path / "tcia", tmp_path / "m2.csv").exit_code == 2  # a row, but nothing usable
    assert read_manifest(tmp_path / "m2.csv")[0].status == "problem"


def test_reference_reconciliation(phantom_root, tmp_path):
    ref = tmp_path / "ref.csv"
    ref_rows = [
        ManifestRow(f"PANCREAS_{i:04d}", "ct", "dicom", f"Pancreas-CT/PANCREAS_{i:04d}", split="test")
        for i in (1, 2, 3)
    ]
    ref_rows.append(
        ManifestRow(
            "PANCREAS_0005",
            "ct",
            "dicom",
            "Pancreas-CT/PANCREAS_0005",
            split="val",
            status="problem",
            problem="empty in the public TCIA download",
        )
    )
    write_manifest(ref_rows, ref)
    found = run_discovery(phantom_root, reference=ref)
    rows = {r.patient_id: r for r in found.rows}
    assert found.missing == ["PANCREAS_0005"] and found.extra == ["PANCREAS_0004", "stack_001"]
    assert all(rows[f"PANCREAS_{i:04d}"].split == "test" for i in (1, 2, 3))  # the reference's split wins
    assert rows["stack_001"].split == assign_split("stack_001", 0)
    missing = rows["PANCREAS_0005"]
    assert missing.status == "problem" and missing.split == "val"
    assert "ref.csv" in missing.problem and "empty in the public TCIA download" in missing.problem
    # The command writes exactly these rows (checked as values, not as terminal-width-dependent text).
    res = _discover_cli(phantom_root, tmp_path / "m.csv", "--reference", str(ref))
    assert res.exit_code == 0, res.output
    assert "1 missing" in res.output and "2 extra" in res.output  # one line each: the console never wraps
    written = {r.patient_id: r for r in read_manifest(tmp_path / "m.csv")}
    assert sorted(written) == sorted(rows) == ["PANCREAS_0001", "PANCREAS_0002", "PANCREAS_0003", "PANCREAS_0004",
                                               "PANCREAS_0005", "stack_001"]
    assert written["PANCREAS_0005"].status == "problem" and written["PANCREAS_0005"].split == "val"
    assert [written[p].split for p in ("PANCREAS_0001", "PANCREAS_0002", "PANCREAS_0003")] == ["test"] * 3
    bad = tmp_path / "bad.csv"
    bad.write_text("patient_id,split\nX,train\n")
    with pytest.raises(InputError, match=r"bad\.csv"):
        discover(phantom_root, reference=bad)


def _discover_cli(scans, out, *args):
    return CliRunner().invoke(app, ["discover", str(scans), "--out", str(out), *args])

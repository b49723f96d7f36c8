"""ACDC, MSD and plain NIfTI layouts on tiny synthetic folders."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from conftest import make_acdc_patient, read_json, read_report, write_nifti

from medseg.common.errors import IngestError
from medseg.ingest import ingest_folder
from medseg.common.manifest import CARDIAC_LABELS, read_manifest


def test_acdc_two_cases_per_patient(tmp_path):
    src = tmp_path / "acdc"
    make_acdc_patient(src / "training", "patient001", ed=1, es=7, group="DCM")
    make_acdc_patient(src / "training", "patient002", ed=2, es=12, group="NOR", dtype=np.float32, labels=("ED",))
    summary = ingest_folder(src, tmp_path / "out")
    assert summary["layout"] == "acdc" and summary["accepted"] == 4 and summary["rejected"] == 0

    m = read_manifest(tmp_path / "out")
    assert m.labels == CARDIAC_LABELS and m.layout == "acdc"
    by_subject: dict[str, dict[str, object]] = {}
    for case in m.cases:
        assert case.case_id == f"{case.subject}_{case.phase}" and case.modality == "MR"
        assert case.spacing == (1.5, 1.5, 5.0) and case.shape == (8, 7, 4)
        by_subject.setdefault(case.subject, {})[case.phase] = case
        assert "patient" not in case.case_id
    assert len(by_subject) == 2 and all(set(p) == {"ED", "ES"} for p in by_subject.values())
    groups = {next(iter(p.values())).group: p for p in by_subject.values()}
    assert set(groups) == {"DCM", "NOR"}
    assert groups["NOR"]["ES"].label is None and groups["NOR"]["ED"].label is not None

    # source dtypes kept (int16 / float32); labels uint8
    dcm_ed = groups["DCM"]["ED"]
    assert nib.load(m.image_path(dcm_ed)).get_data_dtype() == np.int16
    assert nib.load(m.image_path(groups["NOR"]["ED"])).get_data_dtype() == np.float32
    assert nib.load(m.label_path(dcm_ed)).get_data_dtype() == np.uint8

    report = read_report(tmp_path / "out", src)
    assert report["source_layout"] == "acdc" and report["rejected"] == []
    assert {a["source"] for a in report["accepted"]} >= {"training/patient001/patient001_frame01.nii.gz",
                                                         "training/patient002/patient002_frame12.nii.gz"}


def test_acdc_bad_label_rejected_others_kept(tmp_path):
    src = tmp_path / "acdc"
    make_acdc_patient(src, "patient001")
    bad = make_acdc_patient(src, "patient002", ed=1, es=5)
    write_nifti(bad / "patient002_frame01_gt.nii.gz", np.zeros((8, 7, 3), np.uint8))  # wrong shape
    write_nifti(bad / "patient002_frame05_gt.nii.gz", np.full((8, 7, 4), 5, np.uint8))  # 5 not in the map
    summary = ingest_folder(src, tmp_path / "out")
    assert summary["accepted"] == 2 and summary["rejected"] == 2
    reasons = {r["source"]: r["reason"] for r in read_report(tmp_path / "out", src)["rejected"]}
    assert "shape" in reasons["patient002/patient002_frame01.nii.gz"]
    assert "not in the label map" in reasons["patient002/patient002_frame05.nii.gz"]


def _msd(root, modality='{"0": "CT"}'):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for i, shape in enumerate([(6, 5, 4), (6, 5, 4)]):
        name = f"pancreas_{i:03d}.nii.gz"
        write_nifti(root / "imagesTr" / name, np.full(shape, -1000 + i, np.int16), np.diag([0.8, 0.8, 2.5, 1]))
        write_nifti(root / "labelsTr" / name, (np.arange(np.prod(shape)).reshape(shape) % 3).astype(np.uint8),
                    np.diag([0.8, 0.8, 2.5, 1]))
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    (root / "imagesTr" / "._pancreas_000.nii.gz").write_bytes(b"\x00\x05\x16\x07 mac resource fork")
    training.append({"image": "./imagesTr/._pancreas_000.nii.gz", "label": "./labelsTr/._pancreas_000.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({
        "name": "Pancreas", "modality": json.loads(modality),
        "labels": {"0": "background", "1": "pancreas", "2": "cancer"},
        "numTraining": len(training), "training": training, "test": []}))


def test_msd_task(tmp_path):
    _msd(tmp_path / "data" / "Task07_Pancreas")
    summary = ingest_folder(tmp_path / "data", tmp_path / "out")  # the task folder one level down is found
    assert summary["layout"] == "msd" and summary["accepted"] == 2 and summary["rejected"] == 0
    m = read_manifest(tmp_path / "out")
    assert m.labels == {0: "background", 1: "pancreas", 2: "cancer"}
    assert all(c.modality == "CT" and c.label and c.spacing == (0.8, 0.8, 2.5) for c in m.cases)
    assert len({c.subject for c in m.cases}) == 2
    assert m.dataset == "pancreas"  # the task's own name: the registered model is medseg-pancreas


def test_msd_bad_cases_named_with_their_reason_and_the_others_kept(tmp_path):
    """A Decathlon folder whose dataset.json names a missing image and a missing label, a label of another shape or
    affine than its image, an image with NaNs: one line each in the report, the good cases ingested."""
    root = tmp_path / "Task04_Tiny"
    _msd(root)
    affine = np.diag([0.8, 0.8, 2.5, 1])
    raw = json.loads((root / "dataset.json").read_text())

    def case(name, image=None, label=None, label_affine=affine):
        if image is not None:
            write_nifti(root / "imagesTr" / name, image, affine)
        if label is not None:
            write_nifti(root / "labelsTr" / name, label, label_affine)
        raw["training"].append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})

    good = np.zeros((6, 5, 4), np.uint8)
    nan = np.ones((6, 5, 4), np.float32)
    nan[2, 2, 2] = np.nan
    shifted = affine.copy()
    shifted[0, 3] = 3.0
    case("no_image.nii.gz", label=good)
    case("no_label.nii.gz", image=np.ones((6, 5, 4), np.int16))
    case("shape.nii.gz", image=np.ones((6, 5, 4), np.int16), label=np.zeros((6, 5, 3), np.uint8))
    case("affine.nii.gz", image=np.ones((6, 5, 4), np.int16), label=good, label_affine=shifted)
    case("nan.nii.gz", image=nan, label=good)
    (root / "dataset.json").write_text(json.dumps(raw))
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    summary = ingest_folder(root, tmp_path / "out", layout="msd")
    assert summary["accepted"] == 2 and summary["rejected"] == 5
    from medseg.ingest.privacy import input_key

    missing = {input_key("imagesTr/no_image.nii.gz"): "imagesTr/no_image.nii.gz"}  # no file to map the key back
    reasons = {missing.get(r["source"], r["source"]): r["reason"]
               for r in read_report(tmp_path / "out", root)["rejected"]}
    assert set(reasons) == {f"imagesTr/{n}.nii.gz" for n in ("no_image", "no_label", "shape", "affine", "nan")}
    assert "image file listed in dataset.json is missing" in reasons["imagesTr/no_image.nii.gz"]
    assert "label file listed in dataset.json is missing" in reasons["imagesTr/no_label.nii.gz"]
    assert "label shape (6, 5, 3) != image shape (6, 5, 4)" in reasons["imagesTr/shape.nii.gz"]
    assert "origin differs" in reasons["imagesTr/affine.nii.gz"]
    assert "NaN" in reasons["imagesTr/nan.nii.gz"]
    assert all("\n" not in r and "Traceback" not in r for r in reasons.values())
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before  # the inputs untouched


def test_dataset_names_come_from_the_data_never_from_file_names(tmp_path):
    from medseg.common.manifest import dataset_slug

    assert dataset_slug("Task04 Hippocampus!") == "task04-hippocampus" and dataset_slug("***") is None
    src = tmp_path / "Patient_Smith_John"  # a folder name must not become the model's name
    write_nifti(src / "images" / "a.nii.gz", np.full((5, 5, 3), -1000, np.int16))
    ingest_folder(src, tmp_path / "out")
    assert read_manifest(tmp_path / "out").dataset == "ct"
    make_acdc_patient(tmp_path / "acdc", "patient001")
    ingest_folder(tmp_path / "acdc", tmp_path / "out_acdc")
    assert read_manifest(tmp_path / "out_acdc").dataset == "acdc"


def test_msd_multimodal_4d_rejected(tmp_path):
    root = tmp_path / "Task01_BrainTumour"
    _msd(root, '{"0": "FLAIR", "1": "T1w"}')
    write_nifti(root / "imagesTr" / "pancreas_001.nii.gz", np.zeros((6, 5, 4, 2), np.float32))
    summary = ingest_folder(root, tmp_path / "out", layout="msd")
    assert summary["accepted"] == 1 and summary["rejected"] == 1
    (rej,) = read_report(tmp_path / "out", root)["rejected"]
    assert rej["source"] == "imagesTr/pancreas_001.nii.gz" and "4D" in rej["reason"]
    assert read_manifest(tmp_path / "out").cases[0].modality == "MR"


def test_nifti_images_labels_and_modality_guess(tmp_path):
    src = tmp_path / "nii"
    write_nifti(src / "images" / "ct_a.nii.gz", np.full((5, 5, 3), -1000, np.int16))
    write_nifti(src / "labels" / "ct_a.nii.gz", np.ones((5, 5, 3), np.uint8))
    write_nifti(src / "images" / "mr_b.nii", np.ones((5, 5, 3), np.float32))
    nan = np.ones((5, 5, 3), np.float32)
    nan[1, 1, 1] = np.nan
    write_nifti(src / "images" / "broken.nii.gz", nan)
    summary = ingest_folder(src, tmp_path / "out")
    assert summary["layout"] == "nifti" and summary["accepted"] == 2 and summary["rejected"] == 1
    m = read_manifest(tmp_path / "out")
    modalities = sorted((c.modality, c.label is not None) for c in m.cases)
    assert modalities == [("CT", True), ("MR", False)]
    assert m.labels == {0: "background", 1: "class_1"}
    (rej,) = read_report(tmp_path / "out", src)["rejected"]
    assert rej["source"] == "images/broken.nii.gz" and "NaN" in rej["reason"]


def test_nifti_flat_folder_and_dataset_json(tmp_path):
    src = tmp_path / "flat"
    write_nifti(src / "one.nii.gz", np.ones((4, 4, 4), np.int16))
    write_nifti(src / "two.nii.gz", np.ones((4, 4, 4), np.int16))
    (src / "dataset.json").write_text(json.dumps({"modality": {"0": "CT"}}))
    assert ingest_folder(src, tmp_path / "out", layout="nifti")["accepted"] == 2
    m = read_manifest(tmp_path / "out")
    assert all(c.modality == "CT" and c.label is None for c in m.cases)


def test_label_affine_mismatch_rejected(tmp_path):
    src = tmp_path / "nii"
    write_nifti(src / "images" / "good.nii.gz", np.zeros((4, 4, 4), np.int16))
    write_nifti(src / "labels" / "good.nii.gz", np.zeros((4, 4, 4), np.uint8))
    write_nifti(src / "images" / "shifted.nii.gz", np.zeros((4, 4, 4), np.int16))
    shifted = np.diag([1.5, 1.5, 5.0, 1.0])
    shifted[0, 3] = 0.5
    write_nifti(src / "labels" / "shifted.nii.gz", np.zeros((4, 4, 4), np.uint8), shifted)
    write_nifti(src / "images" / "zoomed.nii.gz", np.zeros((4, 4, 4), np.int16))
    write_nifti(src / "labels" / "zoomed.nii.gz", np.zeros((4, 4, 4), np.uint8), np.diag([1.5, 1.5, 5.01, 1.0]))
    summary = ingest_folder(src, tmp_path / "out")
    assert summary["accepted"] == 1
    reasons = {r["source"]: r["reason"] for r in read_report(tmp_path / "out", src)["rejected"]}
    assert "origin differs" in reasons["images/shifted.nii.gz"]
    assert "orientation/spacing differ" in reasons["images/zoomed.nii.gz"]


def test_layout_forced_but_absent(tmp_path):
    write_nifti(tmp_path / "src" / "a.nii.gz", np.zeros((3, 3, 3), np.int16))
    with pytest.raises(IngestError, match="nothing usable"):
        ingest_folder(tmp_path / "src", tmp_path / "out", layout="acdc")


def test_sform_spacing_disagreeing_with_pixdim_uses_pixdim(tmp_path):
    """Like the public ACDC copy: sform with 1 mm columns, real spacing in pixdim (qform_code 0)."""
    src = tmp_path / "nii" / "images"
    src.mkdir(parents=True)
    header = nib.Nifti1Header()
    header.set_data_shape((4, 4, 3))
    header.set_data_dtype(np.int16)
    header.set_sform(np.diag([-1.0, -1.0, 1.0, 1.0]), code=2)
    header.set_qform(None, code=0)
    header.set_zooms((1.5, 1.5, 10.0))
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3), np.int16), None, header=header), str(src / "a.nii.gz"))
    ingest_folder(tmp_path / "nii", tmp_path / "out")
    (case,) = read_manifest(tmp_path / "out").cases
    assert case.spacing == (1.5, 1.5, 10.0)
    np.testing.assert_allclose(nib.load(tmp_path / "out" / case.image).affine, np.diag([-1.5, -1.5, 10.0, 1.0]))

"""DICOM series: slice order, voxel order and affine checked against positions computed by hand."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from conftest import axial_positions, read_json, read_report, slice_value, write_nifti, write_series

from medseg.ingest import ingest_folder
from medseg.common.manifest import read_manifest


def _only_case(out):
    m = read_manifest(out)
    (case,) = m.cases
    img = nib.load(m.image_path(case))
    return m, case, img, np.asanyarray(img.dataobj)


def _world(affine, ijk):
    return (affine @ np.array([*ijk, 1.0]))[:3]


def test_flipped_rows_by_hand(tmp_path):
    """IOP (1,0,0,0,-1,0): the normal is -z, so slices sort by descending z; one voxel checked by hand."""
    positions = axial_positions(5, z0=20.0, step=2.0)  # acquisition slice s at z = 20 + 2 s
    write_series(tmp_path / "src" / "ser", positions, iop=(1, 0, 0, 0, -1, 0), spacing=(0.7, 0.9))
    ingest_folder(tmp_path / "src", tmp_path / "out")
    _, case, img, vol = _only_case(tmp_path / "out")
    assert vol.shape == (3, 4, 5) == tuple(case.shape)  # (columns, rows, slices)
    expected = np.array([[-0.9, 0, 0, 100.0], [0, 0.7, 0, -50.0], [0, 0, -2.0, 28.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(img.affine, expected, atol=1e-5)
    # voxel [2, 1, 3] = column 2, row 1 of the 4th slice along the normal, i.e. z = 22 (acquisition slice 1):
    # LPS = IPP + 2 * 0.9 * (1,0,0) + 1 * 0.7 * (0,-1,0) = (-98.2, 49.3, 22) -> RAS (98.2, -49.3, 22)
    np.testing.assert_allclose(_world(img.affine, (2, 1, 3)), [98.2, -49.3, 22.0], atol=1e-4)
    assert vol[2, 1, 3] == slice_value(1, 1, 2)
    assert case.spacing == pytest.approx((0.9, 0.7, 2.0))


@pytest.mark.parametrize("step", [2.5, -3.0], ids=["head-first", "feet-first"])
def test_axial_every_voxel(tmp_path, step):
    n = 6
    positions = axial_positions(n, z0=10.0, step=step)
    write_series(tmp_path / "src" / "ser", positions, iop=(1, 0, 0, 0, 1, 0), spacing=(0.7, 0.9))
    ingest_folder(tmp_path / "src", tmp_path / "out")
    _, case, img, vol = _only_case(tmp_path / "out")
    assert case.modality == "CT" and vol.dtype == np.int16
    assert img.affine[2, 2] == pytest.approx(abs(step))  # +z normal: ascending z whatever the acquisition order
    for k in range(n):
        s = k if step > 0 else n - 1 - k  # acquisition slice at sorted position k
        for j in range(4):
            for i in range(3):
                lps = np.array(positions[s]) + i * 0.9 * np.array([1, 0, 0]) + j * 0.7 * np.array([0, 1, 0])
                np.testing.assert_allclose(_world(img.affine, (i, j, k)), lps * [-1, -1, 1], atol=1e-4)
                assert vol[i, j, k] == slice_value(s, j, i)


def test_oblique_and_no_preamble(tmp_path):
    theta = np.deg2rad(20)
    row = np.array([np.cos(theta), np.sin(theta), 0.0])
    col = np.array([0.0, 0.0, -1.0])  # coronal-ish oblique
    normal = np.cross(row, col)
    positions = [tuple(np.array([5.0, -7.0, 3.0]) + 4.0 * s * normal) for s in range(4)]
    write_series(tmp_path / "src" / "obl", positions, iop=(*row, *col), modality="MR", preamble=False)
    ingest_folder(tmp_path / "src", tmp_path / "out")
    _, case, img, vol = _only_case(tmp_path / "out")
    assert case.modality == "MR"
    lps = np.array(positions[2]) + 1 * 0.9 * row + 3 * 0.7 * col
    np.testing.assert_allclose(_world(img.affine, (1, 3, 2)), lps * [-1, -1, 1], atol=1e-3)
    assert vol[1, 3, 2] == slice_value(2, 3, 1)


def test_rescale_applied(tmp_path):
    src = tmp_path / "src"
    write_series(src / "int", axial_positions(3), slope=2, intercept=-1024, series_uid="1.2.3.1")
    write_series(src / "flt", axial_positions(3), slope=0.5, intercept=-10, series_uid="1.2.3.2")
    ingest_folder(src, tmp_path / "out")
    m = read_manifest(tmp_path / "out")
    report = {a["source"]: a["case_id"] for a in read_report(tmp_path / "out", src)["accepted"]}
    cases = {c.case_id: c for c in m.cases}
    vol_int = np.asanyarray(nib.load(m.image_path(cases[report["int"]])).dataobj)
    vol_flt = np.asanyarray(nib.load(m.image_path(cases[report["flt"]])).dataobj)
    assert vol_int.dtype == np.int16 and vol_int[2, 1, 0] == 2 * slice_value(0, 1, 2) - 1024
    assert vol_flt.dtype == np.float32 and vol_flt[2, 1, 2] == pytest.approx(0.5 * slice_value(2, 1, 2) - 10)


def test_empty_uids_grouped_by_fallback_key(tmp_path):
    write_series(tmp_path / "src" / "a", axial_positions(4), series_uid="", study_uid="")
    summary = ingest_folder(tmp_path / "src", tmp_path / "out")
    assert summary["accepted"] == 1 and read_manifest(tmp_path / "out").cases[0].shape == (3, 4, 4)


def test_dicom_labels_checked(tmp_path):
    """A label on the series grid is accepted; wrong shape or shifted affine rejects that series only."""
    src = tmp_path / "src"
    positions = axial_positions(4, z0=0.0, step=2.0)
    for n, name in enumerate(["good", "bad_shape", "bad_affine"]):
        write_series(src / "dicom" / name, positions, series_uid=f"1.2.9.{n}", patient_id=f"P{n}")
    affine = np.array([[-0.9, 0, 0, 100.0], [0, -0.7, 0, -50.0], [0, 0, 2.0, 0.0], [0, 0, 0, 1]])
    label = np.zeros((3, 4, 4), np.uint8)
    label[1, 2, 3] = 2
    write_nifti(src / "labels" / "good.nii.gz", label, affine)
    write_nifti(src / "labels" / "bad_shape.nii.gz", np.zeros((4, 3, 4), np.uint8), affine)
    shifted = affine.copy()
    shifted[2, 3] = 1.0
    write_nifti(src / "labels" / "bad_affine.nii.gz", label, shifted)
    (src / "labels.json").write_text('{"0": "background", "1": "pancreas", "2": "tumour"}')
    summary = ingest_folder(src, tmp_path / "out")
    assert summary["accepted"] == 1 and summary["labelled"] == 1
    report = read_report(tmp_path / "out", src)
    assert [a["source"] for a in report["accepted"]] == ["dicom/good"]
    reasons = {r["source"]: r["reason"] for r in report["rejected"]}
    assert set(reasons) == {"dicom/bad_shape", "dicom/bad_affine"}  # labels/ and labels.json are not scanned
    assert "shape" in reasons["dicom/bad_shape"] and "affine" in reasons["dicom/bad_affine"]
    m = read_manifest(tmp_path / "out")
    assert m.labels == {0: "background", 1: "pancreas", 2: "tumour"}
    lab = np.asanyarray(nib.load(m.label_path(m.cases[0])).dataobj)
    assert lab.dtype == np.uint8 and lab[1, 2, 3] == 2 and lab.sum() == 2

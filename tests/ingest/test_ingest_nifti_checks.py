"""NIfTI inputs that would silently give wrong geometry or values are refused, each with a reason; others pass."""

import json

import nibabel as nib
import numpy as np

from conftest import read_report

from medseg.ingest import ingest_folder


def write(path, data, affine, qform=None):
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine if qform is None else qform, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def test_each_bad_nifti_rejected_with_reason_others_kept(tmp_path):
    src = tmp_path / "src"
    affine = np.diag([1.5, 1.5, 5.0, 1.0])
    image = np.random.default_rng(0).normal(100, 10, (16, 12, 4)).astype(np.float32)
    label = np.zeros((16, 12, 4), np.uint8)
    label[4:8, 4:8, 1:3] = 1
    write(src / "images/good.nii.gz", image, affine)
    write(src / "labels/good.nii.gz", label, affine)
    shifted = affine.copy()
    shifted[:3, 3] = [0.0, 0.0, 7.5]
    write(src / "images/qform_disagrees.nii.gz", image, affine, qform=shifted)
    nan_image = image.copy()
    nan_image[0, 0, 0] = np.nan
    write(src / "images/has_nan.nii.gz", nan_image, affine)
    write(src / "images/four_d.nii.gz", np.stack([image, image], -1), affine)
    write(src / "images/label_outside_map.nii.gz", image, affine)
    write(src / "labels/label_outside_map.nii.gz", label * 7, affine)
    nudged = affine.copy()
    nudged[0, 3] += 5e-4  # within tolerance: float noise of a resaved header, not a different grid
    write(src / "images/label_nudged.nii.gz", image, affine)
    write(src / "labels/label_nudged.nii.gz", label, nudged)
    moved = affine.copy()
    moved[0, 3] += 0.5
    write(src / "images/label_moved.nii.gz", image, affine)
    write(src / "labels/label_moved.nii.gz", label, moved)
    (src / "labels.json").write_text(json.dumps({"0": "background", "1": "organ"}))

    summary = ingest_folder(src, tmp_path / "out", layout="nifti")
    report = read_report(tmp_path / "out", src)
    reasons = {r["source"]: r["reason"] for r in report["rejected"]}
    assert summary["accepted"] == 2  # good, label_nudged
    assert "qform and sform disagree" in reasons["images/qform_disagrees.nii.gz"]
    assert "NaN" in reasons["images/has_nan.nii.gz"]
    assert "4D image" in reasons["images/four_d.nii.gz"]
    assert "not in the label map" in reasons["images/label_outside_map.nii.gz"]
    assert "origin differs by 0.5 mm" in reasons["images/label_moved.nii.gz"]
    assert len(reasons) == 5


def test_gzipped_files_read_through_isal_as_nibabel_reads_them(tmp_path):
    """Scaled, big-endian and NIfTI-2 files give nibabel's own values and affine; a cut file is a CaseRejected."""
    import pytest

    from medseg.ingest.common import CaseRejected
    from medseg.ingest.nifti import load_nifti

    data = np.random.default_rng(1).integers(-1000, 2000, (20, 18, 7)).astype(">i2")
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    scaled = nib.Nifti1Image(data, affine)
    scaled.header.set_slope_inter(0.5, -3.0)
    for name, img in (("scaled", scaled), ("nifti2", nib.Nifti2Image(data.astype("<i2"), affine))):
        path = tmp_path / f"{name}.nii.gz"
        nib.save(img, str(path))
        array, got_affine = load_nifti(path)
        expected = np.asanyarray(nib.load(str(path)).dataobj)
        assert array.dtype == expected.dtype and array.dtype.isnative
        np.testing.assert_array_equal(array, expected)
        np.testing.assert_allclose(got_affine, affine)
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes((tmp_path / "scaled.nii.gz").read_bytes()[:-2000])
    with pytest.raises(CaseRejected, match="cannot read image NIfTI"):
        load_nifti(cut)

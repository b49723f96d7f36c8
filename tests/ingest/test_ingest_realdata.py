"""Real public data from ../shared/data (skipped when absent): ACDC, TCIA CT, pydicom's broken-file corpus, dcm2niix."""

from __future__ import annotations

import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest
from conftest import SHARED_DATA, read_json, read_report

from medseg.ingest import ingest_folder
from medseg.ingest.dicom import decoder_problem
from medseg.common.manifest import CARDIAC_LABELS, read_manifest

pytestmark = [pytest.mark.realdata,
              pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real data not found at {SHARED_DATA}")]
DICOM = SHARED_DATA / "dicom"


def test_acdc_five_patients(tmp_path):
    summary = ingest_folder(SHARED_DATA / "acdc", tmp_path / "out")
    assert summary["layout"] == "acdc" and summary["accepted"] == 10 and summary["labelled"] == 10
    m = read_manifest(tmp_path / "out")
    assert m.labels == CARDIAC_LABELS
    assert len({c.subject for c in m.cases}) == 5
    assert {c.group for c in m.cases} == {"DCM", "HCM", "MINF", "NOR", "RV"}
    assert sorted(c.phase for c in m.cases) == ["ED"] * 5 + ["ES"] * 5
    for case in m.cases:
        label = np.asanyarray(nib.load(m.label_path(case)).dataobj)
        assert label.shape == case.shape and set(np.unique(label)) <= {0, 1, 2, 3}
        assert 1.3 < case.spacing[0] < 2.0 and 5.0 <= case.spacing[2] <= 10.0


def test_tcia_pancreas_12_slices(tmp_path):
    summary = ingest_folder(DICOM / "tcia_pancreas_ct_12slices", tmp_path / "out")
    assert summary["accepted"] == 1 and summary["rejected"] == 0
    (case,) = read_manifest(tmp_path / "out").cases
    assert case.shape == (512, 512, 12) and case.modality == "CT"
    assert case.spacing == pytest.approx((0.859375, 0.859375, 1.0))
    img = nib.load(tmp_path / "out" / case.image)
    vol = np.asanyarray(img.dataobj)
    assert vol.dtype == np.int16 and vol.min() < -900 and vol.max() > 200  # HU: air and soft tissue/bone
    assert img.affine[1, 1] > 0 and img.affine[2, 2] < 0  # rows flipped: IOP (1,0,0,0,-1,0), normal -z (LPS)


def test_jpeg2000_empty_uids(tmp_path):
    if decoder_problem("1.2.840.10008.1.2.4.90"):
        pytest.skip("no JPEG 2000 decoder installed")
    summary = ingest_folder(DICOM / "totalsegmentator_ct" / "example_ct_dicom", tmp_path / "out")
    assert summary["accepted"] == 1
    (case,) = read_manifest(tmp_path / "out").cases
    assert case.shape == (512, 512, 20) and case.spacing == pytest.approx((0.9765625, 0.9765625, 2.0))


def test_pydicom_corpus_does_not_crash(tmp_path):
    summary = ingest_folder(DICOM / "pydicom_testfiles", tmp_path / "out")
    assert summary["accepted"] >= 1 and summary["rejected"] > 30
    report = read_report(tmp_path / "out", DICOM / "pydicom_testfiles")
    reasons = {r["source"]: r["reason"] for r in report["rejected"]}
    assert all(r["reason"] for r in report["rejected"])
    assert "RTSTRUCT" in reasons["test_files/rtstruct.dcm"]
    assert "non-uniform" in reasons["test_files/dicomdirtests/77654033/CT2"]  # the 202 mm gap
    assert "inconsistent ImageOrientationPatient" in reasons["test_files/dicomdirtests/98892001/CT2N"]
    assert "DICOMDIR" in reasons["test_files/dicomdirtests/DICOMDIR"]
    assert reasons["LICENSE.txt"] == "not a DICOM file"


@pytest.mark.skipif(shutil.which("dcm2niix") is None, reason="dcm2niix not installed")
@pytest.mark.parametrize("series", ["dcmqi/ct-3slice", "dcmqi/prostate_adc_701-ADCb500"])
def test_same_geometry_as_dcm2niix(tmp_path, series):
    """Our volume and dcm2niix's agree voxel for voxel once both are put in closest-canonical orientation."""
    ingest_folder(DICOM / series, tmp_path / "out")
    (case,) = read_manifest(tmp_path / "out").cases
    subprocess.run(["dcm2niix", "-z", "y", "-f", "ref", "-o", str(tmp_path), str(DICOM / series)], check=True,
                   capture_output=True)
    ref = nib.as_closest_canonical(nib.load(tmp_path / "ref.nii.gz"))
    ours = nib.as_closest_canonical(nib.load(tmp_path / "out" / case.image))
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours.affine, ref.affine, atol=1e-3)
    np.testing.assert_array_equal(np.asanyarray(ours.dataobj), ref.get_fdata())

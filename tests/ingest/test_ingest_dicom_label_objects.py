"""DICOM-SEG and RTSTRUCT objects under SOURCE label the series they reference, through `medseg ingest`."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import read_report

from medseg.ingest import ingest_folder
from medseg.ingest.common import CaseRejected
from medseg.ingest.dicom_label_match import remap_by_name

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "dicom"


def ingested(source: Path, out: Path) -> tuple[dict, dict]:
    ingest_folder(source, out, layout="dicom")
    return (json.loads((out / "manifest.json").read_text()), read_report(out, source))


def test_remap_by_name():
    label = np.array([[0, 1], [2, 1]], np.uint8)
    out = remap_by_name(label, {1: "Liver", 2: "spine"}, {0: "background", 1: "spine", 2: "liver"})
    np.testing.assert_array_equal(out, [[0, 2], [1, 2]])
    with pytest.raises(CaseRejected, match="'kidney' is not in the label map"):
        remap_by_name(label, {1: "kidney"}, {0: "background", 1: "liver"})


@pytest.mark.realdata
@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")
def test_dcmqi_seg_labels_the_ct_series(tmp_path):
    manifest, report = ingested(SHARED / "dcmqi", tmp_path / "out")
    assert manifest["labels"] == {"0": "background", "1": "Liver"}
    ct = [c for c in manifest["cases"] if c["shape"] == [512, 512, 3]]
    assert len(ct) == 1 and ct[0]["label"]
    label = np.asarray(nib.load(str(tmp_path / "out" / ct[0]["label"])).dataobj)
    assert int((label == 1).sum()) == 107098  # voxel count of liver_seg.nrrd on the same grid
    reasons = {r["source"]: r["reason"] for r in report["rejected"]}
    # the other file's name is taken out of the report (file names can identify patients)
    assert reasons["partial_overlaps.dcm"].startswith("not used: <input> (SEG) already labels the same series")


@pytest.mark.realdata
@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")
def test_rtstruct_labels_its_series_and_bad_references_are_reported(tmp_path):
    manifest, report = ingested(SHARED / "rt_utils" / "mock_data", tmp_path / "out")
    assert manifest["labels"] == {"0": "background", "1": "ROI-1"}
    (case,) = manifest["cases"]
    label = np.asarray(nib.load(str(tmp_path / "out" / case["label"])).dataobj)
    assert int((label == 1).sum()) == 1443
    reasons = {r["source"]: r["reason"] for r in report["rejected"]}
    assert "non_existent_reference_rt.dcm" in reasons and "invalid_reference_rt.dcm" in reasons


def test_spacing_tolerance_reaches_the_dicom_reader_from_the_cli(tmp_path, monkeypatch):
    import medseg.ingest as ingest_pkg
    from medseg.cli import main

    seen = {}
    real = ingest_pkg.scan_dicom

    def spy(source, skip, spacing_rel_tol):
        seen["tolerance"] = spacing_rel_tol
        return real(source, skip, spacing_rel_tol)

    monkeypatch.setattr(ingest_pkg, "scan_dicom", spy)
    monkeypatch.setitem(ingest_pkg.READERS, "dicom", spy)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "x.dcm").write_bytes(b"not dicom")
    main(["ingest", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--layout", "dicom",
          "--spacing-tolerance", "0.05"])
    assert seen["tolerance"] == 0.05

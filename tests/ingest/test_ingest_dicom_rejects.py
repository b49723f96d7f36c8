"""Broken, odd and non-image DICOM: each is rejected with a reason while the good series is still ingested."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from conftest import axial_positions, read_json, read_report, write_series
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLosslessSV1, RTStructureSetStorage, generate_uid

from medseg.ingest import ingest_folder
from medseg.ingest.checks import affine_mismatch, as_3d
from medseg.ingest.common import CaseRejected
from medseg.ingest.dicom import decoder_problem


def _rtstruct(path):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTStructureSetStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = RTStructureSetStorage, generate_uid(), "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _recompress_as_jpeg_lossless(paths):
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
        ds.PixelData = encapsulate([b"\xff\xd8not really jpeg\xff\xd9"])
        ds["PixelData"].VR = "OB"
        ds.save_as(path, enforce_file_format=True)


@pytest.fixture
def messy_source(tmp_path):
    src = tmp_path / "src"
    pos = axial_positions(5, step=2.0)
    write_series(src / "good", pos, series_uid="1.9.1")
    write_series(src / "gap", [p for s, p in enumerate(pos) if s != 2], series_uid="1.9.2")
    write_series(src / "dupe", [*pos, pos[3]], series_uid="1.9.3")
    write_series(src / "single", pos[:1], series_uid="1.9.4")
    write_series(src / "sizes", pos[:3], series_uid="1.9.5")
    write_series(src / "sizes", pos[3:], series_uid="1.9.5", rows=5, prefix="y")
    write_series(src / "orient", pos[:3], series_uid="1.9.6")
    write_series(src / "orient", pos[3:], series_uid="1.9.6", iop=(0, 1, 0, 0, 0, -1), prefix="y")
    write_series(src / "tilt", [(x + 0.5 * s, y, z) for s, (x, y, z) in enumerate(pos)], series_uid="1.9.7")
    _recompress_as_jpeg_lossless(write_series(src / "jpeg", pos, series_uid="1.9.8"))
    cut = write_series(src / "cut", pos, series_uid="1.9.9")
    cut[0].write_bytes(cut[0].read_bytes()[:-7])  # cut inside the pixel data
    trunc = write_series(src / "trunc", pos[:2], series_uid="1.9.10")
    trunc[0].write_bytes(trunc[0].read_bytes()[:400])  # cut inside the header
    write_series(src / "mosaic", pos, series_uid="1.9.11", modality="MR",
                 extra={"ImageType": ["ORIGINAL", "PRIMARY", "M", "MOSAIC"]})
    write_series(src / "pet", pos, series_uid="1.9.12", modality="PT")
    _rtstruct(src / "rt" / "rs.dcm")
    (src / "notes").mkdir()
    (src / "notes" / "README.txt").write_text("not dicom\n")
    (src / "notes" / "blob.bin").write_bytes(np.random.default_rng(0).bytes(300))
    return src


def test_each_broken_series_rejected_with_reason(messy_source, tmp_path):
    summary = ingest_folder(messy_source, tmp_path / "out")
    assert summary["layout"] == "dicom" and summary["accepted"] == 1
    report = read_report(tmp_path / "out", messy_source)
    assert [a["source"] for a in report["accepted"]] == ["good"]
    reasons = {r["source"]: r["reason"] for r in report["rejected"]}
    expected = {"gap": "non-uniform slice spacing", "dupe": "duplicate slice positions", "single/x000": "single slice",
                "sizes": "inconsistent Rows/Columns", "orient": "inconsistent ImageOrientationPatient",
                "tilt": "not stacked along the slice normal", "jpeg": "decode", "cut": "cannot be decoded",
                "rt/rs.dcm": "RTSTRUCT references series (none), which is not among the image series", "notes/README.txt": "not a DICOM file",
                "notes/blob.bin": "not a DICOM file", "mosaic": "Siemens mosaic", "pet": "modality PT"}
    for source, words in expected.items():
        assert words in reasons[source], (source, reasons.get(source))
    trunc = [r for s, r in reasons.items() if s.startswith("trunc")]
    assert any("no pixel data" in r for r in trunc)
    if not decoder_problem(JPEGLosslessSV1):
        return
    assert "install" in reasons["jpeg"]


def test_spacing_tolerance_is_a_parameter(tmp_path):
    from medseg.ingest.dicom import scan_dicom

    pos = axial_positions(4, step=2.0)
    pos[3] = (pos[3][0], pos[3][1], pos[3][2] + 0.05)  # 2.5 % longer last step
    write_series(tmp_path / "s", pos)
    assert not scan_dicom(tmp_path, spacing_rel_tol=0.01).items
    assert len(scan_dicom(tmp_path, spacing_rel_tol=0.05).items) == 1


def test_decoder_problem_names_package():
    assert decoder_problem("1.2.840.10008.1.2.1") is None  # uncompressed
    reason = decoder_problem(JPEGLosslessSV1)
    assert reason is None or ("install" in reason and "pylibjpeg" in reason)


def test_checks_units():
    assert as_3d(np.zeros((2, 3, 4, 1))).shape == (2, 3, 4)
    with pytest.raises(CaseRejected, match="4D"):
        as_3d(np.zeros((2, 3, 4, 2)))
    with pytest.raises(CaseRejected, match="2D"):
        as_3d(np.zeros((2, 3)))
    a = np.diag([1.0, 1.0, 2.0, 1.0])
    b = a.copy()
    b[0, 3] = 5e-4
    assert affine_mismatch(a, b) is None
    b[0, 3] = 2e-3
    assert "origin" in affine_mismatch(a, b)

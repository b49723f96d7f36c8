"""``medseg predict --dicom-seg``: the DICOM-SEG references its series, lies on its slices and says what the NIfTI
output says, voxel for voxel, for flipped and oblique series."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medseg.inference import predict
from medseg.cli import main
from medseg.inference.dicom_seg import write_dicom_seg
from medseg.common.errors import StageInputError
from medseg.ingest.dicom_geometry import series_geometry
from medseg.ingest.dicom_headers import read_header
from medseg.ingest.dicom_labels import rasterise_seg
from tests.conftest import write_tiny_volume
from tests.inference.test_sliding_window import CARDIAC, write_folds
from tests.inference.test_predict import rotation

PATIENT = {"PatientName": "Doe^Jane^Q", "PatientID": "MRN-7771234", "PatientBirthDate": "19610203",
           "AccessionNumber": "ACC-99887766"}
SERIES_UID = "1.2.826.0.1.3680043.8.498.4242.1"


# (row direction, column direction) in LPS: axial; left-right flipped with feet-first slices; doubly oblique
ORIENTATIONS = {
    "axial": (np.eye(3), 6.0),
    "flipped": (np.diag([-1.0, 1.0, -1.0]), 6.0),
    "oblique": (rotation(0, 20) @ rotation(2, 15), 7.0),
}


def write_mr_series(folder: Path, name: str, shape=(44, 38, 6), seed: int = 4) -> list[Path]:
    """An MR series of ``shape`` (columns, rows, slices) with tiny-volume blobs, files in shuffled order."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    rot, step = ORIENTATIONS[name]
    row_dir, col_dir, normal = rot[:, 0], rot[:, 1], np.cross(rot[:, 0], rot[:, 1])
    if name == "flipped":
        normal = -normal  # slices written feet-first: acquisition order runs against the normal
    image, _ = write_tiny_volume(seed, shape=shape)
    folder.mkdir(parents=True)
    study, frame = generate_uid(), generate_uid()
    paths = []
    for k in np.random.default_rng(seed).permutation(shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(k), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.update({"SOPClassUID": MRImageStorage, "SOPInstanceUID": meta.MediaStorageSOPInstanceUID, "Modality": "MR",
                   "PatientSex": "F", "StudyInstanceUID": study, "SeriesInstanceUID": SERIES_UID,
                   "FrameOfReferenceUID": frame, "StudyID": "1", "StudyDate": "20240102", "StudyTime": "101010",
                   "ReferringPhysicianName": "", "SeriesNumber": 5, "InstanceNumber": int(k) + 1,
                   "ImageOrientationPatient": [f"{v:.6f}" for v in (*row_dir, *col_dir)],
                   "ImagePositionPatient": [f"{v:.4f}" for v in np.array([-30.0, 12.0, 5.0]) + k * step * normal],
                   "PixelSpacing": ["1.4", "1.4"], "SliceThickness": str(step), "Rows": shape[1],
                   "Columns": shape[0], "SamplesPerPixel": 1, "PhotometricInterpretation": "MONOCHROME2",
                   "BitsAllocated": 16, "BitsStored": 16, "HighBit": 15, "PixelRepresentation": 1, **PATIENT})
        ds.PixelData = np.ascontiguousarray(image[:, :, k].T).astype("<i2").tobytes()  # (rows, columns)
        path = folder / f"{k * 7919 % 1000:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.fixture
def model(tmp_path) -> Path:
    return write_folds(tmp_path / "model", folds=(0, 1))


@pytest.mark.parametrize("name", list(ORIENTATIONS))
def test_dicom_seg_round_trip_matches_the_nifti_output(model, tmp_path, name, caplog):
    files = write_mr_series(tmp_path / "in" / f"{name}_series", name)
    caplog.set_level(logging.DEBUG)
    summary = predict.run(str(model), tmp_path / "in", tmp_path / "out", dicom_seg=True, tta=True)
    (seg_path,) = map(Path, summary["dicom_seg"])
    assert seg_path.name == f"{name}_series.seg.dcm"
    nifti = nib.load(summary["written"][0])
    predicted = np.asarray(nifti.dataobj)
    assert len(np.unique(predicted)) >= 2, "the test needs a prediction with foreground and background"

    # read back with ingest's rasteriser: frames placed by their own plane positions on the series' grid
    geometry = series_geometry([read_header(p) for p in files])
    np.testing.assert_allclose(nifti.affine, geometry.affine, atol=1e-4)
    from_seg, names = rasterise_seg(seg_path, geometry)
    np.testing.assert_array_equal(from_seg, predicted)
    assert names == {1: "RV", 2: "myocardium", 3: "LV"}

    seg = pydicom.dcmread(seg_path)  # a fresh pydicom reads it
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == SERIES_UID
    referenced = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {pydicom.dcmread(p).SOPInstanceUID for p in files}
    source = pydicom.dcmread(files[0])
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID and seg.SeriesInstanceUID != SERIES_UID
    orientation = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    np.testing.assert_allclose([float(v) for v in orientation], [float(v) for v in source.ImageOrientationPatient])
    assert seg.PatientID == PATIENT["PatientID"]  # it goes back to the PACS beside its series
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "medseg"

    logged = caplog.text + str(summary)
    for value in (*PATIENT.values(), "Doe", source.StudyInstanceUID, SERIES_UID):
        assert value not in logged


def test_the_seg_holds_every_class_as_a_segment_even_when_nothing_is_found(tmp_path):
    files = write_mr_series(tmp_path / "series", "axial", shape=(12, 10, 3))
    labels = np.zeros((12, 10, 3), np.uint8)
    labels[2:5, 3:6, 1] = 3
    path = write_dicom_seg(labels, files_in_slice_order(files), CARDIAC, "model", tmp_path / "x.seg.dcm")
    seg = pydicom.dcmread(path)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["RV", "myocardium", "LV"]
    np.testing.assert_array_equal(rasterise_seg(path, series_geometry([read_header(p) for p in files]))[0], labels)
    empty = write_dicom_seg(np.zeros_like(labels), files_in_slice_order(files), CARDIAC, "model",
                            tmp_path / "empty.seg.dcm")
    assert not rasterise_seg(empty, series_geometry([read_header(p) for p in files]))[0].any()


def files_in_slice_order(files: list[Path]) -> tuple[Path, ...]:
    return tuple(h.path for h in series_geometry([read_header(p) for p in files]).headers)


def test_dicom_seg_refuses_labels_it_cannot_name_and_the_wrong_number_of_files(tmp_path):
    files = write_mr_series(tmp_path / "series", "axial", shape=(12, 10, 3))
    labels = np.zeros((12, 10, 3), np.uint8)
    with pytest.raises(StageInputError, match="one single-frame source file per slice"):
        write_dicom_seg(labels, files_in_slice_order(files)[:2], CARDIAC, "m", tmp_path / "a.seg.dcm")
    labels[0, 0, 0] = 7
    with pytest.raises(StageInputError, match=r"label values \[7\]"):
        write_dicom_seg(labels, files_in_slice_order(files), CARDIAC, "m", tmp_path / "a.seg.dcm")
    with pytest.raises(StageInputError, match="numbered 1..N"):
        write_dicom_seg(labels * 0, files_in_slice_order(files), {"0": "bg", "2": "x"}, "m", tmp_path / "a.seg.dcm")
    assert not list(tmp_path.glob("*.seg.dcm"))


def test_dicom_seg_for_a_nifti_input_is_a_clear_error(model, tmp_path, capsys):
    image, _ = write_tiny_volume(1)
    path = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(image, np.diag([1.5, 1.5, 8.0, 1.0])), str(path))
    assert main(["predict", "--model", str(model), str(path), "--out", str(tmp_path / "o"), "--dicom-seg"]) == 1
    captured = capsys.readouterr()
    assert "1 of 1 input(s) failed" in captured.err and "Traceback" not in captured.err
    assert "--dicom-seg needs a DICOM input, this is NIfTI" in captured.out

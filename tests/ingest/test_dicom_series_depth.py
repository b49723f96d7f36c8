"""Harder DICOM series: multi-phase (cine, dynamic) splits, enhanced multi-frame files, repeated instances, non-image
objects, missing slices, and the fast pixel paths against pydicom's own decoding."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pydicom
import pytest
from conftest import axial_positions, slice_value, write_series
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medseg.ingest.common import CaseRejected
from medseg.ingest.dicom import scan_dicom
from medseg.ingest.dicom_geometry import series_geometry
from medseg.ingest.dicom_headers import read_header
from medseg.ingest.dicom_pixels import read_series

ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


def _loaded(scan):
    return {item.source: item.load() for item in scan.items}


def _phase_series(folder, n_pos=4, n_phases=3, tag="TriggerTime", jitter=True):
    """A cine-like series: every position repeated once per phase, one ``write_series`` call per phase."""
    pos = axial_positions(n_pos, step=6.0)
    for p in range(n_phases):
        for s in range(n_pos):  # TriggerTime drifts a few ms from slice to slice within one phase, as on scanners
            value = 40.0 * p + (1.5 * s if jitter and tag == "TriggerTime" else 0) if tag == "TriggerTime" else p + 1
            write_series(folder, [pos[s]], modality="MR", prefix=f"p{p}s{s}_", shuffle_seed=None,
                         intercept=1000 * p, extra={tag: value})


@pytest.mark.parametrize("tag", ["TemporalPositionIdentifier", "TriggerTime", "AcquisitionNumber"])
def test_phases_split_not_merged(tmp_path, tag):
    _phase_series(tmp_path / "cine", tag=tag)
    scan = scan_dicom(tmp_path)
    assert not scan.rejected, scan.rejected
    loaded = _loaded(scan)
    assert len(loaded) == 3 and len({i.case_id for i in scan.items}) == 3
    for p, (source, case) in enumerate(sorted(loaded.items())):
        assert source.startswith("cine (phase ") and f"phase {p + 1} of 3, {tag}" in source
        assert case.image.shape == (3, 4, 4)
        assert case.image[2, 1, 0] == slice_value(0, 1, 2) + 1000 * p  # phase p carries intercept 1000 p
    assert {i.phase for i in scan.items} == {"phase 1 of 3", "phase 2 of 3", "phase 3 of 3"}


def test_unexplained_duplicates_still_rejected(tmp_path):
    _phase_series(tmp_path / "same" / "a", tag="TriggerTime", jitter=False, n_phases=1)
    _phase_series(tmp_path / "same" / "b", tag="TriggerTime", jitter=False, n_phases=1)  # same TriggerTime twice
    scan = scan_dicom(tmp_path)
    assert not scan.items and "duplicate slice positions" in scan.rejected[0]["reason"]


def test_same_instance_copied_twice_counts_once(tmp_path):
    paths = write_series(tmp_path / "a", axial_positions(3))
    (tmp_path / "b").mkdir()
    shutil.copy(paths[0], tmp_path / "b" / "copy.dcm")
    (tmp_path / "0").mkdir()  # sorts before "a": the copy kept is still the one beside the rest of the series
    shutil.copy(paths[1], tmp_path / "0" / "copy.dcm")
    scan = scan_dicom(tmp_path)
    assert not scan.rejected and [i.source for i in scan.items] == ["a"]
    assert _loaded(scan)["a"].image.shape[2] == 3


def write_enhanced_ct(path, positions, iop=(1, 0, 0, 0, 1, 0), spacing=(0.7, 0.9), rows=4, cols=3, order=None,
                      slopes=None, temporal=None):
    """One Enhanced CT file whose frame ``f`` is slice ``order[f]`` (values :func:`slice_value`), per-frame geometry
    and per-frame rescale (slope ``slopes[s]``, intercept -1024), shared orientation and pixel measures; slice ``s``
    has TemporalPositionIndex ``temporal[s]`` when given."""
    n = len(positions)
    order = list(range(n)) if order is None else order
    slopes = [1] * n if slopes is None else slopes
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ENHANCED_CT
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = ENHANCED_CT, ds.file_meta.MediaStorageSOPInstanceUID, "CT"
    ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = "PAT-MF", generate_uid(), generate_uid()
    ds.SeriesNumber, ds.InstanceNumber, ds.ImageType = 5, 1, ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, n
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    shared = Dataset()
    orient, measures = Dataset(), Dataset()
    orient.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
    measures.PixelSpacing, measures.SliceThickness = [f"{v:g}" for v in spacing], "1"
    shared.PlaneOrientationSequence, shared.PixelMeasuresSequence = Sequence([orient]), Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames, data = [], []
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    for s in order:
        item, plane, trans = Dataset(), Dataset(), Dataset()
        plane.ImagePositionPatient = [f"{v:.4f}" for v in positions[s]]
        trans.RescaleSlope, trans.RescaleIntercept, trans.RescaleType = f"{slopes[s]:g}", "-1024", "HU"
        item.PlanePositionSequence, item.PixelValueTransformationSequence = Sequence([plane]), Sequence([trans])
        if temporal is not None:
            content = Dataset()
            content.TemporalPositionIndex = temporal[s]
            item.FrameContentSequence = Sequence([content])
        frames.append(item)
        data.append(slice_value(s, r, c).astype("<i2"))
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = np.stack(data).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_enhanced_ct_same_as_single_frame_series(tmp_path):
    pos = axial_positions(5, step=-2.0)  # feet-first frames, stored shuffled
    write_enhanced_ct(tmp_path / "mf" / "enhanced.dcm", pos, order=[3, 0, 4, 1, 2])
    write_series(tmp_path / "sf", pos, intercept=-1024, series_uid="1.2.3.77")
    loaded = _loaded(scan_dicom(tmp_path))
    mf, sf = loaded["mf/enhanced.dcm"], loaded["sf"]
    np.testing.assert_allclose(mf.affine, sf.affine, atol=1e-6)
    np.testing.assert_array_equal(mf.image, sf.image)
    assert mf.image.dtype == np.int16


def test_enhanced_ct_per_frame_rescale(tmp_path):
    pos = axial_positions(3)
    write_enhanced_ct(tmp_path / "e.dcm", pos, slopes=[1, 2, 0.5])
    (item,) = scan_dicom(tmp_path).items
    image = item.load().image
    for k, slope in enumerate([1, 2, 0.5]):
        assert image[2, 1, k] == pytest.approx(slope * slice_value(k, 1, 2) - 1024)


def test_enhanced_file_with_two_temporal_positions(tmp_path):
    pos = axial_positions(3)
    write_enhanced_ct(tmp_path / "dyn.dcm", pos + pos, temporal=[1, 1, 1, 2, 2, 2], order=[0, 3, 1, 4, 2, 5])
    scan = scan_dicom(tmp_path)
    assert not scan.rejected
    loaded = _loaded(scan)
    assert sorted(loaded) == ["dyn.dcm (phase 1 of 2, TemporalPositionIdentifier 1)",
                              "dyn.dcm (phase 2 of 2, TemporalPositionIdentifier 2)"]
    for p, source in enumerate(sorted(loaded)):
        assert [loaded[source].image[2, 1, k] for k in range(3)] == [slice_value(3 * p + k, 1, 2) - 1024
                                                                      for k in range(3)]


def test_decoder_missing_or_absent_named(monkeypatch):
    import pydicom.pixels

    from medseg.ingest.dicom_pixels import decoder_problem

    assert "no pixel data decoder exists" in decoder_problem("1.2.840.10008.1.2.4.94")  # JPIP referenced

    class Missing:
        is_available = False
        missing_dependencies = ["pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-openjpeg>=2.0",
                                "gdcm - requires gdcm>=3.0.10"]

    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda ts: Missing())
    reason = decoder_problem("1.2.840.10008.1.2.4.90")
    assert reason == ("cannot decode JPEG 2000 Image Compression (Lossless Only) pixel data: install "
                      "pylibjpeg + pylibjpeg-openjpeg or python-gdcm")


NON_IMAGES = {"SR": "1.2.840.10008.5.1.4.1.1.88.22", "RTPLAN": "1.2.840.10008.5.1.4.1.1.481.5",
              "RTDOSE": "1.2.840.10008.5.1.4.1.1.481.2", "ECG": "1.2.840.10008.5.1.4.1.1.9.1.1"}


@pytest.mark.parametrize("modality", sorted(NON_IMAGES))
def test_non_image_objects_named(tmp_path, modality):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = NON_IMAGES[modality]
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = NON_IMAGES[modality], generate_uid(), modality
    ds.SeriesInstanceUID = generate_uid()
    ds.save_as(tmp_path / "obj.dcm", enforce_file_format=True)
    (rejected,) = scan_dicom(tmp_path).rejected
    assert f"{modality} is not an image" in rejected["reason"]


def test_plain_multiframe_rejected_by_name(tmp_path):
    write_series(tmp_path / "m", axial_positions(2), extra={"NumberOfFrames": 2})
    reasons = [r["reason"] for r in scan_dicom(tmp_path).rejected]
    assert reasons and all("multi-frame" in r for r in reasons)


def test_missing_slice_named(tmp_path):
    pos = axial_positions(8, step=2.0)
    write_series(tmp_path / "gap", pos[:3] + pos[5:])
    (rejected,) = scan_dicom(tmp_path).rejected
    assert "non-uniform slice spacing" in rejected["reason"] and "2 missing slices" in rejected["reason"]


@pytest.mark.parametrize("signed", [0, 1])
def test_fast_pixel_path_matches_pydicom(tmp_path, signed):
    """12 bits stored in 16: the frombuffer path masks/sign-extends exactly as pydicom does."""
    paths = write_series(tmp_path / "s", axial_positions(3), rows=2, cols=2, shuffle_seed=None)
    raw = np.array([0xF001, 5, 0x0FFF, 0x1800], "<u2")
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, signed
        ds.PixelData = raw.tobytes()
        ds.save_as(path, enforce_file_format=True)
    expected = pydicom.dcmread(paths[0]).pixel_array.T
    headers = [read_header(p) for p in paths]
    assert all(h.stored is not None for h in headers)  # read straight from the file, without pydicom's decoder
    geometry = series_geometry(headers)
    decoded = series_geometry([dataclasses.replace(h, stored=None) for h in headers])  # the pydicom path
    for workers in (1, 4):
        for vol in (read_series(geometry, workers=workers), read_series(decoded, workers=workers)):
            for k in range(3):
                np.testing.assert_array_equal(vol[:, :, k], expected)


@pytest.mark.parametrize("signed,bits,intercept", [(0, 12, -1024.0), (1, 12, -1024.0), (0, 16, -1024.0),
                                                    (1, 16, 0.0), (0, 15, -32768.0)])
def test_stored_bits_bound_the_output_type_or_the_values_do(tmp_path, signed, bits, intercept):
    """12-bit CT fits int16 by its BitsStored alone (no slice's range is read); where BitsStored does not bound it,
    the values decide (int32 when they need it). Either way the volume equals pydicom's rescaled pixels, the extreme
    stored values included."""
    paths = write_series(tmp_path / "s", axial_positions(3), rows=2, cols=2, intercept=intercept, shuffle_seed=None)
    top = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
    low = -(1 << (bits - 1)) if signed else 0
    stored = np.array([low, top, 0, 7], "<i2" if signed else "<u2")
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, signed
        ds.PixelData = stored.tobytes()
        ds.save_as(path, enforce_file_format=True)
    ds = pydicom.dcmread(paths[0])
    expected = (ds.pixel_array.astype(np.int64) + int(intercept)).T
    headers = [read_header(p) for p in paths]
    assert all(h.stored is not None for h in headers)
    vol = read_series(series_geometry(headers))
    assert vol.dtype == (np.int16 if expected.min() >= -32768 and expected.max() <= 32767 else np.int32)
    for k in range(3):
        np.testing.assert_array_equal(vol[:, :, k], expected)


def test_a_rescale_outside_int16_is_left_to_the_decoding_path(tmp_path):
    """Zero pixels with slope 40000: every value fits int16, but the slope itself does not."""
    paths = write_series(tmp_path / "s", axial_positions(3), rows=2, cols=2, slope=40000.0)
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.PixelData = np.zeros(4, "<u2").tobytes()
        ds.save_as(path, enforce_file_format=True)
    headers = [read_header(p) for p in paths]
    assert all(h.stored is not None and h.stored[3] == 40000.0 for h in headers)
    vol = read_series(series_geometry(headers))
    assert vol.shape == (2, 2, 3) and not vol.any()


def test_pixels_read_straight_from_the_file_equal_pydicoms_rescaled(tmp_path):
    """The direct read of uncompressed slices (offset from the header pass) against pydicom's decoding."""
    paths = write_series(tmp_path / "s", axial_positions(4), rows=5, cols=3, slope=1.0, intercept=-1024.0)
    headers = [read_header(p) for p in paths]
    assert all(h.stored is not None for h in headers)
    direct = read_series(series_geometry(headers))
    decoded = read_series(series_geometry([dataclasses.replace(h, stored=None) for h in headers]))
    assert direct.dtype == decoded.dtype == np.int16
    np.testing.assert_array_equal(direct, decoded)
    for path in paths[:1]:  # a file cut inside its pixels: the decoding path names it, as before
        path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(CaseRejected, match="cannot be decoded"):
        read_series(series_geometry([read_header(p) for p in paths]))


@pytest.mark.parametrize("stored, slope, intercept, dtype", [
    (np.array([[0, 3000]], np.int16), 1.0, -1024.0, np.int16),  # CT: HU in int16
    (np.array([[0, 40000]], np.uint16), 1.0, -32768.0, np.int16),  # fits only after the shift: wraps, then exact
    (np.array([[0, 40000]], np.uint16), 1.0, 0.0, np.int32),
    (np.array([[1, 3]], np.uint16), 2.0, -1.0, np.int16),
    (np.array([[1, 3]], np.uint16), 0.5, 0.0, np.float32),  # a fractional slope (MR, PET): float
    (np.array([[0, 0]], np.uint16), 40000.0, 0.0, np.int16),  # the slope does not fit int16; the values do
])
def test_rescaled_pixels_get_the_smallest_exact_type(stored, slope, intercept, dtype):
    from medseg.ingest.dicom_pixels import _integral_ranges, _output_dtype, _rescale_into

    assert _output_dtype(_integral_ranges([(0, stored, slope, intercept)])) == dtype
    out = np.empty(stored.shape, dtype)
    _rescale_into(out, stored, slope, intercept)
    np.testing.assert_array_equal(out, stored.astype(np.float64) * slope + intercept)

"""DICOM-SEG and RTSTRUCT labels rasterised onto the referenced series grid: real files, synthetic round trips."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import axial_positions, write_series

from medseg.ingest.common import CaseRejected
from medseg.ingest.dicom_geometry import series_geometry
from medseg.ingest.dicom_headers import read_header
from medseg.ingest.dicom_labels import find_label_objects, rasterise_rtstruct, rasterise_seg

DICOM = Path(__file__).resolve().parents[3] / "shared" / "data" / "dicom"


def geometry_of(paths):
    return series_geometry([read_header(Path(p)) for p in paths])


def read_nrrd(path: Path) -> tuple[np.ndarray, dict[str, str]]:
    """A gzip/raw NRRD as an array indexed like its ``sizes`` (first axis fastest), and its header fields."""
    raw = path.read_bytes()
    head, _, body = raw.partition(b"\n\n")
    fields = dict(line.split(": ", 1) for line in head.decode().splitlines()[1:] if ": " in line)
    assert fields["type"] == "short" and fields["endian"] == "little"
    data = gzip.decompress(body) if fields["encoding"] == "gzip" else body
    return np.frombuffer(data, "<i2").reshape([int(s) for s in fields["sizes"].split()], order="F"), fields


# ---------------------------------------------------------------- real files

@pytest.fixture(scope="module")
def ct3():
    return geometry_of(sorted((DICOM / "dcmqi" / "ct-3slice").glob("*.dcm")))


@pytest.mark.realdata
@pytest.mark.skipif(not DICOM.is_dir(), reason="../shared/data is absent")
def test_dcmqi_liver_equals_nrrd_labelmap(ct3):
    labels, names = rasterise_seg(DICOM / "dcmqi" / "liver.dcm", ct3)
    nrrd, fields = read_nrrd(DICOM / "dcmqi" / "liver_seg.nrrd")
    # the NRRD is LPS with +x, +y, +z axes and its origin at the lowest slice: the same (column, row, sorted slice)
    # indexing as our grid, so no reorientation is needed; check that claim against the affine
    assert fields["space"] == "left-posterior-superior"
    origin = [float(v) for v in fields["space origin"].strip("()").split(",")]
    np.testing.assert_allclose(ct3.affine[:3, 3] * [-1, -1, 1], origin, atol=1e-3)
    assert names == {1: "Liver"} and labels.dtype == np.uint8 and labels.shape == (512, 512, 3)
    assert int((labels == 1).sum()) == 107098
    np.testing.assert_array_equal(labels, nrrd)


@pytest.mark.realdata
@pytest.mark.skipif(not DICOM.is_dir(), reason="../shared/data is absent")
def test_dcmqi_partial_overlaps_higher_segment_wins(ct3):
    labels, names = rasterise_seg(DICOM / "dcmqi" / "partial_overlaps.dcm", ct3)
    assert names == {1: "GREEN", 2: "ORANGE", 3: "PURPLE", 4: "LIGHT_BLUE", 5: "DARK_BLUE"}
    # dcmqi split the overlapping segments over three NRRDs; each segment's own mask is (file == number)
    masks = {}
    for n in (1, 2, 3):
        nrrd, _ = read_nrrd(DICOM / "dcmqi" / f"partial_overlaps-{n}.nrrd")
        masks.update({int(v): nrrd == v for v in np.unique(nrrd) if v})
    assert sorted(masks) == [1, 2, 3, 4, 5]
    expected = np.zeros(labels.shape, np.uint8)
    for number in sorted(masks):
        expected[masks[number]] = number
    np.testing.assert_array_equal(labels, expected)
    assert int((labels == 1).sum()) < int(masks[1].sum())  # segment 1 really is overlapped by higher ones


@pytest.mark.realdata
@pytest.mark.skipif(not DICOM.is_dir(), reason="../shared/data is absent")
def test_find_label_objects_real(ct3):
    objs = {o.path.name: o for o in find_label_objects(sorted((DICOM / "dcmqi").glob("*.dcm"))
                                                       + sorted((DICOM / "dcmqi" / "ct-3slice").glob("*.dcm")))}
    assert objs["liver.dcm"].kind == "SEG"
    assert objs["liver.dcm"].series_uid == ct3.headers[0].series_uid
    assert len(objs["liver.dcm"].instance_uids) == 3 and objs["liver.dcm"].names == {1: "Liver"}
    assert objs["partial_overlaps.dcm"].names[5] == "DARK_BLUE"
    assert "01.dcm" not in objs
    rt = {o.path.name: o for o in find_label_objects(sorted((DICOM / "rt_utils").rglob("*.dcm")))}
    assert rt["rt.dcm"].kind == "RTSTRUCT" and len(rt["rt.dcm"].instance_uids) == 2
    assert rt["non_existent_reference_rt.dcm"].series_uid == ""


@pytest.mark.realdata
@pytest.mark.skipif(not DICOM.is_dir(), reason="../shared/data is absent")
def test_rt_utils_phantom_and_bad_references():
    folder = DICOM / "rt_utils" / "mock_data"
    geom = geometry_of(sorted(folder.glob("ct_*.dcm")))
    labels, names = rasterise_rtstruct(folder / "rt.dcm", geom)
    assert names == {1: "ROI-1"}
    # ROI-1: a 24 mm square with an octagonal hole, both on the first slice (z = 60 mm)
    assert labels[:, :, 1].sum() == 0 and int(labels.sum()) == 1443
    centre = np.linalg.solve(geom.affine, [39.0, 39.0, 60.0, 1.0])[:3]  # LPS (-39, -39) -> RAS (39, 39)
    assert labels[tuple(np.round(centre).astype(int))] == 0  # the hole
    corner = np.linalg.solve(geom.affine, [50.0, 50.0, 60.0, 1.0])[:3]
    assert labels[tuple(np.round(corner).astype(int))] == 1
    with pytest.raises(CaseRejected, match="references no image series"):
        rasterise_rtstruct(folder / "non_existent_reference_rt.dcm", geom)
    with pytest.raises(CaseRejected, match=r"563423471\.995\.90|not in series"):
        rasterise_rtstruct(folder / "invalid_reference_rt.dcm", geom)
    other = geometry_of(sorted((DICOM / "dcmqi" / "ct-3slice").glob("*.dcm")))
    with pytest.raises(CaseRejected, match=r"references series 2\.16\.840.*not this series"):
        rasterise_rtstruct(folder / "rt.dcm", other)
    with pytest.raises(CaseRejected, match="references series"):
        rasterise_seg(DICOM / "dcmqi" / "liver.dcm", geom)


# ---------------------------------------------------------------- synthetic series

ROWS, COLS, SLICES = 14, 12, 4
OBLIQUE = (0.9541666, -0.2080757, 0.2151061, 0.2785886, 0.880128, -0.3843997)  # rt_utils' oriented_data IOP
VARIANTS = {"axial": (1, 0, 0, 0, 1, 0), "flipped_rows": (1, 0, 0, 0, -1, 0), "oblique": OBLIQUE}
HIDDEN = {"PatientName": "Test^Synthetic", "PatientBirthDate": "", "PatientSex": "", "StudyDate": "20240101",
          "StudyTime": "120000", "AccessionNumber": "", "ReferringPhysicianName": "", "StudyID": "1",
          "FrameOfReferenceUID": "1.2.826.0.1.3680043.8.498.77", "SliceThickness": "2.5"}


def make_series(folder: Path, iop, step: float = 2.5):
    iop = np.asarray(iop, float)
    normal = np.cross(iop[:3], iop[3:])
    origin = np.array([-20.0, 30.0, 10.0])
    positions = [tuple(origin + s * step * normal) for s in range(SLICES)]
    paths = write_series(folder, positions, iop=tuple(iop), rows=ROWS, cols=COLS, extra=HIDDEN)
    return paths, geometry_of(paths)


def world(geom, h_index: int, i, j) -> np.ndarray:
    """LPS mm of (column i, row j) on sorted slice k, from the slice's own DICOM header (not from the affine)."""
    ds = pydicom.dcmread(geom.headers[h_index].path, stop_before_pixels=True)
    iop, (dr, dc) = np.asarray(ds.ImageOrientationPatient, float), [float(v) for v in ds.PixelSpacing]
    i, j = np.asarray(i, float), np.asarray(j, float)
    return np.asarray(ds.ImagePositionPatient, float) + np.outer(i, iop[:3] * dc) + np.outer(j, iop[3:] * dr)


def write_seg(geom, masks: list[np.ndarray], path: Path, kind: str = "BINARY") -> Path:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    sources = [pydicom.dcmread(h.path) for h in geom.headers]
    # highdicom wants (frames, rows, columns, segments) in source order; ours is (columns, rows, slices)
    pixels = np.stack([m.transpose(2, 1, 0) for m in masks], axis=-1).astype(bool)
    descriptions = [hd.seg.SegmentDescription(
        segment_number=n, segment_label=f"organ{n}", segmented_property_category=codes.SCT.Organ,
        segmented_property_type=codes.SCT.Liver, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for n in range(1, len(masks) + 1)]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues[kind],
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=100,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="medseg", manufacturer_model_name="test",
        software_versions="0", device_serial_number="0", omit_empty_frames=True)
    seg.save_as(path)
    return path


def dataset(**elements):
    """A pydicom Dataset with these elements (the constructor does not take keywords)."""
    from pydicom.dataset import Dataset

    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def write_rtstruct(geom, rois: dict[str, list[tuple[int, np.ndarray]]], path: Path) -> Path:
    """An RTSTRUCT with, per ROI name, contours given as (sorted slice k, (n, 2) voxel (i, j) vertices)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    heads = [pydicom.dcmread(h.path, stop_before_pixels=True) for h in geom.headers]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "RTSTRUCT", generate_uid(), heads[0].StudyInstanceUID

    def image_ref(h):
        return dataset(ReferencedSOPClassUID=h.SOPClassUID, ReferencedSOPInstanceUID=h.SOPInstanceUID)

    series = dataset(SeriesInstanceUID=heads[0].SeriesInstanceUID, ContourImageSequence=Sequence(
        [image_ref(h) for h in heads]))
    study = dataset(ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.1", ReferencedSOPInstanceUID=heads[0].StudyInstanceUID,
                    RTReferencedSeriesSequence=Sequence([series]))
    ds.ReferencedFrameOfReferenceSequence = Sequence([dataset(
        FrameOfReferenceUID=HIDDEN["FrameOfReferenceUID"], RTReferencedStudySequence=Sequence([study]))])
    ds.StructureSetROISequence, ds.ROIContourSequence = Sequence(), Sequence()
    for number, (name, contours) in enumerate(rois.items(), start=1):
        ds.StructureSetROISequence.append(dataset(ROINumber=number, ROIName=name,
                                                  ReferencedFrameOfReferenceUID=HIDDEN["FrameOfReferenceUID"]))
        items = []
        for k, ij in contours:
            pts = world(geom, int(np.floor(k)), ij[:, 0], ij[:, 1])
            if k != int(k):  # a contour between slices: shift it along the normal
                pts = pts + (k - int(k)) * (geom.affine[:3, 2] * [-1, -1, 1])
            items.append(dataset(ContourGeometricType="CLOSED_PLANAR", NumberOfContourPoints=len(pts),
                                 ContourData=[f"{v:.4f}" for v in pts.ravel()],
                                 ContourImageSequence=Sequence([image_ref(heads[int(k)])])))
        ds.ROIContourSequence.append(dataset(ReferencedROINumber=number, ContourSequence=Sequence(items)))
    ds.save_as(path, enforce_file_format=True)
    return path


def square(i0, j0, i1, j1) -> np.ndarray:
    """Vertices on the voxel edges around columns i0..i1 and rows j0..j1 (so the filled voxels are exact)."""
    return np.array([[i0 - 0.5, j0 - 0.5], [i1 + 0.5, j0 - 0.5], [i1 + 0.5, j1 + 0.5], [i0 - 0.5, j1 + 0.5]])


def circle(ci, cj, r, n=72) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.c_[ci + r * np.cos(t), cj + r * np.sin(t)]


@pytest.fixture(params=sorted(VARIANTS))
def series(request, tmp_path):
    return make_series(tmp_path / "ct", VARIANTS[request.param])


def test_seg_round_trip_with_overlap(series, tmp_path):
    _, geom = series
    rng = np.random.default_rng(3)
    a = rng.random(geom.shape) < 0.3
    b = np.zeros(geom.shape, bool)
    b[2:8, 3:9, 1:3] = True  # overlaps a: segment 2 must win there
    a[:, :, 3] = False  # an empty slice: highdicom omits its frame
    labels, names = rasterise_seg(write_seg(geom, [a, b], tmp_path / "seg.dcm"), geom)
    expected = np.where(b, 2, np.where(a, 1, 0)).astype(np.uint8)
    assert names == {1: "organ1", 2: "organ2"}
    np.testing.assert_array_equal(labels, expected)


def test_labelmap_seg_round_trip(tmp_path):
    _, geom = make_series(tmp_path / "ct", VARIANTS["flipped_rows"])
    a, b = np.zeros(geom.shape, bool), np.zeros(geom.shape, bool)
    a[1:5, 2:6, 0:2], b[6:9, 7:12, 1:4] = True, True  # disjoint: a label map cannot store overlaps
    labels, names = rasterise_seg(write_seg(geom, [a, b], tmp_path / "lm.dcm", kind="LABELMAP"), geom)
    assert names == {1: "organ1", 2: "organ2"}
    np.testing.assert_array_equal(labels, np.where(b, 2, np.where(a, 1, 0)))


def test_rtstruct_square_exact_ring_within_one_voxel(series, tmp_path):
    _, geom = series
    ring_outer, ring_inner = circle(5.3, 6.8, 4.6), circle(5.3, 6.8, 2.1)[::-1]
    rt = write_rtstruct(geom, {"square": [(1, square(2, 3, 7, 10))], "ring": [(2, ring_outer), (2, ring_inner)]},
                        tmp_path / "rt.dcm")
    labels, names = rasterise_rtstruct(rt, geom)
    assert names == {1: "square", 2: "ring"}
    expected_square = np.zeros(geom.shape[:2], np.uint8)
    expected_square[2:8, 3:11] = 1
    np.testing.assert_array_equal(labels[:, :, 1], expected_square)
    i, j = np.meshgrid(np.arange(geom.shape[0]), np.arange(geom.shape[1]), indexing="ij")
    dist = np.hypot(i - 5.3, j - 6.8)
    ring = (dist <= 4.6) & (dist >= 2.1)
    wrong = (labels[:, :, 2] == 2) != ring
    assert not np.any(wrong & ((np.abs(dist - 4.6) > 1) & (np.abs(dist - 2.1) > 1)))  # only near the boundary
    assert labels[5, 7, 2] == 0 and labels[5, 7 + 3, 2] == 2  # the hole and the ring itself
    assert not labels[:, :, [0, 3]].any()


def test_rtstruct_contour_between_slices_or_off_grid(tmp_path):
    _, geom = make_series(tmp_path / "ct", VARIANTS["axial"])
    rt = write_rtstruct(geom, {"x": [(1.5, square(2, 2, 4, 4))]}, tmp_path / "between.dcm")
    with pytest.raises(CaseRejected, match="between slices"):
        rasterise_rtstruct(rt, geom)
    rt = write_rtstruct(geom, {"x": [(1, square(40, 40, 44, 44))]}, tmp_path / "off.dcm")
    with pytest.raises(CaseRejected, match="off the image grid"):
        rasterise_rtstruct(rt, geom)


def test_seg_frames_off_grid_and_wrong_series(tmp_path):
    paths, geom = make_series(tmp_path / "ct", VARIANTS["axial"])
    mask = np.zeros(geom.shape, bool)
    mask[3:6, 3:6, :] = True
    seg = write_seg(geom, [mask], tmp_path / "seg.dcm")
    _, other = make_series(tmp_path / "other", VARIANTS["axial"])  # same series UID, other SOP instances
    with pytest.raises(CaseRejected, match="image instance"):
        rasterise_seg(seg, other)
    for p in paths:  # the same instances moved by 0.4 pixel: the SEG frames no longer lie on the grid
        ds = pydicom.dcmread(p)
        ds.ImagePositionPatient = [float(ds.ImagePositionPatient[0]) + 0.4 * float(ds.PixelSpacing[1]),
                                   *ds.ImagePositionPatient[1:]]
        ds.save_as(p)
    with pytest.raises(CaseRejected, match="does not match the image grid"):
        rasterise_seg(seg, geometry_of(paths))


def test_unreadable_and_find_label_objects(tmp_path):
    paths, geom = make_series(tmp_path / "ct", VARIANTS["axial"])
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage")
    with pytest.raises(CaseRejected, match="cannot read"):
        rasterise_seg(bad, geom)
    with pytest.raises(CaseRejected, match="cannot read"):
        rasterise_rtstruct(bad, geom)
    mask = np.zeros(geom.shape, bool)
    mask[1:3, 1:3, 1] = True
    seg = write_seg(geom, [mask], tmp_path / "seg.dcm")
    rt = write_rtstruct(geom, {"x": [(0, square(1, 1, 2, 2))]}, tmp_path / "rt.dcm")
    (tmp_path / "notes.txt").write_text("not dicom")
    found = find_label_objects([*paths, seg, rt, bad, tmp_path / "notes.txt"])
    assert [(o.path.name, o.kind) for o in found] == [("seg.dcm", "SEG"), ("rt.dcm", "RTSTRUCT")]
    assert {o.series_uid for o in found} == {geom.headers[0].series_uid}
    assert len(found[1].instance_uids) == SLICES
    assert found[0].names == {1: "organ1"} and found[1].names == {1: "x"}
    # from the header pass, image headers are skipped without opening the files again
    assert [o.kind for o in find_label_objects([read_header(p) for p in [*paths, seg, rt]])] == ["SEG", "RTSTRUCT"]

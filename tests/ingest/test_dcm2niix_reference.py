"""Our DICOM volumes against the reference converter ``dcm2niix``, voxel for voxel in world space.

Both outputs are put in their closest canonical (RAS) orientation with nibabel; then the shapes must be equal, the
data equal voxel for voxel (dcm2niix's scl_slope/scl_inter applied through ``get_fdata``) and the affines equal within
0.01 mm. Real series from ``../shared/data/dicom`` (skipped when absent) and synthetic axial, oblique, feet-first and
flipped-row series written here.

Real multi-slice volumes dcm2niix writes from ``../shared/data/dicom`` that are NOT compared, and why:
``pydicom_testfiles`` 98892003/MR2 and MR700 (mixed orientations in one series: dcm2niix splits them, we refuse the
series), 77654033/CT2 (a 202 mm gap: dcm2niix writes it with a warning, we refuse it), 4_Scout (45 degree gantry tilt:
we refuse it), the DICOM-SEG objects (labels, not images) and the 2-frame secondary-capture/colour test files (no
patient geometry, dcm2niix says "bogus spatial matrix").
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import write_series

from medseg.ingest.dicom import decoder_problem, scan_dicom

SHARED_DICOM = Path(__file__).resolve().parents[3] / "shared" / "data" / "dicom"
DCM2NIIX = shutil.which("dcm2niix")
AFFINE_TOL_MM = 0.01

pytestmark = pytest.mark.skipif(DCM2NIIX is None, reason="dcm2niix binary not installed (pip install dcm2niix)")


def _dcm2niix(folder: Path, out: Path, check: bool = True) -> list[nib.Nifti1Image]:
    """dcm2niix's 3D volumes of ``folder`` (2D images and 4D series left out), canonical orientation.

    ``check=False`` for trees holding files dcm2niix cannot convert (it then exits non-zero after converting the rest).
    """
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([DCM2NIIX, "-z", "y", "-b", "n", "-f", "%s_%p", "-o", str(out), str(folder)], check=check,
                   capture_output=True, timeout=300)
    imgs = [nib.load(p) for p in sorted(out.glob("*.nii.gz"))]
    return [nib.as_closest_canonical(i) for i in imgs if len(i.shape) == 3 and i.shape[2] > 1]


def _ours(folder: Path) -> dict[str, nib.Nifti1Image]:
    """Our accepted series of ``folder`` (source -> canonical image); a rejection fails the test."""
    scan = scan_dicom(folder)
    out = {}
    for item in scan.items:
        loaded = item.load()
        out[item.source] = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(loaded.image), loaded.affine))
    return out


def _same(ours: nib.Nifti1Image, ref: nib.Nifti1Image) -> None:
    assert ours.shape == ref.shape
    assert np.max(np.abs(ours.affine - ref.affine)) <= AFFINE_TOL_MM, (ours.affine, ref.affine)
    data = np.asanyarray(ours.dataobj)
    if np.issubdtype(data.dtype, np.integer):
        np.testing.assert_array_equal(data.astype(np.float64), ref.get_fdata())
    else:  # float32 stored * slope + intercept: both sides round differently in the last bit of float32
        np.testing.assert_allclose(data, ref.get_fdata(), rtol=2e-7, atol=1e-6 * np.abs(data).max())


def _match(ours: dict[str, nib.Nifti1Image], refs: list[nib.Nifti1Image]) -> None:
    """Every dcm2niix volume equals exactly one of ours, and every one of ours has its dcm2niix volume."""
    assert len(ours) == len(refs), (sorted(ours), [r.shape for r in refs])
    left = dict(ours)
    for ref in refs:
        source = next((s for s, o in left.items() if o.shape == ref.shape
                       and np.max(np.abs(o.affine - ref.affine)) <= AFFINE_TOL_MM), None)
        assert source is not None, f"no series of ours on dcm2niix's grid {ref.shape}\n{ref.affine}"
        _same(left.pop(source), ref)


REAL = ["dcmqi/ct-3slice", "dcmqi/prostate_adc_701-ADCb500", "totalsegmentator_ct/example_ct_dicom",
        "rt_utils/mock_data", "rt_utils/oriented_data", "pydicom_testfiles/test_files/dicomdirtests/98892001/CT5N"]


@pytest.mark.realdata
@pytest.mark.skipif(not SHARED_DICOM.is_dir(), reason=f"real data not found at {SHARED_DICOM}")
@pytest.mark.parametrize("series", REAL)
def test_real_series_equal_dcm2niix(tmp_path, series):
    folder = SHARED_DICOM / series
    if series.startswith("totalsegmentator") and decoder_problem("1.2.840.10008.1.2.4.90"):
        pytest.skip("no JPEG 2000 decoder installed")
    _match(_ours(folder), _dcm2niix(folder, tmp_path / "ref"))


@pytest.mark.realdata
@pytest.mark.skipif(not SHARED_DICOM.is_dir(), reason=f"real data not found at {SHARED_DICOM}")
def test_every_series_we_accept_has_its_dcm2niix_twin(tmp_path):
    """Whole tree at once (so a series that spans folders is seen whole): each volume we accept equals one dcm2niix
    volume, except the TCIA series that dcm2niix splits (compared piece by piece below)."""
    if decoder_problem("1.2.840.10008.1.2.4.90"):
        pytest.skip("no JPEG 2000 decoder installed")
    ours = _ours(SHARED_DICOM)
    assert sorted(ours) == sorted([*REAL, "tcia_pancreas_ct_12slices"])
    refs = _dcm2niix(SHARED_DICOM, tmp_path / "ref", check=False)  # the pydicom corpus has undecodable files
    for source, img in ours.items():
        if source == "tcia_pancreas_ct_12slices":
            continue
        # the dcmqi liver DICOM-SEG lies on exactly the CT's grid, so a grid can hold two dcm2niix volumes
        twins = [r for r in refs if r.shape == img.shape and np.max(np.abs(r.affine - img.affine)) <= AFFINE_TOL_MM]
        assert twins, f"dcm2niix wrote nothing on the grid of {source}"
        errors = []
        for twin in twins:
            try:
                _same(img, twin)
                break
            except AssertionError as err:
                errors.append(err)
        else:
            raise AssertionError(f"{source}: no dcm2niix volume on its grid has its voxels: {errors}")


@pytest.mark.realdata
@pytest.mark.skipif(not SHARED_DICOM.is_dir(), reason=f"real data not found at {SHARED_DICOM}")
def test_tcia_one_series_where_dcm2niix_splits(tmp_path):
    """StudyTime varies per slice, so dcm2niix cuts these 12 slices into pieces; the series is one volume.

    Each dcm2niix piece must be a block of consecutive slices of our volume: same in-plane grid, its first slice at
    our slice ``k``, voxel for voxel equal; together the pieces cover our 12 slices exactly once.
    """
    ours = _ours(SHARED_DICOM / "tcia_pancreas_ct_12slices")
    assert len(ours) == 1
    (vol,) = ours.values()
    assert vol.shape == (512, 512, 12)
    refs = _dcm2niix(SHARED_DICOM / "tcia_pancreas_ct_12slices", tmp_path / "ref")
    assert len(refs) > 1  # if dcm2niix ever stops splitting, the plain comparison above applies
    data, inv = np.asanyarray(vol.dataobj), np.linalg.inv(vol.affine)
    covered = []
    for ref in refs:
        assert ref.shape[:2] == vol.shape[:2]
        np.testing.assert_allclose(ref.affine[:3, :3], vol.affine[:3, :3], atol=AFFINE_TOL_MM)
        ijk = inv @ ref.affine[:, 3]  # dcm2niix's first voxel in our voxel coordinates
        np.testing.assert_allclose(ijk[:3], np.round(ijk[:3]), atol=AFFINE_TOL_MM)
        assert round(ijk[0]) == 0 and round(ijk[1]) == 0
        k = int(round(ijk[2]))
        n = ref.shape[2]
        np.testing.assert_array_equal(data[:, :, k:k + n].astype(np.float64), ref.get_fdata())
        covered += range(k, k + n)
    assert sorted(covered) == list(range(12))


def _rotation(ax: float, ay: float) -> np.ndarray:
    """Rotation by ``ax`` degrees about x, then ``ay`` degrees about y."""
    a, b = np.deg2rad(ax), np.deg2rad(ay)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    return ry @ rx


def _synthetic(kind: str):
    """(IOP, positions, extra tags) of a 7-slice synthetic series of the given kind."""
    row, col = np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
    extra = {"PatientPosition": "HFS"}
    if kind == "oblique":
        rot = _rotation(20, 20)
        row, col = rot @ row, rot @ col
    if kind == "flipped_rows":
        col = -col
    normal = np.cross(row, col)
    step = 2.5
    if kind == "feet_first":
        step, extra = -2.5, {"PatientPosition": "FFS"}
    origin = np.array([-40.0, 25.0, 12.0])
    positions = [tuple(origin + s * step * normal) for s in range(7)]
    return (*row, *col), positions, extra


@pytest.mark.parametrize("kind", ["axial", "oblique", "feet_first", "flipped_rows"])
def test_synthetic_series_equal_dcm2niix(tmp_path, kind):
    iop, positions, extra = _synthetic(kind)
    folder = tmp_path / "src" / kind
    write_series(folder, positions, iop=iop, spacing=(0.8, 0.6), rows=9, cols=11, slope=1, intercept=-1024,
                 extra={"SeriesDescription": kind, **extra})
    ours = _ours(folder)
    refs = _dcm2niix(folder, tmp_path / "ref")
    assert len(ours) == 1 and len(refs) == 1
    _same(next(iter(ours.values())), refs[0])


@pytest.mark.realdata
def test_philips_enhanced_mr_equal_dcm2niix(tmp_path):
    """A real Philips Enhanced MR (176 sagittal frames, per-frame rescale) from nibabel's test data, gunzipped."""
    import gzip

    gz = SHARED_DICOM.parent / "nifti" / "nibabel_testdata" / "nicom" / "philips_mprage.dcm.gz"
    if not gz.is_file():
        pytest.skip(f"{gz} not found")
    folder = tmp_path / "philips"
    folder.mkdir()
    (folder / "mprage.dcm").write_bytes(gzip.decompress(gz.read_bytes()))
    ours = _ours(folder)
    assert [o.shape for o in ours.values()] == [(176, 256, 256)]
    _match(ours, _dcm2niix(folder, tmp_path / "ref"))


def test_synthetic_enhanced_ct_equal_dcm2niix(tmp_path):
    """Frames stored in reverse spatial order. dcm2niix trusts the stored frame order of an enhanced file without a
    DimensionIndexSequence (it takes the slice step from the first and last frames), so shuffled frames, which we sort
    by position (see test_dicom_series_depth), are not compared with it."""
    from test_dicom_series_depth import write_enhanced_ct

    iop, positions, _ = _synthetic("oblique")
    folder = tmp_path / "src"
    write_enhanced_ct(folder / "enhanced.dcm", positions, iop=iop, rows=9, cols=11, order=list(range(7))[::-1])
    _match(_ours(folder), _dcm2niix(folder, tmp_path / "ref"))

"""Tests for the synthetic demo data: ACDC-layout cardiac MR and DICOM CT with NIfTI labels."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy.ndimage import binary_dilation

from medseg.demo import ct as demo_ct

from medseg.demo import demo_data

SEED = 7


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "data"
    summary = demo_data.write(out, seed=SEED, cardiac_patients=2, ct_patients=2, polyp_frames=6)
    assert summary["out"] == str(out) and summary["cardiac_patients"] == 2 and summary["ct_series"] == 2
    assert summary["polyp_frames"] == 6
    assert summary["files"] == sum(1 for p in out.rglob("*") if p.is_file())
    return out


def _info(folder: Path) -> dict[str, str]:
    lines = (folder / "Info.cfg").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if line)


def _frames(folder: Path) -> dict[str, tuple[nib.Nifti1Image, nib.Nifti1Image]]:
    info, name = _info(folder), folder.name
    out = {}
    for phase in ("ED", "ES"):
        stem = folder / f"{name}_frame{int(info[phase]):02d}"
        out[phase] = nib.load(f"{stem}.nii.gz"), nib.load(f"{stem}_gt.nii.gz")
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_info_cfg(demo):
    training = demo / "acdc" / "training"
    assert sorted(p.name for p in training.iterdir()) == ["patient001", "patient002"]
    for folder in training.iterdir():
        info = _info(folder)
        assert set(info) == {"ED", "ES", "Group", "Height", "NbFrame", "Weight"}
        assert info["ED"] == "1" and 1 < int(info["ES"]) <= int(info["NbFrame"])
        assert info["Group"] in demo_data.GROUPS
        assert 140 < float(info["Height"]) < 210 and 40 < float(info["Weight"]) < 130
        es = int(info["ES"])
        expected = {"Info.cfg"} | {f"{folder.name}_frame{f:02d}{s}.nii.gz" for f in (1, es) for s in ("", "_gt")}
        assert {p.name for p in folder.iterdir()} == expected
    ct = demo / "pancreas_ct"
    series = sorted(p.name for p in (ct / "dicom").iterdir())
    assert len(series) == 2
    assert sorted(p.name for p in (ct / "labels").iterdir()) == [f"{s}.nii.gz" for s in series]
    assert json.loads((ct / "labels.json").read_text()) == {"0": "background", "1": "pancreas", "2": "tumour"}


def test_cardiac_labels_geometry_and_contrast(demo):
    shapes = []
    for folder in sorted((demo / "acdc" / "training").iterdir()):
        frames = _frames(folder)
        volumes = {}
        for phase, (img, gt) in frames.items():
            data, lab = np.asarray(img.dataobj), np.asarray(gt.dataobj)
            assert data.dtype == np.int16 and lab.dtype == np.uint8
            assert data.shape == lab.shape and np.allclose(img.affine, gt.affine)
            assert set(np.unique(lab)) == {0, 1, 2, 3}
            assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
            assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
            sx, sy, sz = img.header.get_zooms()
            assert sx == sy and 1.3 <= sx <= 1.8 and 5.0 <= sz <= 10.0 and sz > 3 * sx
            assert 8 <= data.shape[2] <= 12 and 150 <= min(data.shape[:2]) and max(data.shape[:2]) <= 225
            assert data.min() >= 0 and 100 < np.percentile(data, 99) < 2000
            blood, myo = data[lab == 3].mean(), data[lab == 2].mean()
            assert blood > 1.8 * myo  # bright bSSFP blood pool, darker myocardium
            volumes[phase] = {c: int((lab == c).sum()) for c in (1, 2, 3)}
            shapes.append(data.shape)
        assert volumes["ES"][3] < 0.8 * volumes["ED"][3]  # the LV empties at end systole
        assert volumes["ES"][1] < volumes["ED"][1]
    assert shapes[0] != shapes[2]  # matrix and slice count vary per patient


def test_determinism(demo, tmp_path):
    again = tmp_path / "again"
    demo_data.write(again, seed=SEED, cardiac_patients=2, ct_patients=2, polyp_frames=6)
    assert _files(demo) == _files(again)
    other = tmp_path / "other"
    demo_data.write(other, seed=SEED + 1, cardiac_patients=1, ct_patients=1, polyp_frames=0)
    first, second = _files(demo), _files(other)
    cardiac = [k for k in second if k.startswith("acdc") and k.endswith(".nii.gz")]
    assert cardiac and all(first.get(k) != second[k] for k in cardiac)
    dcm = sorted(k for k in second if k.endswith(".dcm"))
    assert dcm and not set(dcm) & set(first)  # random file names differ too


def _series(folder: Path) -> tuple[list[pydicom.Dataset], np.ndarray, np.ndarray]:
    """Datasets sorted along the slice normal, the HU volume [i, j, k] and the affine computed here from scratch."""
    dss = [pydicom.dcmread(p) for p in folder.glob("*.dcm")]
    iop = np.array(dss[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    dss.sort(key=lambda d: float(np.dot(np.array(d.ImagePositionPatient, dtype=float), normal)))
    hu = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in dss], axis=-1)
    hu = hu.transpose(1, 0, 2)  # (rows j, columns i, k) -> [i, j, k]
    first, last = (np.array(d.ImagePositionPatient, dtype=float) for d in (dss[0], dss[-1]))
    row_sp, col_sp = (float(v) for v in dss[0].PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = iop[:3] * col_sp, iop[3:] * row_sp
    lps[:3, 2], lps[:3, 3] = (last - first) / (len(dss) - 1), first
    return dss, hu, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def test_dicom_series_and_labels_agree(demo):
    ct = demo / "pancreas_ct"
    orders = set()
    for folder in sorted((ct / "dicom").iterdir()):
        dss, hu, affine = _series(folder)
        n = len(dss)
        assert 40 <= n <= 70
        names = [Path(d.filename).name for d in dss]
        assert names != sorted(names)  # file names are not in position order
        for d in dss:
            assert d.file_meta.MediaStorageSOPClassUID == pydicom.uid.CTImageStorage == d.SOPClassUID
            assert d.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
            assert d.file_meta.MediaStorageSOPInstanceUID == d.SOPInstanceUID
            assert d.Modality == "CT" and d.BitsAllocated == 16 and d.SamplesPerPixel == 1
            assert float(d.RescaleSlope) == 1 and float(d.RescaleIntercept) == -1024
        assert len({d.SOPInstanceUID for d in dss}) == n and len({d.SeriesInstanceUID for d in dss}) == 1
        assert "DEMO" in str(dss[0].PatientName) and dss[0].PatientID.startswith("MRN") and dss[0].InstitutionName
        instances = [int(d.InstanceNumber) for d in dss]
        assert sorted(instances) == list(range(1, n + 1))
        orders.add(instances[0] < instances[-1])
        positions = np.array([d.ImagePositionPatient for d in dss], dtype=float)
        steps = np.linalg.norm(np.diff(positions, axis=0), axis=1)
        assert np.allclose(steps, float(dss[0].SliceThickness), atol=1e-3)
        assert -1024 <= hu.min() < -900 and 300 < hu.max() <= 3071  # air, bone
        label = nib.load(ct / "labels" / f"{folder.name}.nii.gz")
        lab = np.asarray(label.dataobj)
        assert lab.dtype == np.uint8 and lab.shape == (dss[0].Columns, dss[0].Rows, n)
        assert np.allclose(label.affine, affine, atol=1e-3)
        iop, ipp = dss[0].ImageOrientationPatient, dss[0].ImagePositionPatient
        assert np.allclose(demo_ct.dicom_series_affine(iop, ipp, dss[0].PixelSpacing, steps[0]), affine, atol=1e-3)
        assert {0, 1} <= set(np.unique(lab)) <= {0, 1, 2}
        pancreas = lab == 1
        assert 0 < pancreas.any(axis=(0, 1)).sum() < n  # a subset of slices
        assert 70 < np.median(hu[pancreas]) < 130
        ring = binary_dilation(lab > 0, iterations=3) & (lab == 0)
        assert np.median(hu[ring]) < np.median(hu[pancreas]) - 50  # surrounded by fat
    assert orders == {True, False}  # one series numbered feet to head, one head to feet


def test_atomic_when_generation_fails(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(demo_ct, "write_ct_series", boom)
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError):
        demo_data.write(fresh, seed=1, cardiac_patients=1, ct_patients=1, polyp_frames=0)
    assert not fresh.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "old.txt").write_text("previous run")
    with pytest.raises(RuntimeError):
        demo_data.write(kept, seed=1, cardiac_patients=1, ct_patients=1, polyp_frames=0)
    assert [p.name for p in kept.iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]  # no temporary siblings left


def test_rejects_negative_counts(tmp_path):
    with pytest.raises(ValueError):
        demo_data.write(tmp_path / "x", seed=1, cardiac_patients=-1, ct_patients=0, polyp_frames=0)


def test_does_not_import_torch():
    code = "import sys, medseg.demo.demo_data; assert 'torch' not in sys.modules and 'monai' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_polyp_frames_are_rgb_with_a_polyp_mask_and_grouped_by_sequence(demo):
    from PIL import Image

    images = sorted((demo / "polyp" / "images").glob("*.png"))
    assert [p.name for p in images] == [f"{s}_frame{k}.png" for s in (1, 2) for k in range(3)]
    for path in images:
        image = np.asarray(Image.open(path))
        mask = np.asarray(Image.open(demo / "polyp" / "masks" / path.name))
        assert image.ndim == 3 and image.shape[2] == 3 and mask.shape == image.shape[:2]
        assert set(np.unique(mask)) == {0, 255} and 0.005 < (mask > 0).mean() < 0.5
        polyp, wall = image[mask > 0].mean(0), image[mask == 0].mean(0)
        assert polyp[0] > wall[0]  # redder and brighter than the wall around it

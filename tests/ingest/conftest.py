"""Synthetic inputs for the ingest tests: tiny NIfTI files, ACDC/MSD folders and DICOM series written with pydicom."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"  # /work/main/tests/ingest -> /work/shared/data


@pytest.fixture(autouse=True)
def pseudonym_key(monkeypatch):
    """A pseudonym key from the environment, so no key file is created in the repository."""
    monkeypatch.setenv("MEDSEG_PSEUDONYM_KEY", "ingest-test-key")


def write_nifti(path: Path, array, affine=None) -> Path:
    """Save ``array`` as NIfTI (dtype kept) with ``affine`` (default 1.5 x 1.5 x 5 mm)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([1.5, 1.5, 5.0, 1.0]) if affine is None else affine
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return path


def make_acdc_patient(root: Path, name: str, ed: int = 1, es: int = 7, group: str = "NOR", dtype=np.int16,
                      shape=(8, 7, 4), labels: tuple[str, ...] = ("ED", "ES")) -> Path:
    """An ACDC patient folder: Info.cfg, ED/ES frames (+ ``_gt`` for the phases in ``labels``) and a 4D cine file."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Info.cfg").write_text(f"ED: {ed}\nES: {es}\nGroup: {group}\nHeight: 180.0\nNbFrame: 30\nWeight: 80.0\n")
    rng = np.random.default_rng(len(name))
    for phase, frame in (("ED", ed), ("ES", es)):
        write_nifti(folder / f"{name}_frame{frame:02d}.nii.gz", rng.integers(0, 400, shape).astype(dtype))
        if phase in labels:
            write_nifti(folder / f"{name}_frame{frame:02d}_gt.nii.gz", rng.integers(0, 4, shape).astype(np.uint8))
    write_nifti(folder / f"{name}_4d.nii.gz", np.zeros((*shape, 3), np.int16))
    return folder


def slice_value(s: int, r: int, c: int) -> int:
    """Stored pixel value at (row ``r``, column ``c``) of acquisition slice ``s`` in :func:`write_series`."""
    return 100 * s + 10 * r + c


def write_series(folder: Path, positions, iop=(1, 0, 0, 0, 1, 0), spacing=(0.7, 0.9), rows: int = 4, cols: int = 3,
                 series_uid: str | None = "1.2.826.0.1.3680043.8.498.1", study_uid: str = "1.2.826.0.1.3680043.8.498.2",
                 patient_id: str = "PAT-1", modality: str = "CT", slope: float = 1.0, intercept: float = 0.0,
                 preamble: bool = True, shuffle_seed: int | None = 0, extra: dict | None = None,
                 prefix: str = "x") -> list[Path]:
    """Write one DICOM slice per position under ``folder``, in shuffled order with meaningless names.

    Pixel (row r, column c) of acquisition slice s stores :func:`slice_value` ``(s, r, c)``; InstanceNumber runs
    backwards so that neither file names nor instance numbers give the spatial order.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    order = list(range(len(positions)))
    if shuffle_seed is not None:
        np.random.default_rng(shuffle_seed).shuffle(order)
    paths = []
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    for n, s in enumerate(order):
        ds = Dataset()
        if preamble:
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = sop_class
            ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = generate_uid()
        ds.Modality = modality
        ds.PatientID = patient_id
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid if series_uid is not None else ""
        ds.SeriesNumber = 3
        ds.InstanceNumber = len(positions) - s
        ds.ImageOrientationPatient = [f"{v:g}" for v in iop]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in positions[s]]
        ds.PixelSpacing = [f"{v:g}" for v in spacing]
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
        for key, value in (extra or {}).items():
            setattr(ds, key, value)
        r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        ds.PixelData = slice_value(s, r, c).astype("<i2").tobytes()
        path = folder / f"{prefix}{n * 7919 % 1000:03d}{'.dcm' if n % 2 else ''}"
        if preamble:
            ds.save_as(path, enforce_file_format=True)
        else:
            ds.save_as(path, implicit_vr=False, little_endian=True, enforce_file_format=False)
        paths.append(path)
    return paths


def axial_positions(n: int, z0: float = 10.0, step: float = 2.5, x: float = -100.0, y: float = 50.0):
    """Positions of ``n`` axial slices at ``z0 + s * step`` (a negative ``step`` runs feet-first)."""
    return [(x, y, z0 + s * step) for s in range(n)]


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def read_report(out: Path, src: Path) -> dict:
    """``ingest_report.json`` with each entry's ``input`` key translated back to its path under ``src`` as
    ``source`` (what ``--write-id-map`` lets a user do; the report itself names no path)."""
    from medseg.ingest.common import rel
    from medseg.ingest.privacy import input_key

    src = Path(src).resolve()
    names = {input_key(rel(p, src)): rel(p, src) for p in [src, *src.rglob("*")]}
    report = read_json(Path(out) / "ingest_report.json")
    for entry in report["accepted"] + report["rejected"]:
        assert "source" not in entry
        entry["source"] = names.get(entry["input"], entry["input"])
    return report


def all_written(out: Path) -> list[tuple[str, bytes]]:
    """``(name, bytes)`` of every file under ``out``, gzip members decompressed: what a search for identifiers
    must see."""
    import gzip

    blobs = []
    for path in sorted(p for p in Path(out).rglob("*") if p.is_file()):
        data = path.read_bytes()
        blobs.append((path.name, gzip.decompress(data) if path.name.endswith(".gz") else data))
    return blobs

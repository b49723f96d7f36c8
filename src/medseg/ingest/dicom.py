"""The ``dicom`` layout: a tree of DICOM files (any names, any depth) read series by series.

Labels, optional: ``SOURCE/labels/<SERIES_FOLDER>.nii.gz``, where ``SERIES_FOLDER`` is the name of the folder that
directly holds the series' files, on exactly the grid this module builds (see :mod:`.dicom_geometry`); label names
from ``SOURCE/labels.json`` (``{"0": "background", "1": "pancreas"}``), else ``class_N`` from the values seen.
Intensities are ``stored * RescaleSlope + RescaleIntercept`` (CT in HU): int16 when integral (int32 when out of the
int16 range), else float32. Modality is the DICOM ``Modality`` tag: CT and MR series are read, other modalities rejected; a series
without the tag is guessed from its intensities.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from medseg.ingest.common import CaseRejected, Item, Loaded, Scan, iter_files, modality_name, read_label_json, rel
from medseg.ingest.dicom_geometry import SPACING_REL_TOL, Geometry, series_geometry
from medseg.ingest.dicom_headers import Header, group_series, non_image_reason, quiet_pydicom, read_header
from medseg.ingest.nifti import load_nifti
from medseg.pseudonym import pseudonym

__all__ = ["scan_dicom", "read_series", "decoder_problem"]


def decoder_problem(transfer_syntax) -> str | None:
    """Why pixel data in ``transfer_syntax`` cannot be decoded here (naming the packages to install), or None."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    ts = UID(str(transfer_syntax))
    if not ts or not ts.is_compressed:
        return None
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        return f"no pixel data decoder exists for transfer syntax {ts.name or ts}"
    if decoder.is_available:
        return None
    options = []
    for dep in decoder.missing_dependencies:  # e.g. "pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-openjpeg>=2.0"
        need = dep.split("requires", 1)[-1].strip()
        parts = [p.strip().split(">")[0].split("=")[0] for p in need.split(" and ")]
        options.append(" + ".join("python-gdcm" if p == "gdcm" else p for p in parts))
    return f"cannot decode {ts.name} pixel data: install {' or '.join(options)}"


def _transfer_syntax(ds):
    """The data set's transfer syntax; for a file without file meta, the encoding it was read with (set on it)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = ds.file_meta = FileMetaDataset()
    if not meta.get("TransferSyntaxUID"):
        implicit, little = ds.original_encoding
        meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else \
            ExplicitVRBigEndian if little is False else ExplicitVRLittleEndian
    return meta.TransferSyntaxUID


def _pixels(h: Header, expected: tuple[int, int]) -> tuple[np.ndarray, float, float]:
    import pydicom

    try:
        with quiet_pydicom():
            ds = pydicom.dcmread(h.path, force=h.forced)
    except Exception as err:
        raise CaseRejected(f"{h.path.name}: corrupt or truncated DICOM: {type(err).__name__}: {str(err)[:200]}") \
            from None
    if not any(t in ds for t in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise CaseRejected(f"{h.path.name}: no pixel data")
    ts = _transfer_syntax(ds)
    problem = decoder_problem(ts)
    if problem:
        raise CaseRejected(problem)
    try:
        with quiet_pydicom():
            arr = ds.pixel_array
    except Exception as err:
        raise CaseRejected(f"{h.path.name}: pixel data cannot be decoded (truncated or corrupt?): "
                           f"{type(err).__name__}: {str(err)[:200]}") from None
    if arr.shape != expected:
        raise CaseRejected(f"{h.path.name}: pixel array {arr.shape} does not match Rows/Columns {expected}")
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return arr, slope, intercept


def read_series(geometry: Geometry) -> np.ndarray:
    """Pixel data of a validated series as an (X, Y, Z) = (columns, rows, slices) volume, rescaled.

    Raises:
        CaseRejected: a slice has no pixel data, cannot be decoded, or has the wrong size.
    """
    nx, ny, nz = geometry.shape
    vol = np.empty((nx, ny, nz), dtype=np.float32)
    integral = True
    for k, h in enumerate(geometry.headers):
        arr, slope, intercept = _pixels(h, (ny, nx))
        integral &= slope.is_integer() and intercept.is_integer() and np.issubdtype(arr.dtype, np.integer)
        vol[:, :, k] = (arr.astype(np.float64) * slope + intercept).T
    if integral and vol.min() >= np.iinfo(np.int16).min and vol.max() <= np.iinfo(np.int16).max:
        return vol.astype(np.int16)
    if integral and abs(vol).max() < 2**24:
        return vol.astype(np.int32)
    return vol


def _series_folder(headers: list[Header]) -> Path:
    return Path(os.path.commonpath([str(h.path.parent) for h in headers]))


def _which_files(headers: list[Header], source: Path) -> str:
    """" [N files in K folders: a, b]" or " [N files: x, y, z, ...]" to say which files a rejected series is."""
    if len(headers) == 1:
        return ""
    folders = sorted({rel(h.path.parent, source) for h in headers})
    if len(folders) > 1:
        return f" [{len(headers)} files in {len(folders)} folders: {', '.join(folders[:4])}]"
    names = sorted(h.path.name for h in headers)
    return f" [{len(names)} files: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}]"


def _loader(geometry: Geometry, label_path: Path | None):
    def load() -> Loaded:
        image = read_series(geometry)
        if label_path is None:
            return Loaded(image, geometry.affine)
        label, label_affine = load_nifti(label_path, "label")
        return Loaded(image, geometry.affine, label, label_affine)

    return load


def scan_dicom(source: Path, skip: tuple[Path, ...] = (), spacing_rel_tol: float = SPACING_REL_TOL) -> Scan:
    """Find the DICOM series under ``source``: one header-only pass, then grouping, sorting and geometry checks.

    Files in ``SOURCE/labels/`` and ``SOURCE/labels.json`` are not scanned. Files that are not DICOM or are corrupt are
    rejected one by one; series that fail a check are rejected as a whole (``source`` = the series' folder, or the
    file for a one-file series).
    """
    labels_dir = source / "labels"
    labels = read_label_json(source / "labels.json") if (source / "labels.json").is_file() else None
    scan = Scan(labels=labels)
    files = list(iter_files(source, (*skip, labels_dir, source / "labels.json")))
    headers = []
    for path in tqdm(files, desc="DICOM headers", unit="file", disable=None, leave=False):
        try:
            headers.append(read_header(path))
        except CaseRejected as err:
            scan.reject(rel(path, source), str(err))
    for key, group in group_series(headers).items():
        folder = _series_folder(group)
        where = rel(group[0].path if len(group) == 1 else folder, source)
        reason = next((r for r in map(non_image_reason, group) if r), None)
        modality = group[0].modality
        if not reason and modality not in ("CT", "MR", ""):
            reason = f"modality {modality} is not supported (CT or MR only)"
        try:
            if reason:
                raise CaseRejected(reason)
            geometry = series_geometry(group, spacing_rel_tol)
        except CaseRejected as err:
            scan.reject(where, f"{err}{_which_files(group, source)}")
            continue
        first = group[0]
        subject = pseudonym(first.patient_id or first.study_uid or f"series:{rel(folder, source)}")
        case_id = f"{subject}_{pseudonym(key, prefix='ser', length=6)}"
        label_path = labels_dir / f"{folder.name}.nii.gz"
        scan.items.append(Item(source=where, subject=subject, case_id=case_id,
                               load=_loader(geometry, label_path if label_path.is_file() else None),
                               modality=modality_name(modality) if modality else None))
    return scan

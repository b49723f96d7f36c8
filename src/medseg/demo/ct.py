"""Synthetic abdominal CT as DICOM series, with pancreas (and tumour) labels as NIfTI on the series' own grid.

Layout written under ``root`` (the ingest stage relies on it):

* ``dicom/<SERIES>/<random hex>.dcm``: one folder per series, one CT Image Storage file per slice (Explicit VR Little
  Endian); file names and ``InstanceNumber`` are not in position order, so readers must sort by position.
* ``labels/<SERIES>.nii.gz``: uint8 label (0 background, 1 pancreas, 2 tumour) on the grid of
  :func:`dicom_series_affine`: array index ``[i, j, k]`` is pixel (row ``j``, column ``i``) of the ``k``-th slice
  in ascending order of ``ImagePositionPatient`` projected on the slice normal ``row_cosine x column_cosine``.
* ``labels.json``: ``{"0": "background", "1": "pancreas", "2": "tumour"}``.

Stored pixel values are ``HU + 1024`` (``RescaleIntercept -1024``, ``RescaleSlope 1``). Series vary on purpose:
``index % 4 == 1`` has ``InstanceNumber`` ascending from feet to head (the others from head to feet),
``index % 4 == 2`` a rotated in-plane orientation, ``index % 4 == 3`` signed pixels; ``0`` and ``2`` a tumour.
Patient tags hold realistic-looking fake identifiers that ingestion must not copy.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy.ndimage import gaussian_filter
from scipy.special import expit
from tqdm import tqdm

from medseg.common.atomic_write import save_nifti, write_json

__all__ = ["write_ct_dataset", "write_ct_series", "dicom_series_affine", "CT_LABELS"]

log = logging.getLogger(__name__)

CT_LABELS = {0: "background", 1: "pancreas", 2: "tumour"}
_LAST = ("DOE", "ROE", "MILLER", "GARCIA", "NGUYEN", "SCHMIDT", "ROSSI", "TANAKA")
_FIRST = ("JANE", "JOHN", "MARIA", "AHMED", "LI", "ANNA", "PAUL", "SOFIA")


def dicom_series_affine(orientation, first_position, pixel_spacing, step) -> np.ndarray:
    """RAS voxel-to-world affine of a DICOM series, for arrays indexed ``[column i, row j, slice k]``.

    Args:
        orientation: ``ImageOrientationPatient``: row cosine (direction of increasing column ``i``), then column
            cosine (direction of increasing row ``j``), in LPS.
        first_position: ``ImagePositionPatient`` (LPS, mm) of slice ``k = 0``, the lowest along the slice normal.
        pixel_spacing: ``PixelSpacing`` = (spacing between rows, spacing between columns), mm.
        step: LPS vector from one slice's position to the next, or a scalar distance along the normal.

    Returns:
        4x4 affine; LPS is turned into RAS by negating the x and y rows.
    """
    iop = np.asarray(orientation, dtype=float)
    row, col = iop[:3], iop[3:]
    step = np.asarray(step, dtype=float)
    if step.ndim == 0:
        step = step * np.cross(row, col)
    aff = np.eye(4)
    aff[:3, 0] = row * float(pixel_spacing[1])
    aff[:3, 1] = col * float(pixel_spacing[0])
    aff[:3, 2] = step
    aff[:3, 3] = np.asarray(first_position, dtype=float)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ aff


def _ell(x, y, cx, cy, ax, ay):
    """Approximate signed distance (mm) to an axis-aligned ellipse."""
    r = np.hypot((x - cx) / ax, (y - cy) / ay)
    return (r - 1.0) * min(ax, ay)


def _paint(img, frac, value):
    img *= 1.0 - frac
    img += frac * value


def _bezier(p, t):
    t = t[:, None]
    return (1 - t) ** 3 * p[0] + 3 * (1 - t) ** 2 * t * p[1] + 3 * (1 - t) * t**2 * p[2] + t**3 * p[3]


def _slice(x, y, z, depth, a, rng):
    """HU and labels of one axial slice; ``x, y, z``: LPS mm of each pixel; ``depth``: 0 (top) .. 1 (bottom)."""
    ox, oy = a["origin"]
    pv = a["w"]  # width (mm) of the soft partial-volume boundaries
    soft = lambda d: expit(-d / pv)  # noqa: E731
    hu = np.full(x.shape, -1000.0)
    tex = gaussian_filter(rng.standard_normal(x.shape), 3.0)
    tex /= tex.std() + 1e-9
    bx, by = a["body"]
    _paint(hu, expit(y - (oy + by + 12)) * expit(oy + by + 20 - y) * (np.abs(x - ox) < 200), 60.0)  # table
    _paint(hu, soft(_ell(x, y, ox, oy, bx, by)), -100.0)  # subcutaneous fat
    fat = a["fat"]
    _paint(hu, soft(_ell(x, y, ox, oy, bx - fat, by - fat)), 45.0)  # abdominal wall muscle
    _paint(hu, soft(_ell(x, y, ox, oy, bx - fat - 10, by - fat - 10)), -90.0 + 125.0 * expit(2.5 * tex))  # fat, bowel
    gx, gy = a["gas"]
    _paint(hu, soft(np.hypot(x - ox - gx, y - oy - gy) - 9), -950.0)  # bowel gas
    sy = oy + by - fat - 52  # vertebral body centre
    for sx in (-28.0, 28.0):  # paraspinal muscles
        _paint(hu, soft(_ell(x, y, ox + sx, sy + 38, 22, 18)), 50.0)
    disc = np.cos(2 * np.pi * (z - a["disc_phase"]) / 32.0) > 0.75
    _paint(hu, soft(np.hypot(x - ox, y - sy) - 19), 90.0 if disc else 650.0)  # cortical bone
    _paint(hu, soft(np.hypot(x - ox, y - sy) - 17), 90.0 if disc else 240.0)  # cancellous bone
    _paint(hu, soft(_ell(x, y, ox, sy + 40, 6, 14)), 550.0)  # spinous process
    _paint(hu, soft(np.hypot(x - ox, y - sy - 24) - 7), 20.0)  # spinal canal
    _paint(hu, soft(np.hypot(x - ox - 14, y - sy + 30) - a["aorta"]), a["aorta_hu"])
    _paint(hu, soft(_ell(x, y, ox - 24, sy - 30, 13, 9)), 110.0)  # IVC
    organs = (  # centre offset from the body centre (mm), radii, top and bottom depth, HU
        ((-85, -20), (70, 85), -0.2, 0.75, 60.0), ((88, 30), (28, 48), -0.1, 0.45, 50.0),
        ((48, -60), (42, 30), -0.1, 0.40, 15.0),
        ((-68, sy - oy - 5), (24, 34), 0.30, 0.95, 160.0), ((68, sy - oy - 10), (24, 34), 0.25, 0.90, 160.0),
    )  # liver, spleen, stomach, right and left kidney
    for n, ((cx, cy), (rx, ry), top, bottom, value) in enumerate(organs):
        fz = np.sqrt(max(0.0, 1.0 - ((depth - (top + bottom) / 2) / ((bottom - top) / 2)) ** 2))
        if fz > 0.05:
            d = _ell(x, y, ox + cx, oy + cy, rx * fz, ry * fz)
            _paint(hu, soft(d), value + 6.0 * tex)
            if n >= 3:
                _paint(hu, soft(d + 10 * fz), 20.0)  # renal sinus
    if 0.45 < depth < 0.95:
        _paint(hu, soft(np.hypot(x - ox - 16, y - sy + 50) - 5), 170.0)  # superior mesenteric vessels
    lab = np.zeros(x.shape, np.uint8)
    pts, rad = a["pancreas_pts"], a["pancreas_r"]
    near = np.abs(pts[:, 2] - z) < 1.2 * rad
    if near.any():
        lo, hi = pts[near, :2].min(axis=0) - 25, pts[near, :2].max(axis=0) + 25
        box = (x > lo[0]) & (x < hi[0]) & (y > lo[1]) & (y < hi[1])  # compute the tube only around it
        bx_, by_, sub, sub_tex = x[box], y[box], hu[box], tex[box]
        dn = np.full(bx_.shape, np.inf)  # normalised distance to the tube axis: < 1 inside
        for (px, py, pz), r in zip(pts[near], rad[near]):
            dn = np.minimum(dn, np.sqrt(((bx_ - px) ** 2 + (by_ - py) ** 2) / r**2 + ((z - pz) / (1.1 * r)) ** 2))
        r_mean = float(rad[near].mean())
        _paint(sub, soft((dn - 1.0) * r_mean - 5.0), -95.0)  # peripancreatic fat
        f_p = soft((dn - 1.0) * r_mean)
        _paint(sub, f_p, a["pancreas_hu"] + 12.0 * sub_tex)
        sub_lab = (f_p > 0.5).astype(np.uint8)
        if a["tumour"] is not None:  # hypodense lesion inside the pancreas
            (tx, ty, tz), tr = a["tumour"]
            f_t = soft(np.sqrt((bx_ - tx) ** 2 + (by_ - ty) ** 2 + (z - tz) ** 2) - tr) * (f_p > 0.05)
            _paint(sub, f_t, 45.0)
            sub_lab[(f_t > 0.5) & (sub_lab == 1)] = 2
        hu[box], lab[box] = sub, sub_lab
    return hu, lab


def _dicom_header(ids: dict, geom: dict) -> dict:
    return {
        "SpecificCharacterSet": "ISO_IR 100", "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
        "SOPClassUID": CTImageStorage,
        "StudyDate": ids["date"], "SeriesDate": ids["date"], "AcquisitionDate": ids["date"], "ContentDate": ids["date"],
        "StudyTime": ids["time"], "SeriesTime": ids["time"], "AccessionNumber": ids["accession"], "Modality": "CT",
        "Manufacturer": "MEDSEG DEMO", "InstitutionName": ids["institution"], "ReferringPhysicianName": ids["referrer"],
        "StudyDescription": "CT ABDOMEN PANCREAS PROTOCOL W CONTRAST", "SeriesDescription": "PORTAL VENOUS AXIAL",
        "PatientName": ids["name"], "PatientID": ids["mrn"], "PatientBirthDate": ids["birth"], "PatientSex": ids["sex"],
        "BodyPartExamined": "ABDOMEN", "SliceThickness": geom["thickness"], "KVP": "120", "PatientPosition": "HFS",
        "StudyInstanceUID": ids["study_uid"], "SeriesInstanceUID": ids["series_uid"], "StudyID": ids["study_id"],
        "SeriesNumber": ids["series_number"], "AcquisitionNumber": 1, "ImageOrientationPatient": geom["iop"],
        "FrameOfReferenceUID": ids["for_uid"], "PositionReferenceIndicator": "", "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME2", "Rows": geom["rows"], "Columns": geom["cols"],
        "PixelSpacing": geom["spacing"], "BitsAllocated": 16, "BitsStored": geom["bits_stored"],
        "HighBit": geom["bits_stored"] - 1, "PixelRepresentation": geom["signed"], "WindowCenter": "40",
        "WindowWidth": "400", "RescaleIntercept": "-1024", "RescaleSlope": "1", "RescaleType": "HU",
    }


def _fake_identity(rng: np.random.Generator, uid, index: int) -> dict:
    """Realistic-looking but invented identifiers (the PHI that ingestion must drop) and the series' UIDs."""
    def date(first: int, last: int) -> str:
        return f"{rng.integers(first, last + 1)}{rng.integers(1, 13):02d}{rng.integers(1, 29):02d}"

    return {
        "name": f"{rng.choice(_LAST)}^{rng.choice(_FIRST)}^DEMO{index + 1:03d}",
        "mrn": f"MRN{rng.integers(10**6, 10**7)}",
        "birth": date(1940, 1990), "sex": str(rng.choice(["F", "M"])), "accession": f"ACC{rng.integers(10**7, 10**8)}",
        "institution": "SAINT DEMO GENERAL HOSPITAL", "referrer": f"{rng.choice(_LAST)}^{rng.choice(_FIRST)}",
        "date": date(2019, 2023), "time": f"{rng.integers(7, 19):02d}{rng.integers(0, 60):02d}00",
        "study_id": str(rng.integers(1000, 9999)), "series_number": int(rng.integers(2, 6)),
        "study_uid": uid("study"), "series_uid": uid("series"), "for_uid": uid("for"),
    }


def _ct_anatomy(rng: np.random.Generator, origin: np.ndarray, z_top: float, span: float, tumour: bool) -> dict:
    """Body, organs and a pancreas tube along a cubic Bezier from head (patient right, lower) to tail (left, higher)."""
    ctrl = np.array([[-35, -5, 0.62], [-5, -25, 0.55], [40, -15, 0.47], [75, 5, 0.40]])  # x, y (mm), depth
    ctrl = ctrl + rng.normal(0, [5, 5, 0.03], (4, 3))
    ctrl[:, :2] += origin
    ctrl[:, 2] = z_top - ctrl[:, 2] * span
    t = np.linspace(0, 1, 48)
    pts, rad = _bezier(ctrl, t), rng.uniform(11, 14) - t * rng.uniform(3, 5)
    lesion = (pts[rng.integers(4, 28)] + rng.normal(0, 2, 3), rng.uniform(7, 10)) if tumour else None
    return {"origin": origin, "body": (rng.uniform(135, 160), rng.uniform(105, 125)), "fat": rng.uniform(12, 25),
            "gas": rng.uniform(-40, 40, 2) + np.array([0, -40]), "disc_phase": rng.uniform(0, 32),
            "aorta": rng.uniform(9, 12), "aorta_hu": rng.uniform(150, 200), "pancreas_pts": pts, "pancreas_r": rad,
            "pancreas_hu": rng.uniform(95, 110), "tumour": lesion}


def write_ct_series(root: Path, index: int, seed: int) -> str:
    """Write series ``index`` (0-based) under ``root/dicom/`` and its label under ``root/labels/``.

    Returns:
        The series folder name.
    """
    rng = np.random.default_rng([seed, 2, index])

    def uid(*parts: str) -> str:
        return generate_uid(entropy_srcs=[str(seed), "ct", str(index), *parts])

    folder = f"series{index + 1:03d}"
    rows, cols = int(rng.choice([176, 192])), int(rng.choice([208, 224]))
    ps = round(float(rng.uniform(1.5, 1.8)), 3)
    thickness = float(rng.choice([2.5, 3.0]))
    n = int(rng.integers(40, 71))
    z_top = round(float(rng.uniform(-90, -40)), 1)
    angle = np.deg2rad(rng.uniform(3, 6)) if index % 4 == 2 else 0.0
    r_dir = np.round([np.cos(angle), np.sin(angle), 0.0], 6) + 0.0  # + 0.0 drops negative zeros
    c_dir = np.round([-np.sin(angle), np.cos(angle), 0.0], 6) + 0.0
    centre = rng.uniform(-15, 15, 2) + np.array([0.0, 20.0])
    anat = _ct_anatomy(rng, centre + rng.uniform(-10, 10, 2), z_top, n * thickness, tumour=index % 4 in (0, 2))
    anat["w"] = 0.4 * ps
    sigma = rng.uniform(10, 18)
    ids = _fake_identity(rng, uid, index)
    signed = int(index % 4 == 3)
    geom = {"rows": rows, "cols": cols, "spacing": [ps, ps], "thickness": thickness, "signed": signed,
            "bits_stored": 16 if signed else 12, "iop": [float(v) for v in (*r_dir, *c_dir)]}
    header = _dicom_header(ids, geom)
    jj, ii = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")  # (rows, cols) = [j, i]
    series_dir = root / "dicom" / folder
    series_dir.mkdir(parents=True)
    names = sorted({f"{h:012X}.dcm" for h in rng.integers(0, 2**48, 4 * n)})[:n]
    rng.shuffle(names)
    corner = np.r_[centre, 0.0] - (cols - 1) / 2 * ps * r_dir - (rows - 1) / 2 * ps * c_dir
    positions, labels = [], []
    for k in range(n):  # k = 0 is the top (head end) slice
        pos = np.r_[np.round(corner[:2], 3), round(z_top - k * thickness, 3)]
        x = pos[0] + ii * ps * r_dir[0] + jj * ps * c_dir[0]
        y = pos[1] + ii * ps * r_dir[1] + jj * ps * c_dir[1]
        hu, lab = _slice(x, y, pos[2], k / (n - 1), anat, rng)
        noise = gaussian_filter(rng.standard_normal(hu.shape), 0.5)  # CT noise is slightly correlated
        hu = gaussian_filter(hu, 0.6) + noise * (sigma / noise.std())
        stored = np.clip(np.rint(hu) + 1024, 0, 4095).astype(np.int16 if signed else np.uint16)
        positions.append(pos)
        labels.append(lab)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = uid("sop", str(k))
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = FileDataset(names[k], {}, file_meta=meta, preamble=b"\0" * 128)
        for key, value in header.items():
            setattr(ds, key, value)
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.InstanceNumber = n - k if index % 4 == 1 else k + 1  # series 1, 5, ...: numbered from the feet up
        ds.ImagePositionPatient = [float(v) for v in pos]
        ds.SliceLocation = float(pos[2])
        ds.ContentTime = f"{ids['time'][:4]}{k % 60:02d}"
        ds.PixelData = stored.tobytes()
        ds.save_as(series_dir / names[k], enforce_file_format=True)
    normal = np.cross(r_dir, c_dir)
    order = np.argsort([p @ normal for p in positions])  # label slices ascend along the normal
    vol = np.stack([labels[m].T for m in order], axis=-1)  # [i, j, k]
    step = (positions[order[-1]] - positions[order[0]]) / (n - 1)
    affine = dicom_series_affine(geom["iop"], positions[order[0]], geom["spacing"], step)
    save_nifti(root / "labels" / f"{folder}.nii.gz", vol, affine, np.uint8)
    return folder


def write_ct_dataset(root: Path, seed: int, patients: int) -> int:
    """Write ``patients`` CT series and ``labels.json`` under ``root``; returns the number of series."""
    if patients == 0:
        return 0
    (root / "labels").mkdir(parents=True, exist_ok=True)
    for i in tqdm(range(patients), desc="demo CT", unit="series", disable=None):
        write_ct_series(root, i, seed)
    write_json(root / "labels.json", {str(k): v for k, v in CT_LABELS.items()})
    return patients

"""Synthetic demo data: short-axis cine MR in the ACDC layout and abdominal CT as DICOM series (:mod:`medseg.demo.ct`).

The cardiac part mimics ACDC ``training/patientNNN/`` folders: ``Info.cfg`` plus the ED and ES frames and their
ground truth (``0`` background, ``1`` RV cavity, ``2`` LV myocardium, ``3`` LV cavity). Images are int16 NIfTI,
array axes ``(x, y, slice)`` with slice ``0`` at the base, affine ``diag(-sx, -sy, sz)`` (axis codes L, P, S) as in
ACDC but with the voxel sizes in it. Each patient draws its own matrix, spacing, heart position, rotation, sizes
and shape harmonics; ES has smaller cavities, a thicker wall and a descended base (so its first slice may show
only atria, unlabelled, as in ACDC). Tissue fractions come from soft (sigmoid) boundaries averaged over three depths
per slice (partial volume; the label is the majority of the three), then a smooth bias field and Rician noise are
applied. Intensities are bSSFP-like: blood ~3x myocardium, bright fat, dark lungs; blood ends up around 130-320.
The same ``seed`` gives byte-identical files.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.special import expit
from tqdm import tqdm

from medseg.demo import ct as demo_ct

from medseg.demo import polyp as demo_polyp
from medseg.common.atomic_write import atomic_dir, save_nifti
from medseg.common.params import Params

__all__ = ["run", "write", "write_cardiac_patient", "GROUPS"]

log = logging.getLogger(__name__)

GROUPS = ("NOR", "DCM", "HCM", "MINF", "RV")
# ED cavity radius (mm), wall (mm), ES/ED cavity radius ratio, RV size, RV ES/ED ratio: (low, high) per group.
_GROUP_SHAPE = {
    "NOR": ((24, 28), (7, 9), (0.70, 0.76), (0.95, 1.10), (0.72, 0.80)),
    "DCM": ((31, 37), (5.5, 7), (0.86, 0.92), (1.00, 1.15), (0.80, 0.88)),
    "HCM": ((19, 23), (12, 16), (0.58, 0.66), (0.85, 1.00), (0.70, 0.78)),
    "MINF": ((27, 32), (6, 8.5), (0.82, 0.88), (0.95, 1.10), (0.76, 0.84)),
    "RV": ((22, 26), (7, 9), (0.72, 0.78), (1.30, 1.50), (0.86, 0.92)),
}
# Base intensities (arbitrary MR units before the per-patient gain): bright blood, dark myocardium, bright fat.
_MR = {"air": 6.0, "lung": 16.0, "fat": 250.0, "tissue": 120.0, "liver": 70.0, "myo": 70.0, "blood": 240.0}


def _rot(theta: float) -> np.ndarray:
    return np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])


def _sdist(x, y, centre, radii, theta=0.0, harm=None):
    """Approximate signed distance (mm, negative inside) to a rotated ellipse whose radius carries harmonics.

    ``harm`` is a ``(K, 2)`` array of (amplitude, phase) for the angular orders ``2..K+1``.
    """
    dx, dy = x - centre[0], y - centre[1]
    c, s = np.cos(theta), np.sin(theta)
    u, v = c * dx + s * dy, -s * dx + c * dy
    r, phi = np.hypot(u, v), np.arctan2(v, u)
    a, b = radii
    rho = a * b / np.sqrt((b * np.cos(phi)) ** 2 + (a * np.sin(phi)) ** 2 + 1e-9)
    if harm is not None:
        rho = rho * (1.0 + sum(amp * np.cos((k + 2) * phi + ph) for k, (amp, ph) in enumerate(harm)))
    return r - rho


def _paint(img, frac, value):
    img *= 1.0 - frac
    img += frac * value


def _profile(s: np.ndarray | float) -> np.ndarray:
    """Ventricular radius factor along the long axis: 0.9 at the base (s=0), 1 at s=0.2, 0 at the apex (s=1)."""
    s = np.asarray(s, dtype=float)
    up = 1.0 - 0.1 * ((0.2 - s) / 0.2) ** 2
    down = np.sqrt(np.clip(1.0 - ((s - 0.2) / 0.8) ** 2, 0.0, 1.0))
    return np.where(s < 0.2, up, down) * (s <= 1.0) * (s >= 0.0)


def _patient_anatomy(rng: np.random.Generator, group: str) -> dict:
    """Draw one patient's heart (ED and ES) and surroundings, all in mm."""
    cav, wall, es_ratio, rv_size, rv_es = (rng.uniform(*r) for r in _GROUP_SHAPE[group])
    epi = cav + wall
    es_cav = cav * es_ratio
    es_epi = np.sqrt(es_cav**2 + epi**2 - cav**2)  # the myocardium keeps its volume: thicker wall at ES
    length = rng.uniform(82, 100) * (1.12 if group == "DCM" else 1.0)
    shortening = rng.uniform(0.06, 0.12)  # the base descends towards the apex at ES

    def harm(scale: float) -> np.ndarray:
        return np.stack([rng.normal(0, scale, 3), rng.uniform(0, 2 * np.pi, 3)], axis=1)

    return {
        "frames": {"ED": {"cav": cav, "epi": epi, "rv": rv_size, "length": length},
                   "ES": {"cav": es_cav, "epi": es_epi, "rv": rv_size * rv_es, "length": length * (1 - shortening)}},
        "base_shift": length * shortening, "ecc": rng.uniform(0.88, 1.0), "theta": np.deg2rad(rng.uniform(-30, 30)),
        "drift": rng.normal(0, 4, 2), "rv_end": rng.uniform(0.72, 0.88),
        "rv_k": (rng.uniform(0.7, 0.8), rng.uniform(0.85, 1.0), rng.uniform(1.4, 1.7)),
        "h_endo": (harm(0.035), harm(0.035)), "h_epi": (harm(0.025), harm(0.025)), "h_rv": (harm(0.05), harm(0.05)),
        "papillary": rng.uniform(0, 2 * np.pi, 2) + np.array([0.0, 1.6]), "fat_angle": rng.uniform(0, 2 * np.pi),
        "peri": rng.uniform(3, 6), "contrast": {k: v * rng.uniform(0.9, 1.1) for k, v in _MR.items()},
        "body": (rng.uniform(150, 180), rng.uniform(120, 145)),
    }


def _background(x, y, centre, anat, k, w, rng):
    """One slice of thorax without the heart: body with subcutaneous fat, lungs, liver, descending aorta."""
    con, th = anat["contrast"], anat["theta"]
    R = _rot(th)
    bg = np.full(x.shape, con["air"])
    tex = gaussian_filter(rng.standard_normal(x.shape), 2.5)
    tex /= tex.std() + 1e-9
    d_body = _sdist(x, y, centre + R @ np.array([15.0, 20.0]), anat["body"], th / 2)
    _paint(bg, expit(-d_body / w), con["fat"])
    _paint(bg, expit(-(d_body + 14) / w), con["tissue"] * (1 + 0.12 * tex))
    for off, radii in (((70, 5), (38, 70)), ((-40, -75), (70, 40))):  # lungs
        lung = _sdist(x, y, centre + R @ np.array(off), radii, th)
        _paint(bg, expit(-lung / w), con["lung"] * (1 + 0.4 * np.abs(tex)))
    liver = _sdist(x, y, centre + R @ np.array([-30.0, 95.0 - 3 * k]), (95, 55), th)
    _paint(bg, expit(-liver / w), con["liver"] * (1 + 0.06 * tex))
    aorta = centre + R @ np.array([50.0, 62.0])
    _paint(bg, expit(-(np.hypot(x - aorta[0], y - aorta[1]) - 11) / w), con["blood"] * 0.9)
    return bg


def _heart(x, y, centre, anat, phase, s, img, w):
    """Paint the heart at long-axis position ``s`` (0 base, 1 apex, < 0 atria) into ``img``; return its labels."""
    f, con, th = anat["frames"][phase], anat["contrast"], anat["theta"]
    lab = np.zeros(x.shape, np.uint8)
    c = centre + anat["drift"] * s
    u_rv = _rot(th) @ np.array([-0.96, 0.28])
    if s < 0:  # above the valve plane: atria and aortic root, unlabelled
        fade = np.sqrt(max(0.0, 1.0 - (s / 0.45) ** 2))
        la, ra, ao = -0.45 * f["epi"] * u_rv, 1.2 * f["epi"] * u_rv, _rot(th) @ np.array([-0.3, -0.9]) * f["epi"]
        for off, (ra_, rb_) in ((la, (0.75 * f["cav"], 0.55 * f["cav"])), (ao, (12.0, 12.0)),
                                (ra, (0.7 * f["cav"] * f["rv"], 0.5 * f["cav"] * f["rv"]))):
            d = _sdist(x, y, c + off, (ra_ * fade + 1e-3, rb_ * fade + 1e-3), th)
            _paint(img, expit(-(d - 1.5) / w), con["tissue"])  # thin atrial wall: no dark ring as around the LV
            _paint(img, expit(-d / w), con["blood"] * 0.95)
        return lab
    g = float(_profile(s))
    L = f["length"]
    s_cav = 1.0 - 0.8 * (f["epi"] - f["cav"]) / L
    g_cav = float(_profile(s / s_cav)) if s < s_cav else 0.0
    g_rv = max(0.0, 1.0 - (s / anat["rv_end"]) ** 2) ** 0.35

    def mix(h: tuple[np.ndarray, np.ndarray]) -> np.ndarray:  # shape harmonics drift from base to apex
        return h[0] * (1 - s) + h[1] * s

    kd, ka, kb = anat["rv_k"]
    rv_c = c + kd * f["epi"] * g * u_rv
    rv_r = (ka * f["epi"] * f["rv"] * g * g_rv + 1e-3, kb * f["epi"] * f["rv"] * g * g_rv + 1e-3)
    d_rv = _sdist(x, y, rv_c, rv_r, np.arctan2(u_rv[1], u_rv[0]), mix(anat["h_rv"]))
    epi_r = (f["epi"] * g + 1e-3, f["epi"] * g * anat["ecc"] + 1e-3)
    d_epi = _sdist(x, y, c, epi_r, th, mix(anat["h_epi"]))
    peri = con["fat"] * (0.6 + 0.12 * np.cos(np.arctan2(y - c[1], x - c[0]) - anat["fat_angle"]))
    _paint(img, expit(-(np.minimum(d_epi, d_rv) - anat["peri"]) / w), peri)  # epicardial fat and pericardium
    _paint(img, expit(-(d_rv - 2.5) / w), con["myo"])  # RV free wall
    f_rv = expit(-d_rv / w)
    _paint(img, f_rv, con["blood"] * 0.93)
    f_epi = expit(-d_epi / w)
    _paint(img, f_epi, con["myo"])
    lab[(f_rv > 0.5) & (f_epi <= 0.5)] = 1
    lab[f_epi > 0.5] = 2
    if g_cav > 0:
        cav_r = (f["cav"] * g_cav, f["cav"] * g_cav * anat["ecc"])
        d_cav = _sdist(x, y, c, cav_r, th, mix(anat["h_endo"]))
        f_cav = expit(-d_cav / w)
        _paint(img, f_cav, con["blood"])
        for a in anat["papillary"]:  # papillary muscles: dark, but labelled LV cavity as in ACDC
            p = c + 0.62 * cav_r[0] * np.array([np.cos(th + a), np.sin(th + a)])
            _paint(img, f_cav * expit(-(np.hypot(x - p[0], y - p[1]) - 0.16 * cav_r[0]) / w), con["myo"] * 1.8)
        lab[f_cav > 0.5] = 3
    return lab


def write_cardiac_patient(root: Path, index: int, seed: int) -> list[Path]:
    """Write ``root/patientNNN/`` (Info.cfg, ED and ES images and labels) for patient ``index`` (0-based).

    Returns:
        The paths written.
    """
    rng = np.random.default_rng([seed, 1, index])
    name = f"patient{index + 1:03d}"
    group = GROUPS[index % len(GROUPS)]
    anat = _patient_anatomy(rng, group)
    nx, ny = int(rng.integers(160, 225)), int(rng.integers(150, 221))
    sxy = round(float(rng.uniform(1.3, 1.8)), 4)
    sz = float(rng.choice([8.0, 10.0], p=[0.3, 0.7]))
    nz = int(np.clip(round(anat["frames"]["ED"]["length"] / sz) + 1, 8, 12))
    z_base = -rng.uniform(0.0, 0.5) * sz  # slice 0 sits at or just below the base
    x, y = np.meshgrid(np.arange(nx) * sxy, np.arange(ny) * sxy, indexing="ij")
    centre = np.array([nx, ny]) * sxy * (0.5 + rng.uniform(-0.1, 0.1, 2))
    lo, hi = np.floor((centre - 100) / sxy).astype(int).clip(0), np.ceil((centre + 100) / sxy).astype(int)
    win = (slice(lo[0], hi[0]), slice(lo[1], hi[1]))  # the heart lies within 100 mm of its centre
    con, w = anat["contrast"], 0.35 * sxy  # w: width (mm) of the soft partial-volume boundaries
    xn, yn = (x / x.max() * 2 - 1)[..., None], (y / y.max() * 2 - 1)[..., None]
    bias_c = rng.normal(0, 0.15, 6)
    backgrounds = [_background(x, y, centre, anat, k, w, rng) for k in range(nz)]  # only the heart moves
    info = {"ED": 1, "NbFrame": int(rng.choice([20, 25, 28, 30]))}
    info["ES"] = int(round(info["NbFrame"] * rng.uniform(0.3, 0.45))) + 1
    gain, noise = rng.uniform(0.55, 1.3), rng.uniform(0.03, 0.055)
    affine = np.diag([-sxy, -sxy, sz, 1.0])
    affine[:3, 3] = [nx * sxy / 2, ny * sxy / 2, -nz * sz / 2] + rng.normal(0, 20, 3).round(2)
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for phase in ("ED", "ES"):
        fr = anat["frames"][phase]
        base = z_base + (anat["base_shift"] if phase == "ES" else 0.0)
        img, lab = np.zeros((nx, ny, nz)), np.zeros((nx, ny, nz), np.uint8)
        for k in range(nz):
            labs = []
            for dz in (-0.3, 0.0, 0.3):  # through-plane partial volume: three depths per slice, majority label
                sl = backgrounds[k].copy()
                labs.append(_heart(x[win], y[win], centre, anat, phase, (k * sz + dz * sz - base) / fr["length"],
                                   sl[win], w))
                img[:, :, k] += sl / 3.0
            lab[win + (k,)] = np.where(labs[0] == labs[2], labs[0], labs[1])
            img[:, :, k] = gaussian_filter(img[:, :, k], 0.5)
        zn = np.linspace(-1, 1, nz)[None, None, :]
        bias = np.exp(bias_c[0] * xn + bias_c[1] * yn + bias_c[2] * xn**2 + bias_c[3] * yn**2 + bias_c[4] * xn * yn
                      + bias_c[5] * zn)  # smooth multiplicative coil sensitivity
        sigma = noise * con["blood"]
        img = np.hypot(img * bias + rng.normal(0, sigma, img.shape), rng.normal(0, sigma, img.shape)) * gain  # Rician
        stem = folder / f"{name}_frame{info[phase]:02d}"
        written.append(save_nifti(f"{stem}.nii.gz", np.clip(np.rint(img), 0, 32767), affine, np.int16))
        written.append(save_nifti(f"{stem}_gt.nii.gz", lab, affine, np.uint8))
    height, weight = float(rng.integers(150, 196)), float(rng.integers(50, 111))
    cfg = folder / "Info.cfg"
    fields = {"ED": info["ED"], "ES": info["ES"], "Group": group, "Height": height, "NbFrame": info["NbFrame"],
              "Weight": weight}
    cfg.write_text("".join(f"{k}: {v}\n" for k, v in fields.items()))
    return [cfg, *written]


def run(params: Params) -> dict:
    """The demo_data stage: :func:`write` to ``paths.demo`` with the ``demo`` params (seed and counts)."""
    demo = params.demo
    return write(Path(params.paths.demo), seed=demo.seed, cardiac_patients=demo.cardiac_patients,
                 ct_patients=demo.ct_patients, polyp_frames=demo.polyp_frames)


def write(out_dir: Path, *, seed: int, cardiac_patients: int, ct_patients: int, polyp_frames: int) -> dict:
    """Write the demo data set to ``out_dir`` (replaced whole and atomically).

    Layout: ``out_dir/acdc/training/patientNNN/`` (see module doc), ``out_dir/pancreas_ct/{dicom,labels}``
    (see :mod:`medseg.demo.ct`) and ``out_dir/polyp/{images,masks}`` (2D RGB frames, :mod:`medseg.demo.polyp`).

    Args:
        out_dir: folder to (re)create.
        seed: non-negative seed; equal seeds give byte-identical files.
        cardiac_patients: number of ACDC-style patients (groups cycle through NOR, DCM, HCM, MINF, RV).
        ct_patients: number of CT series.
        polyp_frames: number of colonoscopy frames (in sequences of three).

    Returns:
        ``{"out", "cardiac_patients", "ct_series", "polyp_frames", "files"}``.
    """
    if min(seed, cardiac_patients, ct_patients, polyp_frames) < 0:
        raise ValueError(f"seed and counts must be >= 0, got {seed}, {cardiac_patients}, {ct_patients}, "
                         f"{polyp_frames}")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        training = tmp / "acdc" / "training"
        training.mkdir(parents=True)
        for i in tqdm(range(cardiac_patients), desc="demo cardiac MR", unit="patient", disable=None):
            write_cardiac_patient(training, i, seed)
        ct_series = demo_ct.write_ct_dataset(tmp / "pancreas_ct", seed, ct_patients)
        if polyp_frames:
            demo_polyp.write_polyp_dataset(tmp / "polyp", seed, polyp_frames)
        files = sum(1 for p in tmp.rglob("*") if p.is_file())
    log.info("demo data: %d cardiac patients, %d CT series, %d polyp frames, %d files in %s", cardiac_patients,
             ct_series, polyp_frames, files, out_dir)
    return {"out": str(out_dir), "cardiac_patients": cardiac_patients, "ct_series": ct_series,
            "polyp_frames": polyp_frames, "files": files}

"""Slice order and the voxel-to-world affine of a DICOM series, from its headers only.

Slices are sorted by ImagePositionPatient projected on the slice normal (row cosine x column cosine), never by file
name or InstanceNumber. NIfTI index ``[i, j, k]`` is pixel (row ``j``, column ``i``) of sorted slice ``k``, so the
affine's columns are ``row_cosine * PixelSpacing[1]``, ``column_cosine * PixelSpacing[0]`` and ``normal * step``,
its origin the first sorted slice's position; LPS (DICOM) is turned into RAS (NIfTI) by negating the first two rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medseg.ingest.common import CaseRejected
from medseg.ingest.dicom_headers import Header

__all__ = ["SPACING_REL_TOL", "DUPLICATE_TOL_MM", "ORIENTATION_TOL", "Geometry", "series_geometry", "LPS_TO_RAS"]

SPACING_REL_TOL = 0.01  # slice steps may differ from their median by this fraction
DUPLICATE_TOL_MM = 1e-3  # slices closer than this along the normal are duplicates
ORIENTATION_TOL = 1e-3  # direction cosines and pixel spacing must agree this closely within a series
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Geometry:
    """A validated series: headers in slice order, the RAS affine and the (X, Y, Z) = (columns, rows, slices) shape."""

    headers: tuple[Header, ...]
    affine: np.ndarray
    shape: tuple[int, int, int]


def _same(values: list[tuple[float, ...]], tol: float) -> bool:
    arr = np.asarray(values, dtype=np.float64)
    return bool(np.all(np.abs(arr - arr[0]) <= tol))


def series_geometry(headers: list[Header], spacing_rel_tol: float = SPACING_REL_TOL) -> Geometry:
    """Sort a series' slices and build its affine.

    Args:
        headers: the headers of one series (any order); each must have Rows, Columns, IOP, IPP and PixelSpacing.
        spacing_rel_tol: largest allowed relative deviation of a slice step from the median step.

    Raises:
        CaseRejected: single slice, inconsistent size/orientation/spacing, duplicate positions, non-uniform steps,
            or slices not stacked along the normal (gantry tilt).
    """
    n = len(headers)
    if n < 2:
        raise CaseRejected("single slice: a 3D volume needs at least 2 slices")
    numbers = np.asarray([(*h.iop, *h.ipp, *h.pixel_spacing) for h in headers], dtype=np.float64)
    if not np.all(np.isfinite(numbers)) or np.any(numbers[:, 9:] <= 0):
        raise CaseRejected("non-finite ImagePositionPatient/ImageOrientationPatient or non-positive PixelSpacing")
    sizes = {(h.rows, h.columns) for h in headers}
    if len(sizes) > 1:
        raise CaseRejected(f"inconsistent Rows/Columns within the series: {sorted(sizes)}")
    if not _same([h.iop for h in headers], ORIENTATION_TOL):
        raise CaseRejected("inconsistent ImageOrientationPatient within the series (mixed orientations)")
    if not _same([h.pixel_spacing for h in headers], ORIENTATION_TOL):
        raise CaseRejected("inconsistent PixelSpacing within the series")
    iop = np.asarray(headers[0].iop, dtype=np.float64)
    row_cos, col_cos = iop[:3], iop[3:]
    normal = np.cross(row_cos, col_cos)
    if np.linalg.norm(normal) < 0.5:
        raise CaseRejected("ImageOrientationPatient row and column directions are not orthogonal unit vectors")
    normal /= np.linalg.norm(normal)
    positions = np.asarray([h.ipp for h in headers], dtype=np.float64)
    proj = positions @ normal
    order = np.argsort(proj, kind="stable")
    proj, positions = proj[order], positions[order]
    steps = np.diff(proj)
    dupes = int(np.count_nonzero(steps < DUPLICATE_TOL_MM))
    if dupes:
        raise CaseRejected(f"duplicate slice positions ({dupes} of {n} slices share a position: several "
                           "acquisitions, echoes or phases in one series?)")
    step = float(np.median(steps))
    if np.max(np.abs(steps - step)) > spacing_rel_tol * step:
        raise CaseRejected(f"non-uniform slice spacing: steps {steps.min():.4g}-{steps.max():.4g} mm "
                           f"(tolerance {spacing_rel_tol:.0%}; missing slices?)")
    lateral = np.diff(positions, axis=0) - np.outer(steps, normal)
    if np.max(np.linalg.norm(lateral, axis=1)) > max(spacing_rel_tol * step, 1e-3):
        raise CaseRejected("slices are not stacked along the slice normal (gantry tilt or sheared series)")
    row_spacing, col_spacing = headers[0].pixel_spacing  # PixelSpacing = (between rows, between columns)
    lps = np.eye(4)
    lps[:3, 0] = row_cos * col_spacing
    lps[:3, 1] = col_cos * row_spacing
    lps[:3, 2] = normal * step
    lps[:3, 3] = positions[0]
    sorted_headers = tuple(headers[i] for i in order)
    return Geometry(sorted_headers, LPS_TO_RAS @ lps, (int(headers[0].columns), int(headers[0].rows), n))

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

__all__ = ["SPACING_REL_TOL", "DUPLICATE_TOL_MM", "ORIENTATION_TOL", "Geometry", "series_geometry", "LPS_TO_RAS",
           "PHASE_TAGS", "split_phases"]

SPACING_REL_TOL = 0.01  # slice steps may differ from their median by this fraction
DUPLICATE_TOL_MM = 1e-3  # slices closer than this along the normal are duplicates
ORIENTATION_TOL = 1e-3  # direction cosines and pixel spacing must agree this closely within a series
# tags that tell the phases of a multi-phase series apart, in order of trust: AcquisitionNumber last, because some
# scanners number every slice or every stack with it for reasons unrelated to time
PHASE_TAGS = (("temporal_position", "TemporalPositionIdentifier"), ("trigger_time", "TriggerTime"),
              ("acquisition_number", "AcquisitionNumber"))
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
        raise CaseRejected(f"duplicate slice positions ({dupes} of {n} slices share a position, and neither "
                           "TemporalPositionIdentifier, TriggerTime nor AcquisitionNumber tells them apart: several "
                           "echoes, b-values or stacks in one series?)")
    step = float(np.median(steps))
    if np.max(np.abs(steps - step)) > spacing_rel_tol * step:
        multiples = steps / step
        if np.all(np.abs(multiples - np.round(multiples)) <= spacing_rel_tol * np.round(multiples)):
            missing = int(np.sum(np.round(multiples) - 1))  # every step a whole number of regular steps: gaps
            raise CaseRejected(f"non-uniform slice spacing: {missing} missing slice{'s' * (missing != 1)} "
                               f"(regular step {step:.4g} mm, gaps up to {steps.max():.4g} mm)")
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


def _position_groups(headers: list[Header]) -> list[list[int]] | None:
    """Indices of the headers at each distinct slice position (along the first slice's normal), or None if unknown."""
    if any(h.iop is None or h.ipp is None for h in headers):
        return None
    iop = np.asarray(headers[0].iop, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    proj = np.asarray([h.ipp for h in headers], dtype=np.float64) @ normal
    order = np.argsort(proj, kind="stable")
    groups: list[list[int]] = []
    for i in order:
        if groups and proj[i] - proj[groups[-1][0]] < DUPLICATE_TOL_MM:
            groups[-1].append(int(i))
        else:
            groups.append([int(i)])
    return groups


def split_phases(headers: list[Header]) -> list[tuple[str | None, list[Header]]]:
    """Split a series whose positions repeat (cine MR, dynamic series) into one list of headers per phase.

    Phases are told apart by the first of :data:`PHASE_TAGS` that every slice carries and that orders the repeats at
    every position (all the same count, all values distinct); the ``n``-th repeat of each position in that order is
    phase ``n``. Ranking per position, rather than grouping equal values, keeps cine series whose TriggerTime differs
    by a few ms from slice to slice within one phase. Without repeated positions, or when no tag explains them, the
    series is returned whole (and :func:`series_geometry` then rejects the duplicates).

    Returns:
        ``[(None, headers)]``, or ``[("phase 1 of 3, TriggerTime 0", headers_1), ...]`` in phase order.
    """
    groups = _position_groups(headers)
    if groups is None or all(len(g) == 1 for g in groups):
        return [(None, headers)]
    repeats = {len(g) for g in groups}
    if len(repeats) != 1:
        return [(None, headers)]
    n_phases = repeats.pop()
    for attr, tag in PHASE_TAGS:
        values = [getattr(h, attr) for h in headers]
        if any(v is None for v in values):
            continue
        ranked = [sorted(g, key=lambda i: values[i]) for g in groups]
        if any(len({values[i] for i in g}) != len(g) for g in ranked):
            continue
        phases = []
        for n in range(n_phases):
            members = [g[n] for g in ranked]
            label = f"phase {n + 1} of {n_phases}, {tag} {np.median([values[i] for i in members]):g}"
            phases.append((label, [headers[i] for i in sorted(members)]))
        return phases
    return [(None, headers)]

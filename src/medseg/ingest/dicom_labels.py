"""Label sources stored as DICOM: segmentation objects (DICOM-SEG) and RT structure sets (RTSTRUCT).

Both are rasterised onto the grid of the image series they reference, described by a
:class:`~medseg.ingest.dicom_geometry.Geometry`: the output is a uint8 array indexed ``[i, j, k]`` = (column ``i``,
row ``j``, sorted slice ``k``), shape ``geometry.shape``. The RAS ``geometry.affine`` is the single source of truth
for world-to-voxel mapping (DICOM coordinates are LPS, so x and y are negated first); SEG frames and RT contours are
placed by their patient coordinates, never by slice order or instance numbers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.ingest.common import CaseRejected
from medseg.ingest.dicom_geometry import LPS_TO_RAS, Geometry
from medseg.ingest.dicom_headers import Header, quiet_pydicom

__all__ = ["SEG_SOP_CLASS", "RTSTRUCT_SOP_CLASS", "GRID_TOL", "LabelObject", "find_label_objects", "rasterise_seg",
           "rasterise_rtstruct"]

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
LABELMAP_SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.7"  # DICOM 2024 label-map SEG; read the same way
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
GRID_TOL = 0.1  # voxels: a SEG frame corner may sit this far from the image grid (rounded DS strings)


@dataclass(frozen=True)
class LabelObject:
    """A SEG or RTSTRUCT file, what it references (``series_uid`` is "" when it names no image series) and the
    ``{value: name}`` map its rasterisation will return (read from the header, no pixels)."""

    path: Path
    kind: str  # "SEG" or "RTSTRUCT"
    series_uid: str
    instance_uids: tuple[str, ...]
    names: dict[int, str]


def _read(path: Path, pixels: bool = False):
    import pydicom

    try:
        with quiet_pydicom():
            return pydicom.dcmread(path, stop_before_pixels=not pixels)
    except Exception as err:  # pydicom raises many types on truncated or malformed files
        raise CaseRejected(f"{Path(path).name}: cannot read label object: {type(err).__name__}: {str(err)[:200]}") \
            from None


def _references(ds) -> tuple[str, tuple[str, ...]]:
    """(referenced series UID, referenced SOP instance UIDs) of a SEG or RTSTRUCT data set."""
    series, uids = [], []
    if str(ds.get("SOPClassUID", "")) == RTSTRUCT_SOP_CLASS:
        for frame in ds.get("ReferencedFrameOfReferenceSequence", []):
            for study in frame.get("RTReferencedStudySequence", []):
                for ser in study.get("RTReferencedSeriesSequence", []):
                    series.append(str(ser.get("SeriesInstanceUID", "")))
                    uids += [str(i.ReferencedSOPInstanceUID) for i in ser.get("ContourImageSequence", [])]
    else:
        for ser in ds.get("ReferencedSeriesSequence", []):
            series.append(str(ser.get("SeriesInstanceUID", "")))
            uids += [str(i.ReferencedSOPInstanceUID) for i in ser.get("ReferencedInstanceSequence", [])]
        # older SEGs name their sources only per frame (DerivationImageSequence) or in SourceImageSequence
        for item in ds.get("PerFrameFunctionalGroupsSequence", []):
            for der in item.get("DerivationImageSequence", []):
                uids += [str(s.ReferencedSOPInstanceUID) for s in der.get("SourceImageSequence", [])]
        uids += [str(s.ReferencedSOPInstanceUID) for s in ds.get("SourceImageSequence", [])]
    named = [s for s in dict.fromkeys(series) if s]
    return (named[0] if len(named) == 1 else "|".join(named)), tuple(dict.fromkeys(uids))


def _names(ds) -> dict[int, str]:
    """SEG: ``{SegmentNumber: SegmentLabel}``; RTSTRUCT: ``{1..N: ROIName}`` in StructureSetROISequence order."""
    if str(ds.get("SOPClassUID", "")) == RTSTRUCT_SOP_CLASS:
        return {v: str(r.get("ROIName", "") or f"roi_{r.ROINumber}")
                for v, r in enumerate(ds.get("StructureSetROISequence", []), start=1)}
    return dict(sorted((int(s.SegmentNumber), str(s.get("SegmentLabel", "") or f"segment_{s.SegmentNumber}"))
                       for s in ds.get("SegmentSequence", []) if int(s.SegmentNumber) > 0))


def find_label_objects(headers_or_paths: Iterable[Header | Path]) -> list[LabelObject]:
    """The SEG and RTSTRUCT objects among DICOM files, with the image series each references.

    Args:
        headers_or_paths: :class:`Header` records from the header pass (cheap: filtered by SOP class first) or paths.
            Files that cannot be read are skipped; the series reader reports them.

    Returns:
        One :class:`LabelObject` per SEG/RTSTRUCT, in input order. ``series_uid`` joins several referenced series
        with "|" (no image series matches it, so such an object is never used silently).
    """
    found = []
    for item in headers_or_paths:
        path = item.path if isinstance(item, Header) else Path(item)
        if isinstance(item, Header) and item.sop_class not in (SEG_SOP_CLASS, LABELMAP_SEG_SOP_CLASS,
                                                               RTSTRUCT_SOP_CLASS):
            continue
        try:
            ds = _read(path)
        except CaseRejected:
            continue
        sop_class = str(ds.get("SOPClassUID", ""))
        if sop_class in (SEG_SOP_CLASS, LABELMAP_SEG_SOP_CLASS, RTSTRUCT_SOP_CLASS):
            series, uids = _references(ds)
            kind = "RTSTRUCT" if sop_class == RTSTRUCT_SOP_CLASS else "SEG"
            found.append(LabelObject(path, kind, series, uids, _names(ds)))
    return found


def _instance_uids(geometry: Geometry) -> list[str]:
    """SOPInstanceUIDs of the geometry's files in slice order (the header pass does not keep them)."""
    import pydicom

    try:
        with quiet_pydicom():
            return [str(pydicom.dcmread(path, stop_before_pixels=True, force=forced,
                                        specific_tags=["SOPInstanceUID"]).get("SOPInstanceUID", ""))
                    for path, forced in dict.fromkeys((h.path, h.forced) for h in geometry.headers)]  # multi-frame
    except Exception as err:
        raise CaseRejected(f"cannot read the image series' SOPInstanceUIDs: {type(err).__name__}") from None


def _check_reference(ds, path: Path, geometry: Geometry) -> None:
    """Raise unless the object references the geometry's series (by UID, else by instance UIDs)."""
    series, uids = _references(ds)
    own = geometry.headers[0].series_uid
    if not series and not uids:
        raise CaseRejected(f"{path.name}: references no image series")
    if series and own and series != own:
        raise CaseRejected(f"{path.name}: references series {series}, not this series {own} "
                           "(referenced series missing from SOURCE?)")
    missing = sorted(set(uids) - set(_instance_uids(geometry))) if uids else []
    if missing:
        raise CaseRejected(f"{path.name}: references {len(missing)} image instance(s) not in series "
                           f"{own or '(no UID)'}, e.g. {missing[0]} (slices missing from SOURCE?)")


def _world_to_voxel(geometry: Geometry) -> np.ndarray:
    """4x4 map from LPS millimetres to voxel indices (i, j, k), from the RAS affine."""
    return np.linalg.inv(LPS_TO_RAS @ np.asarray(geometry.affine, dtype=np.float64))


def _group(ds, item, name: str):
    """A functional group from the per-frame item, else from the shared groups."""
    for source in (item, *ds.get("SharedFunctionalGroupsSequence", [])):
        if name in source:
            return source[name].value[0]
    return None


def rasterise_seg(seg_path: Path, geometry: Geometry) -> tuple[np.ndarray, dict[int, str]]:
    """A DICOM-SEG as a label volume on the image grid.

    Each frame is placed by its PlanePositionSequence/PlaneOrientationSequence/PixelMeasuresSequence, mapped through
    the image affine; it must coincide with one image slice. Segments keep their SEG numbers (1..N); where segments
    overlap, the higher segment number wins. Fractional segments are thresholded at half the maximum value.

    Args:
        seg_path: the SEG file (binary, fractional or label-map).
        geometry: the referenced series' grid.

    Returns:
        ``(labels, names)``: uint8 ``(X, Y, Z)`` array and ``{segment number: SegmentLabel}``.

    Raises:
        CaseRejected: unreadable file, a reference to another series, frames off the image grid, more than 255
            segments.
    """
    import highdicom as hd

    seg_path = Path(seg_path)
    try:
        with quiet_pydicom():
            seg = hd.seg.segread(seg_path)
    except Exception as err:
        raise CaseRejected(f"{seg_path.name}: cannot read DICOM-SEG: {type(err).__name__}: {str(err)[:200]}") \
            from None
    _check_reference(seg, seg_path, geometry)
    names = _names(seg)
    if max(names, default=0) > 255:
        raise CaseRejected(f"{seg_path.name}: segment numbers up to {max(names)} do not fit a uint8 label map")
    nx, ny, nz = geometry.shape
    if (int(seg.Columns), int(seg.Rows)) != (nx, ny):
        raise CaseRejected(f"{seg_path.name}: SEG frames are {seg.Columns}x{seg.Rows}, the image grid is {nx}x{ny}")
    to_vox = _world_to_voxel(geometry)
    labelmap = str(seg.get("SegmentationType", "")) == "LABELMAP"
    fractional = str(seg.get("SegmentationType", "")) == "FRACTIONAL"
    placed = []
    for f, item in enumerate(seg.get("PerFrameFunctionalGroupsSequence", [])):
        pos, ori, meas = (_group(seg, item, n) for n in ("PlanePositionSequence", "PlaneOrientationSequence",
                                                          "PixelMeasuresSequence"))
        if pos is None or ori is None or meas is None:
            raise CaseRejected(f"{seg_path.name}: frame {f + 1} has no plane position/orientation/pixel spacing")
        iop, (dr, dc) = np.asarray(ori.ImageOrientationPatient, float), [float(v) for v in meas.PixelSpacing]
        # the frame's own voxel->world map, then into image voxels: must be identity in-plane plus a whole slice
        frame = np.eye(4)
        frame[:3, 0], frame[:3, 1] = iop[:3] * dc, iop[3:] * dr
        frame[:3, 3] = np.asarray(pos.ImagePositionPatient, float)
        m = to_vox @ frame
        k = int(round(m[2, 3]))
        corners = np.array([[0, 0, 0, 1], [nx - 1, 0, 0, 1], [0, ny - 1, 0, 1], [nx - 1, ny - 1, 0, 1]], float).T
        if not 0 <= k < nz or np.max(np.abs((m @ corners)[:3] - (corners[:3] + [[0], [0], [k]]))) > GRID_TOL:
            raise CaseRejected(f"{seg_path.name}: SEG frame {f + 1} does not match the image grid "
                               "(other slice positions, orientation or pixel spacing)")
        ident = _group(seg, item, "SegmentIdentificationSequence")
        number = 0 if labelmap or ident is None else int(ident.ReferencedSegmentNumber)
        placed.append((number, f, k))
    out = np.zeros(geometry.shape, dtype=np.uint8)
    for number, f, k in sorted(placed):  # ascending segment number: the higher number is written last and wins
        pixels = np.asarray(seg.get_stored_frame(f + 1)).T  # (rows, columns) -> (i, j)
        if labelmap:
            out[:, :, k] = np.where(pixels > 0, pixels, out[:, :, k])
            continue
        mask = pixels > (float(seg.get("MaximumFractionalValue", 1)) / 2 if fractional else 0)
        out[:, :, k][mask] = number
    return out, names


def _fill(poly: np.ndarray, nx: int, ny: int) -> np.ndarray:
    """Even-odd fill of one polygon (vertices in (i, j) voxel units) sampled at voxel centres: (nx, ny) bool."""
    mask = np.zeros((nx, ny), dtype=bool)
    lo = np.clip(np.ceil(poly.min(axis=0)).astype(int), 0, [nx, ny])
    hi = np.clip(np.floor(poly.max(axis=0)).astype(int) + 1, 0, [nx, ny])
    if np.any(hi <= lo):
        return mask
    pi, pj = np.meshgrid(np.arange(lo[0], hi[0]), np.arange(lo[1], hi[1]), indexing="ij")
    inside = np.zeros(pi.shape, dtype=bool)
    x0, y0 = poly[:, 0], poly[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    for a, b, c, d in zip(x0, y0, x1, y1):  # ray cast along +i: each crossed edge toggles inside/outside
        crosses = (b > pj) != (d > pj)
        if crosses.any():
            inside ^= crosses & (pi < a + (pj - b) * (c - a) / np.where(d != b, d - b, 1.0))
    mask[lo[0]:hi[0], lo[1]:hi[1]] = inside
    return mask


def rasterise_rtstruct(rt_path: Path, geometry: Geometry) -> tuple[np.ndarray, dict[int, str]]:
    """An RT structure set as a label volume on the image grid.

    ROIs get values 1..N in StructureSetROISequence order (ROIs without contours keep their value, so the map is
    stable); where ROIs overlap, the later (higher value) wins. Each CLOSED_PLANAR contour is mapped from LPS mm to
    voxels and assigned to the slice within half a slice along the normal; the contours of one ROI on one slice are
    combined with the even-odd rule, so an inner contour cuts a hole. A voxel is inside when its centre is. Contours
    partly outside the field of view are clipped; POINT and OPEN contours are ignored.

    Returns:
        ``(labels, names)``: uint8 ``(X, Y, Z)`` array and ``{value: ROIName}``.

    Raises:
        CaseRejected: unreadable file, no or another referenced series, a non-planar contour, one between slices or
            entirely off the grid, more than 255 ROIs.
    """
    rt_path = Path(rt_path)
    ds = _read(rt_path)
    if str(ds.get("SOPClassUID", "")) != RTSTRUCT_SOP_CLASS:
        raise CaseRejected(f"{rt_path.name}: cannot read as an RT structure set "
                           f"(SOP class {ds.get('SOPClassUID', '') or 'missing'})")
    _check_reference(ds, rt_path, geometry)
    names = _names(ds)
    rois = [(int(r.ROINumber), names[v]) for v, r in enumerate(ds.get("StructureSetROISequence", []), start=1)]
    if len(rois) > 255:
        raise CaseRejected(f"{rt_path.name}: {len(rois)} ROIs do not fit a uint8 label map")
    value = {number: v for v, (number, _) in enumerate(rois, start=1)}
    nx, ny, nz = geometry.shape
    to_vox = _world_to_voxel(geometry)
    out = np.zeros(geometry.shape, dtype=np.uint8)
    contours = sorted(((value.get(int(rc.ReferencedROINumber), 0), c) for rc in ds.get("ROIContourSequence", [])
                       for c in rc.get("ContourSequence", [])), key=lambda vc: vc[0])
    for v in sorted({v for v, _ in contours if v}):  # ascending value: the later ROI is painted last and wins
        per_slice: dict[int, np.ndarray] = {}
        for _, c in (vc for vc in contours if vc[0] == v):
            if str(c.get("ContourGeometricType", "CLOSED_PLANAR")) != "CLOSED_PLANAR":
                continue
            lps = np.asarray(c.ContourData, dtype=np.float64).reshape(-1, 3)
            vox = (to_vox @ np.c_[lps, np.ones(len(lps))].T)[:3].T
            k = int(np.round(np.median(vox[:, 2])))
            where = f"{rt_path.name}: ROI {rois[v - 1][1]!r}: contour at {np.round(lps[0], 2).tolist()} mm"
            if np.max(np.abs(vox[:, 2] - k)) >= 0.5:
                raise CaseRejected(f"{where} lies between slices or is not in a slice plane")
            if not 0 <= k < nz or vox[:, 0].max() < -0.5 or vox[:, 0].min() > nx - 0.5 \
                    or vox[:, 1].max() < -0.5 or vox[:, 1].min() > ny - 0.5:
                raise CaseRejected(f"{where} lies off the image grid")
            per_slice[k] = per_slice.get(k, np.zeros((nx, ny), bool)) ^ _fill(vox[:, :2], nx, ny)
        for k, mask in per_slice.items():
            out[:, :, k][mask] = v
    return out, names

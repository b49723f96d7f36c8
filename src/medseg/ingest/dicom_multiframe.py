"""Enhanced multi-frame CT and MR: one file, one frame per slice, geometry in the functional groups.

Each frame becomes a :class:`~medseg.ingest.dicom_headers.Header` of its own (``frame`` = its index in the file), with
ImagePositionPatient from its PlanePositionSequence, ImageOrientationPatient from PlaneOrientationSequence,
PixelSpacing from PixelMeasuresSequence and rescale slope/intercept from PixelValueTransformationSequence, each
looked up in the frame's PerFrameFunctionalGroupsSequence item first, then in SharedFunctionalGroupsSequence. The frames
then go through the same grouping, phase split and geometry checks as single-frame slices.
"""

from __future__ import annotations

import dataclasses
import logging

from medseg.ingest.common import CaseRejected
from medseg.ingest.dicom_headers import Header, _floats, quiet_pydicom  # same tolerant parsing as single frames

__all__ = ["ENHANCED_SOP_CLASSES", "is_enhanced", "frame_headers"]

log = logging.getLogger(__name__)

ENHANCED_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR",
}


def is_enhanced(h: Header) -> bool:
    """Whether ``h`` is an enhanced (functional-group) CT or MR file whose frames are slices."""
    return h.sop_class in ENHANCED_SOP_CLASSES and h.frame is None


def _lookup(item, shared, sequence: str, keyword: str):
    """``keyword`` inside ``sequence`` of the per-frame item, else of the shared item, else None."""
    for group in (item, shared):
        if group is not None and sequence in group and len(group[sequence].value):
            value = group[sequence].value[0].get(keyword)
            if value not in (None, ""):
                return value
    return None


def _float_or(value, default: float | None) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def frame_headers(h: Header) -> list[Header]:
    """One header per frame of an enhanced multi-frame file.

    Raises:
        CaseRejected: the file cannot be read again or has no per-frame functional groups for its frames.
    """
    import pydicom

    try:
        with quiet_pydicom():
            ds = pydicom.dcmread(h.path, stop_before_pixels=True, force=h.forced)
    except Exception as err:
        raise CaseRejected(f"corrupt or truncated DICOM: {type(err).__name__}: {str(err)[:200]}") from None
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared_seq = ds.get("SharedFunctionalGroupsSequence") or []
    shared = shared_seq[0] if len(shared_seq) else None
    if len(per_frame) != h.frames:
        raise CaseRejected(f"{ENHANCED_SOP_CLASSES[h.sop_class]} file with {h.frames} frames but "
                           f"{len(per_frame)} per-frame functional group items")
    try:
        return _frames(h, ds, per_frame, shared)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError) as err:  # malformed functional groups
        raise CaseRejected(f"{ENHANCED_SOP_CLASSES[h.sop_class]} functional groups unreadable: "
                           f"{type(err).__name__}: {str(err)[:200]}") from None


def _frames(h: Header, ds, per_frame, shared) -> list[Header]:
    """The per-frame headers; FrameContentSequence's TemporalPositionIndex fills ``temporal_position`` and the
    nominal cardiac trigger delay ``trigger_time``, so multi-phase enhanced files split like single-frame series."""
    top_slope = _float_or(ds.get("RescaleSlope"), 1.0)
    top_intercept = _float_or(ds.get("RescaleIntercept"), 0.0)
    out = []
    for i, item in enumerate(per_frame):
        slope = _float_or(_lookup(item, shared, "PixelValueTransformationSequence", "RescaleSlope"), top_slope)
        intercept = _float_or(_lookup(item, shared, "PixelValueTransformationSequence", "RescaleIntercept"),
                              top_intercept)
        trigger = _lookup(item, shared, "CardiacSynchronizationSequence", "NominalCardiacTriggerDelayTime")
        out.append(dataclasses.replace(
            h, frames=1, frame=i, rescale=(slope or 1.0, intercept or 0.0),
            ipp=_floats(_lookup(item, shared, "PlanePositionSequence", "ImagePositionPatient"), 3),
            iop=_floats(_lookup(item, shared, "PlaneOrientationSequence", "ImageOrientationPatient"), 6),
            pixel_spacing=_floats(_lookup(item, shared, "PixelMeasuresSequence", "PixelSpacing"), 2),
            temporal_position=_float_or(_lookup(item, shared, "FrameContentSequence", "TemporalPositionIndex"), None),
            trigger_time=_float_or(trigger, None), acquisition_number=None))
    log.debug("enhanced multi-frame object: %d frames", len(out))
    return out

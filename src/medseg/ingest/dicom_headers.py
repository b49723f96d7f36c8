"""DICOM header pass: one ``dcmread(stop_before_pixels=True)`` per file, grouped into series.

Only what geometry and grouping need is kept; patient names are never read into the record, and the patient ID is
kept only to be turned into a pseudonym.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from medseg.ingest.common import CappedReads, CaseRejected

__all__ = ["Header", "quiet_pydicom", "looks_like_dicom", "read_header", "series_key", "group_series",
           "NON_IMAGE_MODALITIES", "NON_IMAGE_SOP_PREFIXES", "non_image_reason", "unique_instances"]

NON_IMAGE_MODALITIES = {"SR", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "RTIMAGE", "SEG", "KO", "PR", "REG", "DOC",
                        "ECG", "HD", "PLAN", "RWV", "AU", "FID", "REGISTRATION"}
# SOP class UID prefixes that are not cross-sectional images (SR, RT objects, SEG/registration/raw, presentation
# states, waveforms, encapsulated documents, DICOMDIR).
NON_IMAGE_SOP_PREFIXES = ("1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.481.", "1.2.840.10008.5.1.4.1.1.66",
                          "1.2.840.10008.5.1.4.1.1.11.", "1.2.840.10008.5.1.4.1.1.9.", "1.2.840.10008.5.1.4.1.1.104.",
                          "1.2.840.10008.1.3.10")


DEFLATED = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian
IMPLICIT_LE, EXPLICIT_LE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"
NATIVE_LE = {IMPLICIT_LE, EXPLICIT_LE}  # uncompressed little endian: pixels readable straight from the file


@dataclass(frozen=True)
class Header:
    """What the header pass keeps of one file (no names, no dates)."""

    path: Path
    forced: bool
    has_pixels: bool
    sop_class: str
    modality: str
    series_uid: str
    study_uid: str
    patient_id: str = field(default="", repr=False)  # only ever hashed into a pseudonym
    series_number: str = ""
    rows: int | None = None
    columns: int | None = None
    samples: int = 1
    frames: int = 1
    iop: tuple[float, ...] | None = None
    ipp: tuple[float, ...] | None = None
    pixel_spacing: tuple[float, ...] | None = None
    image_type: tuple[str, ...] = ()
    sop_uid: str = ""
    temporal_position: float | None = None  # TemporalPositionIdentifier
    trigger_time: float | None = None  # TriggerTime (ms), cine MR
    acquisition_number: float | None = None
    frame: int | None = None  # index of the frame in an enhanced multi-frame file, else None
    rescale: tuple[float, float] | None = None  # (slope, intercept) of that frame, from its functional groups
    # An uncompressed little-endian grey-scale single frame: (file offset of its pixels, stored numpy dtype,
    # BitsStored, RescaleSlope, RescaleIntercept), so the pixel pass reads them without parsing the file again
    stored: tuple[int, str, int, float, float] | None = None


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's warnings while reading: they can quote element values, which may be identifiers."""
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.ERROR + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def looks_like_dicom(path: Path) -> str | None:
    """"preamble" for a DICM file, "raw" for a preamble-less data set (group 0002/0008 first), else None."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return None
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "preamble"
    if len(head) >= 8:
        group_le, group_be = int.from_bytes(head[:2], "little"), int.from_bytes(head[:2], "big")
        if group_le in (0x0002, 0x0008) or group_be == 0x0008:
            return "raw"
    return None


def _floats(value, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def read_header(path: Path) -> Header:
    """Read one file's header.

    Raises:
        CaseRejected: not a DICOM file, or a corrupt/truncated one.
    """
    import pydicom

    kind = looks_like_dicom(path)
    if kind is None:
        raise CaseRejected("not a DICOM file")
    try:
        with quiet_pydicom(), CappedReads(path) as fh:
            # CappedReads: a corrupt length field (4 GB claimed in a 500 kB file) reads to the file's end, no further
            ds = pydicom.dcmread(fh, stop_before_pixels=True, force=kind == "raw")
            # reading stops at (7FE0,0010): a file read to its end has no pixel data (or was cut short); deflated
            # files are inflated into memory first, so for them this cannot be told before the pixel pass
            deflated = str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", "")) == DEFLATED
            header = _header(path, kind, ds, has_pixels=deflated or fh.tell() < os.fstat(fh.fileno()).st_size)
            if header.has_pixels and not deflated:
                header = replace(header, stored=_stored_pixels(fh, ds, header))
    except Exception as err:  # pydicom raises many types on truncated or malformed files
        raise CaseRejected(f"corrupt or truncated DICOM: {type(err).__name__}: {str(err)[:200]}") from None
    if not header.sop_class and kind == "raw" and header.rows is None and not header.modality:
        raise CaseRejected("not a DICOM file (no DICOM attributes)")
    if header.sop_class == "1.2.840.10008.1.3.10":
        raise CaseRejected("DICOMDIR (media directory), not an image")
    return header


def _header(path: Path, kind: str, ds, has_pixels: bool) -> Header:
    """The :class:`Header` of a data set read without pixels."""
    get = ds.get
    media = str(getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID", "") or "")
    return Header(
        path=path, forced=kind == "raw", has_pixels=has_pixels, sop_class=str(get("SOPClassUID", "") or media),
        modality=str(get("Modality", "") or "").upper(), series_uid=str(get("SeriesInstanceUID", "") or ""),
        study_uid=str(get("StudyInstanceUID", "") or ""), patient_id=str(get("PatientID", "") or ""),
        series_number=str(get("SeriesNumber", "") or ""),
        rows=int(ds.Rows) if get("Rows") is not None else None,
        columns=int(ds.Columns) if get("Columns") is not None else None,
        samples=int(get("SamplesPerPixel", 1) or 1), frames=int(get("NumberOfFrames", 1) or 1),
        iop=_floats(get("ImageOrientationPatient"), 6), ipp=_floats(get("ImagePositionPatient"), 3),
        pixel_spacing=_floats(get("PixelSpacing"), 2), image_type=_strings(get("ImageType")),
        sop_uid=str(get("SOPInstanceUID", "") or ""), temporal_position=_number(get("TemporalPositionIdentifier")),
        trigger_time=_number(get("TriggerTime")), acquisition_number=_number(get("AcquisitionNumber")))


def stored_dtype(bits: int, signed: bool) -> str:
    """The numpy type of uncompressed little-endian stored pixels: ``<i2`` for BitsAllocated 16, signed."""
    return f"<{'i' if signed else 'u'}{bits // 8}"


def _stored_pixels(fh, ds, h: Header) -> tuple[int, str, int, float, float] | None:
    """:attr:`Header.stored` of a file read up to its pixel data (``fh`` at the (7FE0,0010) element), or None."""
    ts = str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", "") or "")
    bits, stored = int(ds.get("BitsAllocated", 0) or 0), int(ds.get("BitsStored", 0) or 0)
    if ts not in NATIVE_LE or h.samples != 1 or h.frames != 1 or bits not in (8, 16) or not 0 < stored <= bits \
            or not h.rows or not h.columns:
        return None
    start = fh.tell()
    element = fh.read(12)
    if element[:4] != b"\xe0\x7f\x10\x00":  # not at the Pixel Data tag: leave it to pydicom
        return None
    if ts == EXPLICIT_LE:
        if element[4:6] not in (b"OW", b"OB"):
            return None
        length, offset = int.from_bytes(element[8:12], "little"), start + 12
    else:
        length, offset = int.from_bytes(element[4:8], "little"), start + 8
    dtype = stored_dtype(bits, int(ds.get("PixelRepresentation", 0) or 0) == 1)
    if length == 0xFFFFFFFF or length < h.rows * h.columns * bits // 8:
        return None
    return offset, dtype, stored, float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)


def _number(value) -> float | None:
    """A numeric tag's value, or None when absent, empty or not a number."""
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _strings(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value.upper(),)
    return tuple(str(v).upper() for v in value)


def series_key(h: Header) -> str:
    """SeriesInstanceUID, or (when empty) a stable key of study, series number, orientation, size and folder."""
    if h.series_uid:
        return h.series_uid
    iop = ",".join(f"{v:.4f}" for v in h.iop) if h.iop else "-"
    return "|".join(["nouid", h.patient_id, h.study_uid, h.series_number, iop, f"{h.rows}x{h.columns}",
                     h.path.parent.as_posix()])


def group_series(headers: list[Header]) -> dict[str, list[Header]]:
    """Headers grouped by :func:`series_key`, in first-seen order."""
    groups: dict[str, list[Header]] = defaultdict(list)
    for h in headers:
        groups[series_key(h)].append(h)
    return dict(groups)


def unique_instances(headers: list[Header]) -> tuple[list[Header], int]:
    """``headers`` without repeated copies of one instance (same SOPInstanceUID and frame), and how many were dropped.

    The same file copied into two folders is one image, not two slices at one position. The copy kept is the one in
    the folder holding most of the series (then the first path in sorted order), so the series' folder stays the
    folder of its files and the choice does not depend on the file system's listing order.
    """
    per_folder: dict[Path, int] = defaultdict(int)
    for h in headers:
        per_folder[h.path.parent] += 1
    seen: dict[tuple[str, int | None], Header] = {}
    anonymous = []
    for h in sorted(headers, key=lambda h: (-per_folder[h.path.parent], h.path.as_posix())):
        if not h.sop_uid:  # no UID: cannot tell copies apart, keep all (duplicates are then rejected by position)
            anonymous.append(h)
        else:
            seen.setdefault((h.sop_uid, h.frame), h)
    kept = {id(h) for h in [*seen.values(), *anonymous]}
    out = [h for h in headers if id(h) in kept]
    return out, len(headers) - len(out)


def non_image_reason(h: Header) -> str | None:
    """Why a file is not a cross-sectional grey-scale image for this stage, or None."""
    import pydicom

    sop_name = pydicom.uid.UID(h.sop_class).name if h.sop_class else "unknown SOP class"
    if h.modality in NON_IMAGE_MODALITIES or h.sop_class.startswith(NON_IMAGE_SOP_PREFIXES):
        return f"{h.modality or 'object'} is not an image for this stage ({sop_name})"
    if not h.has_pixels:
        return f"no pixel data in {h.path.name} (file cut short, header-only copy, or not an image)"
    if h.rows is None or h.columns is None:
        return f"no pixel data attributes (Rows/Columns) ({sop_name})"
    if h.samples != 1:
        return f"colour image (SamplesPerPixel={h.samples}); only grey-scale volumes are ingested"
    if "MOSAIC" in h.image_type:
        return "Siemens mosaic (slices tiled in one image) is not supported; convert it with dcm2niix"
    if h.frames > 1:
        return f"multi-frame object ({h.frames} frames) is not supported; convert it with dcm2niix"
    if h.iop is None or h.ipp is None or h.pixel_spacing is None:
        return "no ImagePositionPatient/ImageOrientationPatient/PixelSpacing (not a cross-sectional image)"
    return None

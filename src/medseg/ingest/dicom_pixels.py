"""Pixel pass of a validated DICOM series: decode each slice (or frame), rescale, stack into an (X, Y, Z) volume.

Uncompressed little-endian pixel data is read with ``numpy.frombuffer`` (the bit masking and sign extension pydicom
applies are done by hand); everything else goes through pydicom's decoders (pylibjpeg, openjpeg, pyjpegls, gdcm).
Slices are read by a small thread pool: decoding in the C plugins and file reads release the GIL.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from medseg.ingest.common import CaseRejected
from medseg.ingest.dicom_geometry import Geometry
from medseg.ingest.dicom_headers import Header, quiet_pydicom

__all__ = ["decoder_problem", "read_series", "READ_WORKERS"]

log = logging.getLogger(__name__)

READ_WORKERS = min(4, os.cpu_count() or 1)  # beyond 4 threads the disk, not the CPU, is the limit
NATIVE_LE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}  # Implicit / Explicit VR Little Endian


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


def _native(ds, frames: int, expected: tuple[int, int]) -> np.ndarray | None:
    """Uncompressed little-endian grey-scale pixels straight from the bytes, or None to let pydicom decode."""
    bits, stored = int(ds.get("BitsAllocated", 0) or 0), int(ds.get("BitsStored", 0) or 0)
    if "PixelData" not in ds or bits not in (8, 16, 32) or not 0 < stored <= bits:
        return None
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    count = frames * expected[0] * expected[1]
    raw = ds.PixelData
    if len(raw) < count * dtype.itemsize:
        return None  # cut short: pydicom gives the precise error
    arr = np.frombuffer(raw, dtype=dtype, count=count)
    if stored < bits:  # as pydicom: mask unsigned values, sign-extend signed ones from the stored bits
        shift = bits - stored
        arr = (arr << shift) >> shift if signed else arr & np.array((1 << stored) - 1, dtype=dtype)
    return arr.reshape((frames, *expected) if frames > 1 else expected)


def _read_pixels(h: Header, expected: tuple[int, int]) -> tuple[np.ndarray, float, float]:
    """All frames of ``h``'s file (frames first for multi-frame), with the file's rescale slope and intercept."""
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
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    arr = _native(ds, frames, expected) if str(ts) in NATIVE_LE and int(ds.get("SamplesPerPixel", 1)) == 1 else None
    if arr is None:
        try:
            with quiet_pydicom():
                arr = ds.pixel_array
        except Exception as err:
            raise CaseRejected(f"{h.path.name}: pixel data cannot be decoded (truncated or corrupt?): "
                               f"{type(err).__name__}: {str(err)[:200]}") from None
    if arr.shape[-2:] != expected or (h.frame is not None and (arr.ndim != 3 or h.frame >= arr.shape[0])):
        raise CaseRejected(f"{h.path.name}: pixel array {arr.shape} does not match Rows/Columns {expected}")
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return arr, slope, intercept


def read_series(geometry: Geometry, workers: int = READ_WORKERS) -> np.ndarray:
    """Pixel data of a validated series as an (X, Y, Z) = (columns, rows, slices) volume, rescaled.

    Intensities are ``stored * slope + intercept`` (per frame for enhanced files): int16 when integral and in range,
    int32 when integral and larger, else float32.

    Raises:
        CaseRejected: a slice has no pixel data, cannot be decoded, or has the wrong size.
    """
    nx, ny, nz = geometry.shape
    # slices are filled contiguously in a (Z, Y, X) buffer and the (X, Y, Z) result is its transposed view: writing
    # each slice into an (X, Y, Z) C-order array instead strides over memory and cost 10x the decoding; the view is
    # Fortran-ordered, which is also NIfTI's on-disk order
    stack = np.empty((nz, ny, nx), dtype=np.float32)
    by_file: dict = {}
    for k, h in enumerate(geometry.headers):  # a multi-frame file is read once for all its frames
        by_file.setdefault(h.path, []).append((k, h))

    def fill(slices: list[tuple[int, Header]]) -> bool:
        """Decode one file into its slices of ``vol``; True when all its values are integers."""
        data, slope, intercept = _read_pixels(slices[0][1], (ny, nx))
        integral = True
        for k, h in slices:
            arr = data
            if h.frame is not None:
                arr = data[h.frame]
                slope, intercept = h.rescale or (slope, intercept)
            integral &= float(slope).is_integer() and float(intercept).is_integer() and \
                np.issubdtype(arr.dtype, np.integer)
            stack[k] = arr.astype(np.float64) * slope + intercept
        return integral

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(by_file)))) as pool:
        integral = all(list(pool.map(fill, by_file.values())))
    vol = stack.transpose(2, 1, 0)
    if integral and vol.min() >= np.iinfo(np.int16).min and vol.max() <= np.iinfo(np.int16).max:
        return vol.astype(np.int16)
    if integral and abs(vol).max() < 2**24:
        return vol.astype(np.int32)
    return vol

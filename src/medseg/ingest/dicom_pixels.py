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

from medseg.ingest.common import CappedReads, CaseRejected
from medseg.ingest.dicom_geometry import Geometry
from medseg.ingest.dicom_headers import NATIVE_LE, Header, quiet_pydicom, stored_dtype

__all__ = ["decoder_problem", "read_series", "READ_WORKERS"]

log = logging.getLogger(__name__)

READ_WORKERS = min(4, os.cpu_count() or 1)  # beyond 4 threads the disk, not the CPU, is the limit


def decoder_problem(transfer_syntax) -> str | None:
    """Why pixel data in ``transfer_syntax`` cannot be decoded here (naming the packages to install), or None."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    ts = UID(str(transfer_syntax))
    try:
        if not ts or not ts.is_compressed:
            return None
    except ValueError:  # a UID that is not a transfer syntax
        return f"transfer syntax {str(ts)[:64]!r} is not a DICOM transfer syntax"
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
    dtype = np.dtype(stored_dtype(bits, int(ds.get("PixelRepresentation", 0) or 0) == 1))
    count = frames * expected[0] * expected[1]
    raw = ds.PixelData
    if len(raw) < count * dtype.itemsize:
        return None  # cut short: pydicom gives the precise error
    arr = np.frombuffer(raw, dtype=dtype, count=count)
    if stored < bits:
        arr = arr.copy()  # frombuffer's view of the bytes is read-only
        _keep_stored_bits(arr, stored)
    return arr.reshape((frames, *expected) if frames > 1 else expected)


def _keep_stored_bits(arr: np.ndarray, stored: int) -> None:
    """In place, as pydicom: mask unsigned values, sign-extend signed ones from their ``stored`` low bits."""
    shift = arr.dtype.itemsize * 8 - stored
    if shift <= 0:
        return
    if arr.dtype.kind == "i":
        arr <<= shift
        arr >>= shift
    else:
        arr &= arr.dtype.type((1 << stored) - 1)


def _stored_range(dtype: np.dtype, stored: int) -> tuple[float, float]:
    """The values ``stored`` bits can hold in ``dtype`` after :func:`_keep_stored_bits`."""
    if dtype.kind == "i":
        return float(-(1 << (stored - 1))), float((1 << (stored - 1)) - 1)
    return 0.0, float((1 << stored) - 1)


def _read_pixels(h: Header, expected: tuple[int, int]) -> tuple[np.ndarray, float, float]:
    """All frames of ``h``'s file (frames first for multi-frame), with the file's rescale slope and intercept."""
    import pydicom

    try:
        with quiet_pydicom(), CappedReads(h.path) as fh:  # a corrupt length cannot allocate past the file
            ds = pydicom.dcmread(fh, force=h.forced)
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


def _output_dtype(ranges: list[tuple[float, float, float, float]] | None) -> np.dtype:
    """int16 when every rescaled value fits it, int32 for larger integers, else float32. ``ranges``: each slice's
    ``(stored min, stored max, slope, intercept)`` when all are integral; None when any is not (float32)."""
    if ranges is None:
        return np.dtype(np.float32)
    ends = [v * slope + intercept for lo, hi, slope, intercept in ranges for v in (lo, hi)]
    lo, hi = min(ends, default=0.0), max(ends, default=0.0)
    if np.iinfo(np.int16).min <= lo and hi <= np.iinfo(np.int16).max:
        return np.dtype(np.int16)
    return np.dtype(np.int32) if max(abs(lo), abs(hi)) < 2**24 else np.dtype(np.float32)


def _integral_ranges(decoded: list[tuple[int, np.ndarray, float, float]]) -> list | None:
    """:func:`_output_dtype`'s ranges of decoded slices, or None when a slice's values or rescale are not integral."""
    ranges = []
    for _, data, slope, intercept in decoded:
        if not (np.issubdtype(data.dtype, np.integer) and float(slope).is_integer()
                and float(intercept).is_integer()):
            return None
        ranges.append((float(data.min()), float(data.max()), slope, intercept))
    return ranges


def _wrapped(value: float, dtype: np.dtype) -> np.generic:
    """An integral rescale value as ``dtype``, modulo 2**bits (a slope of 40000 for int16 output): multiplying and
    adding modulo 2**bits give the exact result whenever the result itself fits, which the callers check."""
    return np.asarray(int(value), dtype=np.int64).astype(dtype)[()]


def _rescale_in_place(out: np.ndarray, slope: float, intercept: float) -> None:
    """``out *= slope; out += intercept`` on integers, modulo 2**bits: exact when the result fits ``out``'s type
    (:func:`_output_dtype` chose it)."""
    if slope != 1:
        out *= _wrapped(slope, out.dtype)
    if intercept:
        out += _wrapped(intercept, out.dtype)


def _rescale_into(out: np.ndarray, arr: np.ndarray, slope: float, intercept: float) -> None:
    """``out[...] = arr * slope + intercept``, in out's dtype, without a full-size temporary.

    Integers stay integers (int16 CT is most series); floats are computed in float64 row blocks and rounded once.
    """
    if np.issubdtype(out.dtype, np.integer):
        # Copy, then scale and shift in place: a ufunc writing into fresh memory was 15x slower than copyto here.
        np.copyto(out, arr, casting="unsafe")
        _rescale_in_place(out, slope, intercept)
        return
    for row in range(0, arr.shape[0], 64):  # 64 rows of float64 at a time: no slice-size temporaries
        out[row:row + 64] = arr[row:row + 64] * np.float64(slope) + np.float64(intercept)


class _CutShort(Exception):
    """A file ends inside its pixel data."""


def _read_stored_series(geometry: Geometry, workers: int) -> np.ndarray | None:
    """The common series (uncompressed little-endian 8- or 16-bit grey slices, integral rescale into int16) read
    straight from each file into the output, rescaled in place; None for any other series.

    Each slice's bytes go from the file into their place in one (Z, Y, X) buffer: no decoded copy, no second
    array. On a 512x512x300 CT this is most of ingest's lead over dcm2niix (benchmarks/ingest.py): fresh memory
    is slow to touch, and this path touches the output once.
    """
    nx, ny, nz = geometry.shape
    layouts = [h.stored if h.frame is None and (h.rows, h.columns) == (ny, nx) else None for h in geometry.headers]
    if any(lay is None for lay in layouts) or len({lay[1] for lay in layouts}) != 1:
        return None
    if not all(float(lay[3]).is_integer() and float(lay[4]).is_integer() for lay in layouts):
        return None
    dtype = np.dtype(layouts[0][1])
    stack = np.empty((nz, ny, nx), dtype=dtype)
    # What BitsStored allows: when every slice's allowed range, rescaled, fits int16 (12-bit CT with intercept
    # -1024, the usual case), no slice's actual range needs to be read (two passes over the volume).
    allowed = [_stored_range(dtype, lay[2]) for lay in layouts]
    bounded = _output_dtype([(lo, hi, lay[3], lay[4]) for (lo, hi), lay in zip(allowed, layouts)]) == np.int16

    def fill(k: int) -> tuple[float, float]:
        offset, _, stored, _, _ = layouts[k]
        with open(geometry.headers[k].path, "rb") as fh:
            fh.seek(offset)
            if fh.readinto(memoryview(stack[k]).cast("B")) != stack[k].nbytes:
                raise _CutShort  # the decoding path names the problem as pydicom sees it
        _keep_stored_bits(stack[k], stored)
        return allowed[k] if bounded else (float(stack[k].min()), float(stack[k].max()))

    try:
        with ThreadPoolExecutor(max_workers=max(1, min(workers, nz))) as pool:
            ranges = list(pool.map(fill, range(nz)))
    except (_CutShort, OSError):
        return None
    if _output_dtype([(lo, hi, lay[3], lay[4]) for (lo, hi), lay in zip(ranges, layouts)]) != np.int16:
        return None  # int32 or float: the general path
    out = stack if dtype == np.int16 else stack.view(np.int16) if dtype.itemsize == 2 else stack.astype(np.int16)
    for k, (_, _, _, slope, intercept) in enumerate(layouts):
        _rescale_in_place(out[k], slope, intercept)
    return out.transpose(2, 1, 0)


def read_series(geometry: Geometry, workers: int = READ_WORKERS) -> np.ndarray:
    """Pixel data of a validated series as an (X, Y, Z) = (columns, rows, slices) volume, rescaled.

    Intensities are ``stored * slope + intercept`` (per frame for enhanced files): int16 when integral and in range,
    int32 when integral and larger, else float32.

    Raises:
        CaseRejected: a slice has no pixel data, cannot be decoded, or has the wrong size.
    """
    fast = _read_stored_series(geometry, workers)
    if fast is not None:
        return fast
    nx, ny, nz = geometry.shape
    by_file: dict = {}
    for k, h in enumerate(geometry.headers):  # a multi-frame file is read once for all its frames
        by_file.setdefault(h.path, []).append((k, h))

    def frames(slices: list[tuple[int, Header]]) -> list[tuple[int, np.ndarray, float, float]]:
        """Decode one file: ``(slice index, stored pixels, slope, intercept)`` for each of its slices."""
        data, slope, intercept = _read_pixels(slices[0][1], (ny, nx))
        out = []
        for k, h in slices:
            if h.frame is None:
                out.append((k, data, slope, intercept))
            else:
                out.append((k, data[h.frame], *(h.rescale or (slope, intercept))))
        return out

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(by_file)))) as pool:
        decoded = [f for file_frames in pool.map(frames, by_file.values()) for f in file_frames]
    # The stored pixels first, then one output array in its final type: a float32 stack converted afterwards wrote
    # 300 MB more for a 512x512x300 CT, and fresh memory is slow to touch (ingest was 1.35x dcm2niix; see
    # benchmarks/ingest.py). Slices fill a contiguous (Z, Y, X) buffer whose transposed view is the (X, Y, Z) result:
    # Fortran-ordered, which is NIfTI's on-disk order; writing each slice into an (X, Y, Z) C array strides memory.
    stack = np.empty((nz, ny, nx), dtype=_output_dtype(_integral_ranges(decoded)))
    for k, arr, slope, intercept in decoded:
        _rescale_into(stack[k], arr, slope, intercept)
    return stack.transpose(2, 1, 0)

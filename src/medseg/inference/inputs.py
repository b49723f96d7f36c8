"""What ``medseg predict`` segments: the images found in a NIfTI or 2D image file, a DICOM series folder, or a folder
of them, each read by ingest's own readers (the DICOM series through :func:`medseg.ingest.dicom.image_series`, with
the same checks and spacing tolerance), an unusable one reported with its reason; where the outputs go, and under
which names.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.common.errors import StageInputError

__all__ = ["Input", "Unreadable", "find_inputs", "prediction_units", "output_names", "output_folder"]


@dataclass(frozen=True)
class Input:
    """One image to segment.

    Attributes:
        name: output stem (NIfTI file or image stem, or DICOM series folder name).
        image: ``(X, Y, Z)``, or ``(X, Y, Z, channels)`` for an RGB frame, in the source's own type and memory order
            (:func:`medseg.inference.predict.segment` makes float32 of it once, in that order: a C-order float
            copy of a CT first is a large share of its prediction, benchmarks/README.md).
        affine: RAS affine the model sees the image with (ingest's reading of the file).
        output_affine: affine written to the output (the NIfTI file's own; for DICOM the same as ``affine``).
        modality: the DICOM Modality ("CT"/"MR"), None for NIfTI (the model's modality is used).
        dicom_files: DICOM source files in sorted slice order (``image[..., k]`` is ``dicom_files[k]``), else empty.
    """

    name: str
    image: np.ndarray = field(repr=False)
    affine: np.ndarray = field(repr=False)
    output_affine: np.ndarray = field(repr=False)
    modality: str | None = None
    dicom_files: tuple[Path, ...] = field(default=(), repr=False)
    source: Path | None = field(default=None, repr=False)
    pixels: np.ndarray | None = field(default=None, repr=False)  # a 2D frame's own pixels: written back as PNG


@dataclass(frozen=True)
class Unreadable:
    """An input found but not usable: ``name`` as its output would have been named, ``reason`` one line."""

    name: str
    reason: str


def _dicom_inputs(folder: Path, spacing_rel_tol: float | None = None) -> Iterator[Input | Unreadable]:
    """The image series under ``folder``, found and read as ingest reads them (:func:`medseg.ingest.dicom.image_series`:
    same checks, slice order and spacing tolerance, RAS affine, HU). SEG/RTSTRUCT files (e.g. an earlier
    ``--dicom-seg`` output) and files that are not DICOM are skipped."""
    from medseg.ingest.checks import checked_image
    from medseg.ingest.common import CaseRejected, iter_files, modality_name, rel
    from medseg.ingest.dicom import SPACING_REL_TOL, image_series, read_headers
    from medseg.ingest.dicom_headers import group_series
    from medseg.ingest.dicom_label_match import is_label_object
    from medseg.ingest.dicom_pixels import read_series

    headers = read_headers(iter_files(folder))
    groups = group_series([h for h in headers if not is_label_object(h)])
    for series in image_series(groups, folder, SPACING_REL_TOL if spacing_rel_tol is None else spacing_rel_tol):
        name = folder.name if series.folder == folder else series.folder.name
        source = name if series.phase is None else f"{name}_phase{series.phase_number}"
        try:
            if series.problem is not None:
                raise CaseRejected(series.problem)
            image = checked_image(read_series(series.geometry), affine=series.geometry.affine)
        except CaseRejected as err:
            yield Unreadable(source, f"DICOM series {rel(series.folder, folder)}: {err}")
            continue
        modality = series.members[0].modality
        yield Input(source, image, series.geometry.affine, series.geometry.affine,
                    modality_name(modality) if modality else None, tuple(h.path for h in series.geometry.headers))


def find_inputs(path: Path, spacing_rel_tol: float | None = None) -> Iterator[Input | Unreadable]:
    """Every image to segment in a NIfTI file, a DICOM series folder, or a folder of either; an input that cannot be
    used is an :class:`Unreadable` (with its reason), so that the others still run.

    Images pass ingest's own checks (:func:`medseg.ingest.checks.checked_image`). NIfTI goes through ingest's own
    reader, so the model sees the geometry it was trained on (e.g. ACDC's pixdim spacing where the sform says 1 mm);
    the output keeps the input file's own affine, on the same voxel grid. ``spacing_rel_tol``: how far a DICOM
    series' slice gaps may differ from the median (``data.slice_spacing_tolerance``; None: ingest's default).

    Raises:
        StageInputError: ``path`` does not exist, or holds no NIfTI file or DICOM series at all.
    """
    from medseg.ingest.checks import checked_image
    from medseg.ingest.common import CaseRejected
    from medseg.ingest.images import is_image, read_frame
    from medseg.ingest.nifti import is_nifti, nifti_stem, read_nifti

    path = Path(os.path.abspath(Path(path).expanduser()))  # "." has no name, its absolute form has (links kept)
    if not path.exists():
        raise StageInputError(f"input not found: {path}")
    if path.is_file() and is_image(path):
        try:
            pixels, volume, affine, modality, channels = read_frame(path)
            image = checked_image(volume, channels, affine)
            yield Input(path.stem, image, affine, affine, modality, source=path,
                        pixels=pixels)
        except CaseRejected as err:
            yield Unreadable(path.stem, f"{path.name}: {err}")
        return
    if path.is_file() and is_nifti(path):
        try:
            array, affine, file_affine = read_nifti(path)
            yield Input(nifti_stem(path), checked_image(array, affine=affine), affine, file_affine, source=path)
        except CaseRejected as err:
            yield Unreadable(nifti_stem(path), f"{path.name}: {err}")
        return
    if not path.is_dir():
        raise StageInputError(f"{path}: neither a NIfTI or image file nor a folder")
    files = sorted(p for p in path.iterdir() if p.is_file() and (is_nifti(p) or is_image(p)))
    for p in files:
        yield from find_inputs(p, spacing_rel_tol)
    found = bool(files)
    for item in _dicom_inputs(path, spacing_rel_tol):
        found = True
        yield item
    if not found:
        raise StageInputError(f"no NIfTI file, image file or readable DICOM series in {path}")


def prediction_units(path: Path) -> list[Path]:
    """What a batch splits into, one task each: the NIfTI and image files directly in ``path`` and each of its sub-folders (a
    study or series, DICOM at any depth below); ``path`` itself when it is a file or holds DICOM files directly."""
    from medseg.ingest.dicom_headers import looks_like_dicom
    from medseg.ingest.images import is_image
    from medseg.ingest.nifti import is_nifti

    path = Path(os.path.abspath(Path(path).expanduser()))
    if not path.exists():
        raise StageInputError(f"input not found: {path}")
    if path.is_file():
        return [path]
    entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    if any(p.is_file() and not is_nifti(p) and not is_image(p) and looks_like_dicom(p) for p in entries):
        return [path]
    return [p for p in entries if p.is_dir() or (p.is_file() and (is_nifti(p) or is_image(p)))]


def output_names(name: str, taken: set[str]) -> str:
    """A file stem for ``name`` that is safe (no separator, not hidden) and not in ``taken`` (then added to it):
    the first clash gets ``_2``, the next ``_3``, in the order inputs are found, which is sorted and so stable."""
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).lstrip(".") or "image"
    unique, k = stem, 1
    while unique.lower() in taken:  # case-insensitive file systems (macOS, Windows) clash on case alone
        k += 1
        unique = f"{stem}_{k}"
    taken.add(unique.lower())
    return unique


def output_folder(out_dir: Path, input_path: Path) -> Path:
    """``out_dir``, created; refused when it is a file, not writable, or overlaps the input folder (predictions are
    never written among, or over, the user's inputs)."""
    from medseg.ingest.common import folders_overlap

    try:
        out_dir, source = out_dir.expanduser().resolve(), input_path.expanduser().resolve()
    except (RuntimeError, OSError) as err:  # a symlink loop (RuntimeError before Python 3.13), a name too long
        why = "a symlink loop" if isinstance(err, RuntimeError) else err.strerror or type(err).__name__
        raise StageInputError(f"{input_path.name or input_path} cannot be followed to a file: {why}") from None
    if out_dir.exists() and not out_dir.is_dir():
        raise StageInputError(f"--out {out_dir} is a file, not a folder")
    if source.is_dir() and folders_overlap(out_dir, source):
        raise StageInputError(f"--out {out_dir} overlaps the input folder {source}: choose a folder outside it")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StageInputError(f"--out {out_dir} cannot be created: {err.strerror}") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise StageInputError(f"--out {out_dir} is not writable")
    return out_dir

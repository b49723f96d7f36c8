"""NIfTI reading shared by all NIfTI-based layouts, and the plain ``nifti`` layout.

Layout: ``SOURCE/images/*.nii[.gz]`` with optional ``SOURCE/labels/<same name>`` (the nnU-Net form
``case_0000.nii.gz`` -> ``labels/case.nii.gz`` is accepted too), or a flat folder of NIfTI images without labels.
Modality comes from ``SOURCE/dataset.json`` (``modality`` or ``channel_names``) when present; otherwise it is guessed
per image: "CT" when the image minimum is below -500 (Hounsfield units), else "MR". The label map comes from
``dataset.json`` ``labels`` or ``SOURCE/labels.json``; without either, labels are named ``class_N`` from the values
seen.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from medseg.ingest.common import CaseRejected, Item, Loaded, Scan, label_names_from_json, modality_name, named, \
    read_label_json, rel
from medseg.common.pseudonym import pseudonym

__all__ = ["NIFTI_SUFFIXES", "is_nifti", "nifti_stem", "load_nifti", "pair_loader", "list_nifti_images",
           "scan_nifti"]

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def is_nifti(path: Path) -> bool:
    """True for ``*.nii`` / ``*.nii.gz`` files that are not macOS ``._`` resource forks."""
    return path.name.lower().endswith(NIFTI_SUFFIXES) and not path.name.startswith(".")


def nifti_stem(path: Path) -> str:
    """``x.nii.gz`` -> ``x``."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def load_nifti(path: Path, what: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI file as (array in native byte order, 4x4 affine); source dtype kept unless scaled by the header.

    Raises:
        CaseRejected: the file is missing or cannot be read.
    """
    data, affine, _ = read_nifti(path, what)
    return data, affine


def read_nifti(path: Path, what: str = "image") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`load_nifti`, and the file's own affine (``nib.load(path).affine``: the grid an output written back
    beside the input keeps), from one read of the header."""
    import nibabel as nib

    if not Path(path).is_file():
        problem = "a link that loops or points nowhere" if Path(path).is_symlink() else "missing"
        raise CaseRejected(f"{what} file is {problem}: {Path(path).name}")
    try:
        img = nib.load(str(path))
        _check_size(img, Path(path), what)
        data = _read_data(img, Path(path))
        affine, file_affine = _checked_affine(img, Path(path).name), img.affine
    except CaseRejected:
        raise
    except Exception as err:  # corrupt gzip, bad header (an affine nibabel cannot decompose), truncated data
        raise CaseRejected(f"cannot read {what} NIfTI: {type(err).__name__}: {err}") from None
    if not data.dtype.isnative:
        data = data.astype(data.dtype.newbyteorder("="))
    return data, affine, file_affine


# The most voxel data one NIfTI image may hold (2 GiB: a 1024x1024x1000 int16 volume), and the most a gzip stream
# can inflate per byte (zlib's maximum ratio is about 1032:1): a header claiming more is refused before any reading
MAX_IMAGE_BYTES = 2 * 2**30
MAX_GZIP_RATIO = 1100


def _check_size(img, path: Path, what: str) -> None:
    """Refuse a header whose dimensions need more bytes than :data:`MAX_IMAGE_BYTES`, or than the file can hold (a
    60000x60000 header on a 1 MB file), before anything is allocated."""
    dtype = img.header.get_data_dtype()
    if dtype.fields is not None or dtype.kind == "c":
        raise CaseRejected(f"{what} NIfTI holds {'RGB' if dtype.fields else 'complex'} voxels ({dtype}); medseg reads "
                           f"one real value per voxel (a scan), or RGB frames as PNG/JPEG")
    shape = img.header.get_data_shape()
    needed = float(np.prod([float(s) for s in shape])) * img.header.get_data_dtype().itemsize
    stored = path.stat().st_size
    holds = stored * MAX_GZIP_RATIO if path.name.lower().endswith(".gz") else stored
    if needed > MAX_IMAGE_BYTES or needed > holds:
        raise CaseRejected(f"{what} NIfTI header claims {tuple(int(s) for s in shape)} voxels ({needed / 2**30:.3g} "
                           f"GiB), more than " + ("medseg reads (2 GiB)" if needed > MAX_IMAGE_BYTES else
                                                  f"the {stored}-byte file holds"))


def _read_data(img, path: Path) -> np.ndarray:
    """The voxels of ``img`` (loaded from ``path``) as nibabel's ``dataobj`` gives them; a gzipped file is inflated by
    ISA-L when it is installed (about twice as fast as Python's gzip: benchmarks/README.md)."""
    import nibabel as nib

    from medseg.common.fast_gzip import open_fast

    stream = open_fast(path) if path.name.lower().endswith(".gz") else None
    if stream is None:
        return np.asanyarray(img.dataobj)
    with stream:  # the same image class nib.load chose, read through this stream
        holder = nib.FileHolder(fileobj=stream)
        return np.asanyarray(type(img).from_file_map({"header": holder, "image": holder}).dataobj)


def _checked_affine(img, name: str) -> np.ndarray:
    """``img.affine``, with its column lengths replaced by the header's pixdim when the sform disagrees with it.

    Some files (the public ACDC copy among them) carry an sform with 1 mm columns while ``pixdim`` holds the real
    spacing (e.g. 1.5625 x 1.5625 x 10 mm); the directions and origin of the sform are kept.
    """
    affine = np.asarray(img.affine, dtype=np.float64)
    header = img.header
    if "sform_code" not in header or int(header["sform_code"]) == 0:
        return affine
    _check_qform_matches_sform(img, name)
    zooms = np.asarray(header.get_zooms()[:3], dtype=np.float64)
    norms = np.linalg.norm(affine[:3, :3], axis=0)
    if len(zooms) < 3 or np.any(zooms <= 0) or np.any(norms == 0) or np.allclose(norms, zooms, rtol=1e-4):
        return affine
    log.info("sform spacing %s disagrees with pixdim %s; using pixdim",  # no file name: ingest logs none
             tuple(np.round(norms, 4).tolist()), tuple(np.round(zooms, 4).tolist()))
    fixed = affine.copy()
    fixed[:3, :3] = affine[:3, :3] / norms * zooms
    return fixed


# The qform is stored as a float32 quaternion: allow its rounding, not a different geometry.
QFORM_TRANSLATION_TOL_MM = 0.01
QFORM_LINEAR_TOL = 1e-3


def _check_qform_matches_sform(img, name: str) -> None:
    """Refuse a file whose qform and sform (both set) describe different geometries.

    Readers disagree on which one wins (nibabel and ITK prefer the sform, FSL may use the qform), so such a file has
    no single world position; dcm2niix-style silent preference would hide it.
    """
    from medseg.ingest.checks import affine_mismatch

    header = img.header
    if int(header["qform_code"]) == 0:
        return
    qform, sform = header.get_qform(), header.get_sform()
    diff = affine_mismatch(qform, sform, QFORM_TRANSLATION_TOL_MM, QFORM_LINEAR_TOL)
    if diff:
        raise CaseRejected(f"{name}: qform and sform disagree ({diff}); fix the header so both describe the same "
                           "geometry (e.g. nibabel: img.set_qform(img.get_sform())) and ingest again")


def pair_loader(image_path: Path, label_path: Path | None):
    """A ``load()`` callable for an image file and an optional label file."""

    def load() -> Loaded:
        image, affine = load_nifti(image_path, "image")
        if label_path is None:
            return Loaded(image, affine)
        label, label_affine = load_nifti(label_path, "label")
        return Loaded(image, affine, label, label_affine)

    return load


def list_nifti_images(source: Path) -> tuple[list[Path], Path | None]:
    """The image files of a ``nifti`` layout and its label folder (None for a flat folder)."""
    images_dir = source / "images"
    if images_dir.is_dir():
        labels_dir = source / "labels"
        return sorted(p for p in images_dir.iterdir() if p.is_file() and is_nifti(p)), labels_dir
    return sorted(p for p in source.iterdir() if p.is_file() and is_nifti(p)), None


def _label_for(image: Path, labels_dir: Path | None) -> Path | None:
    if labels_dir is None or not labels_dir.is_dir():
        return None
    stem = nifti_stem(image)
    stems = [stem, stem[:-5]] if stem.endswith("_0000") else [stem]
    for s in stems:
        for suffix in NIFTI_SUFFIXES:
            if named(labels_dir / f"{s}{suffix}"):
                return labels_dir / f"{s}{suffix}"
    return None


def _dataset_json(source: Path) -> tuple[str | None, dict[int, str] | None]:
    """Modality and label map from ``SOURCE/dataset.json`` and ``SOURCE/labels.json``, where present."""
    modality, labels = None, None
    path = source / "dataset.json"
    if path.is_file():
        raw = json.loads(path.read_text())
        mod = raw.get("modality", raw.get("channel_names"))
        if isinstance(mod, dict) and mod:
            modality = modality_name(next(iter(mod.values())))
        elif isinstance(mod, str):
            modality = modality_name(mod)
        if isinstance(raw.get("labels"), dict):
            labels = label_names_from_json(raw["labels"])
    if labels is None and (source / "labels.json").is_file():
        labels = read_label_json(source / "labels.json")
    return modality, labels


def scan_nifti(source: Path, skip: tuple[Path, ...] = ()) -> Scan:
    """Find the cases of a ``nifti`` layout (see the module docstring)."""
    modality, labels = _dataset_json(source)
    images, labels_dir = list_nifti_images(source)
    scan = Scan(labels=labels)
    for image in images:
        stem = nifti_stem(image)
        subject = pseudonym(stem)
        scan.items.append(Item(source=rel(image, source), subject=subject, case_id=subject,
                               load=pair_loader(image, _label_for(image, labels_dir)), modality=modality))
    return scan

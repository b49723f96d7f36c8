"""Which layout a SOURCE folder has: acdc, msd, dicom, nifti or images, tried in that order."""

from __future__ import annotations

from pathlib import Path

from medseg.common.errors import IngestError
from medseg.ingest.acdc import find_patients
from medseg.ingest.common import CaseRejected, iter_files
from medseg.ingest.dicom_headers import looks_like_dicom, read_header
from medseg.ingest.images import is_images_layout
from medseg.ingest.msd import find_msd_root
from medseg.ingest.nifti import list_nifti_images

__all__ = ["LAYOUTS", "LAYOUT_HELP", "detect_layout", "layout_help"]

LAYOUTS = ("acdc", "msd", "dicom", "nifti", "images")
LAYOUT_HELP = {
    "acdc": "patientNNN/Info.cfg (ED, ES, Group) beside patientNNN_frameYY.nii.gz and optional _gt.nii.gz labels",
    "msd": "Medical Segmentation Decathlon task: dataset.json with a 'training' list, imagesTr/, labelsTr/",
    "dicom": "DICOM files at any depth (any names); optional labels/<series folder>.nii.gz and labels.json",
    "nifti": "images/*.nii[.gz] with optional labels/<same name>, or a flat folder of *.nii[.gz]",
    "images": "2D PNG/JPEG/TIFF/BMP frames: images/ + masks/ (same stem, or <stem>_mask), CVC-ClinicDB's Original/ + "
              "Ground Truth/, or a flat folder; optional labels.json and groups.csv",
}


def layout_help() -> str:
    """The accepted layouts on one line, for error messages (each error is one line)."""
    return "; ".join(f"{name}: {text}" for name, text in LAYOUT_HELP.items())


def _is_dicom(path: Path) -> bool:
    kind = looks_like_dicom(path)
    if kind != "raw":
        return kind == "preamble"
    try:
        read_header(path)
    except CaseRejected:
        return False
    return True


def _any_dicom(source: Path, skip: tuple[Path, ...]) -> bool:
    return any(_is_dicom(p) for p in iter_files(source, (*skip, source / "labels")))


def detect_layout(source: Path, skip: tuple[Path, ...] = ()) -> str:
    """The first of acdc (an Info.cfg), msd (dataset.json with 'training'), dicom (a file that looks like DICOM),
    nifti (NIfTI images), images (2D image files) that ``source`` matches.

    Raises:
        IngestError: ``source`` matches none of them; the message lists what each layout looks like.
    """
    if find_patients(source, skip):
        return "acdc"
    if find_msd_root(source) is not None:
        return "msd"
    if _any_dicom(source, skip):
        return "dicom"
    if list_nifti_images(source)[0]:
        return "nifti"
    if is_images_layout(source):
        return "images"
    raise IngestError(f"no ingestible data found in {source}; accepted layouts (--layout): {layout_help()}")

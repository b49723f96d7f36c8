"""Ingest stage: read ACDC, MSD, DICOM or NIfTI data into ``images/``, ``labels/``, ``manifest.json`` and
``ingest_report.json``.

Every case is checked (3D, finite, label on the image's grid, label values in the label map); a case that fails is
listed in the report with its reason and the rest are still ingested. Geometry is kept as in the source (no
reorientation); ``case_id`` and ``subject`` are keyed pseudonyms, and no patient identifier reaches the outputs or the
log. This package imports neither torch nor MONAI.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from medseg.atomic import save_nifti, write_json
from medseg.errors import IngestError
from medseg.ingest.acdc import scan_acdc
from medseg.ingest.checks import as_3d, check_image, check_label, guess_modality, spacing_of
from medseg.ingest.common import CaseRejected, Item, Scan
from medseg.ingest.dicom import scan_dicom
from medseg.ingest.layouts import LAYOUT_HELP, LAYOUTS, detect_layout, layout_help
from medseg.ingest.msd import scan_msd
from medseg.ingest.nifti import scan_nifti
from medseg.manifest import REPORT_NAME, Case, write_manifest

__all__ = ["run", "detect_layout", "LAYOUTS", "READERS"]

log = logging.getLogger(__name__)

READERS = {"acdc": scan_acdc, "msd": scan_msd, "dicom": scan_dicom, "nifti": scan_nifti}


def _image_dtype(image: np.ndarray) -> np.dtype:
    """Keep the source dtype, except float64 -> float32, bool -> uint8 and 64-bit integers -> int32 when in range."""
    if image.dtype == np.float64 or np.issubdtype(image.dtype, np.floating) and image.dtype.itemsize > 4:
        return np.dtype(np.float32)
    if image.dtype == bool:
        return np.dtype(np.uint8)
    if np.issubdtype(image.dtype, np.integer) and image.dtype.itemsize > 4:
        info = np.iinfo(np.int32)
        fits = image.size == 0 or (image.min() >= info.min and image.max() <= info.max)
        return np.dtype(np.int32 if fits else np.float32)
    return image.dtype


def _ingest_one(item: Item, out_dir: Path, allowed: set[int] | None) -> tuple[Case, set[int]]:
    """Load, check and write one case; returns its manifest entry and the label values it holds."""
    try:
        loaded = item.load()
    except CaseRejected:
        raise
    except Exception as err:  # a reader bug or an odd file must not stop the other cases
        log.debug("unexpected error reading %s", item.source, exc_info=True)
        raise CaseRejected(f"unexpected error while reading: {type(err).__name__}: {str(err)[:200]}") from None
    image = as_3d(np.asarray(loaded.image), "image")
    check_image(image)
    label, values = None, set()
    if loaded.label is not None:
        label = check_label(np.asarray(loaded.label), loaded.label_affine, image.shape, loaded.affine, allowed)
        values = {int(v) for v in np.unique(label)}
    image_rel = f"images/{item.case_id}.nii.gz"
    save_nifti(out_dir / image_rel, image, loaded.affine, dtype=_image_dtype(image))
    label_rel = None
    if label is not None:
        label_rel = f"labels/{item.case_id}.nii.gz"
        save_nifti(out_dir / label_rel, label, loaded.affine, dtype=np.uint8)
    case = Case(case_id=item.case_id, subject=item.subject, image=image_rel, label=label_rel,
                modality=item.modality or guess_modality(image), spacing=spacing_of(loaded.affine),
                shape=tuple(int(s) for s in image.shape), phase=item.phase, group=item.group)
    return case, values


def _remove_stale(out_dir: Path, keep: set[str]) -> None:
    """Delete files in ``images/`` and ``labels/`` that the new manifest does not list."""
    for sub in ("images", "labels"):
        folder = out_dir / sub
        if folder.is_dir():
            for path in folder.iterdir():
                if path.is_file() and f"{sub}/{path.name}" not in keep:
                    log.info("removing stale %s/%s", sub, path.name)
                    path.unlink()


def run(source: Path, out_dir: Path, layout: str = "auto") -> dict[str, Any]:
    """Ingest ``source`` into ``out_dir``.

    Args:
        source: folder to read.
        out_dir: output folder; receives ``images/``, ``labels/``, ``manifest.json`` and ``ingest_report.json``.
        layout: "auto" (detect acdc, msd, dicom, nifti in that order) or one of :data:`LAYOUTS`.

    Returns:
        Summary: ``layout``, ``out``, counts ``accepted``, ``rejected``, ``labelled``, and the ``manifest`` and
        ``report`` paths.

    Raises:
        IngestError: ``source`` does not exist, no layout matches, or no case passed the checks.
    """
    source = Path(source).expanduser().resolve()
    out_dir = Path(out_dir).expanduser().resolve()
    if not source.exists():
        raise IngestError(f"source {source} does not exist (data.source in params.yaml, or the SOURCE argument); "
                          f"it should be a folder in one of these layouts:\n{layout_help()}")
    if not source.is_dir():
        raise IngestError(f"source {source} is not a folder")
    skip = (out_dir,)
    if layout == "auto":
        layout = detect_layout(source, skip)
    elif layout not in READERS:
        raise IngestError(f"unknown layout {layout!r}; choose auto or one of {', '.join(LAYOUTS)}")
    log.info("ingesting %s as layout %s", source, layout)
    scan: Scan = READERS[layout](source, skip)
    rejected = list(scan.rejected)
    for r in scan.rejected:
        log.warning("rejected %s: %s", r["source"], r["reason"])
    allowed = set(scan.labels) if scan.labels else None
    cases: dict[str, Case] = {}
    accepted, values_seen = [], set()
    for item in tqdm(scan.items, desc=f"ingest {layout}", unit="case", disable=None):
        try:
            if item.case_id in cases:
                raise CaseRejected("duplicate case: same patient and series/phase as an accepted case")
            case, values = _ingest_one(item, out_dir, allowed)
        except CaseRejected as err:
            rejected.append({"source": item.source, "reason": str(err)})
            log.warning("rejected %s: %s", item.source, err)
            continue
        cases[case.case_id] = case
        values_seen |= values
        accepted.append({"source": item.source, "case_id": case.case_id})
    if not cases:
        first = "; ".join(f"{r['source']}: {r['reason']}" for r in rejected[:3])
        raise IngestError(f"nothing usable in {source} (layout {layout}: {LAYOUT_HELP[layout]}); "
                          f"{len(rejected)} rejected" + (f", e.g. {first}" if first else ""))
    labels = dict(scan.labels) if scan.labels else {0: "background", **{v: f"class_{v}" for v in values_seen if v}}
    keep = {c.image for c in cases.values()} | {c.label for c in cases.values() if c.label}
    _remove_stale(out_dir, keep)
    manifest = write_manifest(out_dir, layout, labels, list(cases.values()))
    report = write_json(out_dir / REPORT_NAME, {"source_layout": layout, "accepted": accepted, "rejected": rejected})
    labelled = sum(c.label is not None for c in cases.values())
    log.info("ingest: %d cases accepted (%d with labels), %d rejected -> %s", len(cases), labelled, len(rejected),
             out_dir)
    return {"layout": layout, "out": str(out_dir), "accepted": len(cases), "rejected": len(rejected),
            "labelled": labelled, "manifest": str(manifest), "report": str(report)}

"""The Medical Segmentation Decathlon layout: ``dataset.json`` + ``imagesTr/`` + ``labelsTr/``.

``dataset.json`` gives ``modality`` (``{"0": "CT"}``), ``labels`` (``{"0": "background", "1": "pancreas"}``) and the
``training`` list of ``{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}``. Only 3D single-modality
tasks are ingested: 4D multi-modal images (BraTS, prostate) are rejected case by case. macOS ``._*`` files are skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

from medseg.common.errors import IngestError
from medseg.ingest.common import Item, Scan, label_names_from_json, modality_name, rel
from medseg.ingest.nifti import nifti_stem, pair_loader
from medseg.common.pseudonym import pseudonym

__all__ = ["find_msd_root", "scan_msd"]


def _has_training_list(path: Path) -> bool:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and isinstance(raw.get("training"), list)


def find_msd_root(source: Path) -> Path | None:
    """``source`` if it holds an MSD ``dataset.json``, else its only sub-folder that does (a task folder), else None."""
    if _has_training_list(source / "dataset.json"):
        return source
    found = [d for d in sorted(source.iterdir()) if d.is_dir() and not d.name.startswith(".")
             and _has_training_list(d / "dataset.json")] if source.is_dir() else []
    return found[0] if len(found) == 1 else None


def scan_msd(source: Path, skip: tuple[Path, ...] = ()) -> Scan:
    """Find the training cases of the MSD task in ``source`` (or in its single task sub-folder)."""
    root = find_msd_root(source)
    if root is None:
        raise IngestError(f"{source}: no MSD dataset.json with a 'training' list (in it or in one task sub-folder)")
    raw = json.loads((root / "dataset.json").read_text())
    modalities = raw.get("modality") or {"0": "CT"}
    try:
        labels = label_names_from_json(raw["labels"]) if isinstance(raw.get("labels"), dict) else None
    except ValueError as err:
        raise IngestError(f"{rel(root / 'dataset.json', source)}: {err}") from None
    scan = Scan(labels=labels, name=raw["name"] if isinstance(raw.get("name"), str) else None)
    modality = modality_name(next(iter(modalities.values()))) if isinstance(modalities, dict) else \
        modality_name(str(modalities))
    for entry in raw["training"]:
        image_rel = entry.get("image") if isinstance(entry, dict) else entry
        if not isinstance(image_rel, str):
            scan.reject(rel(root / "dataset.json", source), f"training entry without an image path: {entry!r}")
            continue
        image, problem = _listed(root, image_rel, "image")
        if image is not None and image.name.startswith("._"):
            continue
        if problem:
            scan.reject(rel(root / "dataset.json", source) if image is None else rel(image, source), problem)
            continue
        label_rel = entry.get("label") if isinstance(entry, dict) else None
        label, problem = _listed(root, label_rel, "label") if isinstance(label_rel, str) else (None, None)
        if problem:
            scan.reject(rel(image, source), problem)
            continue
        subject = pseudonym(nifti_stem(image))
        scan.items.append(Item(source=rel(image, source), subject=subject, case_id=subject,
                               load=pair_loader(image, label), modality=modality))
    return scan


def _listed(root: Path, value: str, what: str) -> tuple[Path | None, str | None]:
    """The file a ``dataset.json`` entry names, or why it cannot be used: missing, outside the task's folder
    (``../../etc/passwd``: a data set only lists its own files), or not a usable path (too long, ...)."""
    try:
        path = (root / value).resolve()
        if not path.is_relative_to(root.resolve()):
            return None, f"{what} path listed in dataset.json lies outside the data set's folder"
        if not path.is_file():
            return path, f"{what} file listed in dataset.json is missing: {path.name[:80]}"
    except RuntimeError:  # pathlib's symlink loop (before Python 3.13)
        return None, f"{what} path listed in dataset.json is a symlink loop"
    except (OSError, ValueError) as err:  # ENAMETOOLONG, a NUL byte in the path, ...
        return None, f"{what} path listed in dataset.json is not usable: {type(err).__name__}"
    return path, None

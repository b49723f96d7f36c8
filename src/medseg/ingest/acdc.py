"""The ACDC cardiac cine-MRI layout: ``patientNNN/Info.cfg`` + ``patientNNN_frameYY.nii.gz`` (+ ``_gt``).

Two cases per patient, the ED and ES frames named in ``Info.cfg``; ``_4d.nii.gz`` cine files are not read.
Labels: 0 background, 1 RV cavity, 2 myocardium, 3 LV cavity (:data:`medseg.common.manifest.CARDIAC_LABELS`).
"""

from __future__ import annotations

import re
from pathlib import Path

from medseg.ingest.common import Item, Scan, iter_files, named, rel
from medseg.ingest.nifti import pair_loader
from medseg.common.manifest import CARDIAC_LABELS
from medseg.common.pseudonym import pseudonym

__all__ = ["PATIENT_RE", "find_patients", "read_info_cfg", "scan_acdc"]

PATIENT_RE = re.compile(r"^patient\d+$", re.IGNORECASE)


def find_patients(source: Path, skip: tuple[Path, ...] = ()) -> list[Path]:
    """Folders under ``source`` (itself included) that hold an ``Info.cfg``, sorted by path."""
    return sorted({p.parent for p in iter_files(source, skip) if p.name == "Info.cfg"})


def read_info_cfg(path: Path) -> dict[str, str]:
    """``Key: value`` lines of an ACDC ``Info.cfg`` as a dict (keys as written, e.g. ``ED``, ``ES``, ``Group``)."""
    info: dict[str, str] = {}
    for line in Path(path).read_text(errors="replace").splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info[key.strip()] = value.strip()
    return info


def scan_acdc(source: Path, skip: tuple[Path, ...] = ()) -> Scan:
    """Find the ED and ES cases of every ACDC patient folder under ``source``."""
    scan = Scan(labels=dict(CARDIAC_LABELS), name="acdc")
    for folder in find_patients(source, skip):
        cfg = folder / "Info.cfg"
        name = folder.name
        if not PATIENT_RE.match(name):
            scan.reject(rel(folder, source), "folder with Info.cfg is not named patientNNN")
            continue
        info = read_info_cfg(cfg)
        frames = {}
        for phase in ("ED", "ES"):
            try:
                frames[phase] = int(float(info[phase]))
            except (KeyError, ValueError):
                scan.reject(rel(cfg, source), f"Info.cfg has no valid {phase} frame number")
        if len(frames) < 2:
            continue
        subject = pseudonym(name)
        group = info.get("Group") or None
        for phase, frame in frames.items():
            image = folder / f"{name}_frame{frame:02d}.nii.gz"
            label = folder / f"{name}_frame{frame:02d}_gt.nii.gz"
            if not image.is_file():
                scan.reject(rel(image, source), f"{phase} image (frame {frame}) named in Info.cfg is missing")
                continue
            scan.items.append(Item(source=rel(image, source), subject=subject, case_id=f"{subject}_{phase}",
                                   load=pair_loader(image, named(label)),
                                   modality="MR", phase=phase, group=group))
    return scan

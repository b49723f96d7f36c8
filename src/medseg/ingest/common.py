"""Shared pieces of the ingest readers: the pending-case record, the rejection exception, file walking."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CaseRejected", "CappedReads", "Loaded", "Item", "Scan", "rel", "iter_files", "new_walk", "named", "folders_overlap", "modality_name",
           "label_names_from_json", "read_label_json"]


log = logging.getLogger("medseg.ingest")


class CappedReads:
    """A binary file whose ``read(n)`` never asks for more than the bytes left in it.

    A parser that trusts a length field (DICOM's element lengths, PNG's chunk lengths) asks for as many bytes as the
    field claims, and Python allocates that much before reading: 4 GB for a corrupt field in a 500 kB file. Through
    this wrapper it gets what the file holds and then meets its end, which it reports as truncation.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self._fh = open(path, "rb")
        self._size = os.fstat(self._fh.fileno()).st_size
        self.name = str(path)

    def read(self, n: int | None = -1) -> bytes:
        left = max(0, self._size - self._fh.tell())
        return self._fh.read(left if n is None or n < 0 or n > left else n)

    def __getattr__(self, name: str):  # seek, tell, fileno, readable, ...
        return getattr(self._fh, name)

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "CappedReads":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CaseRejected(Exception):
    """A case or series cannot be ingested; ``str(err)`` is the human-readable reason for the report (made one line
    where every reason goes out: :meth:`medseg.ingest.privacy.Scrubber.public`, predict's ``failed``)."""


@dataclass
class Loaded:
    """One case in memory: ``image`` (X, Y, Z) with its 4x4 RAS ``affine``, and the optional label likewise.

    ``channels``: set for a multi-channel image (X, Y, Z, channels), such as an RGB frame; ``modality``: set when the
    reader knows it from the file (2D images: "RGB" or "GRAY")."""

    image: Any
    affine: Any
    label: Any = None
    label_affine: Any = None
    channels: int | None = None
    modality: str | None = None


@dataclass
class Item:
    """A case found by a reader, not yet loaded.

    Attributes:
        source: path of the case relative to SOURCE (image file or series folder), for the report.
        subject: pseudonym of the patient.
        case_id: pseudonym of the case (``subject`` plus a suffix).
        load: reads the volume(s); raises :class:`CaseRejected` with a reason.
        modality: "CT" or "MR"; None means "guess from intensities" (minimum below -500 -> CT).
    """

    source: str
    subject: str
    case_id: str
    load: Callable[[], Loaded]
    modality: str | None = None
    phase: str | None = None
    group: str | None = None
    # Source identifiers (DICOM: patient_id, study_uid, series_uid): only for the re-identification map asked for with
    # --write-id-map; never written anywhere else, and kept out of repr so no log line can show them.
    identifiers: dict[str, str] = field(default_factory=dict, repr=False)


@dataclass
class Scan:
    """What a reader found: the label map (None: name the values seen), pending cases and early rejections."""

    labels: dict[int, str] | None
    items: list[Item] = field(default_factory=list)
    rejected: list[dict[str, str]] = field(default_factory=list)
    name: str | None = None  # the data set's own name where its layout gives one (a Decathlon task's "name")

    def reject(self, source: str, reason: str) -> None:
        self.rejected.append({"source": source, "reason": reason})


def rel(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` as a POSIX string ("." for the root itself)."""
    try:
        return Path(os.path.relpath(path, root)).as_posix()
    except ValueError:  # other drive on Windows
        return Path(path).as_posix()


def iter_files(root: Path, skip: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Regular files under ``root`` in sorted order; hidden files and folders (``.DS_Store``, ``._x``) and ``skip``
    are left out, and so are links that loop or point nowhere (each logged as one line)."""
    skip_set = {Path(s).resolve() for s in skip}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and _resolved(here / d, root) not in skip_set)
        for name in sorted(filenames):
            path = here / name
            if name.startswith("."):
                continue
            resolved = _resolved(path, root)
            if resolved is not None and resolved not in skip_set and path.is_file():
                yield path


_warned: set[str] = set()  # links warned about in this ingest run (cleared by new_walk)


def new_walk() -> None:
    """Start a new ingest run: links are warned about again."""
    _warned.clear()


def _resolved(path: Path, root: Path) -> Path | None:
    """``path.resolve()``; None (and one warning naming the input's key) for a link that loops or points nowhere."""
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError) as err:  # ELOOP (RuntimeError on Python 3.11), a dangling link
        from medseg.ingest.privacy import input_key

        kind = "loops" if isinstance(err, RuntimeError) or getattr(err, "errno", None) == 40 else "points nowhere"
        key = input_key(rel(path, root))
        if key not in _warned:  # the tree is walked more than once (layout, scan, re-run index): say it once
            _warned.add(key)
            log.warning("skipped %s: a symbolic link that %s", key, kind)
        return None
    return resolved


def folders_overlap(a: Path, b: Path) -> bool:
    """Whether two resolved folders are the same, or one lies inside the other."""
    return a.is_relative_to(b) or b.is_relative_to(a)


def named(path: Path) -> Path | None:
    """``path`` when something is there (a file, or a link even if it points nowhere: loading it then rejects the
    case with its reason), else None. A label named by a layout that cannot be read is a rejection, never a case
    silently ingested without its label."""
    return path if path.is_file() or path.is_symlink() else None


def modality_name(value: str) -> str:
    """Map a modality string (DICOM tag, MSD ``modality`` entry such as "CT", "MRI", "T2", "ADC") to "CT" or "MR"."""
    return "CT" if str(value).strip().upper() in {"CT", "CTA", "CBCT", "PET-CT"} else "MR"


def label_names_from_json(raw: Any) -> dict[int, str]:
    """Label map from ``{"0": "background", "1": "x"}`` or the nnU-Net v2 form ``{"background": 0, "x": 1}``."""
    if not isinstance(raw, dict) or not raw:
        raise ValueError("labels must be a non-empty JSON object")
    if all(str(k).strip().lstrip("-").isdigit() for k in raw):
        return {int(k): str(v) for k, v in raw.items()}
    if all(isinstance(v, int) for v in raw.values()):
        return {int(v): str(k) for k, v in raw.items()}
    raise ValueError('labels must map label values to names, e.g. {"0": "background", "1": "pancreas"}')


def read_label_json(path: Path) -> dict[int, str]:
    """Label map from a JSON file holding either the map itself or an object with a ``labels`` entry."""
    raw = json.loads(Path(path).read_text())
    if isinstance(raw, dict) and isinstance(raw.get("labels"), dict):
        raw = raw["labels"]
    return label_names_from_json(raw)

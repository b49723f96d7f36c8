"""What ingest may say about an input outside the private id map: a keyed ``input-...`` key, and reasons with every
source path and file or folder name taken out.

Folder and file names of hospital exports are identifiers (``DOE_JOHN_MRN12345/``). ``ingest_report.json``, the
re-run cache and the log therefore name each input by :func:`input_key`, a keyed pseudonym of its path relative to
SOURCE; ``--write-id-map`` (private, outside the output folder) maps the keys back to paths. Library messages in
rejection reasons can quote paths and names: :class:`Scrubber` replaces each with ``<input>``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from medseg.common.errors import one_line
from medseg.common.pseudonym import pseudonym

__all__ = ["input_key", "Scrubber"]

# Names that identify nobody: layout names and the words of our own reasons, kept so that reasons still read
# ("image", "labels", "single slice", "DICOMDIR" in a message).
GENERIC = frozenset({
    "image", "images", "label", "labels", "imagestr", "labelstr", "imagests", "labelsts", "dicom", "dicomdir",
    "dataset", "dataset.json", "labels.json", "training", "testing", "database", "nifti", "series", "study",
    "single", "slice", "slices", "file", "files", "folder", "folders", "missing", "empty", "phase", "frame",
    "frames", "volume", "spacing", "shape", "values", "error", "header", "pixel", "data", "seg", "rtstruct",
    "mosaic", "enhanced", "localizer", "scout", "derived", "secondary"})
MIN_TOKEN = 3  # shorter names ("CT", "a") are kept: replacing them would garble every reason
MIN_NUMERIC_TOKEN = 6  # purely numeric names: an MRN is long; "001" or "256" would match numbers in reasons


def input_key(relative_source: str) -> str:
    """The public name of one input (a file or series folder relative to SOURCE), e.g. ``input-3f9c0a1b2d``."""
    return pseudonym(relative_source, prefix="input")


def _tokens(relative_path: str) -> set[str]:
    found = set()
    for part in Path(relative_path).parts:
        stem = part.split(".", 1)[0]
        found |= {part, stem}
    return {t for t in found
            if len(t) >= MIN_TOKEN and t.lower() not in GENERIC and (not t.isdigit() or len(t) >= MIN_NUMERIC_TOKEN)}


class Scrubber:
    """Replace the SOURCE path, and every file and folder name found under it, in text meant for the report or log.

    Args:
        source: the SOURCE folder (absolute).
        relative_paths: every file under SOURCE, relative to it (folders are their parents).
    """

    def __init__(self, source: Path, relative_paths: Iterable[str]) -> None:
        tokens: set[str] = set()
        for path in relative_paths:
            tokens |= _tokens(path)
        tokens |= _tokens(Path(source).name)
        # Longest first, so that a folder name goes before the shorter names inside it; whole names only (not
        # inside a longer word), so that a folder "ED" leaves "EDGE" alone.
        alternatives = "|".join(map(re.escape, sorted(tokens, key=len, reverse=True)))
        self._names = re.compile(f"(?<![A-Za-z0-9])(?:{alternatives})(?![A-Za-z0-9])") if tokens else None
        self._roots = sorted({str(source), Path(source).as_posix()}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for root in self._roots:
            text = text.replace(root, "<source>")
        return self._names.sub("<input>", text) if self._names else text

    def public(self, relative_source: str, reason: str) -> dict[str, str]:
        """A rejection as the report and the log show it: one line, no source names."""
        return {"input": input_key(relative_source), "reason": one_line(self(reason))}

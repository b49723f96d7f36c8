"""Re-run cache of the ingest stage: ``OUT/.ingest_cache.json`` says which cases need no work.

A case is skipped when its key (the size, mtime and path of every source file it reads, the files shared by all
cases such as ``labels/`` and ``labels.json``, the layout and the ingest code itself) is unchanged and its outputs
still exist with the size and mtime recorded when they were written. The key is a fast stat-based fingerprint, not a
hash of the bytes: reading every pixel to hash it would cost about as much as ingesting.

This matters for ``medseg ingest`` run by hand and for the Prefect flow. ``dvc repro`` deletes a stage's outputs
before it runs the stage, so under DVC every case is simply redone (DVC's own cache is what skips work there).

The cache holds pseudonyms (``input-...`` keys for the inputs, see :mod:`.privacy`), hashes, scrubbed rejection
reasons and output paths only: no source path, no patient identifier.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
from pathlib import Path
from typing import Any

from medseg.common.atomic_write import read_json, write_json
from medseg.ingest.common import iter_files, rel
from medseg.common.manifest import CACHE_NAME

__all__ = ["CACHE_NAME", "CACHE_VERSION", "code_version", "SourceIndex", "load_cache", "save_cache", "is_fresh",
           "output_stats"]

log = logging.getLogger(__name__)

CACHE_VERSION = 1


def code_version(settings: str = "") -> str:
    """Hash of the ingest code (this package and :mod:`medseg.common.atomic_write`) and ``settings``: a code change redoes all."""
    import medseg.common.atomic_write as atomic

    h = hashlib.sha256(f"v{CACHE_VERSION}\x1f{settings}".encode())
    files = sorted(Path(__file__).parent.glob("*.py")) + [Path(atomic.__file__)]
    for path in files:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


class SourceIndex:
    """The stat of every file under SOURCE, taken once, to build per-case keys.

    Args:
        source: SOURCE folder.
        skip: folders left out (the output folder when it lies inside SOURCE).
        case_sources: each case's ``Item.source`` (a file or folder relative to SOURCE); files under none of them
            are "shared" and enter every case's key.
        salt: :func:`code_version`, so keys change with the code.
    """

    def __init__(self, source: Path, skip: tuple[Path, ...], case_sources: list[str], salt: str) -> None:
        self._entries = sorted((rel(p, source), *_stat(p)) for p in iter_files(source, skip))
        self._paths = [e[0] for e in self._entries]
        roots = set(case_sources)
        shared = [e for e in self._entries if not _under_any(e[0], roots)]
        self._salt = salt + "\x1f" + _digest(shared)

    @property
    def paths(self) -> list[str]:
        """Every file under SOURCE (bar ``skip``), relative to it, sorted."""
        return list(self._paths)

    def key(self, case_source: str) -> str:
        """Key of the case whose files are ``case_source`` (a file, or every file under a folder)."""
        if case_source in ("", "."):
            entries = self._entries
        else:
            lo = bisect.bisect_left(self._paths, case_source)
            hi = bisect.bisect_left(self._paths, case_source + "/\uffff")
            entries = [e for e in self._entries[lo:hi] if e[0] == case_source or e[0].startswith(case_source + "/")]
        return hashlib.sha256((self._salt + "\x1f" + case_source + "\x1f" + _digest(entries)).encode()).hexdigest()


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _digest(entries: list[tuple[str, int, int]]) -> str:
    h = hashlib.sha256()
    for name, size, mtime in entries:
        h.update(f"{name}\x1f{size}\x1f{mtime}\x1e".encode())
    return h.hexdigest()


def _under_any(path: str, roots: set[str]) -> bool:
    if "." in roots or path in roots:
        return True
    parts = path.split("/")
    return any("/".join(parts[:i]) in roots for i in range(1, len(parts)))


def output_stats(out_dir: Path, rel_paths: list[str]) -> dict[str, list[int]]:
    """``{rel path: [size, mtime_ns]}`` of outputs just written."""
    return {r: list(_stat(out_dir / r)) for r in rel_paths}


def is_fresh(entry: dict[str, Any] | None, key: str, out_dir: Path) -> bool:
    """Whether a cache entry has ``key`` and all its outputs are still there, untouched."""
    if not entry or entry.get("key") != key:
        return False
    for r, recorded in entry.get("outputs", {}).items():
        path = out_dir / r
        if not path.is_file() or list(_stat(path)) != list(recorded):
            return False
    return True


def load_cache(out_dir: Path) -> dict[str, dict[str, Any]]:
    """Cache entries by case_id; empty when the file is missing, unreadable or of another version."""
    path = out_dir / CACHE_NAME
    try:
        raw = read_json(path)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:  # a damaged cache only costs a full re-run
        log.warning("ignoring unreadable ingest cache %s: %s", path.name, err)
        return {}
    if not isinstance(raw, dict) or raw.get("version") != CACHE_VERSION:
        return {}
    return dict(raw.get("cases", {}))


def save_cache(out_dir: Path, cases: dict[str, dict[str, Any]]) -> Path:
    """Write the cache atomically (written last, after the outputs it describes)."""
    return write_json(out_dir / CACHE_NAME, {"version": CACHE_VERSION, "cases": dict(sorted(cases.items()))})

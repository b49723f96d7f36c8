"""Keyed pseudonyms: stable across runs, never the raw patient name, ID or accession number.

The key is ``$MEDSEG_PSEUDONYM_KEY`` when set, else the project's key file ``.medseg/pseudonym.key``, created on first
use with mode 0600 and git-ignored. The project is found from the folder being written (ingest's output folder), then
from the current folder, by walking up to the first folder holding the key file or a project marker (``params.yaml``,
``dvc.yaml``, ``.git``): the same patient gets the same pseudonym wherever a command is started from.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["pseudonym", "project_secret", "key_file", "project_key", "write_id_map", "SECRET_ENV", "SECRET_FILE"]

SECRET_ENV = "MEDSEG_PSEUDONYM_KEY"
SECRET_FILE = Path(".medseg") / "pseudonym.key"  # git-ignored; created on first use
PROJECT_MARKERS = ("params.yaml", "dvc.yaml", ".git")

_active: Path | None = None  # set by project_key(); a module global, so worker threads see it too


def key_file(*starts: str | Path) -> Path:
    """Where the project's key lives for a command working on ``starts`` (default: the current folder).

    The first existing key file above any start wins; else the first project root above any start; else the
    user's own ``~/.medseg/pseudonym.key``.
    """
    folders = [Path(s).expanduser().resolve() for s in (starts or (Path.cwd(),))]
    chains = [[f, *f.parents] for f in folders]
    for chain in chains:
        for folder in chain:
            if (folder / SECRET_FILE).is_file():
                return folder / SECRET_FILE
    for chain in chains:
        for folder in chain:
            if any((folder / marker).exists() for marker in PROJECT_MARKERS):
                return folder / SECRET_FILE
    return Path.home() / SECRET_FILE


@contextlib.contextmanager
def project_key(*starts: str | Path) -> Iterator[Path]:
    """Use the key of the project around ``starts`` (see :func:`key_file`) for every pseudonym made in the block."""
    global _active
    previous, _active = _active, key_file(*starts, Path.cwd())
    try:
        yield _active
    finally:
        _active = previous


def project_secret(secret_file: str | Path | None = None) -> bytes:
    """The HMAC key: ``$MEDSEG_PSEUDONYM_KEY`` if set, else the project's key file (created on first use)."""
    env = os.environ.get(SECRET_ENV)
    if env:
        return env.encode()
    path = Path(secret_file) if secret_file is not None else _active or key_file()
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written whole under a private name, then published with link(), which fails if the key exists: a thread or
        # process starting at the same moment never reads a created but still empty key (it would pseudonymise with
        # an empty key, and its cases would get other names).
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32))
            os.link(tmp, path)
        except FileExistsError:  # another made it first: use theirs
            pass
        finally:
            os.unlink(tmp)
    return path.read_text().strip().encode()


def pseudonym(*identifiers: str, prefix: str = "sub", key: bytes | None = None, length: int = 10) -> str:
    """HMAC-SHA256 of the identifiers under the project secret, e.g. ``sub-3f9c0a1b2d``."""
    key = project_secret() if key is None else key
    message = "\x1f".join(str(i) for i in identifiers).encode()
    digest = hmac.new(key, message, hashlib.sha256).hexdigest()[:length]
    return f"{prefix}-{digest}"


def write_id_map(path: str | Path, mapping: dict[str, dict[str, str]]) -> Path:
    """Write the re-identification map atomically, readable by the owner only: ``{case_id: {"patient_id": ...,
    "source": ...}}`` for each case and ``{input_key: {"source": ...}}`` for each input ingest read (so the
    ``input-...`` keys in ``ingest_report.json`` and the log can be traced back to files).

    Only written when asked for: it is the one file that links pseudonyms back to patients, so keep it out of the
    data folder, out of git (``/.medseg/`` is ignored) and out of DVC.
    """
    import json

    from medseg.common.atomic_write import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        os.chmod(tmp, 0o600)  # before any identifier is written; os.replace keeps the mode
        tmp.write_text(json.dumps(dict(sorted(mapping.items())), indent=2) + "\n")
    os.chmod(path, 0o600)
    return path

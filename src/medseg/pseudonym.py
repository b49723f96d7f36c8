"""Keyed pseudonyms: stable across runs, never the raw patient name, ID or accession number."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

__all__ = ["pseudonym", "project_secret", "write_id_map", "SECRET_ENV", "SECRET_FILE"]

SECRET_ENV = "MEDSEG_PSEUDONYM_KEY"
SECRET_FILE = Path(".medseg") / "pseudonym.key"  # git-ignored; created on first use


def project_secret(secret_file: str | Path = SECRET_FILE) -> bytes:
    """The HMAC key: ``$MEDSEG_PSEUDONYM_KEY`` if set, else the project's key file (created on first use)."""
    env = os.environ.get(SECRET_ENV)
    if env:
        return env.encode()
    path = Path(secret_file)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    return path.read_text().strip().encode()


def pseudonym(*identifiers: str, prefix: str = "sub", key: bytes | None = None, length: int = 10) -> str:
    """HMAC-SHA256 of the identifiers under the project secret, e.g. ``sub-3f9c0a1b2d``."""
    key = project_secret() if key is None else key
    message = "\x1f".join(str(i) for i in identifiers).encode()
    digest = hmac.new(key, message, hashlib.sha256).hexdigest()[:length]
    return f"{prefix}-{digest}"


def write_id_map(path: str | Path, mapping: dict[str, dict[str, str]]) -> Path:
    """Write the re-identification map ``{case_id: {"patient_id": ..., ...}}`` atomically, readable by the owner only.

    Only written when asked for: it is the one file that links pseudonyms back to patients, so keep it out of the
    data folder, out of git (``/.medseg/`` is ignored) and out of DVC.
    """
    import json

    from medseg.atomic import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        os.chmod(tmp, 0o600)  # before any identifier is written; os.replace keeps the mode
        tmp.write_text(json.dumps(dict(sorted(mapping.items())), indent=2) + "\n")
    os.chmod(path, 0o600)
    return path

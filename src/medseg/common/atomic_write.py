"""Atomic outputs: write to a temporary sibling, then rename, so an interrupted stage leaves nothing half-written."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "atomic_dir", "write_json", "read_json", "save_nifti", "TMP_MARKER", "is_temporary",
           "remove_temporaries"]

# Every temporary file or folder we create is named ``.<target name>.medseg-tmp-<random>[suffixes]``: distinctive
# enough that clean-up after a killed run (:func:`remove_temporaries`) can never match a file of the user's.
TMP_MARKER = ".medseg-tmp-"


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    """The process umask (reading it means setting it, so once, not per file from several threads)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; it replaces ``target`` only if the block completes."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Keep the real suffixes (.nii.gz) so libraries that dispatch on the name still work.
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}{TMP_MARKER}", suffix="".join(target.suffixes),
                               dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600; outputs get the usual permissions (0666 less the umask), like any file the user writes.
    os.chmod(tmp_path, 0o666 & ~_umask())
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def save_torch(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj, path)``, atomically (:func:`atomic_path`), and with a full disk raised as what it is: an
    ``OSError`` (ENOSPC) naming ``path``. torch's own file writer reports it as a bare ``RuntimeError`` ("unexpected
    pos"), so the object is serialised in memory first (a checkpoint: tens of MB) and written by Python."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            fh.write(buffer.getbuffer())
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(path)) from err
    return Path(path)


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces ``target`` (whole) only if the block completes."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{TMP_MARKER}", dir=target.parent))
    # mkdtemp creates 0700; the stage folder gets the usual permissions (0777 less the umask), like its files.
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}{TMP_MARKER}old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_temporary(path: Path) -> bool:
    """Whether ``path`` is one of our temporary files or folders (left behind only by a killed process)."""
    return path.name.startswith(".") and TMP_MARKER in path.name


def remove_temporaries(folder: str | Path) -> int:
    """Delete the temporaries a killed run left directly in ``folder``; returns how many. Nothing else is touched."""
    folder = Path(folder)
    removed = 0
    if folder.is_dir():
        for path in folder.iterdir():
            if is_temporary(path) and not path.is_symlink():
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed += 1
    return removed


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")
    return Path(path)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def _jsonable(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_nifti(path: str | Path, array: Any, affine: Any, dtype: Any = None) -> Path:
    """Save a 3D array with a 4x4 RAS affine as NIfTI (qform and sform both set), atomically.

    The header carries nothing but geometry and data type: no description or aux file that could hold identifiers.
    """
    import nibabel as nib
    import numpy as np

    data = np.asarray(array)
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    with atomic_path(path) as tmp:
        if str(path).endswith(".gz"):  # compression is most of the time: on all cores (see medseg.common.fast_gzip)
            from medseg.common.fast_gzip import write_gzip

            write_gzip(tmp, img.to_bytes())
        else:
            nib.save(img, str(tmp))
    return Path(path)

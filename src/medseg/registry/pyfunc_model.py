"""The MLflow form of a trained model: a ``python_function`` model that is the whole predictor, file in, mask out.

``mlflow models serve -m models:/<name>@champion --env-manager local`` answers MLflow's own JSON,
``{"inputs": {"image": ["<base64 of a file's bytes>"]}}``, where the file is a NIfTI volume (``.nii.gz`` or ``.nii``),
a ``.zip`` of one DICOM series, or a 2D image (PNG, JPEG, TIFF, BMP) for a 2D model, with
``{"predictions": ["<base64 of the mask file>"]}``: a ``.nii.gz`` in the input's own geometry for volumes, a PNG at
the image's own size for frames. The mask is ``medseg predict``'s, voxel for voxel: the request's file is written to a
temporary folder and segmented by :func:`medseg.inference.predict.run` with the logged fold's model. A request that
is not such a file, has the wrong channels or is too large is refused with one line (HTTP 400); the server stays up.

Training logs the model with :func:`medseg.registry.model_logging.log_model`, which names this module as the loader
without importing it (training's code is not the predictor's).

Why not ``mlflow.pytorch``: its models are pickles (the network's classes, and a ``pickle_module`` name the loader
imports), so whoever can write to the registry or artifact store can run code on every machine that loads a model.
Here the loader is this module and the data is the fold folder (``model.pt``: weights and inference config, loaded
with ``weights_only=True``; ``inference_config.json``): nothing is unpickled.
"""

from __future__ import annotations

import base64
import binascii
import io
import tempfile
import zipfile
from pathlib import Path
from typing import Any

__all__ = ["Predictor", "MAX_FILE_MB", "file_kind", "max_file_bytes"]

# Largest file a request may carry, decoded (and, for a zip, unpacked), in MB: a 512x512x600 int16 CT is 315 MB.
# The server's environment may set another (MEDSEG_SERVE_MAX_MB).
MAX_FILE_MB = 1024
# (magic bytes at offset, suffix the file is written under) of what a request may carry
_KINDS = ((0, b"\x1f\x8b", ".nii.gz"), (344, b"n+1\x00", ".nii"), (0, b"PK\x03\x04", ".zip"),
          (0, b"\x89PNG\r\n\x1a\n", ".png"), (0, b"\xff\xd8\xff", ".jpg"), (0, b"II*\x00", ".tif"),
          (0, b"MM\x00*", ".tif"), (0, b"BM", ".bmp"))
ACCEPTED = "a NIfTI volume (.nii.gz, .nii), a .zip of one DICOM series, or a PNG/JPEG/TIFF/BMP image"


def max_file_bytes() -> int:
    """The size limit of one request's file, decoded or unpacked: ``MEDSEG_SERVE_MAX_MB`` or :data:`MAX_FILE_MB`."""
    import os

    return int(float(os.environ.get("MEDSEG_SERVE_MAX_MB", MAX_FILE_MB)) * 2**20)


def file_kind(data: bytes) -> str | None:
    """The suffix a request's file is written under (``.nii.gz``, ``.zip``, ``.png``...), from its first bytes; None
    if it is none of the accepted kinds."""
    for offset, magic, suffix in _KINDS:
        if data[offset:offset + len(magic)] == magic:
            return suffix
    return None


class Predictor:
    """What ``mlflow.pyfunc.load_model`` returns: ``predict`` segments each base64-encoded file of the request with
    the logged fold's model, as ``medseg predict`` does, and returns the masks, base64-encoded."""

    def __init__(self, folder: Path, models: list) -> None:
        self.folder, self.models = Path(folder), models  # loaded once, used by every request

    def predict(self, model_input, params: dict | None = None) -> list[str]:
        try:
            return [self._segment(k, _decode(k, text)) for k, text in enumerate(_encoded_files(model_input))]
        except ValueError as err:  # the request's fault: one line, HTTP 400
            raise _refused(str(err)) from None

    def _segment(self, k: int, data: bytes) -> str:
        from medseg.inference import predict

        kind = file_kind(data)
        if kind is None:
            raise ValueError(f"image {k}: not {ACCEPTED}")
        with tempfile.TemporaryDirectory(prefix="medseg-serve-") as tmp:
            source = Path(tmp) / "in" / f"image{kind}"
            source.parent.mkdir()
            if kind == ".zip":
                source = _unzip(k, data, source.parent / "series")
            else:
                source.write_bytes(data)
            summary = predict.run(str(self.folder), source, Path(tmp) / "out", loaded=self.models)
            if summary["failed"]:
                raise ValueError(f"image {k}: {summary['failed'][0]['reason'].splitlines()[0]}")
            if len(summary["written"]) != 1:
                raise ValueError(f"image {k}: {len(summary['written'])} images found in it; send one per file")
            return base64.b64encode(Path(summary["written"][0]).read_bytes()).decode("ascii")


def _refused(line: str):
    """An MLflow error (HTTP 400) whose message stays ``line``. MLflow's scoring server puts the whole parsed request
    in front of a model's error message (``Failed to predict data '{...}'``): here the base64 of a scan, hundreds of
    megabytes of a patient's image sent back and logged. This message keeps to its line."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import BAD_REQUEST

    class RequestRefused(MlflowException):
        @property
        def message(self) -> str:
            return line

        @message.setter
        def message(self, value: str) -> None:
            pass  # the server's prefix (the request itself) is dropped

    return RequestRefused(line, error_code=BAD_REQUEST)


def _encoded_files(model_input) -> list[str]:
    """The base64 strings of a request, however MLflow hands them over: ``{"image": [...]}`` (a dict of lists or
    arrays), a DataFrame with an ``image`` column (cells a string or a list of them), or a list of strings."""
    import numpy as np
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if "image" not in model_input.columns:
            raise ValueError(f"the request has no 'image' input (got {list(model_input.columns)})")
        values = list(model_input["image"])
    elif isinstance(model_input, dict):
        if "image" not in model_input:
            raise ValueError(f"the request has no 'image' input (got {sorted(model_input)})")
        values = [model_input["image"]]
    else:
        values = [model_input]
    flat: list = []
    while values:
        value = values.pop(0)
        if isinstance(value, (list, tuple, np.ndarray, pd.Series)):
            values = list(value) + values
        else:
            flat.append(value)
    if not flat or not all(isinstance(v, (str, bytes)) for v in flat):
        raise ValueError("'image' must be a list of base64-encoded files")
    return [v.decode("ascii") if isinstance(v, bytes) else v for v in flat]


def _decode(k: int, text: str) -> bytes:
    limit = max_file_bytes()
    if len(text) > limit * 4 // 3 + 4:
        raise ValueError(f"image {k}: larger than the {limit / 2**20:g} MB a request may carry (MEDSEG_SERVE_MAX_MB)")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"image {k}: not base64-encoded") from None


def _unzip(k: int, data: bytes, folder: Path) -> Path:
    """The zip's files into ``folder`` under names of our own (none of the zip's paths is used), refused when the
    whole would unpack to more than :func:`max_file_bytes`."""
    limit = max_file_bytes()
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            if sum(m.file_size for m in members) > limit:
                raise ValueError(f"image {k}: the zip unpacks to more than {limit / 2**20:g} MB (MEDSEG_SERVE_MAX_MB)")
            folder.mkdir()
            for n, member in enumerate(members):
                (folder / f"{n:06d}.dcm").write_bytes(archive.read(member))
    except zipfile.BadZipFile as err:
        raise ValueError(f"image {k}: not a readable zip ({err})") from None
    return folder


def _load_pyfunc(data_path: str, model_config: Any = None) -> Predictor:
    """MLflow's entry point for ``loader_module`` models: ``data_path`` is the logged fold folder."""
    from medseg.inference.model_folder import load_trained

    return Predictor(Path(data_path), load_trained(Path(data_path)))

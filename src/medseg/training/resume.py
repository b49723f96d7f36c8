"""What makes a training run resumable exactly, and what a retraining would learn from: the digest a checkpoint must
match (params, plan, data, the code that shapes the weights), every random generator's state, and the checkpoint
itself, loaded without running code.

The code part is read from the source (:mod:`medseg.common.code_deps`, the same closure as the train stage's deps in
dvc.yaml): a checkpoint made with another version of any module training runs is not resumed. Post-processing is
left out: it does not shape the weights, so a finished fold whose post-processing changed is validated again instead
of retrained.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.common.params import Params

__all__ = ["CHECKPOINT_NAME", "TRAINING_MODULE", "POSTPROCESS_MODULES", "digest", "training_code", "postprocess_code",
           "training_inputs", "rng_state", "set_rng_state", "load_checkpoint"]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
# The code a training run executes: the train stage's import closure within medseg, post-processing aside.
TRAINING_MODULE = "medseg.training.train"
POSTPROCESS_MODULES = ("medseg.inference.postprocess", "medseg.evaluation.postprocessing")


def digest(params: Params, plan: Any, data_md5: str, *extra: Any, code: bool = False) -> str:
    """Hash of what shapes training: params sections (``train.fold`` aside), plan, data, ``extra`` and, with
    ``code``, the source of :func:`training_code`."""
    hasher = hashlib.sha256()
    sections = {name: params.section(name) for name in ("plan", "preprocess", "model", "train")}
    sections["train"].pop("fold")
    hasher.update(json.dumps([sections, dataclasses.asdict(plan), data_md5, *extra], sort_keys=True,
                             default=str).encode())
    if code:
        hash_code(hasher)
    return hasher.hexdigest()


def training_code() -> list[str]:
    """The source files that shape the weights: :data:`TRAINING_MODULE`'s import closure without post-processing
    (:data:`POSTPROCESS_MODULES`, which the train stage also runs, on the final validation)."""
    from medseg.common.code_deps import module_closure

    return module_closure(TRAINING_MODULE, stop=set(POSTPROCESS_MODULES))


def hash_code(hasher, files: list[str] | None = None) -> None:
    """Feed ``files`` (default :func:`training_code`), names and contents, into ``hasher``."""
    from medseg.common.code_deps import PACKAGE_ROOT

    for name in training_code() if files is None else files:
        hasher.update(name.encode() + b"\x1f")
        hasher.update((PACKAGE_ROOT / name).read_bytes())


def postprocess_code() -> str:
    """Hash of the post-processing code: a finished fold whose final validation was post-processed by other code is
    validated again on resume (its weights still stand)."""
    from medseg.common.code_deps import module_closure

    hasher = hashlib.sha256()
    hash_code(hasher, sorted({f for m in POSTPROCESS_MODULES for f in module_closure(m)}))
    return hasher.hexdigest()


def training_inputs(params: Params) -> str:
    """What a retraining would learn from, as one hash: the ingested data's content (images, labels, manifest; not
    ingest's re-run cache, which holds file times), the params that shape planning, preprocessing, training and
    post-processing (``train.fold`` and where the data lives aside), and the code of those stages.

    Each training run is tagged with it and ``register`` copies the tag onto the model version; a scheduled flow
    whose inputs equal the champion's has nothing to learn and skips training (``pipelines/medseg_flow.py``).
    Computed after ingest, before plan and preprocess: reading the ingested files takes seconds.
    """
    from medseg.common.atomic_write import is_temporary
    from medseg.common.manifest import CACHE_NAME

    hasher = hashlib.sha256()
    root = Path(params.paths.ingested)
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != CACHE_NAME and not is_temporary(p)):
        hasher.update(path.relative_to(root).as_posix().encode() + b"\x1f")
        hasher.update(hashlib.sha256(path.read_bytes()).digest())
    sections = {name: params.section(name) for name in ("data", "plan", "preprocess", "model", "train", "evaluate")}
    sections["train"].pop("fold")
    sections["data"].pop("source")
    hasher.update(json.dumps(sections, sort_keys=True, default=str).encode())
    hash_code(hasher)  # preprocess.py among it: the ingested data's content stands for ingest's code
    hasher.update(postprocess_code().encode())
    return hasher.hexdigest()


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every global generator, as tensors and plain types (the checkpoint loads with ``weights_only=True``)."""
    from medseg.training.loaders import plain_numpy_state

    return {"torch": torch.get_rng_state(), "numpy": plain_numpy_state(np.random.get_state()),
            "python": random.getstate(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    from medseg.training.loaders import numpy_state

    torch.set_rng_state(state["torch"])
    np.random.set_state(numpy_state(state["numpy"]))
    random.setstate(state["python"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint at ``path``, loaded with ``weights_only=True`` (tensors and plain types only: a file planted
    there cannot run code); None, with a warning, when it cannot be loaded that way."""
    import pickle

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as err:
        log.warning("checkpoint %s cannot be loaded safely (%s): starting afresh", path,
                    str(err).splitlines()[0] if str(err) else type(err).__name__)
        return None
    return ckpt if isinstance(ckpt, dict) else None

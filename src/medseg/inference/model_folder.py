"""The trained-model folder: its layout, file names, and how to load it. The one module that knows this format.

``medseg train`` writes ``<paths.model>/``::

    fold_<k>/           one cross-validation fold's model (trained without fold k's patients)
    fold_all/           the model trained on every labelled case (nnU-Net's fold ``all``): the one that serves
        model.pt                weights + inference config (loaded with ``weights_only=True``: no code runs)
        inference_config.json   network spec, labels, spacing, normalisation, patch, TTA, post-processing
        run.json                MLflow run id, logged model URI, epochs
        history.csv             per-epoch loss, learning rate, validation Dice
    postprocessing.json  classes whose largest connected component is kept, decided from cross-validation

Train writes it through :func:`inference_config`, :func:`write_fold` and :func:`write_run_record`; evaluate,
register and predict read it through the functions below, from a folder or, downloaded
from MLflow, from a ``models:/`` or ``runs:/`` URI (:func:`load_registered`).
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

__all__ = ["MODEL_NAME", "CONFIG_NAME", "RUN_NAME", "HISTORY_NAME", "POSTPROCESSING_NAME", "ALL", "fold_dir",
           "fold_name", "model_files", "load_trained", "read_postprocessing", "largest_component_classes",
           "update_config", "load_registered", "inference_config", "write_fold", "write_run_record", "read_run_record",
           "history_file", "write_postprocessing"]

MODEL_NAME = "model.pt"
CONFIG_NAME = "inference_config.json"
RUN_NAME = "run.json"
HISTORY_NAME = "history.csv"
POSTPROCESSING_NAME = "postprocessing.json"
ALL = "all"  # the fold name of the model trained on every labelled case


def fold_name(fold: int | str) -> str:
    """``fold_3`` for a cross-validation fold, ``fold_all`` for the all-data model."""
    return f"fold_{fold}"


def fold_dir(model_root: str | Path, fold: int | str) -> Path:
    """Where fold ``fold``'s model (an int, or :data:`ALL`) lives inside ``paths.model``."""
    return Path(model_root) / fold_name(fold)


def _fold_order(path: Path) -> tuple[int, int]:
    """Cross-validation folds in number order, then ``fold_all``."""
    match = re.fullmatch(r"fold_(\d+|all)", path.name)
    if not match:
        return (2, 0)
    return (1, 0) if match.group(1) == ALL else (0, int(match.group(1)))


def model_files(path: str | Path, ensemble: bool = False) -> list[Path]:
    """The ``model.pt`` files ``path`` names.

    ``path`` is a ``model.pt``, a ``fold_<k>`` folder, or a model folder. A model folder means its all-data model
    (``fold_all``) when it has one, else the ensemble of its folds; ``ensemble`` takes every fold, ``fold_all``
    included (nnU-Net's ensemble of the cross-validation models).
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if (path / MODEL_NAME).is_file():
        return [path / MODEL_NAME]
    every = sorted(path.glob(f"fold_*/{MODEL_NAME}"), key=lambda f: _fold_order(f.parent))
    final = fold_dir(path, ALL) / MODEL_NAME
    if not ensemble and final.is_file():
        return [final]
    return every


def read_postprocessing(model_root: str | Path) -> dict[str, Any] | None:
    """The cross-validation post-processing decision of a model folder (``postprocessing.json``), if any."""
    from medseg.common.atomic_write import read_json

    path = Path(model_root) / POSTPROCESSING_NAME
    return read_json(path) if path.is_file() else None


def write_postprocessing(model_root: str | Path, decision: dict[str, Any]) -> None:
    """The cross-validation post-processing decision, ``postprocessing.json`` in the model folder."""
    from medseg.common.atomic_write import write_json

    write_json(Path(model_root) / POSTPROCESSING_NAME, decision)


def read_run_record(model_root: str | Path, fold: int | str) -> dict[str, Any] | None:
    """Fold ``fold``'s ``run.json`` (MLflow run id, logged model URI, training summary); None if the fold has none."""
    from medseg.common.atomic_write import read_json

    path = fold_dir(model_root, fold) / RUN_NAME
    return read_json(path) if path.is_file() else None


def history_file(model_root: str | Path, fold: int | str) -> Path:
    """Fold ``fold``'s per-epoch ``history.csv``."""
    return fold_dir(model_root, fold) / HISTORY_NAME


def largest_component_classes(config: dict, num_classes: int) -> list[int]:
    """Classes whose largest connected component is kept, from an inference config's ``largest_component``:
    a list of class values, or a bool for every foreground class (configs written before the decision existed)."""
    value = config.get("largest_component", False)
    if isinstance(value, bool):
        return list(range(1, num_classes)) if value else []
    return [int(c) for c in value]


def load_trained(path: str | Path, ensemble: bool = False) -> list[tuple[Any, dict]]:
    """Networks (``eval()`` mode, on the CPU) and inference configs of a trained model (see :func:`model_files`).

    Raises:
        StageInputError: nothing loadable at ``path``, or folds whose configs cannot be ensembled.
    """
    import torch

    from medseg.common.errors import StageInputError
    from medseg.inference.sliding_window import check_ensemble
    from medseg.networks.architectures import load_network

    files = model_files(path, ensemble)
    if not files:
        raise StageInputError(f"no trained model at {path}: expected {MODEL_NAME}, a fold_<k>/ folder holding one, "
                              f"or a model folder with fold_*/{MODEL_NAME}")
    models = []
    for file in files:
        try:
            saved = torch.load(file, map_location="cpu", weights_only=True)
            config = saved["config"]
            net = load_network(config["network"], config["in_channels"], config["out_channels"], saved["state_dict"])
        except (KeyError, RuntimeError, TypeError, ValueError, OSError, pickle.UnpicklingError) as err:
            raise StageInputError(f"{file}: not a model written by 'medseg train' ({type(err).__name__}: {err})") \
                from None
        models.append((net.eval(), config))
    check_ensemble([config for _, config in models], [str(f) for f in files])
    return models


def update_config(folder: str | Path, **changes: Any) -> dict:
    """Change entries of a written fold's inference config, in ``inference_config.json`` and ``model.pt`` alike."""
    import torch

    from medseg.common.atomic_write import save_torch, write_json

    folder = Path(folder)
    saved = torch.load(folder / MODEL_NAME, map_location="cpu", weights_only=True)
    saved["config"] = {**saved["config"], **changes}
    save_torch(saved, folder / MODEL_NAME)
    write_json(folder / CONFIG_NAME, saved["config"])
    return saved["config"]


def load_registered(uri: str) -> list[tuple[Any, dict]]:
    """The network and inference config of an MLflow model URI (``models:/NAME@alias``, ``runs:/...``), downloaded
    and loaded without unpickling anything.

    Raises:
        StageInputError: the URI does not resolve, or holds no model written by ``medseg train``.
    """
    import tempfile

    import mlflow

    from medseg.common.errors import StageInputError

    try:
        local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=tempfile.mkdtemp(prefix="medseg-model-")))
    except Exception as err:  # MlflowException, or the store's own error: one line either way
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StageInputError(f"{uri}: {message}") from None
    files = sorted(local.rglob(MODEL_NAME))
    if not files:
        raise StageInputError(f"{uri} holds no {MODEL_NAME}: was it logged by this version of 'medseg train'?")
    return load_trained(files[0].parent)


def inference_config(spec: dict, plan: Any, labels: dict[int, str], modality: str, evaluate: Any,
                     fold: int | str, largest_component: list[int] | bool, in_channels: int = 1) -> dict[str, Any]:
    """Everything ``medseg predict`` needs to rebuild the network and its preprocessing (``plan``: the plan;
    ``evaluate``: the ``evaluate`` params, whose sliding window and TTA predict repeats)."""
    return {
        "network": spec,
        "in_channels": in_channels,
        "out_channels": max(labels) + 1,
        "labels": {str(k): v for k, v in sorted(labels.items())},
        "modality": modality,
        "target_spacing": [float(s) for s in plan.target_spacing],
        "normalization": plan.normalization,
        "patch_size": [int(s) for s in plan.patch_size],
        "tta": evaluate.tta,
        "sw_overlap": evaluate.sw_overlap,  # predict's sliding window, as evaluate scored the model
        "sw_batch_size": evaluate.sw_batch_size,
        "largest_component": largest_component,  # classes, or true/false for all of them
        "fold": fold,
    }


def write_fold(out: str | Path, state_dict: dict, config: dict, history: list[dict]) -> None:
    """A new fold folder ``out``: ``model.pt`` (the weights, checked to load into the config's network, and the
    config), ``inference_config.json`` and ``history.csv`` (one row per epoch record)."""
    import torch

    from medseg.common.atomic_write import save_torch, write_json
    from medseg.networks.architectures import load_network

    out = Path(out)
    weights = {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}
    net = load_network(config["network"], config["in_channels"], config["out_channels"], weights).eval()
    out.mkdir(parents=True)
    save_torch({"state_dict": net.state_dict(), "config": config}, out / MODEL_NAME)
    write_json(out / CONFIG_NAME, config)
    keys = sorted({k for r in history for k in r}, key=lambda k: (k != "epoch", k))
    lines = [",".join(keys)] + [",".join(str(r.get(k, "")) for k in keys) for r in history]
    (out / HISTORY_NAME).write_text("\n".join(lines) + "\n")


def write_run_record(out: str | Path, record: dict[str, Any]) -> None:
    """The fold's ``run.json``: its MLflow run id, logged model URI and training summary."""
    from medseg.common.atomic_write import write_json

    write_json(Path(out) / RUN_NAME, record)

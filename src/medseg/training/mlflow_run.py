"""A fold's MLflow run: started (or reopened on resume) with the run's params, tags, the dataset fingerprint and any
drift against the champion; one step of metrics per epoch; the final network logged as the run's model.

Rank 0 alone talks to MLflow. Before training, :func:`check_against_champion` compares the data with what the
registered champion learned from: a different label map or modality stops training with one line, shifts in spacing
and intensity are logged (``drift.json`` and two metrics) and shown on the model card.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from medseg.common.manifest import registered_model_name
from medseg.common.params import Params

__all__ = ["check_against_champion", "fold_run", "log_epoch", "log_trained_model", "DRIFT_ARTIFACT"]

log = logging.getLogger(__name__)

DRIFT_ARTIFACT = "drift.json"


def check_against_champion(params: Params) -> dict[str, Any]:
    """Compare the data about to be trained on with the champion's (both ``medseg plan`` fingerprints): a different
    label map or modality stops here with one clear line; shifts in spacing and intensity come back as a summary.
    Empty when there is no champion or it logged no fingerprint."""
    import mlflow

    from medseg.common.errors import StageInputError
    from medseg.common.tracking import champion_version
    from medseg.planning.fingerprint import FINGERPRINT_NAME, read_fingerprint
    from medseg.registry.drift import compare_fingerprints

    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 checks; the others follow its outcome
        return {}
    name = registered_model_name(params)
    current = champion_version(params.mlflow, name)
    if current is None or not current.run_id:
        return {}
    try:
        path = mlflow.artifacts.download_artifacts(run_id=current.run_id, artifact_path=FINGERPRINT_NAME)
    except Exception:  # a champion from before fingerprints were logged: nothing to compare with
        return {}
    blocking, drift = compare_fingerprints(json.loads(Path(path).read_text()), read_fingerprint(params.paths.plans))
    if blocking:
        raise StageInputError(f"the data does not match what champion version {current.version} of "
                              f"{name} was trained on: {'; '.join(blocking)}. Train it under "
                              f"another register.model_name, or fix data.source")
    log.info("data against champion version %s: %s", current.version, drift)
    return drift


@contextlib.contextmanager
def fold_run(params: Params, state: dict, fold: int | str, tags: dict[str, str]):
    """Start (or reopen, on resume: ``state["run_id"]``) the fold's MLflow run; re-log the epochs of
    ``state["history"]`` that a kill kept from reaching it. ``tags``: the run's tags (data version, fold, cv_group...),
    with ``drift_summary`` logged as :data:`DRIFT_ARTIFACT` and metrics too."""
    import mlflow

    from medseg.common.tracking import configure_mlflow, flatten_params, git_commit
    from medseg.planning.fingerprint import FINGERPRINT_NAME

    configure_mlflow(params.mlflow)
    resumed = state["run_id"] is not None
    with mlflow.start_run(run_id=state["run_id"], run_name=None if resumed else f"{params.model.name}-fold{fold}"):
        if resumed:
            history = mlflow.MlflowClient().get_metric_history(state["run_id"], "train_loss")
            logged = max((m.step for m in history), default=0)
            for record in state["history"]:
                if record["epoch"] > logged:
                    log_epoch(record)
        else:
            state["run_id"] = mlflow.active_run().info.run_id
            mlflow.log_params({**flatten_params(params), "train.fold": fold})
            mlflow.set_tags({"git_commit": git_commit(), **tags, "model": params.model.name})
            # what the next retraining is checked against
            mlflow.log_artifact(str(Path(params.paths.plans) / FINGERPRINT_NAME))
            if tags.get("drift_summary"):
                _log_drift(json.loads(tags["drift_summary"]))
        yield


def _log_drift(drift: dict[str, Any]) -> None:
    import mlflow

    mlflow.log_dict(drift, DRIFT_ARTIFACT)
    shifts = [abs(v["mean_shift_sd"]) for v in drift.get("intensity", {}).values()]
    mlflow.log_metrics({k: v for k, v in {"drift_spacing_ratio_max": drift.get("spacing_ratio_max"),
                                          "drift_intensity_shift_sd": max(shifts, default=None)}.items()
                        if v is not None})


def log_epoch(record: dict) -> None:
    """One epoch's record (``epoch`` is the step; everything else a metric)."""
    import mlflow

    mlflow.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=record["epoch"])


def log_trained_model(folder: Path, state: dict) -> str:
    """Log the written fold ``folder`` as the run's MLflow model, its history and final metrics; the model's URI."""
    import mlflow

    from medseg.inference.model_folder import HISTORY_NAME
    from medseg.registry.model_logging import log_model

    info = log_model(folder)
    mlflow.log_artifact(str(folder / HISTORY_NAME))
    final = {"epochs": state["epoch"], "train_minutes": state["elapsed_s"] / 60}
    if state["best_dice"] >= 0:
        final.update(best_val_dice=state["best_dice"], best_epoch=state["best_epoch"],
                     final_val_dice=state["history"][-1].get("val_dice", float("nan")))
    mlflow.log_metrics(final)
    return info.model_uri

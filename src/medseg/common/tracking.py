"""MLflow set-up and run provenance: one SQLite store and artifact folder in the project unless overridden."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medseg.common.params import MlflowParams, Params

__all__ = ["configure_mlflow", "runs_view_url", "EXPERIMENT_KIND", "RUNS_VIEW", "RUNS_VIEW_COLUMNS", "champion_version", "version_by_alias", "store_lock", "tracking_uri", "flatten_params", "git_commit", "data_version", "dvc_record"]

log = logging.getLogger(__name__)


def tracking_uri(mlflow_params: MlflowParams | None = None) -> str:
    """``$MLFLOW_TRACKING_URI`` wins over ``mlflow.tracking_uri`` from params.

    Without either (``medseg predict`` run outside a project folder), MLflow's own default store applies.
    """
    import mlflow

    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env or mlflow_params is None:
        return env or mlflow.get_tracking_uri()
    return mlflow_params.tracking_uri


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold the store's lock: a file lock beside a SQLite store (``mlflow.db.lock``), so that processes sharing it
    take turns to create and migrate it, create an experiment or move an alias. A tracking server (http[s]://)
    serialises its clients itself: no lock."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    from filelock import FileLock

    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{db}.lock"):
        yield


# MLflow 3 opens an experiment by its kind: without one it guesses GenAI and shows a traces overview ("Traces 0").
EXPERIMENT_KIND = "custom_model_development"
EXPERIMENT_DESCRIPTION = (
    "medseg training runs: one per cross-validation fold (`<network>-fold<k>`, with its held-out Dice) and one for the "
    "model trained on every case (`<network>-foldall`, carrying the cross-validated Dice it is registered with). The "
    "Dice view: open the runs with `?workflowType=machine_learning&viewStateShareKey=medseg-dice`.")
# The runs table's view that shows the Dice at a glance: MLflow's own shared-view mechanism (the UI's Share button
# writes the same experiment tag), opened with ?viewStateShareKey=medseg-dice. MLflow's default table shows no metric.
# MLflow 3.17's UI picks GenAI or model training by a switch it remembers in the browser (the experiment kind is what
# the API and older UIs go by): ?workflowType=machine_learning sets it.
RUNS_VIEW = "medseg-dice"
# (the UI orders them by name; a table wider than the window draws only the columns in view)
RUNS_VIEW_COLUMNS = ("best_val_dice", "cv_dice_mean", "heldout_dice_mean", "train_minutes")


def _runs_view() -> str:
    import json

    columns = [f"metrics.`{m}`" for m in RUNS_VIEW_COLUMNS] + ["attributes.`Models`"]
    return json.dumps({"orderByKey": "attributes.start_time", "orderByAsc": False, "searchFilter": "",
                       "lifecycleFilter": "Active", "modelVersionFilter": "All Runs", "startTime": "ALL",
                       "datasetsFilter": [], "selectedColumns": columns})


def runs_view_url(base_url: str, experiment_id: str) -> str:
    """The MLflow UI's address of the experiment's runs table with the Dice columns (:data:`RUNS_VIEW`)."""
    return (f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey={RUNS_VIEW}")


def _describe_experiment(client, experiment) -> None:
    """The experiment's kind (model training), description and Dice view, set once (and on stores made before)."""
    wanted = {"mlflow.experimentKind": EXPERIMENT_KIND, "mlflow.note.content": EXPERIMENT_DESCRIPTION,
              f"mlflow.sharedViewState.{RUNS_VIEW}": _runs_view()}
    for key, value in wanted.items():
        if experiment.tags.get(key) != value:
            client.set_experiment_tag(experiment.experiment_id, key, value)


def configure_mlflow(mlflow_params: MlflowParams) -> str:
    """Point MLflow at the store and return the experiment id (created with the project's artifact folder).

    A new SQLite store is created and migrated under :func:`store_lock` before anything else uses it: two stages
    started at once on a fresh store would otherwise both run MLflow's schema migration, and one dies in it.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(mlflow_params)
    mlflow.set_tracking_uri(uri)
    with store_lock(uri):
        client = mlflow.MlflowClient(uri)
        client.search_experiments(max_results=1)  # creates and migrates the tracking tables
        client.search_registered_models(max_results=1)  # and the registry's
        experiment = mlflow.get_experiment_by_name(mlflow_params.experiment)
        if experiment is None:
            location = None  # a tracking server stores (and serves) artifacts where it was told to
            if not uri.startswith(("http://", "https://")):
                artifacts = Path(mlflow_params.artifact_root).resolve()
                artifacts.mkdir(parents=True, exist_ok=True)
                location = artifacts.as_uri()
            try:
                experiment_id = mlflow.create_experiment(mlflow_params.experiment, artifact_location=location)
            except MlflowException:  # a server's other client made it first
                experiment = mlflow.get_experiment_by_name(mlflow_params.experiment)
                if experiment is None:
                    raise
                experiment_id = experiment.experiment_id
        else:
            experiment_id = experiment.experiment_id
        _describe_experiment(client, client.get_experiment(experiment_id))
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def champion_version(mlflow_params: MlflowParams, model_name: str, alias: str = "champion"):
    """The registry's model version under ``alias`` (MLflow's ``ModelVersion``), or None when there is none yet."""
    import mlflow

    configure_mlflow(mlflow_params)
    return version_by_alias(mlflow.MlflowClient(), model_name, alias)


def version_by_alias(client, model_name: str, alias: str):
    """``client``'s model version under ``alias``, or None (no such model or alias). Takes no store lock, so it
    serves inside :func:`store_lock` too."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None


def flatten_params(params: Params, sections: tuple[str, ...] = ("data", "preprocess", "model", "train")) -> dict:
    """``{"model.name": "unet", ...}`` for ``mlflow.log_params`` (lists as strings).

    ``data.source`` is logged as a keyed pseudonym of the resolved folder (``source-3f9c0a1b2d``): the same folder
    gives the same value, so runs can still be grouped by data, but a folder named after a patient never reaches the
    MLflow store. The data's content is identified by ``data_md5`` (:func:`data_version`).
    """
    from medseg.common.pseudonym import pseudonym

    flat: dict[str, Any] = {}
    for section in sections:
        for key, value in params.section(section).items():
            flat[f"{section}.{key}"] = list(value) if isinstance(value, tuple) else value
    if "data.source" in flat:
        flat["data.source"] = pseudonym(str(Path(flat["data.source"]).expanduser().resolve()), prefix="source")
    return flat


def git_commit(cwd: str | Path = ".") -> str:
    """HEAD's commit, with ``-dirty`` when the working tree differs; ``unknown`` outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def dvc_record(data_dir: str | Path, lock_file: str | Path) -> dict[str, Any] | None:
    """DVC's record of ``data_dir`` (``md5``, ``nfiles``, ``size``) in ``lock_file`` (``dvc.lock``, written as each
    stage finishes), or None. Read by the command line, which ``dvc repro`` runs in the project folder; stages get
    the record passed down (``train.run(recorded=...)``)."""
    import yaml

    lock = Path(lock_file)
    if not lock.is_file():
        return None
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    for stage in stages.values():
        for out in stage.get("outs", []):
            if Path(out.get("path", "")) == Path(data_dir) and "md5" in out:
                return {key: out.get(key) for key in ("md5", "nfiles", "size")}
    return None


def data_version(data_dir: str | Path, recorded: dict[str, Any] | None = None) -> dict[str, str]:
    """``data_md5``: DVC's hash of ``data_dir`` when ``recorded`` (:func:`dvc_record`) still describes it, else an
    MD5 over the folder's file names and contents, marked as such (``data_md5_source``): outside ``dvc repro``
    (tests, the Prefect flow) there is no record.
    """
    data_dir = Path(data_dir)
    files = sorted(p for p in data_dir.rglob("*") if p.is_file())
    # A stale record (the folder changed outside DVC since) would lie: check its file count and size.
    if (recorded and recorded.get("nfiles") == len(files)
            and recorded.get("size") == sum(p.stat().st_size for p in files)):
        return {"data_md5": recorded["md5"], "data_md5_source": "dvc.lock"}
    digest = hashlib.md5()
    for path in files:
        digest.update(str(path.relative_to(data_dir)).encode())
        digest.update(hashlib.md5(path.read_bytes()).digest())
    return {"data_md5": digest.hexdigest(), "data_md5_source": "content"}

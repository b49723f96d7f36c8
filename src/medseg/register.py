"""Register stage: the trained model becomes a version in the MLflow Model Registry.

With an all-data model (``fold_all``, ``train.final_model``) that model alone is registered, scored by the
cross-validation estimate of the folds trained beside it, and tagged with what estimated it (``estimated_by_folds``,
``estimated_by_runs``, ``cv_cases``). Without one, each cross-validation fold's model is registered, scored by its own
held-out Dice. The alias ``champion`` moves to the new version only when its score beats the current champion's;
otherwise the new version is aliased ``challenger``. Promotion is by aliases, never by stages.
"""

from __future__ import annotations

import logging
from pathlib import Path

from medseg.atomic import read_json, write_json
from medseg.errors import StageInputError
from medseg.params import Params

__all__ = ["run", "champion", "CHAMPION", "CHALLENGER", "SCORE_TAG", "INPUTS_TAG"]

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
SCORE_TAG = "heldout_dice_mean"
INPUTS_TAG = "training_inputs"  # medseg.train.training_inputs of the run: data content, params and code


def _champion_score(client, name: str) -> tuple[str | None, float]:
    from mlflow.exceptions import MlflowException

    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None, float("-inf")
    return str(champion.version), float(champion.tags.get(SCORE_TAG, "-inf"))


def _register_version(client, name: str, run_info: dict, score: float, fold: int | str,
                      tags: dict[str, str] | None = None) -> dict:
    """One fold's run as a model version, aliased ``champion`` if it beats the current champion, else
    ``challenger``."""
    import mlflow

    run_id = run_info["run_id"]
    # Registering the same run twice (a re-run of the flow) reuses its version instead of adding a duplicate.
    existing = [v for v in client.search_model_versions(f"name='{name}'") if v.run_id == run_id]
    if existing:
        version = str(existing[0].version)
    else:
        version = str(mlflow.register_model(run_info["model_uri"], name, tags={SCORE_TAG: f"{score:.6f}"}).version)
    client.set_model_version_tag(name, version, SCORE_TAG, f"{score:.6f}")
    inputs = client.get_run(run_id).data.tags.get(INPUTS_TAG)
    for key, value in {"fold": str(fold), **({INPUTS_TAG: inputs} if inputs else {}), **(tags or {})}.items():
        client.set_model_version_tag(name, version, key, value)
    champion_version, champion_score = _champion_score(client, name)
    alias = CHAMPION if champion_version == version or score > champion_score else CHALLENGER
    client.set_registered_model_alias(name, alias, version)
    log.info("%s version %s (fold %s): held-out Dice %.4f -> %s (previous champion %s, %.4f)",
             name, version, fold, score, alias, champion_version, champion_score)
    return {"version": version, "alias": alias, "heldout_dice_mean": score, "previous_champion": champion_version,
            "run_id": run_id, "fold": fold}


def champion(params: Params) -> dict[str, str] | None:
    """The current champion's version and tags (``{"version": ..., **tags}``), or None when there is none."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from medseg.tracking import configure_mlflow

    configure_mlflow(params.mlflow)
    try:
        version = MlflowClient().get_model_version_by_alias(params.register.model_name, CHAMPION)
    except MlflowException:
        return None
    return {"version": str(version.version), **version.tags}


def run(params: Params) -> dict:
    """Register the all-data model (or else each evaluated fold's model, in fold order) and set ``champion`` or
    ``challenger``."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from medseg.evaluate import METRICS_NAME
    from medseg.tracking import configure_mlflow, store_lock, tracking_uri

    p = params
    name = p.register.model_name
    metrics = read_json(Path(p.paths.evaluation) / METRICS_NAME)
    configure_mlflow(p.mlflow)
    client = MlflowClient()
    # One registration at a time per store: reading the champion's score and moving the alias is one decision.
    with store_lock(tracking_uri(p.mlflow)):
        try:
            client.get_registered_model(name)
        except MlflowException:
            client.create_registered_model(name, description="medseg segmentation model; 'champion' serves "
                                                             "predictions")
        versions = _register_all(p, client, name, metrics)
    summary = {"model_name": name, **versions[-1], "versions": versions}
    write_json(p.paths.registry, summary)
    return summary


def _register_all(p: Params, client, name: str, metrics: dict) -> list[dict]:
    from medseg.evaluate import METRICS_NAME
    from medseg.model_folder import ALL, RUN_NAME, fold_dir, read_postprocessing

    versions = []
    final = fold_dir(p.paths.model, ALL) / RUN_NAME
    if final.is_file():
        folds = sorted(metrics["folds"], key=int)
        tags = {"estimated_by_folds": ",".join(folds), "cv_cases": str(metrics["cases"]),
                "estimated_by_runs": ",".join(metrics["folds"][f]["run_id"] for f in folds),
                "cv_dice": ",".join(f"{c}={v}" for c, v in metrics["dice"].items()), "trained_on": "all cases",
                "largest_component_classes": ",".join(map(str, (read_postprocessing(p.paths.model) or {}).get(
                    "largest_component", [])))}
        versions.append(_register_version(client, name, read_json(final), float(metrics["dice_mean"]), ALL, tags))
    for fold, fold_metrics in [] if versions else sorted(metrics["folds"].items(), key=lambda kv: int(kv[0])):
        run_info = read_json(fold_dir(p.paths.model, int(fold)) / RUN_NAME)
        if run_info["run_id"] != fold_metrics["run_id"]:
            raise StageInputError(f"fold {fold}: {METRICS_NAME} scores run {fold_metrics['run_id']} but the model "
                                  f"folder holds run {run_info['run_id']}; re-run 'medseg evaluate'")
        versions.append(_register_version(client, name, run_info, float(fold_metrics["dice_mean"]), int(fold)))
    return versions

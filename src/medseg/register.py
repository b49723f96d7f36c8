"""Register stage: the trained model becomes a version in the MLflow Model Registry.

The alias ``champion`` moves to the new version only when its held-out (validation-fold) Dice beats the current
champion's; otherwise the new version is aliased ``challenger``. Promotion is by aliases, never by stages.
"""

from __future__ import annotations

import logging
from pathlib import Path

from medseg.atomic import read_json, write_json
from medseg.params import Params

__all__ = ["run", "CHAMPION", "CHALLENGER", "SCORE_TAG"]

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
SCORE_TAG = "heldout_dice_mean"


def _champion_score(client, name: str) -> tuple[str | None, float]:
    from mlflow.exceptions import MlflowException

    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None, float("-inf")
    return str(champion.version), float(champion.tags.get(SCORE_TAG, "-inf"))


def run(params: Params) -> dict:
    """Register ``paths.model``'s MLflow run and set ``champion`` or ``challenger``."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from medseg.evaluate import METRICS_NAME
    from medseg.tracking import configure_mlflow
    from medseg.train import RUN_NAME

    p = params
    name = p.register.model_name
    run_info = read_json(Path(p.paths.model) / RUN_NAME)
    run_id = run_info["run_id"]
    score = float(read_json(Path(p.paths.evaluation) / METRICS_NAME)["dice_mean"])
    configure_mlflow(p.mlflow)
    client = MlflowClient()
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="medseg segmentation model; 'champion' serves predictions")
    # Registering the same run twice (a re-run of the flow) reuses its version instead of adding a duplicate.
    existing = [v for v in client.search_model_versions(f"name='{name}'") if v.run_id == run_id]
    if existing:
        version = str(existing[0].version)
    else:
        version = str(mlflow.register_model(run_info["model_uri"], name, tags={SCORE_TAG: f"{score:.6f}"}).version)
    client.set_model_version_tag(name, version, SCORE_TAG, f"{score:.6f}")
    champion_version, champion_score = _champion_score(client, name)
    if champion_version == version or score > champion_score:
        alias = CHAMPION
    else:
        alias = CHALLENGER
    client.set_registered_model_alias(name, alias, version)
    log.info("%s version %s: held-out Dice %.4f -> %s (previous champion %s, %.4f)",
             name, version, score, alias, champion_version, champion_score)
    summary = {"model_name": name, "version": str(version), "alias": alias, "heldout_dice_mean": score,
               "previous_champion": champion_version, "run_id": run_id}
    write_json(p.paths.registry, summary)
    return summary


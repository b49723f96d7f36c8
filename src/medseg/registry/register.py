"""Register stage: the trained model becomes a version in the MLflow Model Registry.

With an all-data model (``fold_all``, ``train.final_model``) that model alone is registered, scored by the
cross-validation estimate of the folds trained beside it, and tagged with what estimated it (``estimated_by_folds``,
``estimated_by_runs``, ``cv_cases``). Without one, each cross-validation fold's model is registered, scored by its own
held-out Dice. The alias ``champion`` moves to the new version only when its score beats the current champion's;
otherwise the new version is aliased ``challenger``. Promotion is by aliases, never by stages.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from medseg.common.atomic_write import read_json, write_json
from medseg.common.errors import StageInputError
from medseg.common.manifest import registered_model_name
from medseg.common.params import Params

__all__ = ["run", "champion", "promote", "model_card", "CHAMPION", "CHALLENGER", "SCORE_TAG", "INPUTS_TAG"]

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
SCORE_TAG = "heldout_dice_mean"
INPUTS_TAG = "training_inputs"  # medseg.training.resume.training_inputs of the run: data content, params and code


def _champion_score(client, name: str) -> tuple[str | None, float]:
    """The champion's version and recorded score; (None, -inf) before there is one."""
    from medseg.common.tracking import version_by_alias

    champion = version_by_alias(client, name, CHAMPION)
    if champion is None:
        return None, float("-inf")
    return str(champion.version), float(champion.tags.get(SCORE_TAG, "-inf"))


def _decision(alias: str, version: str, score: float, champion_version: str | None, champion_score: float) -> str:
    """Why the version got its alias, in one sentence (the rule included)."""
    if champion_version is None:
        return f"champion: the first version of this model (held-out Dice {score:.4f})"
    if champion_version == version:
        return f"champion: already the champion (held-out Dice {score:.4f})"
    verb = "beats" if alias == CHAMPION else "does not beat"
    return (f"{alias}: held-out Dice {score:.4f} {verb} the champion's (version {champion_version}, "
            f"{champion_score:.4f}); rule: promote when higher. The two are measured on different held-out patients "
            f"(each model's own cross-validation), not yet on a shared locked test set")


def model_card(name: str, version: str, run, score: float, why: str, tags: dict[str, str], metrics: dict,
               test_evidence: list[str] | None = None) -> str:
    """The model version's description in the registry (Markdown): what it is, what it was trained on, how it
    scored, and why it is or is not the champion."""
    run_tags, params = run.data.tags, run.data.params
    lines = [f"# {name} version {version}", "", f"**Decision:** {why}", "",
             "## Cross-validation", "", f"- Held-out Dice (mean over classes): {score:.4f} on "
             f"{metrics.get('cases', '?')} cases", ""]
    dice, hd95 = metrics.get("dice", {}), metrics.get("hd95_mm", {})
    if dice:
        lines += ["| class | Dice | HD95 (mm) |", "|---|---|---|"]
        lines += [f"| {c} | {dice[c]} | {hd95.get(c)} |" for c in dice] + [""]
    lines += test_evidence or []
    if run_tags.get("drift_summary"):
        from medseg.registry.drift import drift_lines

        lines += drift_lines(json.loads(run_tags["drift_summary"]))
    lines += ["## Provenance", "",
              f"- MLflow run: `{run.info.run_id}`",
              f"- git commit: `{run_tags.get('git_commit', 'unknown')}`",
              f"- training data: `{run_tags.get('data_md5', 'unknown')}` ({run_tags.get('data_md5_source', '')})",
              f"- training inputs (data, params, code): `{run_tags.get(INPUTS_TAG, 'unknown')}`"]
    lines += [f"- {key}: {value}" for key, value in sorted(tags.items())]
    shown = {k: v for k, v in sorted(params.items()) if k.split(".")[0] in ("model", "train", "preprocess")}
    lines += ["", "## Params", "", *[f"- `{k}`: {v}" for k, v in shown.items()]]
    return "\n".join(lines) + "\n"


def _test_gate(params: Params, name: str, fold: int | str, champion_version: str | None) -> tuple[dict, str] | None:
    """The candidate (this fold's model) and the champion on the locked test set, and the rule's verdict; None
    without a test set."""
    from medseg.inference.model_folder import load_registered
    from medseg.inference.model_folder import fold_dir, load_trained
    from medseg.preprocessing.preprocess import read_test_set
    from medseg.registry.promotion import compare, score_on_test

    test, test_hash = read_test_set(params.paths.preprocessed)
    if not test:
        return None
    candidate = score_on_test(load_trained(fold_dir(params.paths.model, fold)), params, test)
    champion_rows = None
    if champion_version is not None:
        champion_rows = score_on_test(load_registered(f"models:/{name}@{CHAMPION}"), params, test)
    return compare(candidate, champion_rows, params), test_hash


def _versions_of(client, name: str, run_id: str) -> list:
    """The versions registered from ``run_id`` (a re-run of the flow registers the same run again)."""
    return [v for v in client.search_model_versions(f"name='{name}'") if v.run_id == run_id]


def _register_version(client, params: Params, name: str, run_info: dict, score: float, fold: int | str,
                      tags: dict[str, str] | None = None, metrics_card: dict | None = None) -> dict:
    """One fold's run as a model version, aliased ``champion`` if it passes the promotion rule against the current
    champion (on the locked test set when there is one; else its cross-validation score), else ``challenger``.

    The locked test set is scored before the store's lock is taken (it runs both models: minutes on a real test set,
    during which other registrations would wait), against the champion of that moment; under the lock, registering
    the version and moving the alias are one decision, and a champion that changed meanwhile is scored again.
    """
    from medseg.common.tracking import store_lock, tracking_uri

    run_id = run_info["run_id"]
    scored_against, _ = _champion_score(client, name)
    was_champion = scored_against is not None and scored_against in {str(v.version)
                                                                      for v in _versions_of(client, name, run_id)}
    gate = None if was_champion else _test_gate(params, name, fold, scored_against)
    with store_lock(tracking_uri(params.mlflow)):
        return _decide(client, params, name, run_info, score, fold, tags, metrics_card, gate, scored_against)


def _decide(client, params: Params, name: str, run_info: dict, score: float, fold: int | str,
            tags: dict[str, str] | None, metrics_card: dict | None, gate: tuple[dict, str] | None,
            scored_against: str | None) -> dict:
    """:func:`_register_version` under the store's lock: the version, its tags, its alias and its card."""
    import mlflow

    from medseg.registry.promotion import evidence_markdown

    run_id = run_info["run_id"]
    # Registering the same run twice (a re-run of the flow) reuses its version instead of adding a duplicate.
    existing = _versions_of(client, name, run_id)
    if existing:
        version = str(existing[0].version)
    else:
        version = str(mlflow.register_model(run_info["model_uri"], name, tags={SCORE_TAG: f"{score:.6f}"}).version)
    client.set_model_version_tag(name, version, SCORE_TAG, f"{score:.6f}")
    inputs = client.get_run(run_id).data.tags.get(INPUTS_TAG)
    for key, value in {"fold": str(fold), **({INPUTS_TAG: inputs} if inputs else {}), **(tags or {})}.items():
        client.set_model_version_tag(name, version, key, value)
    champion_version, champion_score = _champion_score(client, name)
    already = champion_version == version
    if already:
        gate = None
    elif champion_version != scored_against:  # another registration moved the champion while this one scored
        gate = _test_gate(params, name, fold, champion_version)
    if gate is None:
        alias = CHAMPION if already or score > champion_score else CHALLENGER
        why = _decision(alias, version, score, champion_version, champion_score)
        extra: list[str] = []
    else:
        result, test_hash = gate
        alias = CHAMPION if result["promote"] else CHALLENGER
        why = f"{alias}: " + "; ".join(result["reasons"]) + (f" (against version {champion_version} on the locked "
                                                            f"test set)" if champion_version else "")
        extra = evidence_markdown(result, test_hash, champion_version)
        diff = result.get("difference", {})
        for key, value in {"case_set_hash": test_hash, "test_dice_mean": str(result["candidate"]["dice_mean"]),
                           "test_dice_ci": ",".join(map(str, result["candidate"]["ci"])),
                           "test_delta_dice": str(diff.get("dice_mean", "")),
                           "test_delta_ci": ",".join(map(str, diff.get("ci", [])))}.items():
            client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, alias, version)
    if not existing or existing[0].tags.get("decision") != alias:  # a re-run that changes nothing keeps the card
        card = model_card(name, version, client.get_run(run_id), score, why, tags or {}, metrics_card or {}, extra)
        client.update_model_version(name, version, description=card)
        for key, value in {"decision": alias, "decision_reason": why}.items():
            client.set_model_version_tag(name, version, key, value[:5000])
        client.log_text(run_id, card, "model_card.md")
    log.info("%s version %s (fold %s): held-out Dice %.4f -> %s (previous champion %s, %.4f)",
             name, version, fold, score, alias, champion_version, champion_score)
    return {"version": version, "alias": alias, "heldout_dice_mean": score, "previous_champion": champion_version,
            "run_id": run_id, "fold": fold}


def champion(params: Params) -> dict[str, str] | None:
    """The current champion's version and tags (``{"version": ..., **tags}``), or None when there is none."""
    from medseg.common.tracking import champion_version

    version = champion_version(params.mlflow, registered_model_name(params), CHAMPION)
    return None if version is None else {"version": str(version.version), **version.tags}


def run(params: Params) -> dict:
    """Register the all-data model (or else each evaluated fold's model, in fold order) and set ``champion`` or
    ``challenger``."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from medseg.evaluation.evaluate import METRICS_NAME
    from medseg.common.tracking import configure_mlflow, store_lock, tracking_uri

    name = registered_model_name(params)
    metrics = read_json(Path(params.paths.evaluation) / METRICS_NAME)
    configure_mlflow(params.mlflow)
    client = MlflowClient()
    # One registration at a time per store: reading the champion's score and moving the alias is one decision
    # (each version takes the lock in _register_version, after scoring the locked test set).
    with store_lock(tracking_uri(params.mlflow)):
        try:
            client.get_registered_model(name)
        except MlflowException:
            client.create_registered_model(name, description="medseg segmentation model; 'champion' serves "
                                                             "predictions")
    versions = _register_all(params, client, name, metrics)
    summary = {"model_name": name, **versions[-1], "versions": versions}
    write_json(params.paths.registry, summary)
    return summary


def _register_all(params: Params, client, name: str, metrics: dict) -> list[dict]:
    from medseg.evaluation.evaluate import METRICS_NAME
    from medseg.inference.model_folder import ALL, read_postprocessing, read_run_record

    versions = []
    final = read_run_record(params.paths.model, ALL)
    if final is not None:
        folds = sorted(metrics["folds"], key=int)
        tags = {"estimated_by_folds": ",".join(folds), "cv_cases": str(metrics["cases"]),
                "estimated_by_runs": ",".join(metrics["folds"][f]["run_id"] for f in folds),
                "cv_dice": ",".join(f"{c}={v}" for c, v in metrics["dice"].items()), "trained_on": "all cases",
                "largest_component_classes": ",".join(map(str, (read_postprocessing(params.paths.model) or {}).get(
                    "largest_component", [])))}
        versions.append(_register_version(client, params, name, final, float(metrics["dice_mean"]), ALL,
                                          tags, metrics))
    for fold, fold_metrics in [] if versions else sorted(metrics["folds"].items(), key=lambda kv: int(kv[0])):
        run_info = read_run_record(params.paths.model, int(fold)) or {"run_id": None}
        if run_info["run_id"] != fold_metrics["run_id"]:
            raise StageInputError(f"fold {fold}: {METRICS_NAME} scores run {fold_metrics['run_id']} but the model "
                                  f"folder holds run {run_info['run_id']}; re-run 'medseg evaluate'")
        versions.append(_register_version(client, params, name, run_info, float(fold_metrics["dice_mean"]),
                                          int(fold), metrics_card=fold_metrics))
    return versions


def promote(params: Params, version: str, reason: str) -> dict:
    """Move ``champion`` to ``version`` by hand (a rollback, or a decision the rule cannot take), recording who, why
    and when on the version's tags; the version that loses the alias is tagged with what replaced it."""
    import datetime
    import getpass

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from medseg.common.tracking import configure_mlflow, store_lock, tracking_uri

    if not reason.strip():
        raise StageInputError("promote needs --reason: the registry records why a champion was chosen by hand")
    name = registered_model_name(params)
    configure_mlflow(params.mlflow)
    client = MlflowClient()
    with store_lock(tracking_uri(params.mlflow)):
        try:
            client.get_model_version(name, str(version))
        except MlflowException:
            raise StageInputError(f"{name} has no version {version}") from None
        previous, _ = _champion_score(client, name)
        client.set_registered_model_alias(name, CHAMPION, str(version))
        when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        record = {"decision": CHAMPION, "decision_reason": f"promoted by hand: {reason}", "promoted_by":
                  getpass.getuser(), "promoted_at": when, "promotion_reason": reason,
                  "previous_champion": previous or ""}
        for key, value in record.items():
            client.set_model_version_tag(name, str(version), key, value)
        if previous and previous != str(version):
            client.set_registered_model_alias(name, CHALLENGER, previous)
            client.set_model_version_tag(name, previous, "replaced_by", f"version {version} at {when}: {reason}")
    log.info("%s version %s is champion (was %s): %s", name, version, previous, reason)
    return {"model_name": name, "version": str(version), "alias": CHAMPION, "previous_champion": previous,
            "promoted_by": record["promoted_by"], "promoted_at": when, "reason": reason}

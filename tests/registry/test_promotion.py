"""The promotion gate: a locked test set by subject, candidate and champion scored on the same cases, the rule."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch

from medseg.common.manifest import Case, locked_subjects, registered_model_name
from medseg.common.params import params_from_dict
from medseg.registry.promotion import compare


def _rows(dice_by_case: dict[str, tuple[float, float]], hd=(2.0, 3.0)) -> list[dict]:
    return [{"case_id": cid, "subject": cid.split("_")[0], "class": name, "dice": d, "hd95": h}
            for cid, dices in dice_by_case.items() for name, d, h in zip(("RV", "LV"), dices, hd)]


def _params(**register):
    import yaml

    from tests.conftest import REPO

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["register"].update(register)
    return params_from_dict(raw)


CHAMPION = _rows({f"s{k}_ED": (0.70, 0.80) for k in range(6)})


def test_a_clearly_better_candidate_is_promoted():
    result = compare(_rows({f"s{k}_ED": (0.78, 0.86) for k in range(6)}), CHAMPION, _params())
    assert result["promote"] and result["difference"]["ci"][0] > 0


def test_a_worse_candidate_is_not_promoted_and_says_why():
    result = compare(_rows({f"s{k}_ED": (0.60, 0.79) for k in range(6)}), CHAMPION, _params())
    assert not result["promote"]
    assert any("does not improve" in r for r in result["reasons"])
    assert any("RV loses 0.1000 Dice" in r for r in result["reasons"])


def test_a_better_mean_with_one_class_collapsing_is_not_promoted():
    result = compare(_rows({f"s{k}_ED": (0.62, 0.99) for k in range(6)}), CHAMPION, _params(max_class_drop=0.05))
    assert result["difference"]["dice_mean"] > 0 and not result["promote"]
    assert result["reasons"] == ["RV loses 0.0800 Dice (more than 0.05)"]


def test_worse_hd95_beyond_tolerance_blocks():
    better = _rows({f"s{k}_ED": (0.78, 0.86) for k in range(6)}, hd=(20.0, 30.0))
    result = compare(better, CHAMPION, _params(hd95_tolerance_mm=5.0))
    assert not result["promote"] and "HD95" in result["reasons"][0]


def _gaining(per_subject: list[float]) -> list[dict]:
    """Candidate rows: each subject's Dice is the champion's (0.70, 0.80) plus its own gain, in both classes alike
    (no class drops more than the mean; HD95 unchanged), so only the mean and its CI can decide."""
    return _rows({f"s{k}_ED": (0.70 + gain, 0.80 + gain) for k, gain in enumerate(per_subject)})


def test_a_better_mean_whose_ci_reaches_below_the_margin_is_not_promoted():
    """Three subjects gain 0.12 and two lose 0.10: the mean improves, but the paired difference's 95% CI (by
    subject) reaches below -noninferiority_margin, so the champion stays; a wider margin lets the same rows pass."""
    noisy = _gaining([0.12, 0.12, 0.12, -0.10, -0.10, 0.0])
    result = compare(noisy, CHAMPION, _params(noninferiority_margin=0.01))
    assert result["difference"]["dice_mean"] > 0 and result["difference"]["ci"][0] < -0.01
    assert not result["promote"]
    assert result["reasons"] == [f"the CI's lower bound {result['difference']['ci'][0]:+.4f} is not above -0.01"]
    assert compare(noisy, CHAMPION, _params(noninferiority_margin=0.2))["promote"]


def test_a_consistent_gain_whose_ci_dips_below_zero_within_the_margin_is_promoted():
    """Non-inferiority, not superiority: a mean gain whose CI's lower bound lies between -margin and 0 promotes."""
    result = compare(_gaining([0.03, 0.03, 0.02, 0.0, -0.01, -0.01]), CHAMPION, _params(noninferiority_margin=0.01))
    assert result["difference"]["dice_mean"] > 0 and -0.01 < result["difference"]["ci"][0] < 0
    assert result["promote"] and result["reasons"] == ["every condition of the rule holds"]


def test_a_clear_gain_for_every_subject_is_promoted():
    result = compare(_gaining([0.06, 0.08, 0.07, 0.09, 0.05, 0.08]), CHAMPION, _params(noninferiority_margin=0.01))
    assert result["difference"]["ci"][0] > 0.04
    assert result["promote"] and result["reasons"] == ["every condition of the rule holds"]


def test_first_model_needs_no_comparison():
    assert compare(CHAMPION, None, _params())["promote"]


def _case(subject: str, phase: str, group: str) -> Case:
    cid = f"{subject}_{phase}"
    return Case(cid, subject, f"images/{cid}.nii.gz", f"labels/{cid}.nii.gz", "MR", (1, 1, 1), (4, 4, 4), phase,
                group)


def test_test_subjects_by_fraction_cover_groups_and_keep_patients_whole():
    cases = [_case(f"sub-{g}{k}", p, g) for g in "ABCD" for k in range(5) for p in ("ED", "ES")]
    chosen = locked_subjects(cases, None, 0.2, seed=0)
    assert len(chosen) == 4 and {s[4] for s in chosen} == set("ABCD")  # one per group
    assert chosen == locked_subjects(cases, None, 0.2, seed=0) != locked_subjects(cases, None, 0.2, seed=1)
    assert locked_subjects(cases, ("sub-A0_ES", "sub-B1"), 0.0, 0) == ["sub-A0", "sub-B1"]
    assert locked_subjects(cases, None, 0.0, 0) == []
    from medseg.common.errors import StageInputError

    with pytest.raises(StageInputError, match="sub-Z9"):
        locked_subjects(cases, ("sub-Z9",), 0.0, 0)


@pytest.mark.slow
def test_register_compares_with_the_champion_on_the_locked_test_set(tiny_ingested, params_for, monkeypatch):
    from filelock import FileLock, Timeout

    from medseg.evaluation import evaluate

    from medseg.registry import promotion

    from medseg.registry import register

    from medseg.training import train
    from medseg.inference.model_folder import MODEL_NAME
    from medseg.preprocessing.preprocess import read_dataset, read_test_set
    from medseg.common.tracking import tracking_uri
    from tests.conftest import planned_and_preprocessed

    params = planned_and_preprocessed(params_for(paths={"ingested": str(tiny_ingested)},
                                                 preprocess={"folds": 2, "test_cases": ["sub-0002"]},
                                                 train={"max_epochs": 3}))
    lock_free_while_scoring = []
    score = promotion.score_on_test

    def scored_without_the_store_lock(*args, **kwargs):  # other registrations need not wait for the test set
        lock = FileLock(tracking_uri(params.mlflow).removeprefix("sqlite:///") + ".lock")
        try:
            with lock.acquire(timeout=0):
                lock_free_while_scoring.append(True)
        except Timeout:
            lock_free_while_scoring.append(False)
        return score(*args, **kwargs)

    monkeypatch.setattr(promotion, "score_on_test", scored_without_the_store_lock)
    test, test_hash = read_test_set(params.paths.preprocessed)
    assert test == ["sub-0002_ED", "sub-0002_ES"] and len(test_hash) == 64
    assert not {c.case_id for c in read_dataset(params.paths.preprocessed).cases} & set(test)  # locked away
    train.run(params)
    evaluate.run(params)
    first = register.run(params)
    assert first["alias"] == "champion"

    # A deliberately broken candidate (all weights zero): registered, not promoted, and the card says why.
    train.run(params)
    model_pt = Path(params.paths.model) / "fold_0" / MODEL_NAME
    saved = torch.load(model_pt, weights_only=True)
    saved["state_dict"] = {k: torch.zeros_like(v) for k, v in saved["state_dict"].items()}
    torch.save(saved, model_pt)
    evaluate.run(params)
    second = register.run(params)
    assert second["alias"] == "challenger" and second["version"] == "2"
    client = mlflow.MlflowClient()
    v2 = client.get_model_version(registered_model_name(params), "2")
    assert "does not improve" in v2.tags["decision_reason"] and "locked test set" in v2.tags["decision_reason"]
    assert v2.tags["case_set_hash"] == test_hash and float(v2.tags["test_delta_dice"]) < 0
    for text in ("## Locked test set", "champion (version 1)", "**Rule:**", "paired by case"):
        assert text in v2.description
    assert str(client.get_model_version_by_alias(registered_model_name(params), "champion").version) == "1"
    assert lock_free_while_scoring == [True, True, True]  # first candidate; then the candidate and the champion


def test_drift_compare_blocks_a_new_task_and_measures_shifts():
    from medseg.registry.drift import compare_fingerprints, drift_lines

    def prints(labels, spacing, mean, modality="MR"):
        return {"labels": labels, "cases": [{"spacing": spacing, "shape": [200, 200, 10]}] * 3,
                "modalities": {modality: {"foreground_intensity": {"mean": mean, "std": 50.0}}}}

    cardiac = {"0": "background", "1": "RV", "2": "myocardium", "3": "LV"}
    blocking, drift = compare_fingerprints(prints(cardiac, [1.5, 1.5, 10], 100.0), prints(cardiac, [0.75, 1.5, 10],
                                                                                           150.0))
    assert blocking == [] and drift["spacing_ratio_max"] == 2.0 and drift["intensity"]["MR"]["mean_shift_sd"] == 1.0
    assert any("mean moved +1.0 SD" in line for line in drift_lines(drift))
    blocking, _ = compare_fingerprints(prints(cardiac, [1, 1, 1], 100.0), prints({"0": "background", "1": "liver"},
                                                                                 [1, 1, 1], 100.0, "CT"))
    assert len(blocking) == 2 and "label map" in blocking[0] and "modalities" in blocking[1]


@pytest.mark.slow
def test_retraining_on_another_task_is_blocked_and_drift_reaches_the_card(tiny_ingested, params_for, tmp_path):
    import json

    from medseg.evaluation import evaluate

    from medseg.registry import register

    from medseg.training import train
    from medseg.common.errors import StageInputError
    from medseg.planning.fingerprint import FINGERPRINT_NAME
    from tests.conftest import planned_and_preprocessed

    params = planned_and_preprocessed(params_for(paths={"ingested": str(tiny_ingested)}, train={"max_epochs": 1}))
    train.run(params)
    evaluate.run(params)
    register.run(params)
    prints_file = Path(params.paths.plans) / FINGERPRINT_NAME
    prints = json.loads(prints_file.read_text())
    shifted = {**prints, "modalities": {m: {**v, "foreground_intensity": {
        **v["foreground_intensity"], "mean": v["foreground_intensity"]["mean"] + v["foreground_intensity"]["std"]}}
        for m, v in prints["modalities"].items()}}
    prints_file.write_text(json.dumps(shifted))
    train.run(params)  # a shift is measured, not blocking
    evaluate.run(params)
    second = register.run(params)
    card = mlflow.MlflowClient().get_model_version(registered_model_name(params), second["version"]).description
    assert "## Data compared with the previous champion's" in card and "mean moved +1.0 SD" in card
    prints_file.write_text(json.dumps({**prints, "labels": {"0": "background", "1": "liver"}}))
    with pytest.raises(StageInputError, match="label map .* differs from the champion's"):
        train.run(params)

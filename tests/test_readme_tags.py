"""The MLflow tags the README tells users to search by are the ones runs and model versions really carry."""

from __future__ import annotations

import re

import pytest

from tests.conftest import REPO

_NAME = r"`[a-z][a-z0-9_]*`"
# "tags carry `a`, `b` and `c`", "tagged `a`", "tags add `a`, `b`": up to two words between the word and the list
_LIST = re.compile(rf"\b(?:tags?|tagged)(?:\s+[a-z]+){{0,2}}:?\s+({_NAME}(?:(?:,\s+|,?\s+and\s+){_NAME})*)")
_SINGLE = re.compile(rf"({_NAME}) tags?\b")  # "the `training_inputs` tag of every run"


def readme_tag_names(text: str) -> set[str]:
    """Every tag name the README gives: each backticked name in a list that follows "tag(s)"/"tagged", or right
    before "tag(s)"."""
    lists = [m.group(1) for m in _LIST.finditer(text)] + [m.group(1) for m in _SINGLE.finditer(text)]
    return {name for found in lists for name in re.findall(r"`([a-z0-9_]+)`", found)}


def test_tag_names_are_read_from_the_readmes_phrasing():
    text = ("tags carry `decision`, `decision_reason` and `case_set_hash`. Runs are tagged `git_commit`; tags add "
            "`cv_dice`, and `x_y`. The `training_inputs` tag. tagged with the folds (without `fold_all`), else "
            "`challenger`.")
    assert readme_tag_names(text) == {"decision", "decision_reason", "case_set_hash", "git_commit", "cv_dice", "x_y",
                                      "training_inputs"}


@pytest.mark.slow  # about 15 s on 2 cores: four one-epoch trainings of a tiny 2D U-Net, two registrations
def test_the_readmes_mlflow_tags_are_the_ones_runs_and_versions_carry(tiny_ingested, params_for):
    """Train, evaluate and register twice (the all-data model, a locked test set, a champion to drift from and be
    compared with), then promote by hand: every tag the README names is on a run or a model version, and every tag
    a run or a model version carries (MLflow's own ``mlflow.*`` aside) is in the README."""
    import mlflow

    from medseg.common.manifest import registered_model_name
    from medseg.evaluation import evaluate
    from medseg.registry import register
    from medseg.training import train
    from tests.conftest import planned_and_preprocessed

    params = planned_and_preprocessed(params_for(
        paths={"ingested": str(tiny_ingested)}, preprocess={"folds": 2, "test_cases": ["sub-0002"]},
        train={"max_epochs": 1, "final_model": True}))
    for _ in range(2):
        train.run(params)
        evaluate.run(params)
        register.run(params)
    client = mlflow.MlflowClient(params.mlflow.tracking_uri)
    champion = client.get_model_version_by_alias(registered_model_name(params), "champion").version
    register.promote(params, "2" if str(champion) == "1" else "1", "the README's tags, all of them")  # a rollback

    experiment = client.get_experiment_by_name(params.mlflow.experiment)
    runs = client.search_runs([experiment.experiment_id])
    versions = client.search_model_versions(f"name='{registered_model_name(params)}'")
    assert len(runs) == 4 and len(versions) == 2
    run_tags = {k for r in runs for k in r.data.tags if not k.startswith("mlflow.")}
    version_tags = {k for v in versions for k in v.tags if not k.startswith("mlflow.")}

    documented = readme_tag_names((REPO / "README.md").read_text())
    assert documented - (run_tags | version_tags) == set(), "the README names tags that nothing sets"
    assert run_tags - documented == set(), "training runs carry tags the README does not name"
    assert version_tags - documented == set(), "model versions carry tags the README does not name"

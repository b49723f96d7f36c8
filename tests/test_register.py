import mlflow
import numpy as np
import pytest
import torch

from medseg import evaluate, register
from medseg.atomic import read_json, write_json
from medseg.errors import StageInputError
from medseg.evaluate import METRICS_NAME


def test_first_model_is_champion_worse_one_is_challenger(trained):
    params, _ = trained
    evaluate.run(params)
    first = register.run(params)
    assert first["alias"] == "champion" and first["version"] == "1"
    again = register.run(params)  # re-registering the same run reuses its version
    assert again["version"] == "1" and again["alias"] == "champion"

    from medseg import train

    worse = train.run(params)["folds"][0]  # a second run (new MLflow run id); give it a worse score
    metrics_path = f"{params.paths.evaluation}/{METRICS_NAME}"

    def score_as(dice: float) -> None:
        metrics = read_json(metrics_path)
        metrics["folds"]["0"].update(dice_mean=dice, run_id=worse["run_id"])
        write_json(metrics_path, metrics)

    score_as(first["heldout_dice_mean"] - 0.05)
    second = register.run(params)
    assert second["run_id"] == worse["run_id"] and second["version"] == "2"
    assert second["alias"] == "challenger" and second["previous_champion"] == "1"
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias(params.register.model_name, "champion").version) == "1"

    score_as(first["heldout_dice_mean"] + 0.05)
    third = register.run(params)
    assert third["version"] == "2" and third["alias"] == "champion"


def test_register_refuses_metrics_of_another_run(trained):
    params, _ = trained
    evaluate.run(params)
    metrics_path = f"{params.paths.evaluation}/{METRICS_NAME}"
    metrics = read_json(metrics_path)
    metrics["folds"]["0"]["run_id"] = "0123456789abcdef"
    write_json(metrics_path, metrics)
    with pytest.raises(StageInputError, match="re-run 'medseg evaluate'"):
        register.run(params)


def test_registered_model_runs_on_other_patch_and_batch_sizes(trained):
    params, _ = trained
    evaluate.run(params)
    register.run(params)
    mlflow.set_tracking_uri(params.mlflow.tracking_uri)
    net = mlflow.pytorch.load_model(f"models:/{params.register.model_name}@champion")
    with torch.no_grad():
        for batch, size in [(1, (32, 32)), (3, (96, 128)), (2, (64, 48))]:
            assert net(torch.randn(batch, 1, *size)).shape == (batch, 4, *size)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{params.register.model_name}@champion")
    out = pyfunc.predict(np.random.rand(2, 1, 64, 96).astype(np.float32))
    assert np.asarray(out).shape == (2, 4, 64, 96)


def test_the_all_data_model_is_registered_with_the_folds_that_estimated_it(tiny_ingested, params_for):
    from medseg import train
    from tests.conftest import planned_and_preprocessed

    params = planned_and_preprocessed(params_for(paths={"ingested": str(tiny_ingested)},
                                                 train={"max_epochs": 1, "fold": "all", "final_model": True}))
    trained = train.run(params)["folds"]
    metrics = evaluate.run(params)
    assert sorted(metrics["folds"]) == ["0", "1", "2"]  # the all-data model has no held-out cases to score
    summary = register.run(params)
    assert [v["fold"] for v in summary["versions"]] == ["all"]
    assert summary["run_id"] == trained[-1]["run_id"] and summary["heldout_dice_mean"] == metrics["dice_mean"]
    client = mlflow.MlflowClient(tracking_uri=params.mlflow.tracking_uri)
    version = client.get_model_version_by_alias(params.register.model_name, "champion")
    assert version.tags["fold"] == "all" and version.tags["estimated_by_folds"] == "0,1,2"
    assert version.tags["estimated_by_runs"] == ",".join(f["run_id"] for f in trained[:3])
    assert version.tags["cv_cases"] == "6"
    assert version.tags["largest_component_classes"] == ",".join(
        map(str, read_json(f"{params.paths.model}/postprocessing.json")["largest_component"]))

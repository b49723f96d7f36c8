from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from medseg.evaluation import evaluate

from medseg.registry import register
from medseg.common.atomic_write import read_json, write_json
from medseg.common.errors import StageInputError
from medseg.evaluation.evaluate import METRICS_NAME
from medseg.common.manifest import registered_model_name
from medseg.inference.model_folder import load_registered


def test_first_model_is_champion_worse_one_is_challenger(trained):
    params, _ = trained
    evaluate.run(params)
    first = register.run(params)
    assert first["alias"] == "champion" and first["version"] == "1"
    again = register.run(params)  # re-registering the same run reuses its version
    assert again["version"] == "1" and again["alias"] == "champion"

    from medseg.training import train

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
    assert str(client.get_model_version_by_alias(registered_model_name(params), "champion").version) == "1"
    # The registry says why, with the evidence: the model card is the version's description and a run artifact.
    v1, v2 = (client.get_model_version(registered_model_name(params), v) for v in ("1", "2"))
    assert v1.tags["decision"] == "champion" and "first version" in v1.tags["decision_reason"]
    assert v2.tags["decision"] == "challenger" and "does not beat the champion's (version 1" in v2.description
    for text in ("## Cross-validation", "## Provenance", "git commit", "training inputs", "`train.learning_rate`"):
        assert text in v2.description
    assert "model_card.md" in [a.path for a in client.list_artifacts(worse["run_id"])]

    score_as(first["heldout_dice_mean"] + 0.05)
    third = register.run(params)
    assert third["version"] == "2" and third["alias"] == "champion"

    # A rollback by hand: who, why and when are recorded; the version replaced is told what replaced it.
    rolled = register.promote(params, "1", "version 2 misses small RVs in clinic review")
    assert rolled["previous_champion"] == "2"
    assert str(client.get_model_version_by_alias(registered_model_name(params), "champion").version) == "1"
    tags = client.get_model_version(registered_model_name(params), "1").tags
    assert tags["promotion_reason"] == "version 2 misses small RVs in clinic review" and tags["promoted_by"]
    assert "replaced_by" in client.get_model_version(registered_model_name(params), "2").tags
    with pytest.raises(StageInputError, match="no version 9"):
        register.promote(params, "9", "typo")


def test_register_refuses_metrics_of_another_run(trained):
    params, _ = trained
    evaluate.run(params)
    metrics_path = f"{params.paths.evaluation}/{METRICS_NAME}"
    metrics = read_json(metrics_path)
    metrics["folds"]["0"]["run_id"] = "0123456789abcdef"
    write_json(metrics_path, metrics)
    with pytest.raises(StageInputError, match="re-run 'medseg evaluate'"):
        register.run(params)


def test_registered_model_runs_on_other_patch_and_batch_sizes(trained, tmp_path):
    params, _ = trained
    evaluate.run(params)
    register.run(params)
    mlflow.set_tracking_uri(params.mlflow.tracking_uri)
    (net, config), = load_registered(f"models:/{registered_model_name(params)}@champion")
    assert config["out_channels"] == 4
    with torch.no_grad():
        for batch, size in [(1, (32, 32)), (3, (96, 128)), (2, (64, 48))]:
            assert net(torch.randn(batch, 1, *size)).shape == (batch, 4, *size)
    # the pyfunc is the whole predictor: a file's bytes (base64) in, the mask file's bytes out, as predict writes it
    import base64

    import nibabel as nib

    from tests.conftest import write_tiny_volume

    image, _ = write_tiny_volume(3, shape=(50, 40, 4))
    nib.save(nib.Nifti1Image(image, np.diag([1.5, 1.5, 8.0, 1.0])), str(tmp_path / "scan.nii.gz"))
    pyfunc = mlflow.pyfunc.load_model(f"models:/{registered_model_name(params)}@champion")
    (mask,) = pyfunc.predict({"image": [base64.b64encode((tmp_path / "scan.nii.gz").read_bytes()).decode()]})
    (tmp_path / "mask.nii.gz").write_bytes(base64.b64decode(mask))
    assert nib.load(str(tmp_path / "mask.nii.gz")).shape == (50, 40, 4)
    flavors = mlflow.models.get_model_info(f"models:/{registered_model_name(params)}@champion").flavors
    assert set(flavors) == {"python_function"} and flavors["python_function"]["loader_module"] == "medseg.registry.pyfunc_model"


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_tampered_registry_model_is_refused_without_running_code(trained, tmp_path, monkeypatch, capsys):
    """Whoever can write to the artifact store must not be able to run code where models are loaded."""
    from medseg.cli import main
    from medseg.inference.model_folder import MODEL_NAME

    params, _ = trained
    evaluate.run(params)
    register.run(params)
    marker = tmp_path / "pwned"
    planted = list(Path(params.mlflow.artifact_root).rglob(MODEL_NAME))
    assert planted
    for path in planted:
        torch.save({"state_dict": _Payload(marker), "config": {}}, path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", params.mlflow.tracking_uri)
    image = tmp_path / "in" / "a.nii.gz"
    image.parent.mkdir()
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((40, 36, 5), np.float32), np.eye(4)), str(image))
    code = main(["predict", "--model", f"models:/{registered_model_name(params)}@champion", str(image),
                 "--out", str(tmp_path / "out")])
    assert code == 2 and not marker.exists()
    assert "not a model written by 'medseg train'" in capsys.readouterr().err
    with pytest.raises(Exception):
        mlflow.pyfunc.load_model(f"models:/{registered_model_name(params)}@champion")
    assert not marker.exists()


def test_an_unknown_registry_model_is_one_line_and_creates_no_store(tmp_path, monkeypatch, capsys):
    from medseg.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "a.nii.gz").write_bytes(b"")
    code = main(["predict", "--model", "models:/does-not-exist@champion", str(tmp_path / "a.nii.gz"),
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def test_the_all_data_model_is_registered_with_the_folds_that_estimated_it(tiny_ingested, params_for):
    from medseg.training import train
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
    version = client.get_model_version_by_alias(registered_model_name(params), "champion")
    assert version.tags["fold"] == "all" and version.tags["estimated_by_folds"] == "0,1,2"
    assert version.tags["estimated_by_runs"] == ",".join(f["run_id"] for f in trained[:3])
    assert version.tags["cv_cases"] == "6"
    assert version.tags["largest_component_classes"] == ",".join(
        map(str, read_json(f"{params.paths.model}/postprocessing.json")["largest_component"]))


def test_the_registered_name_comes_from_the_data_unless_set(tiny_ingested, params_for):
    """register.model_name: null names the model after the data (ACDC here), not a cardiac default; a name the user
    sets wins; with neither data nor a name, one line says what to do."""
    import dataclasses

    params = params_for(paths={"ingested": str(tiny_ingested)}, register={"model_name": None})
    assert registered_model_name(params) == "medseg-acdc"
    named = dataclasses.replace(params, register=dataclasses.replace(params.register, model_name="my-heart-model"))
    assert registered_model_name(named) == "my-heart-model"
    nowhere = params_for(paths={"ingested": str(tiny_ingested.parent / "absent")}, register={"model_name": None})
    with pytest.raises(StageInputError, match="set register.model_name"):
        registered_model_name(nowhere)

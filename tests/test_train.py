import json
from pathlib import Path

import mlflow
import pytest
import torch

from medseg import preprocess, train
from medseg.train import CHECKPOINT_NAME, CONFIG_NAME, HISTORY_NAME, MODEL_NAME, RUN_NAME


def optimizer_steps(params) -> int:
    ckpt = torch.load(Path(params.paths.checkpoints) / CHECKPOINT_NAME, weights_only=False)
    return int(ckpt["optimizer"]["state"][0]["step"])


def test_train_writes_model_checkpoint_and_mlflow_run(trained):
    params, summary = trained
    model_dir = Path(params.paths.model)
    for name in (MODEL_NAME, CONFIG_NAME, RUN_NAME, HISTORY_NAME):
        assert (model_dir / name).is_file()
    assert (Path(params.paths.checkpoints) / CHECKPOINT_NAME).is_file()
    assert summary["epochs"] == 2
    mlflow.set_tracking_uri(params.mlflow.tracking_uri)
    run = mlflow.get_run(summary["run_id"])
    assert run.data.params["model.name"] == "unet"
    assert run.data.tags["data_md5"] and run.data.tags["git_commit"]
    history = mlflow.MlflowClient().get_metric_history(summary["run_id"], "train_loss")
    assert [m.step for m in history] == [1, 2]
    assert "val_dice" in run.data.metrics
    config = json.loads((model_dir / CONFIG_NAME).read_text())
    assert config["out_channels"] == 4 and config["labels"]["3"] == "LV"


def test_killed_training_resumes_into_same_run(tiny_ingested, params_for, monkeypatch):
    params = params_for(paths={"ingested": str(tiny_ingested)}, train={"max_epochs": 3})
    preprocess.run(params)

    calls = {"n": 0}
    real_validate = train.validate

    def dies_in_second_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real_validate(*args, **kwargs)

    monkeypatch.setattr(train, "validate", dies_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train.run(params)
    ckpt = torch.load(Path(params.paths.checkpoints) / CHECKPOINT_NAME, weights_only=False)
    assert ckpt["state"]["epoch"] == 1
    steps_per_epoch = optimizer_steps(params)
    assert steps_per_epoch == params.train.steps_per_epoch
    assert not Path(params.paths.model).exists(), "an interrupted training must not leave a model behind"
    mlflow.end_run()

    monkeypatch.setattr(train, "validate", real_validate)
    summary = train.run(params, resume=True)
    assert summary["run_id"] == ckpt["state"]["run_id"]
    assert summary["epochs"] == 3
    assert optimizer_steps(params) == 3 * steps_per_epoch  # as many steps as an uninterrupted run
    mlflow.set_tracking_uri(params.mlflow.tracking_uri)
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(summary["run_id"], "train_loss")]
    assert steps == [1, 2, 3]


def test_resume_ignores_checkpoint_from_other_params(tiny_ingested, params_for):
    params = params_for(paths={"ingested": str(tiny_ingested)}, train={"max_epochs": 1})
    preprocess.run(params)
    first = train.run(params)
    changed = params_for(paths={"ingested": str(tiny_ingested)}, train={"max_epochs": 1, "learning_rate": params.train.learning_rate * 2})
    second = train.run(changed, resume=True)
    assert second["run_id"] != first["run_id"]

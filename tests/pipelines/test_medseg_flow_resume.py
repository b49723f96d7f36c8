"""A flow run killed mid-training (SIGKILL to the whole process group, as an OOM killer or a lost node would) is
resumed by the next flow run: from the checkpoint, into the same MLflow run, with no epoch logged twice."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from medseg.common.manifest import registered_model_name
from medseg.inference.model_folder import RUN_NAME
from medseg.training.resume import CHECKPOINT_NAME
from tests.conftest import PIPELINE, REPO

pytestmark = [pytest.mark.slow, PIPELINE]


def pipeline(params_file: Path, tmp_path: Path, log: Path) -> subprocess.Popen:
    """``medseg pipeline`` in its own session (so its embedded Prefect server dies with it), output to ``log``."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect_home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PYTHONPATH=os.pathsep.join([str(REPO), *sys.path]))
    return subprocess.Popen([sys.executable, "-m", "medseg.cli", "pipeline", "--params", str(params_file)],
                            cwd=tmp_path, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def test_flow_run_killed_mid_training_resumes_into_the_same_mlflow_run(params_for, tmp_path):
    import mlflow

    params = params_for(demo={"cardiac_patients": 3, "ct_patients": 0, "polyp_frames": 0},
                        train={"max_epochs": 4, "steps_per_epoch": 30, "val_interval": 1, "device": "cpu"})
    params = dataclasses.replace(params, data=dataclasses.replace(params.data, source=f"{params.paths.demo}/acdc"))
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(params)))))
    ckpt_file = Path(params.paths.checkpoints) / "fold_0" / CHECKPOINT_NAME

    first_log = tmp_path / "first.log"
    proc = pipeline(params_file, tmp_path, first_log)
    try:
        deadline = time.monotonic() + 300
        while not ckpt_file.is_file():  # the first epoch's checkpoint: training is under way
            assert proc.poll() is None, first_log.read_text()[-3000:]
            assert time.monotonic() < deadline, first_log.read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(0.5)  # into the next epoch
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    before = torch.load(ckpt_file, weights_only=True)["state"]
    assert 1 <= before["epoch"] < 4, "killed before training ended"
    assert not (Path(params.paths.model) / "fold_0").exists(), "a killed training leaves no model behind"

    second_log = tmp_path / "second.log"
    again = pipeline(params_file, tmp_path, second_log)
    assert again.wait(timeout=600) == 0, second_log.read_text()[-3000:]
    output = second_log.read_text()
    assert f"resuming from {ckpt_file} after epoch {before['epoch']}" in output, output[-3000:]

    run_id = before["run_id"]
    assert json.loads((Path(params.paths.model) / "fold_0" / RUN_NAME).read_text())["run_id"] == run_id
    client = mlflow.MlflowClient(tracking_uri=params.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name(params.mlflow.experiment).experiment_id
    assert [r.info.run_id for r in client.search_runs([experiment])] == [run_id]  # one training run, resumed
    assert client.get_run(run_id).info.status == "FINISHED"
    for metric in ("train_loss", "val_dice"):
        assert [m.step for m in client.get_metric_history(run_id, metric)] == [1, 2, 3, 4], metric
    versions = client.search_model_versions(f"name='{registered_model_name(params)}'")
    assert [v.run_id for v in versions] == [run_id]  # and the resumed run's model is what was registered

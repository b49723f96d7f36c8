"""MLflow server mode: a real ``mlflow server`` on a free localhost port (SQLite backend, artifacts served by the
server), with training, evaluation, registration and prediction from the registry all going through it."""

from __future__ import annotations

import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from medseg.common.manifest import registered_model_name
from tests.conftest import free_port, wait_until_up

pytestmark = pytest.mark.slow


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "mlflow_server.log").open("w")
    (tmp_path / "server").mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{tmp_path / 'server' / 'mlflow.db'}",
                             "--serve-artifacts", "--artifacts-destination", str(tmp_path / "server" / "artifacts"),
                             "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                            env={**os.environ, "MLFLOW_SERVER_ALLOWED_HOSTS": "127.0.0.1:*,localhost:*"})
    try:
        wait_until_up(f"{url}/health", proc, tmp_path / "mlflow_server.log")
        yield url, tmp_path / "server"
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


def test_train_register_and_predict_through_a_tracking_server(mlflow_server, tiny_ingested, params_for, tmp_path,
                                                             monkeypatch):
    import mlflow

    from medseg.evaluation import evaluate

    from medseg.inference import predict

    from medseg.registry import register

    from medseg.training import train
    from tests.conftest import planned_and_preprocessed, write_tiny_volume

    url, server_dir = mlflow_server
    params = planned_and_preprocessed(params_for(paths={"ingested": str(tiny_ingested)},
                                                 mlflow={"tracking_uri": url}))
    train.run(params)
    evaluate.run(params)
    summary = register.run(params)
    assert summary["alias"] == "champion"
    assert not (tmp_path / "mlartifacts").exists()  # artifacts went to the server, not to a local folder
    stored = [p for p in (server_dir / "artifacts").rglob("*") if p.is_file()]
    assert any(p.name == "model.pt" for p in stored)
    client = mlflow.MlflowClient(url)
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED" and "heldout_dice_mean" in run.data.metrics
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    image, _ = write_tiny_volume(11, shape=(40, 36, 5))
    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(image, np.diag([1.5, 1.5, 8.0, 1.0])), str(tmp_path / "in" / "case.nii.gz"))
    out = predict.run(f"models:/{registered_model_name(params)}@champion", tmp_path / "in", tmp_path / "pred")
    assert out["failed"] == [] and len(out["written"]) == 1

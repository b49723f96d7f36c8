"""Scheduled retraining against a real Prefect server: the test starts ``prefect server`` on a free localhost port
and ``medseg serve --cron "* * * * *"`` beside it, and lets the schedule fire: nothing triggers a run by hand.

The first scheduled run trains and registers; the next, a minute later with nothing changed, completes without a new
model version, its decision visible in its log and in its ``unchanged`` task.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time

import pytest
import yaml

from medseg.common.manifest import registered_model_name
from tests.conftest import PIPELINE, REPO, free_port, wait_until_up

pytestmark = [pytest.mark.slow, PIPELINE]


def _wait_for_deployment(name: str, served: subprocess.Popen, seconds: float = 120) -> None:
    """Until ``medseg serve`` has registered the deployment (it is looked up by name, nothing is started)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + seconds
    with get_client(sync_client=True) as client:
        while True:
            try:
                client.read_deployment_by_name(name)
                return
            except ObjectNotFound:
                assert served.poll() is None, "medseg serve exited"
                assert time.monotonic() < deadline, f"no deployment {name} after {seconds} s"
                time.sleep(1)


@pytest.fixture
def prefect_server(tmp_path, monkeypatch):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect_home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_UI_ENABLED": "false", "PREFECT_API_URL": api,
           # the scheduler service looks for due schedules every 2 s instead of every minute
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2"}
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                             str(port), "--no-ui"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_up(f"{api}/health", proc, tmp_path / "server.log")
        monkeypatch.setenv("PREFECT_API_URL", api)
        monkeypatch.setenv("PREFECT_HOME", env["PREFECT_HOME"])
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


def _completed_scheduled_runs(name: str, count: int, served: subprocess.Popen, seconds: float) -> list:
    """The first ``count`` runs of deployment ``name`` that its schedule created, once all have completed."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    deadline = time.monotonic() + seconds
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(name)
        while True:
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                                         sort=FlowRunSort.EXPECTED_START_TIME_ASC)
            started = [r for r in runs if r.state and not r.state.is_scheduled()]
            if len(started) >= count and all(r.state.is_final() for r in started[:count]):
                return started[:count]
            assert served.poll() is None, "medseg serve exited"
            assert time.monotonic() < deadline, [(r.name, r.state.name) for r in runs]
            time.sleep(2)


def test_the_cron_schedule_fires_retrains_then_skips_when_nothing_changed(prefect_server, params_for, tmp_path):
    import mlflow
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from medseg_pipelines.serve import DEPLOYMENT_NAME

    params = params_for(demo={"cardiac_patients": 3, "ct_patients": 0, "polyp_frames": 0})
    params = dataclasses.replace(params, data=dataclasses.replace(params.data, source=f"{params.paths.demo}/acdc"))
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(dataclasses.asdict(params)))
    repo = REPO
    env = {**prefect_server, "PREFECT_RUNNER_POLL_FREQUENCY": "1",
           "PYTHONPATH": os.pathsep.join([str(repo), *sys.path])}
    log = (tmp_path / "serve.log").open("w")
    served = subprocess.Popen([sys.executable, "-m", "medseg.cli", "serve", "--params", str(params_file),
                               "--cron", "* * * * *"], cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        with temporary_settings({PREFECT_API_URL: prefect_server["PREFECT_API_URL"]}):
            name = f"medseg-pipeline/{DEPLOYMENT_NAME}"
            _wait_for_deployment(name, served)
            first, second = _completed_scheduled_runs(name, 2, served, seconds=300)
    finally:
        served.terminate()
        served.wait(timeout=60)
        log.close()
    output = (tmp_path / "serve.log").read_text()
    assert first.state.is_completed() and second.state.is_completed(), (first.state, second.state, output[-3000:])
    assert first.auto_scheduled and second.auto_scheduled  # the schedule made them, not a trigger
    assert (second.expected_start_time - first.expected_start_time).total_seconds() == 60
    assert "nothing changed since champion version 1" in output, output[-3000:]
    mlflow.set_tracking_uri(params.mlflow.tracking_uri)
    versions = mlflow.MlflowClient().search_model_versions(f"name='{registered_model_name(params)}'")
    assert len(versions) == 1

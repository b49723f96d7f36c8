"""The Prefect flow runs the real stages under Prefect's test harness; the retraining schedule registers."""

import asyncio
import dataclasses

import pytest
import yaml

from medseg.common.manifest import registered_model_name
from tests.conftest import PIPELINE

pytestmark = PIPELINE


def write_params(path, params) -> str:
    path.write_text(yaml.safe_dump(dataclasses.asdict(params)))
    return str(path)


@pytest.mark.slow
def test_flow_runs_every_stage_from_demo_data(prefect_harness, params_for, tmp_path):
    from prefect.states import State

    from medseg_pipelines.medseg_flow import medseg_pipeline

    params = params_for(demo={"cardiac_patients": 3, "ct_patients": 0, "polyp_frames": 0})
    params = dataclasses.replace(params, data=dataclasses.replace(params.data, source=f"{params.paths.demo}/acdc"))
    state = medseg_pipeline(params_file=write_params(tmp_path / "params.yaml", params), return_state=True)
    assert isinstance(state, State) and state.is_completed(), state
    summary = state.result()
    assert list(summary) == ["demo_data", "ingest", "plan", "preprocess", "train", "evaluate", "register"]
    assert summary["ingest"]["accepted"] == 6
    assert summary["register"]["alias"] == "champion"
    assert 0.0 <= summary["evaluate"]["dice_mean"] <= 1.0

    # Nothing changed: the second run stops after ingest, with no new MLflow run and no new model version.
    import mlflow

    mlflow.set_tracking_uri(params.mlflow.tracking_uri)
    runs_before = len(mlflow.search_runs(experiment_names=[params.mlflow.experiment], output_format="list"))
    again = medseg_pipeline(params_file=str(tmp_path / "params.yaml"), return_state=True).result()
    assert list(again) == ["demo_data", "ingest", "skipped"]
    assert again["skipped"] == {"reason": "unchanged", "champion_version": summary["register"]["version"]}
    assert len(mlflow.search_runs(experiment_names=[params.mlflow.experiment], output_format="list")) == runs_before
    versions = mlflow.MlflowClient().search_model_versions(f"name='{registered_model_name(params)}'")
    assert len(versions) == 1

    # A changed param that shapes training: the full pipeline runs again.
    changed = dataclasses.replace(params, train=dataclasses.replace(params.train, learning_rate=0.02))
    third = medseg_pipeline(params_file=write_params(tmp_path / "changed.yaml", changed), return_state=True).result()
    assert "skipped" not in third and "register" in third


def test_retraining_deployment_schedule_is_registered(prefect_harness):
    from prefect.client.orchestration import get_client

    from medseg_pipelines.serve import DEFAULT_CRON, DEPLOYMENT_NAME, build_deployment

    deployment = build_deployment(cron="30 3 * * 1")

    async def register_and_read():
        deployment_id = await deployment.apply()
        async with get_client() as client:
            return await client.read_deployment(deployment_id)

    deployment = asyncio.run(register_and_read())
    assert deployment.name == DEPLOYMENT_NAME
    assert deployment.parameters["params_file"] == "params.yaml"
    crons = [s.schedule.cron for s in deployment.schedules]
    assert crons == ["30 3 * * 1"]
    assert deployment.parameters["skip_unchanged"] is True
    limit = deployment.concurrency_options
    assert deployment.global_concurrency_limit.limit == 1 and limit.collision_strategy == "CANCEL_NEW"
    from prefect.client.schemas.schedules import CronSchedule

    CronSchedule(cron=DEFAULT_CRON)  # the default parses as a cron schedule


def _tree(folder) -> dict:
    """Every file under ``folder`` but ingest's re-run cache (it holds file times) -> its SHA-256."""
    import hashlib
    from pathlib import Path

    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file() and p.name != ".ingest_cache.json"}


@pytest.mark.slow
def test_pipeline_on_a_local_dask_cluster_runs_a_task_per_case_with_identical_outputs(prefect_harness, params_for,
                                                                                      tmp_path):
    """orchestration.task_runner: dask. Ingest and preprocess run one task per case on two worker processes; their
    outputs are byte for byte those of the stages run alone (threads, in order); the flow's own process keeps its
    thread settings for training."""
    import os

    from prefect import get_client

    from medseg import ingest

    from medseg.planning import plan

    from medseg.preprocessing import preprocess
    from medseg_pipelines import medseg_flow

    params = params_for(demo={"cardiac_patients": 3, "ct_patients": 0, "polyp_frames": 0},
                        orchestration={"task_runner": "dask", "dask_workers": 2})
    params = dataclasses.replace(params, data=dataclasses.replace(params.data, source=f"{params.paths.demo}/acdc"))
    threads_before = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    summary = medseg_flow.run(write_params(tmp_path / "params.yaml", params))
    assert summary["ingest"]["accepted"] == 6 and summary["preprocess"]["cases"] == 6
    assert summary["register"]["alias"] == "champion"
    assert {k: os.environ.get(k) for k in threads_before} == threads_before

    async def case_tasks():  # this flow run's case tasks (the harness's store holds the module's other runs)
        from prefect.client.schemas.filters import FlowRunFilter, LogFilter, LogFilterTaskRunId
        from prefect.client.schemas.sorting import FlowRunSort

        async with get_client() as client:
            [latest] = await client.read_flow_runs(limit=1, sort=FlowRunSort.START_TIME_DESC)
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [latest.id]}))
            cases = [t for t in runs if t.name.split("-case")[0] in ("ingest", "preprocess") and t.state.is_completed()]
            logs = await client.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(
                any_=[t.id for t in cases])), limit=200)
            return sorted(t.name for t in cases), [log.message for log in logs if log.message.startswith("running on")]

    names, places = asyncio.run(case_tasks())
    assert sum(n.startswith("ingest-case") for n in names) == 6
    assert sum(n.startswith("preprocess-case") for n in names) == 6
    # each case task says where it ran: on the two Dask worker processes, not in the flow's
    assert len(places) == 12 and all(p.startswith("running on dask worker") for p in places), places
    pids = {int(p.rsplit("process ", 1)[1]) for p in places}
    assert len(pids) == 2 and os.getpid() not in pids

    alone = dataclasses.replace(params, paths=dataclasses.replace(
        params.paths, ingested=str(tmp_path / "alone" / "ingested"), plans=str(tmp_path / "alone" / "plans"),
        preprocessed=str(tmp_path / "alone" / "preprocessed")))
    ingest.ingest_folder(alone.data.source, alone.paths.ingested)
    plan.run(alone)
    preprocess.run(alone)
    for folder in ("ingested", "preprocessed"):
        on_dask, by_itself = _tree(getattr(params.paths, folder)), _tree(getattr(alone.paths, folder))
        assert on_dask == by_itself and len(on_dask) >= 12, folder

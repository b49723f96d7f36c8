"""Prefect flow ``medseg-pipeline``: the same stage functions that ``dvc.yaml`` and the CLI call.

Tasks take parameters and paths and return small JSON summaries, never volumes or models. Run it locally with
``medseg pipeline`` (or ``python -m pipelines.medseg_flow``); with no ``PREFECT_API_URL`` set, Prefect starts its
embedded server for the run.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from medseg.params import Params, load_params

__all__ = ["medseg_pipeline", "task_runner", "STAGE_TASKS"]

# DVC does the caching of stage outputs; Prefect re-runs what the flow asks for. I/O-bound stages retry, backing off
# (a network share or the MLflow server back after a blip).
IO_RETRIES = dict(retries=2, retry_delay_seconds=[5, 30])


@task(name="demo_data", cache_policy=NO_CACHE, **IO_RETRIES)
def demo_data_task(params: Params) -> dict:
    from medseg import demo_data

    d = params.demo
    return demo_data.run(Path(params.paths.demo), seed=d.seed, cardiac_patients=d.cardiac_patients,
                         ct_patients=d.ct_patients)


@task(name="ingest", cache_policy=NO_CACHE, **IO_RETRIES)
def ingest_task(params: Params) -> dict:
    from medseg import ingest

    return ingest.run(Path(params.data.source), Path(params.paths.ingested), layout=params.data.layout,
                      spacing_tolerance=params.data.slice_spacing_tolerance)


@task(name="plan", cache_policy=NO_CACHE, **IO_RETRIES)
def plan_task(params: Params) -> dict:
    from medseg import plan

    return plan.run(params)


@task(name="preprocess", cache_policy=NO_CACHE, **IO_RETRIES)
def preprocess_task(params: Params) -> dict:
    from medseg import preprocess

    return preprocess.run(params)


@task(name="train", cache_policy=NO_CACHE)
def train_task(params: Params, resume: bool = True) -> dict:
    from medseg import train

    return train.run(params, resume=resume)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(params: Params) -> dict:
    from medseg import evaluate

    return evaluate.run(params)


@task(name="register", cache_policy=NO_CACHE, **IO_RETRIES)
def register_task(params: Params) -> dict:
    from medseg import register

    return register.run(params)


@task(name="unchanged", cache_policy=NO_CACHE, **IO_RETRIES)
def unchanged_task(params: Params) -> str | None:
    """The champion's version when it was trained on exactly what a retraining would use now (data content,
    params, code: :func:`medseg.train.training_inputs`), else None."""
    from medseg import register
    from medseg.train import training_inputs

    current = register.champion(params)
    if current is None or current.get(register.INPUTS_TAG) != training_inputs(params):
        return None
    return current["version"]


def task_runner(params: Params):
    """The Prefect task runner ``orchestration`` names: threads in this process, or a Dask cluster (the one at
    ``dask_address``, else a local one of ``dask_workers`` single-threaded worker processes)."""
    from prefect.task_runners import ThreadPoolTaskRunner

    o = params.orchestration
    if o.task_runner == "thread":
        return ThreadPoolTaskRunner()
    from prefect_dask import DaskTaskRunner

    if o.dask_address:
        return DaskTaskRunner(address=o.dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": o.dask_workers, "threads_per_worker": 1,
                                          "dashboard_address": None})


# dvc.yaml stage name -> the task that runs the same stage function (checked by tests/test_contracts.py).
STAGE_TASKS = {
    "demo_data": demo_data_task,
    "ingest": ingest_task,
    "plan": plan_task,
    "preprocess": preprocess_task,
    "train": train_task,
    "evaluate": evaluate_task,
    "register": register_task,
}


def _uses_demo_data(params: Params) -> bool:
    source, demo = Path(params.data.source).resolve(), Path(params.paths.demo).resolve()
    return source == demo or demo in source.parents


@flow(name="medseg-pipeline", log_prints=True)
def medseg_pipeline(params_file: str = "params.yaml", resume: bool = True, skip_unchanged: bool = True) -> dict:
    """Demo data (when the source is the demo set), ingest, plan, preprocess, train, evaluate, register.

    With ``skip_unchanged`` (the default, and what the scheduled deployment runs), a run whose data content, params
    and code equal those the current champion was trained on stops after ingest: it has nothing new to learn.
    """
    params = load_params(params_file)
    summary: dict = {}
    if _uses_demo_data(params):
        summary["demo_data"] = demo_data_task(params)
    summary["ingest"] = ingest_task(params)
    if skip_unchanged:
        version = unchanged_task(params)
        if version is not None:
            print(f"nothing changed since champion version {version} was trained (same data, params and code): "
                  f"no retraining, no new MLflow run or model version")
            summary["skipped"] = {"reason": "unchanged", "champion_version": version}
            return summary
    summary["plan"] = plan_task(params)
    summary["preprocess"] = preprocess_task(params)
    summary["train"] = train_task(params, resume=resume)
    summary["evaluate"] = evaluate_task(params)
    summary["register"] = register_task(params)
    return summary


if __name__ == "__main__":  # pragma: no cover
    import sys

    medseg_pipeline(*sys.argv[1:2])

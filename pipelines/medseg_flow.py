"""Prefect flow ``medseg-pipeline``: the same stage functions that ``dvc.yaml`` and the CLI call.

Tasks take parameters and paths and return small JSON summaries, never volumes or models. Run it locally with
``medseg pipeline`` (or ``python -m medseg_pipelines.medseg_flow``); with no ``PREFECT_API_URL`` set, Prefect starts its
embedded server for the run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from medseg.common.case_map import CaseMap, as_finished
from medseg.common.params import DEFAULT_PARAMS_FILE, Params, load_params

__all__ = ["medseg_pipeline", "run", "task_runner", "prefect_case_map", "STAGE_TASKS", "where"]

# DVC does the caching of stage outputs; Prefect re-runs what the flow asks for. I/O-bound stages retry, backing off
# (a network share or the MLflow server back after a blip).
IO_RETRIES = dict(retries=2, retry_delay_seconds=[5, 30])


@task(name="demo_data", cache_policy=NO_CACHE, **IO_RETRIES)
def demo_data_task(params: Params) -> dict:
    from medseg.demo import demo_data

    return demo_data.run(params)


@task(name="case", cache_policy=NO_CACHE, **IO_RETRIES)
def case_task(fn: Callable[..., Any], args: tuple) -> Any:
    """One case of a stage: ``fn(*args)``, on the flow's task runner (a thread here, or a Dask worker). Its log says
    where it ran (:func:`where`), so the Prefect UI shows the fan-out."""
    from prefect import get_run_logger

    get_run_logger().info("running on %s", where())
    return fn(*args)


def where() -> str:
    """``dask worker <name>, process <pid>`` inside a Dask worker, else ``process <pid>, thread <name>``."""
    import os
    import threading

    try:
        from distributed import get_worker

        return f"dask worker {get_worker().name}, process {os.getpid()}"
    except (ImportError, ValueError):  # not in a Dask worker
        return f"process {os.getpid()}, thread {threading.current_thread().name}"


def prefect_case_map(stage: str) -> CaseMap:
    """A :mod:`medseg.common.case_map` case map that submits one ``<stage>-case`` task per case to the flow's task runner
    (retried with backoff like the other I/O tasks); results are yielded as the tasks finish."""

    def case_map(fn: Callable[..., Any], calls: Sequence[tuple]) -> Iterator[tuple[int, Any]]:
        from prefect.futures import as_completed

        named = case_task.with_options(name=f"{stage}-case")
        futures = [named.submit(fn, args) for args in calls]
        yield from as_finished(futures, as_completed(futures))

    return case_map


def ingest_stage(params: Params) -> dict:
    """Ingest with one task per case. Not a task itself: the case tasks go to the flow's task runner."""
    from medseg import ingest

    return ingest.run(params, case_map=prefect_case_map("ingest"))


@task(name="plan", cache_policy=NO_CACHE, **IO_RETRIES)
def plan_task(params: Params) -> dict:
    from medseg.planning import plan

    return plan.run(params)


def preprocess_stage(params: Params) -> dict:
    """Preprocess with one task per case, on the flow's task runner."""
    from medseg.preprocessing import preprocess

    return preprocess.run(params, case_map=prefect_case_map("preprocess"))


@task(name="train", cache_policy=NO_CACHE)
def train_task(params: Params, resume: bool = True, inputs: str | None = None) -> dict:
    from medseg.training import train

    return train.run(params, resume=resume, inputs=inputs)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(params: Params) -> dict:
    from medseg.evaluation import evaluate

    return evaluate.run(params)


@task(name="register", cache_policy=NO_CACHE, **IO_RETRIES)
def register_task(params: Params) -> dict:
    from medseg.registry import register

    return register.run(params)


@task(name="unchanged", cache_policy=NO_CACHE, **IO_RETRIES)
def unchanged_task(params: Params) -> tuple[str, str | None]:
    """What a retraining would learn from now (data content, params, code: :func:`medseg.training.resume.training_inputs`),
    and the champion's version when it was trained on exactly that, else None."""
    from medseg.registry import register
    from medseg.training.resume import training_inputs

    inputs, current = training_inputs(params), register.champion(params)
    if current is None or current.get(register.INPUTS_TAG) != inputs:
        return inputs, None
    return inputs, current["version"]


# A local cluster's worker processes each get one thread for numpy/torch: the workers are the parallelism.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "MALLOC_TRIM_THRESHOLD_": "65536"}


def task_runner(params: Params):
    """The Prefect task runner ``orchestration`` names: threads in this process (one per CPU), or a Dask cluster
    (the one at ``dask_address``, else a local one of ``dask_workers`` single-threaded worker processes).

    Per-case tasks (ingest, preprocess, batch prediction) are submitted to it; training and the other stages run in
    the flow's own process with all its threads.
    """
    import os

    from prefect.task_runners import ThreadPoolTaskRunner

    o = params.orchestration
    if o.task_runner == "thread":
        return ThreadPoolTaskRunner(max_workers=os.cpu_count() or 1)
    import dask
    from prefect_dask import DaskTaskRunner

    if o.dask_address:
        return DaskTaskRunner(address=o.dask_address)
    # distributed's default "pre-spawn-environ" writes WORKER_ENV into THIS process's os.environ before spawning
    # each worker, so training later in the flow would run on one thread; hand it to the workers alone instead.
    dask.config.set({"distributed.nanny.pre-spawn-environ": {}})
    return DaskTaskRunner(cluster_kwargs={"n_workers": o.dask_workers, "threads_per_worker": 1,
                                          "dashboard_address": None, "env": WORKER_ENV})


# dvc.yaml stage name -> the task (or, for per-case stages, the function submitting case tasks) that runs the same
# stage function (checked by tests/test_contracts.py).
STAGE_TASKS = {
    "demo_data": demo_data_task,
    "ingest": ingest_stage,
    "plan": plan_task,
    "preprocess": preprocess_stage,
    "train": train_task,
    "evaluate": evaluate_task,
    "register": register_task,
}


def _uses_demo_data(params: Params) -> bool:
    source, demo = Path(params.data.source).resolve(), Path(params.paths.demo).resolve()
    return source == demo or demo in source.parents


@flow(name="medseg-pipeline", log_prints=True)
def medseg_pipeline(params_file: str = DEFAULT_PARAMS_FILE, resume: bool = True, skip_unchanged: bool = True) -> dict:
    """Demo data (when the source is the demo set), ingest, plan, preprocess, train, evaluate, register.

    With ``skip_unchanged`` (the default, and what the scheduled deployment runs), a run whose data content, params
    and code equal those the current champion was trained on stops after ingest: it has nothing new to learn.
    """
    params = load_params(params_file)
    summary: dict = {}
    if _uses_demo_data(params):
        summary["demo_data"] = demo_data_task(params)
    summary["ingest"] = ingest_stage(params)
    inputs = None
    if skip_unchanged:
        inputs, version = unchanged_task(params)
        if version is not None:
            print(f"nothing changed since champion version {version} was trained (same data, params and code): "
                  f"no retraining, no new MLflow run or model version")
            summary["skipped"] = {"reason": "unchanged", "champion_version": version}
            return summary
    summary["plan"] = plan_task(params)
    summary["preprocess"] = preprocess_stage(params)
    summary["train"] = train_task(params, resume=resume, inputs=inputs)  # hashed once, just above
    summary["evaluate"] = evaluate_task(params)
    summary["register"] = register_task(params)
    return summary


def run(params_file: str = DEFAULT_PARAMS_FILE, resume: bool = True, skip_unchanged: bool = True) -> dict:
    """The flow on the task runner ``orchestration`` in params names."""
    flow_ = medseg_pipeline.with_options(task_runner=task_runner(load_params(params_file)))
    return flow_(params_file=params_file, resume=resume, skip_unchanged=skip_unchanged)


if __name__ == "__main__":  # pragma: no cover
    import sys

    from medseg.common.malloc_tuning import keep_freed_memory

    keep_freed_memory()
    run(*sys.argv[1:2])

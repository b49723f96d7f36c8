"""Prefect flow ``medseg-predict``: batch prediction over many studies, one task per study or NIfTI file.

The input folder splits into units (:func:`medseg.inference.inputs.prediction_units`); each runs ``medseg predict``'s own
code in a task with retries, on the task runner ``orchestration.task_runner`` names (threads here, or a Dask
cluster), and writes into the same output folder: a NIfTI file keeps its stem, a study folder's outputs are named
``<study>_<series>``. The flow returns a summary of what succeeded and what failed, and why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from medseg.common.params import DEFAULT_PARAMS_FILE, load_params
from medseg_pipelines.medseg_flow import IO_RETRIES, task_runner

__all__ = ["medseg_predict", "predict_unit"]


@task(name="predict-case", cache_policy=NO_CACHE, **IO_RETRIES)
def predict_unit(model: str, unit: str, out: str, device: str, mlflow_params: Any,
                 spacing_tolerance: float | None = None) -> dict:
    from medseg.inference import predict

    prefix = None if Path(unit).is_file() else Path(unit).name
    return predict.run(model, Path(unit), Path(out), device=device, prefix=prefix, mlflow_params=mlflow_params,
                       spacing_tolerance=spacing_tolerance)


@flow(name="medseg-predict", log_prints=True)
def medseg_predict(model: str, input_path: str, out: str, params_file: str = DEFAULT_PARAMS_FILE) -> dict:
    """Segment every study under ``input_path`` into ``out``, one task per study."""
    from medseg.inference.inputs import prediction_units

    params = load_params(params_file)
    units = prediction_units(Path(input_path))
    futures = [predict_unit.submit(model, str(u), out, params.train.device, params.mlflow,
                                   params.data.slice_spacing_tolerance) for u in units]
    written, failed = [], []
    for unit, future in zip(units, futures):
        state = future.wait() or future.state
        if state.is_completed():
            result = future.result()
            written += result["written"]
            failed += [{**f, "unit": unit.name} for f in result["failed"]]
        else:
            failed.append({"unit": unit.name, "input": unit.name, "reason": str(state.message or state.name)})
    print(f"medseg-predict: {len(written)} written, {len(failed)} failed, {len(units)} task(s)")
    return {"model": model, "tasks": len(units), "written": sorted(written), "failed": failed,
            "succeeded": len(written)}


def run(model: str, input_path: str, out: str, params_file: str = DEFAULT_PARAMS_FILE) -> dict:
    """The flow on the task runner ``orchestration`` in params names."""
    params = load_params(params_file)
    return medseg_predict.with_options(task_runner=task_runner(params))(model, input_path, out, params_file)

"""The retraining deployment: ``medseg-pipeline`` on a cron schedule, served by this process.

``medseg serve`` (or ``python -m medseg_pipelines.serve``) registers the deployment with the Prefect server named by
``PREFECT_API_URL`` (start one with ``prefect server start``) and runs scheduled flow runs until stopped.
"""

from __future__ import annotations

from medseg.common.params import DEFAULT_PARAMS_FILE

__all__ = ["DEPLOYMENT_NAME", "DEFAULT_CRON", "build_deployment", "serve"]

DEPLOYMENT_NAME = "medseg-retrain"
DEFAULT_CRON = "0 2 * * 0"  # Sundays at 02:00: weekly retraining on whatever data.source holds by then


def build_deployment(params_file: str = DEFAULT_PARAMS_FILE, cron: str | None = None):
    """The deployment object (not yet registered): flow, parameters and schedule."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    from medseg.common.params import load_params
    from medseg_pipelines.medseg_flow import medseg_pipeline, task_runner

    flow_ = medseg_pipeline.with_options(task_runner=task_runner(load_params(params_file)))
    return flow_.to_deployment(
        name=DEPLOYMENT_NAME,
        cron=cron or DEFAULT_CRON,
        # One retraining at a time; a run due while one is still going is cancelled, not queued, so missed
        # schedules never pile up behind a long training.
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
        parameters={"params_file": params_file, "resume": True, "skip_unchanged": True},
        description="Weekly retraining: ingest, preprocess, train, evaluate, register (champion only if better).",
        tags=["medseg", "retraining"],
    )


def serve(params_file: str = DEFAULT_PARAMS_FILE, cron: str | None = None) -> None:
    """Register the deployment and serve its scheduled runs (blocks)."""
    from prefect import serve as prefect_serve

    prefect_serve(build_deployment(params_file, cron))


if __name__ == "__main__":  # pragma: no cover
    from medseg.common.malloc_tuning import keep_freed_memory

    keep_freed_memory()
    serve()

"""Logging a trained fold as the run's MLflow model: a ``python_function`` model whose loader is
:mod:`medseg.registry.pyfunc_model` (named here, not imported: the train stage's code does not include the predictor
it serves, so editing predict does not retrain) and whose data is the fold folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["log_model", "LOADER_MODULE"]

LOADER_MODULE = "medseg.registry.pyfunc_model"


def log_model(folder: Path, name: str = "model") -> Any:
    """Log the fold ``folder`` as an MLflow model in the active run; returns MLflow's ``ModelInfo``. Its signature is
    the served interface: base64-encoded files in (``image``), base64-encoded masks out (``mask``)."""
    import mlflow
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema

    # "image" not required by the schema, so that a request without it reaches the model and gets its one line
    signature = ModelSignature(inputs=Schema([ColSpec(DataType.string, "image", required=False)]),
                               outputs=Schema([ColSpec(DataType.string, "mask")]))
    return mlflow.pyfunc.log_model(name=name, loader_module=LOADER_MODULE, data_path=str(folder), signature=signature,
                                   pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "monai", "numpy",
                                                     "medseg"])

"""The MLflow form of a trained model: a ``python_function`` model whose loader is this module and whose data is the
fold folder (``model.pt``: weights and inference config; ``inference_config.json``).

Why not ``mlflow.pytorch``: its models are pickles (the network's classes, and a ``pickle_module`` name the loader
imports), so whoever can write to the registry or artifact store can run code on every machine that loads a model.
Here nothing is unpickled: the network is rebuilt by medseg from the config's spec and the weights are read with
``torch.load(weights_only=True)`` (:func:`medseg.inference.model_folder.load_trained`). The registry, the UI and the signature
work as before, and ``mlflow.pyfunc.load_model(uri).predict(x)`` runs the network on any batch and patch size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["log_model", "Predictor"]


def log_model(folder: Path, config: dict, name: str = "model") -> Any:
    """Log the fold ``folder`` as an MLflow model in the active run; returns MLflow's ``ModelInfo``."""
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    spatial = [-1] * int(config["network"]["spatial_dims"])
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, config["in_channels"], *spatial))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, config["out_channels"], *spatial))]),
    )
    return mlflow.pyfunc.log_model(name=name, loader_module=__name__, data_path=str(folder), signature=signature,
                                   pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "monai", "numpy",
                                                     "medseg"])


class Predictor:
    """What ``mlflow.pyfunc.load_model`` returns the network as: ``predict`` maps a float32 batch
    ``(N, C, *spatial)`` to logits ``(N, classes, *spatial)``."""

    def __init__(self, net, config: dict) -> None:
        self.net, self.config = net, config

    def predict(self, model_input, params: dict | None = None):
        import numpy as np
        import torch

        with torch.no_grad():
            x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
            return self.net(x).numpy()


def _load_pyfunc(data_path: str, model_config: Any = None) -> Predictor:
    """MLflow's entry point for ``loader_module`` models: ``data_path`` is the logged fold folder."""
    from medseg.inference.model_folder import load_trained

    (net, config), = load_trained(Path(data_path))
    return Predictor(net, config)

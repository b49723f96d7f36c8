"""medseg: reproducible medical image segmentation on MONAI, DVC, Prefect and MLflow.

The package is laid out as the lifecycle it runs, each folder importing only those listed after it
(``[tool.importlinter]`` in ``pyproject.toml`` checks it)::

    cli             the ``medseg`` command (and the Prefect flows in ``pipelines/``)
    training        the train stage: loop, loaders, resume, distributed
    registry        register, the promotion gate, the MLflow model flavour, drift
    evaluation      one Dice/HD95, the evaluate stage, plots, the post-processing decision
    inference       predict, sliding window, post-processing, DICOM-SEG, the trained-model folder
    preprocessing   the preprocess stage, resampling, MONAI transforms
    planning        the plan stage, the dataset fingerprint
    ingest | demo   DICOM/NIfTI/image ingestion | the demo data generator
    networks        architectures, encoders, pretrained weights, U-Net border weights
    common          params, manifest, atomic writes, pseudonyms, errors, MLflow set-up, the network spec

Modules that lived at the top level before this layout (``medseg.predict``, ``medseg.train``, ...) still import, as
aliases of their new homes (:data:`MOVED`), so code and registered MLflow models written against them keep working;
the two whose names are now folders, ``medseg.networks`` and ``medseg.inference``, still give their old functions
(``from medseg.networks import build_network``), from ``architectures`` and ``sliding_window``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

#: Old top-level module -> its place in the lifecycle layout (``medseg.<old>`` imports as ``medseg.<new>``).
MOVED = {
    "params": "common.params",
    "manifest": "common.manifest",
    "atomic": "common.atomic_write",
    "pseudonym": "common.pseudonym",
    "errors": "common.errors",
    "tracking": "common.tracking",
    "casemap": "common.case_map",
    "pgzip": "common.fast_gzip",
    "codedeps": "common.code_deps",
    "allocator": "common.malloc_tuning",
    "network_spec": "common.network_spec",
    "encoders": "networks.encoders",
    "weights": "networks.border_weights",
    "pretrained": "networks.pretrained_weights",
    "plan": "planning.plan",
    "fingerprint": "planning.fingerprint",
    "preprocess": "preprocessing.preprocess",
    "resample": "preprocessing.resample",
    "transforms": "preprocessing.transforms",
    "predict": "inference.predict",
    "postprocess": "inference.postprocess",
    "dicom_seg": "inference.dicom_seg",
    "model_folder": "inference.model_folder",
    "train": "training.train",
    "data": "training.loaders",
    "distributed": "training.distributed",
    "metrics": "evaluation.metrics",
    "evaluate": "evaluation.evaluate",
    "plots": "evaluation.plots",
    "register": "registry.register",
    "promotion": "registry.promotion",
    "mlflow_model": "registry.pyfunc_model",
    "drift": "registry.drift",
    "demo_data": "demo.demo_data",
    "demo_ct": "demo.ct",
    "demo_polyp": "demo.polyp",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``medseg.<old>`` as the module it moved to: the same module object, so attributes set through either
    name (monkeypatching included) are seen through both. Nothing is imported before someone asks for an old name."""

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, old = fullname.partition(".")
        if prefix != __name__ or old not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        # the import system re-reads sys.modules after this, so the old name ends up bound to the real module
        old = module.__name__.partition(".")[2]
        sys.modules[module.__name__] = importlib.import_module(f"{__name__}.{MOVED[old]}")


def old_module_names(package: str, module: str):
    """The ``__getattr__`` of a folder whose name an old module had (``medseg.networks``, ``medseg.inference``): the old
    module's names, from the module they moved to. Imported by name when first asked for, so that no stage's code deps
    (:mod:`medseg.common.code_deps`) or layer check counts it: only code written against the old module reaches it."""

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return getattr(importlib.import_module(f"{package}.{module}"), name)
        except AttributeError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None

    return __getattr__


if not any(type(finder).__name__ == "_Alias" for finder in sys.meta_path):
    sys.meta_path.append(_Alias())

"""``medseg export-bundle``: a trained model as a MONAI bundle, run by MONAI's own runner without medseg installed.

The bundle (MONAI Bundle specification: https://docs.monai.io/en/stable/mb_specification.html)::

    configs/metadata.json    versions, task, labels (channel_def), input/output format, cross-validated Dice
    configs/inference.json   the network, preprocessing, sliding window, post-processing and writer, as MONAI
                             components: `python -m monai.bundle run --config_file DIR/configs/inference.json
                             --dataset_dir IN --output_dir OUT` writes OUT/<case>_seg.nii.gz for each IN/*.nii(.gz)
    models/model.pt          the network's state dict (MONAI's CheckpointLoader, ``weights_only``)
    docs/README.md           what it does, how to run it, where it differs from ``medseg predict``

Every component is MONAI's, configured with what medseg's own inference uses: the network class and arguments of
:func:`medseg.networks.architectures.monai_network`, the inferer of
:func:`medseg.inference.sliding_window.inferer_arguments`, and the preprocessing of
:func:`medseg.preprocessing.transforms.preprocess_transforms` written with MONAI's transforms (orientation to RAS,
``Spacingd`` to the model's spacing, the body crop, normalisation), inverted on the labels by ``Invertd``.
Where it cannot equal ``medseg predict``: medseg resamples one axis at a time (the same interpolation, float32
rounding apart) and thresholds the body crop on every 8th voxel in memory order (MONAI's arrays are laid out
differently, so the crop may differ by a voxel, and the z-score statistics with it); mirroring test-time augmentation
and fold ensembles are not exported (one network, no mirroring); 2D RGB frames and pretrained-encoder networks are
refused (their reader and network are medseg's).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from medseg.common.errors import StageInputError

__all__ = ["run", "inference_config", "metadata", "SCHEMA_URL"]

log = logging.getLogger(__name__)

# The metadata schema MONAI's model zoo validates against (`python -m monai.bundle verify_metadata` downloads it).
SCHEMA_URL = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
              "meta_schema_20240725.json")
BUNDLE_VERSION = "0.1.0"
# CropForegroundd's selection, as medseg.preprocessing.transforms.ForegroundSelect (5 % of the way from the minimum
# to the 99th percentile of every 8th voxel): an expression of the bundle's config, as MONAI's bundles write them.
FOREGROUND = ("$lambda x: x > float(x.min()) + 0.05 * (float(numpy.percentile(numpy.asarray(x).ravel(order='K')[::8], "
              "99)) - float(x.min()))")


def _intensity(normalization: dict) -> list[dict]:
    """MONAI transforms for the model's normalisation (``plans.json``'s entry), after the resampling."""
    crop = {"_target_": "CropForegroundd", "keys": "image", "source_key": "image", "select_fn": FOREGROUND,
            "margin": 4, "allow_smaller": True}
    scheme = normalization["scheme"]
    if scheme == "ct":
        lo, hi = (float(v) for v in normalization["clip"])
        return [{"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": lo, "a_max": hi, "b_min": lo,
                 "b_max": hi, "clip": True},
                crop,
                {"_target_": "NormalizeIntensityd", "keys": "image", "subtrahend": float(normalization["mean"]),
                 "divisor": float(normalization["std"])}]
    if scheme == "zscore":
        return [crop, {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": False,
                       "channel_wise": bool(normalization.get("channel_wise", False))}]
    raise StageInputError(f"a model normalised as {scheme!r} (2D RGB frames) is not exported: the bundle reads "
                          f"NIfTI volumes")


def inference_config(config: dict, bundle_root: Path) -> dict[str, Any]:
    """``configs/inference.json`` for a model whose inference config (``inference_config.json``) is ``config``."""
    from medseg.inference.model_folder import largest_component_classes
    from medseg.inference.sliding_window import inferer_arguments
    from medseg.networks.architectures import monai_network

    network, arguments = monai_network(config["network"], config["in_channels"], config["out_channels"])
    inferer, window = inferer_arguments(config["patch_size"], int(config["network"]["spatial_dims"]),
                                        float(config.get("sw_overlap", 0.5)), int(config.get("sw_batch_size", 8)))
    modality = config["modality"]
    preprocessing = [
        {"_target_": "LoadImaged", "keys": "image", "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
        {"_target_": "Spacingd", "keys": "image", "pixdim": [float(s) for s in config["target_spacing"]],
         "mode": "bilinear", "padding_mode": "border", "dtype": "$numpy.float32"},
        {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"},
        *_intensity(config["normalization"][modality]),
    ]
    postprocessing = [{"_target_": "AsDiscreted", "keys": "pred", "argmax": True}]  # the argmax of softmax
    largest = largest_component_classes(config, int(config["out_channels"]))
    if largest:
        postprocessing.append({"_target_": "KeepLargestConnectedComponentd", "keys": "pred", "applied_labels": largest,
                               "independent": True})
    postprocessing += [
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
         "nearest_interp": True, "to_tensor": True},
        {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
         "output_dtype": "$numpy.uint8", "resample": False, "separate_folder": False, "print_log": False},
    ]
    return {
        "imports": ["$import glob", "$import os", "$import numpy", "$import torch"],
        "bundle_root": str(bundle_root),  # where the bundle was written; moved elsewhere: --bundle_root DIR
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "$@bundle_root + '/input'",
        "datalist": "$sorted(glob.glob(os.path.join(@dataset_dir, '*.nii.gz')) + "
                    "glob.glob(os.path.join(@dataset_dir, '*.nii')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": {"_target_": network, **arguments},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": inferer, **window},
        "postprocessing": {"_target_": "Compose", "transforms": postprocessing},
        "handlers": [{"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
                      "load_dict": {"model": "@network"}, "map_location": "@device"}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": False},
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@evaluator.run()"],
    }


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("monai", "torch", "numpy", "nibabel", "scikit-image")
            if _installed(name)}


def _installed(name: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(name)
    except PackageNotFoundError:
        return False
    return True


def metadata(config: dict, name: str, source: str, dice: float | None) -> dict[str, Any]:
    """``configs/metadata.json``: what MONAI's bundle specification asks for, from the model's inference config."""
    versions = _versions()
    labels = {str(k): v for k, v in sorted(config["labels"].items(), key=lambda kv: int(kv[0]))}
    dims = int(config["network"]["spatial_dims"])
    shape = [int(s) for s in config["patch_size"][:dims]]
    modality = config["modality"]
    fmt = "hounsfield" if modality == "CT" else "magnitude"
    window = ("one axial slice at a time (MONAI SliceInferer)" if dims == 2 else "3D windows")
    return {
        "schema": SCHEMA_URL,
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported by medseg export-bundle from {source}"},
        "monai_version": versions["monai"],
        "pytorch_version": versions["torch"].split("+")[0],
        "numpy_version": versions["numpy"],
        "required_packages_version": {k: versions[k] for k in ("nibabel", "scikit-image") if k in versions},
        "optional_packages_version": {},
        "name": name,
        "task": f"{modality} segmentation of {', '.join(v for k, v in labels.items() if k != '0')}",
        "description": (f"A {config['network']['name']} trained by medseg ({dims}D, {window}, at "
                        f"{config['target_spacing']} mm), exported with its preprocessing and post-processing. "
                        f"Run: python -m monai.bundle run --config_file configs/inference.json --dataset_dir IN "
                        f"--output_dir OUT (each IN/*.nii.gz gives OUT/<case>_seg.nii.gz on the input's grid)."),
        "authors": "medseg",
        "copyright": "Copyright (c) the model's owners; exported by medseg",
        "data_source": "the data the model was trained on (see its MLflow run)",
        "data_type": "nibabel",
        "image_classes": f"single channel {modality} volume, any spacing and orientation (resampled to "
                         f"{config['target_spacing']} mm in RAS)",
        "label_classes": ", ".join(f"{k}: {v}" for k, v in labels.items()),
        "pred_classes": ", ".join(f"{k}: {v}" for k, v in labels.items()),
        "eval_metrics": {"mean_dice": dice} if dice is not None else {},
        "intended_use": "research; not a medical device",
        "references": ["Cardoso et al. 2022, MONAI: An open-source framework for deep learning in healthcare"],
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": fmt, "modality": modality,
                                 "num_channels": int(config["in_channels"]), "spatial_shape": shape,
                                 "dtype": "float32", "value_range": [], "is_patch_data": True,
                                 "channel_def": {"0": "image"}}},
            "outputs": {"pred": {"type": "image", "format": "segmentation",
                                 "num_channels": int(config["out_channels"]), "spatial_shape": shape,
                                 "dtype": "float32", "value_range": [], "is_patch_data": True,
                                 "channel_def": labels}},
        },
        "medseg": {"target_spacing": config["target_spacing"], "normalization": config["normalization"],
                   "largest_component": config.get("largest_component"), "tta_not_exported": bool(config.get("tta"))},
    }


def _registered_dice(model: str, mlflow_params: Any) -> float | None:
    """The cross-validated Dice a ``models:/`` version is tagged with, or None."""
    if not model.startswith("models:/"):
        return None
    import mlflow

    from medseg.common.tracking import tracking_uri
    from medseg.registry.register import SCORE_TAG

    client = mlflow.MlflowClient(tracking_uri(mlflow_params))
    name, _, ref = model.removeprefix("models:/").partition("@")
    try:
        version = client.get_model_version_by_alias(name, ref) if ref else None
    except Exception:  # noqa: BLE001 - the score is a nicety; the model itself loaded
        return None
    value = version.tags.get(SCORE_TAG) if version else None
    return float(value) if value else None


def _readme(name: str, config: dict, source: str) -> str:
    return f"""# {name} (MONAI bundle exported by medseg)

From `{source}`. Run it with MONAI alone:

    python -m monai.bundle run --config_file configs/inference.json --dataset_dir IN --output_dir OUT

Each `IN/*.nii.gz` gives `OUT/<case>_seg.nii.gz` on the input's own grid (labels: {config['labels']}). If the bundle
folder moved, add `--bundle_root <its folder>`. Validate it with `python -m monai.bundle verify_net_in_out network_def
--meta_file configs/metadata.json --config_file configs/inference.json`.

Differences from `medseg predict` with the same model: no mirroring test-time augmentation and no fold ensemble (one
network); resampling and the body crop by MONAI's transforms rather than medseg's one-axis-at-a-time versions (the
same interpolation; a voxel of crop may differ, so intensities may differ by float rounding).
"""


def run(model: str, out: Path, mlflow_params: Any = None) -> dict:
    """Write the MONAI bundle of ``model`` (a model folder, fold, ``model.pt`` or ``models:/`` URI) into ``out``
    (replaced whole, written atomically).

    Raises:
        StageInputError: the model is not one network (an ensemble of folds: name one), or it takes 2D RGB frames or
            uses a pretrained encoder (not exportable as MONAI components alone).
    """
    import torch

    from medseg.common.atomic_write import atomic_dir, save_torch, write_json
    from medseg.inference.predict import load_models
    from medseg.networks.architectures import monai_state_dict

    models = load_models(model, ensemble=False, mlflow_params=mlflow_params)
    if len(models) != 1:
        raise StageInputError(f"{model} is an ensemble of {len(models)} networks; a MONAI bundle holds one: name a "
                              f"fold (<model>/fold_<k>) or train with train.final_model")
    net, config = models[0]
    if config["network"].get("encoder") is not None:
        raise StageInputError(f"{model} uses a pretrained encoder ({config['network']['encoder']}), built by medseg, "
                              f"not by one MONAI class: not exportable as a bundle")
    out = Path(out).resolve()
    name = config.get("name") or Path(str(model).rstrip("/")).name.replace(":", "_").replace("@", "_")
    inference = inference_config(config, out)
    meta = metadata(config, name, str(model), _registered_dice(str(model), mlflow_params))
    with atomic_dir(out) as tmp:
        write_json(tmp / "configs" / "inference.json", inference)
        write_json(tmp / "configs" / "metadata.json", meta)
        (tmp / "models").mkdir()
        save_torch({k: v.detach().cpu() for k, v in monai_state_dict(net).items()}, tmp / "models" / "model.pt")
        (tmp / "docs").mkdir()
        (tmp / "docs" / "README.md").write_text(_readme(name, config, str(model)))
    log.info("MONAI bundle of %s in %s: python -m monai.bundle run --config_file %s --dataset_dir IN --output_dir OUT",
             model, out, out / "configs" / "inference.json")
    return {"bundle": str(out), "model": str(model), "network": inference["network_def"]["_target_"],
            "files": sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())}

"""``medseg predict``: segment NIfTI files or DICOM series with a checkpoint or a registered MLflow model.

Each output ``<case>.nii.gz`` has exactly the shape and affine of its input image: the preprocessing chain
(reorientation, resampling, crop, normalisation) is inverted on the prediction with MONAI's ``Invertd``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from medseg.errors import StageInputError

__all__ = ["run", "load_model", "segment", "find_inputs"]

log = logging.getLogger(__name__)

def load_model(model: str) -> tuple[torch.nn.Module, dict]:
    """A ``models:/NAME@alias`` (or ``runs:/...``) URI from MLflow, or a local model folder / ``model.pt``."""
    if "://" not in model and ":/" not in model:
        from medseg.evaluate import load_trained

        if not Path(model).exists():
            raise StageInputError(f"model not found: {model} (a model folder, model.pt, or models:/NAME@champion)")
        return load_trained(model)
    import mlflow

    from medseg.atomic import read_json
    from medseg.params import DEFAULT_PARAMS_FILE, load_params
    from medseg.tracking import tracking_uri
    from medseg.train import CONFIG_NAME

    mlflow_params = load_params(DEFAULT_PARAMS_FILE).mlflow if Path(DEFAULT_PARAMS_FILE).is_file() else None
    mlflow.set_tracking_uri(tracking_uri(mlflow_params))
    local = Path(mlflow.artifacts.download_artifacts(model))
    configs = list(local.rglob(CONFIG_NAME))
    if not configs:
        raise StageInputError(f"{model} has no {CONFIG_NAME}: was it logged by 'medseg train'?")
    net = mlflow.pytorch.load_model(str(local), map_location="cpu")
    return net.eval(), read_json(configs[0])


def _dicom_volumes(folder: Path) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """The DICOM series under ``folder``, read exactly as ingest reads them (sorted by position, RAS affine, HU)."""
    from medseg.ingest.common import CaseRejected
    from medseg.ingest.dicom import scan_dicom

    for item in scan_dicom(folder).items:
        try:
            loaded = item.load()
        except CaseRejected as err:
            log.warning("skipping DICOM series %s: %s", item.source, err)
            continue
        name = folder.name if item.source == "." else Path(item.source).name
        yield name, np.asarray(loaded.image), np.asarray(loaded.affine)


def find_inputs(path: Path) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(case name, 3D array, affine to segment with, affine to write)`` for a NIfTI file, a DICOM series
    folder, or a folder of either.

    NIfTI goes through ingest's own reader, so the model sees the geometry it was trained on (e.g. ACDC's pixdim
    spacing where the sform says 1 mm); the output keeps the input file's own affine, on the same voxel grid.
    """
    import nibabel as nib

    from medseg.ingest.common import CaseRejected
    from medseg.ingest.nifti import is_nifti, load_nifti, nifti_stem

    if not path.exists():
        raise StageInputError(f"input not found: {path}")
    if path.is_file() and is_nifti(path):
        try:
            array, affine = load_nifti(path)
        except CaseRejected as err:
            raise StageInputError(f"{path}: {err}") from None
        yield nifti_stem(path), array.astype(np.float32), affine, nib.load(str(path)).affine
        return
    niftis = sorted(p for p in path.iterdir() if p.is_file() and is_nifti(p))
    for p in niftis:
        yield from find_inputs(p)
    found = bool(niftis)
    for name, array, affine in _dicom_volumes(path):
        found = True
        yield name, array.astype(np.float32), affine, affine
    if not found:
        raise StageInputError(f"no NIfTI file or readable DICOM series in {path}")


def segment(net: torch.nn.Module, config: dict, array: np.ndarray, affine: np.ndarray, overlap: float = 0.5,
            device: torch.device | None = None) -> np.ndarray:
    """Label map (uint8) on the input grid for one 3D image ``array`` with RAS ``affine``."""
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    from medseg.inference import build_inferer, select_device
    from medseg.transforms import IMAGE, preprocess_transforms

    device = device or select_device("auto")
    pre = preprocess_transforms(config["modality"], config["target_spacing"], config["ct_window"], keys=[IMAGE],
                                load=False)
    image = MetaTensor(torch.as_tensor(array, dtype=torch.float32)[None], affine=torch.as_tensor(affine))
    data = pre({IMAGE: image})
    inferer = build_inferer(config["patch_size"], config["model"]["spatial_dims"], overlap, sw_batch_size=8)
    with torch.no_grad():
        logits = inferer(data[IMAGE][None].to(device), net.to(device))
    data["pred"] = logits[0].argmax(0, keepdim=True).cpu().float()
    inverted = Invertd("pred", transform=pre, orig_keys=IMAGE, nearest_interp=True)(data)["pred"]
    result = np.asarray(inverted[0]).round().astype(np.uint8)
    if result.shape != array.shape:
        raise RuntimeError(f"inverted prediction has shape {result.shape}, input {array.shape}")
    return result


def run(model: str, input_path: Path, out_dir: Path, overlap: float = 0.5) -> dict:
    """Segment every image found under ``input_path`` into ``out_dir/<case>.nii.gz``."""
    from tqdm import tqdm

    from medseg.atomic import save_nifti

    net, config = load_model(model)
    written = []
    for name, array, affine, output_affine in tqdm(find_inputs(Path(input_path)), desc="predict", unit="image"):
        labels = segment(net, config, array, affine, overlap)
        written.append(str(save_nifti(Path(out_dir) / f"{name}.nii.gz", labels, output_affine, dtype=np.uint8)))
        log.info("%s: %s", name, {config["labels"].get(str(k), k): int((labels == k).sum())
                                  for k in np.unique(labels) if k})
    return {"model": model, "written": written}

"""``medseg predict``: segment NIfTI files or DICOM series with trained models (folders, folds or MLflow URIs).

Each output ``<case>.nii.gz`` has exactly the shape and affine of its input image: the preprocessing chain
(reorientation, resampling, crop, normalisation) is inverted on the label map with MONAI's ``Invertd``. Several models,
or a model folder with ``fold_*``, are ensembled (softmax averaged); ``--tta`` adds mirroring; ``--dicom-seg`` also
writes a DICOM-SEG for DICOM inputs (:mod:`medseg.inference.dicom_seg`). A 2D image file (PNG, JPEG, TIFF, BMP) is read as
ingest stores frames (:mod:`medseg.ingest.images`) and its mask written as ``<stem>.png`` at the image's own size,
with an overlay in ``overlays/``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.common.errors import StageInputError, one_line
from medseg.inference.inputs import Input, Unreadable, find_inputs, output_folder, output_names

__all__ = ["run", "load_models", "segment"]

log = logging.getLogger(__name__)

Model = tuple[torch.nn.Module, dict]
# The sliding window of models trained before their inference config recorded it (params.yaml's evaluate values then).
LEGACY_WINDOW = {"sw_overlap": 0.5, "sw_batch_size": 8}


def _load_one(model: str, ensemble: bool = False, mlflow_params: Any = None) -> list[Model]:
    """A ``models:/NAME@alias`` (or ``runs:/...``) URI from MLflow, or a local model folder / fold / ``model.pt``
    (a model folder: its all-data model, or with ``ensemble`` every fold; see
    :func:`medseg.inference.model_folder.model_files`)."""
    from medseg.inference.model_folder import load_trained

    if "://" not in model and ":/" not in model:
        if not Path(model).exists():
            raise StageInputError(f"model not found: {model} (a model folder, model.pt, or models:/NAME@champion)")
        return load_trained(model, ensemble)
    import mlflow

    from medseg.inference.model_folder import load_registered
    from medseg.common.tracking import tracking_uri

    uri = tracking_uri(mlflow_params)
    store = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else None
    if store is not None and not Path(store).is_file():  # MLflow would create an empty store here, then fail
        raise StageInputError(f"no MLflow store at {store} to look up {model} (run from the project folder or set "
                              f"MLFLOW_TRACKING_URI)")
    mlflow.set_tracking_uri(uri)
    return load_registered(model)


def load_models(models: str | Sequence[str], ensemble: bool = False, mlflow_params: Any = None) -> list[Model]:
    """Every network of every model given (``ensemble``: every fold of a model folder), checked to be
    ensemble-able."""
    from medseg.inference.sliding_window import check_ensemble

    names, loaded = [], []
    for model in [models] if isinstance(models, (str, Path)) else models:
        found = _load_one(str(model), ensemble, mlflow_params)
        loaded += found
        names += [str(model)] * len(found)
    if not loaded:
        raise StageInputError("no model given")
    check_ensemble([config for _, config in loaded], names)
    return loaded


def _model_normalization(config: dict, modality: str | None, name: str) -> dict:
    """The model's normalisation for an input of ``modality`` (None: the model's own modality)."""
    norms = config["normalization"]
    if modality in norms:
        return norms[modality]
    if modality is not None:
        log.warning("%s is %s but the model was trained on %s: normalised as %s", name, modality,
                    "/".join(norms), config["modality"])
    if config["modality"] not in norms:
        raise StageInputError(f"the model's inference config has no normalisation for its modality "
                              f"{config['modality']!r} (has: {sorted(norms)})")
    return norms[config["modality"]]


def _invert_labels(pre, image, labels: torch.Tensor):
    """``labels`` ``(1, *preprocessed)`` brought back to the input grid by inverting ``pre`` (nearest neighbour), or
    None when the chain is not reorientation, resampling, then transforms MONAI inverts without resampling.

    Same result as ``Invertd(nearest_interp=True)``, but the inverse of ``Spacingd`` is done as what it is: its voxel
    map keeps the axes (only spacing and origin change), so nearest-neighbour sampling is one index array per axis
    (:func:`medseg.preprocessing.resample.resample_axes`), instead of a full-volume float64 sampling grid (gigabytes for
    a CT, and most of its prediction's time: benchmarks/README.md).
    The transforms after it (crop, intensities) and before it (orientation) are inverted by MONAI itself.
    """
    from copy import deepcopy

    from monai.data import MetaTensor
    from monai.transforms import Compose, Spacingd
    from monai.transforms.utils import allow_missing_keys_mode

    from medseg.preprocessing.resample import axis_map, resample_axes
    from medseg.preprocessing.transforms import IMAGE

    steps = list(pre.transforms)
    where = [i for i, t in enumerate(steps) if isinstance(t, Spacingd)]
    if len(where) != 1:
        return None
    before, after = Compose(steps[:where[0]]), Compose(steps[where[0] + 1:])
    pred = MetaTensor(labels, meta=deepcopy(image.meta), applied_operations=deepcopy(image.applied_operations))
    with allow_missing_keys_mode(after):
        pred = after.inverse({IMAGE: pred})[IMAGE]
    op = pred.applied_operations[-1] if pred.applied_operations else {}
    if op.get("class") != "SpatialResample" or op.get("extra_info", {}).get("padding_mode") != "border":
        return None
    src_affine = np.asarray(op["extra_info"]["src_affine"], dtype=np.float64)
    # source voxel -> resampled voxel
    axes = axis_map(np.linalg.solve(np.asarray(pred.affine, dtype=np.float64), src_affine))
    if axes is None:
        return None
    # 'border' padding: a source voxel past the resampled grid takes its edge value, as MONAI's nearest sampling does.
    # Fortran order, as NIfTI stores it: nibabel's transposed write of a C-order CT label map took 0.9 s
    gathered = resample_axes(pred.as_tensor()[0].numpy(), *axes, op["orig_size"], "nearest", torch.get_num_threads(),
                             dtype=np.uint8, order="F")
    ops = pred.applied_operations[:-1]
    pred = MetaTensor(torch.from_numpy(gathered)[None], affine=torch.as_tensor(src_affine),
                      meta={k: v for k, v in pred.meta.items() if k != "affine"}, applied_operations=ops)
    with allow_missing_keys_mode(before):
        return before.inverse({IMAGE: pred})[IMAGE]


def segment(models: Sequence[Model], image: np.ndarray, affine: np.ndarray, modality: str | None,
            tta: bool, largest_component: bool | Sequence[int], overlap: float, sw_batch_size: int,
            device: str = "auto", name: str = "image") -> np.ndarray:
    """Label map (uint8, ``(X, Y, Z)``) on the input grid for one ``(X, Y, Z[, channels])`` image with RAS ``affine``.

    Softmax averaged over ``models`` (and mirrored inputs with ``tta``), argmax, optionally the largest component of
    each class, then the preprocessing inverted on the labels (nearest neighbour).
    """
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    from medseg.inference.sliding_window import build_inferer, label_map, select_device, stitch_device
    from medseg.inference.postprocess import keep_largest_component
    from medseg.inference.model_folder import largest_component_classes
    from medseg.preprocessing.transforms import IMAGE, preprocess_transforms

    config = models[0][1]
    pre = preprocess_transforms(_model_normalization(config, modality, name), config["target_spacing"], keys=[IMAGE],
                                load=False)
    channel_first = image[None] if image.ndim == 3 else np.moveaxis(image, -1, 0)  # RGB frames: channels last
    # In the array's own type and memory order (NIfTI and DICOM volumes are Fortran-ordered): resampling makes the
    # float32 volume, at the model's spacing, in one pass (no full-size float copy first). Types
    # torch does not compute with (unsigned 16/32/64-bit) become float32 first.
    if channel_first.dtype not in (np.uint8, np.int8, np.int16, np.int32, np.int64, np.float32, np.float64):
        channel_first = channel_first.astype(np.float32, order="K")
    data = pre({IMAGE: MetaTensor(torch.from_numpy(channel_first), affine=torch.as_tensor(affine, dtype=torch.float64))})
    volume = data[IMAGE].as_tensor()[None]
    sw_device = select_device(device)
    out_device = stitch_device(volume.shape[2:], int(config["out_channels"]), sw_device)
    inferers = [build_inferer(c["patch_size"], c["network"]["spatial_dims"], overlap, sw_batch_size,
                              sw_device=sw_device, device=out_device) for _, c in models]
    nets = [net.to(sw_device) for net, _ in models]
    labels = label_map(nets, volume, inferers, tta=tta)  # (1, *spatial): only labels are inverted
    largest = largest_component_classes({"largest_component": largest_component}, int(config["out_channels"]))
    if largest:
        labels = keep_largest_component(labels, largest)
    inverted = _invert_labels(pre, data[IMAGE], labels)
    if inverted is None:  # a chain the fast path does not know: MONAI's generic inversion
        data["pred"] = MetaTensor(labels, meta=data[IMAGE].meta)
        inverted = Invertd("pred", transform=pre, orig_keys=IMAGE, nearest_interp=True)(data)["pred"]
    result = np.asarray(inverted[0])
    if result.dtype != np.uint8:  # MONAI's generic inversion gives floats; the fast path keeps the labels' uint8
        result = result.round().astype(np.uint8)
    if result.shape != image.shape[:3]:
        raise RuntimeError(f"inverted prediction has shape {result.shape}, input {image.shape}")
    return result


def run(model: str | Sequence[str], input_path: Path, out_dir: Path, overlap: float | None = None,
        tta: bool | None = None, largest_component: bool | None = None, device: str = "auto",
        sw_batch_size: int | None = None, dicom_seg: bool = False, ensemble: bool = False, prefix: str | None = None,
        mlflow_params: Any = None, spacing_tolerance: float | None = None,
        loaded: Sequence[Model] | None = None) -> dict:
    """Segment every image found under ``input_path`` into ``out_dir/<case>.nii.gz`` (and ``<case>.seg.dcm``); a 2D
    image file (PNG, JPEG, TIFF, BMP) into ``out_dir/<stem>.png`` at its own size (0/255 for a binary task, label
    values otherwise) and ``out_dir/overlays/<stem>.png``.

    Outputs are named after the inputs (a NIfTI file's stem, a DICOM series' folder), made unique per run by
    :func:`medseg.inference.inputs.output_names`. An input that cannot be read or segmented is reported (``failed``
    in the summary, one log line each) and the others still run; the CLI then exits 1.

    Args:
        model: one or more model folders (its all-data model ``fold_all`` when it has one, else every fold),
            ``model.pt`` files or MLflow model URIs; all are ensembled.
        tta, largest_component: None follows the (first) model's inference config (``largest_component``: the
            classes cross-validation chose); True or False applies to every class.
        overlap, sw_batch_size: the sliding window; None: the model's, as evaluate scored it (``evaluate.sw_overlap``
            and ``evaluate.sw_batch_size`` of the params it was trained with).
        mlflow_params: ``params.mlflow`` of the project whose registry ``models:/...`` names; None: MLflow's
            environment (``MLFLOW_TRACKING_URI``).
        ensemble: a model folder gives every fold, the cross-validation folds and the all-data model alike.
        prefix: put ``<prefix>_`` before each output name (the batch flow gives each study folder its own, so that
            tasks running apart never clash).
        dicom_seg: also write a DICOM-SEG for each DICOM series (an error for NIfTI inputs).
        spacing_tolerance: DICOM slice-gap tolerance, as ingest's ``data.slice_spacing_tolerance`` (None: its
            default).
        loaded: the networks of ``model`` already loaded (:func:`load_models`), for a caller that segments many
            requests with one model (the served MLflow model); None loads them here.
    """
    from tqdm import tqdm

    from medseg.inference.model_folder import largest_component_classes

    models = list(loaded) if loaded is not None else load_models(model, ensemble, mlflow_params)
    config = models[0][1]
    tta = bool(config.get("tta", False)) if tta is None else tta
    overlap = float(config.get("sw_overlap", LEGACY_WINDOW["sw_overlap"])) if overlap is None else overlap
    sw_batch_size = int(config.get("sw_batch_size", LEGACY_WINDOW["sw_batch_size"])) if sw_batch_size is None \
        else sw_batch_size
    largest = largest_component_classes(config if largest_component is None else
                                        {"largest_component": largest_component}, int(config["out_channels"]))
    names = [model] if isinstance(model, (str, Path)) else list(model)
    log.info("%d network(s) from %s; tta=%s, largest component kept for classes %s", len(models),
             ", ".join(map(str, names)), tta, largest)
    outputs = _Outputs(output_folder(Path(out_dir), Path(input_path)), config, names, dicom_seg)
    taken: set[str] = set()
    started = time.perf_counter()  # models loaded: from here, the throughput a folder of images gets
    with outputs:
        for item in tqdm(find_inputs(Path(input_path), spacing_tolerance), desc="predict", unit="image", disable=None):
            name = output_names(item.name if prefix in (None, item.name) else f"{prefix}_{item.name}", taken)
            try:
                target = outputs.target(item, name)
                labels = segment(models, item.image, item.affine, item.modality, tta, largest, overlap,
                                 sw_batch_size, device, name)
            except Exception as err:  # noqa: BLE001 - one line, and the other inputs go on
                outputs.fail(name, err)
                continue
            outputs.submit(item, name, target, labels)
    seconds = time.perf_counter() - started
    rate = len(outputs.written) / seconds if seconds > 0 else 0.0
    log.info("predicted %d image(s) in %.1f s: %.2f images/s (reading, preprocessing, network, writing)",
             len(outputs.written), seconds, rate)
    summary = {"model": [str(m) for m in names], "written": outputs.written, "failed": outputs.failed,
               "succeeded": len(outputs.written), "tta": tta, "largest_component": largest,
               "seconds": round(seconds, 3), "images_per_second": round(rate, 3)}
    if dicom_seg:
        summary["dicom_seg"] = outputs.dicom_segs
    return summary


class _Outputs:
    """Where each input's result goes, and the writing itself: a case's compressing and saving overlaps the next
    case's inference on one writer thread; at most one write waits, so memory holds two cases at most. A failure is
    one log line and one ``failed`` entry; the other inputs go on."""

    def __init__(self, folder: Path, config: dict, names: list, dicom_seg: bool) -> None:
        self.folder, self.config, self.names, self.dicom_seg = folder, config, names, dicom_seg
        self.num_classes = int(config["out_channels"])
        self.written: list[str] = []
        self.dicom_segs: list[str] = []
        self.failed: list[dict] = []
        self._pending: tuple[str, Future] | None = None
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict-write")

    def __enter__(self) -> "_Outputs":
        return self

    def __exit__(self, *exc) -> None:
        self._finish()
        self._writer.shutdown(wait=True)

    def target(self, item: Input | Unreadable, name: str) -> Path:
        """The output file of ``item``; raises StageInputError where the input cannot be segmented as asked."""
        if isinstance(item, Unreadable):
            raise StageInputError(item.reason)
        if self.dicom_seg and not item.dicom_files:
            raise StageInputError("--dicom-seg needs a DICOM input, this is NIfTI")
        target = self.folder / (f"{name}.png" if item.pixels is not None else f"{name}.nii.gz")
        if item.source is not None and target.exists() and target.samefile(item.source):
            raise StageInputError(f"its output {target} would replace the input itself")
        channels = item.image.shape[3] if item.image.ndim == 4 else 1
        if item.pixels is not None and int(self.config["in_channels"]) != channels:
            raise StageInputError(f"{item.modality} image with {channels} channel(s); the model takes "
                                  f"{self.config['in_channels']}")
        return target

    def fail(self, name: str, err: BaseException) -> None:
        reason = one_line(str(err) if isinstance(err, StageInputError) else f"{type(err).__name__}: {err}")
        log.debug("%s failed", name, exc_info=err)
        log.error("failed: %s: %s", name, reason or type(err).__name__)
        self.failed.append({"input": name, "reason": reason})

    def submit(self, item: Input, name: str, target: Path, labels: np.ndarray) -> None:
        self._finish()
        self._pending = (name, self._writer.submit(self._write, item, name, target, labels))

    def _finish(self) -> None:
        if self._pending is not None:
            name, future = self._pending
            self._pending = None
            try:
                future.result()
            except Exception as err:  # noqa: BLE001 - reported as that input's failure
                self.fail(name, err)

    def _write(self, item: Input, name: str, target: Path, labels: np.ndarray) -> None:
        from medseg.common.atomic_write import save_nifti
        from medseg.inference.dicom_seg import write_dicom_seg
        from medseg.ingest.images import mask_pixels, overlay_pixels, save_png

        if item.pixels is not None:  # a 2D frame: a mask PNG at its own size, and an overlay to look at
            self.written.append(str(save_png(target, mask_pixels(labels, self.num_classes))))
            save_png(self.folder / "overlays" / f"{name}.png", overlay_pixels(item.pixels, labels), compress_level=1)
        else:
            self.written.append(str(save_nifti(target, labels, item.output_affine, dtype=np.uint8)))
        if self.dicom_seg:
            self.dicom_segs.append(str(write_dicom_seg(labels, item.dicom_files, self.config["labels"],
                                                       ", ".join(map(str, self.names)),
                                                       self.folder / f"{name}.seg.dcm")))
        # voxels per class (np.unique would sort every voxel; count_nonzero per class does not)
        labels_of = self.config["labels"]
        counts = {labels_of.get(str(k), k): int(np.count_nonzero(labels == k)) for k in range(1, self.num_classes)}
        log.info("%s: %s", name, {k: n for k, n in counts.items() if n})

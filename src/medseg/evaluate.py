"""Evaluate stage: Gaussian-blended sliding-window inference on each trained fold's held-out cases (mirroring TTA and
largest-component post-processing per params); Dice and HD95 per class and case.

Writes ``<paths.evaluation>/metrics.json`` (DVC metrics), ``per_case.csv``, and ``plots/`` (training curves and
image/label/prediction overlays); logs all of it to the training run in MLflow.
"""

from __future__ import annotations

import csv
import logging
import shutil

import numpy as np
import torch

from medseg.atomic import atomic_dir, read_json, write_json
from medseg.model_folder import HISTORY_NAME, RUN_NAME, fold_dir
from medseg.metrics import finite
from medseg.params import Params

__all__ = ["run", "METRICS_NAME", "PER_CASE_NAME", "PLOTS_DIR"]

log = logging.getLogger(__name__)

METRICS_NAME = "metrics.json"
PER_CASE_NAME = "per_case.csv"
PLOTS_DIR = "plots"



def _score_fold(params: Params, fold: int, dataset, device: torch.device, overlays: list) -> tuple[list[dict], dict]:
    """Per-case Dice and HD95 of fold ``fold``'s model on its held-out cases (TTA per params, post-processing as the
    model's inference config decided it)."""
    from monai.data import Dataset
    from monai.metrics import DiceMetric, HausdorffDistanceMetric
    from monai.networks.utils import one_hot
    from tqdm import tqdm

    from medseg.inference import build_inferer, label_map, stitch_device
    from medseg.postprocess import keep_largest_component
    from medseg.model_folder import largest_component_classes, load_trained
    from medseg.train import data_lists
    from medseg.transforms import eval_transforms

    _, val_files, _ = data_lists(params, fold)
    [(net, config)] = load_trained(fold_dir(params.paths.model, fold))
    net = net.to(device)
    n = dataset.num_classes
    largest = largest_component_classes(config, n)
    classes = [dataset.labels[k] for k in sorted(dataset.labels) if k != 0]
    dice_metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    hd_metric = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
    rows = []
    for item in tqdm(Dataset(val_files, eval_transforms()), desc=f"evaluate fold {fold}", unit="case"):
        image, label = item["image"][None], item["label"][None]
        inferer = build_inferer(config["patch_size"], config["network"]["spatial_dims"], params.evaluate.sw_overlap,
                                params.evaluate.sw_batch_size, sw_device=device,
                                device=stitch_device(image.shape[2:], n, device))
        pred = label_map([net], image.to(device), inferer, tta=params.evaluate.tta)[:, None]  # as predict labels
        if largest:
            pred = keep_largest_component(pred[0], largest)[None]
        pred_oh, label_oh = one_hot(pred, n), one_hot(label, n)
        dice = dice_metric(pred_oh, label_oh)[0].numpy()
        hd = hd_metric(pred_oh, label_oh, spacing=list(config["target_spacing"]))[0].numpy()
        row = {"case_id": item["case_id"], "fold": fold}
        for name, d, h in zip(classes, dice, hd):
            row[f"dice_{name}"], row[f"hd95_{name}"] = finite(d), finite(h)
            # IoU (Jaccard) of the same masks: IoU = Dice / (2 - Dice), exactly; the 2D endoscopy field reports both
            row[f"iou_{name}"] = None if row[f"dice_{name}"] is None else finite(d / (2.0 - d))
        rows.append(row)
        if len(overlays) < params.evaluate.overlay_cases:
            overlays.append((item["case_id"], image[0, 0].numpy(), label[0, 0].numpy(), pred[0, 0].numpy()))
    return rows, read_json(fold_dir(params.paths.model, fold) / RUN_NAME)


def _summary(rows: list[dict], classes: list[str]) -> dict:
    def mean(key: str) -> float | None:
        values = [r[key] for r in rows if r[key] is not None]
        return round(float(np.mean(values)), 4) if values else None

    dice, iou = {c: mean(f"dice_{c}") for c in classes}, {c: mean(f"iou_{c}") for c in classes}
    present, present_iou = [d for d in dice.values() if d is not None], [v for v in iou.values() if v is not None]
    return {"dice_mean": round(float(np.mean(present)), 4) if present else None, "dice": dice,
            "iou_mean": round(float(np.mean(present_iou)), 4) if present_iou else None, "iou": iou,
            "hd95_mm": {c: mean(f"hd95_{c}") for c in classes}, "cases": len(rows)}


def run(params: Params) -> dict:
    """Score each trained fold's model on its own held-out cases (``train.fold``; ``all``: cross-validation).

    ``metrics.json`` holds the mean over every held-out case, and each fold's own summary under ``folds``.
    """
    import mlflow

    from medseg import plots
    from medseg.inference import select_device
    from medseg.preprocess import read_dataset
    from medseg.tracking import configure_mlflow

    dataset = read_dataset(params.paths.preprocessed)
    device = select_device(params.train.device)
    classes = [dataset.labels[k] for k in sorted(dataset.labels) if k != 0]
    rows, overlays, folds = [], [], {}
    for fold in params.train.folds(params.preprocess.folds):
        fold_rows, run_info = _score_fold(params, fold, dataset, device, overlays)
        rows += fold_rows
        folds[str(fold)] = {**_summary(fold_rows, classes), "run_id": run_info["run_id"]}
    metrics = {**_summary(rows, classes), "fold": params.train.fold, "folds": folds}
    with atomic_dir(params.paths.evaluation) as out:
        write_json(out / METRICS_NAME, metrics)
        with (out / PER_CASE_NAME).open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        (out / PLOTS_DIR).mkdir()
        first = fold_dir(params.paths.model, params.train.folds(params.preprocess.folds)[0])
        shutil.copyfile(first / HISTORY_NAME, out / HISTORY_NAME)  # for `dvc plots`; every fold's is in MLflow
        plots.training_curves(first / HISTORY_NAME, out / PLOTS_DIR / "training_curves.png")
        for case_id, image, label, pred in overlays:
            plots.overlay(image, label, pred, out / PLOTS_DIR / f"overlay_{case_id}.png", title=case_id)
        configure_mlflow(params.mlflow)
        for fold, summary in folds.items():
            with mlflow.start_run(run_id=summary["run_id"]):
                flat = {"heldout_dice_mean": summary["dice_mean"], "cv_dice_mean": metrics["dice_mean"],
                        "heldout_iou_mean": summary["iou_mean"]}
                flat.update({f"heldout_dice_{c}": v for c, v in summary["dice"].items() if v is not None})
                flat.update({f"heldout_hd95_{c}": v for c, v in summary["hd95_mm"].items() if v is not None})
                mlflow.log_metrics({k: v for k, v in flat.items() if v is not None})
                mlflow.log_artifacts(str(out), artifact_path="evaluation")
    log.info("held-out Dice %.4f over %d cases in %d fold(s)", metrics["dice_mean"], len(rows), len(folds))
    return metrics

"""Evaluate stage: Gaussian-blended sliding-window inference on the held-out fold; Dice and HD95 per class and case.

Writes ``<paths.evaluation>/metrics.json`` (DVC metrics), ``per_case.csv``, and ``plots/`` (training curves and
image/label/prediction overlays); logs all of it to the training run in MLflow.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import numpy as np
import torch

from medseg.atomic import atomic_dir, read_json, write_json
from medseg.params import Params

__all__ = ["run", "load_trained", "METRICS_NAME", "PER_CASE_NAME", "PLOTS_DIR"]

log = logging.getLogger(__name__)

METRICS_NAME = "metrics.json"
PER_CASE_NAME = "per_case.csv"
PLOTS_DIR = "plots"


def load_trained(model_dir: str | Path) -> tuple[torch.nn.Module, dict]:
    """Network and inference config from a ``paths.model`` folder or a ``model.pt`` file."""
    from medseg.networks import build_network
    from medseg.train import MODEL_NAME

    path = Path(model_dir)
    path = path / MODEL_NAME if path.is_dir() else path
    saved = torch.load(path, map_location="cpu", weights_only=True)
    config = saved["config"]
    net = build_network(config["model"], config["in_channels"], config["out_channels"])
    net.load_state_dict(saved["state_dict"])
    return net.eval(), config


def _finite(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 4)


def run(params: Params) -> dict:
    """Score the trained model on the held-out cases of ``train.fold``."""
    import mlflow
    from monai.data import Dataset
    from monai.metrics import DiceMetric, HausdorffDistanceMetric
    from monai.networks.utils import one_hot
    from tqdm import tqdm

    from medseg import plots
    from medseg.inference import build_inferer, select_device
    from medseg.tracking import configure_mlflow
    from medseg.train import HISTORY_NAME, RUN_NAME, data_lists
    from medseg.transforms import eval_transforms

    p = params
    _, val_files, dataset = data_lists(p)
    net, config = load_trained(p.paths.model)
    device = select_device(p.train.device)
    net = net.to(device)
    inferer = build_inferer(config["patch_size"], config["model"]["spatial_dims"], p.evaluate.sw_overlap,
                            p.evaluate.sw_batch_size)
    classes = [dataset.labels[k] for k in sorted(dataset.labels) if k != 0]
    n = dataset.num_classes
    dice_metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    hd_metric = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
    rows, overlays = [], []
    with torch.no_grad():
        for item in tqdm(Dataset(val_files, eval_transforms()), desc="evaluate", unit="case"):
            image, label = item["image"][None].to(device), item["label"][None]
            pred = inferer(image, net).argmax(1, keepdim=True).cpu()
            pred_oh, label_oh = one_hot(pred, n), one_hot(label, n)
            dice = dice_metric(pred_oh, label_oh)[0].numpy()
            hd = hd_metric(pred_oh, label_oh, spacing=list(config["target_spacing"]))[0].numpy()
            row = {"case_id": item["case_id"]}
            for name, d, h in zip(classes, dice, hd):
                row[f"dice_{name}"], row[f"hd95_{name}"] = _finite(d), _finite(h)
            rows.append(row)
            if len(overlays) < p.evaluate.overlay_cases:
                overlays.append((item["case_id"], image[0, 0].cpu().numpy(), label[0, 0].numpy(), pred[0, 0].numpy()))

    def mean(key: str) -> float | None:
        values = [r[key] for r in rows if r[key] is not None]
        return round(float(np.mean(values)), 4) if values else None

    metrics = {
        "dice_mean": round(float(np.nanmean([mean(f"dice_{c}") or np.nan for c in classes])), 4),
        "dice": {c: mean(f"dice_{c}") for c in classes},
        "hd95_mm": {c: mean(f"hd95_{c}") for c in classes},
        "cases": len(rows),
        "fold": p.train.fold,
    }
    run_info = read_json(Path(p.paths.model) / RUN_NAME)
    with atomic_dir(p.paths.evaluation) as out:
        write_json(out / METRICS_NAME, metrics)
        with (out / PER_CASE_NAME).open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        (out / PLOTS_DIR).mkdir()
        plots.training_curves(Path(p.paths.model) / HISTORY_NAME, out / PLOTS_DIR / "training_curves.png")
        for case_id, image, label, pred in overlays:
            plots.overlay(image, label, pred, out / PLOTS_DIR / f"overlay_{case_id}.png", title=case_id)
        configure_mlflow(p.mlflow)
        with mlflow.start_run(run_id=run_info["run_id"]):
            flat = {"heldout_dice_mean": metrics["dice_mean"]}
            flat.update({f"heldout_dice_{c}": v for c, v in metrics["dice"].items() if v is not None})
            flat.update({f"heldout_hd95_{c}": v for c, v in metrics["hd95_mm"].items() if v is not None})
            mlflow.log_metrics(flat)
            mlflow.log_artifacts(str(out), artifact_path="evaluation")
    log.info("held-out Dice %.4f over %d cases", metrics["dice_mean"], len(rows))
    return metrics

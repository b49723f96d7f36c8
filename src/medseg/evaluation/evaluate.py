"""Evaluate stage: each trained fold's model segments its held-out cases as ``medseg predict`` would (the ingested
image, the model's preprocessing, sliding window, post-processing, labels back on the original grid; mirroring TTA
per params), and :mod:`medseg.evaluation.metrics` scores them against the ingested labels: Dice and HD95 per class and case.

Writes ``<paths.evaluation>/metrics.json`` (DVC metrics; the registry's held-out score), ``per_case.csv``,
``predictions/`` (the label maps scored) and ``plots/`` (training curves and image/label/prediction overlays); logs
all of it to the training run in MLflow.
"""

from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path

import numpy as np

from medseg.common.atomic_write import atomic_dir, write_json
from medseg.inference.model_folder import ALL, HISTORY_NAME, fold_dir, history_file, read_run_record
from medseg.evaluation.metrics import finite
from medseg.common.params import Params

__all__ = ["run", "score_cases", "METRICS_NAME", "PER_CASE_NAME", "PLOTS_DIR", "PREDICTIONS_DIR"]

log = logging.getLogger(__name__)

METRICS_NAME = "metrics.json"
PER_CASE_NAME = "per_case.csv"
PLOTS_DIR = "plots"
PREDICTIONS_DIR = "predictions"  # <case_id>.nii.gz: the label maps the scores were computed from



def score_cases(models: list, params: Params, manifest, case_ids: list[str], tta: bool,
                predictions: Path | None = None, overlays: list | None = None) -> list[dict]:
    """Rows ``{case_id, subject, class, dice, hd95}`` of ``models`` (an ensemble) on ingested cases, on their original
    grids: each case segmented by ``medseg predict``'s own path (:func:`medseg.inference.predict.segment`, with the
    post-processing the model's inference config decided), scored by :func:`medseg.evaluation.metrics.score_case` against the
    ingested label. With ``predictions``, each label map is written there as ``<case_id>.nii.gz`` (the ingested
    image's affine); ``overlays`` collects up to ``evaluate.overlay_cases`` (case, image, label, prediction)."""
    import nibabel as nib
    from tqdm import tqdm

    from medseg.ingest.nifti import load_nifti
    from medseg.evaluation.metrics import score_case
    from medseg.inference.model_folder import largest_component_classes
    from medseg.inference.predict import segment

    by_id = {c.case_id: c for c in manifest.cases}
    config = models[0][1]
    classes = {k: v for k, v in sorted(manifest.labels.items()) if k != 0}
    largest = largest_component_classes(config, int(config["out_channels"]))
    rows = []
    if predictions is not None:
        predictions.mkdir(parents=True, exist_ok=True)
    for cid in tqdm(case_ids, desc="evaluate", unit="case", disable=None):
        case = by_id[cid]
        image, affine = load_nifti(manifest.image_path(case))
        truth, _ = load_nifti(manifest.label_path(case), "label")
        truth = np.asarray(truth).round().astype(np.int64)
        pred = segment(models, np.asarray(image), affine, case.modality, tta, largest, params.evaluate.sw_overlap,
                       params.evaluate.sw_batch_size, params.train.device, cid)
        spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
        for name, score in score_case(pred, truth, classes, spacing).items():
            rows.append({"case_id": cid, "subject": case.subject, "class": name, **score})
        if predictions is not None:
            nib.save(nib.Nifti1Image(pred.astype(np.uint8), np.asarray(affine, dtype=np.float64)),
                     str(predictions / f"{cid}.nii.gz"))
        if overlays is not None and len(overlays) < params.evaluate.overlay_cases:
            first_channel = np.asarray(image)[..., 0] if np.ndim(image) == 4 else np.asarray(image)
            overlays.append((cid, first_channel, truth, pred))
    return rows


def _score_fold(params: Params, fold: int, manifest, out: Path, overlays: list) -> tuple[list[dict], dict]:
    """Per-case rows (:func:`score_cases`, one per case with ``dice_<class>``, ``hd95_<class>``, ``iou_<class>``) of
    fold ``fold``'s model on its held-out cases, their predictions written to ``out/predictions``."""
    from medseg.inference.model_folder import load_trained
    from medseg.preprocessing.preprocess import read_splits

    models = load_trained(fold_dir(params.paths.model, fold))
    long_rows = score_cases(models, params, manifest, read_splits(params.paths.preprocessed, fold)["val"],
                            params.evaluate.tta, out / PREDICTIONS_DIR, overlays)
    rows: dict[str, dict] = {}
    for r in long_rows:
        row = rows.setdefault(r["case_id"], {"case_id": r["case_id"], "fold": fold})
        row[f"dice_{r['class']}"], row[f"hd95_{r['class']}"] = finite(r["dice"]), finite(r["hd95"])
        # IoU (Jaccard) of the same masks: IoU = Dice / (2 - Dice), exactly; the 2D endoscopy field reports both
        row[f"iou_{r['class']}"] = finite(r["dice"] / (2.0 - r["dice"]))
    return list(rows.values()), read_run_record(params.paths.model, fold) or {"run_id": None}


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

    from medseg.evaluation import plots
    from medseg.common.manifest import read_manifest
    from medseg.common.tracking import configure_mlflow

    manifest = read_manifest(params.paths.ingested)
    classes = [manifest.labels[k] for k in sorted(manifest.labels) if k != 0]
    rows, overlays, folds = [], [], {}
    with atomic_dir(params.paths.evaluation) as out:
        for fold in params.train.folds(params.preprocess.folds):
            fold_rows, run_info = _score_fold(params, fold, manifest, out, overlays)
            rows += fold_rows
            folds[str(fold)] = {**_summary(fold_rows, classes), "run_id": run_info["run_id"]}
        metrics = {**_summary(rows, classes), "fold": params.train.fold, "folds": folds}
        write_json(out / METRICS_NAME, metrics)
        with (out / PER_CASE_NAME).open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        (out / PLOTS_DIR).mkdir()
        first = history_file(params.paths.model, params.train.folds(params.preprocess.folds)[0])
        shutil.copyfile(first, out / HISTORY_NAME)  # for `dvc plots`; every fold's is in MLflow
        plots.training_curves(first, out / PLOTS_DIR / "training_curves.png")
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
                for item in sorted(out.iterdir()):  # the label maps stay with DVC: every fold's run would copy them
                    if item.name == PREDICTIONS_DIR:
                        continue
                    if item.is_dir():
                        mlflow.log_artifacts(str(item), artifact_path=f"evaluation/{item.name}")
                    else:
                        mlflow.log_artifact(str(item), artifact_path="evaluation")
        final = read_run_record(params.paths.model, ALL)
        # the served model's run: the cross-validated estimate it is registered with, beside its folds' held-out Dice
        if final and final.get("run_id") and metrics["dice_mean"] is not None:
            with mlflow.start_run(run_id=final["run_id"]):
                mlflow.log_metrics({"cv_dice_mean": metrics["dice_mean"],
                                    **{f"cv_dice_{c}": v for c, v in metrics["dice"].items() if v is not None}})
    log.info("held-out Dice %.4f over %d cases in %d fold(s)", metrics["dice_mean"], len(rows), len(folds))
    return metrics

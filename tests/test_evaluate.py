import csv
import json
from pathlib import Path

import mlflow

from medseg import evaluate


def test_evaluate_writes_metrics_csv_plots_and_logs_them(trained):
    params, summary = trained
    metrics = evaluate.run(params)
    out = Path(params.paths.evaluation)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == metrics
    assert set(saved["dice"]) == {"RV", "myocardium", "LV"} and set(saved["hd95_mm"]) == set(saved["dice"])
    assert 0.0 <= saved["dice_mean"] <= 1.0
    rows = list(csv.DictReader((out / "per_case.csv").open()))
    assert len(rows) == saved["cases"] == 2
    assert {"case_id", "dice_LV", "hd95_LV"} <= set(rows[0])
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert "training_curves.png" in pngs and any(p.startswith("overlay_") for p in pngs)
    assert saved["folds"]["0"]["cases"] == 2 and saved["folds"]["0"]["dice_mean"] == saved["dice_mean"]
    run_id = summary["folds"][0]["run_id"]
    assert saved["folds"]["0"]["run_id"] == run_id
    mlflow.set_tracking_uri(params.mlflow.tracking_uri)
    run = mlflow.get_run(run_id)
    assert "heldout_dice_mean" in run.data.metrics
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "evaluation")]
    assert "evaluation/metrics.json" in artifacts and "evaluation/plots" in artifacts

import csv
import json
from pathlib import Path

import mlflow

from medseg.evaluation import evaluate
from medseg.common.manifest import registered_model_name


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


def test_all_folds_cross_validate_and_register_one_version_each(tiny_ingested, params_for):
    """train.fold: all -> one model per fold; every case is held out exactly once; TTA and largest component on."""
    from medseg.registry import register
    from medseg.training import train
    from tests.conftest import planned_and_preprocessed

    params = planned_and_preprocessed(params_for(paths={"ingested": str(tiny_ingested)},
                                                 train={"fold": "all", "max_epochs": 1},
                                                 evaluate={"tta": True, "largest_component": True}))
    trained = train.run(params)
    assert [f["fold"] for f in trained["folds"]] == [0, 1, 2]
    assert sorted(p.name for p in Path(params.paths.model).iterdir()) == ["fold_0", "fold_1", "fold_2",
                                                                         "postprocessing.json"]
    metrics = evaluate.run(params)
    assert metrics["fold"] == "all" and sorted(metrics["folds"]) == ["0", "1", "2"]
    rows = list(csv.DictReader((Path(params.paths.evaluation) / "per_case.csv").open()))
    assert len(rows) == metrics["cases"] == 6 and len({r["case_id"] for r in rows}) == 6
    assert {r["fold"] for r in rows} == {"0", "1", "2"}
    assert {f["run_id"] for f in metrics["folds"].values()} == {f["run_id"] for f in trained["folds"]}
    registered = register.run(params)
    assert [v["fold"] for v in registered["versions"]] == [0, 1, 2]
    assert [v["version"] for v in registered["versions"]] == ["1", "2", "3"]
    client = mlflow.MlflowClient()
    assert {client.get_model_version(registered_model_name(params), v).tags["fold"] for v in "123"} == {"0", "1", "2"}


def test_the_registrys_heldout_score_is_the_score_of_the_written_predictions(trained):
    """The number in the registry equals Dice recomputed by medseg.evaluation.metrics from evaluate's predictions on the
    ingested (original) grids; the predictions are what ``medseg predict`` writes for those images."""
    import nibabel as nib
    import numpy as np

    from medseg.registry import register
    from medseg.common.manifest import read_manifest
    from medseg.evaluation.metrics import score_case

    params, _ = trained
    evaluate.run(params)
    registered = register.run(params)
    version = mlflow.MlflowClient().get_model_version(registered_model_name(params), registered["version"])
    manifest = read_manifest(params.paths.ingested)
    classes = {k: v for k, v in manifest.labels.items() if k}
    written = sorted((Path(params.paths.evaluation) / "predictions").glob("*.nii.gz"))
    assert len(written) == 2
    per_class: dict[str, list[float]] = {}
    for path in written:
        case = next(c for c in manifest.cases if f"{c.case_id}.nii.gz" == path.name)
        truth = nib.load(str(manifest.label_path(case)))
        pred = nib.load(str(path))
        assert pred.shape == truth.shape and np.allclose(pred.affine, truth.affine)  # the original grid
        for name, s in score_case(np.asarray(pred.dataobj), np.asarray(truth.dataobj).astype(int), classes,
                                  truth.header.get_zooms()[:3]).items():
            per_class.setdefault(name, []).append(s["dice"])
    recomputed = float(np.mean([np.mean(v) for v in per_class.values()]))
    assert abs(float(version.tags["heldout_dice_mean"]) - recomputed) < 1e-4

"""Drift against the champion: the new data's fingerprint compared with the one the champion was trained on, and
what a retraining records of it in its MLflow run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medseg.registry.drift import compare_fingerprints, drift_lines

CARDIAC = {"0": "background", "1": "RV", "2": "myocardium", "3": "LV"}


def _prints(spacings: list[list[float]], intensity: dict[str, tuple[float, float]], labels=None) -> dict:
    """A hand-made ``fingerprint.json``: one case per spacing, a modality per ``intensity`` entry (mean, std)."""
    return {"labels": labels or CARDIAC,
            "cases": [{"case_id": f"c{i}", "spacing": s, "shape": [200, 180, 10]} for i, s in enumerate(spacings)],
            "modalities": {m: {"cases": len(spacings), "foreground_intensity": {"mean": mean, "std": std}}
                           for m, (mean, std) in intensity.items()}}


def test_the_same_data_shows_no_drift():
    prints = _prints([[1.5, 1.5, 8.0], [1.25, 1.25, 10.0], [1.5, 1.5, 8.0]], {"MR": (300.0, 120.0)})
    blocking, drift = compare_fingerprints(prints, json.loads(json.dumps(prints)))
    assert blocking == []
    assert drift == {"cases": [3, 3], "median_spacing": [[1.5, 1.5, 8.0], [1.5, 1.5, 8.0]], "spacing_ratio_max": 1.0,
                     "median_shape": [[200.0, 180.0, 10.0], [200.0, 180.0, 10.0]],
                     "intensity": {"MR": {"mean_shift_sd": 0.0, "std_ratio": 1.0}}}
    assert "- MR foreground intensity: mean moved +0.0 SD, spread x1.0" in drift_lines(drift)


def test_known_shifts_in_spacing_and_intensity_are_measured_and_carded():
    """Median spacing x 1.0 -> 0.8 mm (a ratio of 1.25 down) and z 5 -> 10 mm (2.0 up); the MR foreground's mean
    moves half its SD down and its spread doubles: each number is the one expected, and the card says it."""
    champion = _prints([[1.0, 1.0, 5.0], [1.0, 1.0, 5.0], [2.0, 2.0, 5.0]], {"MR": (100.0, 50.0)})
    new = _prints([[0.8, 1.0, 10.0], [0.8, 1.0, 10.0]], {"MR": (75.0, 100.0)})
    blocking, drift = compare_fingerprints(champion, new)
    assert blocking == []
    assert drift["cases"] == [3, 2]
    assert drift["median_spacing"] == [[1.0, 1.0, 5.0], [0.8, 1.0, 10.0]] and drift["spacing_ratio_max"] == 2.0
    assert drift["intensity"] == {"MR": {"mean_shift_sd": -0.5, "std_ratio": 2.0}}
    finer = _prints([[0.8, 1.0, 5.0]] * 2, {"MR": (100.0, 50.0)})
    assert compare_fingerprints(champion, finer)[1]["spacing_ratio_max"] == 1.25  # a shrink counts as much as a growth
    assert drift_lines(drift) == [
        "## Data compared with the previous champion's", "",
        "- labelled cases: 3 then, 2 now",
        "- median spacing (mm): [1.0, 1.0, 5.0] then, [0.8, 1.0, 10.0] now (largest ratio 2.0)",
        "- MR foreground intensity: mean moved -0.5 SD, spread x2.0", ""]
    assert drift_lines({}) == []


def test_another_label_map_or_modality_blocks_and_only_shared_modalities_are_compared():
    champion = _prints([[1.0, 1.0, 5.0]], {"MR": (100.0, 50.0)})
    liver = {"0": "background", "1": "liver"}
    blocking, drift = compare_fingerprints(champion, _prints([[1.0, 1.0, 5.0]], {"CT": (40.0, 60.0)}, liver))
    assert len(blocking) == 2
    assert blocking[0].startswith("label map") and "liver" in blocking[0]
    assert blocking[1] == "modalities ['CT'] differ from the champion's ['MR']"
    assert drift["intensity"] == {}
    blocking, drift = compare_fingerprints(champion, _prints([[1.0, 1.0, 5.0]], {"MR": (100.0, 50.0),
                                                                                 "CT": (40.0, 60.0)}))
    assert blocking == ["modalities ['CT', 'MR'] differ from the champion's ['MR']"]
    assert set(drift["intensity"]) == {"MR"}


def _shifted_copy(source: Path, target: Path, offset: float, spacing: tuple[float, float, float]) -> Path:
    """``source``'s ingested cases as new data: every image ``offset`` brighter, the voxels ``spacing`` apart."""
    import dataclasses

    import nibabel as nib
    import numpy as np

    from medseg.common.atomic_write import save_nifti
    from medseg.common.manifest import read_manifest, write_manifest

    manifest = read_manifest(source)
    affine = np.diag([*spacing, 1.0])
    cases = []
    for case in manifest.cases:
        image = np.asarray(nib.load(str(manifest.image_path(case))).dataobj, dtype=np.float32)
        label = np.asarray(nib.load(str(manifest.label_path(case))).dataobj)
        save_nifti(target / case.image, image + offset, affine)
        save_nifti(target / case.label, label, affine, dtype=np.uint8)
        cases.append(dataclasses.replace(case, spacing=spacing))
    write_manifest(target, "acdc", {int(k): v for k, v in manifest.labels.items()}, cases)
    return target


@pytest.mark.slow  # about 10 s on 2 cores: two one-epoch trainings of a tiny 2D U-Net, one evaluation
def test_retraining_on_drifted_data_records_the_drift_in_its_mlflow_run(tiny_ingested, params_for, tmp_path):
    """A champion trained on one data set; then new data, brighter by one foreground SD and with 1.2 mm instead of
    1.5 mm pixels: the new training run carries the findings (the ``drift_summary`` tag, ``drift.json`` and the
    ``drift_*`` metrics), naming the spacing and the MR intensity that moved, by how much."""
    import mlflow

    from medseg.evaluation import evaluate
    from medseg.planning.fingerprint import FINGERPRINT_NAME
    from medseg.registry import register
    from medseg.training import train
    from tests.conftest import planned_and_preprocessed

    params = planned_and_preprocessed(params_for(paths={"ingested": str(tiny_ingested)}, train={"max_epochs": 1}))
    first_run = train.run(params)["folds"][0]["run_id"]
    evaluate.run(params)
    assert register.run(params)["alias"] == "champion"
    before = json.loads((Path(params.paths.plans) / FINGERPRINT_NAME).read_text())["modalities"]["MR"]
    sd = before["foreground_intensity"]["std"]

    new_data = _shifted_copy(tiny_ingested, tmp_path / "ingested_new", offset=sd, spacing=(1.2, 1.2, 8.0))
    drifted = planned_and_preprocessed(params_for(paths={"ingested": str(new_data)}, train={"max_epochs": 1}))
    assert drifted.mlflow == params.mlflow  # the same store, so the same champion
    second_run = train.run(drifted)["folds"][0]["run_id"]

    client = mlflow.MlflowClient(params.mlflow.tracking_uri)
    assert "drift_summary" not in client.get_run(first_run).data.tags  # no champion then: nothing to compare
    run = client.get_run(second_run)
    drift = json.loads(run.data.tags["drift_summary"])
    assert drift["median_spacing"] == [[1.5, 1.5, 8.0], [1.2, 1.2, 8.0]] and drift["spacing_ratio_max"] == 1.25
    assert drift["intensity"]["MR"]["mean_shift_sd"] == pytest.approx(1.0, abs=1e-3)
    assert drift["intensity"]["MR"]["std_ratio"] == pytest.approx(1.0, abs=1e-3)
    assert drift["cases"] == [6, 6]
    logged = mlflow.artifacts.download_artifacts(run_id=second_run, artifact_path="drift.json",
                                                 tracking_uri=params.mlflow.tracking_uri)
    assert json.loads(Path(logged).read_text()) == drift
    assert run.data.metrics["drift_spacing_ratio_max"] == 1.25
    assert run.data.metrics["drift_intensity_shift_sd"] == pytest.approx(1.0, abs=1e-3)

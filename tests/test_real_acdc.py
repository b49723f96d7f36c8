"""The five real ACDC patients in ../shared/data ingest, preprocess and train for a few iterations."""

import json
from pathlib import Path

import pytest

from medseg import ingest

from medseg.evaluation import evaluate

from medseg.planning import plan

from medseg.preprocessing import preprocess

from medseg.training import train
from tests.conftest import SHARED_DATA

ACDC = SHARED_DATA / "acdc"
pytestmark = [pytest.mark.realdata, pytest.mark.slow,
              pytest.mark.skipif(not ACDC.is_dir(), reason="../shared/data/acdc is absent")]


def test_real_acdc_ingests_and_trains(params_for, tmp_path):
    params = params_for(data={"source": str(ACDC)}, preprocess={"folds": 5}, train={"max_epochs": 1},
                        plan={"spatial_dims": None, "patch_size": None, "batch_size": None})
    summary = ingest.ingest_folder(Path(params.data.source), Path(params.paths.ingested))
    assert summary["accepted"] == 10 and summary["rejected"] == 0
    manifest = json.loads((Path(params.paths.ingested) / "manifest.json").read_text())
    assert {c["phase"] for c in manifest["cases"]} == {"ED", "ES"}
    assert all(c["spacing"][2] >= 5.0 and c["spacing"][0] < 2.0 for c in manifest["cases"])
    planned = plan.run(params)
    assert planned["spatial_dims"] == 2  # 5-10 mm slices, ~1.5 mm in-plane
    preprocess.run(params)
    splits = json.loads((Path(params.paths.preprocessed) / "splits.json").read_text())["splits"]
    for split in splits:  # both frames of a patient on the same side
        val_subjects = {c.rsplit("_", 1)[0] for c in split["val"]}
        assert not val_subjects & {c.rsplit("_", 1)[0] for c in split["train"]}
    result = train.run(params)
    assert result["folds"][0]["epochs"] == 1
    metrics = evaluate.run(params)
    assert set(metrics["dice"]) == {"RV", "myocardium", "LV"}

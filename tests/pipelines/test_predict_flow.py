"""Batch prediction as a Prefect flow, one task per study: the same outputs on threads and on a local Dask cluster
of two worker processes as ``medseg predict`` gives, and a summary of what failed."""

from __future__ import annotations

import dataclasses
import hashlib

import nibabel as nib
import numpy as np
import pytest
import yaml

from tests.conftest import PIPELINE, write_tiny_volume
from tests.ingest.conftest import axial_positions, write_series
from tests.inference.test_sliding_window import write_folds

pytestmark = [pytest.mark.slow, PIPELINE]


@pytest.fixture(autouse=True)
def _restore_environment():
    """Starting a local Dask cluster sets OMP_NUM_THREADS=1 and MKL_NUM_THREADS=1 in this process's environment (for
    its worker processes); later tests' subprocesses must not inherit them."""
    import os

    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_batch_flow_on_threads_and_on_dask_matches_predict(prefect_harness, params_for, tmp_path):
    from medseg.inference import predict
    from medseg_pipelines import predict_flow

    model = write_folds(tmp_path / "model", folds=(0,))
    batch = tmp_path / "batch"
    batch.mkdir()
    for k in range(2):
        image, _ = write_tiny_volume(k, shape=(40, 36, 5))
        nib.save(nib.Nifti1Image(image, np.diag([1.5, 1.5, 8.0, 1.0])), str(batch / f"scan{k}.nii.gz"))
        write_series(batch / f"study{k}" / "series", axial_positions(5), rows=40, cols=36, modality="MR",
                     series_uid=f"1.2.826.0.1.3680043.8.498.6{k}")
    (batch / "broken.nii.gz").write_bytes(b"\x1f\x8b not gzip")
    results = {}
    for runner in ("thread", "dask"):
        params = params_for(orchestration={"task_runner": runner, "dask_workers": 2})
        params_file = tmp_path / f"{runner}.yaml"
        params_file.write_text(yaml.safe_dump(dataclasses.asdict(params)))
        summary = predict_flow.run(str(model), str(batch), str(tmp_path / runner), params_file=str(params_file))
        assert summary["tasks"] == 5 and summary["succeeded"] == 4
        assert [f["input"] for f in summary["failed"]] == ["broken"]
        results[runner] = _hashes(tmp_path / runner)
    assert sorted(results["thread"]) == ["scan0.nii.gz", "scan1.nii.gz", "study0_series.nii.gz",
                                         "study1_series.nii.gz"]
    assert results["dask"] == results["thread"]  # byte for byte
    for k in range(2):  # and what `medseg predict` writes for the same input
        alone = predict.run(str(model), batch / f"scan{k}.nii.gz", tmp_path / "alone")
        assert _hashes(tmp_path / "alone")[f"scan{k}.nii.gz"] == results["thread"][f"scan{k}.nii.gz"]
        assert alone["written"]

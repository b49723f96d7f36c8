"""Shared fixtures: tiny synthetic data sets and parameters that run the real stages in seconds on a CPU."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest

from medseg.common.params import Params, load_params, params_from_dict

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_configure(config):
    """Under pytest-xdist the workers share the cores: each worker, and every process its tests start, gets its share
    of intra-op threads (torch would start one per core in each worker, and they would fight over the cores)."""
    import os

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        share = str(max(1, (os.cpu_count() or 1) // workers))
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, share)


# The whole-pipeline modules (Prefect servers and flows, DVC repositories, trainings run twice) carry this mark: under
# pytest-xdist (the default, "-n auto --dist=loadgroup" in pyproject.toml) they run one after another on one worker,
# beside the rest of the suite on the others. They share the session's Prefect harness and module-scoped projects, and
# none of them times its second run against another's servers and trainings.
PIPELINE = pytest.mark.xdist_group("pipeline")


@pytest.fixture(autouse=True)
def _pseudonym_key(monkeypatch):
    """Tests never create the project's secret key file."""
    monkeypatch.setenv("MEDSEG_PSEUDONYM_KEY", "test-key")


def write_tiny_volume(seed: int, shape=(40, 36, 5), spacing=(1.5, 1.5, 8.0)) -> tuple[np.ndarray, np.ndarray]:
    """A noisy MR-like volume with three nested blobs labelled 1..3 (blob positions vary with ``seed``)."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    image = np.zeros(shape, np.float32)
    label = np.zeros(shape, np.uint8)
    cx, cy = shape[0] / 2 + rng.integers(-4, 5), shape[1] / 2 + rng.integers(-4, 5)
    r = np.hypot(x - cx, y - cy)
    for z in range(shape[2]):
        scale = 1.0 - 0.08 * z
        label[..., z][r < 12 * scale] = 2
        label[..., z][r < 8 * scale] = 3
        label[..., z][(np.hypot(x - cx + 13 * scale, y - cy) < 6 * scale) & (label[..., z] == 0)] = 1
    image[:] = 100.0
    image[label == 1] = 400
    image[label == 2] = 200
    image[label == 3] = 500
    image += rng.normal(0, 20, shape).astype(np.float32)
    return image, label


@pytest.fixture
def tiny_ingested(tmp_path) -> Path:
    """An ingested folder (manifest.json + NIfTI) of 6 MR cases from 3 subjects, as ``medseg ingest`` writes it."""
    from medseg.common.atomic_write import save_nifti
    from medseg.common.manifest import CARDIAC_LABELS, Case, write_manifest

    root = tmp_path / "ingested"
    affine = np.diag([1.5, 1.5, 8.0, 1.0])
    cases = []
    for i in range(6):
        subject, phase = f"sub-{i // 2:04d}", ("ED", "ES")[i % 2]
        image, label = write_tiny_volume(i, shape=(40 + 2 * i, 36, 5))
        cid = f"{subject}_{phase}"
        save_nifti(root / "images" / f"{cid}.nii.gz", image, affine)
        save_nifti(root / "labels" / f"{cid}.nii.gz", label, affine, dtype=np.uint8)
        cases.append(Case(cid, subject, f"images/{cid}.nii.gz", f"labels/{cid}.nii.gz", "MR", (1.5, 1.5, 8.0),
                          image.shape, phase, "NOR"))
    write_manifest(root, "acdc", CARDIAC_LABELS, cases)
    return root


def tiny_params(tmp_path: Path, **overrides) -> Params:
    """The project's params.yaml with every path under ``tmp_path`` and a network small enough for seconds."""
    raw = dataclasses.asdict(load_params(REPO / "params.yaml"))
    raw["paths"] = {k: str(tmp_path / Path(v).name) for k, v in raw["paths"].items()}
    raw["data"]["source"] = str(tmp_path / "source")
    raw["preprocess"].update(folds=3)
    raw["plan"].update(spatial_dims=2, patch_size=[48, 48, 1], batch_size=4)
    raw["model"].update(channels=[8, 16, 32], strides=[2, 2], num_res_units=0)
    raw["train"].update(samples_per_volume=2, steps_per_epoch=2, max_epochs=2, val_interval=1, time_budget_minutes=None,
                        final_model=False)
    raw["mlflow"].update(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root=str(tmp_path / "mlartifacts"))
    for section, values in overrides.items():
        raw[section].update(values)
    return params_from_dict(raw)


def planned_and_preprocessed(params: Params) -> Params:
    """Run the plan and preprocess stages for ``params``; returns ``params``."""
    from medseg.planning import plan
    from medseg.preprocessing import preprocess

    plan.run(params)
    preprocess.run(params)
    return params


@pytest.fixture
def params_for(tmp_path):
    def make(**overrides) -> Params:
        return tiny_params(tmp_path, **overrides)

    return make


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect's test harness (a temporary API server and database), started once for the session: each start
    costs about 14 s on 2 cores, and the flow tests of three modules use it. Tests that run their own
    ``prefect server`` (test_serve) set its URL themselves."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield



def load_script(relative: str, name: str):
    """A script of the repository that is not a package (``benchmarks/accuracy.py``, ``docs/mlflow_ui.py``), loaded
    as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A localhost TCP port nothing listens on now (for a server a test starts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc, log_path: Path, seconds: float = 120) -> None:
    """Until ``url`` answers 200; raises with the end of the server's log if ``proc`` exits or time runs out."""
    import time
    import urllib.request

    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{url} never answered:\n{Path(log_path).read_text()[-3000:]}") from None
            time.sleep(0.5)


@pytest.fixture(autouse=True)
def _isolated_mlflow(monkeypatch):
    """Tests read their store from params; an outer MLFLOW_TRACKING_URI must not redirect them, and neither may the
    one ``mlflow.set_tracking_uri`` exports while a test runs (it sets the variable, which the next test's
    subprocesses, ``dvc repro`` among them, would inherit)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture
def trained(tiny_ingested, params_for):
    """Params whose ingested data has been planned, preprocessed and trained on (2 epochs of a tiny 2D U-Net)."""
    from medseg.training import train

    params = planned_and_preprocessed(params_for(paths={"ingested": str(tiny_ingested)}))
    summary = train.run(params)
    return params, summary

"""The real DVC pipeline, in a real git repository, on tiny demo data: `dvc repro` twice, the second a no-op."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import PIPELINE, REPO

pytestmark = [pytest.mark.slow, PIPELINE]


def sh(*args: str, cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the project's params.yaml names its store (this runs before autouse fixtures)
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory) -> tuple[Path, str]:
    """A copy of the project (code, dvc.yaml, params.yaml shrunk to seconds) as a fresh git + DVC repository, after
    its first ``dvc repro`` (and that command's output). Shared by this module's tests, in file order: the first
    only reads it (its second repro is a no-op), the second goes on from it."""
    root = tmp_path_factory.mktemp("dvc") / "project"
    root.mkdir()
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(REPO / "dvc.yaml", root)
    shutil.copy(REPO / ".gitignore", root)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["demo"].update(cardiac_patients=4, ct_patients=0, polyp_frames=0)  # the pipeline reads the cardiac set
    params["preprocess"].update(folds=2)
    params["plan"].update(target_spacing=[3.0, 3.0, 8.0], spatial_dims=2, patch_size=[48, 48, 1], batch_size=4)
    params["model"].update(channels=[8, 16, 32], strides=[2, 2], num_res_units=0)
    params["train"].update(samples_per_volume=2, steps_per_epoch=2, max_epochs=1, time_budget_minutes=None)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git", "init", "-q", cwd=root)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "init", cwd=root)
    sh("dvc", "init", "-q", cwd=root)
    sh("dvc", "config", "core.analytics", "false", cwd=root)
    return root, sh("dvc", "repro", cwd=root)


def test_dvc_repro_runs_every_stage_then_does_nothing(reproduced):
    project, first = reproduced
    for stage in ("demo_data", "ingest", "plan", "preprocess", "train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in first
    assert (project / "data/evaluation/metrics.json").is_file()
    assert (project / "data/plans/plans.json").is_file() and (project / "data/plans/fingerprint.json").is_file()
    assert (project / "data/registry.json").is_file()
    assert (project / "mlflow.db").is_file()
    assert list((project / "data/evaluation/plots").glob("overlay_*.png"))
    registry = yaml.safe_load((project / "data/registry.json").read_text())
    assert registry["alias"] == "champion" and registry["fold"] == "all"  # the all-data model serves
    assert (project / "data/model/fold_all/model.pt").is_file() and (project / "data/model/fold_0").is_dir()

    second = sh("dvc", "repro", cwd=project)
    assert "Running stage" not in second
    status = sh("dvc", "status", cwd=project)
    assert "up to date" in status

    metrics = sh("dvc", "metrics", "show", cwd=project)
    assert "dice_mean" in metrics


def _commit(root: Path, message: str) -> None:
    sh("git", "add", "-A", cwd=root)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", message, cwd=root)


def test_experiments_and_a_remote_spare_a_fresh_clone_the_recomputing(reproduced, tmp_path):
    project, _ = reproduced
    assert "Running stage" not in sh("dvc", "repro", cwd=project)  # the shared first run is complete
    _commit(project, "baseline")

    # A sweep point with `dvc exp run -S`, compared with `dvc exp show`.
    sh("dvc", "exp", "run", "-S", "train.learning_rate=0.02", "-n", "lr02", cwd=project)
    shown = sh("dvc", "exp", "show", "--no-pager", "--csv", cwd=project)
    assert "lr02" in shown and "0.02" in shown and "dice_mean" in shown

    # A remote (a local folder here): push, then a fresh clone pulls instead of recomputing.
    sh("dvc", "remote", "add", "-d", "store", str(tmp_path / "remote"), cwd=project)
    sh("dvc", "push", cwd=project)
    _commit(project, "remote")
    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(project), str(clone), cwd=tmp_path)
    sh("dvc", "pull", cwd=clone)
    assert (clone / "data/model/fold_all/model.pt").is_file() and (clone / "data/evaluation/metrics.json").is_file()
    assert "up to date" in sh("dvc", "status", cwd=clone)
    assert "Running stage" not in sh("dvc", "repro", cwd=clone)

"""The bad-input corpus, run through the real CLI in subprocesses, as a user meets it.

Each probe asserts: the exit code; for a refusal, one line on stderr naming the input (``medseg <command>: error:
...``); no Python traceback; no temporary or partial file left in any output folder; and not one byte of the user's
source files changed, added or removed (every file hashed before and after).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from medseg.common.atomic_write import TMP_MARKER
from tests.conftest import REPO, write_tiny_volume
from tests.ingest.conftest import axial_positions, make_acdc_patient, write_series
from tests.inference.test_sliding_window import write_folds


@dataclass(frozen=True)
class Probe:
    command: list[str]  # after "medseg"; {root} is the corpus folder
    code: int
    says: str  # text the last stderr line (exit 2) or the summary (exit 1) must contain
    source: str  # the folder under {root} whose files must stay byte-identical


def _nifti(path: Path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.diag([1.5, 1.5, 8.0, 1.0])), str(path))


def _params(root: Path, name: str, **train) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"].update(train)
    path = root / "params" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    write_folds(root / "model", folds=(0,))
    image, _ = write_tiny_volume(1, shape=(40, 36, 5))
    _nifti(root / "inputs" / "good.nii.gz", image)
    _nifti(root / "inputs" / "four_d.nii.gz", np.zeros((40, 36, 5, 3), np.float32))
    _nifti(root / "inputs" / "two_d.nii.gz", np.zeros((40, 36), np.float32))
    _nifti(root / "inputs" / "all_nan.nii.gz", np.full((40, 36, 5), np.nan, np.float32))
    (root / "inputs" / "corrupt.nii.gz").write_bytes(b"\x1f\x8b\x08 not a gzip stream")
    for k in range(2):  # two series in one folder
        write_series(root / "study" / "DOE_JOHN_MRN12345", axial_positions(5), rows=40, cols=36, modality="MR",
                     series_uid=f"1.2.826.0.1.3680043.8.498.5{k}", prefix=f"s{k}")
    patient = make_acdc_patient(root / "acdc", "patient001")
    label = sorted(patient.glob("*_gt.nii.gz"))[0]
    label.unlink()
    label.symlink_to(root / "nowhere.nii.gz")  # a dangling label link
    (patient / "loopA").symlink_to(patient / "loopB")
    (patient / "loopB").symlink_to(patient / "loopA")
    (root / "afile").write_text("not a folder")
    (root / "params").mkdir()
    (root / "params" / "not_yaml.yaml").write_text("train: [unclosed\n")
    _params(root, "negative_lr.yaml", learning_rate=-0.01)
    _params(root, "negative_steps.yaml", steps_per_epoch=-3)
    _params(root, "zero_epochs.yaml", max_epochs=0)
    return root


PROBES = {
    "params not YAML": Probe(["plan", "--params", "{root}/params/not_yaml.yaml"], 2, "not_yaml.yaml", "params"),
    "negative learning rate": Probe(["train", "--params", "{root}/params/negative_lr.yaml"], 2,
                                    "train.learning_rate", "params"),
    "negative steps per epoch": Probe(["train", "--params", "{root}/params/negative_steps.yaml"], 2,
                                      "train.steps_per_epoch", "params"),
    "zero epochs": Probe(["train", "--params", "{root}/params/zero_epochs.yaml"], 2, "train.max_epochs", "params"),
    "predict 4D NIfTI": Probe(["predict", "--model", "{root}/model", "{root}/inputs/four_d.nii.gz", "--out",
                               "{root}/out_4d"], 1, "four_d", "inputs"),
    "predict 2D NIfTI": Probe(["predict", "--model", "{root}/model", "{root}/inputs/two_d.nii.gz", "--out",
                               "{root}/out_2d"], 1, "two_d", "inputs"),
    "predict all-NaN volume": Probe(["predict", "--model", "{root}/model", "{root}/inputs/all_nan.nii.gz",
                                     "--largest-component", "--out", "{root}/out_nan"], 1, "all_nan", "inputs"),
    "predict folder with bad cases": Probe(["predict", "--model", "{root}/model", "{root}/inputs", "--out",
                                            "{root}/out_mixed"], 1, "corrupt", "inputs"),
    "predict --out is a file": Probe(["predict", "--model", "{root}/model", "{root}/inputs/good.nii.gz", "--out",
                                      "{root}/afile"], 2, "afile", "inputs"),
    "predict --out is the input folder": Probe(["predict", "--model", "{root}/model", "{root}/inputs", "--out",
                                                "{root}/inputs"], 2, "inputs", "inputs"),
    "predict unknown registry model": Probe(["predict", "--model", "models:/does-not-exist@champion",
                                             "{root}/inputs/good.nii.gz", "--out", "{root}/out_reg"], 2,
                                            "does-not-exist", "inputs"),
    "predict two series in one folder": Probe(["predict", "--model", "{root}/model", "{root}/study", "--out",
                                               "{root}/out_study"], 0, "", "study"),
    "ingest --out is the source": Probe(["ingest", "{root}/acdc", "--out", "{root}/acdc"], 2, "acdc", "acdc"),
    "ingest --out inside the source": Probe(["ingest", "{root}/acdc", "--out", "{root}/acdc/out"], 2, "acdc",
                                            "acdc"),
    "ingest missing source": Probe(["ingest", "{root}/missing", "--out", "{root}/out_missing"], 2, "missing",
                                   "acdc"),
    "ingest dangling label and link loop": Probe(["ingest", "{root}/acdc", "--out", "{root}/out_acdc"], 0, "",
                                                 "acdc"),
}


def _hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", list(PROBES))
def test_bad_input(corpus, name, tmp_path):
    probe = PROBES[name]
    source = corpus / probe.source
    before = _hashes(source)
    outputs_before = {p for p in corpus.iterdir()}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("MLFLOW_TRACKING_URI", None)
    args = [a.replace("{root}", str(corpus)) for a in probe.command]
    proc = subprocess.run([sys.executable, "-m", "medseg.cli", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    err_lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == probe.code, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    if probe.code == 2:
        refusals = [line for line in err_lines if line.startswith("medseg ")]
        assert len(refusals) == 1 and refusals[0] == err_lines[-1], err_lines[-3:]
        assert probe.says in refusals[0]
    if probe.code == 1:
        assert probe.says in proc.stdout and "input(s) failed" in err_lines[-1]
    assert _hashes(source) == before, "a source file was changed, added or removed"
    for folder in set(corpus.iterdir()) - outputs_before:
        assert not [p for p in folder.rglob("*") if TMP_MARKER in p.name], "a temporary file was left"
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()

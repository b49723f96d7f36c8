"""medseg predict on messy folders: every output name unique and visible, one bad input never stops the others, and
each failure is one line naming the input (no traceback); the user's inputs are never written over."""

from __future__ import annotations

import hashlib

import nibabel as nib
import numpy as np
import pytest

from medseg.inference import predict
from medseg.cli import main
from tests.conftest import write_tiny_volume
from tests.ingest.conftest import axial_positions, write_series
from tests.inference.test_sliding_window import write_folds


@pytest.fixture
def model(tmp_path):
    return write_folds(tmp_path / "model", folds=(0,))


def _hashes(root):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _nifti(path, array, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([1.5, 1.5, 8.0, 1.0]) if affine is None else affine), str(path))
    return path


def _two_series(folder):
    for k in range(2):
        write_series(folder, axial_positions(5), rows=40, cols=36, series_uid=f"1.2.826.0.1.3680043.8.498.7{k}",
                     modality="MR", prefix=f"s{k}")


def test_two_series_in_one_folder_get_two_outputs(model, tmp_path):
    _two_series(tmp_path / "study")
    summary = predict.run(str(model), tmp_path / "study", tmp_path / "out")
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["study.nii.gz", "study_2.nii.gz"] and len(set(summary["written"])) == 2
    again = predict.run(str(model), tmp_path / "study", tmp_path / "out2")  # stable: same names on a re-run
    assert [p.split("/")[-1] for p in again["written"]] == [p.split("/")[-1] for p in summary["written"]]


def test_dot_inside_a_series_folder_is_not_a_hidden_file(model, tmp_path, monkeypatch):
    write_series(tmp_path / "series9", axial_positions(5), rows=40, cols=36, modality="MR")
    monkeypatch.chdir(tmp_path / "series9")
    assert main(["predict", "--model", str(model), ".", "--out", str(tmp_path / "out")]) == 0
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["series9.nii.gz"]


def test_output_names_are_safe_and_unique():
    taken: set[str] = set()
    names = [predict.output_names(n, taken) for n in ["a", "A", "a", ".hidden", "", "x/../y", "b c"]]
    assert names == ["a", "A_2", "a_3", "hidden", "image", "x_.._y", "b_c"]


def test_bad_inputs_are_reported_and_the_rest_still_run(model, tmp_path, capsys):
    src = tmp_path / "in"
    image, _ = write_tiny_volume(3, shape=(40, 36, 5))
    _nifti(src / "a_good.nii.gz", image)
    _nifti(src / "b_4d.nii.gz", np.zeros((40, 36, 5, 3), np.float32))
    _nifti(src / "c_2d.nii.gz", np.zeros((40, 36), np.float32))
    _nifti(src / "d_nan.nii.gz", np.full((40, 36, 5), np.nan, np.float32))
    (src / "e_corrupt.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    _nifti(src / "f_good.nii.gz", image)
    before = _hashes(src)
    code = main(["predict", "--model", str(model), str(src), "--out", str(tmp_path / "out"), "--largest-component"])
    captured = capsys.readouterr()
    assert code == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_good.nii.gz", "f_good.nii.gz"]
    assert "Traceback" not in captured.err and "4 of 6 input(s) failed" in captured.err
    import json

    summary = json.loads(captured.out)
    reasons = {f["input"]: f["reason"] for f in summary["failed"]}
    assert set(reasons) == {"b_4d", "c_2d", "d_nan", "e_corrupt"}
    assert "4D" in reasons["b_4d"] and "2D" in reasons["c_2d"] and "NaN" in reasons["d_nan"]
    assert all(len(r.splitlines()) == 1 for r in reasons.values())
    assert _hashes(src) == before


def test_a_failed_write_is_that_inputs_failure_and_the_others_are_written(model, tmp_path, monkeypatch, caplog):
    """Outputs are written on a thread while the next input is segmented: a write that fails (a full disk) must
    still be reported against its own input, once, and the inputs before and after it written."""
    import errno

    import medseg.common.atomic_write as atomic

    src = tmp_path / "in"
    image, _ = write_tiny_volume(3, shape=(40, 36, 5))
    for stem in ("a", "b", "c"):
        _nifti(src / f"{stem}.nii.gz", image)
    real = atomic.save_nifti

    def full_for_b(path, *args, **kwargs):
        if path.name == "b.nii.gz":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(atomic, "save_nifti", full_for_b)
    summary = predict.run(str(model), src, tmp_path / "out")
    assert [f["input"] for f in summary["failed"]] == ["b"] and "No space left" in summary["failed"][0]["reason"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.nii.gz", "c.nii.gz"]
    assert summary["succeeded"] == 2 and [r.message.count("failed: b") for r in caplog.records].count(1) == 1


@pytest.mark.parametrize("case", ["file", "readonly", "same", "inside"])
def test_unusable_out_is_one_line_and_exit_2(model, tmp_path, capsys, case):
    import os

    src = tmp_path / "in"
    image, _ = write_tiny_volume(3, shape=(40, 36, 5))
    _nifti(src / "a.nii.gz", image)
    out = {"file": tmp_path / "afile", "readonly": tmp_path / "ro", "same": src, "inside": src / "pred"}[case]
    if case == "file":
        out.write_text("x")
    if case == "readonly":
        out.mkdir()
        out.chmod(0o500)
        if os.access(out, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
    before = _hashes(src)
    assert main(["predict", "--model", str(model), str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--out" in err
    assert _hashes(src) == before


def test_a_file_input_is_never_written_over(model, tmp_path):
    image, _ = write_tiny_volume(3, shape=(40, 36, 5))
    path = _nifti(tmp_path / "scan.nii.gz", image)
    before = path.read_bytes()
    summary = predict.run(str(model), path, tmp_path)
    assert summary["written"] == [] and "would replace the input" in summary["failed"][0]["reason"]
    assert path.read_bytes() == before


def test_a_linked_input_is_named_after_the_link(model, tmp_path):
    image, _ = write_tiny_volume(3, shape=(40, 36, 5))
    target = _nifti(tmp_path / "store" / "0001.nii.gz", image)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "case_a.nii.gz").symlink_to(target)
    summary = predict.run(str(model), tmp_path / "in", tmp_path / "out")
    assert [p.split("/")[-1] for p in summary["written"]] == ["case_a.nii.gz"]

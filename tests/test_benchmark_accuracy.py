"""The accuracy yardstick (``benchmarks/accuracy.py``): its scoring and statistics on arrays whose answers are known,
and one end-to-end run of medseg against the tutorial loop on three tiny ACDC-layout patients."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from tests.conftest import load_script, write_tiny_volume


acc = load_script("benchmarks/accuracy.py", "benchmark_accuracy")


def _square(shape=(30, 30, 1), x0=5, y0=5, side=10) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[x0:x0 + side, y0:y0 + side, :] = True
    return mask


def _brute_hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """All-pairs distances between surface voxels, the surface found by padding (independent of the module's)."""
    def surface_points(mask):
        padded = np.pad(mask, 1)
        inner = padded.copy()
        for axis in range(3):
            for shift in (1, -1):
                inner &= np.roll(padded, shift, axis)
        return np.argwhere(padded & ~inner) * np.asarray(spacing)

    pa, pb = surface_points(a), surface_points(b)
    d = np.linalg.norm(pa[:, None] - pb[None], axis=-1)
    return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


def test_dice_and_hd95_of_offset_squares():
    """10x10 squares 3 voxels apart along x (2 mm voxels): overlap 70 of 100 each -> Dice 0.7; the far 3 columns
    are 2, 4, 6 mm from the other square and the top 5% of distances is the 6 mm column -> HD95 6 mm."""
    truth, pred = _square(), _square(x0=8)
    scores = acc.score_case(pred.astype(np.uint8), truth.astype(np.uint8), {1: "A"}, (2.0, 1.0, 5.0))
    assert scores["A"]["dice"] == pytest.approx(0.7)
    assert scores["A"]["hd95"] == pytest.approx(6.0)


def test_hd95_uses_the_spacing_of_each_axis():
    a, b = np.zeros((10, 12, 3), bool), np.zeros((10, 12, 3), bool)
    a[5, 2, 0] = True
    b[5, 6, 2] = True  # 4 voxels in y at 2.5 mm, 2 slices at 7 mm
    assert acc.hd95(a, b, (1.0, 2.5, 7.0)) == pytest.approx(np.hypot(10.0, 14.0))


@pytest.mark.parametrize("offset", [(2, 0), (0, 3), (4, 1)])
def test_hd95_matches_brute_force_on_thick_volumes(offset):
    truth = _square((24, 26, 4), 4, 5, 9)
    pred = _square((24, 26, 4), 4 + offset[0], 5 + offset[1], 9)
    pred[:, :, 3] = False  # one slice fewer: the z surfaces differ too
    spacing = (1.25, 1.5, 8.0)
    assert acc.hd95(pred, truth, spacing) == pytest.approx(_brute_hd95(pred, truth, spacing))


def test_empty_classes_follow_the_documented_conventions():
    truth = np.zeros((8, 8, 2), np.uint8)
    truth[2:5, 2:5] = 1
    pred = np.zeros_like(truth)
    scores = acc.score_case(pred, truth, {1: "A", 2: "B"}, (1, 1, 1))
    assert scores["A"] == {"dice": 0.0, "hd95": None}  # missed class: Dice 0, HD95 missing
    assert scores["B"] == {"dice": 1.0, "hd95": 0.0}  # absent from both: perfect
    with pytest.raises(ValueError, match="is not the reference"):
        acc.score_case(pred[:-1], truth, {1: "A"}, (1, 1, 1))


def test_bootstrap_resamples_patients_not_cases():
    """Patient p has 3 cases at Dice 1, patient q one at 0. Patient resamples give means 1, 0.75 or 0 (each draw of
    two patients is qq with probability 1/4), so the CI is [0, 1]; resampling cases would almost never give 0."""
    mean, lo, hi = acc.bootstrap([[1.0, 1.0, 1.0], [0.0]], seed=1)
    assert mean == pytest.approx(0.75)
    assert (lo, hi) == (0.0, 1.0)
    assert acc.bootstrap([[0.8, 0.8], [0.8]]) == pytest.approx((0.8, 0.8, 0.8))


def _rows(method: str, dice_by_patient: dict[str, list[float]], hd: float | None = 5.0) -> list[dict]:
    return [{"method": method, "fold": 0, "case_id": f"{p}_{i}", "subject": p, "class": name, "dice": d,
             "hd95": hd}
            for p, values in dice_by_patient.items() for i, d in enumerate(values) for name in ("A", "B")]


def test_summary_difference_and_table():
    ours = _rows("medseg", {"p": [0.9, 0.8], "q": [0.7]})
    peer = _rows("tutorial", {"p": [0.8, 0.7], "q": [0.6]}, hd=None)
    summary = acc.summarise(ours, ["A", "B"])
    assert summary["mean_dice"] == pytest.approx(0.8)
    assert summary["per_class"]["A"] == {"dice": pytest.approx(0.8), "iou": pytest.approx((0.9 / 1.1 + 0.8 / 1.2 + 0.7 / 1.3) / 3),
                                         "hd95": 5.0, "hd95_missing": 0}
    assert (summary["patients"], summary["cases"]) == (2, 3)
    peer_summary = acc.summarise(peer, ["A", "B"])
    assert peer_summary["per_class"]["B"]["hd95_missing"] == 3
    diff = acc.paired_difference(ours + peer, "medseg", "tutorial")
    assert diff["mean"] == pytest.approx(0.1) and diff["ci95"] == pytest.approx([0.1, 0.1])
    table = acc.format_table({"medseg": summary, "tutorial": peer_summary}, ["A", "B"],
                             {"medseg": 1.5, "tutorial": None}, diff)
    lines = table.splitlines()
    assert lines[2].split()[:5] == ["medseg", "0.800", "[0.700,", "0.850]",  # patient means 0.85 and 0.7
                                    f"{np.mean([acc.iou(d) for d in (0.9, 0.8, 0.7) for _ in 'AB']):.3f}"]
    assert "(3 miss)" in lines[3]
    assert lines[-1] == "medseg - tutorial: +0.100 [+0.100, +0.100] (2 patients)"


def test_params_point_under_work_and_set_is_checked(tmp_path):
    raw = acc.write_params(tmp_path, tmp_path / "data", 4, 2.5, 7,
                           ["train.augmentation.rotate_prob=0", "model.channels=[8, 16]", "train.amp=off"])
    assert all(str(v).startswith(str(tmp_path)) for v in raw["paths"].values())
    assert raw["mlflow"]["tracking_uri"] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert raw["preprocess"]["folds"] == 4 and raw["train"]["time_budget_minutes"] == 2.5
    assert raw["train"]["final_model"] is False and raw["train"]["seed"] == 7
    assert raw["train"]["augmentation"]["rotate_prob"] == 0 and raw["model"]["channels"] == [8, 16]
    assert raw["evaluate"]["largest_component"] != "auto"  # auto decides on the held-out fold
    with pytest.raises(SystemExit, match="no such key"):
        acc.write_params(tmp_path, tmp_path, 3, 1.0, 0, ["train.agumentation.rotate_prob=0"])


def write_acdc(root, patients: int = 3) -> None:
    """``patientNNN/Info.cfg`` + ED/ES frames and ``_gt`` labels, tiny, with ACDC's 1 mm sform beside the pixdim."""
    for p in range(1, patients + 1):
        folder = root / f"patient{p:03d}"
        folder.mkdir(parents=True)
        (folder / "Info.cfg").write_text("ED: 1\nES: 2\nGroup: NOR\n")
        for frame in (1, 2):
            image, label = write_tiny_volume(10 * p + frame, shape=(40 + 2 * p, 36, 5))
            for array, name in ((image, ""), (label, "_gt")):
                img = nib.Nifti1Image(array, np.diag([-1.0, -1.0, 1.0, 1.0]))
                img.header.set_zooms((1.5, 1.5, 8.0))  # pixdim only: the sform keeps its 1 mm columns
                img.set_sform(np.diag([-1.0, -1.0, 1.0, 1.0]), code=2)
                nib.save(img, str(folder / f"patient{p:03d}_frame{frame:02d}{name}.nii.gz"))


def test_original_files_finds_the_acdc_ground_truth(tmp_path):
    write_acdc(tmp_path, patients=1)
    image, label = acc.original_files(tmp_path, "patient001/patient001_frame02.nii.gz", tmp_path / "x", {})
    assert image == tmp_path / "patient001" / "patient001_frame02.nii.gz"
    assert label == tmp_path / "patient001" / "patient001_frame02_gt.nii.gz"


@pytest.mark.slow  # about 30 s on 2 cores: six processes importing torch, two tiny trainings
def test_yardstick_end_to_end_on_tiny_acdc(tmp_path):
    """Both methods run on fold 0 of 3 and are scored on the held-out patient's original files."""
    data = tmp_path / "data"
    write_acdc(data)
    before = sorted(p.name for p in data.rglob("*"))
    result = acc.main([
        "--data", str(data), "--work", str(tmp_path / "work"), "--folds", "3", "--max-folds", "1",
        "--minutes", "0.02", "--tutorial-args=--tiny", "--variants", "no-pp,tta",
        "--set", "model.channels=[8, 16, 32]", "--set", "model.strides=[2, 2]",
        "--set", "plan.patch_size=[48, 48, 1]", "--set", "plan.batch_size=4",
        "--set", "train.max_epochs=2", "--set", "train.steps_per_epoch=2"])
    assert sorted(p.name for p in data.rglob("*")) == before  # nothing written into the data folder
    saved = json.loads((tmp_path / "work" / "accuracy.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(result["summary"]))
    assert [f["methods"][m]["status"] for f in saved["folds"] for m in ("medseg", "tutorial")] == ["ok", "ok"]
    held_out = saved["folds"][0]["test"]
    assert len(held_out) == 2 and not set(held_out) & set(saved["folds"][0]["train"])
    for method in ("medseg", "tutorial"):
        rows = [r for r in saved["cases"] if r["method"] == method]
        assert sorted({r["case_id"] for r in rows}) == sorted(held_out)
        assert {r["class"] for r in rows} == {"RV", "myocardium", "LV"}
        assert all(0.0 <= r["dice"] <= 1.0 for r in rows)
        summary = saved["summary"][method]
        assert 0.0 <= summary["ci95"][0] <= summary["mean_dice"] <= summary["ci95"][1] <= 1.0
        assert all(0.0 <= c["dice"] <= 1.0 for c in summary["per_class"].values())
    sources = json.loads((tmp_path / "work" / "id_map.json").read_text())
    for case in held_out:  # predictions on each original image's grid, with its affine
        original = nib.load(str(data / sources[case]["source"]))
        for method in ("medseg", "tutorial"):
            pred = nib.load(str(tmp_path / "work" / "pred" / method / "fold_0" / f"{case}.nii.gz"))
            assert pred.shape == original.shape
            np.testing.assert_allclose(pred.affine, original.affine, atol=1e-4)
    assert saved["difference"]["a"] == "medseg" and saved["difference"]["patients"] == 1
    for variant in ("medseg/no-pp", "medseg/tta"):  # inference-only rows from the same fold model
        assert sorted({r["case_id"] for r in saved["cases"] if r["method"] == variant}) == sorted(held_out)
        assert (tmp_path / "work" / "pred" / variant.replace("/", "_") / "fold_0").is_dir()
    assert [d["a"] for d in saved["variant_differences"]] == ["medseg/no-pp", "medseg/tta"]
    assert all(d["b"] == "medseg" for d in saved["variant_differences"])


@pytest.mark.slow  # about 30 s on 2 cores
def test_yardstick_end_to_end_on_tiny_frames(tmp_path):
    """A folder of RGB frames (images/ + masks/): folds by video sequence, medseg's mask PNGs and the 2D peer's,
    scored against the original masks."""
    from medseg.demo.polyp import write_polyp_dataset

    data = tmp_path / "frames"
    write_polyp_dataset(data, seed=3, frames=9)  # three sequences of three frames
    result = acc.main([
        "--data", str(data), "--work", str(tmp_path / "work"), "--folds", "3", "--max-folds", "1",
        "--minutes", "0.02", "--tutorial-args=--tiny",
        "--set", "model.channels=[8, 16, 32]", "--set", "model.strides=[2, 2]",
        "--set", "plan.memory_budget_mb=12",
        "--set", "train.max_epochs=2", "--set", "train.steps_per_epoch=2"])
    fold = result["folds"][0]
    assert [fold["methods"][m]["status"] for m in ("medseg", "tutorial")] == ["ok", "ok"]
    sources = json.loads((tmp_path / "work" / "id_map.json").read_text())
    held_out = {sources[c]["source"].split("_")[0] for c in fold["test"]}
    trained = {sources[c]["source"].split("_")[0] for c in fold["train"]}
    assert len(fold["test"]) == 3 and len(held_out) == 1 and not held_out & trained  # one whole sequence
    for method in ("medseg", "tutorial"):
        rows = [r for r in result["cases"] if r["method"] == method]
        assert sorted({r["case_id"] for r in rows}) == sorted(fold["test"]) and {r["class"] for r in rows} == \
            {"foreground"}
        for case in fold["test"]:
            written = np.asarray(Image.open(tmp_path / "work" / "pred" / method / "fold_0" / f"{case}.png"))
            original = Image.open(data / sources[case]["source"])
            assert written.shape == (original.height, original.width)
        assert 0.0 <= result["summary"][method]["mean_iou"] <= result["summary"][method]["mean_dice"] <= 1.0


def test_training_variants_get_their_own_plan_and_models_and_share_the_ingested_folds(tmp_path):
    method, sets = acc.parse_variant("scratch:model.encoder=none;train.learning_rate=0.001")
    assert method == "medseg[scratch]" and sets == ["model.encoder=none", "train.learning_rate=0.001"]
    base = acc.write_params(tmp_path, tmp_path / "data", 5, 2.0, 0, [])
    variant = acc.variant_params(tmp_path, base, method, sets)
    assert variant["model"]["encoder"] == "none" and variant["train"]["learning_rate"] == 0.001
    assert base["model"]["encoder"] == "auto"  # the default recipe is left as it is
    assert variant["paths"]["ingested"] == base["paths"]["ingested"]
    for key in ("plans", "preprocessed", "model", "checkpoints"):
        assert variant["paths"][key].startswith(str(tmp_path / "variants" / "medseg_scratch"))
    assert acc.safe_name("medseg/tta") == "medseg_tta"
    for bad in ["scratch", "scratch:", ":model.encoder=none", "scratch:model.encoder"]:
        with pytest.raises(SystemExit):
            acc.parse_variant(bad)
    with pytest.raises(SystemExit, match="no such key"):
        acc.variant_params(tmp_path, base, method, ["model.encodr=none"])


def write_msd(root, cases: int = 6, shape=(24, 22, 16)) -> None:
    """A tiny Decathlon task: isotropic 1 mm volumes (medseg plans them in 3D), ``dataset.json`` naming them."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for k in range(cases):
        image, label = write_tiny_volume(k, shape=shape)
        affine = np.eye(4)
        nib.save(nib.Nifti1Image(image, affine), str(root / "imagesTr" / f"tiny_{k:03d}.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(root / "labelsTr" / f"tiny_{k:03d}.nii.gz"))
        training.append({"image": f"./imagesTr/tiny_{k:03d}.nii.gz", "label": f"./labelsTr/tiny_{k:03d}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({
        "name": "Tiny", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "a", "2": "b", "3": "c"},
        "numTraining": cases, "training": training}))


def test_named_benchmarks_and_the_peer_that_matches_the_plan():
    args = acc.parse_args(["--benchmark", "hippocampus"])
    assert (args.data.name, args.folds, args.minutes) == ("hippocampus", 5, 15.0)
    args = acc.parse_args([])  # the default is the real ACDC benchmark: 100 patients, 5 folds, 15 minutes
    assert (args.data, args.folds, args.minutes) == (acc.SHARED / "acdc100", 5, 15.0)
    assert (acc.parse_args(["--benchmark", "acdc5"]).folds, acc.parse_args(["--quick"]).folds) == (None, 3)
    assert acc.parse_args(["--data", "x"]).folds is None  # any other folder: one fold per patient
    assert [acc.peer_script(frames, dims) for frames, dims in [(True, 2), (False, 2), (False, 3)]] == [
        "tutorial_loop_2d.py", "tutorial_loop.py", "tutorial_loop_3d.py"]


@pytest.mark.slow  # about 30 s on 2 cores
def test_yardstick_end_to_end_on_a_tiny_3d_decathlon_task(tmp_path):
    """Isotropic volumes: medseg plans 3D, so the peer is the plain 3D loop; both predict on the original grids."""
    data = tmp_path / "Task99_Tiny"
    write_msd(data)
    result = acc.main([
        "--data", str(data), "--work", str(tmp_path / "work"), "--folds", "3", "--max-folds", "1",
        "--minutes", "0.02", "--tutorial-args=--tiny",
        "--set", "model.channels=[8, 16, 32]", "--set", "model.strides=[2, 2]",
        "--set", "plan.patch_size=[16, 16, 16]", "--set", "plan.batch_size=2",
        "--set", "train.max_epochs=2", "--set", "train.steps_per_epoch=2"])
    assert result["settings"]["spatial_dims"] == 3
    fold = result["folds"][0]
    assert [fold["methods"][m]["status"] for m in ("medseg", "tutorial")] == ["ok", "ok"]
    summary = json.loads((tmp_path / "work" / "tutorial" / "fold_0" / "summary.json").read_text())
    assert summary["roi"] == [16, 16, 16]  # tutorial_loop_3d.py's
    for method in ("medseg", "tutorial"):
        assert sorted({r["case_id"] for r in result["cases"] if r["method"] == method}) == sorted(fold["test"])
        for case in fold["test"]:
            assert nib.load(str(tmp_path / "work" / "pred" / method / "fold_0" / f"{case}.nii.gz")).shape == (24, 22, 16)

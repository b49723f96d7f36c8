"""medseg predict returns labels on the input's own grid, whatever its orientation, spacing and obliquity."""

import nibabel as nib
import numpy as np
import pytest

from medseg.evaluation import evaluate

from medseg.inference import predict

from medseg.registry import register
from medseg.cli import main
from medseg.common.manifest import registered_model_name
from tests.conftest import write_tiny_volume
from tests.inference.test_sliding_window import inference_config, write_folds, write_model


@pytest.fixture
def model(tmp_path):
    """A model folder with two folds (random weights): geometry does not depend on training."""
    return write_folds(tmp_path / "model", folds=(0, 1))


def rotation(axis: int, degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


AFFINES = {
    "ras_anisotropic": np.diag([1.2, 1.7, 9.0, 1.0]),
    "las_flipped": np.diag([-1.5, 1.5, 8.0, 1.0]),
    "oblique": np.block([[rotation(0, 20) @ rotation(2, 15) @ np.diag([1.4, 1.4, 7.0]), np.array([[-30.0], [12.0], [5.0]])],
                         [np.zeros((1, 3)), np.ones((1, 1))]]),
}


@pytest.mark.parametrize("name", list(AFFINES))
def test_prediction_has_input_shape_and_affine(model, tmp_path, name):
    image, _ = write_tiny_volume(7, shape=(44, 38, 6))
    path = tmp_path / "inputs" / f"{name}.nii.gz"
    path.parent.mkdir()
    nib.save(nib.Nifti1Image(image, AFFINES[name]), str(path))
    summary = predict.run(str(model), path, tmp_path / "out", tta=True, largest_component=True)
    out = nib.load(summary["written"][0])
    assert out.shape == image.shape
    np.testing.assert_allclose(out.affine, AFFINES[name], atol=1e-5)
    assert out.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1, 2, 3}


def test_predict_from_registry_uri_on_a_folder(trained, tmp_path, monkeypatch):
    params, _ = trained
    evaluate.run(params)
    register.run(params)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", params.mlflow.tracking_uri)
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(2):
        image, _ = write_tiny_volume(20 + i, shape=(40 + 4 * i, 36, 5))
        nib.save(nib.Nifti1Image(image, np.diag([1.5, 1.5, 8.0, 1.0])), str(folder / f"case{i}.nii.gz"))
    code = main(["predict", "--model", f"models:/{registered_model_name(params)}@champion", str(folder),
                 "--out", str(tmp_path / "pred")])
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == ["case0.nii.gz", "case1.nii.gz"]


def test_predict_names_a_missing_model_or_input(tmp_path, capsys):
    assert main(["predict", "--model", str(tmp_path / "nope"), str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "model not found" in capsys.readouterr().err


def test_predict_on_a_dicom_series_keeps_the_ingest_geometry(model, tmp_path):
    from pathlib import Path

    from medseg import ingest

    from medseg.demo import demo_data
    from medseg.common.manifest import read_manifest

    demo_data.write(tmp_path / "demo", seed=5, cardiac_patients=1, ct_patients=1, polyp_frames=0)
    ct_root = tmp_path / "demo" / "pancreas_ct"
    series = sorted(p for p in (ct_root / "dicom").rglob("*") if p.is_dir() and any(p.glob("*.dcm")))[0]
    summary = predict.run(str(model), series, tmp_path / "pred", overlap=0.25)
    written = nib.load(summary["written"][0])
    assert Path(summary["written"][0]).name == f"{series.name}.nii.gz"

    ingest.ingest_folder(ct_root, tmp_path / "ingested_ct")
    manifest = read_manifest(tmp_path / "ingested_ct")
    reference = nib.load(str(manifest.image_path(manifest.cases[0])))
    assert written.shape == reference.shape
    np.testing.assert_allclose(written.affine, reference.affine, atol=1e-4)


def test_nifti_read_as_ingest_reads_it_and_written_with_its_own_affine(model, tmp_path):
    """ACDC-style header: sform with 1 mm columns, true spacing only in pixdim."""
    image, _ = write_tiny_volume(3, shape=(40, 36, 5))
    img = nib.Nifti1Image(image, np.diag([-1.0, -1.0, 1.0, 1.0]))
    img.header.set_zooms((1.5, 1.5, 8.0))
    img.set_sform(np.diag([-1.0, -1.0, 1.0, 1.0]), code=2)
    img.set_qform(None, code=0)
    path = tmp_path / "acdc_like.nii.gz"
    nib.save(img, str(path))
    (found,) = list(predict.find_inputs(path))
    assert found.modality is None and found.dicom_files == ()
    np.testing.assert_allclose(np.linalg.norm(found.affine[:3, :3], axis=0), [1.5, 1.5, 8.0])
    written = nib.load(predict.run(str(model), path, tmp_path / "out")["written"][0])
    np.testing.assert_allclose(written.affine, found.output_affine)
    np.testing.assert_allclose(written.affine, nib.load(str(path)).affine)
    assert written.shape == image.shape


def test_a_folder_of_folds_ensembles_them_like_naming_each_fold(model, tmp_path):
    image, _ = write_tiny_volume(9, shape=(40, 36, 5))
    path = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(image, np.diag([1.5, 1.5, 8.0, 1.0])), str(path))
    assert main(["predict", "--model", str(model), str(path), "--out", str(tmp_path / "a"), "--tta"]) == 0
    assert main(["predict", "--model", str(model / "fold_0"), "--model", str(model / "fold_1"), str(path),
                 "--out", str(tmp_path / "b"), "--tta"]) == 0
    assert main(["predict", "--model", str(model / "fold_0"), str(path), "--out", str(tmp_path / "c"), "--tta"]) == 0
    a, b, c = (np.asarray(nib.load(str(tmp_path / d / "case.nii.gz")).dataobj) for d in "abc")
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c), "two folds with different weights should not predict like one of them"


def test_tta_and_largest_component_default_to_the_model_config(tmp_path):
    config = inference_config() | {"tta": True, "largest_component": True}
    model = write_model(tmp_path / "model", config)
    image, _ = write_tiny_volume(9, shape=(40, 36, 5))
    path = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(image, np.diag([1.5, 1.5, 8.0, 1.0])), str(path))
    summary = predict.run(str(model), path, tmp_path / "a")
    assert (summary["tta"], summary["largest_component"]) == (True, [1, 2, 3])
    summary = predict.run(str(model), path, tmp_path / "b", tta=False, largest_component=False)
    assert (summary["tta"], summary["largest_component"]) == (False, [])
    from scipy import ndimage

    labels = np.asarray(nib.load(str(tmp_path / "a" / "case.nii.gz")).dataobj)
    for k in np.unique(labels[labels > 0]):
        assert ndimage.label(labels == k, structure=np.ones((3, 3, 3)))[1] == 1


def test_models_that_cannot_be_ensembled_are_refused(model, tmp_path, capsys):
    other = write_model(tmp_path / "ct_model", inference_config(labels={"0": "background", "1": "pancreas"}))
    image, _ = write_tiny_volume(9)
    path = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(image, np.diag([1.5, 1.5, 8.0, 1.0])), str(path))
    assert main(["predict", "--model", str(model), "--model", str(other), str(path), "--out", str(tmp_path / "o")]) == 2
    assert "cannot ensemble" in capsys.readouterr().err


@pytest.mark.parametrize("name", [*AFFINES, "upsampled"])
@pytest.mark.parametrize("normalization", [{"scheme": "zscore"},
                                           {"scheme": "ct", "clip": [-100.0, 600.0], "mean": 200.0, "std": 90.0}])
def test_fast_label_inversion_equals_monai_invertd(name, normalization):
    """The per-axis gather that replaces Spacingd's inverse gives Invertd's labels voxel for voxel (random labels,
    so any difference in rounding, border handling or crop offsets shows)."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    from medseg.preprocessing.transforms import IMAGE, preprocess_transforms

    image, _ = write_tiny_volume(11, shape=(44, 38, 6))
    image[:2] = 900.0  # bright foreground on the first rows: the crop keeps that edge, so 'border' sampling matters
    affine = AFFINES.get(name, np.diag([2.0, 2.2, 9.0, 1.0]))
    pre = preprocess_transforms(normalization, [1.3, 1.1, 5.0] if name != "ras_anisotropic" else [1.5, 1.5, 8.0],
                                keys=[IMAGE], load=False)
    data = pre({IMAGE: MetaTensor(torch.from_numpy(image)[None], affine=torch.as_tensor(affine))})
    labels = torch.from_numpy(np.random.default_rng(0).integers(0, 4, data[IMAGE].shape, dtype=np.uint8))
    fast = predict._invert_labels(pre, data[IMAGE], labels)
    data["pred"] = MetaTensor(labels, meta=data[IMAGE].meta)
    reference = Invertd("pred", transform=pre, orig_keys=IMAGE, nearest_interp=True)(data)["pred"]
    assert fast is not None and fast.shape == (1, *image.shape)
    np.testing.assert_array_equal(np.asarray(fast), np.asarray(reference).round().astype(np.uint8))


def test_the_sliding_window_is_the_models_unless_the_command_says_otherwise(tmp_path, monkeypatch):
    """overlap and windows per call come from the model's inference config (evaluate's values at training); a model
    from before they were recorded gets the values evaluate then used; --overlap and --sw-batch-size override."""
    from medseg.inference import sliding_window as inference

    seen = []
    build = inference.build_inferer
    monkeypatch.setattr(inference, "build_inferer",
                        lambda patch, dims, overlap, sw_batch_size, **kw: seen.append((overlap, sw_batch_size))
                        or build(patch, dims, overlap, sw_batch_size, **kw))
    image, _ = write_tiny_volume(3)
    nib.save(nib.Nifti1Image(image, np.diag([1.5, 1.5, 8.0, 1.0])), str(tmp_path / "case.nii.gz"))
    recorded = write_model(tmp_path / "recorded", {**inference_config(), "sw_overlap": 0.25, "sw_batch_size": 3})
    legacy = write_model(tmp_path / "legacy", inference_config())
    for model, argv in [(recorded, []), (legacy, []), (recorded, ["--overlap", "0.1", "--sw-batch-size", "5"])]:
        out = tmp_path / f"out{len(seen)}"
        assert main(["predict", "--model", str(model), str(tmp_path / "case.nii.gz"), "--out", str(out), *argv]) == 0
    assert seen == [(0.25, 3), (predict.LEGACY_WINDOW["sw_overlap"], predict.LEGACY_WINDOW["sw_batch_size"]),
                    (0.1, 5)]

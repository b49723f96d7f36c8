"""medseg predict returns labels on the input's own grid, whatever its orientation, spacing and obliquity."""

import nibabel as nib
import numpy as np
import pytest

from medseg import evaluate, predict, register
from medseg.cli import main
from tests.conftest import write_tiny_volume


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
def test_prediction_has_input_shape_and_affine(trained, tmp_path, name):
    params, _ = trained
    image, _ = write_tiny_volume(7, shape=(44, 38, 6))
    path = tmp_path / "inputs" / f"{name}.nii.gz"
    path.parent.mkdir()
    nib.save(nib.Nifti1Image(image, AFFINES[name]), str(path))
    summary = predict.run(params.paths.model, path, tmp_path / "out")
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
    code = main(["predict", "--model", f"models:/{params.register.model_name}@champion", str(folder),
                 "--out", str(tmp_path / "pred")])
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == ["case0.nii.gz", "case1.nii.gz"]


def test_predict_names_a_missing_model_or_input(tmp_path, capsys):
    assert main(["predict", "--model", str(tmp_path / "nope"), str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "model not found" in capsys.readouterr().err


def test_predict_on_a_dicom_series_keeps_the_ingest_geometry(trained, tmp_path):
    from pathlib import Path

    from medseg import demo_data, ingest
    from medseg.manifest import read_manifest

    params, _ = trained
    demo_data.run(tmp_path / "demo", seed=5, cardiac_patients=1, ct_patients=1)
    ct_root = tmp_path / "demo" / "pancreas_ct"
    series = sorted(p for p in (ct_root / "dicom").rglob("*") if p.is_dir() and any(p.glob("*.dcm")))[0]
    summary = predict.run(params.paths.model, series, tmp_path / "pred", overlap=0.25)
    written = nib.load(summary["written"][0])
    assert Path(summary["written"][0]).name == f"{series.name}.nii.gz"

    ingest.run(ct_root, tmp_path / "ingested_ct")
    manifest = read_manifest(tmp_path / "ingested_ct")
    reference = nib.load(str(manifest.image_path(manifest.cases[0])))
    assert written.shape == reference.shape
    np.testing.assert_allclose(written.affine, reference.affine, atol=1e-4)


def test_nifti_read_as_ingest_reads_it_and_written_with_its_own_affine(trained, tmp_path):
    """ACDC-style header: sform with 1 mm columns, true spacing only in pixdim."""
    params, _ = trained
    image, _ = write_tiny_volume(3, shape=(40, 36, 5))
    img = nib.Nifti1Image(image, np.diag([-1.0, -1.0, 1.0, 1.0]))
    img.header.set_zooms((1.5, 1.5, 8.0))
    img.set_sform(np.diag([-1.0, -1.0, 1.0, 1.0]), code=2)
    img.set_qform(None, code=0)
    path = tmp_path / "acdc_like.nii.gz"
    nib.save(img, str(path))
    ((_, _, segment_affine, output_affine),) = list(predict.find_inputs(path))
    np.testing.assert_allclose(np.linalg.norm(segment_affine[:3, :3], axis=0), [1.5, 1.5, 8.0])
    written = nib.load(predict.run(params.paths.model, path, tmp_path / "out")["written"][0])
    np.testing.assert_allclose(written.affine, output_affine)
    np.testing.assert_allclose(written.affine, nib.load(str(path)).affine)
    assert written.shape == image.shape

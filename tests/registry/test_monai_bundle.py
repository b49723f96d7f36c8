"""``medseg export-bundle``: the bundle runs with MONAI's own runner and gives medseg predict's mask; MONAI's verify
commands accept it; its preprocessing is medseg's; what cannot be exported is refused in one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.inference.model_folder import fold_dir, update_config
from medseg.registry import monai_bundle

# What MONAI's bundle specification (https://docs.monai.io/en/stable/mb_specification.html) requires of
# metadata.json, written as a JSON schema for `monai.bundle verify_metadata` (the model zoo's own schema is a download,
# and these machines are offline).
IO = {"type": "object", "required": ["type", "format", "num_channels", "spatial_shape", "dtype", "value_range"],
      "properties": {"num_channels": {"type": "integer"}, "spatial_shape": {"type": "array"},
                     "value_range": {"type": "array"}, "is_patch_data": {"type": "boolean"},
                     "channel_def": {"type": "object"}}}
SPEC_SCHEMA = {
    "$schema": "http://json-schema.org/draft-04/schema#", "type": "object",
    "required": ["schema", "version", "monai_version", "pytorch_version", "numpy_version", "task", "description",
                 "authors", "copyright", "network_data_format"],
    "properties": {"version": {"type": "string"}, "changelog": {"type": "object"}, "task": {"type": "string"},
                   "required_packages_version": {"type": "object"}, "eval_metrics": {"type": "object"},
                   "network_data_format": {"type": "object", "required": ["inputs", "outputs"], "properties": {
                       "inputs": {"type": "object", "required": ["image"], "properties": {"image": IO}},
                       "outputs": {"type": "object", "required": ["pred"], "properties": {"pred": IO}}}}},
}


# a network spec's keys that the specs below leave at params.yaml's values
SPEC_DEFAULTS = {"num_res_units": 0, "norm": "instance", "dropout": 0.0, "deep_supervision": False, "encoder": None,
                 "kernel_sizes": None}


def _monai_bundle(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "monai.bundle", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd)


def _medseg(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medseg.cli", *args], capture_output=True, text=True, timeout=300)


def test_monai_runs_the_bundle_to_medseg_predicts_masks_and_its_verify_commands_accept_it(trained, tmp_path):
    from medseg.inference import predict

    params, _ = trained
    model = fold_dir(params.paths.model, 0)
    update_config(model, largest_component=[1, 2, 3])  # the post-processing step goes into the bundle too
    inputs = tmp_path / "in"
    inputs.mkdir()
    for case in sorted((Path(params.paths.ingested) / "images").glob("*.nii.gz"))[:3]:
        shutil.copy(case, inputs / case.name)
    bundle = tmp_path / "bundle"
    done = _medseg("export-bundle", "--model", str(model), "--out", str(bundle))
    assert done.returncode == 0, done.stderr
    assert sorted(json.loads(done.stdout)["files"]) == ["configs/inference.json", "configs/metadata.json",
                                                        "docs/README.md", "models/model.pt"]

    ran = _monai_bundle("run", "--config_file", str(bundle / "configs" / "inference.json"), "--dataset_dir",
                        str(inputs), "--output_dir", str(tmp_path / "monai"), cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr[-3000:]
    predict.run(str(model), inputs, tmp_path / "medseg")
    for case in sorted(inputs.glob("*.nii.gz")):
        stem = case.name.removesuffix(".nii.gz")
        ours, theirs = nib.load(tmp_path / "medseg" / case.name), nib.load(tmp_path / "monai" / f"{stem}_seg.nii.gz")
        a, b = np.asarray(ours.dataobj), np.asarray(theirs.dataobj)
        assert b.shape == a.shape == nib.load(case).shape  # on the input's own grid
        np.testing.assert_allclose(theirs.affine, nib.load(case).affine, atol=1e-4)
        agreement = float((a == b).mean())
        assert agreement >= 0.999, f"{stem}: the bundle's mask agrees with medseg predict's on {agreement:.5f}"

    # MONAI's own checks: the metadata against the bundle specification's required fields, the network's input and
    # output shapes, and the checkpoint loading strictly into the network the config builds (ckpt_export)
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SPEC_SCHEMA))
    meta, config = str(bundle / "configs" / "metadata.json"), str(bundle / "configs" / "inference.json")
    verified = _monai_bundle("verify_metadata", "--meta_file", meta, "--filepath", str(schema))
    assert verified.returncode == 0 and "metadata is verified with no error" in verified.stdout + verified.stderr, \
        verified.stderr[-2000:]
    checked = _monai_bundle("verify_net_in_out", "network_def", "--meta_file", meta, "--config_file", config,
                            "--device", "cpu")
    assert checked.returncode == 0 and "data shape of network is verified with no error" in \
        checked.stdout + checked.stderr, checked.stderr[-2000:]
    exported = _monai_bundle("ckpt_export", "network_def", "--filepath", str(tmp_path / "model.ts"), "--ckpt_file",
                             str(bundle / "models" / "model.pt"), "--meta_file", meta, "--config_file", config)
    assert exported.returncode == 0 and (tmp_path / "model.ts").is_file(), exported.stderr[-2000:]


def _volume(path, seed: int = 0) -> None:
    """Tissue fading into air (no sharp body edge, so where the body crop's threshold lies decides the crop), in an
    LPS-like orientation with anisotropic spacing."""
    rng = np.random.default_rng(seed)
    shape = (48, 40, 12)
    radius = np.sqrt((np.stack(np.meshgrid(*[np.linspace(-2, 2, s) for s in shape], indexing="ij")) ** 2).sum(0))
    image = np.clip(100 - 733 * radius + 5 * rng.standard_normal(shape), -1000, None).astype(np.int16)
    nib.save(nib.Nifti1Image(image, np.diag([-0.9, -1.1, 3.0, 1.0])), path)


@pytest.mark.parametrize("normalization", [{"scheme": "zscore"},
                                           {"scheme": "ct", "clip": [-100.0, 200.0], "mean": 45.0, "std": 30.0}],
                         ids=["zscore", "ct"])
def test_the_bundles_preprocessing_is_medsegs(tmp_path, normalization):
    from monai.bundle import ConfigParser

    from medseg.preprocessing.transforms import IMAGE, preprocess_transforms

    path = tmp_path / "case.nii.gz"
    _volume(path)
    config = {"network": {**SPEC_DEFAULTS, "name": "unet", "spatial_dims": 3, "channels": [4, 8], "strides": [2]},
              "in_channels": 1, "out_channels": 2, "labels": {"0": "background", "1": "organ"}, "modality": "CT",
              "target_spacing": [1.5, 1.5, 2.5], "normalization": {"CT": normalization}, "patch_size": [16, 16, 8],
              "largest_component": False}
    parser = ConfigParser(monai_bundle.inference_config(config, tmp_path))
    parser.parse()
    theirs = parser.get_parsed_content("preprocessing")({"image": str(path)})["image"]
    ours = preprocess_transforms(normalization, config["target_spacing"], keys=[IMAGE])({IMAGE: str(path)})[IMAGE]
    assert tuple(theirs.shape) == tuple(ours.shape)
    np.testing.assert_allclose(np.asarray(theirs.affine), np.asarray(ours.affine), atol=1e-5)
    np.testing.assert_allclose(np.asarray(theirs), np.asarray(ours), atol=1e-3)


@pytest.mark.parametrize("spec", [
    {"name": "unet", "spatial_dims": 3, "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1},
    {"name": "attention_unet", "spatial_dims": 3, "channels": [4, 8, 16], "strides": [2, 2],
     "deep_supervision": True},
    {"name": "dynunet", "spatial_dims": 3, "channels": [4, 8, 16], "strides": [[1, 1, 1], [2, 2, 1], [2, 2, 2]],
     "kernel_sizes": [[3, 3, 1], [3, 3, 3], [3, 3, 3]], "deep_supervision": True},
], ids=["unet", "attention_unet_deep_supervised", "dynunet_deep_supervised"])
def test_every_network_loads_its_exported_weights_into_the_bundles_network_and_gives_the_same_logits(spec, tmp_path):
    import torch
    from monai.bundle import ConfigParser

    from medseg.networks.architectures import build_network, monai_state_dict

    spec = {**SPEC_DEFAULTS, **spec}
    torch.manual_seed(0)
    net = build_network(spec, 1, 3).eval()
    config = {"network": spec, "in_channels": 1, "out_channels": 3, "labels": {"0": "b", "1": "x", "2": "y"},
              "modality": "MR", "target_spacing": [1.0, 1.0, 1.0], "normalization": {"MR": {"scheme": "zscore"}},
              "patch_size": [32, 32, 16]}
    parser = ConfigParser(monai_bundle.inference_config(config, tmp_path))
    parser.parse()
    theirs = parser.get_parsed_content("network_def").eval()
    theirs.load_state_dict(monai_state_dict(net))  # strict: every key, every shape
    x = torch.randn(1, 1, 32, 32, 16)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), net(x))


def test_what_a_bundle_cannot_hold_is_refused_in_one_line(trained, tmp_path):
    params, _ = trained
    shutil.copytree(fold_dir(params.paths.model, 0), fold_dir(params.paths.model, 1))  # two folds, no fold_all
    done = _medseg("export-bundle", "--model", str(params.paths.model), "--out", str(tmp_path / "bundle"))
    assert done.returncode == 2 and "ensemble of 2 networks" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "bundle").exists()
    missing = _medseg("export-bundle", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "bundle"))
    assert missing.returncode == 2 and "model not found" in missing.stderr and "Traceback" not in missing.stderr


def test_the_registered_champion_exports_with_its_cross_validated_dice(trained, tmp_path):
    import mlflow
    import torch

    from medseg.evaluation import evaluate
    from medseg.registry import register

    params, _ = trained
    evaluate.run(params)
    register.run(params)

    client = mlflow.MlflowClient(params.mlflow.tracking_uri)
    (model,) = client.search_registered_models()
    champion = client.get_model_version_by_alias(model.name, "champion")
    summary = monai_bundle.run(f"models:/{model.name}@champion", tmp_path / "bundle", mlflow_params=params.mlflow)
    meta = json.loads((tmp_path / "bundle" / "configs" / "metadata.json").read_text())
    assert meta["eval_metrics"] == {"mean_dice": float(champion.tags["heldout_dice_mean"])}
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "RV",
                                                                             "2": "myocardium", "3": "LV"}
    assert summary["network"] == "monai.networks.nets.UNet"
    saved = torch.load(tmp_path / "bundle" / "models" / "model.pt", weights_only=True)
    trained_weights = torch.load(fold_dir(params.paths.model, 0) / "model.pt", weights_only=True)["state_dict"]
    assert saved.keys() == trained_weights.keys()
    assert all(torch.equal(saved[k], trained_weights[k]) for k in saved)

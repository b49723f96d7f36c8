"""CUDA paths: automatic device choice, AMP training steps and sliding-window inference on the GPU.

Skipped without CUDA (CI has none); run on a GPU machine with ``python -m pytest -m gpu``.
"""

import math

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def tiny_batches(n=3, size=64):
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        image = torch.randn(4, 1, size, size, generator=g)
        yield {"image": image, "label": (image > 0.5).long() + (image > 1.5).long()}


def test_auto_device_is_cuda():
    from medseg.inference.sliding_window import select_device

    assert select_device("auto").type == "cuda"


@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["unet", "attention_unet"])
def test_amp_training_steps_and_inference_on_cuda(name, amp_dtype):
    from monai.losses import DiceCELoss

    from medseg.inference.sliding_window import build_inferer
    from medseg.networks.architectures import build_network
    from medseg.evaluation.postprocessing import class_means
    from medseg.training.loop import train_epoch, validate_cases

    device = torch.device("cuda")
    model = {"name": name, "spatial_dims": 2, "channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 0,
             "norm": "instance", "dropout": 0.0, "kernel_sizes": None, "deep_supervision": False}
    net = build_network(model, 1, 3).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    fp16 = amp_dtype == torch.float16  # bf16 has fp32's range: no loss scaling
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    stats = train_epoch(net, list(tiny_batches()), optimizer, scaler, DiceCELoss(to_onehot_y=True, softmax=True),
                        device, amp_dtype)
    assert stats["steps"] == 3 and math.isfinite(stats["loss"])
    assert scaler.is_enabled() == fp16
    volume = [{"image": torch.randn(1, 1, 80, 72, 5), "label": torch.randint(0, 3, (1, 1, 80, 72, 5))}]
    dice = class_means(validate_cases(net, volume, build_inferer([64, 64, 1], 2, 0.5, 4), 3, device)[0])
    assert dice.shape == (2,)

"""Training-step throughput of the params.yaml network: CPU fp32 against CUDA fp32 and CUDA AMP (when present).

Run by hand: ``python benchmarks/train_step.py [--steps 20]``. Prints patches per second and the ratio to CPU fp32,
all measured in the same run on random patches of ``train.patch_size`` (data loading excluded).
"""

from __future__ import annotations

import argparse
import time

import torch
from monai.losses import DiceCELoss

from medseg.networks import build_network
from medseg.params import load_params
from medseg.train import train_epoch


def patches_per_second(params, device: torch.device, amp: bool, steps: int) -> float:
    t = params.train
    size = [s for s in t.patch_size if s != 1] if params.model.spatial_dims == 2 else list(t.patch_size)
    batch = t.batch_size * t.samples_per_volume
    net = build_network(params.section("model"), 1, 4).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=t.learning_rate)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    image = torch.randn(batch, 1, *size)
    batches = [{"image": image, "label": (image > 0.3).long() + (image > 1).long() + (image > 2).long()}] * steps
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    train_epoch(net, batches[:3], optimizer, scaler, loss, device, amp)  # warm-up (cuDNN autotune, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    train_epoch(net, batches, optimizer, scaler, loss, device, amp)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    params = load_params(args.params)
    runs = [("cpu fp32", torch.device("cpu"), False)]
    if torch.cuda.is_available():
        runs += [("cuda fp32", torch.device("cuda"), False), ("cuda amp", torch.device("cuda"), True)]
    baseline = None
    for name, device, amp in runs:
        rate = patches_per_second(params, device, amp, args.steps if device.type == "cuda" else max(3, args.steps // 4))
        baseline = baseline or rate
        print(f"{name:10s} {rate:10.1f} patches/s   x{rate / baseline:6.1f} vs cpu fp32", flush=True)


if __name__ == "__main__":
    main()

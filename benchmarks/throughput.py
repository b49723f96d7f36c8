"""Learning per CPU-second: optimiser steps per second of medseg's planned 3D network under each free setting, against
the plain 3D loop's network (``tutorial_loop_3d.py``: UNet 16-256, two residual units, batch norm, batch 8).

Run by hand: ``python benchmarks/throughput.py [--plans WORK/plans/plans.json] [--steps 8] [--repeats 3]``
(default: the plan medseg makes for MSD Hippocampus on 2 cores: 3D UNet 32-256, instance norm, patch 32 x 56 x 40,
batch 2). Each setting trains the same random batches (DiceCE, AdamW) in one process, settings interleaved over
``--repeats`` rounds, and reports the median samples per second and, as the peer's crops are larger, the ratio of
voxels per second to the peer's fp32 loop measured in the same run. Throughput is not accuracy: a setting that wins
here still has to win on the yardstick (``benchmarks/accuracy.py --train-variant``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

HIPPOCAMPUS_PLAN = {"patch_size": [32, 56, 40], "batch_size": 2, "network": {
    "name": "unet", "spatial_dims": 3, "channels": [32, 64, 128, 256], "strides": [2, 2, 2], "num_res_units": 0,
    "norm": "instance", "dropout": 0.0, "deep_supervision": False, "encoder": None, "kernel_sizes": None}}


def settings(plan: dict) -> dict[str, dict]:
    """name -> (network spec, patch, batch, bf16 autocast, channels-last) of each setting measured."""
    spec, batch = plan["network"], int(plan["batch_size"])
    patch = [int(p) for p in plan["patch_size"]][: spec["spatial_dims"]]
    batch_norm = {**spec, "norm": "batch"}
    peer = {"name": "unet", "spatial_dims": 3, "channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2],
            "num_res_units": 2, "norm": "batch", "dropout": 0.0, "deep_supervision": False, "encoder": None,
            "kernel_sizes": None}

    def setting(spec: dict, patch: list[int], batch: int, bf16: bool = False, channels_last: bool = False) -> dict:
        return dict(spec=spec, patch=patch, batch=batch, bf16=bf16, channels_last=channels_last)

    return {
        "peer: 3D loop fp32, batch 8": setting(peer, [48, 64, 48], 8),
        f"medseg plan fp32, batch {batch}": setting(spec, patch, batch),
        f"medseg plan bf16, batch {batch}": setting(spec, patch, batch, bf16=True),
        f"medseg plan fp32 channels-last, batch {batch}": setting(spec, patch, batch, channels_last=True),
        "medseg plan fp32, batch 8 batch norm": setting(batch_norm, patch, 8),
        "medseg plan bf16, batch 8 batch norm": setting(batch_norm, patch, 8, bf16=True),
    }


def samples_per_second(spec: dict, patch: list[int], batch: int, bf16: bool, channels_last: bool, steps: int,
                       classes: int = 3) -> float:
    from monai.losses import DiceCELoss

    from medseg.networks.architectures import build_network

    torch.manual_seed(0)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    net = build_network(spec, 1, classes).to(memory_format=fmt)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    image = torch.randn(batch, 1, *patch).contiguous(memory_format=fmt)
    label = torch.randint(0, classes, (batch, 1, *patch))
    times = []
    for step in range(steps + 2):  # two warm-up steps
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(net(image), label)
        loss.backward()
        optimizer.step()
        if step >= 2:
            times.append(time.perf_counter() - started)
    return batch / statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", type=Path, default=None, help="a plans.json of medseg plan (default: Hippocampus)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    plan = json.loads(args.plans.read_text()) if args.plans else HIPPOCAMPUS_PLAN
    measured: dict[str, list[float]] = {}
    todo = settings(plan)
    print(f"{torch.get_num_threads()} threads", flush=True)
    for _ in range(args.repeats):  # interleaved: a noisy minute hits every setting alike
        for name, s in todo.items():
            measured.setdefault(name, []).append(samples_per_second(s["spec"], s["patch"], s["batch"], s["bf16"],
                                                                    s["channels_last"], args.steps))
    # patches differ (the peer crops 48 x 64 x 48): the ratio is of voxels per second, what a budget buys
    voxels = {name: math.prod(s["patch"]) for name, s in todo.items()}
    peer_name = next(iter(measured))
    peer = statistics.median(measured[peer_name]) * voxels[peer_name]
    result = {}
    for name, values in measured.items():
        median = statistics.median(values)
        ratio = median * voxels[name] / peer
        result[name] = {"patch": todo[name]["patch"], "samples_per_s": round(median, 2),
                        "voxels_ratio_to_peer": round(ratio, 2), "runs": [round(v, 2) for v in values]}
        print(f"{name:48s} {median:7.2f} samples/s of {todo[name]['patch']}  x{ratio:.2f} the peer's voxels/s",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps({"threads": torch.get_num_threads(), "steps": args.steps,
                                         "repeats": args.repeats, "settings": result}, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()

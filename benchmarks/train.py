"""Training throughput: medseg's data path against a plain MONAI tutorial-style loop, same network, patch and batch.

Run by hand: ``python benchmarks/train.py [--device cpu|cuda] [--preset small|default] [--epochs 2]``.

Both loops run ``medseg.training.loop.train_epoch`` (the optimiser step ``medseg train`` takes) on the same synthetic
preprocessed volumes with the same augmentation; only the data path differs:

- medseg: ``medseg.training.loaders.make_train_loader`` (cached deterministic prefix with class positions, class-balanced crops,
  ``ThreadDataLoader``, no meta data; crops and augmentation on the GPU with ``--device cuda``);
- peer ("monai-tutorial"): ``Dataset`` + ``DataLoader`` with worker processes, loading every draw, cropping with
  ``RandCropByPosNegLabeld``, as MONAI's segmentation tutorials do without caching.

Prints patches per second, the ratio medseg / peer, and each loop's data-wait fraction (time blocked in
``next(iterator)`` over the epoch; target under 10%).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PRESETS = {
    # volumes, volume shape (x, y, z), patch, patches per step, steps per epoch
    "small": dict(volumes=6, shape=(96, 96, 8), patch=(64, 64, 1), batch=8, steps=8),
    # ACDC-like: resampled cardiac MR around 1.5 x 1.5 x 8 mm, 2D patches, params.yaml's network
    "default": dict(volumes=16, shape=(192, 192, 10), patch=(128, 128, 1), batch=16, steps=16),
    "3d": dict(volumes=6, shape=(128, 128, 64), patch=(64, 64, 32), batch=2, steps=8),
}


def write_volumes(root: Path, count: int, shape: tuple[int, int, int]) -> list[dict]:
    """Synthetic preprocessed volumes: MONAI's test images (discs of 3 classes in noise), z-scored."""
    from monai.data import create_test_image_2d

    from medseg.common.atomic_write import save_nifti

    files = []
    for i in range(count):
        rng = np.random.RandomState(i)
        slices = [create_test_image_2d(shape[0], shape[1], num_objs=6, rad_max=min(shape[:2]) // 8, rad_min=4,
                                       noise_max=0.3, num_seg_classes=3, random_state=rng) for _ in range(shape[2])]
        image = np.stack([s[0] for s in slices], -1).astype(np.float32)
        label = np.stack([s[1] for s in slices], -1).astype(np.uint8)
        image = (image - image.mean()) / image.std()
        affine = np.diag([1.5, 1.5, 8.0, 1.0])
        files.append({"image": str(save_nifti(root / f"img_{i}.nii.gz", image, affine)),
                      "label": str(save_nifti(root / f"lab_{i}.nii.gz", label, affine, dtype=np.uint8)),
                      "case_id": f"case_{i}"})
    return files


def peer_loader(files, plan, train, workers: int):
    """MONAI tutorial style: no cache, worker processes, RandCropByPosNegLabeld; same augmentation as medseg."""
    from monai import transforms as mt
    from monai.data import DataLoader, Dataset

    from medseg.preprocessing.augmentation import augmentation_transforms

    keys, patch = ["image", "label"], tuple(plan.patch_size)
    chain = [
        mt.LoadImaged(keys, image_only=True), mt.EnsureChannelFirstd(keys),
        mt.EnsureTyped("image", dtype=torch.float32), mt.SpatialPadd(keys, spatial_size=patch),
        mt.RandCropByPosNegLabeld(keys, label_key="label", spatial_size=patch, pos=1, neg=1,
                                  num_samples=train.samples_per_volume),
    ]
    if plan.spatial_dims == 2:
        chain.append(mt.SqueezeDimd(keys, dim=-1))
    chain += augmentation_transforms(plan.spatial_dims, train.augmentation)
    chain.append(mt.EnsureTyped("label", dtype=torch.int64))
    volumes_per_step = plan.batch_size // train.samples_per_volume
    sampler = torch.utils.data.RandomSampler(files, replacement=True,
                                             num_samples=train.steps_per_epoch * volumes_per_step)
    return DataLoader(Dataset(files, mt.Compose(chain)), batch_size=volumes_per_step, sampler=sampler,
                      num_workers=workers, persistent_workers=workers > 0)


class Loop:
    """One training loop (network, optimiser, loader) whose epochs are timed one at a time."""

    def __init__(self, name: str, loader, spec: dict, train, device: torch.device) -> None:
        from medseg.networks.architectures import build_loss, build_network
        from medseg.training.loop import amp_settings

        torch.manual_seed(0)
        self.name, self.loader, self.device = name, loader, device
        self.net = build_network(spec, 1, 4).to(device)
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=train.learning_rate,
                                           weight_decay=train.weight_decay)
        self.amp_dtype, scaled = amp_settings(train.amp, device, train.cpu_amp)
        self.scaler = torch.amp.GradScaler(device.type, enabled=scaled)
        self.loss_fn = build_loss(spec)
        self.steps = self.seconds = self.wait = 0.0

    def epoch(self, timed: bool = True) -> None:
        from medseg.training.loop import train_epoch

        stats = train_epoch(self.net, self.loader, self.optimizer, self.scaler, self.loss_fn, self.device,
                            self.amp_dtype)
        if timed:
            self.steps += stats["steps"]
            self.seconds += stats["seconds"]
            self.wait += stats["data_wait_fraction"] * stats["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per loop, after one warm-up epoch")
    parser.add_argument("--samples-per-volume", type=int, default=None, help="default: params train.samples_per_volume")
    parser.add_argument("--peer-workers", type=int, default=min(4, os.cpu_count() or 1))
    args = parser.parse_args()

    import logging

    from medseg.training.loaders import make_train_loader
    from medseg.common.params import load_params
    from medseg.planning.plan import Plan, network_spec, plan_network

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    setting = PRESETS[args.preset]
    params = load_params(args.params)
    device = torch.device(args.device)
    dims = 2 if setting["patch"][2] == 1 else 3
    model = plan_network(params.section("model"), dims, setting["shape"])
    plan = Plan(spatial_dims=dims, target_spacing=(1.5, 1.5, 8.0), patch_size=setting["patch"],
                batch_size=setting["batch"], normalization={"MR": {"scheme": "zscore"}},
                median_shape=setting["shape"], estimated_step_mb=0.0,
                network=network_spec(model, dims, (1.5, 1.5, 8.0), setting["patch"]))
    train = dataclasses.replace(params.train, steps_per_epoch=setting["steps"], cache="memory",
                                samples_per_volume=args.samples_per_volume or params.train.samples_per_volume)
    spec = plan.network
    print(f"preset {args.preset}: {setting['volumes']} volumes {setting['shape']}, {dims}D patch {setting['patch']}, "
          f"{plan.batch_size} patches/step ({train.samples_per_volume} per volume), {train.steps_per_epoch} "
          f"steps/epoch, {args.epochs} timed epochs, {params.model.name} {list(params.model.channels)}, "
          f"device {device}, torch threads {torch.get_num_threads()}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        files = write_volumes(Path(tmp), setting["volumes"], setting["shape"])
        built = time.perf_counter()
        ours = make_train_loader(files, plan, train, 4, device, seed=0, cache_dir=Path(tmp) / "cache")
        print(f"medseg cache built in {time.perf_counter() - built:.2f} s (not in the timings)", flush=True)
        loops = [Loop("medseg", ours, spec, train, device),
                 Loop(f"monai-tutorial ({args.peer_workers} workers)",
                      peer_loader(files, plan, train, args.peer_workers), spec, train, device)]
        for loop in loops:
            loop.epoch(timed=False)  # warm-up: worker start, allocator, cuDNN autotuning
        # Epochs alternate between the loops, so a busy machine slows both alike.
        for _ in range(args.epochs):
            for loop in loops:
                loop.epoch()
    rates = [loop.steps * plan.batch_size / loop.seconds for loop in loops]
    for loop, rate in zip(loops, rates):
        print(f"{loop.name:32s} {rate:8.1f} patches/s   x{rate / rates[1]:5.2f} vs monai-tutorial   "
              f"data wait {100 * loop.wait / loop.seconds:5.1f}% of step time", flush=True)


if __name__ == "__main__":
    main()

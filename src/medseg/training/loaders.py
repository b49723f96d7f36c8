"""Training and validation data loaders: cached deterministic prefix, random patches and augmentation after it.

The training loader follows MONAI's fast-training recipe: the deterministic part of ``train_transforms`` (load, pad,
class positions) is cached once (``CacheDataset`` in RAM, ``PersistentDataset`` on disk, or both when RAM holds only
part of the data set), every random transform runs after the cache on each draw, a ``ThreadDataLoader`` feeds the
network, and meta data is switched off while it iterates. On a GPU with ``augment_on_device`` the cached volumes go to
the GPU and the crop and augmentation run there.

Volumes are drawn with replacement, ``steps_per_epoch`` steps of ``batch_size / samples_per_volume`` volumes each, so
an epoch is the same budget for 8 volumes or 800; each DDP rank draws from its own seeded generator.
``loader_random_state`` / ``set_loader_random_state`` capture and restore every generator the loader uses, so a
resumed run draws exactly the batches the interrupted one would have (between epochs).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.common.errors import StageInputError

__all__ = ["data_lists", "make_train_loader", "worker_init", "make_val_loader", "TrainLoader", "loader_random_state", "set_loader_random_state",
           "estimate_cache_bytes", "available_ram_bytes", "choose_cache", "RAM_FRACTION"]

log = logging.getLogger(__name__)

# Share of the currently available RAM the cache may take: the rest is for the network, the optimiser, batches,
# validation volumes and everything else on the machine.
RAM_FRACTION = 0.5
# Cached bytes per voxel: float32 image (per channel), uint8 label, float32 pixel weights (train.loss unet_weighted).
IMAGE_BYTES, LABEL_BYTES, WEIGHT_BYTES = 4, 1, 4


def available_ram_bytes() -> int:
    """RAM the system can give without swapping (``psutil.virtual_memory().available``)."""
    import psutil

    return int(psutil.virtual_memory().available)


def estimate_cache_bytes(files: Sequence[dict], patch_size: Sequence[int], num_classes: int,
                         weight_map: bool = False) -> int:
    """Bytes the cached prefix of ``train_transforms`` takes for ``files``, from the NIfTI headers alone.

    Each volume is counted at its shape padded to ``patch_size``: a float32 image of each channel (an RGB frame keeps
    its channels after the spatial axes), a uint8 label, with ``weight_map`` the float32 U-Net pixel weights, plus the
    int64 voxel positions kept per class for the crop.
    """
    import nibabel as nib

    from medseg.preprocessing.transforms import MAX_INDICES_PER_CLASS

    total = 0
    for item in files:
        try:
            shape = nib.load(item["image"]).header.get_data_shape()
        except Exception as err:  # nibabel raises several types for missing and malformed files
            raise StageInputError(f"cannot read the NIfTI header of training image {item['image']}: {err}") from err
        voxels = int(np.prod([max(int(s), int(p)) for s, p in zip(shape[:3], patch_size)]))
        per_voxel = IMAGE_BYTES * int(np.prod(shape[3:], dtype=np.int64)) + LABEL_BYTES + WEIGHT_BYTES * weight_map
        # Each voxel is listed under one class at most, and each class keeps at most MAX_INDICES_PER_CLASS.
        total += voxels * per_voxel + min(voxels, num_classes * MAX_INDICES_PER_CLASS) * 8
    return total


def choose_cache(mode: str, needed_bytes: int, available_bytes: int, volumes: int) -> tuple[str, float]:
    """Where the cached prefix lives: ``("memory" | "memory+disk" | "disk" | "none", fraction held in RAM)``.

    ``auto`` takes RAM when the whole data set fits in ``RAM_FRACTION`` of the available memory, RAM for the part that
    fits and disk for the rest when only part does, and disk alone when not even one volume's worth fits.
    """
    if mode == "memory":
        return "memory", 1.0
    if mode in ("disk", "none"):
        return mode, 0.0
    if mode != "auto":
        raise StageInputError(f"params train.cache must be auto, memory, disk or none, got {mode!r}")
    rate = 1.0 if needed_bytes == 0 else min(1.0, RAM_FRACTION * available_bytes / needed_bytes)
    if rate >= 1.0:
        return "memory", 1.0
    return ("memory+disk", rate) if int(rate * volumes) >= 1 else ("disk", 0.0)


def _cache_key(item: dict, signature: str) -> bytes:
    """PersistentDataset file name: the item, the cached chain's settings and the files' size and mtime, so a
    re-preprocessed volume or another patch size never reads a stale cache entry."""
    from monai.data.utils import pickle_hashing

    stats = [(os.stat(item[k]).st_size, os.stat(item[k]).st_mtime_ns) for k in ("image", "label")]
    return pickle_hashing({**item, "stats": stats, "signature": signature})


def _cached_dataset(files: list[dict], prefix, where: str, rate: float, cache_dir: str | Path | None,
                    signature: str):
    from monai.data import CacheDataset, Dataset, PersistentDataset
    from monai.data.utils import json_hashing
    from monai.transforms import Compose

    if where == "none":
        return Dataset(files, prefix)
    if where == "memory":
        return CacheDataset(files, prefix, cache_rate=1.0, num_workers=None, progress=False, copy_cache=False)
    if cache_dir is None:
        raise StageInputError(f"train.cache {where!r} needs a cache directory (params paths.cache)")
    disk = PersistentDataset(files, prefix, cache_dir=cache_dir, hash_transform=json_hashing,
                             hash_func=functools.partial(_cache_key, signature=signature))
    if where == "disk":
        return disk
    # The first ``rate`` of the volumes stay in RAM; the others are read back from their on-disk cache each draw.
    return CacheDataset(disk, Compose([]), cache_rate=rate, num_workers=None, progress=False, copy_cache=False)


class TrainLoader:
    """A ``ThreadDataLoader`` iterated with MONAI's meta data tracking off (restored after each epoch), so the
    training path skips meta data while validation and inference in the same process keep it."""

    def __init__(self, loader, sampler) -> None:
        self.loader, self.sampler = loader, sampler
        self.dataset = loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict]:
        from monai.data import get_track_meta, set_track_meta

        previous = get_track_meta()
        set_track_meta(False)
        try:
            yield from self.loader
        finally:
            set_track_meta(previous)


def worker_init(worker_id: int) -> None:
    """MONAI's per-worker seeding of the random transforms, in a worker process that exits cleanly.

    A forked worker inherits the exit hooks the parent's services registered with ``threading`` (Prefect's log and
    event services, once a flow or ``prefect_test_harness`` ran in the process: PrefectHQ/prefect#19112). They fail
    in a process that never started those services, so the worker's clean exit became exit code 1 and the loader
    raised "DataLoader worker exited unexpectedly". The hooks belong to the parent: the worker drops them.
    """
    import threading

    from monai.data.utils import worker_init_fn

    hooks = getattr(threading, "_threading_atexits", None)  # CPython's list behind threading._register_atexit
    if hooks is not None:
        hooks.clear()
    worker_init_fn(worker_id)


def _cache_place(files: list[dict], plan: Any, train: Any, num_classes: int) -> tuple[str, float]:
    """Where the cached prefix goes (:func:`choose_cache` on the estimate and the RAM available), logged."""
    needed = estimate_cache_bytes(files, plan.patch_size, num_classes, weight_map=train.loss == "unet_weighted")
    available = available_ram_bytes()
    where, rate = choose_cache(train.cache, needed, available, len(files))
    log.info("training cache: %s (train.cache=%s; %.1f MB for %d volumes, %.1f MB RAM available, %.0f%% in RAM)",
             where, train.cache, needed / 2**20, len(files), available / 2**20, 100 * rate)
    if where == "memory" and needed > RAM_FRACTION * available:
        log.warning("train.cache=memory: the cache needs %.1f MB and %.1f MB RAM is available; train.cache=auto "
                    "would keep what does not fit on disk", needed / 2**20, available / 2**20)
    return where, rate


def make_train_loader(files: list[dict], plan: Any, train: Any, num_classes: int, device: torch.device, seed: int,
                      cache_dir: str | Path | None, rank: int = 0, world_size: int = 1,
                      in_channels: int = 1, frames: bool = False) -> TrainLoader:
    """The training loader: ``train.steps_per_epoch`` batches per epoch of ``plan.batch_size`` random patches.

    Args:
        files: ``{"image": path, "label": path, "case_id": id}`` of preprocessed (resampled, normalised) volumes.
        plan: the ``Plan`` (``spatial_dims``, ``patch_size``, ``batch_size`` = patches per optimiser step).
        train: ``params.train`` (``samples_per_volume``, ``steps_per_epoch``, ``cache``, ``num_workers``,
            ``augment_on_device``, ``augmentation``).
        num_classes: label classes including background.
        device: the training device; on CUDA with ``train.augment_on_device`` crops and augmentation run there.
        seed: base seed; combined with ``rank`` so DDP ranks draw different volumes and augmentations.
        cache_dir: where ``PersistentDataset`` writes (``params.paths.cache``) when the cache goes to disk.
        rank, world_size: this process's DDP rank and the number of ranks (each rank yields its own batches).
        in_channels, frames: image channels, and whether the volumes are 2D camera frames
            (:func:`medseg.preprocessing.transforms.train_transforms`).

    Returns:
        An iterable; each epoch yields dicts with "image" float32 ``(B, 1, *patch)`` and "label" int64
        ``(B, 1, *patch)`` (2D: the patch's trailing 1 squeezed), ``B = plan.batch_size``, on ``device`` when
        augmenting there and on the CPU otherwise.
    """
    from monai.data import Dataset, ThreadDataLoader

    from medseg.preprocessing.transforms import MAX_INDICES_PER_CLASS, train_transforms

    if not files:
        raise StageInputError("no training volumes: the training file list is empty")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    per_volume, batch = int(train.samples_per_volume), int(plan.batch_size)
    if per_volume < 1 or batch % per_volume:
        raise StageInputError(f"params train.samples_per_volume ({per_volume}) must be a positive divisor of the "
                              f"planned batch size ({batch} patches per step, plans.json or params plan.batch_size)")
    on_device = device.type == "cuda" and bool(train.augment_on_device)
    cached, random = train_transforms(plan.spatial_dims, plan.patch_size, per_volume, num_classes,
                                      train.augmentation, device=device if on_device else None,
                                      foreground_fraction=train.foreground_fraction,
                                      unet_weights=(train.unet_w0, train.unet_sigma_px)
                                      if train.loss == "unet_weighted" else None, in_channels=in_channels,
                                      frames=frames)

    where, rate = _cache_place(files, plan, train, num_classes)
    signature = repr((tuple(plan.patch_size), num_classes, MAX_INDICES_PER_CLASS))
    dataset = Dataset(_cached_dataset(files, cached, where, rate, cache_dir, signature), random)

    # Per-rank streams from one seed: SeedSequence keeps them independent without hand-made offsets.
    sampler_seed, loader_seed = np.random.SeedSequence([seed, rank, world_size]).generate_state(2)
    volumes_per_step = batch // per_volume
    sampler = torch.utils.data.RandomSampler(
        dataset, replacement=True, num_samples=int(train.steps_per_epoch) * volumes_per_step,
        generator=torch.Generator().manual_seed(int(sampler_seed)))
    # GPU tensors cannot cross process boundaries: augmenting on the device means the loader's own thread does it.
    workers = 0 if on_device else int(train.num_workers)
    loader = ThreadDataLoader(dataset, batch_size=volumes_per_step, sampler=sampler, num_workers=workers,
                              generator=torch.Generator().manual_seed(int(loader_seed)), worker_init_fn=worker_init)
    return TrainLoader(loader, sampler)


def make_val_loader(files: list[dict]):
    """Whole preprocessed volumes, one per batch, with their meta data (``eval_transforms``): ``image`` float32
    ``(1, 1, X, Y, Z)``, ``label`` int64 ``(1, 1, X, Y, Z)``."""
    from monai.data import Dataset, ThreadDataLoader

    from medseg.preprocessing.transforms import eval_transforms

    if not files:
        raise StageInputError("no validation volumes: the validation file list is empty")
    return ThreadDataLoader(Dataset(files, eval_transforms()), batch_size=1, num_workers=0)


def _random_states(transform) -> list[np.random.RandomState]:
    """Every ``RandomState`` in a transform tree, in a fixed order (Compose children, wrapped array transforms)."""
    from monai.transforms import Transform

    found: list[np.random.RandomState] = []
    seen: set[int] = set()

    def walk(obj) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(getattr(obj, "R", None), np.random.RandomState):
            found.append(obj.R)
        for value in vars(obj).values():
            for child in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(child, Transform):
                    walk(child)

    walk(transform)
    return found


def plain_numpy_state(state: tuple) -> tuple:
    """A numpy ``RandomState`` state with its key array as a tensor: loadable with ``torch.load(weights_only=True)``,
    which refuses numpy arrays (unpickling them could run code)."""
    name, key, pos, has_gauss, cached = state
    return (str(name), torch.from_numpy(np.asarray(key, dtype=np.int64)), int(pos), int(has_gauss), float(cached))


def numpy_state(plain: tuple) -> tuple:
    """The inverse of :func:`plain_numpy_state`."""
    name, key, pos, has_gauss, cached = plain
    return name, np.asarray(key, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached


def loader_random_state(loader: TrainLoader) -> dict[str, Any]:
    """Every random generator of a training loader: the volume sampler, the loader's worker seeds and each random
    transform, as tensors and plain types. Take it between epochs (the loader's thread reads ahead within an
    epoch)."""
    return {
        "sampler": loader.sampler.generator.get_state(),
        "loader": loader.loader.generator.get_state(),
        "transforms": [plain_numpy_state(r.get_state()) for r in _random_states(loader.dataset.transform)],
    }


def set_loader_random_state(loader: TrainLoader, state: dict[str, Any]) -> None:
    """Restore ``loader_random_state``'s output into a loader built with the same arguments."""
    states = _random_states(loader.dataset.transform)
    if len(states) != len(state["transforms"]):
        raise ValueError(f"loader state holds {len(state['transforms'])} transform generators but this loader has "
                         f"{len(states)}: it was built with other augmentation or patch settings")
    loader.sampler.generator.set_state(state["sampler"])
    loader.loader.generator.set_state(state["loader"])
    for generator, saved in zip(states, state["transforms"]):
        generator.set_state(numpy_state(saved))


def data_lists(params, fold: int | str | None = None) -> tuple[list[dict], list[dict], Any]:
    """Training and validation ``{"image", "label", "case_id"}`` dicts of ``fold`` (default ``train.fold``), and the
    preprocessed data set.

    ``fold`` is a cross-validation fold number, or :data:`medseg.inference.model_folder.ALL` for the all-data model:
    every labelled case to train on and none to validate on.
    """
    from medseg.inference.model_folder import ALL
    from medseg.preprocessing.preprocess import read_dataset, read_splits

    fold = params.train.fold if fold is None else fold
    dataset = read_dataset(params.paths.preprocessed)
    if fold == ALL:
        split = {"train": sorted(c.case_id for c in dataset.cases), "val": []}
    else:
        split = read_splits(params.paths.preprocessed, int(fold))
    by_id = {c.case_id: c for c in dataset.cases}

    def files(ids: list[str]) -> list[dict]:
        return [{"image": str(dataset.image_path(by_id[i])), "label": str(dataset.label_path(by_id[i])),
                 "case_id": i} for i in ids]

    train_files, val_files = files(split["train"]), files(split["val"])
    if not train_files or (not val_files and fold != ALL):
        raise StageInputError(f"fold {fold} of {params.paths.preprocessed}/splits.json has {len(train_files)} "
                              f"training and {len(val_files)} validation cases; both must be non-empty")
    return train_files, val_files, dataset

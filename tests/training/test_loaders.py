"""The training data path: batch contract, class-balanced patches, cache choice, exact resume, augmentation."""

import dataclasses

import numpy as np
import pytest
import torch
from monai.data import CacheDataset, MetaTensor, PersistentDataset, get_track_meta

from medseg.training import loaders as data
from medseg.common.atomic_write import save_nifti
from medseg.common.errors import StageInputError
from medseg.common.params import load_params
from medseg.planning.plan import Plan
from tests.conftest import REPO, write_tiny_volume

CPU = torch.device("cpu")
NO_AUGMENTATION = dict(rotate_prob=0.0, scale_prob=0.0, flip_prob=0.0, noise_prob=0.0, gamma_prob=0.0,
                       contrast_prob=0.0, blur_prob=0.0, brightness_prob=0.0, lowres_prob=0.0, inverted_gamma_prob=0.0,
                       colour_prob=0.0)


def write_volumes(root, count=3, shape=(40, 36, 5)) -> list[dict]:
    affine = np.diag([1.5, 1.5, 8.0, 1.0])
    files = []
    for i in range(count):
        image, label = write_tiny_volume(i, shape=shape)
        image = (image - image.mean()) / image.std()  # as preprocessed: z-scored
        files.append({"image": str(save_nifti(root / f"img_{i}.nii.gz", image, affine)),
                      "label": str(save_nifti(root / f"lab_{i}.nii.gz", label, affine, dtype=np.uint8)),
                      "case_id": f"case_{i}"})
    return files


def make_plan(dims: int, patch, batch: int) -> Plan:
    return Plan(spatial_dims=dims, target_spacing=(1.5, 1.5, 8.0), patch_size=tuple(patch), batch_size=batch,
                normalization={"MR": {"scheme": "zscore"}}, median_shape=(40, 36, 5), estimated_step_mb=1.0,
                network={"name": "unet", "spatial_dims": dims, "channels": [8, 16, 32], "strides": [2, 2],
                         "kernel_sizes": None, "num_res_units": 0, "norm": "instance", "dropout": 0.0,
                         "deep_supervision": False})


def make_train(augmentation: dict | None = None, **overrides):
    """``params.train`` from the project's params.yaml with small settings."""
    train = load_params(REPO / "params.yaml").train
    values = dict(samples_per_volume=2, steps_per_epoch=3, cache="memory", num_workers=0, seed=0)
    values.update(overrides)
    if augmentation is not None:
        values["augmentation"] = dataclasses.replace(train.augmentation, **augmentation)
    return dataclasses.replace(train, **values)


def epoch(loader) -> list[dict]:
    return list(loader)


@pytest.mark.parametrize(("dims", "patch", "expected"), [(2, (32, 32, 1), (32, 32)), (3, (32, 32, 4), (32, 32, 4))])
def test_batches_have_the_planned_shape_dtype_and_count(tmp_path, dims, patch, expected):
    loader = data.make_train_loader(write_volumes(tmp_path), make_plan(dims, patch, batch=4), make_train(),
                                    num_classes=4, device=CPU, seed=0, cache_dir=tmp_path / "cache")
    for _ in range(2):
        batches = epoch(loader)
        assert len(batches) == 3
        for batch in batches:
            assert batch["image"].shape == (4, 1, *expected) and batch["image"].dtype == torch.float32
            assert batch["label"].shape == (4, 1, *expected) and batch["label"].dtype == torch.int64
            assert set(batch["label"].unique().tolist()) <= {0, 1, 2, 3}


def test_training_iterates_without_meta_data_and_restores_tracking(tmp_path):
    loader = data.make_train_loader(write_volumes(tmp_path, 1), make_plan(2, (32, 32, 1), 2), make_train(),
                                    num_classes=4, device=CPU, seed=0, cache_dir=None)
    assert get_track_meta()
    batch = next(iter(epoch(loader)))
    assert not isinstance(batch["image"], MetaTensor)
    assert get_track_meta()


@pytest.mark.parametrize(("dims", "patch"), [(2, (24, 24, 1)), (3, (24, 24, 4))])
def test_augmentation_never_writes_into_the_cache(tmp_path, dims, patch):
    """Patches are views of the cached volume until a transform copies them: none may modify it in place."""
    every = {k: 1.0 for k in NO_AUGMENTATION}
    loader = data.make_train_loader(write_volumes(tmp_path, 2), make_plan(dims, patch, 4), make_train(every),
                                    num_classes=4, device=CPU, seed=0, cache_dir=None)
    cache = loader.dataset.data._cache
    before = [(item["image"].clone(), item["label"].clone()) for item in cache]
    epoch(loader)
    for (image, label), item in zip(before, cache, strict=True):
        assert torch.equal(image, item["image"]) and torch.equal(label, item["label"])


def test_patches_are_centred_on_each_class_in_turn(tmp_path):
    """Small foreground in a large volume: a uniform crop would rarely see it, the class-balanced crop always does,
    and with nnU-Net's foreground fraction about a third of the patches do."""
    files = write_volumes(tmp_path, 2, shape=(120, 120, 4))
    label = np.asarray(__import__("nibabel").load(files[0]["label"]).dataobj)
    uniform_rate = (label > 0).mean()
    rates = {}
    for fraction in (1.0, 0.33):
        loader = data.make_train_loader(files, make_plan(2, (16, 16, 1), 8), make_train(
            NO_AUGMENTATION, samples_per_volume=1, steps_per_epoch=25, foreground_fraction=fraction),
            num_classes=4, device=CPU, seed=0, cache_dir=None)
        labels = torch.cat([b["label"] for b in epoch(loader)])
        rates[fraction] = (labels.flatten(1) > 0).any(1).float().mean().item()
    assert uniform_rate < 0.1
    assert rates[1.0] == 1.0
    assert 0.2 < rates[0.33] < 0.55  # 200 patches: a third centred on foreground, a few others touching it
    assert set(labels.unique().tolist()) == {0, 1, 2, 3}


def test_auto_cache_takes_ram_when_it_fits_and_disk_when_not(tmp_path, monkeypatch):
    files = write_volumes(tmp_path)
    plan, train = make_plan(2, (32, 32, 1), 2), make_train(cache="auto")
    needed = data.estimate_cache_bytes(files, plan.patch_size, 4)

    monkeypatch.setattr(data, "available_ram_bytes", lambda: 100 * needed)
    loader = data.make_train_loader(files, plan, train, 4, CPU, 0, tmp_path / "ram")
    assert isinstance(loader.dataset.data, CacheDataset) and not (tmp_path / "ram").exists()

    monkeypatch.setattr(data, "available_ram_bytes", lambda: needed // 10)
    loader = data.make_train_loader(files, plan, train, 4, CPU, 0, tmp_path / "disk")
    assert isinstance(loader.dataset.data, PersistentDataset)
    assert len(epoch(loader)) == 3
    assert len(list((tmp_path / "disk").glob("*.pt"))) >= 1

    monkeypatch.setattr(data, "available_ram_bytes", lambda: needed * 4 // 3)  # 2 of the 3 volumes fit
    loader = data.make_train_loader(files, plan, train, 4, CPU, 0, tmp_path / "both")
    assert isinstance(loader.dataset.data, CacheDataset) and isinstance(loader.dataset.data.data, PersistentDataset)
    assert 0 < loader.dataset.data.cache_num < len(files)
    assert len(epoch(loader)) == 3


def test_every_cache_mode_yields_the_same_batches(tmp_path):
    files = write_volumes(tmp_path)
    plan = make_plan(2, (24, 24, 1), 4)
    epochs = {mode: epoch(data.make_train_loader(files, plan, make_train(cache=mode), 4, CPU, 0, tmp_path / mode))
              for mode in ("memory", "disk", "none")}
    for a, b, c in zip(epochs["memory"], epochs["disk"], epochs["none"], strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["image"], c["image"])
        assert torch.equal(a["label"], b["label"]) and torch.equal(a["label"], c["label"])


def test_disk_cache_is_reused_and_renewed_when_a_volume_is_rewritten(tmp_path):
    files = write_volumes(tmp_path, 2)
    plan, train, cache = make_plan(2, (24, 24, 1), 2), make_train(cache="disk", steps_per_epoch=16), tmp_path / "c"
    epoch(data.make_train_loader(files, plan, train, 4, CPU, 0, cache))
    written = sorted(cache.glob("*.pt"))
    assert len(written) == 2
    epoch(data.make_train_loader(files, plan, train, 4, CPU, 0, cache))
    assert sorted(cache.glob("*.pt")) == written
    image, label = write_tiny_volume(7, shape=(40, 36, 5))
    save_nifti(files[0]["image"], image, np.diag([1.5, 1.5, 8.0, 1.0]))
    epoch(data.make_train_loader(files, plan, train, 4, CPU, 0, cache))
    assert len(list(cache.glob("*.pt"))) == 3


def test_cache_estimate_counts_padded_voxels_from_the_headers(tmp_path):
    files = write_volumes(tmp_path, 2, shape=(40, 36, 5))
    voxels = 48 * 48 * 5  # padded to the patch; fewer than 4 classes x 10,000 positions, so all listed
    assert data.estimate_cache_bytes(files, (48, 48, 1), 4) == 2 * voxels * (4 + 1 + 8)
    big = 20_000 * 36 * 5  # more voxels than 2 classes x 10,000 positions
    assert data.estimate_cache_bytes(files, (20_000, 1, 1), 2) == 2 * (big * 5 + 2 * 10_000 * 8)
    with pytest.raises(StageInputError, match="missing.nii.gz"):
        data.estimate_cache_bytes([{"image": str(tmp_path / "missing.nii.gz")}], (8, 8, 1), 2)


def test_cache_estimate_counts_each_colour_channel_and_the_pixel_weights(tmp_path):
    """An RGB frame caches three float32 images; the U-Net loss adds a float32 weight map."""
    frame = save_nifti(tmp_path / "rgb.nii.gz", np.zeros((50, 40, 1, 3), np.float32), np.eye(4))
    files, voxels = [{"image": str(frame)}], 64 * 64 * 1  # padded to the 64x64 patch
    positions = voxels * 8  # every voxel listed (fewer than 2 classes x 10,000)
    assert data.estimate_cache_bytes(files, (64, 64, 1), 2) == voxels * (3 * 4 + 1) + positions
    assert data.estimate_cache_bytes(files, (64, 64, 1), 2, weight_map=True) == voxels * (3 * 4 + 1 + 4) + positions


def test_choose_cache():
    assert data.choose_cache("auto", 10, 100, 4) == ("memory", 1.0)
    assert data.choose_cache("auto", 100, 100, 4) == ("memory+disk", 0.5)
    assert data.choose_cache("auto", 100, 10, 4) == ("disk", 0.0)  # not even one of the 4 volumes fits
    assert data.choose_cache("disk", 1, 10**12, 4) == ("disk", 0.0)
    assert data.choose_cache("memory", 10**12, 1, 4) == ("memory", 1.0)
    with pytest.raises(StageInputError, match="train.cache"):
        data.choose_cache("ram", 1, 1, 4)


def test_samples_per_volume_must_divide_the_batch(tmp_path):
    with pytest.raises(StageInputError, match=r"samples_per_volume \(3\).*batch size \(4"):
        data.make_train_loader(write_volumes(tmp_path, 1), make_plan(2, (32, 32, 1), 4), make_train(
            samples_per_volume=3), 4, CPU, 0, None)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_restored_loader_draws_the_same_batches(tmp_path, workers):
    """With workers, their transform copies are reseeded each epoch from the loader's generator, also restored."""
    files = write_volumes(tmp_path)
    plan = make_plan(2, (24, 24, 1), 4)
    train = make_train({"rotate_prob": 0.5, "scale_prob": 0.5, "noise_prob": 0.5, "gamma_prob": 0.5,
                        "contrast_prob": 0.5}, num_workers=workers)
    original = data.make_train_loader(files, plan, train, 4, CPU, seed=3, cache_dir=None)
    epoch(original), epoch(original)
    state = data.loader_random_state(original)
    third = epoch(original)

    restored = data.make_train_loader(files, plan, train, 4, CPU, seed=3, cache_dir=None)
    data.set_loader_random_state(restored, state)
    again = epoch(restored)
    fresh = epoch(data.make_train_loader(files, plan, train, 4, CPU, seed=3, cache_dir=None))
    assert len(state["transforms"]) >= 8
    for a, b in zip(third, again, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert not torch.equal(third[0]["image"], fresh[0]["image"])  # epoch 3 differs from epoch 1


def test_ranks_draw_different_batches(tmp_path):
    files = write_volumes(tmp_path)
    plan, train = make_plan(2, (24, 24, 1), 2), make_train()
    first, second = (epoch(data.make_train_loader(files, plan, train, 4, CPU, 0, None, rank=r, world_size=2))
                     for r in (0, 1))
    assert not all(torch.equal(a["image"], b["image"]) for a, b in zip(first, second))


@pytest.mark.parametrize(("dims", "patch"), [(2, (24, 24, 1)), (3, (24, 24, 4))])
def test_flip_probability_one_flips_every_axis(tmp_path, dims, patch):
    files = write_volumes(tmp_path)
    plan = make_plan(dims, patch, 2)
    plain, flipped = (epoch(data.make_train_loader(files, plan, make_train(NO_AUGMENTATION | {"flip_prob": p}),
                                                   4, CPU, 0, None)) for p in (0.0, 1.0))
    axes = tuple(range(2, 2 + dims))
    for a, b in zip(plain, flipped, strict=True):
        assert not torch.equal(a["image"], b["image"])
        assert torch.equal(torch.flip(a["image"], axes), b["image"])
        assert torch.equal(torch.flip(a["label"], axes), b["label"])


def test_val_loader_gives_whole_volumes_with_meta(tmp_path):
    files = write_volumes(tmp_path, 2)
    batches = list(data.make_val_loader(files))
    assert len(batches) == 2
    assert batches[0]["image"].shape == (1, 1, 40, 36, 5) and batches[0]["label"].dtype == torch.int64
    assert isinstance(batches[0]["image"], MetaTensor) and batches[0]["image"].affine.shape[-2:] == (4, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_augmentation_runs_on_the_gpu(tmp_path):
    device = torch.device("cuda")
    loader = data.make_train_loader(write_volumes(tmp_path), make_plan(3, (32, 32, 4), 4),
                                    make_train(augment_on_device=True, num_workers=2), 4, device, 0, None)
    assert loader.loader.num_workers == 0
    batches = epoch(loader)
    assert len(batches) == 3
    assert all(b["image"].device.type == "cuda" and b["label"].device.type == "cuda" for b in batches)
    assert batches[0]["image"].shape == (4, 1, 32, 32, 4) and batches[0]["label"].dtype == torch.int64


def test_workers_exit_cleanly_when_the_parent_registered_thread_exit_hooks(tmp_path):
    """Prefect's services register exit hooks with ``threading``; a forked worker inherits them, and one that fails
    there must not turn the worker's exit into a crash of the loader (it did, after any flow ran in the process)."""
    import threading

    def parents_service_hook():
        raise AssertionError("a service this process never started")

    registered = list(threading._threading_atexits)
    threading._register_atexit(parents_service_hook)
    try:
        files = write_volumes(tmp_path)
        loader = data.make_train_loader(files, make_plan(2, (24, 24, 1), 4), make_train({}, num_workers=2), 4, CPU,
                                        seed=3, cache_dir=None)
        assert len(epoch(loader)) == 3 and len(epoch(loader)) == 3
    finally:
        threading._threading_atexits[:] = registered

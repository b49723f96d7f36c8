"""All MONAI transform chains, in one place.

``preprocess_transforms`` is the deterministic geometry and intensity chain shared by the preprocess stage and by
``medseg predict`` (which inverts it with ``Invertd`` to return to the input's geometry). ``train_transforms`` starts
with the cacheable deterministic prefix (load, pad) and puts every random transform after it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from monai import transforms as mt

__all__ = ["ForegroundSelect", "preprocess_transforms", "train_transforms", "eval_transforms", "IMAGE", "LABEL"]

IMAGE, LABEL = "image", "label"


class ForegroundSelect:
    """Voxels above ``fraction`` of the way from the minimum to the 99th percentile: the body, not the air around it.

    A class rather than a lambda so the transform chain pickles (DataLoader workers, caching).
    """

    def __init__(self, fraction: float = 0.05) -> None:
        self.fraction = fraction

    def __call__(self, img):
        x = np.asarray(img)
        lo = float(x.min())
        hi = float(np.percentile(x, 99))
        return x > lo + self.fraction * (hi - lo)


def preprocess_transforms(
    normalization: dict,
    target_spacing: Sequence[float],
    keys: Sequence[str] = (IMAGE, LABEL),
    load: bool = True,
) -> mt.Compose:
    """Orientation to RAS, resampling to ``target_spacing``, crop to the body, normalisation from the plan.

    Args:
        normalization: one modality's entry of ``plans.json``: ``{"scheme": "ct", "clip": [lo, hi], "mean": m,
            "std": s}`` clips HU and z-scores with the data set's foreground statistics; ``{"scheme": "zscore"}``
            z-scores each image by itself (MR, whose intensities have no absolute scale).
        target_spacing: output voxel size in mm (RAS x, y, z).
        keys: image key first, then an optional label key.
        load: prepend ``LoadImaged`` + ``EnsureChannelFirstd`` (paths in); without it the dict holds channel-first
            ``MetaTensor`` volumes that carry their affine.
    """
    keys = list(keys)
    image_key = keys[0]
    modes = ["bilinear"] + ["nearest"] * (len(keys) - 1)
    chain: list = []
    if load:
        chain += [mt.LoadImaged(keys, image_only=True), mt.EnsureChannelFirstd(keys)]
    chain += [
        mt.EnsureTyped(keys[1:], dtype=np.uint8, allow_missing_keys=True) if len(keys) > 1 else mt.Identityd(keys),
        mt.EnsureTyped(image_key, dtype=np.float32),
        mt.Orientationd(keys, axcodes="RAS"),
        mt.Spacingd(keys, pixdim=tuple(target_spacing), mode=modes),
    ]
    scheme = normalization["scheme"]
    if scheme == "ct":
        lo, hi = normalization["clip"]
        chain += [
            mt.ScaleIntensityRanged(image_key, a_min=lo, a_max=hi, b_min=lo, b_max=hi, clip=True),
            mt.CropForegroundd(keys, source_key=image_key, select_fn=ForegroundSelect(), margin=4, allow_smaller=True),
            mt.NormalizeIntensityd(image_key, subtrahend=normalization["mean"], divisor=normalization["std"]),
        ]
    elif scheme == "zscore":
        chain += [
            mt.CropForegroundd(keys, source_key=image_key, select_fn=ForegroundSelect(), margin=4, allow_smaller=True),
            mt.NormalizeIntensityd(image_key),
        ]
    else:
        raise ValueError(f"unknown normalisation scheme {scheme!r} in plans.json (expected 'ct' or 'zscore')")
    return mt.Compose(chain)


def train_transforms(spatial_dims: int, patch_size: Sequence[int], samples_per_volume: int,
                     num_classes: int) -> mt.Compose:
    """Training chain for preprocessed volumes: the deterministic prefix (load, pad) first, so MONAI's
    ``CacheDataset`` caches it, and every random transform after it.

    For ``spatial_dims == 2`` the patch is ``(H, W, 1)`` and its last axis is squeezed: 2D slices of 3D volumes.
    """
    keys = [IMAGE, LABEL]
    cached: list = [
        mt.LoadImaged(keys, image_only=True),
        mt.EnsureChannelFirstd(keys),
        mt.EnsureTyped(IMAGE, dtype=np.float32, track_meta=False),
        mt.EnsureTyped(LABEL, dtype=np.uint8, track_meta=False),
        mt.SpatialPadd(keys, spatial_size=tuple(patch_size)),
    ]
    random: list = [
        mt.RandCropByLabelClassesd(
            keys, label_key=LABEL, spatial_size=tuple(patch_size), num_classes=num_classes,
            num_samples=samples_per_volume, warn=False,
        ),
    ]
    if spatial_dims == 2:
        random.append(mt.SqueezeDimd(keys, dim=-1))
    random += [
        mt.RandAffined(keys, prob=0.3, rotate_range=[0.26] * (1 if spatial_dims == 2 else 3),
                       scale_range=[0.1] * spatial_dims, mode=["bilinear", "nearest"], padding_mode="zeros"),
        mt.RandGaussianNoised(IMAGE, prob=0.15, std=0.1),
        mt.RandAdjustContrastd(IMAGE, prob=0.15, gamma=(0.7, 1.5)),
        mt.RandScaleIntensityd(IMAGE, prob=0.15, factors=0.15),
        mt.EnsureTyped(LABEL, dtype=np.int64),
    ]
    return mt.Compose(cached + random)


def eval_transforms() -> mt.Compose:
    """Load a preprocessed image/label pair for validation and evaluation (no randomness)."""
    keys = [IMAGE, LABEL]
    return mt.Compose([
        mt.LoadImaged(keys, image_only=True),
        mt.EnsureChannelFirstd(keys),
        mt.EnsureTyped(IMAGE, dtype=np.float32),
        mt.EnsureTyped(LABEL, dtype=np.int64),
    ])

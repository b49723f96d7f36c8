"""All MONAI transform chains, in one place.

``preprocess_transforms`` is the deterministic geometry and intensity chain shared by the preprocess stage and by
``medseg predict`` (which inverts it with ``Invertd`` to return to the input's geometry). ``train_transforms`` returns
the cacheable deterministic prefix (load, pad, class positions) and, separately, every random transform after it (the
crop, then :mod:`medseg.preprocessing.augmentation`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai import transforms as mt

__all__ = ["ForegroundSelect", "AxisAlignedSpacingd", "preprocess_transforms", "train_transforms", "eval_transforms",
           "UNetWeightd", "IMAGE", "LABEL", "WEIGHT", "MAX_INDICES_PER_CLASS", "like"]

IMAGE, LABEL = "image", "label"
WEIGHT = "weight"  # the U-Net paper's pixel weights (train.loss: unet_weighted), cropped and moved with the label
# Voxel positions kept per class for the class-balanced crop (nnU-Net keeps 10,000): bounds the cache's size.
MAX_INDICES_PER_CLASS = 10_000


class ZScored(mt.MapTransform):
    """Per-image z-score, as MONAI's ``NormalizeIntensityd()`` (population std; 1 where it is 0), with the mean and
    std summed by numpy: torch's sums round differently with the number of threads reducing them, so a case
    preprocessed on a one-thread Dask worker would differ in the last bit from the same case preprocessed here.
    ``channel_wise``: each channel by its own statistics (RGB frames)."""

    def __init__(self, keys, channel_wise: bool = False, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.channel_wise = channel_wise

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            values = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
            if self.channel_wise:
                shape = (-1,) + (1,) * (values.ndim - 1)
                mean = values.reshape(len(values), -1).mean(axis=1, dtype=np.float64)
                std = values.reshape(len(values), -1).std(axis=1, dtype=np.float64)
                std[std == 0] = 1.0
                d[key] = (image - like(image, mean.reshape(shape))) / like(image, std.reshape(shape))
            else:
                mean, std = float(values.mean(dtype=np.float64)), float(values.std(dtype=np.float64))
                d[key] = (image - mean) / (std or 1.0)
        return d


class ClipIntensityd(mt.MapTransform):
    """Values below ``lo`` become ``lo`` and above ``hi`` become ``hi`` (CT's planned HU window), in one pass. MONAI's
    ``ScaleIntensityRanged`` with equal source and target ranges, used before, maps to the same values (to float32
    rounding) in five passes over the volume: subtract, divide, multiply, add, clip."""

    def __init__(self, keys, lo: float, hi: float, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.lo, self.hi = float(lo), float(hi)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            d[key] = image.clamp(self.lo, self.hi) if isinstance(image, torch.Tensor) else np.clip(image, self.lo,
                                                                                                   self.hi)
        return d


def like(image, values: np.ndarray):
    """``values`` as ``image``'s kind (tensor of its dtype and device, or numpy array of its dtype)."""
    if isinstance(image, torch.Tensor):
        return torch.as_tensor(values, dtype=image.dtype, device=image.device)
    return values.astype(np.asarray(image).dtype)


class UNetWeightd(mt.MapTransform):
    """Add :data:`WEIGHT`, the U-Net paper's pixel weights of ``LABEL`` (:func:`medseg.networks.border_weights.unet_weight_map`),
    channel-first like the label; in 2D per slice along the last axis."""

    def __init__(self, w0: float, sigma: float, spatial_dims: int) -> None:
        super().__init__([LABEL])
        self.w0, self.sigma, self.spatial_dims = w0, sigma, spatial_dims

    def __call__(self, data):
        from medseg.networks.border_weights import unet_weight_map

        d = dict(data)
        label = np.asarray(d[LABEL])[0]
        weight = unet_weight_map(label, self.w0, self.sigma, slice_axis=-1 if self.spatial_dims == 2 else None)
        d[WEIGHT] = torch.from_numpy(weight)[None]
        return d


class ForegroundSelect:
    """Voxels above ``fraction`` of the way from the minimum to the 99th percentile: the body, not the air around it.

    A class rather than a lambda so the transform chain pickles (DataLoader workers, caching).
    """

    def __init__(self, fraction: float = 0.05) -> None:
        self.fraction = fraction

    def __call__(self, img):
        x = np.asarray(img)
        lo = float(x.min())
        # the 99th percentile of every 8th voxel: the same threshold to well within its 5% margin, without copying
        # the whole volume to sort it (seconds of a CT's prediction: benchmarks/README.md)
        hi = float(np.percentile(x.ravel(order="K")[::8], 99))
        return x > lo + self.fraction * (hi - lo)


class AxisAlignedSpacingd(mt.Spacingd):
    """MONAI's ``Spacingd``, with the resampling of a linearly interpolated image done one axis at a time
    (:mod:`medseg.preprocessing.resample`) when its voxel map keeps the axes: an image already in RAS, the usual case after
    ``Orientationd``. It reads the image in its own type and memory order, so an int16 CT is never copied to float32
    at full size first (with MONAI's sampling grid the largest single cost of a CT's prediction: benchmarks/README.md).

    MONAI plans the resampling (lazily: the output affine, shape and traced operation, so ``Invertd`` and
    ``medseg.inference.predict`` invert it as MONAI's own); only the pixels are computed here, as ``grid_sample`` does them
    (``align_corners=False``, border padding) to float32 rounding. Spacing keeps an oblique image's directions, so its
    map keeps the axes too. Anything else is MONAI's ``Spacingd`` unchanged: a call with a nearest-neighbour key (the
    preprocess stage's labels, whose ties ``grid_sample`` breaks by float32 noise), a map that mixes axes, other
    padding, dtype or corners, or nothing to resample. So the preprocess stage's images and predict's inputs are
    resampled by the two codes, which agree to float32 rounding (tests/test_transforms.py).
    """

    def __call__(self, data, lazy: bool | None = None):
        from monai.data import MetaTensor

        from medseg.preprocessing.resample import axis_map, resample_axes

        if (self.lazy if lazy is None else lazy):
            return super().__call__(data, lazy=lazy)
        planned = super().__call__(data, lazy=True)
        out = dict(planned)
        for key in self.key_iterator(planned):
            img, before = planned[key], data[key]
            ops = img.pending_operations if isinstance(img, MetaTensor) else []
            op = ops[0] if len(ops) == 1 and not getattr(before, "pending_operations", None) else None
            info = op.get("extra_info", {}) if op else {}
            axes = axis_map(op["lazy_affine"]) if op else None
            if (axes is None or img.ndim != 4 or info.get("mode") != "bilinear" or info.get("dtype") != "float32"
                    or info.get("padding_mode") != "border" or info.get("align_corners") is not False
                    or (np.allclose(axes[0], 1) and np.allclose(axes[1], 0)
                        and tuple(op["lazy_shape"]) == tuple(img.shape[1:]))):
                return super().__call__(data, lazy=False)
            channels = [resample_axes(channel, *axes, op["lazy_shape"], "bilinear", torch.get_num_threads())
                        for channel in img.as_tensor().detach().cpu().numpy()]
            # one channel (a scan) as a view, keeping its memory order: np.stack would copy it, in C order
            pixels = channels[0][None] if len(channels) == 1 else np.stack(channels)
            done = {k: v for k, v in op.items() if k not in ("lazy_affine", "lazy_shape")} | {"lazy": False}
            out[key] = MetaTensor(torch.from_numpy(pixels), affine=img.peek_pending_affine(),
                                  meta={k: v for k, v in img.meta.items() if k != "affine"},
                                  applied_operations=[*img.applied_operations, done])
        return out


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
            z-scores each image by itself (MR, whose intensities have no absolute scale); ``{"scheme": "imagenet",
            "mean": [...], "std": [...], "max_value": 255}`` maps RGB frames to ``(value / max_value - mean) / std``
            per channel, the statistics an ImageNet-pretrained encoder learnt with.
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
        mt.Orientationd(keys, axcodes="RAS"),
        # float32, not MONAI's float64 default: half the time and memory on a 512x512x300 CT, same labels. The image
        # comes in its own type (int16 CT) and leaves as float32
        AxisAlignedSpacingd(keys, pixdim=tuple(target_spacing), mode=modes, dtype=np.float32),
        mt.EnsureTyped(image_key, dtype=np.float32),
    ]
    scheme = normalization["scheme"]
    if scheme == "ct":
        lo, hi = normalization["clip"]
        chain += [
            ClipIntensityd(image_key, lo, hi),
            mt.CropForegroundd(keys, source_key=image_key, select_fn=ForegroundSelect(), margin=4, allow_smaller=True),
            mt.NormalizeIntensityd(image_key, subtrahend=normalization["mean"], divisor=normalization["std"]),
        ]
    elif scheme == "zscore":
        chain += [
            mt.CropForegroundd(keys, source_key=image_key, select_fn=ForegroundSelect(), margin=4, allow_smaller=True),
            ZScored(image_key, channel_wise=bool(normalization.get("channel_wise", False))),
        ]
    elif scheme == "imagenet":
        scale = float(normalization["max_value"])
        chain += [
            mt.CropForegroundd(keys, source_key=image_key, select_fn=ForegroundSelect(), margin=4, allow_smaller=True),
            mt.NormalizeIntensityd(image_key, subtrahend=[m * scale for m in normalization["mean"]],
                                   divisor=[s * scale for s in normalization["std"]], channel_wise=True),
        ]
    else:
        raise ValueError(f"unknown normalisation scheme {scheme!r} in plans.json (expected 'ct', 'zscore' or "
                         f"'imagenet')")
    return mt.Compose(chain)


def train_transforms(
    spatial_dims: int,
    patch_size: Sequence[int],
    samples_per_volume: int,
    num_classes: int,
    augmentation: Any,
    device: torch.device | str | None = None,
    foreground_fraction: float = 1.0,
    unet_weights: tuple[float, float] | None = None,
    in_channels: int = 1,
    frames: bool = False,
) -> tuple[mt.Compose, mt.Compose]:
    """Training chain for preprocessed volumes, as two parts: the deterministic prefix a cache holds and the random
    rest that runs on every draw.

    The prefix loads the volume channel-first (image float32, label uint8, no meta data), pads it to the patch and
    lists up to ``MAX_INDICES_PER_CLASS`` voxel positions per class, so the crop does not scan the volume each time.
    The random part moves the volume to ``device`` (when given) and crops ``samples_per_volume`` patches: with
    probability ``foreground_fraction`` centred on a labelled (foreground) class, each class equally likely, else
    anywhere in the volume (nnU-Net's foreground oversampling: a third of the patches). Then it augments
    (:func:`medseg.preprocessing.augmentation.augmentation_transforms`).

    Args:
        spatial_dims: 2 crops patches ``(H, W, 1)`` and squeezes the last axis; 3 keeps ``(X, Y, Z)``.
        patch_size: 3 ints, voxels.
        samples_per_volume: patches cropped from one loaded volume (the random part returns a list of that many).
        num_classes: label classes including background.
        augmentation: ``params.train.augmentation`` (``*_prob`` of 0 leaves that transform out).
        device: where the random part runs; ``None`` leaves the tensors where the cache holds them (CPU).
        unet_weights: ``(w0, sigma)``: the prefix also computes the U-Net paper's pixel weights (:data:`WEIGHT`),
            which every crop, resampling and flip then moves with the label.
        in_channels: image channels (3 for RGB frames, stored channels-last).
        frames: the volumes are 2D camera frames (RGB or gray): augmentation leaves out
            ``augmentation.skip_for_frames``.

    Returns:
        ``(cached, random)``: apply ``cached`` to ``{"image": path, "label": path}``, then ``random`` to its output,
        which gives ``samples_per_volume`` dicts with "image" float32 and "label" int64, each ``(1, *patch)``.
    """
    from medseg.preprocessing.augmentation import augmentation_transforms  # it builds on this module's keys

    keys = [IMAGE, LABEL] + ([WEIGHT] if unet_weights else [])
    patch = tuple(int(s) for s in patch_size)
    indices_key = f"{LABEL}_cls_indices"
    cached = _cached_prefix(keys, patch, num_classes, unet_weights, spatial_dims, in_channels)
    random: list = []
    if device is not None:
        random.append(mt.EnsureTyped(keys, device=torch.device(device), track_meta=False))
    random.append(_crop(keys, patch, num_classes, samples_per_volume, foreground_fraction, indices_key))
    random.append(mt.DeleteItemsd(indices_key))
    if spatial_dims == 2:
        random.append(mt.SqueezeDimd(keys, dim=-1))
    random += augmentation_transforms(spatial_dims, augmentation, patch, extra_keys=keys[2:], frames=frames)
    random.append(mt.EnsureTyped(LABEL, dtype=torch.int64, track_meta=False))
    return cached, mt.Compose(random)


def _cached_prefix(keys: list[str], patch: tuple[int, ...], num_classes: int, unet_weights, spatial_dims: int,
                   in_channels: int) -> mt.Compose:
    """Load channel-first (image float32, label uint8, no meta data), the U-Net pixel weights if asked, pad to the
    patch, list each class's voxel positions."""
    return mt.Compose([
        mt.LoadImaged([IMAGE, LABEL], image_only=True),
        # Preprocessed volumes are 3D without a channel, an image with several channels has them last (RGB frames:
        # medseg.preprocessing.preprocess): said explicitly, so the prefix also works without meta data.
        mt.EnsureChannelFirstd(IMAGE, channel_dim="no_channel" if in_channels == 1 else -1),
        mt.EnsureChannelFirstd(LABEL, channel_dim="no_channel"),
        mt.EnsureTyped(IMAGE, dtype=torch.float32, track_meta=False),
        mt.EnsureTyped(LABEL, dtype=torch.uint8, track_meta=False),
        *([UNetWeightd(*unet_weights, spatial_dims)] if unet_weights else []),
        mt.SpatialPadd(keys, spatial_size=patch),
        mt.ClassesToIndicesd(LABEL, num_classes=num_classes, max_samples_per_class=MAX_INDICES_PER_CLASS),
    ])


def _crop(keys: list[str], patch: tuple[int, ...], num_classes: int, samples: int, foreground_fraction: float,
          indices_key: str):
    """``samples`` patches: with probability ``foreground_fraction`` centred on a labelled class (each equally
    likely), else anywhere."""
    foreground = mt.RandCropByLabelClassesd(
        keys, label_key=LABEL, spatial_size=patch, num_classes=num_classes, num_samples=samples,
        # background only as the fallback for a volume without any labelled voxel (MONAI divides by the ratios' sum)
        indices_key=indices_key, ratios=[1e-9] + [1.0] * (num_classes - 1), warn=False,
    )
    anywhere = mt.RandSpatialCropSamplesd(keys, roi_size=patch, num_samples=samples, random_size=False)
    if foreground_fraction >= 1.0:
        return foreground
    if foreground_fraction <= 0.0:
        return anywhere
    return mt.OneOf([foreground, anywhere], weights=[foreground_fraction, 1.0 - foreground_fraction])


def eval_transforms() -> mt.Compose:
    """Load a preprocessed image/label pair for validation and evaluation (no randomness; meta data kept)."""
    keys = [IMAGE, LABEL]
    return mt.Compose([
        mt.LoadImaged(keys, image_only=True),
        mt.EnsureChannelFirstd(keys),
        mt.EnsureTyped(IMAGE, dtype=np.float32),
        mt.EnsureTyped(LABEL, dtype=np.int64),
    ])

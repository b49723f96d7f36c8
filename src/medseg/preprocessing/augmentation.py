"""nnU-Net v2's default data augmentation as MONAI transforms, configured by ``params.train.augmentation``: the random
part of training's chain after the crop (:func:`medseg.preprocessing.transforms.train_transforms`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from monai import transforms as mt

from medseg.preprocessing.transforms import IMAGE, LABEL, like

__all__ = ["augmentation_transforms", "rotation_range_deg", "RandColourShiftd"]


class RandColourShiftd(mt.RandomizableTransform, mt.MapTransform):
    """With probability ``prob``, shift each channel of a multi-channel (RGB) image by its own offset, uniform in
    +-``offset`` (images are z-scored per channel: 0.2 standard deviations): the hue and white-balance differences
    between endoscopes and centres. A one-channel image is left alone (brightness has its own transform)."""

    def __init__(self, keys, prob: float, offset: float = 0.2) -> None:
        mt.RandomizableTransform.__init__(self, prob)
        mt.MapTransform.__init__(self, keys)
        self.offset = offset

    def __call__(self, data):
        d = dict(data)
        self.randomize(None)
        for key in self.key_iterator(d):
            image = d[key]
            if not self._do_transform or image.shape[0] < 2:
                continue
            shifts = self.R.uniform(-self.offset, self.offset, size=image.shape[0])
            d[key] = image + like(image, shifts.reshape((-1,) + (1,) * (image.ndim - 1)))
        return d


def rotation_range_deg(spatial_dims: int, patch_size: Sequence[int], a: Any) -> float:
    """The largest rotation angle: ``rotate_range_deg``, or when null nnU-Net's rule: the full circle in-plane for
    2D patches that are near square (longest side at most 1.5x the shortest), 15 degrees for other 2D patches,
    30 degrees about each axis in 3D."""
    if a.rotate_range_deg is not None:
        return float(a.rotate_range_deg)
    if spatial_dims == 3:
        return 30.0
    sides = [int(s) for s in patch_size[:2]]
    return 180.0 if max(sides) <= 1.5 * min(sides) else 15.0


def augmentation_transforms(spatial_dims: int, a: Any, patch_size: Sequence[int] = (1, 1, 1),
                            extra_keys: Sequence[str] = (), frames: bool = False) -> list:
    """nnU-Net v2's default augmentation as MONAI transforms on channel-first patches, in nnU-Net's order, from
    ``params.train.augmentation``; a probability of 0 leaves the transform out.

    Rotation (see :func:`rotation_range_deg`) and scaling, Gaussian noise (variance up to 0.1), Gaussian blur
    (sigma 0.5-1), multiplicative brightness (0.75-1.25), contrast (0.75-1.25, range kept), simulated low resolution
    (down to half), gamma (0.7-1.5) on the inverted and on the plain image (statistics kept), a colour shift per
    channel for RGB frames (:class:`RandColourShiftd`), mirroring per axis.
    ``extra_keys`` (pixel weights) move with the label: nearest-neighbour resampling, the same flips.
    ``frames`` (2D camera frames, not scans): the transforms named in ``a.skip_for_frames`` are left out.
    """
    if frames and a.skip_for_frames:
        a = dataclasses.replace(a, **{f"{name}_prob": 0.0 for name in a.skip_for_frames})
    keys = [IMAGE, LABEL, *extra_keys]
    nearest = ["nearest"] * (len(keys) - 1)
    linear = "bilinear" if spatial_dims == 2 else "trilinear"
    angle = math.radians(rotation_range_deg(spatial_dims, patch_size, a))
    chain: list = []
    if a.rotate_prob > 0:
        ranges = {"range_x": angle} if spatial_dims == 2 else {"range_x": angle, "range_y": angle, "range_z": angle}
        chain.append(mt.RandRotated(keys, prob=a.rotate_prob, mode=["bilinear", *nearest], padding_mode="zeros",
                                    keep_size=True, **ranges))
    if a.scale_prob > 0:
        lo, hi = a.scale_range
        chain.append(mt.RandZoomd(keys, prob=a.scale_prob, min_zoom=lo, max_zoom=hi, mode=[linear, *nearest],
                                  padding_mode="constant", keep_size=True))
    if a.noise_prob > 0:
        chain.append(mt.RandGaussianNoised(IMAGE, prob=a.noise_prob, std=math.sqrt(0.1)))
    if a.blur_prob > 0:
        sigma = {f"sigma_{axis}": (0.5, 1.0) for axis in "xyz"[:spatial_dims]}
        chain.append(mt.RandGaussianSmoothd(IMAGE, prob=a.blur_prob, **sigma))
    if a.brightness_prob > 0:
        chain.append(mt.RandScaleIntensityd(IMAGE, prob=a.brightness_prob, factors=0.25))
    if a.contrast_prob > 0:
        # nnU-Net's contrast: scale about the mean, clipped to the patch's original range.
        chain.append(mt.RandScaleIntensityFixedMeand(IMAGE, prob=a.contrast_prob, factors=0.25, preserve_range=True))
    if a.lowres_prob > 0:
        chain.append(mt.RandSimulateLowResolutiond(IMAGE, prob=a.lowres_prob, zoom_range=(0.5, 1.0),
                                                    upsample_mode=linear))
    if a.inverted_gamma_prob > 0:
        chain.append(mt.RandAdjustContrastd(IMAGE, prob=a.inverted_gamma_prob, gamma=(0.7, 1.5), invert_image=True,
                                            retain_stats=True))
    if a.gamma_prob > 0:
        chain.append(mt.RandAdjustContrastd(IMAGE, prob=a.gamma_prob, gamma=(0.7, 1.5), retain_stats=True))
    if a.colour_prob > 0:
        chain.append(RandColourShiftd(IMAGE, prob=a.colour_prob))
    if a.flip_prob > 0:
        chain += [mt.RandFlipd(keys, prob=a.flip_prob, spatial_axis=axis) for axis in range(spatial_dims)]
    return chain

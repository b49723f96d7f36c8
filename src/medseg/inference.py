"""Sliding-window inference shared by validation, evaluation and ``medseg predict``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.inferers import Inferer, SliceInferer, SlidingWindowInferer

__all__ = ["build_inferer", "select_device"]


def select_device(requested: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is an error, not a silent fallback."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    return torch.device(requested)


def build_inferer(patch_size: Sequence[int], spatial_dims: int, overlap: float, sw_batch_size: int) -> Inferer:
    """Gaussian-blended sliding windows over ``(B, C, X, Y, Z)`` volumes.

    For 2D networks ``patch_size`` is ``(H, W, 1)``: MONAI's ``SliceInferer`` runs the sliding window on each axial
    slice (the last axis) and restacks, so 2D and 3D models take the same 3D input.
    """
    if spatial_dims == 2:
        return SliceInferer(roi_size=tuple(patch_size[:2]), spatial_dim=2, sw_batch_size=sw_batch_size,
                            overlap=overlap, mode="gaussian", progress=False)
    return SlidingWindowInferer(roi_size=tuple(patch_size), sw_batch_size=sw_batch_size, overlap=overlap,
                                mode="gaussian")

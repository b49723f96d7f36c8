"""Post-processing after the network: keep each class's largest connected component, and decide from
cross-validation for which classes that helps (nnU-Net's ``determine_postprocessing``).

Its own module so that editing it does not touch what shaped the weights: train's resume digest leaves this code out
(a finished checkpoint is re-validated with the new post-processing instead of retrained).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from medseg.metrics import finite

__all__ = ["keep_largest_component", "class_means", "decide_postprocessing"]


def keep_largest_component(labels: np.ndarray | torch.Tensor, classes: Sequence[int]) -> np.ndarray | torch.Tensor:
    """Keep only the largest connected component of each class in ``classes``; the rest becomes background (0).

    Classes are independent (MONAI ``KeepLargestConnectedComponent(independent=True)``), with full connectivity
    (26-neighbourhood in 3D) as MONAI's default. Done with ``scipy.ndimage.label`` on the CPU, as MONAI's version needs
    scikit-image.

    Args:
        labels: ``(1, *spatial)`` integer label map (numpy or torch; returned as the same type, device and dtype).
    """
    from scipy import ndimage

    is_tensor = isinstance(labels, torch.Tensor)
    array = labels.detach().cpu().numpy().copy() if is_tensor else np.array(labels, copy=True)
    structure = ndimage.generate_binary_structure(array.ndim, array.ndim)
    boxes = ndimage.find_objects(array)  # every class's bounding box in one pass (integer labels, any width)
    for c in classes:
        if c < 1 or c > len(boxes) or boxes[c - 1] is None:
            continue
        box = boxes[c - 1]
        region = array[box] == c  # label only the class's bounding box: much cheaper than the whole volume
        components, n = ndimage.label(region, structure=structure)
        if n < 2:
            continue
        largest = np.argmax(np.bincount(components.ravel())[1:]) + 1
        array[box][region & (components != largest)] = 0
    return torch.as_tensor(array, device=labels.device) if is_tensor else array


def class_means(rows: np.ndarray) -> np.ndarray:
    """Mean per class over cases (columns) of ``rows``, ignoring NaN (which :mod:`medseg.metrics`' rule no longer
    gives: a class absent from both sides scores 1)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a class absent from every case: NaN, as DiceMetric
        return np.nanmean(rows, axis=0)


def decide_postprocessing(raw: np.ndarray, post: np.ndarray, labels: dict[int, str]) -> dict[str, Any]:
    """nnU-Net's ``determine_postprocessing`` per class: keep the largest connected component of a class only where
    that raises the class's mean cross-validation Dice (``raw``/``post``: per case and foreground class)."""
    classes = sorted(labels)[1:]
    without, with_ = class_means(raw), class_means(post)
    keep = [c for c, a, b in zip(classes, without, with_) if np.isfinite(a) and np.isfinite(b) and b > a]
    names = [labels[c] for c in classes]
    return {"largest_component": keep, "cases": int(raw.shape[0]),
            "dice_without": {n: finite(v) for n, v in zip(names, without)},
            "dice_with": {n: finite(v) for n, v in zip(names, with_)}}



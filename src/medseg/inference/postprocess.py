"""Post-processing after the network: keep each class's largest connected component (for the classes that
:mod:`medseg.evaluation.postprocessing` chose from cross-validation).

Its own module so that editing it does not touch what shaped the weights: train's resume digest leaves this code out
(a finished checkpoint is re-validated with the new post-processing instead of retrained).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["keep_largest_component"]


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

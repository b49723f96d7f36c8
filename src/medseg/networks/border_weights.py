"""The U-Net paper's pixel weights (Ronneberger et al. 2015, eq. 2), for ``train.loss: unet_weighted``.

``w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))``: ``w_c`` balances the class frequencies of the mask
(each present class weighs the same in total; the map's mean is 1), and on background pixels the second term
emphasises the thin gaps between touching objects (``d1``, ``d2``: distances to the nearest and the second-nearest
object, objects being the connected components of the labelled foreground). The paper's ``w0 = 10`` and ``sigma``
about 5 pixels are the defaults. Computed once per mask, in 2D per slice (the data cache keeps it, as the paper
precomputes it), by :class:`medseg.preprocessing.transforms.UNetWeightd`.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["unet_weight_map", "MAX_OBJECTS"]

MAX_OBJECTS = 64  # per slice: the largest objects count for the gap term (a distance map each)


def _class_balance(label: np.ndarray) -> np.ndarray:
    values, counts = np.unique(label, return_counts=True)
    weights = np.zeros(int(values.max()) + 1, dtype=np.float64)
    weights[values] = label.size / (len(values) * counts)
    return weights[label]


def _gap_term(label: np.ndarray, w0: float, sigma: float) -> np.ndarray:
    objects, count = ndimage.label(label > 0)
    if count < 2:
        return np.zeros(label.shape, dtype=np.float64)
    if count > MAX_OBJECTS:
        sizes = np.bincount(objects.ravel())[1:]
        keep = np.argsort(sizes)[::-1][:MAX_OBJECTS] + 1
    else:
        keep = np.arange(1, count + 1)
    nearest = np.full(label.shape, np.inf)
    second = np.full(label.shape, np.inf)
    for value in keep:
        distance = ndimage.distance_transform_edt(objects != value)
        second = np.minimum(second, np.maximum(nearest, distance))
        nearest = np.minimum(nearest, distance)
    gap = w0 * np.exp(-((nearest + second) ** 2) / (2.0 * sigma ** 2))
    return np.where(label == 0, gap, 0.0)


def unet_weight_map(label: np.ndarray, w0: float = 10.0, sigma: float = 5.0, slice_axis: int | None = None
                    ) -> np.ndarray:
    """float32 weights of ``label`` (integer labels, any spatial shape); with ``slice_axis`` each 2D slice along it
    on its own (2D training: gaps and class balance as the network's patches see them)."""
    label = np.asarray(label).astype(np.int64)
    if slice_axis is not None:
        moved = np.moveaxis(label, slice_axis, -1)
        out = np.stack([unet_weight_map(moved[..., k], w0, sigma) for k in range(moved.shape[-1])], axis=-1)
        return np.moveaxis(out, -1, slice_axis)
    return (_class_balance(label) + _gap_term(label, w0, sigma)).astype(np.float32)

"""Which classes keep only their largest connected component: decided per class from cross-validation (nnU-Net's
``determine_postprocessing``); the operation itself is :func:`medseg.inference.postprocess.keep_largest_component`.

Like :mod:`medseg.inference.postprocess`, outside the code that shapes the weights: train's resume digest leaves it out
(a finished checkpoint is re-validated with the new decision instead of retrained).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medseg.evaluation.metrics import finite

__all__ = ["class_means", "decide_postprocessing"]


def class_means(rows: np.ndarray) -> np.ndarray:
    """Mean per class over cases (columns) of ``rows``, ignoring NaN (which :mod:`medseg.evaluation.metrics`' rule no longer
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



"""Scores of a label map against the truth on its own grid, numpy and scipy only (no torch): Dice and HD95 per
class, and patient-level bootstrap confidence intervals. Used by ``register``'s promotion gate and by the accuracy
yardstick (``benchmarks/accuracy.py``), so both score alike.

Conventions: a class absent from both the prediction and the truth scores Dice 1 and HD95 0; absent from only one, Dice 0 and HD95 undefined (None).
"""

from __future__ import annotations

import numpy as np

__all__ = ["surface", "hd95", "score_case", "bootstrap", "finite", "RESAMPLES"]

RESAMPLES = 2000


def finite(x: float | None) -> float | None:
    """A score as stored in JSON and CSV: rounded to 4 decimals, or None when undefined (NaN, inf, None)."""
    return None if x is None or not np.isfinite(x) else round(float(x), 4)


def surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside it (the array's border counts as outside)."""
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, ndimage.generate_binary_structure(mask.ndim, 1), border_value=0)


def hd95(pred: np.ndarray, truth: np.ndarray, spacing) -> float:
    """95th-percentile symmetric Hausdorff distance (mm) between the surfaces of two non-empty masks.

    As MONAI's ``compute_hausdorff_distance(percentile=95)``: the larger of the two directed 95th percentiles.
    """
    from scipy import ndimage

    sp, st = surface(pred), surface(truth)
    to_truth = ndimage.distance_transform_edt(~st, sampling=spacing)[sp]
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)[st]
    return float(max(np.percentile(to_truth, 95), np.percentile(to_pred, 95)))


def score_case(pred: np.ndarray, truth: np.ndarray, classes: dict[int, str], spacing) -> dict[str, dict]:
    """``{class name: {"dice", "hd95"}}`` for each foreground class (conventions in the module docstring)."""
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} is not the original grid {truth.shape}")
    out = {}
    for value, name in classes.items():
        p, t = pred == value, truth == value
        if not p.any() and not t.any():
            out[name] = {"dice": 1.0, "hd95": 0.0}
        elif not p.any() or not t.any():
            out[name] = {"dice": 0.0, "hd95": None}
        else:
            dice = 2.0 * np.count_nonzero(p & t) / (np.count_nonzero(p) + np.count_nonzero(t))
            out[name] = {"dice": float(dice), "hd95": hd95(p, t, spacing)}
    return out


def bootstrap(groups: list[list[float]], resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float, float]:
    """Mean of all values and its percentile 95% CI, resampling the groups (patients) with replacement.

    A patient's values (cases x classes) move together, so the CI reflects patient-to-patient variation.
    """
    sums = np.array([np.sum(g) for g in groups], dtype=np.float64)
    counts = np.array([len(g) for g in groups], dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(groups), size=(resamples, len(groups)))
    means = sums[idx].sum(1) / counts[idx].sum(1)
    return float(sums.sum() / counts.sum()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))

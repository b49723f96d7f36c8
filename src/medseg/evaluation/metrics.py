"""The one Dice and the one HD95 of medseg, numpy and scipy only (no torch), and patient-level bootstrap CIs.

Every score medseg reports comes from here: training's validation (on the training grid, to choose post-processing
and draw the curves), ``evaluate`` (the held-out cases, on their original grids, from the predictions it writes),
``register`` (the registry's held-out score is ``evaluate``'s), the promotion gate and the accuracy yardstick
(``benchmarks/accuracy.py``), so the same prediction gets the same number everywhere.

The rule for a class, per case (as MONAI's ``compute_dice(ignore_empty=False)`` and the frame benchmarks' smoothed
Dice; nnU-Net instead leaves such a class out of the mean):

- absent from both the reference and the prediction: Dice 1 (nothing to find, nothing found), HD95 0;
- absent from only one: Dice 0, HD95 undefined (None: no surface to measure to); means of HD95 leave it out and
  reports count it;
- otherwise ``2|P & T| / (|P| + |T|)``, and HD95 as MONAI's ``compute_hausdorff_distance(percentile=95)``.

A mean Dice is the mean over cases of each class's Dice, then over classes; every case counts in every class.
"""

from __future__ import annotations

import numpy as np

__all__ = ["dice", "dice_per_class", "surface", "hd95", "score_case", "bootstrap", "finite", "RESAMPLES"]

RESAMPLES = 2000


def finite(x: float | None) -> float | None:
    """A score as stored in JSON and CSV: rounded to 4 decimals, or None when undefined (NaN, inf, None)."""
    return None if x is None or not np.isfinite(x) else round(float(x), 4)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks of one shape, by the module's rule (1.0 when both are empty)."""
    p, t = np.count_nonzero(pred), np.count_nonzero(truth)
    if p == 0 and t == 0:
        return 1.0
    return 2.0 * np.count_nonzero(pred & truth) / (p + t)


def dice_per_class(pred: np.ndarray, truth: np.ndarray, classes) -> np.ndarray:
    """Dice of each label value in ``classes`` between two label maps of one shape, by the module's rule."""
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} is not the reference's {truth.shape}")
    return np.array([dice(pred == c, truth == c) for c in classes], dtype=np.float64)


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
    """``{class name: {"dice", "hd95"}}`` for each foreground class ``{value: name}`` (the module's rule); ``spacing``
    in mm per axis of the arrays."""
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} is not the reference's {truth.shape}")
    out = {}
    for value, name in classes.items():
        p, t = pred == value, truth == value
        if not p.any() and not t.any():
            out[name] = {"dice": 1.0, "hd95": 0.0}
        elif not p.any() or not t.any():
            out[name] = {"dice": 0.0, "hd95": None}
        else:
            out[name] = {"dice": float(dice(p, t)), "hd95": hd95(p, t, spacing)}
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

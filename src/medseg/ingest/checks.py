"""Checks every case passes before it is written: 3D finite image, label on the image's grid, integer label values.

A failed check raises :class:`~medseg.ingest.common.CaseRejected`; nothing is ever resampled or repaired silently.
"""

from __future__ import annotations

import numpy as np

from medseg.ingest.common import CaseRejected

__all__ = ["TRANSLATION_TOL_MM", "LINEAR_TOL", "CT_MIN_THRESHOLD", "as_3d", "check_image", "checked_image",
           "check_label", "check_affine", "affine_mismatch", "spacing_of", "guess_modality"]

TRANSLATION_TOL_MM = 1e-3  # label vs image origin, absolute, mm
LINEAR_TOL = 1e-4  # label vs image rotation/zoom part of the affine, absolute
CT_MIN_THRESHOLD = -500.0  # an image whose minimum is below this is taken as CT (HU), else MR


def as_3d(array: np.ndarray, what: str = "image") -> np.ndarray:
    """Drop trailing singleton axes beyond the third; reject anything that is not then 3D.

    Args:
        array: the volume as read.
        what: "image" or "label", for the reason.
    """
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 4:
        raise CaseRejected(f"4D {what} {tuple(array.shape)} where a 3D volume is expected "
                           f"({array.shape[-1]} volumes or channels; only 3D single-modality images are ingested)")
    if array.ndim != 3:
        raise CaseRejected(f"{array.ndim}D {what} {tuple(array.shape)} where a 3D volume is expected")
    if min(array.shape) < 1:
        raise CaseRejected(f"empty {what} {tuple(array.shape)}")
    return array


def check_image(image: np.ndarray) -> None:
    """Reject images with NaN or infinite voxels."""
    if np.issubdtype(image.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(image)))
        if bad:
            raise CaseRejected(f"image has {bad} NaN/inf voxels")


# voxel sizes outside this range (mm) are not a scan's: a header's garbage (a zero, 1e30) that no resampling survives
SPACING_RANGE_MM = (1e-4, 1e4)


def check_affine(affine) -> None:
    """Reject a voxel-to-world affine no resampling can use: NaN or infinite entries, a voxel size outside
    :data:`SPACING_RANGE_MM`, or axes that are (nearly) parallel (a flat voxel)."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise CaseRejected("image geometry unusable: its affine holds NaN or infinite values")
    spacing = np.linalg.norm(a[:3, :3], axis=0)
    lo, hi = SPACING_RANGE_MM
    if np.any(spacing < lo) or np.any(spacing > hi):
        raise CaseRejected(f"image geometry unusable: voxel size {tuple(float(f'{s:.4g}') for s in spacing)} mm")
    if abs(np.linalg.det(a[:3, :3])) < 1e-3 * float(np.prod(spacing)):
        raise CaseRejected("image geometry unusable: its voxel axes are (nearly) parallel")


def checked_image(array, channels: int | None = None, affine=None) -> np.ndarray:
    """The checks every image passes, in ingest and in ``medseg predict`` alike: 3D (:func:`as_3d`), or 3D with a
    trailing axis of ``channels`` (an RGB frame), finite (:func:`check_image`), and with ``affine`` a usable
    geometry (:func:`check_affine`)."""
    if affine is not None:
        check_affine(affine)
    array = np.asarray(array)
    if channels:
        if array.ndim != 4 or array.shape[-1] != channels:
            raise CaseRejected(f"image of shape {tuple(array.shape)} where (X, Y, Z, {channels}) is expected")
        as_3d(array[..., 0], "image")
        image = array
    else:
        image = as_3d(array, "image")
    check_image(image)
    return image


def affine_mismatch(a: np.ndarray, b: np.ndarray, translation_tol: float = TRANSLATION_TOL_MM,
                    linear_tol: float = LINEAR_TOL) -> str | None:
    """Describe how two 4x4 affines differ beyond tolerance, or None when they match."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    dt = float(np.abs(a[:3, 3] - b[:3, 3]).max())
    dl = float(np.abs(a[:3, :3] - b[:3, :3]).max())
    if dt > translation_tol:
        return f"origin differs by {dt:.4g} mm (tolerance {translation_tol:g})"
    if dl > linear_tol:
        return f"orientation/spacing differ by {dl:.4g} (tolerance {linear_tol:g})"
    return None


def check_label(label: np.ndarray, label_affine: np.ndarray, image_shape: tuple[int, ...], image_affine: np.ndarray,
                allowed: set[int] | None) -> np.ndarray:
    """Check a label volume against its image and return it as uint8.

    Args:
        label: label volume (X, Y, Z), any numeric dtype.
        label_affine: its 4x4 affine.
        image_shape: the image's (X, Y, Z).
        image_affine: the image's 4x4 affine.
        allowed: label values of the label map; None accepts any value 0-255.

    Raises:
        CaseRejected: shape or affine differ, values are not integers, or a value is outside the label map.
    """
    label = as_3d(np.asarray(label), "label")
    if tuple(label.shape) != tuple(image_shape):
        raise CaseRejected(f"label shape {tuple(label.shape)} != image shape {tuple(image_shape)}")
    diff = affine_mismatch(label_affine, image_affine)
    if diff:
        raise CaseRejected(f"label affine does not match the image affine: {diff}")
    if np.issubdtype(label.dtype, np.floating):
        if not np.all(np.isfinite(label)) or not np.array_equal(label, np.round(label)):
            raise CaseRejected("label has non-integer values")
    values = {int(v) for v in np.unique(label)}
    outside = sorted(v for v in values if v < 0 or v > 255 or (allowed is not None and v not in allowed))
    if outside:
        known = "0-255" if allowed is None else sorted(allowed)
        raise CaseRejected(f"label values {outside[:10]} are not in the label map {known}")
    return label.astype(np.uint8)


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel spacing in mm: the norms of the affine's first three columns."""
    norms = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return tuple(round(float(n), 6) for n in norms)


def guess_modality(image: np.ndarray) -> str:
    """"CT" when the image minimum is below -500 (Hounsfield units), else "MR"."""
    return "CT" if float(np.min(image)) < CT_MIN_THRESHOLD else "MR"

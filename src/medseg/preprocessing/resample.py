"""Resampling whose voxel map keeps the axes, one axis at a time.

Spacing an image that is already in RAS orientation maps each output axis to the same input axis, scaled and shifted:
``source = scale * index + offset``. Linear interpolation then separates into one 1D interpolation per axis, and
nearest neighbour into one index array per axis, so neither needs MONAI's full-volume sampling grid (three floats per
output voxel, then ``grid_sample``: seconds and most of a gigabyte for a CT, benchmarks/README.md), nor a float copy of the whole
input first. The volume is done plane by plane along its slowest memory axis, into one output array, on a few threads.

Conventions are ``grid_sample``'s with ``align_corners=False`` and ``padding_mode="border"``, as MONAI's ``Spacing``
uses them: voxel centres at integer indices, a position outside the input clamped to its edge, ties of nearest
neighbour rounded to even.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__ = ["axis_map", "nearest_index", "resample_axes"]


def axis_map(voxel_map: np.ndarray, tolerance: float = 1e-6) -> tuple[np.ndarray, np.ndarray] | None:
    """``(scale, offset)`` per axis of a homogeneous ``voxel_map`` (output voxel -> input voxel) that keeps the
    axes, or None when it mixes or swaps them (an oblique or permuted resampling)."""
    m = np.asarray(voxel_map, dtype=np.float64)
    n = m.shape[0] - 1
    scale = np.diag(m)[:n].copy()
    if np.any(scale <= 0) or np.abs(m[:n, :n] - np.diag(scale)).max() > tolerance * np.abs(scale).max():
        return None
    return scale, m[:n, n].copy()


def _positions(scale: float, offset: float, n_out: int, n_in: int) -> np.ndarray:
    """Where each output voxel falls on the input axis, clamped to its edge voxels (border padding)."""
    return np.clip(scale * np.arange(n_out, dtype=np.float64) + offset, 0, n_in - 1)


def nearest_index(scale: float, offset: float, n_out: int, n_in: int) -> np.ndarray:
    """The input index nearest to each output voxel along one axis."""
    return np.rint(_positions(scale, offset, n_out, n_in)).astype(np.intp)


def _linear(scale: float, offset: float, n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output voxel: the input index below, the one above (the edge voxel at the edge) and the weight of the one
    above."""
    at = _positions(scale, offset, n_out, n_in)
    below = np.floor(at).astype(np.intp)
    return below, np.minimum(below + 1, n_in - 1), (at - below).astype(np.float32)


def _blend(a: np.ndarray, b: np.ndarray, w: np.ndarray | float, out: np.ndarray | None = None) -> np.ndarray:
    """``a + (b - a) * w`` in float32 (``w`` broadcast), into ``out`` when given."""
    diff = np.subtract(b, a, dtype=np.float32)
    diff *= w
    return np.add(diff, a, out=out, dtype=np.float32, casting="unsafe")


def resample_axes(volume: np.ndarray, scale: Sequence[float], offset: Sequence[float], shape: Sequence[int],
                  mode: str = "bilinear", threads: int = 1, dtype: type = np.float32, order: str = "K") -> np.ndarray:
    """``volume`` (3 axes, any numeric type and memory order) resampled to ``shape``: output voxel ``i`` along axis
    ``a`` takes the input at ``scale[a] * i + offset[a]`` (clamped to the volume), by ``mode`` "bilinear" (linear
    along each axis: trilinear) or "nearest".

    The result has ``dtype`` (float32 like MONAI's resampling; "nearest" may keep an integer type) and memory
    ``order``: "K" the input's (a Fortran-ordered NIfTI volume stays Fortran-ordered), "F" or "C" (a label map
    that NIfTI stores in Fortran order: made so here, plane by plane, it costs nibabel no transposed copy).
    ``threads`` planes are computed at once.
    """
    if volume.ndim != 3 or len(shape) != 3:
        raise ValueError(f"resample_axes takes a 3D volume and shape, got {volume.shape} -> {tuple(shape)}")
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"mode {mode!r}: 'bilinear' or 'nearest'")
    if order not in ("K", "F", "C"):
        raise ValueError(f"order {order!r}: 'K', 'F' or 'C'")
    # the output's slowest-varying axis first: one output plane at a time (with "K", whole input planes are read)
    axes = {"C": [0, 1, 2], "F": [2, 1, 0]}.get(order) or \
        [int(a) for a in np.argsort([-abs(s) for s in volume.strides], kind="stable")]
    source = volume.transpose(axes)
    sizes = [int(shape[a]) for a in axes]
    maps = [(float(scale[a]), float(offset[a]), int(shape[a]), volume.shape[a]) for a in axes]
    out = np.empty(sizes, dtype=dtype)

    if mode == "nearest":
        idx = [nearest_index(*m) for m in maps]

        def plane(k: int) -> None:
            out[k] = np.take(np.take(source[idx[0][k]], idx[1], axis=0), idx[2], axis=1)
    else:
        (lo0, hi0, w0), (lo1, hi1, w1), (lo2, hi2, w2) = (_linear(*m) for m in maps)
        w1 = w1[:, None]

        def plane(k: int) -> None:
            p = _blend(source[lo0[k]], source[hi0[k]], w0[k]) if w0[k] else source[lo0[k]].astype(np.float32)
            rows = _blend(p[lo1], p[hi1], w1)
            _blend(rows[:, lo2], rows[:, hi2], w2, out=out[k])

    chunks = np.array_split(np.arange(sizes[0]), max(1, min(int(threads), sizes[0])))

    def run(ks: np.ndarray) -> None:
        for k in ks:
            plane(int(k))

    if len(chunks) == 1:
        run(chunks[0])
    else:
        with ThreadPoolExecutor(len(chunks), thread_name_prefix="resample") as pool:
            list(pool.map(run, chunks))  # list(): a worker's exception is raised here
    return out.transpose(np.argsort(axes))

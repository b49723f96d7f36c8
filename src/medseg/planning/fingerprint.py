"""Dataset fingerprint: what the ingested data is, measured once, as nnU-Net's experiment planning does.

Per case: spacing and shape in RAS axis order (x, y, z), whatever the voxel order on disk. Per modality: intensity
statistics of the labelled foreground (a fixed-size random sample per case, so a 300-slice CT weighs no more than a
cardiac slice stack). ``medseg.planning.plan`` turns this into ``plans.json``.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from medseg.common.manifest import Manifest

__all__ = ["fingerprint", "ras_geometry", "FINGERPRINT_NAME", "SAMPLES_PER_CASE"]

log = logging.getLogger(__name__)

FINGERPRINT_NAME = "fingerprint.json"
SAMPLES_PER_CASE = 10_000  # foreground voxels per case for the intensity statistics (nnU-Net samples 10,000 too)


def ras_geometry(affine: np.ndarray, shape: tuple[int, ...]) -> tuple[list[float], list[int]]:
    """Spacing (mm) and shape reordered to the RAS axes (x, y, z) the preprocessing reorients to.

    ``Orientationd("RAS")`` permutes voxel axes to the world axis each is closest to; the same permutation is applied
    here, from the affine alone.
    """
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)  # row i: world axis that voxel axis i maps to
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    spacing, size = [0.0] * 3, [0] * 3
    for voxel_axis, (world_axis, _) in enumerate(ornt[:3]):
        spacing[int(world_axis)] = round(float(zooms[voxel_axis]), 6)
        size[int(world_axis)] = int(shape[voxel_axis])
    return spacing, size


def _intensity_stats(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {}
    p005, p50, p995 = np.percentile(values, [0.5, 50.0, 99.5])
    return {"mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()),
            "max": float(values.max()), "median": float(p50), "percentile_00_5": float(p005),
            "percentile_99_5": float(p995)}


def fingerprint(manifest: Manifest, seed: int = 0) -> dict[str, Any]:
    """Measure every labelled case of ``manifest``.

    Returns ``{"cases": [{"case_id", "modality", "spacing", "shape", "foreground_fraction"}],
    "modalities": {modality: {"cases": n, "foreground_intensity": {...}}}, "labels": {...}}``, with spacing and
    shape in RAS axis order.
    """
    import nibabel as nib

    rng = np.random.default_rng(seed)
    samples: dict[str, list[np.ndarray]] = defaultdict(list)
    cases = []
    for case in manifest.cases:
        if case.label is None:
            continue
        image = nib.load(str(manifest.image_path(case)))
        label = np.asarray(nib.load(str(manifest.label_path(case))).dataobj)
        foreground = np.asarray(image.dataobj, dtype=np.float32)[label > 0].ravel()  # (N) or (N, channels)
        if foreground.size > SAMPLES_PER_CASE:
            foreground = rng.choice(foreground, SAMPLES_PER_CASE, replace=False)
        samples[case.modality].append(foreground)
        spacing, shape = ras_geometry(image.affine, image.shape[:3])
        cases.append({"case_id": case.case_id, "modality": case.modality, "spacing": spacing, "shape": shape,
                      "foreground_fraction": round(float((label > 0).mean()), 6)})
    modalities = {
        modality: {"cases": len(parts), "foreground_intensity": _intensity_stats(np.concatenate(parts))}
        for modality, parts in sorted(samples.items())
    }
    log.info("fingerprint of %d labelled cases: %s", len(cases), {m: v["cases"] for m, v in modalities.items()})
    return {"cases": cases, "modalities": modalities,
            "labels": {str(k): v for k, v in sorted(manifest.labels.items())}}


def read_fingerprint(folder: str | Path) -> dict[str, Any]:
    from medseg.common.atomic_write import read_json

    return read_json(Path(folder) / FINGERPRINT_NAME)

"""Plan stage: from the dataset fingerprint to ``plans.json``, the training configuration the data calls for.

Rules after nnU-Net's experiment planner, kept few and explicit:

- target spacing: the median spacing of the data set, per RAS axis;
- 2D (slice-wise) when the slices are more than 4x thicker than the in-plane spacing, else 3D;
- patch size: the median resampled shape, shrunk on its relatively largest axis until one training step with at
  least two patches fits ``plan.memory_budget_mb``, rounded to what the network's downsampling needs;
- batch size: as many patches as the budget holds, at least 2, at most what covers 5% of the data set's voxels;
- network depth and width (``model.channels: null``): resolution levels until the median shape's smallest axis is
  down to ``MIN_FEATURE_MAP``-``2 * MIN_FEATURE_MAP`` voxels (at most ``MAX_LEVELS``), ``model.base_channels`` filters
  at full resolution, doubling per level up to ``model.max_channels`` (nnU-Net: 32, up to 512 in 2D and 320 in 3D);
- DynUNet topology (per-axis strides and kernels): an axis is downsampled only while it is at most twice as coarse as
  the finest axis and its feature map stays at least 4 voxels; kernels are 1 on axes still much coarser than that;
- normalisation per modality: CT is clipped to the 0.5-99.5 foreground percentiles and z-scored with the foreground
  mean and standard deviation of the whole data set; MR and others get a per-image z-score, per channel for RGB;
- 2D frames (RGB, GRAY: :mod:`medseg.ingest.images`): the target spacing is coarsened from the median until a whole
  median frame fits one patch of the budget, so large frames are downscaled to a planned size (aspect kept) and the
  network sees the whole field of view, as endoscopy models do;
- pretrained encoder (``model.encoder: auto``): 2D RGB frames get MONAI's ``FlexibleUNet`` on ImageNet
  EfficientNet-Lite0 when its weights are installed (:mod:`medseg.networks.pretrained_weights`; otherwise one line says so and the
  network trains from scratch), with ImageNet's normalisation. The frame size is planned as above (the scratch
  U-Net's budget), the batch is at least ``BATCH_NORM_MIN_BATCH`` frames: the encoder's batch norm, as the polyp
  models train it (PraNet 16, segmentation_models_pytorch's examples 8).

Every planned value can be overridden in ``params.yaml`` (section ``plan``); ``plans.json`` records both. The network
and patch rules live in :mod:`medseg.planning.network_plan`; this module composes the plan and runs the stage.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.common.atomic_write import atomic_dir, read_json, write_json
from medseg.common.errors import StageInputError
from medseg.common.manifest import FRAME_MODALITIES
from medseg.planning.network_plan import (MIN_BATCH, check_network_current, dynunet_topology, estimate_step_mb,
                                          fit_frames, fit_patch, network_spec, patch_divisor, plan_network,
                                          resolve_encoder)
from medseg.common.params import Params

__all__ = ["Plan", "run", "make_plan", "read_plan", "plan_network", "network_spec", "check_network_current",
           "dynunet_topology", "estimate_step_mb", "PLANS_NAME"]

log = logging.getLogger(__name__)

PLANS_NAME = "plans.json"
ANISOTROPY_RATIO = 4.0  # thicker than this many times the in-plane spacing: 2D (ACDC ~6.5, MSD pancreas ~3.1)
MAX_BATCH_FRACTION = 0.05  # of the data set's voxels in one batch (nnU-Net)
BATCH_NORM_MIN_BATCH = 8
# EfficientNet's expanded (6x) blocks keep more activations than the decoder's channels say: a Lite0 FlexibleUNet
# step on 256 x 192 RGB frames peaked at 2x the scratch U-Net's memory per frame (measured on the CPU, fp32)
ENCODER_MEMORY_FACTOR = 2.0
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "max_value": 255.0}


@dataclass(frozen=True)
class Plan:
    """What ``plans.json`` holds; every field is either planned from the data or overridden in params.

    ``network`` is the NETWORK SPEC (:mod:`medseg.common.network_spec`) train builds: the ``model`` params section with
    depth, width, strides (and DynUNet's per-axis strides and kernels) planned. It is planned once, here.
    """

    spatial_dims: int
    target_spacing: tuple[float, float, float]
    patch_size: tuple[int, int, int]
    batch_size: int
    normalization: dict[str, dict[str, Any]]
    median_shape: tuple[int, int, int]
    estimated_step_mb: float
    network: dict[str, Any]
    overridden: tuple[str, ...] = ()

    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(self.network["channels"])


def _plan_normalization(fingerprint: dict[str, Any], ct_clip, encoder: str | None = None) -> dict[str, dict[str, Any]]:
    plans = {}
    for modality, info in fingerprint["modalities"].items():
        stats = info["foreground_intensity"]
        if modality.upper() == "CT":
            if not stats:
                raise StageInputError("CT cases have no labelled foreground to plan the intensity clip from")
            lo, hi = ct_clip or (stats["percentile_00_5"], stats["percentile_99_5"])
            plans[modality] = {"scheme": "ct", "clip": [float(lo), float(hi)], "mean": stats["mean"],
                               "std": max(stats["std"], 1e-6)}
        elif modality == "RGB" and encoder is not None:  # the statistics the encoder learnt ImageNet with
            plans[modality] = {"scheme": "imagenet", **IMAGENET}
        elif modality in FRAME_MODALITIES:
            plans[modality] = {"scheme": "zscore", "channel_wise": modality == "RGB"}
        else:
            plans[modality] = {"scheme": "zscore"}
    return plans


def _resampled(cases: list[dict[str, Any]], target) -> np.ndarray:
    """Each fingerprinted case's shape at the ``target`` spacing (voxels, RAS axes)."""
    return np.array([[sh * sp / t for sh, sp, t in zip(c["shape"], c["spacing"], target)] for c in cases])


def make_plan(fingerprint: dict[str, Any], params: Params) -> Plan:
    """Derive the plan from ``fingerprint`` (see the module docstring), then apply ``params.plan`` overrides."""
    overrides, model = params.plan, params.section("model")
    cases = fingerprint["cases"]
    if not cases:
        raise StageInputError("the fingerprint has no labelled cases to plan from")
    spacings = np.array([c["spacing"] for c in cases], dtype=float)
    target = tuple(float(s) for s in (overrides.target_spacing or np.median(spacings, axis=0)))
    anisotropic = target[2] > ANISOTROPY_RATIO * max(target[0], target[1])
    spatial_dims = overrides.spatial_dims or (2 if anisotropic else 3)
    median_shape = tuple(int(round(s)) for s in np.median(_resampled(cases, target), axis=0))
    frames = all(c["modality"] in FRAME_MODALITIES for c in cases)
    encoder, note = resolve_encoder(model, spatial_dims, fingerprint["modalities"])
    if note:
        log.warning("plan: %s", note)
    if frames and spatial_dims == 2 and overrides.target_spacing is None and overrides.patch_size is None:
        target, median_shape = fit_frames(model, target, median_shape, params.plan.memory_budget_mb)
    resampled = _resampled(cases, target)
    if encoder is not None:  # the frame size is the scratch U-Net's (above); the whole frame is the patch
        scratch = plan_network(model, spatial_dims, median_shape)
        div = patch_divisor(plan_network(model, spatial_dims, median_shape, encoder), spatial_dims, target, median_shape)
        frame = [max(d, math.ceil(p / d) * d) for p, d in zip(fit_patch(scratch, spatial_dims, target, median_shape,
                                                                         params.plan.memory_budget_mb), div)]
    model = plan_network(model, spatial_dims, median_shape, encoder)
    if overrides.patch_size is not None:
        patch = list(overrides.patch_size)
    else:
        patch = frame if encoder is not None else fit_patch(model, spatial_dims, target, median_shape,
                                                             params.plan.memory_budget_mb)
        patch = patch + [1] * (3 - spatial_dims)
    if spatial_dims == 3 and patch[2] == 1:
        raise StageInputError(f"patch size {patch} is a 2D patch but the plan is 3D: set plan.spatial_dims: 2 "
                              f"(or give a 3D plan.patch_size)")
    div = patch_divisor(model, spatial_dims, target, patch)
    bad = [a for a in range(spatial_dims) if patch[a] % div[a]]
    if bad:
        raise StageInputError(f"patch size {patch} is not divisible by {div} on axis {bad[0]}: the network "
                              f"downsamples by that much (plan.patch_size, model.strides)")
    if spatial_dims == 2 and patch[2] != 1:
        raise StageInputError(f"a 2D plan needs a patch ending in 1, got {patch} (plan.patch_size)")
    one_patch = estimate_step_mb(model, spatial_dims, target, patch, 1) * (ENCODER_MEMORY_FACTOR if encoder else 1.0)
    if overrides.batch_size is not None:
        batch = overrides.batch_size
    else:
        total_voxels = float(np.prod(resampled, axis=1).sum())
        cap = max(MIN_BATCH, int(MAX_BATCH_FRACTION * total_voxels / math.prod(patch)))
        batch = int(min(cap, max(MIN_BATCH, params.plan.memory_budget_mb // one_patch)))
        if encoder is not None:
            batch = max(batch, BATCH_NORM_MIN_BATCH)
    overridden = tuple(k for k in ("target_spacing", "spatial_dims", "patch_size", "batch_size", "ct_clip")
                       if getattr(overrides, k) is not None)
    return Plan(spatial_dims=spatial_dims, target_spacing=target, patch_size=tuple(int(p) for p in patch),
                batch_size=batch, normalization=_plan_normalization(fingerprint, overrides.ct_clip, encoder),
                median_shape=median_shape, estimated_step_mb=round(one_patch * batch, 1),
                network=_with_weights(network_spec(model, spatial_dims, target, patch), model),
                overridden=overridden)


def _with_weights(spec: dict[str, Any], model: dict[str, Any]) -> dict[str, Any]:
    """The spec with the planned encoder weights' SHA-256 (train refuses another file)."""
    from medseg.networks.pretrained_weights import file_sha256, weights_file

    if spec.get("encoder") is None:
        return spec
    return {**spec, "encoder_sha256": file_sha256(weights_file(spec["encoder"], model.get("encoder_weights")))}


def read_plan(folder: str | Path) -> Plan:
    """The plan that ``medseg plan`` wrote into ``folder`` (``paths.plans``)."""
    path = Path(folder) / PLANS_NAME
    if not path.is_file():
        raise StageInputError(f"{path} not found: run 'medseg plan' (or 'dvc repro') first")
    raw = read_json(path)
    return Plan(spatial_dims=int(raw["spatial_dims"]), target_spacing=tuple(raw["target_spacing"]),
                patch_size=tuple(raw["patch_size"]), batch_size=int(raw["batch_size"]),
                normalization=raw["normalization"], median_shape=tuple(raw["median_shape"]),
                estimated_step_mb=float(raw["estimated_step_mb"]), network=raw["network"],
                overridden=tuple(raw["overridden"]))


def run(params: Params) -> dict:
    """Fingerprint the ingested data and write ``fingerprint.json`` and ``plans.json`` into ``paths.plans``."""
    from medseg.planning.fingerprint import FINGERPRINT_NAME, fingerprint
    from medseg.common.manifest import read_manifest, locked_subjects

    manifest = read_manifest(params.paths.ingested)
    channels = {c.channels for c in manifest.cases}
    if len(channels) > 1:
        raise StageInputError(f"the ingested cases mix {sorted(channels)} image channels (RGB and grayscale frames); "
                              f"one model takes one number of channels: ingest them as separate data sets")
    locked = set(locked_subjects(manifest.cases, params.preprocess.test_cases, params.preprocess.test_fraction,
                               params.preprocess.seed))
    if locked:  # the locked test set is never planned on (intensity statistics, spacing, shape)
        manifest = dataclasses.replace(manifest, cases=tuple(c for c in manifest.cases if c.subject not in locked))
    prints = fingerprint(manifest, seed=params.preprocess.seed)
    plan = make_plan(prints, params)
    with atomic_dir(params.paths.plans) as out:
        write_json(out / FINGERPRINT_NAME, prints)
        write_json(out / PLANS_NAME, {**asdict(plan), "memory_budget_mb": params.plan.memory_budget_mb})
    log.info("plan: %dD, spacing %s, patch %s, batch %d, channels %s%s (~%.0f MB per step)", plan.spatial_dims,
             plan.target_spacing, plan.patch_size, plan.batch_size, list(plan.channels),
             f", pretrained encoder {plan.network['encoder']}" if plan.network.get("encoder") else "",
             plan.estimated_step_mb)
    return {"spatial_dims": plan.spatial_dims, "target_spacing": list(plan.target_spacing),
            "patch_size": list(plan.patch_size), "batch_size": plan.batch_size, "channels": list(plan.channels),
            "encoder": plan.network.get("encoder"), "overridden": list(plan.overridden)}

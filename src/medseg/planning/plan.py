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

Every planned value can be overridden in ``params.yaml`` (section ``plan``); ``plans.json`` records both.
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
from medseg.common.network_spec import encoder_channels, level_strides, required_divisor, validate_spec
from medseg.common.params import Params

__all__ = ["Plan", "run", "make_plan", "read_plan", "plan_network", "network_spec", "check_network_current",
           "dynunet_topology", "estimate_step_mb", "PLANS_NAME"]

log = logging.getLogger(__name__)

PLANS_NAME = "plans.json"
ANISOTROPY_RATIO = 4.0  # thicker than this many times the in-plane spacing: 2D (ACDC ~6.5, MSD pancreas ~3.1)
MIN_FEATURE_MAP = 4
MAX_LEVELS = 7
MIN_BATCH = 2
MAX_BATCH_FRACTION = 0.05  # of the data set's voxels in one batch (nnU-Net)
# Bytes one voxel of one feature channel costs in a training step: the activations kept for the backward pass
# (convolution, normalisation and activation outputs in encoder and decoder, fp32) and their gradients.
BYTES_PER_FEATURE_VOXEL = 4 * 12
BATCH_NORM_MIN_BATCH = 8
DEFAULT_ENCODER = "efficientnet-lite0"
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


SPEC_KEYS = ("name", "num_res_units", "norm", "dropout", "deep_supervision")  # taken from params as given


def resolve_encoder(model: dict[str, Any], spatial_dims: int, modalities) -> tuple[str | None, str | None]:
    """``(encoder or None, a note to log or None)`` for ``model.encoder`` on data of these modalities.

    ``auto``: the default encoder for 2D RGB frames when its weights are found and ``model.channels`` is null (set
    channels ask for a U-Net of one's own), else none (with a note saying why, when the data would have used it);
    ``none``: none; a named encoder: it, or :class:`StageInputError` when the
    data is not 2D RGB or its weights are not found.
    """
    from medseg.networks.pretrained_weights import INSTALL_HINT, weights_file

    choice = model.get("encoder", "none")
    if choice in (None, "none") or (choice == "auto" and model.get("channels") is not None):
        return None, None
    rgb = spatial_dims == 2 and set(modalities) == {"RGB"}
    encoder = DEFAULT_ENCODER if choice == "auto" else choice
    found = rgb and weights_file(encoder, model.get("encoder_weights")) is not None
    if choice == "auto":
        if found:
            return encoder, None
        return None, (f"no ImageNet weights for {encoder} found ({INSTALL_HINT}): training from scratch"
                      if rgb else None)
    if not rgb:
        raise StageInputError(f"model.encoder {encoder} takes 2D RGB frames; this data is "
                              f"{spatial_dims}D {'/'.join(sorted(modalities))} (set model.encoder: auto or none)")
    if not found:
        raise StageInputError(f"model.encoder {encoder}: weights not found ({INSTALL_HINT})")
    return encoder, None


def network_spec(model: dict[str, Any], spatial_dims: int, spacing, patch) -> dict[str, Any]:
    """The NETWORK SPEC for the ``model`` params section as :func:`plan_network` completed it, at this spacing and
    patch (which decide DynUNet's per-axis strides and kernel sizes)."""
    spec = {key: model[key] for key in SPEC_KEYS}
    spec["encoder"] = model.get("encoder") if model.get("encoder") not in ("auto", "none") else None
    spec["spatial_dims"] = spatial_dims
    spec["channels"] = list(model["channels"])
    if model["name"] == "dynunet":
        spec["strides"], spec["kernel_sizes"] = dynunet_topology(spacing[:spatial_dims], patch[:spatial_dims],
                                                                 len(model["channels"]))
    else:
        spec["strides"], spec["kernel_sizes"] = list(model["strides"]), None
    try:
        validate_spec(spec)
    except ValueError as err:  # e.g. a DynUNet of two levels: one line naming the key, before any training
        raise StageInputError(f"{err} (params.yaml, section model)") from None
    return spec


def check_network_current(plan: Plan, model: dict[str, Any]) -> None:
    """Refuse a plan whose network the ``model`` params section would no longer plan (edited since ``medseg plan``):
    train builds ``plan.network``, so a changed ``model.norm`` must not be ignored silently."""
    choice = model.get("encoder")
    if choice == "auto":  # the plan's choice stands (its weights are checked when train loads them)
        encoder = plan.network.get("encoder")
    else:
        encoder, _ = resolve_encoder(model, plan.spatial_dims, plan.normalization)
    spec = network_spec(plan_network(model, plan.spatial_dims, plan.median_shape, encoder), plan.spatial_dims,
                        plan.target_spacing, plan.patch_size)
    changed = [key for key in spec if _as_json(spec[key]) != _as_json(plan.network.get(key))]
    if changed:
        raise StageInputError(f"the model params changed since plans.json was planned ({', '.join(changed)} of the "
                              f"network differ): run 'medseg plan' (or 'dvc repro') first")


def _as_json(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), for comparing a spec with a stored one."""
    if isinstance(value, (list, tuple)):
        return [_as_json(v) for v in value]
    return value


def plan_network(model: dict[str, Any], spatial_dims: int, median_shape, encoder: str | None = None) -> dict[str, Any]:
    """The ``model`` params section with ``channels`` and ``strides`` filled in where they are null, and ``encoder``
    resolved (:func:`resolve_encoder`; its levels are the encoder's).

    Depth: one level more for each halving that leaves the median shape's smallest axis at least ``MIN_FEATURE_MAP``
    voxels, at most ``MAX_LEVELS`` levels (at least 3). Width: ``base_channels``, doubled per level, capped at
    ``max_channels``. Strides default to 2 between levels.
    """
    model = dict(model)
    model["encoder"] = encoder
    if encoder is not None:
        if model["channels"] is not None:
            raise StageInputError(f"model.channels must be null with the pretrained encoder {encoder} (its levels "
                                  f"are the encoder's); set model.encoder: none to plan your own")
        model["channels"] = encoder_channels(encoder)
        model["strides"] = [2] * (len(model["channels"]) - 1)
    if model["channels"] is None:
        smallest = min(max(1, int(s)) for s in median_shape[:spatial_dims])
        levels = 1
        while levels < MAX_LEVELS and smallest / 2 ** levels >= MIN_FEATURE_MAP:
            levels += 1
        levels = max(levels, 3)
        model["channels"] = [min(model["base_channels"] * 2 ** k, model["max_channels"]) for k in range(levels)]
        model["strides"] = None
    if model["strides"] is None:
        model["strides"] = [2] * (len(model["channels"]) - 1)
    model["channels"], model["strides"] = list(model["channels"]), list(model["strides"])
    return model


def dynunet_topology(spacing, patch_size, levels: int) -> tuple[list[list[int]], list[list[int]]]:
    """Per-level, per-axis strides and kernel sizes for ``levels`` resolution levels (the first never downsamples).

    Anisotropic axes are not downsampled (and get kernel 1) until the others have caught up with their spacing.
    """
    spacing, size = [float(s) for s in spacing], [int(s) for s in patch_size]
    strides, kernels = [[1] * len(size)], [[3 if s <= 2 * min(spacing) else 1 for s in spacing]]
    for _ in range(levels - 1):
        finest = min(spacing)
        stride = [2 if sp <= 2 * finest and sz // 2 >= MIN_FEATURE_MAP else 1 for sp, sz in zip(spacing, size)]
        spacing = [sp * st for sp, st in zip(spacing, stride)]
        size = [sz // st for sz, st in zip(size, stride)]
        strides.append(stride)
        kernels.append([3 if sp <= 2 * min(spacing) else 1 for sp in spacing])
    return strides, kernels


def _divisor(model: dict[str, Any], spatial_dims: int, spacing, patch) -> list[int]:
    return list(required_divisor(network_spec(model, spatial_dims, spacing, patch)))


def estimate_step_mb(model: dict[str, Any], spatial_dims: int, spacing, patch, batch: int) -> float:
    """Rough training-step activation memory (MB) of ``batch`` patches: features summed over resolution levels."""
    voxels = math.prod(patch[:spatial_dims])
    strides = level_strides(network_spec(model, spatial_dims, spacing, patch))
    features, reduction = 0.0, 1
    for channels, stride in zip(model["channels"], strides):
        reduction *= math.prod(stride)
        features += channels / reduction
    return batch * voxels * features * BYTES_PER_FEATURE_VOXEL / 2**20


def _fit_patch(model, spatial_dims, spacing, median_shape, budget_mb) -> list[int]:
    """The median shape, shrunk on its relatively largest axis until ``MIN_BATCH`` patches fit the budget."""
    median = [max(1, int(s)) for s in median_shape[:spatial_dims]]
    patch = list(median)
    while True:
        div = _divisor(model, spatial_dims, spacing, patch)
        rounded = [max(d, math.ceil(p / d) * d) for p, d in zip(patch, div)]
        if estimate_step_mb(model, spatial_dims, spacing, rounded, MIN_BATCH) <= budget_mb:
            return rounded
        shrinkable = [a for a in range(spatial_dims) if rounded[a] > div[a]]
        if not shrinkable:
            log.warning("the smallest patch %s exceeds plan.memory_budget_mb=%s; using it anyway", rounded, budget_mb)
            return rounded
        axis = max(shrinkable, key=lambda a: rounded[a] / median[a])
        patch[axis] = rounded[axis] - div[axis]


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


FRAME_SCALE_STEP = 1.05  # coarsen the target spacing of 2D frames by 5% at a time


def _fit_frames(model: dict[str, Any], target, median_shape, budget_mb: float) -> tuple[tuple, tuple]:
    """(target spacing, median shape) of 2D frames with the spacing coarsened (never refined) until the whole median
    frame, rounded to the network's divisor, fits ``MIN_BATCH`` patches within ``budget_mb``."""
    scale = 1.0
    while True:
        shape = tuple(max(1, int(round(s / scale))) if a < 2 else int(s) for a, s in enumerate(median_shape))
        net = plan_network(model, 2, shape)
        div = _divisor(net, 2, target, shape)
        rounded = [max(d, math.ceil(p / d) * d) for p, d in zip(shape[:2], div)]
        if estimate_step_mb(net, 2, target, rounded, MIN_BATCH) <= budget_mb or min(shape[:2]) <= 2 * max(div):
            return (target[0] * scale, target[1] * scale, target[2]), shape
        scale *= FRAME_SCALE_STEP


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
        target, median_shape = _fit_frames(model, target, median_shape, params.plan.memory_budget_mb)
    resampled = _resampled(cases, target)
    if encoder is not None:  # the frame size is the scratch U-Net's (above); the whole frame is the patch
        scratch = plan_network(model, spatial_dims, median_shape)
        div = _divisor(plan_network(model, spatial_dims, median_shape, encoder), spatial_dims, target, median_shape)
        frame = [max(d, math.ceil(p / d) * d) for p, d in zip(_fit_patch(scratch, spatial_dims, target, median_shape,
                                                                         params.plan.memory_budget_mb), div)]
    model = plan_network(model, spatial_dims, median_shape, encoder)
    if overrides.patch_size is not None:
        patch = list(overrides.patch_size)
    else:
        patch = frame if encoder is not None else _fit_patch(model, spatial_dims, target, median_shape,
                                                             params.plan.memory_budget_mb)
        patch = patch + [1] * (3 - spatial_dims)
    if spatial_dims == 3 and patch[2] == 1:
        raise StageInputError(f"patch size {patch} is a 2D patch but the plan is 3D: set plan.spatial_dims: 2 "
                              f"(or give a 3D plan.patch_size)")
    div = _divisor(model, spatial_dims, target, patch)
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

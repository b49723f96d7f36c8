"""The network part of the plan: resolution levels, width, DynUNet's per-axis strides and kernels, the pretrained
encoder, and the patch that one training step of it fits in the memory budget (the rules are listed in
:mod:`medseg.planning.plan`). The spec it produces is the contract :mod:`medseg.common.network_spec` validates.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from medseg.common.errors import StageInputError
from medseg.common.network_spec import encoder_channels, level_strides, required_divisor, validate_spec

__all__ = ["resolve_encoder", "network_spec", "check_network_current", "plan_network", "dynunet_topology",
           "estimate_step_mb", "fit_patch", "fit_frames", "patch_divisor", "MIN_BATCH"]

log = logging.getLogger(__name__)

MIN_FEATURE_MAP = 4
MAX_LEVELS = 7
MIN_BATCH = 2
# Bytes one voxel of one feature channel costs in a training step: the activations kept for the backward pass
# (convolution, normalisation and activation outputs in encoder and decoder, fp32) and their gradients.
BYTES_PER_FEATURE_VOXEL = 4 * 12
DEFAULT_ENCODER = "efficientnet-lite0"
SPEC_KEYS = ("name", "num_res_units", "norm", "dropout", "deep_supervision")  # taken from params as given
FRAME_SCALE_STEP = 1.05  # coarsen the target spacing of 2D frames by 5% at a time


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


def check_network_current(plan: Any, model: dict[str, Any]) -> None:
    """Refuse a plan whose network the ``model`` params section would no longer plan (edited since ``medseg plan``):
    train builds ``plan.network`` (of a :class:`medseg.planning.plan.Plan`), so a changed ``model.norm`` must not be
    ignored silently."""
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


def patch_divisor(model: dict[str, Any], spatial_dims: int, spacing, patch) -> list[int]:
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


def fit_patch(model, spatial_dims, spacing, median_shape, budget_mb) -> list[int]:
    """The median shape, shrunk on its relatively largest axis until ``MIN_BATCH`` patches fit the budget."""
    median = [max(1, int(s)) for s in median_shape[:spatial_dims]]
    patch = list(median)
    while True:
        div = patch_divisor(model, spatial_dims, spacing, patch)
        rounded = [max(d, math.ceil(p / d) * d) for p, d in zip(patch, div)]
        if estimate_step_mb(model, spatial_dims, spacing, rounded, MIN_BATCH) <= budget_mb:
            return rounded
        shrinkable = [a for a in range(spatial_dims) if rounded[a] > div[a]]
        if not shrinkable:
            log.warning("the smallest patch %s exceeds plan.memory_budget_mb=%s; using it anyway", rounded, budget_mb)
            return rounded
        axis = max(shrinkable, key=lambda a: rounded[a] / median[a])
        patch[axis] = rounded[axis] - div[axis]


def fit_frames(model: dict[str, Any], target, median_shape, budget_mb: float) -> tuple[tuple, tuple]:
    """(target spacing, median shape) of 2D frames with the spacing coarsened (never refined) until the whole median
    frame, rounded to the network's divisor, fits ``MIN_BATCH`` patches within ``budget_mb``."""
    scale = 1.0
    while True:
        shape = tuple(max(1, int(round(s / scale))) if a < 2 else int(s) for a, s in enumerate(median_shape))
        net = plan_network(model, 2, shape)
        div = patch_divisor(net, 2, target, shape)
        rounded = [max(d, math.ceil(p / d) * d) for p, d in zip(shape[:2], div)]
        if estimate_step_mb(net, 2, target, rounded, MIN_BATCH) <= budget_mb or min(shape[:2]) <= 2 * max(div):
            return (target[0] * scale, target[1] * scale, target[2]), shape
        scale *= FRAME_SCALE_STEP

"""The NETWORK SPEC: the plain JSON-able dict that describes a network, owned here (torch-free).

``medseg.planning.plan`` writes it into ``plans.json``, train copies it into each model's ``inference_config.json``, and
``medseg.networks.architectures.build_network`` builds from it::

    {"name": "unet" | "attention_unet" | "dynunet", "spatial_dims": 2 | 3, "channels": [16, 32, 64, 128],
     "strides": [2, 2, 2]  (unet, attention_unet: len(channels) - 1 ints or per-axis lists)
                | [[1, 1], [2, 2], [2, 2], [2, 2]]  (dynunet: len(channels) per-axis lists, the first all ones),
     "kernel_sizes": [[3, 3], ...]  (dynunet: len(channels) per-axis lists) | null (others),
     "num_res_units": 0, "norm": "instance" | "batch", "dropout": 0.0, "deep_supervision": false,
     "encoder": null | "efficientnet-lite0"}

``encoder`` (2D, ``unet`` and ``attention_unet``): an ImageNet-pretrained encoder in MONAI's ``FlexibleUNet``; its
levels are the encoder's, so ``channels`` must be :func:`encoder_channels` and ``strides`` five 2s. Batch norm
throughout (the encoder's own), so ``norm`` does not apply. A spec without the key has no encoder.

The rules a user's ``model`` params section must already meet (:func:`check_model`) are the same rules a spec is
held to (:func:`validate_spec`); ``medseg.common.params`` checks them at load, so a bad key is one line before any work.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["NETWORKS", "NORMS", "ENCODERS", "check_model", "validate_spec", "level_strides", "required_divisor",
           "encoder_channels"]

NETWORKS = ("unet", "attention_unet", "dynunet")
NORMS = ("instance", "batch")
# Pretrained encoders (medseg.networks.architectures registers them with MONAI's FlexibleUNet) and their feature channels at
# 1/2, 1/4, ..., 1/32 of the input; the decoder is FlexibleUNet's, 256, 128, 64, 32, 16 channels from the bottom up.
ENCODERS = {"efficientnet-lite0": (16, 24, 40, 112, 320)}
ENCODER_DECODER_CHANNELS = (256, 128, 64, 32, 16)


def encoder_channels(encoder: str) -> list[int]:
    """The spec's ``channels`` for a network with ``encoder``: the decoder's output channels per resolution level,
    full resolution first, and the encoder's bottom (1/32) level last."""
    return list(ENCODER_DECODER_CHANNELS[::-1]) + [ENCODERS[encoder][-1]]


def check_model(model: Mapping[str, Any]) -> None:
    """The rules of the ``model`` params section (channels and strides may still be null: planned).

    Raises:
        ValueError: naming the ``model.<key>`` that is wrong.
    """
    name = model.get("name")
    if name not in NETWORKS:
        raise ValueError(f"unknown model.name {name!r}; expected one of {NETWORKS}")
    if name != "attention_unet" and model.get("norm") not in NORMS:  # MONAI's AttentionUnet: fixed batch norm
        raise ValueError(f"model.norm must be one of {NORMS}; got {model.get('norm')!r}")
    if not 0.0 <= float(model.get("dropout", 0.0)) < 1.0:
        raise ValueError(f"model.dropout must be in [0, 1); got {model.get('dropout')!r}")
    if model.get("deep_supervision") and name == "unet":
        raise ValueError("model.deep_supervision is supported by dynunet and attention_unet, not unet")
    encoder = model.get("encoder")
    if encoder not in (None, "auto", "none", *ENCODERS):
        raise ValueError(f"unknown model.encoder {encoder!r}; expected auto, none or one of {tuple(ENCODERS)}")
    if encoder in ENCODERS and name == "dynunet":
        raise ValueError("model.encoder (a pretrained encoder) is for unet and attention_unet, not dynunet")
    if encoder in ENCODERS and model.get("deep_supervision"):
        raise ValueError("model.deep_supervision does not combine with a pretrained model.encoder")
    channels, strides = model.get("channels"), model.get("strides")
    if channels is None and strides is not None:
        raise ValueError("model.strides must be null when model.channels is null (both planned)")
    if channels is not None and strides is not None and name != "dynunet" and len(strides) != len(channels) - 1:
        raise ValueError(f"model.strides must have one entry fewer than model.channels for {name} "
                         f"({len(channels)} channels, {len(strides)} strides)")


def _per_axis(value: Any, spatial_dims: int, key: str, index: int) -> tuple[int, ...]:
    """One stride or kernel entry as a per-axis tuple of positive ints (an int applies to every axis)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value] * spatial_dims
    if (not isinstance(value, (list, tuple)) or len(value) != spatial_dims
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)):
        raise ValueError(f"model.{key}[{index}] must be a positive int or {spatial_dims} positive ints "
                         f"(one per axis); got {value!r}")
    return tuple(value)


def validate_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``spec`` and return it with strides and kernel sizes as per-axis tuples; errors name the bad key."""
    name = spec.get("name")
    required = ["spatial_dims", "channels", "strides", "dropout"]
    if name != "attention_unet":
        required += ["num_res_units", "norm"]
    missing = [key for key in required if key not in spec] if name in NETWORKS else []
    if missing:
        raise ValueError(f"model spec for {name!r} lacks {', '.join('model.' + k for k in missing)}")
    check_model(spec)
    dims = spec["spatial_dims"]
    if dims not in (2, 3):
        raise ValueError(f"model.spatial_dims must be 2 or 3; got {dims!r}")
    channels = spec["channels"]
    if (not isinstance(channels, (list, tuple)) or len(channels) < (3 if name == "dynunet" else 2)
            or not all(isinstance(c, int) and c >= 1 for c in channels)):
        raise ValueError(f"model.channels must list at least {3 if name == 'dynunet' else 2} positive ints for "
                         f"{name}; got {channels!r}")

    # dynunet's first stride belongs to the input block (no downsampling); the others' strides sit between levels
    n_strides = len(channels) if name == "dynunet" else len(channels) - 1
    strides, kernels = spec["strides"], spec.get("kernel_sizes")
    if not isinstance(strides, (list, tuple)) or len(strides) != n_strides:
        raise ValueError(f"model.strides must have {n_strides} entries for {name} with {len(channels)} channels "
                         f"levels; got {strides!r}")
    strides = tuple(_per_axis(s, dims, "strides", i) for i, s in enumerate(strides))
    if name == "dynunet":
        if any(s != 1 for s in strides[0]):
            raise ValueError(f"model.strides[0] must be all ones for dynunet (full-resolution output); got "
                             f"{list(strides[0])}")
        if not isinstance(kernels, (list, tuple)) or len(kernels) != len(channels):
            raise ValueError(f"model.kernel_sizes must have {len(channels)} entries (one per channels level) for "
                             f"dynunet; got {kernels!r}")
        kernels = tuple(_per_axis(k, dims, "kernel_sizes", i) for i, k in enumerate(kernels))
    elif kernels is not None:
        raise ValueError(f"model.kernel_sizes is planned for dynunet only; must be null for {name}, got {kernels!r}")

    deep_supervision = bool(spec.get("deep_supervision", False))
    if deep_supervision and len(channels) < 3:
        raise ValueError(f"model.deep_supervision needs at least 3 model.channels levels; got {len(channels)}")
    encoder = spec.get("encoder")
    if encoder in ("auto", "none"):
        raise ValueError(f"model.encoder {encoder!r} is resolved by the plan; a network spec names the encoder or "
                         f"null")
    if encoder is not None:
        if dims != 2 or list(channels) != encoder_channels(encoder) or any(s != (2, 2) for s in strides):
            raise ValueError(f"a {encoder} network is 2D with model.channels {encoder_channels(encoder)} and five "
                             f"strides of 2; got {dims}D, {list(channels)}, {[list(s) for s in strides]}")
    return {**spec, "strides": strides, "kernel_sizes": kernels, "deep_supervision": deep_supervision,
            "encoder": encoder}


def level_strides(spec: Mapping[str, Any]) -> tuple[tuple[int, ...], ...]:
    """Per-level, per-axis strides of the network, the full-resolution level (all ones) first."""
    valid = validate_spec(spec)
    if valid["name"] == "dynunet":
        return valid["strides"]
    return ((1,) * int(valid["spatial_dims"]),) + valid["strides"]


def required_divisor(spec: Mapping[str, Any]) -> tuple[int, ...]:
    """Per-axis number each patch size must be divisible by: the product of the strides along that axis.

    Returns one int per spatial axis, e.g. ``(8, 8)`` for strides ``[[1, 1], [2, 2], [2, 2], [2, 2]]`` and
    ``(4, 4, 2)`` for ``[[1, 1, 1], [2, 2, 1], [2, 2, 2]]``.
    """
    return tuple(math.prod(axis) for axis in zip(*level_strides(spec)))

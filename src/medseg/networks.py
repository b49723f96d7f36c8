"""Networks chosen by parameters: MONAI's U-Net and Attention U-Net, configured, not rewritten."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["build_network", "NETWORKS"]

NETWORKS = ("unet", "attention_unet")


def build_network(model: dict[str, Any], in_channels: int, out_channels: int) -> nn.Module:
    """Build the network described by the ``model`` params section (a plain dict, so checkpoints can carry it).

    - ``unet``: MONAI ``UNet`` (Ronneberger et al. 2015; residual units as in Kerfoot et al. 2018 when
      ``num_res_units`` > 0).
    - ``attention_unet``: MONAI ``AttentionUnet`` (Oktay et al. 2018): additive attention gates on every skip
      connection, gated by the coarser decoder scale.

    Input ``(B, in_channels, *spatial)``, output logits ``(B, out_channels, *spatial)``; each spatial size must be
    divisible by the product of ``strides``.
    """
    from monai.networks.nets import AttentionUnet, UNet

    name = model["name"]
    common = dict(
        spatial_dims=int(model["spatial_dims"]),
        in_channels=in_channels,
        out_channels=out_channels,
        channels=tuple(model["channels"]),
        strides=tuple(model["strides"]),
        dropout=float(model["dropout"]),
    )
    if name == "unet":
        return UNet(**common, num_res_units=int(model["num_res_units"]), norm=model["norm"])
    if name == "attention_unet":
        return AttentionUnet(**common)
    raise ValueError(f"unknown model.name {name!r}; expected one of {NETWORKS}")

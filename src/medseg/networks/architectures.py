"""Networks and losses chosen by the NETWORK SPEC (:mod:`medseg.common.network_spec`): MONAI U-Net, Attention U-Net and
DynUNet, configured, not rewritten; with a pretrained ``encoder``, MONAI's ``FlexibleUNet`` on an ImageNet backbone
registered by :mod:`medseg.networks.encoders`, with attention gates on its skips for ``attention_unet``.

Deep supervision (dynunet, attention_unet) follows nnU-Net (Isensee et al. 2021): in ``train()`` mode the network also
returns logits from the coarser decoder levels, all but the lowest one (at least one), and :func:`build_loss` weights
their losses 1, 1/2, 1/4, ... In ``eval()`` mode every network returns only the full-resolution logits.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import nn

from medseg.common.network_spec import NETWORKS, required_divisor, validate_spec

__all__ = ["NETWORKS", "build_network", "monai_network", "monai_state_dict", "load_network", "build_loss",
           "required_divisor"]

def _supervised_levels(n_levels: int) -> int:
    """Coarser decoder outputs to supervise: all but the lowest (nnU-Net gives it zero weight), at least one.

    A U-Net with ``n_levels`` resolution levels has decoder outputs at levels 0 .. n_levels - 2.
    """
    return max(1, n_levels - 3)


class DeepSupervisedAttentionUnet(nn.Module):
    """MONAI ``AttentionUnet`` (Oktay et al. 2018, "Attention U-Net: Learning Where to Look for the Pancreas") with
    deep supervision: 1x1 convolution heads on coarser decoder outputs.

    MONAI's class has no supervision heads, so forward hooks on its ``AttentionLayer`` modules keep the decoder
    features of the supervised levels; the wrapped network itself is unchanged (its weights live under ``net.``).

    Args:
        net: the ``AttentionUnet`` to supervise.
        levels: number of coarser decoder levels (1, 2, ...) given a head; level k's output has ``channels[k]``
            channels at 1 / prod(strides[:k]) of the input size.

    Forward: input ``(B, in_channels, *spatial)``. In ``eval()`` mode: logits ``(B, out_channels, *spatial)``. In
    ``train()`` mode: a list ``[full-resolution logits, level-1 logits, level-2 logits, ...]``, each at its own
    resolution (``spatial / prod(strides[:k])``), which :func:`build_loss` consumes.
    """

    def __init__(self, net: nn.Module, levels: int) -> None:
        super().__init__()
        from monai.networks.layers import Conv
        from monai.networks.nets.attentionunet import AttentionLayer

        self.net = net
        conv = Conv[Conv.CONV, net.dimensions]
        self.heads = nn.ModuleList(conv(net.channels[k], net.out_channels, kernel_size=1) for k in range(1, levels + 1))
        self._features: dict[int, torch.Tensor] = {}
        decoder = [m for m in net.modules() if isinstance(m, AttentionLayer)]  # pre-order: level 0 first
        for level in range(1, levels + 1):
            decoder[level].register_forward_hook(functools.partial(self._keep, level))

    def _keep(self, level: int, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        if self.training:  # eval forwards keep no references to intermediate features
            self._features[level] = output

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        logits = self.net(x)
        if not self.training:
            return logits
        features, self._features = self._features, {}
        return [logits] + [head(features[level]) for level, head in enumerate(self.heads, start=1)]


def monai_network(spec: dict[str, Any], in_channels: int, out_channels: int) -> tuple[str, dict[str, Any]]:
    """The MONAI class (its dotted path) and keyword arguments that :func:`build_network` builds for ``spec``; with
    deep supervision on an ``attention_unet``, the wrapped network (the heads are medseg's, see
    :class:`DeepSupervisedAttentionUnet`). Values are plain JSON types, so the same arguments can be written into a
    MONAI bundle's config (:mod:`medseg.registry.monai_bundle`).

    Raises:
        ValueError: a spec with a pretrained ``encoder`` (built by :mod:`medseg.networks.encoders`, not one MONAI
            class), or a missing or wrong key (``model.<key>``).
    """
    spec = validate_spec(spec)
    if spec["encoder"] is not None:
        raise ValueError(f"model.encoder {spec['encoder']!r}: a pretrained encoder's network is not one MONAI class")
    name, dims, channels = spec["name"], int(spec["spatial_dims"]), [int(c) for c in spec["channels"]]
    strides, dropout = spec["strides"], float(spec["dropout"])
    common = {"spatial_dims": dims, "in_channels": int(in_channels), "out_channels": int(out_channels)}
    if name == "unet":
        return "monai.networks.nets.UNet", {**common, "channels": channels, "strides": strides,
                                            "num_res_units": int(spec["num_res_units"]), "norm": spec["norm"],
                                            "dropout": dropout}
    if name == "attention_unet":
        return "monai.networks.nets.AttentionUnet", {**common, "channels": channels, "strides": strides,
                                                     "dropout": dropout}
    return "monai.networks.nets.DynUNet", {
        **common,
        "kernel_size": spec["kernel_sizes"],
        "strides": strides,
        "upsample_kernel_size": strides[1:],
        "filters": channels,
        "dropout": dropout or None,
        "norm_name": ["INSTANCE", {"affine": True}] if spec["norm"] == "instance" else "BATCH",
        "deep_supervision": bool(spec["deep_supervision"]),
        "deep_supr_num": _supervised_levels(len(channels)),
        "res_block": int(spec["num_res_units"]) > 0,
    }


def build_network(spec: dict[str, Any], in_channels: int, out_channels: int) -> nn.Module:
    """Build the network described by the NETWORK SPEC ``spec`` (see the module docstring).

    - ``unet``: MONAI ``UNet`` (Ronneberger et al. 2015; residual units as in Kerfoot et al. 2018 when
      ``num_res_units`` > 0).
    - ``attention_unet``: MONAI ``AttentionUnet`` (Oktay et al. 2018): additive attention gates on every skip
      connection, gated by the upsampled coarser decoder scale; batch norm as in MONAI (``norm`` and
      ``num_res_units`` do not apply). With deep supervision: :class:`DeepSupervisedAttentionUnet`.
    - ``dynunet``: MONAI ``DynUNet`` (Isensee et al. 2021, nnU-Net): planned per-axis ``kernel_sizes`` and
      ``strides``, instance norm with affine (or batch), LeakyReLU, residual blocks when ``num_res_units`` > 0.
      With deep supervision its ``train()`` output is stacked: ``(B, 1 + n, out_channels, *spatial)``, the coarser
      logits interpolated to full size.

    The class and its arguments: :func:`monai_network`. Input ``(B, in_channels, *spatial)`` with each spatial size
    divisible by :func:`required_divisor`; in ``eval()`` mode the output is the logits ``(B, out_channels, *spatial)``.

    Raises:
        ValueError: naming the spec key (``model.<key>``) that is missing or wrong.
    """
    import importlib

    spec = validate_spec(spec)
    if spec["encoder"] is not None:
        from medseg.networks.encoders import pretrained_unet

        return pretrained_unet(spec["name"], spec["encoder"], in_channels, out_channels, float(spec["dropout"]))
    target, arguments = monai_network(spec, in_channels, out_channels)
    module, name = target.rsplit(".", 1)
    net = getattr(importlib.import_module(module), name)(**arguments)
    if spec["name"] == "attention_unet" and spec["deep_supervision"]:
        return DeepSupervisedAttentionUnet(net, _supervised_levels(len(spec["channels"])))
    return net


def monai_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """``net``'s weights as its MONAI class holds them (:func:`monai_network`): a deep-supervised Attention U-Net's
    wrapped network without medseg's supervision heads, which its ``eval()`` output never uses."""
    if isinstance(net, DeepSupervisedAttentionUnet):
        return net.net.state_dict()
    return net.state_dict()


def load_network(spec: dict[str, Any], in_channels: int, out_channels: int,
                 state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """:func:`build_network` holding ``state_dict``'s tensors (``load_state_dict`` strict: every key, every shape).

    The network is built on the ``meta`` device and takes the tensors themselves (``assign=True``): no random
    initialisation of weights that are replaced at once, and no copy, once per model of an ensemble and per run
    (a several-fold faster load: benchmarks/README.md).
    The tensors are shared with ``state_dict``: pass copies where the caller keeps using them.
    """
    with torch.device("meta"):
        net = build_network(spec, in_channels, out_channels)
    net.load_state_dict(state_dict, assign=True)
    if any(t.is_meta for t in (*net.parameters(), *net.buffers())):  # a tensor the state dict does not hold
        net = build_network(spec, in_channels, out_channels)
        net.load_state_dict(state_dict)
    return net


def build_loss(spec: dict[str, Any], name: str = "dice_ce") -> Callable[..., torch.Tensor]:
    """Return ``loss(output, target, weight=None)``: MONAI ``DiceCELoss`` (softmax, one-hot target) on the network's
    output; ``name="unet_weighted"``: MONAI ``DiceLoss`` plus cross-entropy weighted per pixel by ``weight``
    ``(B, 1, *spatial)`` (the U-Net paper's map, :mod:`medseg.networks.border_weights`), averaged over pixels.

    ``target`` is ``(B, 1, *spatial)`` integer labels. ``output`` is what the network returns: logits
    ``(B, C, *spatial)``; or, when deep-supervised in ``train()`` mode, a list ``[full, coarser...]`` or DynUNet's
    stacked ``(B, 1 + n, C, *spatial)``, both weighted 1, 1/2, 1/4, ... by MONAI ``DeepSupervisionLoss``
    (``weight_mode="exp"``), which resizes the target to each coarser output (nearest neighbour). Without deep
    supervision the value equals plain ``DiceCELoss``. Logits are cast to float32 (safe under autocast).
    """
    from monai.losses import DeepSupervisionLoss, DiceCELoss, DiceLoss

    spatial_dims = int(validate_spec(spec)["spatial_dims"])
    if name == "unet_weighted":
        dice = DiceLoss(to_onehot_y=True, softmax=True)

        def weighted_loss(output: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None):
            if not isinstance(output, torch.Tensor) or output.ndim != spatial_dims + 2:
                raise ValueError("train.loss unet_weighted takes one full-resolution output (no deep supervision)")
            logits = output.float()
            ce = torch.nn.functional.cross_entropy(logits, target[:, 0].long(), reduction="none")
            ce = ce if weight is None else ce * weight[:, 0].to(ce.dtype)
            return dice(logits, target) + ce.mean()

        return weighted_loss
    loss = DeepSupervisionLoss(DiceCELoss(to_onehot_y=True, softmax=True), weight_mode="exp")

    def segmentation_loss(output: torch.Tensor | list[torch.Tensor], target: torch.Tensor,
                          weight: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(output, torch.Tensor) and output.ndim == spatial_dims + 3:
            output = list(torch.unbind(output, dim=1))
        if isinstance(output, list):
            target = target.float()  # nearest-neighbour resizing of the labels needs a float tensor
        return loss(output, target)

    return segmentation_loss

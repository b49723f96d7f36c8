"""Pretrained encoders for 2D RGB frames in MONAI's ``FlexibleUNet``: the backbone registered with MONAI, the
attention-gated decoder, and the loading of local ImageNet weights (:mod:`medseg.networks.pretrained_weights` finds the file).

MONAI's ``FlexibleUNet`` takes a registered backbone (``FLEXUNET_BACKBONE``); its own EfficientNets download their
weights at run time, so EfficientNet-Lite0 is registered here and filled from a file, never from the network.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from monai.networks.blocks import BaseEncoder
from monai.networks.nets.efficientnet import EfficientNet, EfficientNetBNFeatures
from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE, UNetDecoder
from torch import nn

from medseg.common.network_spec import ENCODER_DECODER_CHANNELS, ENCODERS

__all__ = ["EfficientNetLiteEncoder", "AttentionUNetDecoder", "pretrained_unet", "load_encoder_weights",
           "parameter_groups"]

# EfficientNet-Lite0's stages (Google's TPU/mobile variant, tensorflow/tpu models/official/efficientnet/lite): those of
# EfficientNet-B0 without squeeze-and-excitation; MONAI's block notation (repeats, kernel, stride, expansion, in, out).
LITE0_BLOCKS = ["r1_k3_s11_e1_i32_o16", "r2_k3_s22_e6_i16_o24", "r2_k5_s22_e6_i24_o40", "r3_k3_s22_e6_i40_o80",
                "r3_k5_s11_e6_i80_o112", "r4_k5_s22_e6_i112_o192", "r1_k3_s11_e6_i192_o320"]
# MONAI nests its blocks per stage (_blocks.<stage>.<block>); the published state dicts number them flat (_blocks.<block>)
_STAGE_INDEX = re.compile(r"(.+)\.\d+(\.\d+\..+)")


class EfficientNetLiteEncoder(EfficientNetBNFeatures, BaseEncoder):
    """EfficientNet-Lite0 as a backbone of MONAI's ``FlexibleUNet``: MONAI's EfficientNet built with Lite's stages
    (no squeeze-and-excitation) and ReLU6 for swish, as Lite replaces them; Lite0 has B0's width and depth, so the
    stem and head that Lite fixes are B0's. Five feature maps at 1/2 ... 1/32 (16, 24, 40, 112, 320 channels), as
    MONAI's ``EfficientNetEncoder``. Its weights are never downloaded: ``pretrained`` must be False, and
    :func:`load_encoder_weights` reads a local file."""

    backbone_names = ["efficientnet-lite0"]

    def __init__(self, model_name: str = "efficientnet-lite0", pretrained: bool = False, spatial_dims: int = 2,
                 in_channels: int = 3, num_classes: int = 1000,
                 norm: str | tuple = ("batch", {"eps": 1e-3, "momentum": 0.01})) -> None:
        if model_name not in self.backbone_names or pretrained:
            raise ValueError(f"{model_name}: only efficientnet-lite0, its weights loaded by load_encoder_weights")
        EfficientNet.__init__(self, list(LITE0_BLOCKS), spatial_dims=spatial_dims, in_channels=in_channels,
                              num_classes=num_classes, width_coefficient=1.0, depth_coefficient=1.0,
                              dropout_rate=0.2, image_size=224, norm=norm, drop_connect_rate=0.2)
        self.set_swish()

    def set_swish(self, memory_efficient: bool = True) -> None:
        """Lite's activation is ReLU6 wherever EfficientNet has swish, whichever swish is asked for."""
        self._swish = nn.ReLU6()
        for block in self._blocks.modules():
            if hasattr(block, "_swish"):
                block._swish = nn.ReLU6()

    @classmethod
    def get_encoder_parameters(cls) -> list[dict]:
        return [{"model_name": name, "pretrained": False, "spatial_dims": 2, "in_channels": 3, "num_classes": 1000,
                 "norm": ("batch", {"eps": 1e-3, "momentum": 0.01})} for name in cls.backbone_names]

    @classmethod
    def num_channels_per_output(cls) -> list[tuple[int, ...]]:
        return [ENCODERS[name] for name in cls.backbone_names]

    @classmethod
    def num_outputs(cls) -> list[int]:
        return [len(ENCODERS[name]) for name in cls.backbone_names]

    @classmethod
    def get_encoder_names(cls) -> list[str]:
        return list(cls.backbone_names)


FLEXUNET_BACKBONE.register_class(EfficientNetLiteEncoder)


class AttentionUNetDecoder(UNetDecoder):
    """MONAI's ``FlexibleUNet`` decoder with an additive attention gate (MONAI's ``AttentionBlock``, Oktay et al.
    2018) on each skip connection, gated by the coarser decoder features brought to the skip's size, as MONAI's
    ``AttentionUnet`` gates its skips. Same arguments as ``UNetDecoder``."""

    def __init__(self, spatial_dims: int, encoder_channels, decoder_channels, **kwargs: Any) -> None:
        from monai.networks.nets.attentionunet import AttentionBlock

        super().__init__(spatial_dims, encoder_channels, decoder_channels, **kwargs)
        coarser = [encoder_channels[-1]] + list(decoder_channels[:-1])
        skips = list(encoder_channels[1:-1][::-1])
        self.gates = nn.ModuleList(AttentionBlock(spatial_dims, f_int=max(1, s // 2), f_g=g, f_l=s)
                                   for g, s in zip(coarser, skips))

    def forward(self, features: list[torch.Tensor], skip_connect: int = 4) -> torch.Tensor:
        skips, features = features[:-1][::-1], features[1:][::-1]
        x = features[0]
        for i, block in enumerate(self.blocks):
            skip = None
            if i < skip_connect:
                gate = torch.nn.functional.interpolate(x, size=skips[i].shape[2:], mode="nearest")
                skip = self.gates[i](g=gate, x=skips[i])
            x = block(x, skip)
        return x


def pretrained_unet(name: str, encoder: str, in_channels: int, out_channels: int, dropout: float) -> nn.Module:
    """MONAI ``FlexibleUNet`` on ``encoder`` (random weights: :func:`load_encoder_weights` fills the encoder), its
    decoder swapped for :class:`AttentionUNetDecoder` for ``attention_unet``."""
    from monai.networks.nets import FlexibleUNet

    net = FlexibleUNet(in_channels, out_channels, backbone=encoder, pretrained=False,
                       decoder_channels=ENCODER_DECODER_CHANNELS, spatial_dims=2, dropout=dropout)
    if name == "attention_unet":
        decoder = net.decoder
        net.decoder = AttentionUNetDecoder(
            2, (in_channels, *ENCODERS[encoder]), ENCODER_DECODER_CHANNELS,
            act=("relu", {"inplace": True}), norm=("batch", {"eps": 1e-3, "momentum": 0.1}), dropout=dropout,
            bias=False, upsample="nontrainable", pre_conv="default", interp_mode="nearest", align_corners=None,
            is_pad=True)
        del decoder
    return net


def load_encoder_weights(net: nn.Module, path: str | Path, sha256: str | None = None) -> int:
    """Fill ``net.encoder`` (a :func:`build_network` network with a pretrained encoder) from the state dict file at
    ``path``, loaded with ``weights_only=True`` (tensors only: the file cannot run code). Every encoder tensor must be
    in the file with its shape (the classifier head the encoder does not use included); ``sha256``, when given, is
    the file's planned digest. Nothing is loaded unless all of it can be.

    Returns the number of tensors loaded. Raises :class:`medseg.common.errors.StageInputError`, one line naming the file
    and what is wrong (missing, changed since the plan, not a plain state dict, missing or mis-shaped tensors).
    """
    import pickle

    from medseg.common.errors import StageInputError
    from medseg.networks.pretrained_weights import file_sha256

    path = Path(path)
    if not path.is_file():
        raise StageInputError(f"encoder weights {path} not found")
    if sha256 is not None and file_sha256(path) != sha256:
        raise StageInputError(f"encoder weights {path} differ from the file planned on (sha256 {sha256[:12]}): "
                              f"run 'medseg plan' again (or restore the file)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError, AttributeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StageInputError(f"encoder weights {path}: not a plain state dict of tensors ({first})") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise StageInputError(f"encoder weights {path}: not a plain state dict of tensors "
                              f"(a {type(state).__name__})")
    target = net.encoder.state_dict()
    missing, wrong = [], []
    for key, value in target.items():
        source = _STAGE_INDEX.sub(r"\1\2", key)
        if source not in state:
            missing.append(source)
        elif state[source].shape != value.shape:
            wrong.append(f"{source} {tuple(state[source].shape)} (expected {tuple(value.shape)})")
        else:
            target[key] = state[source]
    if missing or wrong:
        what = (f"{len(missing)} tensors missing ({missing[0]}, ...)" if missing else
                f"{len(wrong)} tensors of the wrong shape ({wrong[0]}, ...)")
        raise StageInputError(f"encoder weights {path} do not fit the encoder: {what}")
    net.encoder.load_state_dict(target)
    return len(target)


def parameter_groups(net: nn.Module, encoder_lr_factor: float) -> list[dict[str, Any]]:
    """Optimiser parameter groups: a pretrained encoder's own (``lr_scale`` ``encoder_lr_factor``, ``warmup``) and
    the rest (scale 1); one group for a network without a pretrained encoder."""
    from monai.networks.nets import FlexibleUNet

    if not isinstance(net, FlexibleUNet):
        return [{"params": list(net.parameters()), "lr_scale": 1.0, "warmup": False}]
    encoder = [p for p in net.encoder.parameters()]
    ids = {id(p) for p in encoder}
    rest = [p for p in net.parameters() if id(p) not in ids]
    return [{"params": encoder, "lr_scale": float(encoder_lr_factor), "warmup": True},
            {"params": rest, "lr_scale": 1.0, "warmup": False}]

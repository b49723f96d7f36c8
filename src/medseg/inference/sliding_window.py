"""Sliding-window inference shared by validation, evaluation and ``medseg predict``: fold ensembles and mirroring
test-time augmentation. (Post-processing: :mod:`medseg.inference.postprocess`; loading a trained model:
:mod:`medseg.inference.model_folder`.)"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.inferers import Inferer, SliceInferer, SlidingWindowInferer

__all__ = ["build_inferer", "inferer_arguments", "select_device", "stitch_device", "check_ensemble", "probabilities", "label_map",
           "mirror_axes", "ENSEMBLE_KEYS"]

# inference-config entries that must agree for nets to be averaged: same classes, same input grid and intensities
ENSEMBLE_KEYS = ("labels", "target_spacing", "normalization", "modality", "in_channels", "out_channels")
# the stitched output may take this fraction of the accelerator's free memory; the rest is for the network's windows
STITCH_MEMORY_FRACTION = 0.5


def select_device(requested: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is an error, not a silent fallback."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {requested!r} was asked for but no CUDA device is available")
    return torch.device(requested)


def stitch_device(volume_shape: Sequence[int], num_classes: int, sw_device: torch.device,
                  free_bytes: int | None = None) -> torch.device:
    """Where to stitch the windows of a ``volume_shape`` volume into ``num_classes`` probability channels.

    On the accelerator when the stitching buffers fit in ``STITCH_MEMORY_FRACTION`` of its free memory (``free_bytes``,
    default ``torch.cuda.mem_get_info``), else on the CPU: windows still run on ``sw_device``, only the full-size
    output lives in host memory. The buffers are float32: MONAI's output and weight-count maps, the softmax and the
    running ensemble sum (``2 * num_classes + 2`` channels).
    """
    if sw_device.type != "cuda":
        return sw_device
    if free_bytes is None:
        free_bytes, _ = torch.cuda.mem_get_info(sw_device)
    need = (2 * num_classes + 2) * math.prod(int(s) for s in volume_shape) * 4
    return sw_device if need <= STITCH_MEMORY_FRACTION * free_bytes else torch.device("cpu")


def inferer_arguments(patch_size: Sequence[int], spatial_dims: int, overlap: float,
                      sw_batch_size: int) -> tuple[str, dict]:
    """The MONAI inferer (its dotted path) and keyword arguments :func:`build_inferer` uses, in plain JSON types (a
    MONAI bundle's config takes them as they are: :mod:`medseg.registry.monai_bundle`)."""
    common = {"sw_batch_size": int(sw_batch_size), "overlap": float(overlap), "mode": "gaussian"}
    if spatial_dims == 2:
        return "monai.inferers.SliceInferer", {"roi_size": [int(s) for s in patch_size[:2]], "spatial_dim": 2,
                                               "progress": False, **common}
    return "monai.inferers.SlidingWindowInferer", {"roi_size": [int(s) for s in patch_size], **common}


def build_inferer(patch_size: Sequence[int], spatial_dims: int, overlap: float, sw_batch_size: int,
                  sw_device: torch.device | str | None = None, device: torch.device | str | None = None) -> Inferer:
    """Gaussian-blended sliding windows over ``(B, C, X, Y, Z)`` volumes (:func:`inferer_arguments`).

    For 2D networks ``patch_size`` is ``(H, W, 1)``: MONAI's ``SliceInferer`` runs the sliding window on each axial
    slice (the last axis) and restacks, so 2D and 3D models take the same 3D input.

    Args:
        sw_device: where the windows and the network run (None: the input's device).
        device: where the windows are stitched into the output (None: the input's device); see :func:`stitch_device`.
    """
    target, arguments = inferer_arguments(patch_size, spatial_dims, overlap, sw_batch_size)
    inferer = SliceInferer if target.endswith("SliceInferer") else SlidingWindowInferer
    return inferer(**arguments, sw_device=sw_device, device=device)


def check_ensemble(configs: Sequence[dict], names: Sequence[str]) -> None:
    """Raise unless every config agrees with the first on :data:`ENSEMBLE_KEYS` (``names`` say which model is which)."""
    from medseg.common.errors import StageInputError

    for config, name in zip(configs[1:], names[1:]):
        for key in ENSEMBLE_KEYS:
            if config.get(key) != configs[0].get(key):
                raise StageInputError(f"cannot ensemble {name} with {names[0]}: their {key} differ "
                                      f"({config.get(key)!r} vs {configs[0].get(key)!r})")


def mirror_axes(spatial_dims: int) -> list[tuple[int, ...]]:
    """Every combination of the spatial axes of ``(B, C, X, Y, Z)`` a ``spatial_dims``-D network is mirrored over
    (nnU-Net's test-time mirroring; 2D networks only over X and Y), the identity ``()`` first."""
    from itertools import combinations

    axes = (2, 3, 4)[:spatial_dims]
    return [c for n in range(len(axes) + 1) for c in combinations(axes, n)]


def _inferers(nets: Sequence[torch.nn.Module], inferer: Inferer | Sequence[Inferer]) -> list[Inferer]:
    """One inferer per net: ``inferer`` for all, or the sequence given (as many as ``nets``)."""
    inferers = list(inferer) if isinstance(inferer, Sequence) else [inferer] * len(nets)
    if len(inferers) != len(nets):
        raise ValueError(f"{len(inferers)} inferers for {len(nets)} networks")
    return inferers


def _plain(image: torch.Tensor) -> torch.Tensor:
    """A MetaTensor's plain tensor (windows need no meta data: MONAI would track every crop and stitch)."""
    return image.as_tensor() if hasattr(image, "as_tensor") else image


def probabilities(nets: Sequence[torch.nn.Module], image: torch.Tensor, inferer: Inferer | Sequence[Inferer],
                  tta: bool = False) -> torch.Tensor:
    """Class probabilities of ``image`` averaged over ``nets`` (a fold ensemble) and, with ``tta``, over mirrored
    inputs (each prediction flipped back before averaging).

    Args:
        nets: networks in ``eval()`` mode, already on the inferer's ``sw_device``.
        image: ``(1, C, X, Y, Z)``.
        inferer: one inferer for all nets, or one per net (from :func:`build_inferer`).

    Returns:
        float32 ``(1, K, X, Y, Z)`` on the inferer's stitching device.
    """
    inferers, image = _inferers(nets, inferer), _plain(image)
    total, count = None, 0
    with torch.no_grad():
        for net, inf in zip(nets, inferers):
            dims = 2 if isinstance(inf, SliceInferer) else 3
            for axes in mirror_axes(dims) if tta else [()]:
                logits = inf(image.flip(axes) if axes else image, net)
                probs = torch.softmax(logits.float(), dim=1)
                del logits
                probs = probs.flip(axes) if axes else probs
                total = probs if total is None else total.add_(probs)
                count += 1
    return total.div_(count)


def label_map(nets: Sequence[torch.nn.Module], image: torch.Tensor, inferer: Inferer | Sequence[Inferer],
              tta: bool = False, slab: int = 16) -> torch.Tensor:
    """The most probable class of each voxel: uint8 ``(1, X, Y, Z)`` on the CPU, the argmax of :func:`probabilities`.

    One net without mirroring: the argmax of its logits, as softmax keeps their order; its full-size float copy is not
    made. Taken ``slab`` planes of X at a time with ``max().indices``: torch's argmax over channels is 5-10x slower on
    the CPU, and either's int64 result is 8 times the labels' size (240 MB for a CT).
    """
    if len(nets) == 1 and not tta:
        with torch.no_grad():
            scores = _inferers(nets, inferer)[0](_plain(image), nets[0])
    else:
        scores = probabilities(nets, image, inferer, tta=tta)
    labels = torch.empty((scores.shape[0], *scores.shape[2:]), dtype=torch.uint8)
    for start in range(0, scores.shape[2], slab):
        labels[:, start:start + slab] = scores[:, :, start:start + slab].max(1).indices.cpu()
    return labels

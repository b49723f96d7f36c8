"""Data-parallel training through ``torchrun``: process group, rank-aware device, and the few collectives train needs.

``medseg train`` detects ``torchrun``'s environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) by itself, so the
same command runs on one device or many::

    torchrun --standalone --nproc_per_node=4 -m medseg.cli train --params params.yaml [--resume]

Each rank trains on its own shard of random patches (rank-specific loader seeds) with a ``DistributedDataParallel``
network, so one optimiser step sees ``nproc_per_node`` times the planned batch. Validation cases are shared out and
their scores pooled; logging, MLflow, checkpoints (which hold every rank's random state) and the model folder are
rank 0's alone, and the others wait for it at the next collective or barrier. The backend is ``nccl`` on CUDA
(one GPU per rank, ``cuda:LOCAL_RANK``) and ``gloo`` on CPU. Without ``torchrun`` everything here is a no-op.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DistContext", "distributed", "wrap_ddp", "barrier", "all_gather", "broadcast", "mean_over_ranks",
           "weights_digest"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``world_size`` 1 and ``rank`` 0 when not launched by ``torchrun``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


@contextlib.contextmanager
def distributed(requested_device: str = "auto") -> Iterator[DistContext]:
    """Join the process group ``torchrun`` describes (if any) for the duration of the block.

    Args:
        requested_device: ``train.device``: ``auto`` | ``cpu`` | ``cuda``.

    Yields:
        The rank's :class:`DistContext`; its device is ``cuda:LOCAL_RANK`` for CUDA under ``torchrun``.
    """
    from medseg.inference.sliding_window import select_device

    world_size = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    device = select_device(requested_device)
    if world_size <= 1:
        yield DistContext(0, 1, 0, device)
        return
    import torch.distributed as dist

    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices: "
                               "use at most one process per GPU (torchrun --nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    muted = rank != 0 and not logging.getLogger().isEnabledFor(logging.DEBUG)
    medseg_log = logging.getLogger("medseg")
    level = medseg_log.level
    if muted:  # one voice in the terminal; -v lets every rank speak
        medseg_log.setLevel(logging.WARNING)
    log.info("rank %d of %d on %s (%s backend)", rank, world_size, device, backend)
    try:
        yield DistContext(rank, world_size, local_rank, device)
    finally:
        medseg_log.setLevel(level)
        dist.destroy_process_group()


def wrap_ddp(net: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """``DistributedDataParallel`` around ``net`` under ``torchrun`` (rank 0's initial weights are broadcast)."""
    if not ctx.enabled:
        return net
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(net, device_ids=ids, output_device=ctx.device.index if ids else None)


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        import torch.distributed as dist

        dist.barrier()


def all_gather(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without ``torchrun``."""
    if not ctx.enabled:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.enabled:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(value: float, ctx: DistContext) -> float:
    if not ctx.enabled:
        return value
    import torch.distributed as dist

    backend_device = ctx.device if ctx.device.type == "cuda" else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.float64, device=backend_device)
    dist.all_reduce(t)
    return float(t.item()) / ctx.world_size


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name and bytes: equal digests on all ranks mean identical weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state_dict.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()

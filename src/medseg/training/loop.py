"""The training loop's parts, each a plain function: one epoch of optimiser steps, the validation Dice per case, the
learning-rate schedule (nnU-Net's polynomial decay, on the epochs or on a wall-clock budget), the optimiser, and
mixed precision. :mod:`medseg.training.train` composes them per fold.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import numpy as np
import torch

from medseg.inference.postprocess import keep_largest_component

__all__ = ["amp_settings", "cpu_has_native_bf16", "train_epoch", "validate_cases", "fit_epochs", "training_progress",
           "poly_lr", "group_lr", "make_optimizer", "epoch_progress", "POLY_POWER"]

# nnU-Net's polynomial learning-rate decay: lr = lr0 * (1 - epoch / epochs) ** 0.9
POLY_POWER = 0.9


def amp_settings(amp: str, device: torch.device, cpu_amp: str = "off") -> tuple[torch.dtype | None, bool]:
    """``(autocast dtype or None, use a GradScaler)`` for ``train.amp`` on CUDA (fp16 needs loss scaling, bf16 does
    not) and ``train.cpu_amp`` on a CPU (bf16, or ``auto``: bf16 where the CPU computes it natively)."""
    if device.type == "cpu":
        wanted = cpu_amp == "bf16" or (cpu_amp == "auto" and cpu_has_native_bf16())
        return (torch.bfloat16 if wanted else None), False
    if amp == "off" or device.type != "cuda":
        return None, False
    return (torch.float16, True) if amp == "fp16" else (torch.bfloat16, False)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX), where bf16 autocast speeds convolutions up;
    elsewhere it is emulated and slower than float32."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe is not None)


def train_epoch(model: torch.nn.Module, loader, optimizer, scaler, loss_fn, device: torch.device,
                amp_dtype: torch.dtype | None = None,
                memory_format: torch.memory_format = torch.contiguous_format) -> dict[str, float]:
    """One pass over ``loader`` of ``{"image": (B, 1, *patch), "label": (B, 1, *patch)}`` batches.

    Returns the mean loss, the number of steps, the wall time and ``data_wait_fraction``: the share of the epoch
    spent blocked on the next batch (fetch and copy to the device). The loss stays on the device until the end, so
    the GPU is not synchronised every step and the fraction measures waits the accelerator really saw.
    """
    model.train()
    total = torch.zeros((), device=device)
    steps, wait = 0, 0.0
    start = time.perf_counter()
    batches = iter(loader)
    while True:
        fetch = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            wait += time.perf_counter() - fetch
            break
        images = batch["image"].to(device, non_blocking=True, memory_format=memory_format)
        labels = batch["label"].to(device, non_blocking=True)
        weights = batch["weight"].to(device, non_blocking=True) if "weight" in batch else None  # unet_weighted
        wait += time.perf_counter() - fetch
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            output = model(images)
            loss = loss_fn(output, labels) if weights is None else loss_fn(output, labels, weights)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total += loss.detach().float()
        steps += 1
    if steps == 0:
        raise RuntimeError("the training loader yielded no batches")
    mean_loss = float(total) / steps  # synchronises once
    seconds = time.perf_counter() - start
    return {"loss": mean_loss, "steps": steps, "seconds": seconds, "data_wait_fraction": wait / seconds}


def validate_cases(net: torch.nn.Module, loader, inferer, num_classes: int, device: torch.device,
                   amp_dtype: torch.dtype | None = None, ctx: Any = None,
                   largest_component: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Dice per case and foreground class, ``(cases, num_classes - 1)``, over the loader's ``(1, 1, X, Y, Z)``
    volumes on the training grid (:mod:`medseg.evaluation.metrics`' Dice and its rule for absent classes); with
    ``largest_component`` also the same after keeping each class's largest connected component (else None).

    Under ``torchrun`` each rank scores its own share of the volumes (``loader`` may then be empty) and the rows of
    all ranks are pooled.
    """
    from medseg.training import distributed
    from medseg.evaluation.metrics import dice_per_class

    def dice(pred: torch.Tensor, label: torch.Tensor) -> np.ndarray:
        return dice_per_class(pred[0, 0].numpy(), label[0, 0].long().numpy(), range(1, num_classes))[None]

    raw, post = [], []
    net.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        for batch in loader:
            logits = inferer(batch["image"].to(device), net)
            pred = logits.argmax(1, keepdim=True).cpu()
            raw.append(dice(pred, batch["label"]))
            if largest_component:
                post.append(dice(keep_largest_component(pred[0], range(1, num_classes))[None], batch["label"]))
    if ctx is not None:
        raw = [row for rank_rows in distributed.all_gather(raw, ctx) for row in rank_rows]
        post = [row for rank_rows in distributed.all_gather(post, ctx) for row in rank_rows]
    empty = np.zeros((0, num_classes - 1))
    stack = lambda rows: np.concatenate(rows) if rows else empty  # noqa: E731
    return stack(raw), stack(post) if largest_component else None


def fit_epochs(budget_s: float, elapsed_s: float, epochs_done: int, max_epochs: int, val_s: float = 0.0,
               val_interval: int = 1) -> int:
    """How many epochs in all fit a wall-clock budget, from the time the ``epochs_done`` epochs so far took.

    ``elapsed_s`` covers those epochs whole (training steps, validation, checkpoints); ``val_s`` is the last
    validation's time, added once more for the validation that closes the last epoch. At least the epochs done, at
    most ``max_epochs``.
    """
    if epochs_done == 0:
        return max_epochs
    per_epoch = elapsed_s / epochs_done
    remaining = budget_s - elapsed_s - (val_s if val_interval > 1 else 0.0)
    return int(min(max_epochs, max(epochs_done, epochs_done + math.floor(remaining / per_epoch))))


def training_progress(epoch: int, max_epochs: int, elapsed_s: float = 0.0, budget_s: float | None = None) -> float:
    """Share of the training done before (0-based) ``epoch``: of ``max_epochs``, or with a time budget of the budget
    spent, whichever is further along (in ``[0, 1]``)."""
    done = epoch / max(max_epochs, 1)
    if budget_s is not None:
        done = max(done, elapsed_s / budget_s)
    return min(1.0, done)


def poly_lr(base_lr: float, progress: float) -> float:
    """nnU-Net's polynomial decay at ``progress`` (0 to 1, see :func:`training_progress`)."""
    return base_lr * max(0.0, 1.0 - progress) ** POLY_POWER


def group_lr(lr: float, group: dict, progress: float, warmup_fraction: float) -> float:
    """The learning rate of one optimiser parameter group: ``lr`` times the group's ``lr_scale`` (a pretrained
    encoder's ``train.encoder_lr_factor``), and for a group that ``warmup``s, rising linearly from 0 over the first
    ``warmup_fraction`` of training (the randomly initialised decoder settles before the ImageNet features move)."""
    scale = float(group.get("lr_scale", 1.0))
    if group.get("warmup") and warmup_fraction > 0:
        scale *= min(1.0, progress / warmup_fraction)
    return lr * scale


def make_optimizer(training, net: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD or AdamW over the network's parameter groups: a pretrained encoder's own (its learning-rate factor and
    warm-up, :func:`group_lr`), the rest at ``train.learning_rate``."""
    from medseg.networks.encoders import parameter_groups

    groups = parameter_groups(net, training.encoder_lr_factor)  # one group, scale 1, without a pretrained encoder
    if training.optimizer == "sgd":  # nnU-Net's choice
        return torch.optim.SGD(groups, lr=training.learning_rate, momentum=0.99, nesterov=True,
                               weight_decay=training.weight_decay)
    return torch.optim.AdamW(groups, lr=training.learning_rate, weight_decay=training.weight_decay)


@contextlib.contextmanager
def epoch_progress(name: str, state: dict, budget_minutes: float | None, ctx):
    """A progress bar over the fold's epochs on rank 0 when the output is a terminal (off otherwise): the epochs the
    budget allows as its total (refitted after each epoch), the loss, the validation Dice and the time left. Yields
    the function to call after each epoch with its record."""
    from tqdm.auto import tqdm

    bar = tqdm(total=state["epochs"], initial=state["epoch"], desc=f"train {name}", unit="epoch", leave=False,
               disable=None if ctx.is_main else True)

    def after(record: dict) -> None:
        shown = {"loss": f"{record['train_loss']:.3f}"}
        if "val_dice" in record:
            shown["dice"] = f"{record['val_dice']:.3f}"
        if budget_minutes is not None:
            shown["left"] = f"{max(0.0, budget_minutes - state['elapsed_s'] / 60):.1f} min"
        bar.total = state["epochs"]
        bar.set_postfix(shown, refresh=False)
        bar.update(1)

    try:
        yield after
    finally:
        bar.close()

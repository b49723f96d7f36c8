"""Train stage: the planned network on one fold (or every fold in turn), tracked in MLflow, resumable exactly.

For each cross-validation fold ``k`` (``train.fold``: an int, or ``all`` for every fold) and, with
``train.final_model``, for the model trained on every labelled case (``fold_all``, the one that serves), this writes
the model folder :mod:`medseg.inference.model_folder` describes and ``<paths.checkpoints>/fold_<k>/last.pt``. The model
folder is swapped in whole at the end, so an interrupted stage leaves none half-written. Each fold is its own MLflow
run (``<model>-fold<k>``, tagged ``fold`` and ``cv_group``), with its final network logged as a model.

As nnU-Net, the weights kept are the last epoch's, never the epoch that scored best on the held-out patients (that
choice would leak them into the cross-validation estimate). With ``train.time_budget_minutes`` training stops at
the last epoch that fits the wall-clock budget (measured epoch and validation times, refitted after every epoch)
and nnU-Net's polynomial learning-rate decay runs on the share of the budget spent, so it reaches (nearly) zero
when the budget ends on any machine, however its load changes. The budget counts the epochs (steps, validation,
checkpoints), not the start-up (building the cache).

The final validation of each cross-validation fold scores its held-out cases with and without keeping each class's
largest connected component; ``evaluate.largest_component: auto`` keeps it for the classes where that improves the
pooled cross-validation Dice (nnU-Net's ``determine_postprocessing``) and writes the decision into every fold's
inference config and ``postprocessing.json``.

The checkpoint, written atomically after every epoch, holds everything the next epoch depends on: weights, optimiser,
scheduler, AMP scaler, every rank's torch/NumPy/Python/CUDA RNG and loader states, history and the MLflow run id.
``resume=True`` continues from it when params, plan, data, code and world size match, so a run killed with SIGKILL
ends with the same weights and optimiser steps as an uninterrupted one and logs into the same MLflow run.

Under ``torchrun`` training is data-parallel (see :mod:`medseg.training.distributed`): each rank scores its share of the
validation cases, and rank 0 alone logs and writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.common.atomic_write import atomic_dir, atomic_path, write_json
from medseg.inference.model_folder import (ALL, CONFIG_NAME, HISTORY_NAME, MODEL_NAME, POSTPROCESSING_NAME, RUN_NAME, fold_name,
                                 largest_component_classes, update_config)
from medseg.common.manifest import FRAME_MODALITIES, registered_model_name
from medseg.common.params import Params
from medseg.evaluation.postprocessing import class_means, decide_postprocessing
from medseg.inference.postprocess import keep_largest_component

__all__ = ["run", "data_lists", "train_epoch", "validate", "validate_cases", "inference_config", "amp_settings",
           "fit_epochs", "training_progress", "poly_lr", "group_lr", "training_inputs", "CHECKPOINT_NAME"]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
# The code a training run executes: this module's import closure within medseg (medseg.common.code_deps, the same source as
# the train stage's code deps in dvc.yaml). A checkpoint made with another version of any of it is not resumed.
TRAINING_MODULE = "medseg.training.train"
POSTPROCESS_MODULES = ("medseg.inference.postprocess", "medseg.evaluation.postprocessing")
# nnU-Net's polynomial learning-rate decay: lr = lr0 * (1 - epoch / epochs) ** 0.9
POLY_POWER = 0.9


def inference_config(spec: dict, plan: Any, labels: dict[int, str], modality: str, params: Params,
                     fold: int | str, largest_component: list[int] | bool, in_channels: int = 1) -> dict[str, Any]:
    """Everything ``medseg predict`` needs to rebuild the network and its preprocessing."""
    return {
        "network": spec,
        "in_channels": in_channels,
        "out_channels": max(labels) + 1,
        "labels": {str(k): v for k, v in sorted(labels.items())},
        "modality": modality,
        "target_spacing": [float(s) for s in plan.target_spacing],
        "normalization": plan.normalization,
        "patch_size": [int(s) for s in plan.patch_size],
        "tta": params.evaluate.tta,
        "sw_overlap": params.evaluate.sw_overlap,  # predict's sliding window, as evaluate scored the model
        "sw_batch_size": params.evaluate.sw_batch_size,
        "largest_component": largest_component,  # classes, or true/false for all of them
        "fold": fold,
    }


def data_lists(params: Params, fold: int | None = None) -> tuple[list[dict], list[dict], Any]:
    """Training and validation ``{"image", "label", "case_id"}`` dicts of ``fold`` (default ``train.fold``).

    ``fold`` is a cross-validation fold number, or :data:`medseg.inference.model_folder.ALL` for the all-data model: every
    labelled case to train on and none to validate on.
    """
    from medseg.common.errors import StageInputError
    from medseg.preprocessing.preprocess import read_dataset, read_splits

    fold = params.train.fold if fold is None else fold
    dataset = read_dataset(params.paths.preprocessed)
    if fold == ALL:
        split = {"train": sorted(c.case_id for c in dataset.cases), "val": []}
    else:
        split = read_splits(params.paths.preprocessed, int(fold))
    by_id = {c.case_id: c for c in dataset.cases}

    def files(ids: list[str]) -> list[dict]:
        return [{"image": str(dataset.image_path(by_id[i])), "label": str(dataset.label_path(by_id[i])),
                 "case_id": i} for i in ids]

    train_files, val_files = files(split["train"]), files(split["val"])
    if not train_files or (not val_files and fold != ALL):
        raise StageInputError(f"fold {fold} of {params.paths.preprocessed}/splits.json has {len(train_files)} "
                              f"training and {len(val_files)} validation cases; both must be non-empty")
    return train_files, val_files, dataset


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


def validate(net: torch.nn.Module, loader, inferer, num_classes: int, device: torch.device,
             amp_dtype: torch.dtype | None = None, ctx: Any = None) -> np.ndarray:
    """Mean Dice per foreground class, shape ``(num_classes - 1,)``: :func:`validate_cases` averaged over cases
    (classes absent from a case's ground truth do not count for that case)."""
    rows, _ = validate_cases(net, loader, inferer, num_classes, device, amp_dtype, ctx)
    return class_means(rows)


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


def _digest(params: Params, plan: Any, data_md5: str, *extra: Any, code: bool = False) -> str:
    """Hash of what shapes training: params sections (``train.fold`` aside), plan, data, ``extra`` and, with
    ``code``, the source of :func:`training_code`."""
    digest = hashlib.sha256()
    sections = {name: params.section(name) for name in ("plan", "preprocess", "model", "train")}
    sections["train"].pop("fold")
    digest.update(json.dumps([sections, dataclasses.asdict(plan), data_md5, *extra], sort_keys=True,
                             default=str).encode())
    if code:
        _hash_code(digest)
    return digest.hexdigest()


def training_code() -> list[str]:
    """The source files that shape the weights: :data:`TRAINING_MODULE`'s import closure without post-processing
    (:data:`POSTPROCESS_MODULES`, which the train stage also runs, on the final validation)."""
    from medseg.common.code_deps import module_closure

    return module_closure(TRAINING_MODULE, stop=set(POSTPROCESS_MODULES))


def _hash_code(digest, files: list[str] | None = None) -> None:
    from medseg.common.code_deps import PACKAGE_ROOT

    for name in training_code() if files is None else files:
        digest.update(name.encode() + b"\x1f")
        digest.update((PACKAGE_ROOT / name).read_bytes())


def postprocess_code() -> str:
    """Hash of the post-processing code: a finished fold whose final validation was post-processed by other code is
    validated again on resume (its weights still stand)."""
    from medseg.common.code_deps import module_closure

    digest = hashlib.sha256()
    _hash_code(digest, sorted({f for m in POSTPROCESS_MODULES for f in module_closure(m)}))
    return digest.hexdigest()


def training_inputs(params: Params) -> str:
    """What a retraining would learn from, as one hash: the ingested data's content (images, labels, manifest; not
    ingest's re-run cache, which holds file times), the params that shape planning, preprocessing, training and
    post-processing (``train.fold`` and where the data lives aside), and the code of those stages.

    Each training run is tagged with it and ``register`` copies the tag onto the model version; a scheduled flow
    whose inputs equal the champion's has nothing to learn and skips training (``pipelines/medseg_flow.py``).
    Computed after ingest, before plan and preprocess: reading the ingested files takes seconds.
    """
    from medseg.common.atomic_write import is_temporary
    from medseg.common.manifest import CACHE_NAME

    digest = hashlib.sha256()
    root = Path(params.paths.ingested)
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != CACHE_NAME and not is_temporary(p)):
        digest.update(path.relative_to(root).as_posix().encode() + b"\x1f")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    sections = {name: params.section(name) for name in ("data", "plan", "preprocess", "model", "train", "evaluate")}
    sections["train"].pop("fold")
    sections["data"].pop("source")
    digest.update(json.dumps(sections, sort_keys=True, default=str).encode())
    _hash_code(digest)  # preprocess.py among it: the ingested data's content stands for ingest's code
    digest.update(postprocess_code().encode())
    return digest.hexdigest()


def _check_against_champion(params: Params) -> dict[str, Any]:
    """Compare the data about to be trained on with the champion's (both ``medseg plan`` fingerprints): a different
    label map or modality stops here with one clear line; shifts in spacing and intensity come back as a summary
    (logged to MLflow and shown on the model card). Empty when there is no champion or it logged no fingerprint."""
    import mlflow

    from medseg.registry.drift import compare_fingerprints
    from medseg.common.errors import StageInputError
    from medseg.planning.fingerprint import FINGERPRINT_NAME, read_fingerprint
    from medseg.common.tracking import champion_version

    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 checks; the others follow its outcome
        return {}
    name = registered_model_name(params)
    current = champion_version(params.mlflow, name)
    if current is None or not current.run_id:
        return {}
    try:
        path = mlflow.artifacts.download_artifacts(run_id=current.run_id, artifact_path=FINGERPRINT_NAME)
    except Exception:  # a champion from before fingerprints were logged: nothing to compare with
        return {}
    blocking, drift = compare_fingerprints(json.loads(Path(path).read_text()), read_fingerprint(params.paths.plans))
    if blocking:
        raise StageInputError(f"the data does not match what champion version {current.version} of "
                              f"{name} was trained on: {'; '.join(blocking)}. Train it under "
                              f"another register.model_name, or fix data.source")
    log.info("data against champion version %s: %s", current.version, drift)
    return drift


def _rng_state(device: torch.device) -> dict[str, Any]:
    """Every global generator, as tensors and plain types (the checkpoint loads with ``weights_only=True``)."""
    from medseg.training.loaders import plain_numpy_state

    return {"torch": torch.get_rng_state(), "numpy": plain_numpy_state(np.random.get_state()),
            "python": random.getstate(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    from medseg.training.loaders import numpy_state

    torch.set_rng_state(state["torch"])
    np.random.set_state(numpy_state(state["numpy"]))
    random.setstate(state["python"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint at ``path``, loaded with ``weights_only=True`` (tensors and plain types only: a file planted
    there cannot run code); None, with a warning, when it cannot be loaded that way."""
    import pickle

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as err:
        log.warning("checkpoint %s cannot be loaded safely (%s): starting afresh", path,
                    str(err).splitlines()[0] if str(err) else type(err).__name__)
        return None
    return ckpt if isinstance(ckpt, dict) else None


def _optimizer(training, net: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD or AdamW over the network's parameter groups: a pretrained encoder's own (its learning-rate factor and
    warm-up, :func:`group_lr`), the rest at ``train.learning_rate``."""
    from medseg.networks.encoders import parameter_groups

    groups = parameter_groups(net, training.encoder_lr_factor)  # one group, scale 1, without a pretrained encoder
    if training.optimizer == "sgd":  # nnU-Net's choice
        return torch.optim.SGD(groups, lr=training.learning_rate, momentum=0.99, nesterov=True,
                               weight_decay=training.weight_decay)
    return torch.optim.AdamW(groups, lr=training.learning_rate, weight_decay=training.weight_decay)


def _build_for_training(params: Params, spec: dict, in_channels: int, num_classes: int,
                        device: torch.device) -> tuple[torch.nn.Module, torch.memory_format]:
    """The planned network on ``device``, its pretrained encoder (if any) filled from the planned weights file, and
    the memory format it trains in: channels-last for pretrained encoders (their depthwise convolutions: 1.6x the
    frames per second of the default layout on 2 CPU cores)."""
    from medseg.common.errors import StageInputError
    from medseg.networks.architectures import build_network

    net = build_network(spec, in_channels, num_classes)
    if not spec.get("encoder"):
        return net.to(device), torch.contiguous_format
    from medseg.networks.encoders import load_encoder_weights
    from medseg.networks.pretrained_weights import INSTALL_HINT, weights_file

    path = weights_file(spec["encoder"], params.model.encoder_weights)
    if path is None:
        raise StageInputError(f"the plan's pretrained encoder {spec['encoder']} has no weights file here "
                              f"({INSTALL_HINT})")
    loaded = load_encoder_weights(net, path, spec.get("encoder_sha256"))
    log.info("encoder %s: %d ImageNet tensors from %s", spec["encoder"], loaded, path)
    return net.to(device, memory_format=torch.channels_last), torch.channels_last


def run(params: Params, resume: bool = False, inputs: str | None = None,
        recorded: dict[str, Any] | None = None) -> dict:
    """Train every fold ``train.fold`` names, then (``train.final_model``) the all-data model ``fold_all``.

    ``inputs``: :func:`training_inputs` when the caller has just computed it (the flow's unchanged check), so the
    ingested data is not hashed twice; computed here otherwise. ``recorded``: DVC's record of the preprocessed
    folder (:func:`medseg.common.tracking.dvc_record`), whose hash then versions the data in MLflow.

    Returns ``{"model": paths.model, "folds": [per-fold summary], "postprocessing": decision}``.
    """
    from medseg.training import distributed
    from medseg.planning.plan import check_network_current, read_plan
    from medseg.preprocessing.preprocess import read_dataset
    from medseg.common.tracking import data_version

    plan = read_plan(params.paths.plans)
    check_network_current(plan, params.section("model"))
    folds = params.train.folds(params.preprocess.folds)
    labels = read_dataset(params.paths.preprocessed).labels
    version = data_version(params.paths.preprocessed, recorded)  # once: hashing a large data set takes a while
    version["training_inputs"] = inputs or training_inputs(params)
    drift = _check_against_champion(params)
    if drift:
        version["drift_summary"] = json.dumps(drift, sort_keys=True)
    choice = params.evaluate.largest_component
    with distributed.distributed(params.train.device) as ctx:
        summaries, raw, post = [], [], []
        with atomic_dir(params.paths.model) if ctx.is_main else contextlib.nullcontext() as out:
            for fold in folds:
                summary, final_val = _train_fold(params, plan, version, fold, resume, ctx, out, choice)
                summaries.append(summary)
                if final_val is not None:
                    raw.append(np.asarray(final_val["raw"]))
                    post.append(np.asarray(final_val["post"]))
            if choice == "auto" and raw:
                decision = decide_postprocessing(np.concatenate(raw), np.concatenate(post), labels)
            else:
                decision = {"largest_component": largest_component_classes({"largest_component": choice is True},
                                                                           len(labels))}
            decision["cv_folds"] = [s["fold"] for s in summaries]
            if ctx.is_main:

                write_json(out / POSTPROCESSING_NAME, decision)
                for fold in folds:
                    update_config(out / fold_name(fold), largest_component=decision["largest_component"])
                log.info("post-processing from cross-validation: largest component kept for classes %s (%s)",
                         decision["largest_component"], decision)
            if params.train.final_model:
                summary, _ = _train_fold(params, plan, version, ALL, resume, ctx, out,
                                         decision["largest_component"])
                summaries.append(summary)
        if ctx.is_main:
            log.info("model written to %s (%s)", params.paths.model, ", ".join(fold_name(s["fold"]) for s in summaries))
        distributed.barrier(ctx)  # the model folder is in place before any rank returns
    return {"model": params.paths.model, "folds": summaries, "postprocessing": decision}


def _train_fold(params: Params, plan: Any, version: dict, fold: int | str, resume: bool, ctx, out: Path | None,
                largest_component: list[int] | bool | str) -> tuple[dict, dict | None]:
    """Train (or finish, or just re-export) one fold; every rank runs this, rank 0 writes into ``out``.

    Returns the fold's summary and, for a cross-validation fold, its final validation's per-case Dice without and
    with the largest-component post-processing (``{"raw": rows, "post": rows}``).
    """
    from monai.utils import set_determinism

    from medseg.training import distributed
    from medseg.training.loaders import loader_random_state, make_train_loader, make_val_loader, set_loader_random_state
    from medseg.inference.sliding_window import build_inferer
    from medseg.networks.architectures import build_loss

    training, device = params.train, ctx.device
    train_files, val_files, dataset = data_lists(params, fold)
    num_classes = dataset.num_classes
    spec = plan.network  # planned once, by medseg plan
    # what a checkpoint must match to be resumed
    resume_key = _digest(params, plan, version["data_md5"], fold, ctx.world_size, code=True)
    post_code = postprocess_code()  # recorded with the final validation's post-processed Dice
    amp_dtype, use_scaler = amp_settings(training.amp, device, training.cpu_amp)
    budget_s = None if training.time_budget_minutes is None else 60.0 * training.time_budget_minutes

    set_determinism(seed=training.seed)
    in_channels = dataset.cases[0].channels  # one number for all cases (plan checks): RGB frames 3, volumes 1
    net, memory_format = _build_for_training(params, spec, in_channels, num_classes, device)
    optimizer = _optimizer(training, net)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    loss_fn = build_loss(spec, training.loss)
    train_loader = make_train_loader(train_files, plan, training, num_classes, device, training.seed,
                                     params.paths.cache,
                                     rank=ctx.rank, world_size=ctx.world_size, in_channels=in_channels,
                                     frames=_modality(dataset) in FRAME_MODALITIES)
    val_share = val_files[ctx.rank::ctx.world_size]
    val_loader = make_val_loader(val_share) if val_share else []
    inferer = build_inferer(plan.patch_size, spec["spatial_dims"], params.evaluate.sw_overlap,
                            params.evaluate.sw_batch_size)

    ckpt_path = Path(params.paths.checkpoints) / fold_name(fold) / CHECKPOINT_NAME
    state = {"epoch": 0, "epochs": training.max_epochs, "elapsed_s": 0.0, "val_s": 0.0, "best_dice": -1.0,
             "best_epoch": 0, "final_val": None, "history": [], "run_id": None, "model_uri": None}
    ckpt = None
    if resume and ctx.is_main and ckpt_path.is_file():
        ckpt = _load_checkpoint(ckpt_path)
    ckpt = distributed.broadcast(ckpt, ctx)  # one reader; ranks on other nodes need no shared file system
    if ckpt is not None:
        # Restored last: building the network and loaders above consumed randomness the checkpoint supersedes.
        if ckpt.get("resume_key") == resume_key:
            net.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scaler.load_state_dict(ckpt["scaler"])
            _set_rng_state(ckpt["ranks"][ctx.rank]["rng"], device)
            set_loader_random_state(train_loader, ckpt["ranks"][ctx.rank]["loader"])
            state = ckpt["state"]
            log.info("%s: resuming from %s after epoch %d", fold_name(fold), ckpt_path, state["epoch"])
        else:
            log.warning("%s: checkpoint %s was made with other params, plan, data, code or number of "
                        "processes: starting afresh", fold_name(fold), ckpt_path)

    model = distributed.wrap_ddp(net, ctx)
    if training.compile:
        model = torch.compile(model)  # weights stay shared with ``net``, whose state_dict is what gets saved

    def save_checkpoint() -> None:
        ranks = distributed.all_gather({"rng": _rng_state(device), "loader": loader_random_state(train_loader)}, ctx)
        if ctx.is_main:
            with atomic_path(ckpt_path) as tmp:
                torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                            "scaler": scaler.state_dict(), "ranks": ranks, "state": state,
                            "resume_key": resume_key}, tmp)

    cv_group = f"{params.model.name}-cv-{_digest(params, plan, version['data_md5'])[:12]}"
    with _mlflow_run(params, state, fold, cv_group, version, ctx) if ctx.is_main else contextlib.nullcontext():
        while state["epoch"] < state["epochs"]:
            epoch, started = state["epoch"], time.perf_counter()
            # With a budget the decay follows the clock, so it ends with the budget whatever the machine's load.
            progress = training_progress(epoch, training.max_epochs, state["elapsed_s"], budget_s)
            lr = poly_lr(training.learning_rate, progress)
            for group in optimizer.param_groups:
                group["lr"] = group_lr(lr, group, progress, training.encoder_warmup_fraction)
            stats = train_epoch(model, train_loader, optimizer, scaler, loss_fn, device, amp_dtype, memory_format)
            record = {"epoch": epoch + 1, "train_loss": distributed.mean_over_ranks(stats["loss"], ctx), "lr": lr,
                      "data_wait_fraction": distributed.mean_over_ranks(stats["data_wait_fraction"], ctx),
                      "epoch_seconds": stats["seconds"]}
            if budget_s is not None:  # rank 0's clock decides, so every rank stops after the same epoch
                elapsed = state["elapsed_s"] + time.perf_counter() - started
                fitted = fit_epochs(budget_s, elapsed, epoch + 1, training.max_epochs, state["val_s"],
                                    training.val_interval)
                state["epochs"] = distributed.broadcast(fitted, ctx)
            last = epoch + 1 >= state["epochs"]
            if val_files and ((epoch + 1) % training.val_interval == 0 or last):
                val_started = time.perf_counter()
                rows, post = validate_cases(net, val_loader, inferer, num_classes, device, amp_dtype, ctx,
                                            largest_component=last)
                per_class = class_means(rows)
                record["val_dice"] = float(np.nanmean(per_class))
                for label, dice in zip(sorted(dataset.labels)[1:], per_class):
                    record[f"val_dice_{dataset.labels[label]}"] = float(dice)
                if record["val_dice"] > state["best_dice"]:  # reported; the weights kept are the last epoch's
                    state.update(best_dice=record["val_dice"], best_epoch=epoch + 1)
                if last:
                    state["final_val"] = {"raw": rows.tolist(), "post": post.tolist(),
                                          "postprocess_code": post_code}
                state["val_s"] = time.perf_counter() - val_started
            state["history"].append(record)
            state["epoch"] = epoch + 1
            save_checkpoint()
            state["elapsed_s"] = distributed.broadcast(state["elapsed_s"] + time.perf_counter() - started, ctx)
            if ctx.is_main:  # after the checkpoint: a resumed run re-logs only what never reached MLflow
                _log_epoch(record)
                dice = f"{record['val_dice']:.4f}" if "val_dice" in record else "-"
                log.info("%s epoch %d/%d: loss %.4f, lr %.2e, val Dice %s, data wait %.0f%%", fold_name(fold),
                         epoch + 1, state["epochs"], record["train_loss"], lr, dice,
                         100 * record["data_wait_fraction"])
        if val_files and state["final_val"] and state["final_val"].get("postprocess_code") != post_code:
            # resumed after the last epoch, and post-processing changed since: validate again, keep the weights
            rows, post = validate_cases(net, val_loader, inferer, num_classes, device, amp_dtype, ctx,
                                        largest_component=True)
            state["final_val"] = {"raw": rows.tolist(), "post": post.tolist(), "postprocess_code": post_code}
            log.info("%s: post-processing code changed since the last epoch: validated again", fold_name(fold))
        if log.isEnabledFor(logging.DEBUG):  # lets the torchrun test check that every rank ends with equal weights
            log.debug("rank %d fold %s final weights sha256 %s", ctx.rank, fold,
                      distributed.weights_digest(net.state_dict()))
        if ctx.is_main:
            config = inference_config(spec, plan, dataset.labels, _modality(dataset), params, fold,
                                      largest_component if largest_component != "auto" else True,
                                      in_channels=in_channels)
            _write_fold(out / fold_name(fold), net, state, config)
        save_checkpoint()  # now carrying the logged model's URI, so a re-run does not log it twice
    final_dice = state["history"][-1].get("val_dice") if state["history"] else None
    summary = {"fold": fold, "run_id": state["run_id"], "epochs": state["epoch"],
               "final_val_dice": None if final_dice is None else round(final_dice, 4),
               "best_val_dice": None if state["best_dice"] < 0 else round(state["best_dice"], 4),
               "best_epoch": state["best_epoch"], "train_minutes": round(state["elapsed_s"] / 60, 2),
               "data_wait_fraction": round(float(np.mean([r["data_wait_fraction"] for r in state["history"]])), 4)}
    return distributed.broadcast(summary, ctx), state["final_val"]


def _modality(dataset) -> str:
    modalities = [c.modality for c in dataset.cases]
    return max(set(modalities), key=modalities.count)


@contextlib.contextmanager
def _mlflow_run(params: Params, state: dict, fold: int | str, cv_group: str, version: dict, ctx):
    """Start (or reopen, on resume) the fold's MLflow run; re-log epochs a kill kept from reaching it."""
    import mlflow

    from medseg.planning.fingerprint import FINGERPRINT_NAME
    from medseg.common.tracking import configure_mlflow, flatten_params, git_commit

    configure_mlflow(params.mlflow)
    resumed = state["run_id"] is not None
    with mlflow.start_run(run_id=state["run_id"], run_name=None if resumed else f"{params.model.name}-fold{fold}"):
        if resumed:
            history = mlflow.MlflowClient().get_metric_history(state["run_id"], "train_loss")
            logged = max((m.step for m in history), default=0)
            for record in state["history"]:
                if record["epoch"] > logged:
                    _log_epoch(record)
        else:
            state["run_id"] = mlflow.active_run().info.run_id
            mlflow.log_params({**flatten_params(params), "train.fold": fold})
            mlflow.set_tags({"git_commit": git_commit(), **version, "fold": str(fold), "cv_group": cv_group,
                             "device": ctx.device.type, "world_size": str(ctx.world_size), "model": params.model.name})
            # what the next retraining is checked against
            mlflow.log_artifact(str(Path(params.paths.plans) / FINGERPRINT_NAME))
            if version.get("drift_summary"):
                drift = json.loads(version["drift_summary"])
                mlflow.log_dict(drift, "drift.json")
                shifts = [abs(v["mean_shift_sd"]) for v in drift.get("intensity", {}).values()]
                mlflow.log_metrics({k: v for k, v in {"drift_spacing_ratio_max": drift.get("spacing_ratio_max"),
                                                      "drift_intensity_shift_sd": max(shifts, default=None)}.items()
                                    if v is not None})
        yield


def _log_epoch(record: dict) -> None:
    import mlflow

    mlflow.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=record["epoch"])


def _write_fold(out: Path, net: torch.nn.Module, state: dict, config: dict) -> None:
    """The fold's folder (the last epoch's weights) and, once per run, the logged MLflow model."""
    import mlflow

    from medseg.networks.architectures import load_network

    weights = {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}
    best = load_network(config["network"], config["in_channels"], config["out_channels"], weights).eval()
    out.mkdir(parents=True)
    torch.save({"state_dict": best.state_dict(), "config": config}, out / MODEL_NAME)
    write_json(out / CONFIG_NAME, config)
    keys = sorted({k for r in state["history"] for k in r}, key=lambda k: (k != "epoch", k))
    lines = [",".join(keys)] + [",".join(str(r.get(k, "")) for k in keys) for r in state["history"]]
    (out / HISTORY_NAME).write_text("\n".join(lines) + "\n")
    if state["model_uri"] is None:
        from medseg.registry.pyfunc_model import log_model

        info = log_model(out, config)
        state["model_uri"] = info.model_uri
        mlflow.log_artifact(str(out / HISTORY_NAME))
        final = {"epochs": state["epoch"], "train_minutes": state["elapsed_s"] / 60}
        if state["best_dice"] >= 0:
            final.update(best_val_dice=state["best_dice"], best_epoch=state["best_epoch"],
                         final_val_dice=state["history"][-1].get("val_dice", float("nan")))
        mlflow.log_metrics(final)
    write_json(out / RUN_NAME, {"run_id": state["run_id"], "model_uri": state["model_uri"], "fold": config["fold"],
                                "best_val_dice": state["best_dice"], "best_epoch": state["best_epoch"],
                                "epochs": state["epoch"], "train_minutes": round(state["elapsed_s"] / 60, 3)})
    log.info("%s: %d epochs in %.1f min; last validation Dice %s (best %.4f at epoch %d)", fold_name(config["fold"]),
             state["epoch"], state["elapsed_s"] / 60, state["history"][-1].get("val_dice", "-"),
             state["best_dice"], state["best_epoch"])

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
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.common.atomic_write import atomic_dir, save_torch
from medseg.common.manifest import FRAME_MODALITIES
from medseg.common.params import Params
from medseg.evaluation.postprocessing import class_means, decide_postprocessing
from medseg.inference.model_folder import (ALL, fold_name, inference_config, largest_component_classes, update_config,
                                           write_fold, write_postprocessing, write_run_record)
from medseg.training import resume as resuming
from medseg.training.loop import (amp_settings, epoch_progress, fit_epochs, group_lr, make_optimizer, poly_lr,
                                  train_epoch, training_progress, validate_cases)

__all__ = ["run"]

log = logging.getLogger(__name__)


def run(params: Params, resume: bool = False, inputs: str | None = None,
        recorded: dict[str, Any] | None = None) -> dict:
    """Train every fold ``train.fold`` names, then (``train.final_model``) the all-data model ``fold_all``.

    ``inputs``: :func:`medseg.training.resume.training_inputs` when the caller has just computed it (the flow's
    unchanged check), so the ingested data is not hashed twice; computed here otherwise. ``recorded``: DVC's record
    of the preprocessed folder (:func:`medseg.common.tracking.dvc_record`), whose hash then versions the data in
    MLflow.

    Returns ``{"model": paths.model, "folds": [per-fold summary], "postprocessing": decision}``.
    """
    from medseg.common.tracking import data_version
    from medseg.planning.plan import check_network_current, read_plan
    from medseg.training import distributed
    from medseg.training.mlflow_run import check_against_champion

    plan = read_plan(params.paths.plans)
    check_network_current(plan, params.section("model"))
    folds = params.train.folds(params.preprocess.folds)
    version = data_version(params.paths.preprocessed, recorded)  # once: hashing a large data set takes a while
    version["training_inputs"] = inputs or resuming.training_inputs(params)
    drift = check_against_champion(params)
    if drift:
        version["drift_summary"] = json.dumps(drift, sort_keys=True)
    with distributed.distributed(params.train.device) as ctx:
        summaries, final_vals = [], []
        with atomic_dir(params.paths.model) if ctx.is_main else contextlib.nullcontext() as out:
            for fold in folds:
                summary, final_val = _train_fold(params, plan, version, fold, resume, ctx, out,
                                                 params.evaluate.largest_component)
                summaries.append(summary)
                final_vals += [final_val] if final_val is not None else []
            decision = _postprocessing(params, final_vals, [s["fold"] for s in summaries])
            if ctx.is_main:
                write_postprocessing(out, decision)
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


def _postprocessing(params: Params, final_vals: list[dict], cv_folds: list) -> dict[str, Any]:
    """``evaluate.largest_component``: ``auto`` decides per class from the folds' final validations (pooled);
    true/false applies to every class."""
    from medseg.preprocessing.preprocess import read_dataset

    labels = read_dataset(params.paths.preprocessed).labels
    choice = params.evaluate.largest_component
    if choice == "auto" and final_vals:
        decision = decide_postprocessing(np.concatenate([np.asarray(v["raw"]) for v in final_vals]),
                                         np.concatenate([np.asarray(v["post"]) for v in final_vals]), labels)
    else:
        decision = {"largest_component": largest_component_classes({"largest_component": choice is True},
                                                                   len(labels))}
    decision["cv_folds"] = cv_folds
    return decision


@dataclasses.dataclass
class _Fold:
    """What one fold trains with, built alike on every rank (the order of building consumes randomness)."""

    name: str
    net: torch.nn.Module
    memory_format: torch.memory_format
    optimizer: torch.optim.Optimizer
    scaler: Any
    loss_fn: Any
    train_loader: Any
    val_loader: Any
    has_val: bool
    inferer: Any
    dataset: Any
    in_channels: int
    amp_dtype: torch.dtype | None
    resume_key: str
    post_code: str
    checkpoint: Path


def _build_fold(params: Params, plan: Any, version: dict, fold: int | str, ctx) -> _Fold:
    """The fold's network, optimiser, loss, loaders and inferer, seeded by ``train.seed``."""
    from monai.utils import set_determinism

    from medseg.inference.sliding_window import build_inferer
    from medseg.networks.architectures import build_loss
    from medseg.training.loaders import data_lists, make_train_loader, make_val_loader

    training, device, spec = params.train, ctx.device, plan.network  # the network as planned by medseg plan
    train_files, val_files, dataset = data_lists(params, fold)
    amp_dtype, use_scaler = amp_settings(training.amp, device, training.cpu_amp)
    set_determinism(seed=training.seed)
    in_channels = dataset.cases[0].channels  # one number for all cases (plan checks): RGB frames 3, volumes 1
    net, memory_format = _build_network(params, spec, in_channels, dataset.num_classes, device)
    optimizer = make_optimizer(training, net)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    loss_fn = build_loss(spec, training.loss)
    train_loader = make_train_loader(train_files, plan, training, dataset.num_classes, device, training.seed,
                                     params.paths.cache, rank=ctx.rank, world_size=ctx.world_size,
                                     in_channels=in_channels, frames=_modality(dataset) in FRAME_MODALITIES)
    val_share = val_files[ctx.rank::ctx.world_size]
    return _Fold(
        name=fold_name(fold), net=net, memory_format=memory_format, optimizer=optimizer, scaler=scaler,
        loss_fn=loss_fn, train_loader=train_loader, val_loader=make_val_loader(val_share) if val_share else [],
        has_val=bool(val_files), dataset=dataset, in_channels=in_channels, amp_dtype=amp_dtype,
        inferer=build_inferer(plan.patch_size, spec["spatial_dims"], params.evaluate.sw_overlap,
                              params.evaluate.sw_batch_size),
        # what a checkpoint must match to be resumed
        resume_key=resuming.digest(params, plan, version["data_md5"], fold, ctx.world_size, code=True),
        post_code=resuming.postprocess_code(),  # recorded with the final validation's post-processed Dice
        checkpoint=Path(params.paths.checkpoints) / fold_name(fold) / resuming.CHECKPOINT_NAME)


def _build_network(params: Params, spec: dict, in_channels: int, num_classes: int,
                   device: torch.device) -> tuple[torch.nn.Module, torch.memory_format]:
    """The planned network on ``device``, its pretrained encoder (if any) filled from the planned weights file, and
    the memory format it trains in: channels-last for pretrained encoders (their depthwise convolutions run faster
    so: benchmarks/README.md)."""
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


def _restore(f: _Fold, resume: bool, ctx, max_epochs: int) -> dict[str, Any]:
    """The fold's training state: from its checkpoint when resuming one made with the same params, plan, data, code
    and number of processes (weights, optimiser, scaler, every generator restored), else a fresh one."""
    from medseg.training import distributed
    from medseg.training.loaders import set_loader_random_state

    state = {"epoch": 0, "epochs": max_epochs, "elapsed_s": 0.0, "val_s": 0.0, "best_dice": -1.0,
             "best_epoch": 0, "final_val": None, "history": [], "run_id": None, "model_uri": None}
    ckpt = resuming.load_checkpoint(f.checkpoint) if resume and ctx.is_main and f.checkpoint.is_file() else None
    ckpt = distributed.broadcast(ckpt, ctx)  # one reader; ranks on other nodes need no shared file system
    if ckpt is None:
        return state
    if ckpt.get("resume_key") != f.resume_key:
        log.warning("%s: checkpoint %s was made with other params, plan, data, code or number of processes: "
                    "starting afresh", f.name, f.checkpoint)
        return state
    # Restored last: building the network and loaders consumed randomness the checkpoint supersedes.
    f.net.load_state_dict(ckpt["model"])
    f.optimizer.load_state_dict(ckpt["optimizer"])
    f.scaler.load_state_dict(ckpt["scaler"])
    resuming.set_rng_state(ckpt["ranks"][ctx.rank]["rng"], ctx.device)
    set_loader_random_state(f.train_loader, ckpt["ranks"][ctx.rank]["loader"])
    log.info("%s: resuming from %s after epoch %d", f.name, f.checkpoint, ckpt["state"]["epoch"])
    return ckpt["state"]


def _save_checkpoint(f: _Fold, state: dict, ctx) -> None:
    """Everything the next epoch depends on, every rank's generators included, written atomically by rank 0."""
    from medseg.training import distributed
    from medseg.training.loaders import loader_random_state

    ranks = distributed.all_gather({"rng": resuming.rng_state(ctx.device),
                                    "loader": loader_random_state(f.train_loader)}, ctx)
    if ctx.is_main:
        save_torch({"model": f.net.state_dict(), "optimizer": f.optimizer.state_dict(),
                    "scaler": f.scaler.state_dict(), "ranks": ranks, "state": state, "resume_key": f.resume_key},
                   f.checkpoint)


def _train_fold(params: Params, plan: Any, version: dict, fold: int | str, resume: bool, ctx, out: Path | None,
                largest_component: list[int] | bool | str) -> tuple[dict, dict | None]:
    """Train (or finish, or just re-export) one fold; every rank runs this, rank 0 writes into ``out``.

    Returns the fold's summary and, for a cross-validation fold, its final validation's per-case Dice without and
    with the largest-component post-processing (``{"raw": rows, "post": rows}``).
    """
    from medseg.training import distributed
    from medseg.training.mlflow_run import fold_run, log_epoch, log_trained_model

    f = _build_fold(params, plan, version, fold, ctx)
    state = _restore(f, resume, ctx, params.train.max_epochs)
    model = distributed.wrap_ddp(f.net, ctx)
    if params.train.compile:
        model = torch.compile(model)  # weights stay shared with ``f.net``, whose state_dict is what gets saved
    tags = {**version, "fold": str(fold), "device": ctx.device.type, "world_size": str(ctx.world_size),
            "cv_group": f"{params.model.name}-cv-{resuming.digest(params, plan, version['data_md5'])[:12]}"}
    with fold_run(params, state, fold, tags) if ctx.is_main else contextlib.nullcontext(), \
            epoch_progress(f.name, state, params.train.time_budget_minutes, ctx) as progress:
        while state["epoch"] < state["epochs"]:
            record = _epoch(params, f, model, state, ctx)
            if ctx.is_main:  # after the checkpoint: a resumed run re-logs only what never reached MLflow
                log_epoch(record)
            progress(record)
        if f.has_val and state["final_val"] and state["final_val"].get("postprocess_code") != f.post_code:
            # resumed after the last epoch, and post-processing changed since: validate again, keep the weights
            state["final_val"] = _final_validation(f, ctx)
            log.info("%s: post-processing code changed since the last epoch: validated again", f.name)
        if log.isEnabledFor(logging.DEBUG):  # lets the torchrun test check that every rank ends with equal weights
            log.debug("rank %d fold %s final weights sha256 %s", ctx.rank, fold,
                      distributed.weights_digest(f.net.state_dict()))
        if ctx.is_main:
            config = inference_config(plan.network, plan, f.dataset.labels, _modality(f.dataset), params.evaluate,
                                      fold, largest_component if largest_component != "auto" else True,
                                      in_channels=f.in_channels)
            folder = out / f.name
            write_fold(folder, f.net.state_dict(), config, state["history"])
            if state["model_uri"] is None:  # once per run, however often the fold is re-exported
                state["model_uri"] = log_trained_model(folder, state)
            write_run_record(folder, {"run_id": state["run_id"], "model_uri": state["model_uri"], "fold": fold,
                                      "best_val_dice": state["best_dice"], "best_epoch": state["best_epoch"],
                                      "epochs": state["epoch"], "train_minutes": round(state["elapsed_s"] / 60, 3)})
            log.info("%s: %d epochs in %.1f min; last validation Dice %s (best %.4f at epoch %d)", f.name,
                     state["epoch"], state["elapsed_s"] / 60, state["history"][-1].get("val_dice", "-"),
                     state["best_dice"], state["best_epoch"])
        _save_checkpoint(f, state, ctx)  # now carrying the logged model's URI, so a re-run does not log it twice
    return distributed.broadcast(_summary(fold, state), ctx), state["final_val"]


def _epoch(params: Params, f: _Fold, model: torch.nn.Module, state: dict, ctx) -> dict[str, Any]:
    """One epoch: the learning rate for the progress made, the optimiser steps, the budget refitted, the validation
    when due, the checkpoint. Updates ``state``; returns the epoch's record."""
    from medseg.training import distributed

    training, epoch, started = params.train, state["epoch"], time.perf_counter()
    budget_s = None if training.time_budget_minutes is None else 60.0 * training.time_budget_minutes
    # With a budget the decay follows the clock, so it ends with the budget whatever the machine's load.
    progress = training_progress(epoch, training.max_epochs, state["elapsed_s"], budget_s)
    lr = poly_lr(training.learning_rate, progress)
    for group in f.optimizer.param_groups:
        group["lr"] = group_lr(lr, group, progress, training.encoder_warmup_fraction)
    stats = train_epoch(model, f.train_loader, f.optimizer, f.scaler, f.loss_fn, ctx.device, f.amp_dtype,
                        f.memory_format)
    record = {"epoch": epoch + 1, "train_loss": distributed.mean_over_ranks(stats["loss"], ctx), "lr": lr,
              "data_wait_fraction": distributed.mean_over_ranks(stats["data_wait_fraction"], ctx),
              "epoch_seconds": stats["seconds"]}
    if budget_s is not None:  # rank 0's clock decides, so every rank stops after the same epoch
        elapsed = state["elapsed_s"] + time.perf_counter() - started
        fitted = fit_epochs(budget_s, elapsed, epoch + 1, training.max_epochs, state["val_s"], training.val_interval)
        state["epochs"] = distributed.broadcast(fitted, ctx)
    last = epoch + 1 >= state["epochs"]
    if f.has_val and ((epoch + 1) % training.val_interval == 0 or last):
        val_started = time.perf_counter()
        rows, post = validate_cases(f.net, f.val_loader, f.inferer, f.dataset.num_classes, ctx.device, f.amp_dtype,
                                    ctx, largest_component=last)
        per_class = class_means(rows)
        record["val_dice"] = float(np.nanmean(per_class))
        for label, dice in zip(sorted(f.dataset.labels)[1:], per_class):
            record[f"val_dice_{f.dataset.labels[label]}"] = float(dice)
        if record["val_dice"] > state["best_dice"]:  # reported; the weights kept are the last epoch's
            state.update(best_dice=record["val_dice"], best_epoch=epoch + 1)
        if last:
            state["final_val"] = {"raw": rows.tolist(), "post": post.tolist(), "postprocess_code": f.post_code}
        state["val_s"] = time.perf_counter() - val_started
    state["history"].append(record)
    state["epoch"] = epoch + 1
    _save_checkpoint(f, state, ctx)
    state["elapsed_s"] = distributed.broadcast(state["elapsed_s"] + time.perf_counter() - started, ctx)
    if ctx.is_main:
        dice = f"{record['val_dice']:.4f}" if "val_dice" in record else "-"
        log.info("%s epoch %d/%d: loss %.4f, lr %.2e, val Dice %s, data wait %.0f%%", f.name, epoch + 1,
                 state["epochs"], record["train_loss"], lr, dice, 100 * record["data_wait_fraction"])
    return record


def _final_validation(f: _Fold, ctx) -> dict[str, Any]:
    rows, post = validate_cases(f.net, f.val_loader, f.inferer, f.dataset.num_classes, ctx.device, f.amp_dtype, ctx,
                                largest_component=True)
    return {"raw": rows.tolist(), "post": post.tolist(), "postprocess_code": f.post_code}


def _summary(fold: int | str, state: dict) -> dict[str, Any]:
    final_dice = state["history"][-1].get("val_dice") if state["history"] else None
    return {"fold": fold, "run_id": state["run_id"], "epochs": state["epoch"],
            "final_val_dice": None if final_dice is None else round(final_dice, 4),
            "best_val_dice": None if state["best_dice"] < 0 else round(state["best_dice"], 4),
            "best_epoch": state["best_epoch"], "train_minutes": round(state["elapsed_s"] / 60, 2),
            "data_wait_fraction": round(float(np.mean([r["data_wait_fraction"] for r in state["history"]])), 4)}


def _modality(dataset) -> str:
    modalities = [c.modality for c in dataset.cases]
    return max(set(modalities), key=modalities.count)

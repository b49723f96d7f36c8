"""Train stage: the planned network on one fold (or every fold in turn), tracked in MLflow, resumable exactly.

For each fold ``k`` (``train.fold``: an int, or ``all``) this writes ``<paths.model>/fold_<k>/`` (``model.pt``,
``inference_config.json``, ``run.json``, ``history.csv``) and ``<paths.checkpoints>/fold_<k>/last.pt``. The model
folder is swapped in whole at the end, so an interrupted stage leaves none half-written. Each fold is its own MLflow
run (``<model>-fold<k>``, tagged ``fold`` and ``cv_group``), with the best-validation network logged as a model.

The checkpoint, written atomically after every epoch, holds everything the next epoch depends on: weights, optimiser,
scheduler, AMP scaler, every rank's torch/NumPy/Python/CUDA RNG and loader states, history and the MLflow run id.
``resume=True`` continues from it when params, plan, data, code and world size match, so a run killed with SIGKILL
ends with the same weights and optimiser steps as an uninterrupted one and logs into the same MLflow run.

Under ``torchrun`` training is data-parallel (see :mod:`medseg.distributed`): each rank scores its share of the
validation cases, and rank 0 alone logs and writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.atomic import atomic_dir, atomic_path, write_json
from medseg.params import Params

__all__ = ["run", "data_lists", "train_epoch", "validate", "inference_config", "amp_settings", "CHECKPOINT_NAME",
           "MODEL_NAME", "CONFIG_NAME", "RUN_NAME", "HISTORY_NAME"]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
MODEL_NAME = "model.pt"
CONFIG_NAME = "inference_config.json"
RUN_NAME = "run.json"
HISTORY_NAME = "history.csv"
# The modules whose code shapes the weights (the train stage's code deps in dvc.yaml): a checkpoint made with other
# versions of them is not resumed.
TRAINING_CODE = ("train.py", "data.py", "transforms.py", "networks.py", "plan.py", "distributed.py", "inference.py")


def inference_config(spec: dict, plan: Any, labels: dict[int, str], modality: str, params: Params,
                     fold: int) -> dict[str, Any]:
    """Everything ``medseg predict`` needs to rebuild the network and its preprocessing."""
    return {
        "network": spec,
        "in_channels": 1,
        "out_channels": max(labels) + 1,
        "labels": {str(k): v for k, v in sorted(labels.items())},
        "modality": modality,
        "target_spacing": [float(s) for s in plan.target_spacing],
        "normalization": plan.normalization,
        "patch_size": [int(s) for s in plan.patch_size],
        "tta": params.evaluate.tta,
        "largest_component": params.evaluate.largest_component,
        "fold": fold,
    }


def data_lists(params: Params, fold: int | None = None) -> tuple[list[dict], list[dict], Any]:
    """Training and validation ``{"image", "label", "case_id"}`` dicts of ``fold`` (default ``train.fold``)."""
    from medseg.errors import StageInputError
    from medseg.preprocess import read_dataset, read_splits

    fold = params.train.fold if fold is None else fold
    if fold == "all":
        raise ValueError("data_lists needs one fold; train.fold is 'all'")
    dataset = read_dataset(params.paths.preprocessed)
    split = read_splits(params.paths.preprocessed, int(fold))
    by_id = {c.case_id: c for c in dataset.cases}

    def files(ids: list[str]) -> list[dict]:
        return [{"image": str(dataset.image_path(by_id[i])), "label": str(dataset.label_path(by_id[i])),
                 "case_id": i} for i in ids]

    train_files, val_files = files(split["train"]), files(split["val"])
    if not train_files or not val_files:
        raise StageInputError(f"fold {fold} of {params.paths.preprocessed}/splits.json has {len(train_files)} "
                              f"training and {len(val_files)} validation cases; both must be non-empty")
    return train_files, val_files, dataset


def amp_settings(amp: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """``(autocast dtype or None, use a GradScaler)`` for ``train.amp``: fp16 needs loss scaling, bf16 does not."""
    if amp == "off":
        return None, False
    if device.type != "cuda":
        log.debug("train.amp=%s ignored on %s: mixed precision is for CUDA only", amp, device.type)
        return None, False
    return (torch.float16, True) if amp == "fp16" else (torch.bfloat16, False)


def train_epoch(model: torch.nn.Module, loader, optimizer, scaler, loss_fn, device: torch.device,
                amp_dtype: torch.dtype | None = None) -> dict[str, float]:
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
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        wait += time.perf_counter() - fetch
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = loss_fn(model(images), labels)
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


def validate(net: torch.nn.Module, loader, inferer, num_classes: int, device: torch.device,
             amp_dtype: torch.dtype | None = None, ctx: Any = None) -> np.ndarray:
    """Mean Dice per foreground class, shape ``(num_classes - 1,)``, over the loader's ``(1, 1, X, Y, Z)`` volumes.

    Under ``torchrun`` each rank scores its own share of the volumes (``loader`` may then be empty) and the per-case
    scores of all ranks are pooled; classes absent from a case's ground truth do not count for that case.
    """
    import warnings

    from monai.metrics import compute_dice
    from monai.networks.utils import one_hot

    from medseg import distributed as dd

    rows = []
    net.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        for batch in loader:
            logits = inferer(batch["image"].to(device), net)
            pred = one_hot(logits.argmax(1, keepdim=True).cpu(), num_classes)
            rows.append(compute_dice(pred, one_hot(batch["label"].long(), num_classes), include_background=False,
                                     ignore_empty=True).numpy())
    if ctx is not None:
        rows = [row for rank_rows in dd.all_gather(rows, ctx) for row in rank_rows]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a class absent from every case: NaN, as DiceMetric
        return np.nanmean(np.concatenate(rows), axis=0)


def _digest(params: Params, plan: Any, data_md5: str, *extra: Any, code: bool = False) -> str:
    """Hash of what shapes training: params sections (``train.fold`` aside), plan, data, ``extra`` and, with
    ``code``, the source of :data:`TRAINING_CODE`."""
    digest = hashlib.sha256()
    sections = {name: params.section(name) for name in ("plan", "preprocess", "model", "train")}
    sections["train"].pop("fold")
    digest.update(json.dumps([sections, dataclasses.asdict(plan), data_md5, *extra], sort_keys=True,
                             default=str).encode())
    if code:
        for name in TRAINING_CODE:
            digest.update((Path(__file__).parent / name).read_bytes())
    return digest.hexdigest()


def _rng_state(device: torch.device) -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _optimizer(t, net: torch.nn.Module) -> torch.optim.Optimizer:
    if t.optimizer == "sgd":  # nnU-Net's choice
        return torch.optim.SGD(net.parameters(), lr=t.learning_rate, momentum=0.99, nesterov=True,
                               weight_decay=t.weight_decay)
    return torch.optim.AdamW(net.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)


def run(params: Params, resume: bool = False) -> dict:
    """Train every fold ``train.fold`` names; returns ``{"model": paths.model, "folds": [per-fold summary]}``."""
    from medseg import distributed as dd
    from medseg.plan import read_plan
    from medseg.tracking import data_version

    plan = read_plan(params.paths.plans)
    folds = params.train.folds(params.preprocess.folds)
    version = data_version(params.paths.preprocessed)  # once: hashing a large data set takes a while
    with dd.distributed(params.train.device) as ctx:
        summaries = []
        with atomic_dir(params.paths.model) if ctx.is_main else contextlib.nullcontext() as out:
            for fold in folds:
                summaries.append(_train_fold(params, plan, version, fold, resume, ctx, out))
        if ctx.is_main:
            log.info("model written to %s (%s)", params.paths.model, ", ".join(f"fold_{k}" for k in folds))
        dd.barrier(ctx)  # the model folder is in place before any rank returns
    return {"model": params.paths.model, "folds": summaries}


def _train_fold(p: Params, plan: Any, version: dict, fold: int, resume: bool, ctx, out: Path | None) -> dict:
    """Train (or finish, or just re-export) one fold; every rank runs this, rank 0 writes into ``out``."""
    from monai.utils import set_determinism

    from medseg import distributed as dd
    from medseg.data import loader_random_state, make_train_loader, make_val_loader, set_loader_random_state
    from medseg.inference import build_inferer
    from medseg.networks import build_loss, build_network

    t, device = p.train, ctx.device
    train_files, val_files, dataset = data_lists(p, fold)
    num_classes = dataset.num_classes
    spec = plan.network_spec(p.section("model"))
    fingerprint = _digest(p, plan, version["data_md5"], fold, ctx.world_size, code=True)
    amp_dtype, use_scaler = amp_settings(t.amp, device)

    set_determinism(seed=t.seed)
    net = build_network(spec, 1, num_classes).to(device)
    optimizer = _optimizer(t, net)
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=t.max_epochs, power=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    loss_fn = build_loss(spec)
    train_loader = make_train_loader(train_files, plan, t, num_classes, device, t.seed, p.paths.cache,
                                     rank=ctx.rank, world_size=ctx.world_size)
    val_share = val_files[ctx.rank::ctx.world_size]
    val_loader = make_val_loader(val_share) if val_share else []
    inferer = build_inferer(plan.patch_size, spec["spatial_dims"], p.evaluate.sw_overlap, p.evaluate.sw_batch_size)

    ckpt_path = Path(p.paths.checkpoints) / f"fold_{fold}" / CHECKPOINT_NAME
    state = {"epoch": 0, "best_dice": -1.0, "best_epoch": 0, "best_state": None, "history": [], "run_id": None,
             "model_uri": None}
    ckpt = None
    if resume and ctx.is_main and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    ckpt = dd.broadcast(ckpt, ctx)  # one reader; ranks on other nodes need no shared file system
    if ckpt is not None:
        # Restored last: building the network and loaders above consumed randomness the checkpoint supersedes.
        if ckpt.get("fingerprint") == fingerprint:
            net.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            scaler.load_state_dict(ckpt["scaler"])
            _set_rng_state(ckpt["ranks"][ctx.rank]["rng"], device)
            set_loader_random_state(train_loader, ckpt["ranks"][ctx.rank]["loader"])
            state = ckpt["state"]
            log.info("fold %d: resuming from %s after epoch %d", fold, ckpt_path, state["epoch"])
        else:
            log.warning("fold %d: checkpoint %s was made with other params, plan, data, code or number of "
                        "processes: starting afresh", fold, ckpt_path)

    model = dd.wrap_ddp(net, ctx)
    if t.compile:
        model = torch.compile(model)  # weights stay shared with ``net``, whose state_dict is what gets saved

    def save_checkpoint() -> None:
        ranks = dd.all_gather({"rng": _rng_state(device), "loader": loader_random_state(train_loader)}, ctx)
        if ctx.is_main:
            with atomic_path(ckpt_path) as tmp:
                torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "ranks": ranks,
                            "state": state, "fingerprint": fingerprint}, tmp)

    cv_group = f"{p.model.name}-cv-{_digest(p, plan, version['data_md5'])[:12]}"
    with _mlflow_run(p, state, fold, cv_group, version, ctx) if ctx.is_main else contextlib.nullcontext():
        for epoch in range(state["epoch"], t.max_epochs):
            stats = train_epoch(model, train_loader, optimizer, scaler, loss_fn, device, amp_dtype)
            scheduler.step()
            record = {"epoch": epoch + 1, "train_loss": dd.mean_over_ranks(stats["loss"], ctx),
                      "lr": scheduler.get_last_lr()[0],
                      "data_wait_fraction": dd.mean_over_ranks(stats["data_wait_fraction"], ctx),
                      "epoch_seconds": stats["seconds"]}
            if (epoch + 1) % t.val_interval == 0 or epoch + 1 == t.max_epochs:
                per_class = validate(net, val_loader, inferer, num_classes, device, amp_dtype, ctx)
                record["val_dice"] = float(np.nanmean(per_class))
                for label, dice in zip(sorted(dataset.labels)[1:], per_class):
                    record[f"val_dice_{dataset.labels[label]}"] = float(dice)
                if record["val_dice"] > state["best_dice"]:  # the same decision on every rank
                    state.update(best_dice=record["val_dice"], best_epoch=epoch + 1, best_state=None)
                    if ctx.is_main:  # the only rank that writes the weights out
                        state["best_state"] = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
            state["history"].append(record)
            state["epoch"] = epoch + 1
            save_checkpoint()
            if ctx.is_main:  # after the checkpoint: a resumed run re-logs only what never reached MLflow
                _log_epoch(record)
                dice = f"{record['val_dice']:.4f}" if "val_dice" in record else "-"
                log.info("fold %d epoch %d/%d: loss %.4f, val Dice %s, data wait %.0f%%", fold, epoch + 1,
                         t.max_epochs, record["train_loss"], dice, 100 * record["data_wait_fraction"])
        if log.isEnabledFor(logging.DEBUG):  # lets the torchrun test check that every rank ends with equal weights
            log.debug("rank %d fold %d final weights sha256 %s", ctx.rank, fold, dd.weights_digest(net.state_dict()))
        if ctx.is_main:
            config = inference_config(spec, plan, dataset.labels, _modality(dataset), p, fold)
            _write_fold(out / f"fold_{fold}", net, state, config)
        save_checkpoint()  # now carrying the logged model's URI, so a re-run does not log it twice
    summary = {"fold": fold, "run_id": state["run_id"], "best_val_dice": round(state["best_dice"], 4),
               "best_epoch": state["best_epoch"], "epochs": state["epoch"],
               "data_wait_fraction": round(float(np.mean([r["data_wait_fraction"] for r in state["history"]])), 4)}
    return dd.broadcast(summary, ctx)


def _modality(dataset) -> str:
    modalities = [c.modality for c in dataset.cases]
    return max(set(modalities), key=modalities.count)


@contextlib.contextmanager
def _mlflow_run(p: Params, state: dict, fold: int, cv_group: str, version: dict, ctx):
    """Start (or reopen, on resume) the fold's MLflow run; re-log epochs a kill kept from reaching it."""
    import mlflow

    from medseg.tracking import configure_mlflow, flatten_params, git_commit

    configure_mlflow(p.mlflow)
    resumed = state["run_id"] is not None
    with mlflow.start_run(run_id=state["run_id"], run_name=None if resumed else f"{p.model.name}-fold{fold}"):
        if resumed:
            history = mlflow.MlflowClient().get_metric_history(state["run_id"], "train_loss")
            logged = max((m.step for m in history), default=0)
            for record in state["history"]:
                if record["epoch"] > logged:
                    _log_epoch(record)
        else:
            state["run_id"] = mlflow.active_run().info.run_id
            mlflow.log_params({**flatten_params(p), "train.fold": fold})
            mlflow.set_tags({"git_commit": git_commit(), **version, "fold": str(fold), "cv_group": cv_group,
                             "device": ctx.device.type, "world_size": str(ctx.world_size), "model": p.model.name})
        yield


def _log_epoch(record: dict) -> None:
    import mlflow

    mlflow.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=record["epoch"])


def _write_fold(out: Path, net: torch.nn.Module, state: dict, config: dict) -> None:
    """The fold's folder (best-validation weights) and, once per run, the logged MLflow model."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from medseg.networks import build_network

    best = build_network(config["network"], config["in_channels"], config["out_channels"])
    best.load_state_dict(state["best_state"] or {k: v.cpu() for k, v in net.state_dict().items()})
    best.eval()
    out.mkdir(parents=True)
    torch.save({"state_dict": best.state_dict(), "config": config}, out / MODEL_NAME)
    write_json(out / CONFIG_NAME, config)
    keys = sorted({k for r in state["history"] for k in r}, key=lambda k: (k != "epoch", k))
    lines = [",".join(keys)] + [",".join(str(r.get(k, "")) for k in keys) for r in state["history"]]
    (out / HISTORY_NAME).write_text("\n".join(lines) + "\n")
    if state["model_uri"] is None:
        spatial = [-1] * int(config["network"]["spatial_dims"])
        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, config["in_channels"], *spatial))]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, config["out_channels"], *spatial))]),
        )
        # Pickle, not the pt2 default: pt2 bakes the example's shape into the graph, and segmentation networks
        # must run on any patch and batch size. The classes pickled are MONAI's, which are stable across releases,
        # except an Attention U-Net with deep supervision: medseg.networks.DeepSupervisedAttentionUnet (must not move).
        info = mlflow.pytorch.log_model(best, name="model", serialization_format="pickle", signature=signature,
                                        extra_files=[str(out / CONFIG_NAME)],
                                        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "monai",
                                                          "numpy"])
        state["model_uri"] = info.model_uri
        mlflow.log_artifact(str(out / HISTORY_NAME))
        mlflow.log_metrics({"best_val_dice": state["best_dice"], "best_epoch": state["best_epoch"]})
    write_json(out / RUN_NAME, {"run_id": state["run_id"], "model_uri": state["model_uri"], "fold": config["fold"],
                                "best_val_dice": state["best_dice"], "best_epoch": state["best_epoch"],
                                "epochs": state["epoch"]})
    log.info("fold %d: best validation Dice %.4f at epoch %d", config["fold"], state["best_dice"],
             state["best_epoch"])

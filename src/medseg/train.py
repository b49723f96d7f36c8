"""Train stage: a MONAI U-Net or Attention U-Net on the preprocessed training fold, tracked in MLflow.

A checkpoint is written atomically after every epoch; ``resume=True`` continues from it (same MLflow run) when it
was made with the same parameters, data and code. The best-validation weights end up in ``paths.model`` together
with the inference config that ``medseg predict`` needs, and in the MLflow run as a logged model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.atomic import atomic_dir, atomic_path, write_json
from medseg.params import Params

__all__ = ["run", "data_lists", "train_epoch", "validate", "inference_config", "CHECKPOINT_NAME", "MODEL_NAME", "CONFIG_NAME", "RUN_NAME", "HISTORY_NAME"]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
MODEL_NAME = "model.pt"
CONFIG_NAME = "inference_config.json"
RUN_NAME = "run.json"
HISTORY_NAME = "history.csv"


def inference_config(params: Params, labels: dict[int, str], modality: str) -> dict[str, Any]:
    """Everything needed to rebuild the network and its preprocessing at prediction time."""
    return {
        "model": params.section("model"),
        "in_channels": 1,
        "out_channels": max(labels) + 1,
        "labels": {str(k): v for k, v in sorted(labels.items())},
        "modality": modality,
        "target_spacing": list(params.preprocess.target_spacing),
        "ct_window": list(params.preprocess.ct_window),
        "patch_size": list(params.train.patch_size),
    }


def _fingerprint(params: Params, data_md5: str) -> str:
    """What a checkpoint must match to be resumed: params that shape training, the data and the package code."""
    digest = hashlib.sha256()
    for name in ("preprocess", "model", "train"):
        digest.update(json.dumps(params.section(name), sort_keys=True).encode())
    digest.update(data_md5.encode())
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def data_lists(params: Params) -> tuple[list[dict], list[dict], Any]:
    from medseg.errors import StageInputError
    from medseg.preprocess import read_dataset, read_splits

    dataset = read_dataset(params.paths.preprocessed)
    split = read_splits(params.paths.preprocessed, params.train.fold)
    by_id = {c.case_id: c for c in dataset.cases}

    def files(ids: list[str]) -> list[dict]:
        return [{"image": str(dataset.image_path(by_id[i])), "label": str(dataset.label_path(by_id[i])),
                 "case_id": i} for i in ids]

    train_files, val_files = files(split["train"]), files(split["val"])
    if not train_files or not val_files:
        raise StageInputError(f"fold {params.train.fold} has {len(train_files)} training and "
                              f"{len(val_files)} validation cases; both must be non-empty")
    return train_files, val_files, dataset


def train_epoch(net: torch.nn.Module, loader, optimizer, scaler, loss_fn, device: torch.device,
                use_amp: bool) -> list[float]:
    """One pass over ``loader``; mixed precision (fp16 autocast + gradient scaling) when ``use_amp`` on CUDA."""
    net.train()
    losses = []
    for batch in loader:
        images, labels = batch["image"].to(device), batch["label"].to(device)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=use_amp):
            loss = loss_fn(net(images), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    return losses


def validate(net: torch.nn.Module, loader, inferer, num_classes: int, device: torch.device) -> np.ndarray:
    """Mean Dice per foreground class over the loader's volumes."""
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True)
    net.eval()
    with torch.no_grad():
        for batch in loader:
            logits = inferer(batch["image"].to(device), net)
            pred = one_hot(logits.argmax(1, keepdim=True), num_classes)
            metric(pred.cpu(), one_hot(batch["label"], num_classes))
    return metric.aggregate().cpu().numpy()


def run(params: Params, resume: bool = False) -> dict:
    """Train on ``train.fold``'s training cases; returns the best validation Dice and where the model went."""
    import mlflow
    from monai.data import CacheDataset, ThreadDataLoader
    from monai.losses import DiceCELoss
    from monai.utils import set_determinism
    from tqdm import tqdm

    from medseg.inference import build_inferer, select_device
    from medseg.networks import build_network
    from medseg.tracking import configure_mlflow, data_version, flatten_params, git_commit
    from medseg.transforms import eval_transforms, train_transforms

    p, t = params, params.train
    train_files, val_files, dataset = data_lists(p)
    num_classes = dataset.num_classes
    modality = max({c.modality for c in dataset.cases}, key=[c.modality for c in dataset.cases].count)
    version = data_version(p.paths.preprocessed)
    fingerprint = _fingerprint(p, version["data_md5"])
    device = select_device(t.device)
    use_amp = t.amp and device.type == "cuda"

    set_determinism(seed=t.seed)
    net = build_network(p.section("model"), 1, num_classes).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=t.max_epochs, power=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    inferer = build_inferer(t.patch_size, p.model.spatial_dims, p.evaluate.sw_overlap, p.evaluate.sw_batch_size)

    ckpt_path = Path(p.paths.checkpoints) / CHECKPOINT_NAME
    state = {"epoch": 0, "best_dice": -1.0, "best_epoch": 0, "best_state": None, "history": [], "run_id": None}
    if resume and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        if ckpt["fingerprint"] == fingerprint:
            net.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            scaler.load_state_dict(ckpt["scaler"])
            _set_rng_state(ckpt["rng"])
            state = ckpt["state"]
            log.info("resuming from %s at epoch %d", ckpt_path, state["epoch"])
        else:
            log.warning("checkpoint %s was made with other params, data or code: starting afresh", ckpt_path)

    train_ds = CacheDataset(train_files, train_transforms(p.model.spatial_dims, t.patch_size, t.samples_per_volume,
                                                          num_classes),
                            cache_rate=t.cache_rate, num_workers=None, progress=False)
    val_ds = CacheDataset(val_files, eval_transforms(), cache_rate=t.cache_rate, progress=False)
    # A fixed number of steps per epoch (volumes drawn with replacement), so the training budget is the same
    # whether the data set has 8 volumes or 800.
    sampler = torch.utils.data.RandomSampler(train_ds, replacement=True, num_samples=t.steps_per_epoch * t.batch_size)
    train_loader = ThreadDataLoader(train_ds, batch_size=t.batch_size, sampler=sampler, num_workers=t.num_workers)
    val_loader = ThreadDataLoader(val_ds, batch_size=1, num_workers=0)

    configure_mlflow(p.mlflow)
    with mlflow.start_run(run_id=state["run_id"], run_name=None if state["run_id"] else f"{p.model.name}-fold{t.fold}"):
        active = mlflow.active_run()
        if state["run_id"] is None:
            state["run_id"] = active.info.run_id
            mlflow.log_params(flatten_params(p))
            mlflow.set_tags({"git_commit": git_commit(), **version, "fold": str(t.fold), "device": device.type,
                             "model": p.model.name, "spatial_dims": str(p.model.spatial_dims)})
        bar = tqdm(range(state["epoch"], t.max_epochs), desc="train", unit="epoch",
                   initial=state["epoch"], total=t.max_epochs)
        for epoch in bar:
            losses = train_epoch(net, train_loader, optimizer, scaler, loss_fn, device, use_amp)
            scheduler.step()
            record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "lr": scheduler.get_last_lr()[0]}
            if (epoch + 1) % t.val_interval == 0 or epoch + 1 == t.max_epochs:
                per_class = validate(net, val_loader, inferer, num_classes, device)
                record["val_dice"] = float(np.nanmean(per_class))
                for label, dice in zip(sorted(dataset.labels)[1:], per_class):
                    record[f"val_dice_{dataset.labels[label]}"] = float(dice)
                if record["val_dice"] > state["best_dice"]:
                    state.update(best_dice=record["val_dice"], best_epoch=epoch + 1,
                                 best_state={k: v.detach().cpu().clone() for k, v in net.state_dict().items()})
            mlflow.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch + 1)
            state["history"].append(record)
            state["epoch"] = epoch + 1
            bar.set_postfix(loss=f"{record['train_loss']:.3f}", dice=f"{record.get('val_dice', float('nan')):.3f}")
            with atomic_path(ckpt_path) as tmp:
                torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                            "rng": _rng_state(), "state": state, "fingerprint": fingerprint}, tmp)
        result = _finalise(p, net, state, inference_config(p, dataset.labels, modality))
    return result


def _finalise(p: Params, net: torch.nn.Module, state: dict, config: dict) -> dict:
    """Write ``paths.model`` atomically and log the best weights to the active MLflow run."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    net.load_state_dict(state["best_state"] or net.state_dict())
    net = net.cpu().eval()
    with atomic_dir(p.paths.model) as out:
        torch.save({"state_dict": net.state_dict(), "config": config}, out / MODEL_NAME)
        write_json(out / CONFIG_NAME, config)
        keys = sorted({k for r in state["history"] for k in r}, key=lambda k: (k != "epoch", k))
        lines = [",".join(keys)] + [",".join(str(r.get(k, "")) for k in keys) for r in state["history"]]
        (out / HISTORY_NAME).write_text("\n".join(lines) + "\n")
        spatial = [-1] * int(config["model"]["spatial_dims"])
        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, config["in_channels"], *spatial))]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, config["out_channels"], *spatial))]),
        )
        # Pickle, not the pt2 default: pt2 bakes the example's shape into the graph, and segmentation networks
        # must run on any patch and batch size. The classes pickled are MONAI's, which are stable across releases.
        info = mlflow.pytorch.log_model(net, name="model", serialization_format="pickle", signature=signature,
                                        extra_files=[str(out / CONFIG_NAME)],
                                        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "monai",
                                                          "numpy"])
        write_json(out / RUN_NAME, {"run_id": state["run_id"], "model_uri": info.model_uri,
                                    "best_val_dice": state["best_dice"], "best_epoch": state["best_epoch"],
                                    "epochs": state["epoch"]})
        mlflow.log_artifact(str(out / HISTORY_NAME))
        mlflow.log_metrics({"best_val_dice": state["best_dice"], "best_epoch": state["best_epoch"]})
    log.info("best validation Dice %.4f at epoch %d", state["best_dice"], state["best_epoch"])
    return {"run_id": state["run_id"], "best_val_dice": round(state["best_dice"], 4),
            "best_epoch": state["best_epoch"], "epochs": state["epoch"], "model": p.paths.model}

"""The peer of ``benchmarks/accuracy.py``: a plain MONAI tutorial-style 2D U-Net, written as a newcomer would.

Run: ``python benchmarks/tutorial_loop.py --train-list train.json --predict-list predict.json --out DIR --minutes M``
(``train.json``: ``[{"image": path, "label": path}, ...]``; ``predict.json``: ``[{"image": path, "output": path}]``).

Recipe (MONAI's tutorials, nothing planned from the data): RAS, in-plane 1.5 mm (slice thickness kept), per-image
z-score, random 224x224 crops of single slices, flips only, batch 8, Adam 1e-3, DiceCE, for ``--minutes`` of wall
clock. Prediction: slice-wise sliding window, argmax, labels resampled (nearest) back to the input's grid with
``Invertd`` and saved with the input file's affine. ``DIR/summary.json`` records steps and seconds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai import transforms as mt
from monai.data import CacheDataset, DataLoader, MetaTensor
from monai.inferers import SliceInferer
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from monai.utils import set_determinism


def use_pixdim(img: MetaTensor) -> MetaTensor:
    """Give the affine's columns the header's pixdim lengths.

    Not what a newcomer writes, but the public ACDC files carry a 1 mm sform beside the true spacing in pixdim
    (e.g. 1.5625 mm); MONAI trusts the sform, and the peer would then be measured on a header bug, not its recipe.
    """
    affine = img.affine.clone()
    zooms = torch.as_tensor(np.asarray(img.meta["pixdim"][1:4], dtype=np.float64), dtype=affine.dtype)
    affine[:3, :3] = affine[:3, :3] / affine[:3, :3].norm(dim=0) * zooms
    img.affine = affine
    return img


def load_chain(keys: list[str], pixdim: tuple[float, float, float] = (1.5, 1.5, -1)) -> list:
    """The deterministic part: load, channel first, RAS, ``pixdim`` (default 1.5 mm in-plane, slices kept), z-score
    (CacheDataset caches it)."""
    modes = ["bilinear", "nearest"][: len(keys)]
    return [mt.LoadImaged(keys, image_only=True), mt.EnsureChannelFirstd(keys), mt.Lambdad(keys, use_pixdim),
            mt.Orientationd(keys, axcodes="RAS"), mt.Spacingd(keys, pixdim=pixdim, mode=modes),
            mt.NormalizeIntensityd("image", nonzero=False)]


def train_for(net, loader, loss_fn, optimizer, minutes: float, device: torch.device) -> tuple[int, int, float]:
    """Whole epochs of ``loader`` until ``minutes`` of wall clock have passed (at least one step): steps, epochs,
    seconds."""
    start, steps, epochs, shown = time.perf_counter(), 0, 0, 0.0
    while steps == 0 or time.perf_counter() - start < minutes * 60:
        net.train()
        for batch in loader:
            optimizer.zero_grad()
            loss = loss_fn(net(batch["image"].to(device)), batch["label"].to(device))
            loss.backward()
            optimizer.step()
            steps += 1
            if time.perf_counter() - start >= minutes * 60:
                break
        epochs += 1
        if time.perf_counter() - shown > 30:  # a line every 30 s, not one per (short) epoch
            shown = time.perf_counter()
            print(f"epoch {epochs}: {steps} steps, loss {loss.item():.4f}, {shown - start:.0f} s", flush=True)
    return steps, epochs, time.perf_counter() - start


def predict_files(net, pre, inferer, predict_list: str, device: torch.device) -> float:
    """Each ``{"image", "output"}`` of ``predict_list``: ``pre``, ``inferer``, argmax, labels inverted (nearest) onto
    the input's grid and saved with the input file's affine. Returns seconds."""
    net.eval()
    started = time.perf_counter()
    for item in json.loads(Path(predict_list).read_text()):
        data = pre({"image": item["image"]})
        image = data["image"]
        with torch.no_grad():
            logits = inferer(image.as_tensor()[None].to(device), net)
        labels = logits.argmax(1).cpu()  # (1, X, Y, Z) on the loop's grid
        data["pred"] = MetaTensor(labels.float(), meta=image.meta, applied_operations=image.applied_operations)
        pred = mt.Invertd("pred", transform=pre, orig_keys="image", nearest_interp=True)(data)["pred"]
        out = Path(item["output"])
        out.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.asarray(pred[0]).round().astype(np.uint8), nib.load(item["image"]).affine),
                 str(out))
    return time.perf_counter() - started


def write_summary(out: str, device: torch.device, steps: int, epochs: int, train_seconds: float,
                  predict_seconds: float, **extra) -> dict:
    """``OUT/summary.json``, which the yardstick reads (steps and seconds), also printed."""
    summary = {"device": str(device), "steps": steps, "epochs": epochs, "train_seconds": round(train_seconds, 1),
               "predict_seconds": round(predict_seconds, 1), **extra}
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary), flush=True)
    return summary


def peer_parser(doc: str, num_classes: int, example: str, tiny: str) -> argparse.ArgumentParser:
    """The command line every peer loop takes from the yardstick (lists, output folder, budget, classes, seed)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--train-list", required=True)
    parser.add_argument("--predict-list", required=True)
    parser.add_argument("--out", required=True, help="folder for summary.json")
    parser.add_argument("--minutes", type=float, required=True, help="wall-clock training budget")
    parser.add_argument("--num-classes", type=int, default=num_classes, help=f"background included ({example})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help=f"{tiny}: for tests")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = peer_parser(__doc__, 4, "ACDC: 4", "channels 8,16,32 and 48x48 crops").parse_args(argv)

    set_determinism(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    channels, roi = ((8, 16, 32), 48) if args.tiny else ((32, 64, 128, 256, 512), 224)
    net = UNet(spatial_dims=2, in_channels=1, out_channels=args.num_classes, channels=channels,
               strides=(2,) * (len(channels) - 1), num_res_units=2, norm="batch").to(device)

    keys = ["image", "label"]
    train_tf = mt.Compose(load_chain(keys) + [
        mt.SpatialPadd(keys, spatial_size=(roi, roi, 1)),
        mt.RandSpatialCropd(keys, roi_size=(roi, roi, 1), random_size=False),
        mt.SqueezeDimd(keys, dim=-1),
        mt.RandFlipd(keys, prob=0.5, spatial_axis=0), mt.RandFlipd(keys, prob=0.5, spatial_axis=1)])
    train_files = json.loads(Path(args.train_list).read_text())
    loader = DataLoader(CacheDataset(train_files, train_tf, progress=False), batch_size=8, shuffle=True)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)

    steps, epochs, train_seconds = train_for(net, loader, loss_fn, optimizer, args.minutes, device)
    inferer = SliceInferer(roi_size=(roi, roi), spatial_dim=2, sw_batch_size=8, overlap=0.25)
    predict_seconds = predict_files(net, mt.Compose(load_chain(["image"])), inferer, args.predict_list, device)
    return write_summary(args.out, device, steps, epochs, train_seconds, predict_seconds, channels=list(channels),
                         roi=roi)


if __name__ == "__main__":
    main()

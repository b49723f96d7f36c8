"""The 2D-image peer of ``benchmarks/accuracy.py``: a plain MONAI 2D U-Net on frames resized to 256 x 256, written as
a newcomer would (the polyp-segmentation tutorials' recipe).

Run: ``python benchmarks/tutorial_loop_2d.py --train-list train.json --predict-list predict.json --out DIR --minutes M``
(``train.json``: ``[{"image": path, "label": path}, ...]`` of image and mask files; ``predict.json``:
``[{"image": path, "output": path.png}]``).

Recipe: RGB (or gray) scaled to 0-1, resized to 256 x 256 (masks: nearest, binarised at > 127 unless
``--num-classes`` > 2, then label values), horizontal and vertical flips, batch 8, Adam 1e-3, DiceCE, a 2D U-Net
(16-256 channels, residual units, batch norm) for ``--minutes`` of wall clock. Prediction: the frame resized to
256 x 256, argmax, the mask resized back to the frame's size (nearest) and written as PNG (0/255 for two classes).
``DIR/summary.json`` records steps and seconds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from monai.utils import set_determinism
from PIL import Image

from tutorial_loop import peer_parser

SIZE = 256


def load_image(path: str) -> np.ndarray:
    """(channels, H, W) float32 in 0-1: RGB, or one channel for a gray image."""
    img = Image.open(path)
    img = img.convert("RGB") if img.mode not in ("L", "I;16", "I") else img
    array = np.asarray(img, dtype=np.float32)
    array = array / (65535.0 if array.max() > 255 else 255.0)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def load_mask(path: str, num_classes: int) -> np.ndarray:
    array = np.asarray(Image.open(path).convert("L"))
    return (array > 127).astype(np.int64) if num_classes == 2 else array.astype(np.int64)


def resize(x: torch.Tensor, size, mode: str) -> torch.Tensor:
    return F.interpolate(x[None], size=size, mode=mode, **({} if mode == "nearest" else {"align_corners": False}))[0]


def main(argv: list[str] | None = None) -> dict:
    args = peer_parser(__doc__, 2, "polyp: 2", "channels 8,16,32 and 64 x 64 frames").parse_args(argv)

    set_determinism(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    channels, size = ((8, 16, 32), 64) if args.tiny else ((16, 32, 64, 128, 256), SIZE)
    train_files = json.loads(Path(args.train_list).read_text())
    images = [resize(torch.from_numpy(load_image(f["image"])), (size, size), "bilinear") for f in train_files]
    masks = [resize(torch.from_numpy(load_mask(f["label"], args.num_classes))[None].float(), (size, size),
                    "nearest").long() for f in train_files]
    in_channels = images[0].shape[0]
    net = UNet(spatial_dims=2, in_channels=in_channels, out_channels=args.num_classes, channels=channels,
               strides=(2,) * (len(channels) - 1), num_res_units=2, norm="batch").to(device)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(args.seed)

    start, steps, epochs, shown = time.perf_counter(), 0, 0, 0.0
    while steps == 0 or time.perf_counter() - start < args.minutes * 60:
        net.train()
        order = torch.randperm(len(images), generator=generator).tolist()
        for first in range(0, len(order), 8):
            batch = order[first:first + 8]
            x, y = torch.stack([images[i] for i in batch]), torch.stack([masks[i] for i in batch])
            for axis in (2, 3):  # flips, each with probability 0.5 per batch
                if torch.rand(1, generator=generator).item() < 0.5:
                    x, y = x.flip(axis), y.flip(axis)
            optimizer.zero_grad()
            loss = loss_fn(net(x.to(device)), y.to(device))
            loss.backward()
            optimizer.step()
            steps += 1
            if time.perf_counter() - start >= args.minutes * 60:
                break
        epochs += 1
        if time.perf_counter() - shown > 30:
            shown = time.perf_counter()
            print(f"epoch {epochs}: {steps} steps, loss {loss.item():.4f}, {shown - start:.0f} s", flush=True)
    train_seconds = time.perf_counter() - start

    net.eval()
    started = time.perf_counter()
    for item in json.loads(Path(args.predict_list).read_text()):
        image = torch.from_numpy(load_image(item["image"]))
        with torch.no_grad():
            logits = net(resize(image, (size, size), "bilinear")[None].to(device))
        labels = logits.argmax(1).float().cpu()  # (1, size, size)
        labels = resize(labels, tuple(image.shape[1:]), "nearest")[0].numpy().astype(np.uint8)
        out = Path(item["output"])
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(labels * 255 if args.num_classes == 2 else labels).save(out)
    summary = {"device": str(device), "steps": steps, "epochs": epochs, "train_seconds": round(train_seconds, 1),
               "predict_seconds": round(time.perf_counter() - started, 1), "channels": list(channels), "size": size}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()

"""The 3D peer of ``benchmarks/accuracy.py``: a plain MONAI tutorial-style 3D U-Net, written as a newcomer would.

Run: ``python benchmarks/tutorial_loop_3d.py --train-list train.json --predict-list predict.json --out DIR --minutes M``
(the lists as for ``tutorial_loop.py``). The yardstick uses it for data medseg plans in 3D (MSD Hippocampus).

Recipe (MONAI's 3D segmentation tutorials, nothing planned from the data): RAS, 1 mm isotropic (``--pixdim``),
per-image z-score, whole volumes padded to a fixed ``--roi`` (48 x 64 x 48 covers every Hippocampus case) and a
random crop of that size where a volume is larger, no augmentation, batch 8, UNet (16, 32, 64, 128, 256) with two
residual units and batch norm, Adam 1e-3, DiceCE, for ``--minutes`` of wall clock. Prediction: sliding window of the
same ROI, argmax, labels inverted (nearest) onto the input's grid with the input file's affine. ``DIR/summary.json``
records steps and seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from monai import transforms as mt
from monai.data import CacheDataset, DataLoader
from monai.inferers import SlidingWindowInferer
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from monai.utils import set_determinism

from tutorial_loop import load_chain, peer_parser, predict_files, train_for, write_summary


def main(argv: list[str] | None = None) -> dict:
    parser = peer_parser(__doc__, 3, "Hippocampus: 3", "channels 8, 16, 32 and a 16^3 ROI")
    parser.add_argument("--pixdim", type=float, nargs=3, default=(1.0, 1.0, 1.0), help="mm")
    parser.add_argument("--roi", type=int, nargs=3, default=(48, 64, 48), help="training crop and inference window")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)

    set_determinism(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    channels, roi = ((8, 16, 32), (16, 16, 16)) if args.tiny else ((16, 32, 64, 128, 256), tuple(args.roi))
    net = UNet(spatial_dims=3, in_channels=1, out_channels=args.num_classes, channels=channels,
               strides=(2,) * (len(channels) - 1), num_res_units=2, norm="batch").to(device)

    keys = ["image", "label"]
    train_tf = mt.Compose(load_chain(keys, tuple(args.pixdim)) + [
        mt.SpatialPadd(keys, spatial_size=roi),
        mt.RandSpatialCropd(keys, roi_size=roi, random_size=False)])
    train_files = json.loads(Path(args.train_list).read_text())
    loader = DataLoader(CacheDataset(train_files, train_tf, progress=False), batch_size=args.batch, shuffle=True)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)

    steps, epochs, train_seconds = train_for(net, loader, loss_fn, optimizer, args.minutes, device)
    inferer = SlidingWindowInferer(roi_size=roi, sw_batch_size=4, overlap=0.25, padding_mode="constant")
    predict_seconds = predict_files(net, mt.Compose(load_chain(["image"], tuple(args.pixdim))), inferer,
                                    args.predict_list, device)
    return write_summary(args.out, device, steps, epochs, train_seconds, predict_seconds, channels=list(channels),
                         roi=list(roi), batch=args.batch)


if __name__ == "__main__":
    main()

"""End-to-end ``medseg predict`` time against the sliding-window model time alone, and peak memory, on a synthetic CT.

Run by hand: ``python benchmarks/predict.py [--size 512 512 300] [--dicom] [--profile]``, ``--mr`` for an
ACDC-size cine-MR frame through the 2D U-Net medseg plans for ACDC, and ``--frames N [--frames-dir DIR]`` for a folder of
N colonoscopy frames (synthetic, or the first N of DIR, e.g. ``../shared/data/polyp_pranet/TrainDataset/images``)
through the EfficientNet-Lite0 U-Net medseg plans for the PraNet training split (256 x 192, frames 226 wide):
frames per second of the whole folder's ``predict`` against the network alone on the same preprocessed frames
(target: at least 5 frames/s on 2 cores). Writes a synthetic abdominal volume (int16, NIfTI;
with ``--dicom`` also a DICOM series) and a small but real U-Net in the model-folder layout ``medseg train`` writes,
then measures, each in a fresh child process:

- ``e2e``: ``predict.run`` (load, preprocess, sliding window, invert, write), the model already on disk;
- ``model``: the sliding-window inference alone (``SlidingWindowInferer(volume, net)``) on the same preprocessed volume.

Both children run with the allocator setting the ``medseg`` command uses (``--allocator default``: glibc's own).
Prints seconds (the fastest of ``--repeat`` interleaved runs) and CPU seconds, the ratios e2e/model (target: at most
1.25x in wall and CPU time; nnU-Net users report export taking far longer than the network) and each child's peak
RSS (``ru_maxrss``)."""

from __future__ import annotations

import argparse
import json
import os
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

LABELS = {"0": "background", "1": "pancreas", "2": "tumour"}


def write_ct(path: Path, size: tuple[int, int, int], spacing: tuple[float, float, float], seed: int = 0) -> np.ndarray:
    """An abdomen-like int16 HU volume: air, a fat-ringed body, liver, spine, a pancreas-like blob, CT noise."""
    from medseg.common.atomic_write import save_nifti

    rng = np.random.default_rng(seed)
    nx, ny, nz = size
    x = (np.arange(nx) - nx / 2)[:, None] * spacing[0]
    y = (np.arange(ny) - ny / 2)[None, :] * spacing[1]
    volume = np.empty(size, np.int16)
    for k in range(nz):  # slice by slice: the float work never holds the whole volume
        z = (k - nz / 2) * spacing[2]
        body = (x / 160) ** 2 + (y / 120) ** 2
        hu = np.where(body < 1, -100.0, -1000.0)
        hu[body < 0.85] = 40.0
        hu[((x + 60) / 70) ** 2 + ((y + 10) / 55) ** 2 + (z / 120) ** 2 < 1] = 60.0  # liver
        hu[(x / 18) ** 2 + ((y - 70) / 18) ** 2 < 1] = 700.0  # spine
        hu[((x - 30) / 35) ** 2 + ((y + 5) / 12) ** 2 + (z / 40) ** 2 < 1] = 100.0  # pancreas
        volume[:, :, k] = np.rint(hu + rng.normal(0, 15, hu.shape)).astype(np.int16)
    save_nifti(path, volume, np.diag([*spacing, 1.0]), dtype=np.int16)
    return volume


def write_dicom(folder: Path, volume: np.ndarray, spacing: tuple[float, float, float]) -> None:
    """The volume as a CT DICOM series, one file per slice (LPS: the RAS x and y axes negated)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for k in range(volume.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(k), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.update({"SOPClassUID": CTImageStorage, "SOPInstanceUID": meta.MediaStorageSOPInstanceUID, "Modality": "CT",
                   "PatientID": "BENCH", "StudyInstanceUID": study, "SeriesInstanceUID": series,
                   "FrameOfReferenceUID": frame, "InstanceNumber": k + 1,
                   "ImageOrientationPatient": ["-1", "0", "0", "0", "-1", "0"],
                   "ImagePositionPatient": ["0", "0", f"{k * spacing[2]:.3f}"],
                   "PixelSpacing": [f"{spacing[1]:g}", f"{spacing[0]:g}"], "Rows": volume.shape[1],
                   "Columns": volume.shape[0], "SamplesPerPixel": 1, "PhotometricInterpretation": "MONOCHROME2",
                   "BitsAllocated": 16, "BitsStored": 16, "HighBit": 15, "PixelRepresentation": 1,
                   "RescaleSlope": "1", "RescaleIntercept": "0"})
        ds.PixelData = np.ascontiguousarray(volume[:, :, k].T).tobytes()
        ds.save_as(folder / f"{k:04d}.dcm", enforce_file_format=True)


NORMALIZATION = {"RGB": {"scheme": "imagenet", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                         "max_value": 255.0},
                 "CT": {"scheme": "ct", "clip": [-150.0, 250.0], "mean": 80.0, "std": 60.0},
                 "MR": {"scheme": "zscore"}}


def write_model(folder: Path, channels: list[int], patch: list[int], target_spacing: list[float],
                largest_component: bool = False, modality: str = "CT") -> Path:
    """A U-Net (random weights; speed does not depend on them), 2D when the patch ends in 1, saved as
    ``fold_0/model.pt`` like train saves it; for ``modality`` RGB the EfficientNet-Lite0 U-Net planned for frames."""
    import torch

    from medseg.common.atomic_write import write_json
    from medseg.common.network_spec import encoder_channels
    from medseg.networks.architectures import build_network

    dims = 2 if patch[2] == 1 else 3
    spec = {"name": "unet", "spatial_dims": dims, "channels": channels, "strides": [2] * (len(channels) - 1),
            "kernel_sizes": None, "num_res_units": 0, "norm": "instance", "dropout": 0.0, "deep_supervision": False}
    labels, in_channels = LABELS, 1
    if modality == "RGB":
        spec.update(channels=encoder_channels("efficientnet-lite0"), strides=[2] * 5, encoder="efficientnet-lite0")
        labels, in_channels = {"0": "background", "1": "polyp"}, 3
    config = {"network": spec, "in_channels": in_channels, "out_channels": len(labels), "labels": labels,
              "modality": modality, "target_spacing": target_spacing,
              "normalization": {modality: NORMALIZATION[modality]}, "patch_size": patch, "tta": False,
              "largest_component": largest_component, "fold": 0}
    fold = folder / "fold_0"
    fold.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = build_network(spec, in_channels, len(labels))
    torch.save({"state_dict": net.state_dict(), "config": config}, fold / "model.pt")
    write_json(fold / "inference_config.json", config)
    return folder


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _e2e(model: str, image: str, out: str, args: dict) -> dict:
    start = time.perf_counter()
    import monai.inferers  # noqa: F401  (the fixed start-up cost of any MONAI command, reported apart)
    import monai.transforms  # noqa: F401  # pyflakes: ignore

    from medseg.inference import predict
    # What predict imports inside its functions: start-up too (and compiled afresh each process when bytecode is
    # not cached, as with PYTHONDONTWRITEBYTECODE=1), not per-case work
    from medseg import ingest, transforms  # noqa: F401
    from medseg.common import atomic_write as atomic
    from medseg.inference import dicom_seg
    from medseg.inference import sliding_window as inference
    from medseg.inference import model_folder
    from medseg.inference import postprocess

    imports = time.perf_counter() - start
    start, cpu = time.perf_counter(), _cpu()
    if args["profile"]:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.runcall(predict.run, model, Path(image), Path(out), overlap=args["overlap"],
                         sw_batch_size=args["sw_batch_size"], device="cpu")
        stats = pstats.Stats(profiler, stream=sys.stderr).sort_stats(os.environ.get("PROFILE_SORT", "cumulative"))
        stats.print_stats(25)
        if os.environ.get("PROFILE_CALLERS"):  # e.g. PROFILE_CALLERS=ascontiguousarray: who pays for it
            stats.print_callers(os.environ["PROFILE_CALLERS"])
    else:
        predict.run(model, Path(image), Path(out), overlap=args["overlap"], sw_batch_size=args["sw_batch_size"],
                    device="cpu")
    return {"seconds": time.perf_counter() - start, "cpu_seconds": _cpu() - cpu, "imports_seconds": imports}


def _model_only(model: str, image: str, out: str, args: dict) -> dict:
    """The sliding window alone, on the volume exactly as predict preprocesses it (preprocessing not timed)."""
    import torch
    from monai.data import MetaTensor

    from medseg.inference.sliding_window import build_inferer
    from medseg.inference.model_folder import load_trained
    from medseg.inference.predict import find_inputs
    from medseg.preprocessing.transforms import IMAGE, preprocess_transforms

    [(net, config)] = load_trained(model)
    pre = preprocess_transforms(config["normalization"][config["modality"]], config["target_spacing"], keys=[IMAGE],
                                load=False)
    volumes = []
    for item in find_inputs(Path(image)):  # one volume, or every frame of a folder
        channel_first = item.image[None] if item.image.ndim == 3 else np.moveaxis(item.image, -1, 0)
        data = pre({IMAGE: MetaTensor(torch.from_numpy(np.ascontiguousarray(channel_first)),
                                      affine=torch.as_tensor(item.affine))})
        volumes.append(data[IMAGE].as_tensor()[None])
        del item
    inferer = build_inferer(config["patch_size"], config["network"]["spatial_dims"], args["overlap"],
                            args["sw_batch_size"])
    start, cpu = time.perf_counter(), _cpu()
    with torch.no_grad():
        for volume in volumes:
            logits = inferer(volume, net)
    return {"seconds": time.perf_counter() - start, "cpu_seconds": _cpu() - cpu, "images": len(volumes),
            "preprocessed_shape": list(volumes[-1].shape[2:]), "logits_mb": logits.numel() * 4 / 2**20}


def _child(kind: str, queue, *args) -> None:
    if args[-1]["allocator"] == "kept":  # as the medseg command runs (medseg.common.malloc_tuning); both sides alike
        from medseg.common.malloc_tuning import keep_freed_memory

        keep_freed_memory()
    result = {"e2e": _e2e, "model": _model_only}[kind](*args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    queue.put(result)


def measure(kind: str, *args) -> dict:
    """Run one measurement in a fresh process, so each peak RSS is its own."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(kind, queue, *args))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=3, default=[512, 512, 300], metavar=("X", "Y", "Z"))
    parser.add_argument("--spacing", type=float, nargs=3, default=[0.7, 0.7, 2.0], help="input voxel size (mm)")
    parser.add_argument("--target-spacing", type=float, nargs=3, default=[0.8, 0.8, 2.5])
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64, 128],
                        help="U-Net filters per level (default: params.yaml's default network)")
    parser.add_argument("--patch", type=int, nargs=3, default=[128, 128, 64])
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--sw-batch-size", type=int, default=2)
    parser.add_argument("--dicom", action="store_true", help="also time predict on the volume as a DICOM series")
    parser.add_argument("--largest-component", action="store_true",
                        help="post-process in e2e (off by default: random weights label most of the volume, the "
                             "worst case for connected components)")
    parser.add_argument("--repeat", type=int, default=3, help="measurements per side; the fastest is reported")
    parser.add_argument("--profile", action="store_true", help="cProfile the e2e run (top 25 by cumulative time)")
    parser.add_argument("--workdir", default=None, help="keep inputs and outputs here (default: a temporary folder)")
    parser.add_argument("--allocator", choices=["kept", "default"], default="kept",
                        help="kept: freed memory kept for reuse in both children, as the medseg command does "
                             "(medseg.common.malloc_tuning); default: glibc's own settings")
    parser.add_argument("--mr", action="store_true",
                        help="an ACDC-size cine-MR frame instead: 216x256x10 at 1.5x1.5x10 mm, the 2D U-Net medseg "
                             "plans for ACDC (16-128 channels, patch 184x248, spacing 1.65x1.65x10), per-image z-score")
    parser.add_argument("--frames", type=int, default=0,
                        help="N colonoscopy frames through the EfficientNet-Lite0 U-Net planned for PraNet's "
                             "training split; reports frames per second")
    parser.add_argument("--frames-dir", type=Path, default=None,
                        help="take the frames from this folder (the first N image files) instead of synthetic ones")
    args = parser.parse_args()
    if args.frames:
        return frames_main(args)
    if args.mr:
        args.size, args.spacing, args.target_spacing = [216, 256, 10], [1.5, 1.5, 10.0], [1.65, 1.65, 10.0]
        args.channels, args.patch, args.sw_batch_size = [16, 32, 64, 128], [184, 248, 1], 8

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        size, spacing = tuple(args.size), tuple(args.spacing)
        image = work / "ct.nii.gz"
        start = time.perf_counter()
        volume = write_ct(image, size, spacing)
        inputs = [("nifti", image)]
        if args.dicom:
            write_dicom(work / "dicom" / "ct", volume, spacing)
            inputs.append(("dicom", work / "dicom" / "ct"))
        del volume
        modality = "MR" if args.mr else "CT"
        model = write_model(work / "model", args.channels, args.patch, args.target_spacing, args.largest_component,
                            modality)
        print(f"inputs written in {time.perf_counter() - start:.1f} s: {size} {modality} voxels of {spacing} mm; "
              f"{'2D' if args.patch[2] == 1 else '3D'} U-Net "
              f"{args.channels}, patch {args.patch}, overlap {args.overlap}, target spacing {args.target_spacing}; "
              f"allocator: {args.allocator}",
              flush=True)
        options = {"overlap": args.overlap, "sw_batch_size": args.sw_batch_size, "profile": args.profile,
                   "allocator": args.allocator}
        runs: dict[str, list[dict]] = {"model": [], **{name: [] for name, _ in inputs}}
        for _ in range(args.repeat):  # interleaved, so a busy spell on a shared machine hits both sides alike
            runs["model"].append(measure("model", str(model), str(image), str(work / "unused"), options))
            for name, path in inputs:
                runs[name].append(measure("e2e", str(model), str(path), str(work / f"out_{name}"), options))
        results = {name: min(r, key=lambda m: m["seconds"]) | {"all_seconds": [round(m["seconds"], 2) for m in r],
                                                                "min_cpu_seconds": min(m["cpu_seconds"] for m in r)}
                   for name, r in runs.items()}
        alone = results["model"]
        print(f"model alone    {alone['seconds']:7.1f} s   peak RSS {alone['peak_rss_mb']:7.0f} MB   "
              f"(preprocessed {alone['preprocessed_shape']}; runs {alone['all_seconds']}; "
              f"CPU {alone['min_cpu_seconds']:.1f} s)")
        for name, _ in inputs:
            e2e = results[name]
            print(f"e2e {name:6s}     {e2e['seconds']:7.1f} s   peak RSS {e2e['peak_rss_mb']:7.0f} MB   "
                  f"ratio e2e/model x{e2e['seconds'] / alone['seconds']:.2f} (target <= 1.25); with the "
                  f"{e2e['imports_seconds']:.1f} s of importing torch+MONAI "
                  f"x{(e2e['seconds'] + e2e['imports_seconds']) / alone['seconds']:.2f}   (runs {e2e['all_seconds']}); "
                  f"CPU-time ratio x{e2e['min_cpu_seconds'] / alone['min_cpu_seconds']:.2f} (steadier on a shared machine)")
        print(json.dumps({"size": size, **results}, default=str))


def frames_main(args) -> None:
    """``--frames N``: a folder of frames through ``predict`` against the network alone, in frames per second."""
    import shutil

    from medseg.ingest.images import is_image

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        folder = work / "frames"
        folder.mkdir(parents=True, exist_ok=True)
        if args.frames_dir:
            sources = sorted(p for p in args.frames_dir.iterdir() if p.is_file() and is_image(p))[:args.frames]
            for path in sources:  # copies: the benchmark never reads from, or writes beside, a user's folder
                shutil.copyfile(path, folder / path.name)
        else:
            from medseg.demo.polyp import write_polyp_dataset

            write_polyp_dataset(work / "synthetic", seed=0, frames=args.frames)
            for path in sorted((work / "synthetic" / "images").iterdir()):
                shutil.copyfile(path, folder / path.name)
        count = len(list(folder.iterdir()))
        width = 226  # the planned frame: PraNet's training split at medseg's default budget (patch 256 x 192)
        model = write_model(work / "model", [], [256, 192, 1], [100 / width, 100 / width, 999.0], False, "RGB")
        print(f"{count} frames ({'from ' + str(args.frames_dir) if args.frames_dir else 'synthetic'}); "
              f"EfficientNet-Lite0 U-Net, patch 256 x 192, frames {width} wide; allocator {args.allocator}", flush=True)
        options = {"overlap": args.overlap, "sw_batch_size": args.sw_batch_size, "profile": args.profile,
                   "allocator": args.allocator}
        runs: dict[str, list[dict]] = {"model": [], "e2e": []}
        for _ in range(args.repeat):
            runs["model"].append(measure("model", str(model), str(folder), str(work / "unused"), options))
            runs["e2e"].append(measure("e2e", str(model), str(folder), str(work / "out"), options))
        best = {name: min(r, key=lambda m: m["seconds"]) for name, r in runs.items()}
        model_fps, e2e_fps = count / best["model"]["seconds"], count / best["e2e"]["seconds"]
        print(f"network alone  {model_fps:6.2f} frames/s ({best['model']['seconds']:.1f} s; preprocessed "
              f"{best['model']['preprocessed_shape']})")
        print(f"medseg predict {e2e_fps:6.2f} frames/s ({best['e2e']['seconds']:.1f} s: read, preprocess, network, "
              f"invert, write mask and overlay PNGs); ratio e2e/model x{best['e2e']['seconds'] / best['model']['seconds']:.2f}; "
              f"target >= 5 frames/s: {'met' if e2e_fps >= 5 else 'NOT met'}")
        print(json.dumps({"frames": count, "e2e_fps": e2e_fps, "model_fps": model_fps, **best}, default=str))


if __name__ == "__main__":
    main()

"""Fuzz campaign: real inputs, mutated with knowledge of their structure, through ``ingest`` and ``predict``.

    .venv/bin/python reliability/fuzz.py --seed 0 --count 10000 --data ../shared/data      # by hand
    .venv/bin/python reliability/fuzz.py --seed 0 --count 200                               # demo data only

Each input is one small source folder built from a real file set (a DICOM series, a NIfTI volume, an ACDC patient,
an MSD task, a PNG/JPEG frame with its mask) with one or two mutations drawn from ``random.Random(f"{seed}:{i}")``:
truncation, byte flips, wrong VRs and values (zero, negative, NaN, inf spacings; non-orthogonal orientations;
60000x60000 images; 7-bit pixels; wrong transfer syntaxes; undecodable character sets; missing pixel data),
inconsistent geometry, NIfTI header fields (dimensions, pixdim, datatype, offset, scaling, affines), NaN/inf voxels,
broken ``dataset.json`` and ``Info.cfg``, symlinks (outside the folder, to ``/dev/zero``, loops, dangling) and
unreadable files. ``medseg ingest`` (the library call) and ``medseg predict`` (with a small random-weight model of
the right kind) run on it in a worker process, and the input must end in one of:

- accepted: ingested (every case in the manifest) and/or segmented;
- rejected: each refusal one line (an ``ingest_report.json`` entry, a ``failed`` entry of predict, or the stage's
  one-line error), counted by reason;

and never in: a crash (any other exception; its traceback is kept), a hang (no answer within ``--timeout`` seconds:
the worker is killed), a memory blow-up (the worker's heap may grow at most ``--memory-gb`` above its start: an
allocation past that raises MemoryError, which counts here, not as a rejection), a touched source (every file and
link of the input hashed before and after) or a temporary left in an output folder. A failure prints the seed and
index, and ``--replay SEED:INDEX`` rebuilds that very input into ``--keep`` to become a regression test.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import struct
import sys
import tempfile
import time
import traceback
import zlib
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KINDS = ("dicom", "nifti", "acdc", "msd", "frame")


# ---------------------------------------------------------------------------------------------------- seed inputs
def seed_inputs(data: Path | None, scratch: Path) -> dict[str, list[Path]]:
    """Real file sets to mutate, per kind: from ``data`` (``../shared/data``) when given, else the demo's."""
    found: dict[str, list[Path]] = {k: [] for k in KINDS}
    if data is not None:
        dicom = data / "dicom"
        found["dicom"] = [p for p in (dicom / "totalsegmentator_ct" / "example_ct_dicom",
                                      dicom / "tcia_pancreas_ct_12slices", dicom / "dcmqi" / "ct-3slice",
                                      dicom / "dcmqi" / "prostate_adc_701-ADCb500",
                                      dicom / "rt_utils" / "one_slice_data") if p.is_dir()]
        singles = scratch / "single_dicom"
        for name in ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm", "emri_small.dcm"):
            source = dicom / "pydicom_testfiles" / "test_files" / name
            if source.is_file():
                (singles / name).mkdir(parents=True, exist_ok=True)
                shutil.copy(source, singles / name / name)
                found["dicom"].append(singles / name)
        patients = sorted((data / "acdc" / "training").glob("patient*"))
        found["acdc"] = patients[:2]
        found["nifti"] = [f for p in patients[:2] for f in sorted(p.glob("*_frame??.nii.gz"))[:1]]
        found["nifti"] += sorted((data / "hippocampus" / "imagesTr").glob("*.nii.gz"))[:3]
        found["msd"] = [_mini_msd(data / "hippocampus", scratch / "msd")] if (data / "hippocampus").is_dir() else []
        frames = data / "polyp_pranet" / "TrainDataset"
        found["frame"] = [f for f in sorted((frames / "images").iterdir())[:3] + sorted((frames / "images").iterdir())
                          [-3:]] if frames.is_dir() else []
    if not all(found.values()):
        demo = _demo(scratch / "demo")
        found["dicom"] = found["dicom"] or sorted((demo / "pancreas_ct" / "dicom").iterdir())
        found["acdc"] = found["acdc"] or sorted((demo / "acdc" / "training").glob("patient*"))[:2]
        found["nifti"] = found["nifti"] or [f for p in found["acdc"] for f in sorted(p.glob("*_frame??.nii.gz"))[:1]]
        found["msd"] = found["msd"] or [_msd_from_acdc(found["acdc"], scratch / "msd")]
        found["frame"] = found["frame"] or sorted((demo / "polyp" / "images").iterdir())[:4]
    return found


def _demo(folder: Path) -> Path:
    from medseg.demo import demo_data

    if not (folder / "acdc").is_dir():
        demo_data.write(folder, seed=0, cardiac_patients=2, ct_patients=2, polyp_frames=4)
    return folder


def _mini_msd(task: Path, out: Path) -> Path:
    """Two cases of a Decathlon task with their ``dataset.json``."""
    meta = json.loads((task / "dataset.json").read_text())
    training = [t for t in meta["training"] if (task / t["image"]).is_file() and (task / t["label"]).is_file()][:2]
    for t in training:
        for key in ("image", "label"):
            (out / t[key]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(task / t[key], out / t[key])
    (out / "dataset.json").write_text(json.dumps({**meta, "training": training, "test": [],
                                                  "numTraining": len(training), "numTest": 0}))
    return out


def _msd_from_acdc(patients: list[Path], out: Path) -> Path:
    training = []
    for i, patient in enumerate(patients):
        image = sorted(patient.glob("*_frame??.nii.gz"))[0]
        (out / "imagesTr").mkdir(parents=True, exist_ok=True)
        (out / "labelsTr").mkdir(parents=True, exist_ok=True)
        shutil.copy(image, out / "imagesTr" / f"case_{i:03d}.nii.gz")
        shutil.copy(image.with_name(image.name.replace(".nii.gz", "_gt.nii.gz")), out / "labelsTr" / f"case_{i:03d}.nii.gz")
        training.append({"image": f"./imagesTr/case_{i:03d}.nii.gz", "label": f"./labelsTr/case_{i:03d}.nii.gz"})
    (out / "dataset.json").write_text(json.dumps({"name": "Heart", "modality": {"0": "MRI"}, "labels": {
        "0": "background", "1": "RV", "2": "myocardium", "3": "LV"}, "training": training, "numTraining": 2}))
    return out


# ------------------------------------------------------------------------------------------------------ mutations
def _flip_bytes(path: Path, rng: random.Random, region: str = "any") -> str:
    data = bytearray(path.read_bytes())
    if not data:
        return "flip (empty)"
    lo = 0 if region != "tail" else len(data) // 2
    hi = min(len(data), 1024) if region == "head" else len(data)
    for _ in range(rng.randint(1, 16)):
        data[rng.randrange(lo, max(lo + 1, hi))] = rng.randrange(256)
    path.write_bytes(bytes(data))
    return f"bytes flipped ({region})"


def _truncate(path: Path, rng: random.Random) -> str:
    data = path.read_bytes()
    cut = rng.randrange(0, max(1, len(data)))
    path.write_bytes(data[:cut])
    return "truncated"


def _symlink(path: Path, rng: random.Random, outside: Path) -> str:
    choice = rng.choice(["outside", "dev_zero", "loop", "dangling", "unreadable"])
    if choice == "unreadable":
        os.chmod(path, 0)
        return "unreadable file (mode 000)"
    path.unlink()
    target = {"outside": outside, "dev_zero": Path("/dev/zero"), "loop": path.with_name(path.name + ".loop"),
              "dangling": path.with_name("missing-" + path.name)}[choice]
    if choice == "loop":
        os.symlink(path, target)
    os.symlink(target, path)
    return f"symlink ({choice})"


DICOM_EDITS = {
    "huge_dimensions": lambda ds, r: (setattr(ds, "Rows", 60000), setattr(ds, "Columns", 60000)),
    "zero_rows": lambda ds, r: setattr(ds, "Rows", 0),
    "odd_bits": lambda ds, r: (setattr(ds, "BitsAllocated", 7), setattr(ds, "BitsStored", 7)),
    "three_samples": lambda ds, r: setattr(ds, "SamplesPerPixel", 3),
    "spacing": lambda ds, r: setattr(ds, "PixelSpacing", r.choice([["0", "0"], ["-1", "1"], ["nan", "1"],
                                                                   ["inf", "inf"], ["1e308", "1"]])),
    "position": lambda ds, r: setattr(ds, "ImagePositionPatient", r.choice([["nan", "0", "0"], ["0", "0", "inf"],
                                                                            ["1e30", "0", "0"]])),
    "orientation": lambda ds, r: setattr(ds, "ImageOrientationPatient", r.choice([
        ["0"] * 6, ["1", "0", "0", "1", "0", "0"], ["1", "1", "0", "0", "1", "1"], ["nan"] * 6])),
    "thickness": lambda ds, r: setattr(ds, "SliceThickness", r.choice(["-5", "0", "nan"])),
    "rescale": lambda ds, r: setattr(ds, "RescaleSlope", r.choice(["nan", "inf", "0", "-1e300"])),
    "frames": lambda ds, r: setattr(ds, "NumberOfFrames", r.choice([0, 1000000, 7])),
    "transfer_syntax": lambda ds, r: setattr(ds.file_meta, "TransferSyntaxUID", r.choice([
        "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5",
        "1.2.3.4.5"])),
    "charset": lambda ds, r: (setattr(ds, "SpecificCharacterSet", r.choice(["ISO_IR 999", "ISO 2022 IR 87",
                                                                          "GB18030"])),
                              ds.__setitem__(0x00100010, _raw(0x00100010, "PN", b"\xff\xfe\x1b$B\x00\x9f"))),
    "no_pixels": lambda ds, r: ds.__delitem__(0x7FE00010) if 0x7FE00010 in ds else None,
    "empty_uids": lambda ds, r: (setattr(ds, "SeriesInstanceUID", ""), setattr(ds, "SOPInstanceUID", "")),
    "wrong_vr": lambda ds, r: ds.__setitem__(0x00280030, _raw(0x00280030, "US", b"\x01")),
    "pixel_length": lambda ds, r: setattr(ds, "PixelData", bytes(ds.PixelData)[: len(ds.PixelData) // 3]
                                          if "PixelData" in ds else b""),
}


def _raw(tag: int, vr: str, value: bytes):
    from pydicom.dataelem import RawDataElement

    return RawDataElement(tag, vr, len(value), value, 0, False, True)


def _edit_dicom(path: Path, rng: random.Random) -> str:
    import pydicom

    name = rng.choice(sorted(DICOM_EDITS))
    try:
        ds = pydicom.dcmread(path, force=True)
        DICOM_EDITS[name](ds, rng)
        ds.save_as(path, enforce_file_format=False)
    except Exception as err:  # noqa: BLE001 - an edit pydicom itself refuses to write: the bytes instead
        return _flip_bytes(path, rng, "head") + f" (edit {name} unwritable: {type(err).__name__})"
    return f"dicom {name}"


def _mutate_dicom(case: Path, rng: random.Random, outside: Path) -> list[str]:
    files = sorted(p for p in case.rglob("*") if p.is_file())
    done = []
    for _ in range(rng.randint(1, 2)):
        target = rng.choice(files)
        if not target.exists() or target.is_symlink():
            continue
        op = rng.choices(["edit", "truncate", "flip_head", "flip_tail", "fs", "duplicate", "empty"],
                         [8, 2, 2, 2, 1, 1, 1])[0]
        if op == "edit":
            done.append(_edit_dicom(target, rng))
        elif op == "truncate":
            done.append(_truncate(target, rng))
        elif op in ("flip_head", "flip_tail"):
            done.append(_flip_bytes(target, rng, op.removeprefix("flip_")))
        elif op == "fs":
            done.append(_symlink(target, rng, outside))
        elif op == "duplicate":
            shutil.copy(target, target.with_name("copy_" + target.name))
            done.append("duplicate instance")
        else:
            target.write_bytes(b"")
            done.append("empty file")
    return done


def _edit_nifti(path: Path, rng: random.Random) -> str:
    import nibabel as nib
    import numpy as np

    img = nib.load(path)
    header = img.header.copy()
    data = np.asanyarray(img.dataobj)
    field = rng.choice(["dim", "pixdim", "datatype", "vox_offset", "scl", "affine", "values", "ndim"])
    if field == "values":
        data = data.astype(np.float32)
        flat = data.reshape(-1)
        flat[rng.sample(range(flat.size), min(flat.size, 50))] = rng.choice([np.nan, np.inf, -np.inf, 3e38])
        nib.save(nib.Nifti1Image(data, img.affine, header), path)
        return "nifti NaN/inf voxels"
    raw = bytearray(path.read_bytes() if not path.name.endswith(".gz") else _gunzip(path))
    if field == "dim":
        struct.pack_into("<h", raw, 42 + 2 * rng.randint(0, 2), rng.choice([60000 - 65536, 0, -5, 32767]))
    elif field == "ndim":
        struct.pack_into("<h", raw, 40, rng.choice([0, 8, -1, 2, 5]))
    elif field == "pixdim":
        struct.pack_into("<f", raw, 80 + 4 * rng.randint(0, 2), rng.choice([0.0, -1.0, float("nan"), float("inf")]))
    elif field == "datatype":
        struct.pack_into("<h", raw, 70, rng.choice([128, 1792, 2048, 1, 0, 999]))
    elif field == "vox_offset":
        struct.pack_into("<f", raw, 108, rng.choice([1e12, -352.0, 7.0]))
    elif field == "scl":
        struct.pack_into("<ff", raw, 112, rng.choice([float("nan"), float("inf"), 0.0]), 0.0)
    else:
        struct.pack_into("<hh", raw, 252, 1, 1)  # qform and sform codes set, their values garbage
        struct.pack_into("<ffffff", raw, 256, *(rng.choice([float("nan"), 0.0, 1e30]) for _ in range(6)))
        struct.pack_into("<ffff", raw, 280, *(rng.choice([float("nan"), 0.0, 1e30]) for _ in range(4)))
    path.write_bytes(_gzip(bytes(raw)) if path.name.endswith(".gz") else bytes(raw))
    return f"nifti header {field}"


def _gunzip(path: Path) -> bytes:
    import gzip

    return gzip.decompress(path.read_bytes())


def _gzip(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data, compresslevel=1, mtime=0)


def _mutate_nifti_file(path: Path, rng: random.Random, outside: Path) -> str:
    op = rng.choices(["edit", "truncate", "flip", "fs", "gz_garbage"], [8, 2, 2, 1, 1])[0]
    if op == "edit":
        try:
            return _edit_nifti(path, rng)
        except Exception as err:  # noqa: BLE001 - an already broken file (a second mutation): its bytes instead
            return _flip_bytes(path, rng, "head") + f" (unreadable for editing: {type(err).__name__})"
    if op == "truncate":
        return _truncate(path, rng)
    if op == "flip":
        return _flip_bytes(path, rng, rng.choice(["head", "tail"]))
    if op == "fs":
        return _symlink(path, rng, outside)
    path.write_bytes(b"\x1f\x8b\x08\x00" + bytes(rng.randrange(256) for _ in range(200)))
    return "gzip garbage"


def _mutate_text(path: Path, rng: random.Random) -> str:
    text = path.read_text(errors="replace")
    op = rng.choice(["invalid", "binary", "empty", "types", "paths", "keys"])
    if op == "invalid":
        path.write_text(text[: rng.randrange(1, max(2, len(text)))])
    elif op == "binary":
        path.write_bytes(bytes(rng.randrange(256) for _ in range(300)))
    elif op == "empty":
        path.write_text("")
    elif path.name == "dataset.json" and op == "types":
        meta = json.loads(text)
        meta[rng.choice(["labels", "training", "modality", "channel_names", "numTraining"])] = rng.choice(
            [None, 7, "x", [], {"0": []}, -1])
        path.write_text(json.dumps(meta))
    elif path.name == "dataset.json" and op == "paths":
        meta = json.loads(text)
        meta["training"] = [{"image": rng.choice(["../../../etc/passwd", "/etc/shadow", "imagesTr/missing.nii.gz",
                                                  "./imagesTr/" + "x" * 300]), "label": "./labelsTr/none.nii.gz"}] \
            + meta.get("training", [])
        path.write_text(json.dumps(meta))
    elif path.name == "dataset.json":
        meta = json.loads(text)
        meta["labels"] = rng.choice([{"background": 0, "a": "1.5"}, {"0": "bg", "-3": "x"}, {"0": "bg", "1": None}])
        path.write_text(json.dumps(meta))
    else:  # Info.cfg
        path.write_text(rng.choice(["ED: abc\nES: 1\n", "ED: 999\nES: -1\n", "Group: NOR\n", "ED: 1\nED: 2\nES\n",
                                    "ED: 1e9\nES: 0x10\nHeight: nan\n"]))
    return f"{path.name} {op}"


def _png_huge(path: Path) -> str:
    """A PNG whose header claims 60000x60000 pixels (its CRC fixed, so decoders believe it)."""
    data = bytearray(path.read_bytes())
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return _truncate(path, random.Random(0))
    struct.pack_into(">II", data, 16, 60000, 60000)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return "png 60000x60000 header"


def _mutate_frame(image: Path, mask: Path | None, rng: random.Random, outside: Path) -> str:
    from PIL import Image

    op = rng.choice(["truncate", "flip", "huge", "mode", "mask_size", "mask_values", "fs", "wrong_type", "empty"])
    if op == "truncate":
        return _truncate(image, rng)
    if op == "flip":
        return _flip_bytes(image, rng, rng.choice(["head", "tail"]))
    if op == "huge":
        if image.suffix.lower() != ".png":
            Image.open(image).save(image.with_suffix(".png"))
            image.unlink()
            image = image.with_suffix(".png")
        return _png_huge(image)
    if op == "mode":
        with Image.open(image) as im:
            converted = im.convert(rng.choice(["P", "RGBA", "I;16", "1", "CMYK", "LA"]))
        try:
            converted.save(image, format=rng.choice(["PNG", "TIFF"]))
        except OSError:
            converted.convert("RGBA").save(image, format="PNG")
        return f"frame mode {converted.mode}"
    if op in ("mask_size", "mask_values") and mask is not None and mask.is_file():
        with Image.open(mask) as im:
            changed = im.resize((max(1, im.width // 2), im.height + 3)) if op == "mask_size" else \
                Image.eval(im.convert("L"), lambda v: (v * 37) % 256)
        changed.save(mask, format="PNG" if mask.suffix.lower() == ".png" else "JPEG")
        return f"mask {op}"
    if op == "fs":
        return _symlink(image, rng, outside)
    if op == "wrong_type":
        image.write_bytes(b"%PDF-1.4\n" + bytes(rng.randrange(256) for _ in range(500)))
        return "not an image"
    image.write_bytes(b"")
    return "empty file"


def build_case(seed: int, index: int, seeds: dict[str, list[Path]], folder: Path, outside: Path) -> dict:
    """The ``index``-th input of campaign ``seed``: a source folder ``folder`` (and what predict is given)."""
    rng = random.Random(f"{seed}:{index}")
    kind = rng.choice([k for k in KINDS if seeds.get(k)])
    origin = rng.choice(seeds[kind])
    source = folder / "source"
    if kind == "dicom":
        shutil.copytree(origin, source / "series")
        mutations = _mutate_dicom(source / "series", rng, outside)
        predict_on = source / "series"
    elif kind == "nifti":
        (source / "images").mkdir(parents=True)
        target = source / "images" / "case.nii.gz"
        shutil.copy(origin, target)
        mutations = [_mutate_nifti_file(target, rng, outside) for _ in range(rng.randint(1, 2))
                     if target.exists() and not target.is_symlink()]
        predict_on = target
    elif kind == "acdc":
        shutil.copytree(origin, source / "training" / "patient001")
        patient = source / "training" / "patient001"
        files = sorted(p for p in patient.iterdir() if p.is_file())
        target = rng.choice(files)
        mutations = [_mutate_text(target, rng) if target.name == "Info.cfg" else
                     _mutate_nifti_file(target, rng, outside)]
        predict_on = None
    elif kind == "msd":
        shutil.copytree(origin, source)
        files = sorted(p for p in source.rglob("*") if p.is_file())
        target = rng.choice([source / "dataset.json"] * 2 + files)
        mutations = [_mutate_text(target, rng) if target.suffix == ".json" else
                     _mutate_nifti_file(target, rng, outside)]
        predict_on = None
    else:
        (source / "images").mkdir(parents=True)
        (source / "masks").mkdir()
        image = source / "images" / origin.name
        shutil.copy(origin, image)
        masks = [m for m in origin.parent.parent.glob(f"masks/{origin.stem}.*")]
        mask = source / "masks" / masks[0].name if masks else None
        if mask is not None:
            shutil.copy(masks[0], mask)
        mutations = [_mutate_frame(image, mask, rng, outside)]
        predict_on = next((p for p in (source / "images").iterdir()), None)
    return {"seed": seed, "index": index, "kind": kind, "origin": origin.name, "mutations": mutations,
            "source": str(source), "predict_on": str(predict_on) if predict_on else None}


# ------------------------------------------------------------------------------------------------------ checking
def tree_digest(root: Path) -> dict[str, str]:
    """Every file's content hash and every link's target under ``root`` (links are not followed)."""
    digest = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            digest[rel] = "link:" + os.readlink(path)
        elif path.is_file():
            try:
                digest[rel] = hashlib.sha256(path.read_bytes()).hexdigest() + f":{path.stat().st_mode:o}"
            except OSError as err:
                digest[rel] = f"unreadable:{err.errno}:{path.stat().st_mode:o}"
    return digest


def _reason(text: str) -> str:
    """A refusal's reason without the parts that name this input: for counting."""
    text = text.splitlines()[0] if text else ""
    text = re.sub(r"(/[^\s:,;'\"]+)+", "<path>", text)
    text = re.sub(r"\b(input|sub|case)-[0-9a-f]+\b", "<key>", text)
    text = re.sub(r"-?\d+(\.\d+)?(e[-+]?\d+)?", "#", text)
    return text[:90]


def check_case(case: dict, work: Path, models: dict[str, str]) -> dict:
    """Run ingest and predict on ``case``; what happened, and any failure of the campaign's rules."""
    from medseg.common.atomic_write import TMP_MARKER
    from medseg.common.errors import MedsegError
    from medseg.inference import predict
    from medseg.ingest import ingest_folder

    source = Path(case["source"])
    before = tree_digest(source)
    result = {"accepted": [], "rejected": [], "failures": []}
    out = work / "out"
    try:
        summary = ingest_folder(source, out / "ingested", layout="auto", workers=1)
        reasons = [r["reason"] for r in json.loads(Path(summary["report"]).read_text())["rejected"]]
        result["accepted"].append(f"ingest: {summary['accepted']} case(s)")
        result["rejected"] += [f"ingest: {_reason(r)}" for r in reasons]
    except MemoryError:
        result["failures"].append("memory: ingest " + traceback.format_exc(limit=-3))
    except MedsegError as err:
        reasons = [str(err)]
        result["rejected"].append(f"ingest: {_reason(str(err))}")
    except Exception:  # noqa: BLE001 - exactly what the campaign looks for
        reasons = []
        result["failures"].append("crash: ingest " + traceback.format_exc())
    if case["predict_on"]:
        model = models["rgb" if case["kind"] == "frame" else "gray"]
        try:
            summary = predict.run(model, Path(case["predict_on"]), out / "predicted")
            result["accepted"] += [f"predict: {len(summary['written'])} written"] if summary["written"] else []
            result["rejected"] += [f"predict: {_reason(f['reason'])}" for f in summary["failed"]]
            reasons += [f["reason"] for f in summary["failed"]]
        except MemoryError:
            result["failures"].append("memory: predict " + traceback.format_exc(limit=-3))
        except MedsegError as err:
            reasons.append(str(err))
            result["rejected"].append(f"predict: {_reason(str(err))}")
        except Exception:  # noqa: BLE001
            result["failures"].append("crash: predict " + traceback.format_exc())
    result["failures"] += [f"crash: a refusal of more than one line: {r!r}" for r in reasons if "\n" in r.strip()]
    result["failures"] += [f"memory: {r}" for r in reasons if "MemoryError" in r or "Unable to allocate" in r]
    if tree_digest(source) != before:
        result["failures"].append("touched: the source changed")
    leftovers = [str(p) for p in out.rglob(f"*{TMP_MARKER}*")] if out.exists() else []
    if leftovers:
        result["failures"].append(f"temporary left: {leftovers[:3]}")
    return result


def write_models(folder: Path) -> dict[str, str]:
    """Random-weight 2D U-Nets in the model-folder layout: one gray (MR/CT volumes), one RGB (frames)."""
    import torch

    from medseg.inference.model_folder import write_fold
    from medseg.networks.architectures import build_network

    spec = {"name": "unet", "spatial_dims": 2, "channels": [4, 8], "strides": [2], "kernel_sizes": None,
            "num_res_units": 0, "norm": "instance", "dropout": 0.0, "deep_supervision": False, "encoder": None}
    models = {}
    for name, channels, norms in (
            ("gray", 1, {"MR": {"scheme": "zscore"}, "CT": {"scheme": "ct", "clip": [-200.0, 300.0], "mean": 40.0,
                                                             "std": 80.0}}),
            ("rgb", 3, {"RGB": {"scheme": "zscore", "channel_wise": True}})):
        config = {"network": spec, "in_channels": channels, "out_channels": 2, "labels": {"0": "background",
                                                                                           "1": "foreground"},
                  "modality": next(iter(norms)), "target_spacing": [1.5, 1.5, 5.0], "normalization": norms,
                  "patch_size": [32, 32, 1], "tta": False, "largest_component": False, "fold": 0}
        torch.manual_seed(0)
        target = folder / name / "fold_0"
        if not target.exists():
            write_fold(target, build_network(spec, channels, 2).state_dict(), config, [])
        models[name] = str(folder / name)
    return models


# ------------------------------------------------------------------------------------------------------ workers
def _worker(conn, seeds: dict, scratch: str, models: dict, memory_gb: float) -> None:
    import logging
    import resource

    logging.disable(logging.CRITICAL)  # this process only: thousands of refusals need no log lines

    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    usage = _data_bytes()
    limit = int(usage + memory_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    seeds = {k: [Path(p) for p in v] for k, v in seeds.items()}
    outside = Path(scratch) / "outside.dat"
    while True:
        task = conn.recv()
        if task is None:
            return
        seed, index, keep, keep_all = task
        folder = Path(tempfile.mkdtemp(prefix=f"case-{index}-", dir=scratch))
        try:
            case = build_case(seed, index, seeds, folder, outside)
            case.update(check_case(case, folder, models))
        except Exception:  # noqa: BLE001 - the campaign's own bug: reported, never hidden
            case = {"seed": seed, "index": index, "failures": ["campaign error " + traceback.format_exc()],
                    "accepted": [], "rejected": []}
        if case["failures"] or keep_all:  # a failing input is kept to become a regression test
            case["kept"] = str(_keep(folder, Path(keep) / f"{seed}-{index}"))
        shutil.rmtree(folder, ignore_errors=True)
        conn.send(case)


def _data_bytes() -> int:
    """This process's data segment (heap and private mappings), as RLIMIT_DATA counts it."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmData:"):
            return int(line.split()[1]) * 1024
    return 0


def _keep(folder: Path, target: Path) -> Path:
    shutil.rmtree(target, ignore_errors=True)
    for path in folder.rglob("*"):
        try:
            os.chmod(path, 0o644) if path.is_file() and not path.is_symlink() else None
        except OSError:
            pass
    shutil.copytree(folder / "source", target, symlinks=True)
    return target


def campaign(seed: int, count: int, data: Path | None = None, workers: int = 2, timeout: float = 60.0,
             memory_gb: float = 3.0, keep: Path | None = None, start: int = 0, progress: bool = False,
             indices: list[int] | None = None, keep_all: bool = False) -> dict:
    """Run inputs ``start .. start + count - 1`` of campaign ``seed`` (or exactly ``indices``); returns the counts
    and the failures."""
    import multiprocessing as mp

    scratch = Path(tempfile.mkdtemp(prefix="medseg-fuzz-"))
    try:
        seeds = seed_inputs(data, scratch / "seeds")
        (scratch / "outside.dat").write_bytes(b"a file outside the input folder\n")
        models = write_models(scratch / "models")
        context = mp.get_context("spawn")
        todo = list(indices) if indices is not None else list(range(start, start + count))
        count = len(todo)
        results, busy, pool = [], {}, []

        def spawn():
            parent, child = context.Pipe()
            proc = context.Process(target=_worker, args=(child, {k: [str(p) for p in v] for k, v in seeds.items()},
                                                          str(scratch), models, memory_gb), daemon=True)
            proc.start()
            return [proc, parent]

        pool = [spawn() for _ in range(max(1, workers))]
        started = time.monotonic()
        while todo or busy:
            for slot, (proc, conn) in enumerate(pool):
                if slot not in busy and todo:
                    index = todo.pop(0)
                    conn.send((seed, index, str(keep or Path(tempfile.gettempdir()) / "medseg-fuzz-failures"),
                               keep_all))
                    busy[slot] = (index, time.monotonic())
            ready = mp.connection.wait([pool[s][1] for s in busy], timeout=1.0)
            for slot, (index, since) in list(busy.items()):
                proc, conn = pool[slot]
                if conn in ready:
                    try:
                        results.append(conn.recv())
                    except EOFError:  # the worker died (killed by the kernel, a crash in C code)
                        results.append({"seed": seed, "index": index, "accepted": [], "rejected": [],
                                        "failures": [f"crash: worker died (exit {proc.exitcode})"]})
                        pool[slot] = spawn()
                    del busy[slot]
                elif time.monotonic() - since > timeout or not proc.is_alive():
                    proc.kill()
                    proc.join()
                    why = "hang" if proc.exitcode in (-9, None) else f"crash: worker died (exit {proc.exitcode})"
                    results.append({"seed": seed, "index": index, "accepted": [], "rejected": [],
                                    "failures": [f"{why}: no answer in {timeout:.0f} s"]})
                    pool[slot] = spawn()
                    del busy[slot]
            if progress and results and len(results) % 50 == 0:
                print(f"{len(results)}/{count} inputs, {time.monotonic() - started:.0f} s", file=sys.stderr)
        for proc, conn in pool:
            conn.send(None)
            proc.join(10)
        return summarise(seed, results, time.monotonic() - started)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def summarise(seed: int, results: list[dict], seconds: float) -> dict:
    failures = [r for r in results if r["failures"]]
    kinds = Counter(f.split(":")[0].split(" ")[0] for r in failures for f in r["failures"])
    return {
        "seed": seed, "tried": len(results), "seconds": round(seconds, 1),
        "by_kind": dict(Counter(r.get("kind", "?") for r in results)),
        "accepted": sum(1 for r in results if r["accepted"] and not r["failures"]),
        "rejected_only": sum(1 for r in results if not r["accepted"] and r["rejected"] and not r["failures"]),
        "rejected_by_reason": dict(Counter(x for r in results for x in r["rejected"]).most_common()),
        "crashes": kinds.get("crash", 0) + kinds.get("campaign", 0), "hangs": kinds.get("hang", 0),
        "memory": kinds.get("memory", 0), "touched": kinds.get("touched", 0), "temporaries": kinds.get("temporary", 0),
        "failures": [{k: r.get(k) for k in ("seed", "index", "kind", "origin", "mutations", "failures", "kept")}
                     for r in failures],
    }


def main(argv: list[str] | None = None) -> int:
    if str(REPO) not in sys.path:  # run as a script: the repository's reliability package
        sys.path.insert(0, str(REPO))
    from reliability.report import finish

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--start", type=int, default=0, help="first input index (to split a campaign)")
    parser.add_argument("--data", type=Path, default=None, help="../shared/data (default: the demo's inputs)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds one input may take")
    parser.add_argument("--memory-gb", type=float, default=3.0, help="heap growth one input may cause")
    parser.add_argument("--replay", help="SEED:INDEX: rebuild that input into --keep (a regression test's input)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="where failing (or, with --replay, the replayed) inputs are copied (default: "
                             "$TMPDIR/medseg-fuzz-failures)")
    parser.add_argument("--out", type=Path, default=None, help="write the summary JSON here")
    args = parser.parse_args(argv)
    if args.replay:
        seed, index = (int(v) for v in args.replay.split(":"))
        summary = campaign(seed, 1, args.data, 1, args.timeout, args.memory_gb, args.keep or Path("fuzz-replay"),
                           start=index, keep_all=True)
    else:
        summary = campaign(args.seed, args.count, args.data, args.workers, args.timeout, args.memory_gb, args.keep,
                           start=args.start, progress=True)
    return finish(summary, args.out, lambda f: f"input {f['index']} ({f.get('kind')}: {f.get('mutations')}): "
                                               f"replay with --replay {f['seed']}:{f['index']}; "
                                               f"{f['failures'][0].splitlines()[0]}")


if __name__ == "__main__":
    sys.exit(main())

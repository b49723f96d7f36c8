"""Accuracy yardstick: medseg's real stages against a MONAI tutorial-style loop, by patient-level cross-validation.

Run by hand: ``python benchmarks/accuracy.py [--benchmark NAME] [--quick] [--max-folds N]`` or
``python benchmarks/accuracy.py --data DIR [--folds K] [--minutes M] [--set train.augmentation.rotate_prob=0]``.
The benchmarks (``BENCHMARKS``, data in ``../shared/data``; default ``acdc100``):

- ``acdc100``: ACDC's 100 training patients, 5 folds by patient stratified by the ACDC group (``Info.cfg``),
  15 minutes per fold and method, against the 2D slice loop;
- ``hippocampus``: MSD Task04 (200 cases), 5 folds, 15 minutes, against the plain 3D loop;
- ``acdc5``: the five-patient set, leave one patient out, 10 minutes (the small-data case);
- ``pranet``: PraNet's polyp training split, 5 folds, 15 minutes; ``polypgen``: PolypGen, 3 folds by sequence,
  10 minutes; both against the 2D frame loop.

``--quick`` takes 3 folds and 5 minutes unless given.

Everything is written to a work folder (``--work``, default a fresh temporary folder), never to the data folder:

1. ``medseg ingest`` (with ``--write-id-map``), ``plan``, ``preprocess`` on a copy of ``params.yaml`` whose paths,
   MLflow store, folds and time budget point at the work folder; ``splits.json``'s patient folds are used for every
   method.
2. Per fold: ``medseg train`` then ``medseg predict`` on the held-out patients' original images; the peer on the
   same training cases' original files, same time budget (``tutorial_loop.py``, slice-wise 2D, where medseg plans
   2D; ``tutorial_loop_3d.py`` where it plans 3D; ``tutorial_loop_2d.py`` for frames); optionally
   nnU-Net v2 (``--with-nnunet``, or by default with CUDA; trained with ``nnUNetTrainer_5epochs``, not budgeted).
3. Scoring on the ORIGINAL grids and ground truths: per case and class Dice and HD95 (mm, the file's pixdim), mean
   Dice with a bootstrap 95% CI over patients, and the paired difference medseg minus the peer.

2D image folders (``medseg ingest``'s ``images`` layout: PolypGen, Kvasir-SEG, CVC-ClinicDB) run the same way: folds
by group (video sequence, ``data.group_pattern``), medseg predicting ``<case>.png`` at each frame's size, the peer
``benchmarks/tutorial_loop_2d.py`` (frames resized to 256 x 256), scored against the original masks (binarised at
> 127) with HD95 in pixels; IoU is reported beside Dice.

Scores are ``medseg.evaluation.metrics``' (the same Dice and HD95 as ``medseg evaluate``, the registry and the promotion gate):
a class absent from both truth and prediction scores Dice 1 and HD95 0; absent from one only, Dice 0 and HD95
missing (no surface to measure to), reported as a count beside the HD95 mean, which excludes it.
No choice may see the test patients: ``evaluate.largest_component: auto`` would decide medseg's post-processing from
the held-out cases of the fold being trained, so the yardstick sets it to ``true`` (``--set
evaluate.largest_component=auto`` to measure it anyway). Intermediate validations only report (the last epoch's
weights are kept) and would spend budget the peer spends training, so ``train.val_interval`` is set beyond any epoch.

Writes ``WORK/accuracy.json`` (``--json``): per-case per-class numbers, per-fold times, summaries, command line, git
commit and settings. Case ids are medseg's pseudonyms; source file names stay in the (private) id map.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from medseg.evaluation.metrics import RESAMPLES, bootstrap, hd95, score_case, surface  # noqa: F401  (re-exported for tests)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
# name -> (data folder, folds (None: one per patient), minutes per fold and method)
BENCHMARKS = {"acdc100": (SHARED / "acdc100", 5, 15.0), "hippocampus": (SHARED / "hippocampus", 5, 15.0),
              "acdc5": (SHARED / "acdc", None, 10.0), "pranet": (SHARED / "polyp_pranet" / "TrainDataset", 5, 15.0),
              "polypgen": (SHARED / "polyp" / "polypgen", 3, 10.0)}
MEDSEG = [sys.executable, "-m", "medseg.cli"]
# Inference-only variants of medseg, scored from the same fold models (no extra training): each recipe item of
# inference gets its ablation row in the same run. The yardstick's medseg keeps the largest component of every class.
VARIANTS = {"no-pp": ["--no-largest-component"], "tta": ["--tta"]}
NNUNET_TRAINER = "nnUNetTrainer_5epochs"  # the shortest shipped variant but nnUNetTrainer_1epoch


def summarise(rows: list[dict], classes: list[str], seed: int = 0) -> dict:
    """One method's rows (one per case and class) -> mean Dice [CI over patients], per-class Dice and HD95."""
    by_patient: dict[str, list[float]] = {}
    for r in rows:
        by_patient.setdefault(r["subject"], []).append(r["dice"])
    mean, lo, hi = bootstrap(list(by_patient.values()), seed=seed)
    per_class = {}
    for name in classes:
        mine = [r for r in rows if r["class"] == name]
        hds = [r["hd95"] for r in mine if r["hd95"] is not None]
        per_class[name] = {"dice": float(np.mean([r["dice"] for r in mine])),
                           "iou": float(np.mean([iou(r["dice"]) for r in mine])),
                           "hd95": float(np.mean(hds)) if hds else None, "hd95_missing": len(mine) - len(hds)}
    return {"mean_dice": mean, "ci95": [lo, hi], "mean_iou": float(np.mean([iou(r["dice"]) for r in rows])),
            "per_class": per_class, "patients": len(by_patient), "cases": len({r["case_id"] for r in rows})}


def iou(dice: float) -> float:
    """IoU (Jaccard) of the masks whose Dice is ``dice``: exactly Dice / (2 - Dice)."""
    return dice / (2.0 - dice)


def paired_difference(rows: list[dict], a: str, b: str, seed: int = 0) -> dict | None:
    """Mean Dice of method ``a`` minus ``b`` over the (case, class) pairs both scored, with a patient bootstrap CI."""
    dice = {(r["method"], r["case_id"], r["class"]): r for r in rows}
    by_patient: dict[str, list[float]] = {}
    for (method, case_id, name), r in dice.items():
        if method == a and (b, case_id, name) in dice:
            by_patient.setdefault(r["subject"], []).append(r["dice"] - dice[(b, case_id, name)]["dice"])
    if not by_patient:
        return None
    mean, lo, hi = bootstrap(list(by_patient.values()), seed=seed)
    return {"a": a, "b": b, "mean": mean, "ci95": [lo, hi], "patients": len(by_patient)}


def format_table(summaries: dict[str, dict], classes: list[str], minutes: dict[str, float | None],
                 difference: dict | None) -> str:
    """Side-by-side rows: mean Dice [CI], Dice and HD95 per class, minutes per fold; then the paired difference."""
    head = (f"{'method':17s} {'mean Dice [95% CI]':22s} {'IoU':>6s} " + " ".join(f"{'Dice ' + c:>15s}" for c in classes) + " "
            + " ".join(f"{'HD95 ' + c:>17s}" for c in classes) + f" {'train min':>9s}")
    lines = [head, "-" * len(head)]
    for method, s in summaries.items():
        hds = []
        for c in classes:
            pc = s["per_class"][c]
            hd = "-" if pc["hd95"] is None else f"{pc['hd95']:.1f}"
            if pc["hd95_missing"]:
                hd += f" ({pc['hd95_missing']} miss)"
            hds.append(f"{hd:>17s}")
        took = minutes.get(method)
        lines.append(f"{method:17s} {s['mean_dice']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]   "
                     f"{s.get('mean_iou', float('nan')):6.3f} "
                     + " ".join(f"{s['per_class'][c]['dice']:15.3f}" for c in classes) + " " + " ".join(hds)
                     + f" {'-' if took is None else f'{took:.1f}':>9s}")
    if difference:
        lines.append(f"{difference['a']} - {difference['b']}: {difference['mean']:+.3f} "
                     f"[{difference['ci95'][0]:+.3f}, {difference['ci95'][1]:+.3f}] "
                     f"({difference['patients']} patients)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- pipeline
def sh(cmd: list[str], log: Path, env: dict, cwd: Path) -> float:
    """Run ``cmd`` with its output in ``log``; returns wall seconds, raises RuntimeError with the log's last line."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "w") as fh:
        code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd).returncode
    if code:
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:] or ["(no output)"]
        raise RuntimeError(f"{' '.join([Path(cmd[0]).name, *cmd[1:4]])} exited {code}: {tail[0][-200:]} (log: {log})")
    return time.perf_counter() - started


def set_key(raw: dict, dotted: str, value) -> None:
    """``raw["a"]["b"] = value`` for ``"a.b"``; the key must exist already (a typo would silently do nothing)."""
    *parents, last = dotted.split(".")
    node = raw
    for key in parents:
        node = node.get(key) if isinstance(node, dict) else None
    if not isinstance(node, dict) or last not in node:
        raise SystemExit(f"--set {dotted}: no such key in params.yaml")
    node[last] = value


def write_params(work: Path, data: Path, folds: int, minutes: float, seed: int, sets: list[str]) -> dict:
    """The project's params.yaml with every path under ``work``, our folds and budget, then the ``--set`` overrides."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["paths"] = {k: str(work / Path(v).name) for k, v in raw["paths"].items()}
    raw["data"]["source"] = str(data)
    raw["mlflow"].update(tracking_uri=f"sqlite:///{work / 'mlflow.db'}", artifact_root=str(work / "mlartifacts"))
    raw["preprocess"]["folds"] = folds
    raw["train"].update(time_budget_minutes=minutes, final_model=False, seed=seed, val_interval=10**6)
    if raw["evaluate"].get("largest_component") == "auto":  # decided on the test fold: see the module docstring
        raw["evaluate"]["largest_component"] = True
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item}: expected key=value")
        set_key(raw, key.strip(), yaml.safe_load(value))
    return raw


def original_files(data: Path, source: str, ingested: Path, case: dict) -> tuple[Path, Path]:
    """A case's original image and ground truth: the source NIfTI and the label beside it (ACDC ``_gt``,
    ``labelsTr/`` or ``labels/`` of the same name); a 2D image file and its mask; for other sources (DICOM) the
    ingested files, on the same grid."""
    from medseg.ingest.images import find_image_pairs, is_image, mask_for

    image = data / source
    if image.is_file() and is_image(image):
        mask = mask_for(image, find_image_pairs(data)[1])
        if mask is not None:
            return image, mask
    if image.is_file() and image.name.endswith((".nii.gz", ".nii")):
        stem = image.name.removesuffix(".gz").removesuffix(".nii")
        for label in (image.with_name(f"{stem}_gt{image.name[len(stem):]}"),
                      image.parent.parent / "labelsTr" / image.name, image.parent.parent / "labels" / image.name,
                      image.parent.parent / "labels" / image.name.replace("_0000.nii", ".nii")):
            if label.is_file():
                return image, label
    return ingested / case["image"], ingested / case["label"]


def link(target: Path, dest: Path) -> Path:
    """``dest`` -> ``target`` symlink (replacing an old one): inputs named by case id, sources untouched."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.unlink(missing_ok=True)
    dest.symlink_to(target.resolve())
    return dest


def run_medseg(work: Path, fold: int, params: dict, test: list[str], cases: dict, env: dict,
               method: str = "medseg") -> tuple[dict, dict]:
    """``medseg train`` on the fold, ``medseg predict`` on the held-out originals -> ({case_id: output}, times)."""
    tag = safe_name(method)
    fold_params = work / f"params_{tag}_fold{fold}.yaml"
    fold_params.write_text(yaml.safe_dump({**params, "train": {**params["train"], "fold": fold}}, sort_keys=False))
    train_s = sh(MEDSEG + ["train", "--params", str(fold_params)], work / "logs" / f"{tag}_train_{fold}.log", env,
                 work)
    outputs, predict_s = predict_medseg(work, fold, params, test, cases, env, method, [])
    return outputs, {"train_s": train_s, "predict_s": predict_s}


def safe_name(method: str) -> str:
    """A method's name as a file name: ``medseg[scratch]`` -> ``medseg_scratch``, ``medseg/tta`` -> ``medseg_tta``."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in method).strip("_")


def parse_variant(spec: str) -> tuple[str, list[str]]:
    """``--train-variant NAME:KEY=VALUE[;KEY=VALUE]`` -> (``medseg[NAME]``, ``["KEY=VALUE", ...]``)."""
    name, sep, sets = spec.partition(":")
    items = [item.strip() for item in sets.split(";") if item.strip()]
    if not sep or not name.strip() or not items or any("=" not in item for item in items):
        raise SystemExit(f"--train-variant {spec}: expected NAME:KEY=VALUE[;KEY=VALUE...]")
    return f"medseg[{name.strip()}]", items


def variant_params(work: Path, base: dict, method: str, sets: list[str]) -> dict:
    """A training variant's params: the yardstick's own with ``sets`` applied, and its plan, preprocessed data,
    models and checkpoints in ``work/variants/<name>`` (a variant may plan another network or normalisation); the
    ingested data, hence the folds, are shared."""
    import copy

    raw = copy.deepcopy(base)
    folder = work / "variants" / safe_name(method)
    for key in ("plans", "preprocessed", "model", "checkpoints", "evaluation", "cache", "registry"):
        raw["paths"][key] = str(folder / Path(base["paths"][key]).name)
    for item in sets:
        key, _, value = item.partition("=")
        set_key(raw, key.strip(), yaml.safe_load(value))
    return raw


def predict_medseg(work: Path, fold: int, params: dict, test: list[str], cases: dict, env: dict, method: str,
                   flags: list[str]) -> tuple[dict, float]:
    """``medseg predict [flags]`` with the fold's model on the held-out originals -> ({case_id: output}, seconds)."""
    inputs, out = work / "inputs" / f"fold_{fold}", work / "pred" / safe_name(method) / f"fold_{fold}"
    for cid in test:
        link(cases[cid]["image"], inputs / f"{cid}{input_suffix(cases[cid]['image'])}")
    seconds = sh(MEDSEG + ["predict", "--model", str(Path(params["paths"]["model"]) / f"fold_{fold}"), *flags,
                           str(inputs), "--out", str(out)],
                 work / "logs" / f"{safe_name(method)}_predict_{fold}.log", env, work)
    return {cid: out / output_name(cid, cases[cid]["image"]) for cid in test}, seconds


def input_suffix(image: Path) -> str:
    """``.nii.gz`` for volumes; a 2D image keeps its own suffix (medseg predict reads it by that)."""
    return ".nii.gz" if image.name.endswith((".nii.gz", ".nii")) else image.suffix.lower()


def output_name(cid: str, image: Path) -> str:
    """What predict writes for an input: ``<case>.nii.gz`` for a volume, ``<case>.png`` for a 2D image."""
    return f"{cid}.nii.gz" if input_suffix(image) == ".nii.gz" else f"{cid}.png"


def peer_script(frames: bool, spatial_dims: int) -> str:
    """The plain loop that matches medseg's planned network: frames resized to 256 (``tutorial_loop_2d.py``), a 3D
    U-Net on whole volumes (``tutorial_loop_3d.py``) or slices at 1.5 mm (``tutorial_loop.py``)."""
    return "tutorial_loop_2d.py" if frames else "tutorial_loop_3d.py" if spatial_dims == 3 else "tutorial_loop.py"


def run_tutorial(work: Path, fold: int, train: list[str], test: list[str], cases: dict, minutes: float,
                 num_classes: int, seed: int, extra: list[str], env: dict, spatial_dims: int = 2) -> tuple[dict, dict]:
    """The plain loop (:func:`peer_script`) on the fold's original files, in its own process."""
    folder = work / "tutorial" / f"fold_{fold}"
    folder.mkdir(parents=True, exist_ok=True)
    out = work / "pred" / "tutorial" / f"fold_{fold}"
    (folder / "train.json").write_text(json.dumps([{"image": str(cases[c]["image"]), "label": str(cases[c]["label"])}
                                                   for c in train], indent=1))
    (folder / "predict.json").write_text(json.dumps([{"image": str(cases[c]["image"]),
                                                      "output": str(out / output_name(c, cases[c]["image"]))}
                                                     for c in test], indent=1))
    frames = any(output_name(c, cases[c]["image"]).endswith(".png") for c in test)
    script = peer_script(frames, spatial_dims)
    wall = sh([sys.executable, str(REPO / "benchmarks" / script),
               "--train-list", str(folder / "train.json"), "--predict-list", str(folder / "predict.json"),
               "--out", str(folder), "--minutes", str(minutes), "--num-classes", str(num_classes),
               "--seed", str(seed), *extra],
              work / "logs" / f"tutorial_{fold}.log", env, work)
    summary = json.loads((folder / "summary.json").read_text())
    return {c: out / output_name(c, cases[c]["image"]) for c in test}, {"train_s": wall - summary["predict_seconds"],
                                                     "predict_s": summary["predict_seconds"], "steps": summary["steps"]}


def run_nnunet(work: Path, fold: int, train: list[str], test: list[str], cases: dict, labels: dict[int, str],
               modality: str, env: dict) -> tuple[dict, dict]:
    """nnU-Net v2, 2d configuration, ``NNUNET_TRAINER``, fold 0 = our fold (``splits_final.json``).

    It reads the ingested NIfTI (same voxel grid as the originals, but with the pixdim spacing ACDC's sform lacks);
    its outputs keep that grid. Training cases only in ``imagesTr``; the one "validation" case nnU-Net insists on is
    a training case (used for its logs only; we predict with ``checkpoint_final.pth``, not its best checkpoint).
    """
    import torch

    root, dataset_id = work / "nnunet", 900 + fold
    name = f"Dataset{dataset_id:03d}_MedsegFold{fold}"
    raw = root / "raw" / name
    for c in train:
        link(cases[c]["ingested_image"], raw / "imagesTr" / f"{c}_0000.nii.gz")
        link(cases[c]["ingested_label"], raw / "labelsTr" / f"{c}.nii.gz")
    for c in test:
        link(cases[c]["ingested_image"], raw / "imagesTs" / f"{c}_0000.nii.gz")
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT" if modality == "CT" else "MRI"}, "file_ending": ".nii.gz",
        "labels": {"background": 0, **{n: v for v, n in sorted(labels.items()) if v}}, "numTraining": len(train)},
        indent=1))
    env = {**env, "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
           "nnUNet_results": str(root / "results")}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    logs, out = work / "logs", work / "pred" / "nnunet" / f"fold_{fold}"

    def tool(name: str) -> str:  # the entry points beside this interpreter, whether or not the venv is activated
        beside = Path(sys.executable).parent / name
        return str(beside) if beside.is_file() else name

    train_s = sh([tool("nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-c", "2d"],
                 logs / f"nnunet_plan_{fold}.log", env, work)
    (root / "preprocessed" / name / "splits_final.json").write_text(json.dumps([{"train": train, "val": train[:1]}]))
    train_s += sh([tool("nnUNetv2_train"), str(dataset_id), "2d", "0", "-tr", NNUNET_TRAINER, "-device", device],
                  logs / f"nnunet_train_{fold}.log", env, work)
    predict_s = sh([tool("nnUNetv2_predict"), "-i", str(raw / "imagesTs"), "-o", str(out), "-d", str(dataset_id),
                    "-c", "2d", "-f", "0", "-tr", NNUNET_TRAINER, "-chk", "checkpoint_final.pth", "-device", device],
                   logs / f"nnunet_predict_{fold}.log", env, work)
    return {c: out / f"{c}.nii.gz" for c in test}, {"train_s": train_s, "predict_s": predict_s}


def git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark", choices=sorted(BENCHMARKS), default="acdc100",
                        help="data, folds and minutes of a named benchmark (module docstring); default acdc100")
    parser.add_argument("--data", type=Path, default=None, help="any folder 'medseg ingest' reads (default: the "
                        "benchmark's; then one fold per patient and 10 minutes unless given)")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a fresh temporary folder)")
    parser.add_argument("--folds", type=int, default=None, help="patient folds (default: one per patient)")
    parser.add_argument("--max-folds", type=int, default=None, help="run only the first N folds")
    parser.add_argument("--minutes", type=float, default=None, help="training minutes per fold and method (10)")
    parser.add_argument("--quick", action="store_true", help="--folds 3 --minutes 5 unless given")
    parser.add_argument("--methods", default="medseg,tutorial", help="comma-separated: medseg, tutorial, nnunet")
    parser.add_argument("--with-nnunet", action="store_true", help="add nnunet (default with CUDA)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="params override for medseg, dotted key and YAML value; repeatable")
    parser.add_argument("--train-variant", dest="train_variants", action="append", default=[],
                        metavar="NAME:KEY=VALUE[;KEY=VALUE]",
                        help="a medseg recipe trained beside the default on the same folds and budget, reported as "
                             "medseg[NAME] with its paired difference to medseg, e.g. 'scratch:model.encoder=none'; "
                             "repeatable")
    parser.add_argument("--tutorial-args", default="", help="extra arguments for tutorial_loop.py, e.g. '--tiny'")
    parser.add_argument("--variants", default="", help=f"comma-separated inference-only medseg rows from the same "
                        f"fold models: {', '.join(VARIANTS)} (post-processing off, mirroring TTA)")
    parser.add_argument("--json", type=Path, default=None, help="default: WORK/accuracy.json")
    parser.add_argument("--seed", type=int, default=0, help="training seeds and the bootstrap")
    args = parser.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if set(args.variants) - set(VARIANTS):
        parser.error(f"--variants: choose among {', '.join(VARIANTS)}")
    args.train_variants = [parse_variant(v) for v in args.train_variants]
    if args.data is not None:  # any other folder: no named benchmark's folds or minutes
        args.benchmark = None
    data, folds, minutes = BENCHMARKS[args.benchmark] if args.benchmark else (args.data, None, 10.0)
    args.data = data
    args.minutes = args.minutes if args.minutes is not None else 5.0 if args.quick else minutes
    args.folds = args.folds if args.folds is not None else 3 if args.quick else folds
    return args


def main(argv: list[str] | None = None) -> dict:
    import torch

    args = parse_args(argv)
    data = args.data.expanduser().resolve()
    work = (args.work or Path(tempfile.mkdtemp(prefix="medseg-accuracy-"))).expanduser().resolve()
    if work.is_relative_to(data):
        raise SystemExit(f"--work {work} lies inside the data folder {data}: nothing may be written there")
    work.mkdir(parents=True, exist_ok=True)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if set(methods) - {"medseg", "tutorial", "nnunet"}:
        raise SystemExit(f"--methods {args.methods}: choose among medseg, tutorial, nnunet")
    if (args.with_nnunet or torch.cuda.is_available()) and "nnunet" not in methods:
        methods.append("nnunet")
    if "nnunet" in methods:
        try:
            import nnunetv2  # noqa: F401
        except ImportError as err:
            print(f"nnunet skipped: nnunetv2 is not importable ({err}); it comes with the 'bench' extra")
            methods.remove("nnunet")
    print(f"accuracy yardstick: {data} -> {work}; methods {', '.join(methods)}, {args.minutes} min per fold and "
          f"method", flush=True)

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # runs go to WORK/mlflow.db
    # Every method with the allocator settings the medseg command gives itself (medseg.common.malloc_tuning): on these VMs they
    # are worth up to 1.7x on a convolution, and a peer without them would train fewer steps in the same minutes
    from medseg.common.malloc_tuning import glibc_environment

    env.update(glibc_environment())
    if not env.get("MEDSEG_PSEUDONYM_KEY"):  # the project's key: stable case ids, so the same folds run to run
        from medseg.common.pseudonym import SECRET_FILE, project_secret

        env["MEDSEG_PSEUDONYM_KEY"] = project_secret(REPO / SECRET_FILE).decode()
    ingested, id_map = work / "ingested", work / "id_map.json"
    group_pattern = write_params(work, data, 2, 1.0, args.seed, args.sets)["data"]["group_pattern"]
    sh(MEDSEG + ["ingest", str(data), "--out", str(ingested), "--write-id-map", str(id_map),
                 "--group-pattern", group_pattern], work / "logs" / "ingest.log", env, work)
    manifest, sources = json.loads((ingested / "manifest.json").read_text()), json.loads(id_map.read_text())
    labels = {int(k): v for k, v in manifest["labels"].items()}
    classes = {k: v for k, v in sorted(labels.items()) if k != 0}
    cases = {}
    for c in manifest["cases"]:
        if c.get("label"):
            image, label = original_files(data, sources[c["case_id"]]["source"], ingested, c)
            cases[c["case_id"]] = {"subject": c["subject"], "image": image, "label": label,
                                   "ingested_image": ingested / c["image"], "ingested_label": ingested / c["label"]}
    folds = args.folds or len({c["subject"] for c in cases.values()})
    params = write_params(work, data, folds, args.minutes, args.seed, args.sets)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in ("plan", "preprocess"):
        sh(MEDSEG + [stage, "--params", str(work / "params.yaml")], work / "logs" / f"{stage}.log", env, work)
    variants_params = {}
    for method, sets in args.train_variants:
        variants_params[method] = variant_params(work, params, method, sets)
        path = work / f"params_{safe_name(method)}.yaml"
        path.write_text(yaml.safe_dump(variants_params[method], sort_keys=False))
        for stage in ("plan", "preprocess"):
            sh(MEDSEG + [stage, "--params", str(path)], work / "logs" / f"{safe_name(method)}_{stage}.log", env, work)
    methods = methods[:1] + list(variants_params) + methods[1:] if methods[:1] == ["medseg"] else (
        methods + list(variants_params))
    splits = json.loads((Path(params["paths"]["preprocessed"]) / "splits.json").read_text())["splits"]
    spatial_dims = int(json.loads((Path(params["paths"]["plans"]) / "plans.json").read_text())["spatial_dims"])
    print(f"{len(cases)} labelled cases, {folds} patient folds; classes {', '.join(classes.values())}", flush=True)

    rows, fold_log = [], []
    modality = manifest["cases"][0].get("modality", "MR")
    for k, split in enumerate(splits[:args.max_folds]):
        record = {"fold": k, "train": split["train"], "test": split["val"], "methods": {}}
        fold_log.append(record)
        for method in methods:
            try:
                if method == "medseg":
                    outputs, times = run_medseg(work, k, params, split["val"], cases, env)
                elif method in variants_params:
                    outputs, times = run_medseg(work, k, variants_params[method], split["val"], cases, env, method)
                elif method == "tutorial":
                    outputs, times = run_tutorial(work, k, split["train"], split["val"], cases, args.minutes,
                                                  max(labels) + 1, args.seed, shlex.split(args.tutorial_args), env,
                                                  spatial_dims)
                else:
                    outputs, times = run_nnunet(work, k, split["train"], split["val"], cases, labels, modality, env)
                scored = score_outputs(method, k, outputs, cases, classes)
                for name in args.variants if method == "medseg" else []:
                    variant = f"medseg/{name}"
                    try:
                        out_v, seconds = predict_medseg(work, k, params, split["val"], cases, env, variant,
                                                        VARIANTS[name])
                        scored += score_outputs(variant, k, out_v, cases, classes)
                        times[f"predict_{name}_s"] = seconds
                    except Exception as err:  # the variant's rows are missing; medseg's own stand
                        print(f"fold {k} {variant}: FAILED: {err}", flush=True)
            except Exception as err:  # fail-soft: one line, the other methods and folds go on
                print(f"fold {k} {method}: FAILED: {err}", flush=True)
                record["methods"][method] = {"status": "failed", "error": str(err)}
                continue
            rows += scored
            record["methods"][method] = {"status": "ok", **{key: round(v, 1) for key, v in times.items()}}
            scored = [r for r in scored if r["method"] == method]
            dice = np.mean([r["dice"] for r in scored]) if scored else float("nan")
            print(f"fold {k} {method}: trained {times['train_s'] / 60:.1f} min, predicted "
                  f"{times['predict_s'] / 60:.1f} min, {len(split['val'])} held-out cases, mean Dice {dice:.3f}",
                  flush=True)

    names = list(classes.values())
    variants = [f"medseg/{name}" for name in args.variants]
    scored_methods = [m for m in methods + variants if any(r["method"] == m for r in rows)]
    summaries = {m: summarise([r for r in rows if r["method"] == m], names, args.seed) for m in scored_methods}
    minutes = {}
    for m in methods:
        walls = [f["methods"][m]["train_s"] for f in fold_log if f["methods"].get(m, {}).get("status") == "ok"]
        minutes[m] = float(np.mean(walls)) / 60 if walls else None
    difference = paired_difference(rows, "medseg", "tutorial", args.seed) if {"medseg", "tutorial"} <= set(
        scored_methods) else None
    variant_differences = [d for v in variants + list(variants_params)
                           if (d := paired_difference(rows, v, "medseg", args.seed))]
    print(format_table(summaries, names, minutes, difference), flush=True)
    for d in variant_differences:  # same models: only the inference item differs
        print(f"{d['a']} - {d['b']}: {d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]", flush=True)
    result = {"command": [sys.executable, *sys.argv] if argv is None else ["accuracy.py", *argv],
              "git_commit": git_commit(), "work": str(work), "data": str(data),
              "settings": {"benchmark": args.benchmark, "spatial_dims": spatial_dims, "folds": folds,
                           "max_folds": args.max_folds, "minutes": args.minutes, "methods": methods,
                           "set": args.sets, "variants": args.variants,
                           "train_variants": {m: sets for m, sets in args.train_variants},
                           "tutorial_args": args.tutorial_args, "seed": args.seed,
                           "bootstrap_resamples": RESAMPLES, "medseg_params": params,
                           "nnunet_trainer": NNUNET_TRAINER if "nnunet" in methods else None},
              "labels": {str(k): v for k, v in labels.items()}, "folds": fold_log, "train_minutes_per_fold": minutes,
              "summary": summaries, "difference": difference, "variant_differences": variant_differences,
              "cases": rows}
    out = args.json or work / "accuracy.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written {out}", flush=True)
    return result


def score_outputs(method: str, fold: int, outputs: dict[str, Path], cases: dict, classes: dict[int, str]) -> list:
    """Rows ``{method, fold, case_id, subject, class, dice, hd95}`` of each held-out case against its original truth.

    Spacing for HD95 is the truth file's pixdim: the public ACDC files carry a 1 mm sform beside the true spacing.
    """
    import nibabel as nib

    rows = []
    for cid, path in outputs.items():
        if Path(path).suffix == ".png":  # a 2D frame: the mask as the data set gives it, HD95 in pixels
            truth, pred = read_masks(path, cases[cid]["label"], len(classes) + 1)
            spacing = [1.0, 1.0, 1.0]
        else:
            truth_img = nib.load(str(cases[cid]["label"]))
            truth = np.asarray(truth_img.dataobj).round().astype(np.int64)
            pred = np.asarray(nib.load(str(path)).dataobj).round().astype(np.int64)
            spacing = [float(z) for z in truth_img.header.get_zooms()[:3]]
        for name, s in score_case(pred, truth, classes, spacing).items():
            rows.append({"method": method, "fold": fold, "case_id": cid, "subject": cases[cid]["subject"],
                         "class": name, **s})
    return rows


def read_masks(pred_png: Path, truth_file: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(truth, prediction) label arrays ``(H, W, 1)`` of a frame: a mask whose values are all below ``num_classes``
    holds label values; any other is binary, binarised at > 127 (JPEG masks, predicted 0/255 PNGs)."""
    from medseg.ingest.images import mask_values, read_image

    def labels(path: Path) -> np.ndarray:
        mask = read_image(Path(path), "mask")
        return mask_values(mask, labelled=int(mask.max()) < num_classes).astype(np.int64)[..., None]

    return labels(truth_file), labels(pred_png)


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as err:  # ingest, plan or preprocess failed: nothing to compare
        sys.exit(f"accuracy: {err}")

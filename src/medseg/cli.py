"""``medseg`` command line: thin argparse glue over each stage's pure ``run()``.

Stage modules are imported only inside the chosen command, so ``medseg --help`` and ``medseg ingest`` never pay
for importing torch and MONAI.
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
import sys
from pathlib import Path

from medseg.common.params import DEFAULT_PARAMS_FILE

__all__ = ["main", "build_parser", "STAGE_MODULES"]

#: Each dvc.yaml stage's module (its ``run(params)``), in lifecycle order: the command, the flow and dvc.yaml's code
#: deps (tests/test_dvc_deps.py) all follow this table.
STAGE_MODULES = {
    "demo_data": "medseg.demo.demo_data",
    "ingest": "medseg.ingest",
    "plan": "medseg.planning.plan",
    "preprocess": "medseg.preprocessing.preprocess",
    "train": "medseg.training.train",
    "evaluate": "medseg.evaluation.evaluate",
    "register": "medseg.registry.register",
}

log = logging.getLogger("medseg")

# errno values of a full or read-only disk (ENOSPC, EDQUOT, EROFS, EFBIG): a user's to fix, said in one line
DISK_ERRNOS = {28, 122, 30, 27}
# Where each stage writes (a params.paths entry): named when the disk fills and the error does not say where
STAGE_OUTPUTS = {"demo-data": "demo", "ingest": "ingested", "plan": "plans", "preprocess": "preprocessed",
                 "train": "model", "evaluate": "evaluation", "register": "registry"}


def _disk_problem(err: BaseException, args: argparse.Namespace) -> str | None:
    """One line for an error that is a full (or read-only) disk anywhere in its chain, naming the path; else None.

    SQLite says "database or disk is full" through SQLAlchemy and MLflow, which wrap it in their own exceptions."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in DISK_ERRNOS:
            where = err.filename or _stage_output(args)
            return f"{err.strerror or 'disk full'} writing {where}"
        if "database or disk is full" in str(err):
            return f"database or disk is full writing the MLflow store ({_store(args)})"
        err = err.__cause__ or err.__context__
    return None


def _stage_output(args: argparse.Namespace) -> str:
    try:
        return str(getattr(_params(args).paths, STAGE_OUTPUTS[args.command]))
    except Exception:  # noqa: BLE001 - no params file (predict, export-bundle), or a command without one folder
        return getattr(args, "out", None) or "its output"


def _store(args: argparse.Namespace) -> str:
    try:
        from medseg.common.tracking import tracking_uri

        return tracking_uri(_params(args).mlflow)
    except Exception:  # noqa: BLE001
        return "MLFLOW_TRACKING_URI"


def _params(args: argparse.Namespace):
    from medseg.common.params import load_params

    return load_params(args.params)


def _stage(name: str):
    """The stage module of ``name`` (imported only now: ``medseg --help`` never pays for torch and MONAI)."""
    import importlib

    return importlib.import_module(STAGE_MODULES[name])


def _given(**options):
    """The options given on the command line (not None): they override params, or the function's defaults."""
    return {key: value for key, value in options.items() if value is not None}


def _cmd_demo_data(args: argparse.Namespace) -> dict:
    import dataclasses

    demo_data = _stage("demo_data")

    params = _params(args)
    demo = dataclasses.replace(params.demo, **_given(seed=args.seed, cardiac_patients=args.cardiac_patients,
                                                     ct_patients=args.ct_patients, polyp_frames=args.polyp_frames))
    paths = dataclasses.replace(params.paths, demo=args.out) if args.out else params.paths
    return demo_data.run(dataclasses.replace(params, demo=demo, paths=paths))


def _cmd_ingest(args: argparse.Namespace) -> dict:
    import dataclasses

    ingest = _stage("ingest")

    id_map = Path(args.write_id_map) if args.write_id_map else None
    if not Path(args.params).is_file() and args.source and args.out:  # a folder converted outside any project
        return ingest.ingest_folder(Path(args.source), Path(args.out), id_map=id_map,
                                    **_given(layout=args.layout, spacing_tolerance=args.spacing_tolerance,
                                             group_pattern=args.group_pattern))
    params = _params(args)
    data = dataclasses.replace(params.data, **_given(source=args.source, layout=args.layout,
                                                     slice_spacing_tolerance=args.spacing_tolerance,
                                                     group_pattern=args.group_pattern))
    paths = dataclasses.replace(params.paths, ingested=args.out) if args.out else params.paths
    return ingest.run(dataclasses.replace(params, data=data, paths=paths), id_map=id_map)


def _cmd_plan(args: argparse.Namespace) -> dict:
    plan = _stage("plan")

    return plan.run(_params(args))


def _cmd_preprocess(args: argparse.Namespace) -> dict:
    preprocess = _stage("preprocess")

    return preprocess.run(_params(args))


def _cmd_train(args: argparse.Namespace) -> dict:
    import os

    train = _stage("train")

    from medseg.common.tracking import dvc_record

    params = _params(args)
    recorded = dvc_record(params.paths.preprocessed, Path(args.params).parent / "dvc.lock")  # set by dvc repro
    summary = train.run(params, resume=args.resume, recorded=recorded)
    return summary if os.environ.get("RANK", "0") == "0" else {}  # under torchrun, one summary, from rank 0


def _cmd_evaluate(args: argparse.Namespace) -> dict:
    evaluate = _stage("evaluate")

    return evaluate.run(_params(args))


def _cmd_register(args: argparse.Namespace) -> dict:
    register = _stage("register")

    return register.run(_params(args))


def _cmd_promote(args: argparse.Namespace) -> dict:
    register = _stage("register")

    return register.promote(_params(args), args.version, args.reason)


def _cmd_predict(args: argparse.Namespace) -> dict:
    from medseg.inference import predict

    # The project's registry (for models:/ URIs) and DICOM slice tolerance: its params.yaml when there is one (else
    # MLflow's environment and ingest's default tolerance).
    params = _params(args) if Path(args.params).is_file() else None
    return predict.run(args.model, Path(args.input), Path(args.out), overlap=args.overlap, tta=args.tta,
                       largest_component=args.largest_component, device=args.device,
                       sw_batch_size=args.sw_batch_size, dicom_seg=args.dicom_seg, ensemble=args.ensemble,
                       mlflow_params=params and params.mlflow,
                       spacing_tolerance=params and params.data.slice_spacing_tolerance)


def _cmd_export_bundle(args: argparse.Namespace) -> dict:
    from medseg.registry import monai_bundle

    params = _params(args) if Path(args.params).is_file() else None
    return monai_bundle.run(args.model, Path(args.out), mlflow_params=params and params.mlflow)


def _cmd_predict_flow(args: argparse.Namespace) -> dict:
    from medseg_pipelines.predict_flow import run

    return run(args.model, args.input, args.out, params_file=args.params)


def _cmd_pipeline(args: argparse.Namespace) -> dict:
    from medseg_pipelines.medseg_flow import run

    return run(params_file=args.params)


def _cmd_serve(args: argparse.Namespace) -> dict:
    from medseg_pipelines.serve import serve

    serve(params_file=args.params, cron=args.cron)
    return {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medseg", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func, help_: str, params: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        if params:
            p.add_argument("--params", default=DEFAULT_PARAMS_FILE,
                           help=f"parameters file (default: {DEFAULT_PARAMS_FILE})")
        p.set_defaults(func=func)
        return p

    p = command("demo-data", _cmd_demo_data, "write the synthetic demo data set (ACDC-layout cardiac MR, DICOM CT, RGB colonoscopy frames)")
    p.add_argument("--out", help="output folder (default: paths.demo in params)")
    for option in ("seed", "cardiac-patients", "ct-patients", "polyp-frames"):
        p.add_argument(f"--{option}", type=int, help=f"default: demo.{option.replace('-', '_')} in params")

    p = command("ingest", _cmd_ingest, "read ACDC, MSD, DICOM, NIfTI or 2D image data into NIfTI + manifest.json")
    p.add_argument("source", nargs="?", help="folder to ingest (default: data.source in params)")
    p.add_argument("--out", help="output folder (default: paths.ingested in params)")
    p.add_argument("--layout", choices=["auto", "acdc", "msd", "dicom", "nifti", "images"],
                   help="default: data.layout in params, else auto")
    p.add_argument("--spacing-tolerance", type=float, default=None, metavar="REL",
                   help="refuse DICOM series whose slice steps deviate more than this fraction from their median "
                        "(default: data.slice_spacing_tolerance in params, else 1%%)")
    p.add_argument("--group-pattern", default=None, metavar="REGEX",
                   help="2D images: regular expression whose first group, at the start of a file stem, names the "
                        "frame's video sequence or patient (default: data.group_pattern in params, else each frame "
                        "its own group)")
    p.add_argument("--write-id-map", metavar="PATH", default=None,
                   help="also write a private (mode 0600) map case_id -> source identifiers, outside --out")

    command("plan", _cmd_plan, "fingerprint the ingested data; plan spacing, 2D/3D, patch, batch, normalisation")
    command("preprocess", _cmd_preprocess, "reorient, resample, normalise, crop; write k-fold patient splits")
    p = command("train", _cmd_train, "train the planned network on train.fold (or all folds); logs to MLflow; "
                                     "under torchrun: data-parallel (DDP)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint if it matches params")
    command("evaluate", _cmd_evaluate, "sliding-window inference on held-out cases; Dice, HD95, plots")
    command("register", _cmd_register, "register the model in MLflow; move 'champion' only if it is better")
    p = command("promote", _cmd_promote, "make a registered version the champion by hand (rollback), recording why")
    p.add_argument("version", help="the model version (register.model_name) to make champion")
    p.add_argument("--reason", required=True, help="why: recorded on the version with who and when")

    p = command("predict", _cmd_predict, "segment a NIfTI file, a DICOM series folder, a 2D image (PNG, JPEG, TIFF, "
                                                   "BMP) or a folder of them", params=False)
    p.add_argument("--model", required=True, action="append",
                   help="model folder (its all-data model fold_all, else its fold_* ensembled), fold_<k> folder, "
                        "model.pt, or models:/NAME@champion; "
                        "repeat to ensemble several models")
    p.add_argument("input", help="NIfTI file, DICOM series folder, 2D image file, or a folder of them")
    p.add_argument("--out", required=True, help="output folder for <case>.nii.gz (and <case>.seg.dcm); a 2D image: "
                                                       "<stem>.png at its own size and overlays/<stem>.png")
    p.add_argument("--overlap", type=float, help="sliding-window overlap (default: the model's, evaluate.sw_overlap "
                                                 "of the params it was trained with)")
    p.add_argument("--sw-batch-size", type=int, help="windows per network call (default: the model's)")
    p.add_argument("--params", default=DEFAULT_PARAMS_FILE,
                   help="the project's params file, whose MLflow store models:/ URIs are looked up in, if it exists")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="mirroring test-time augmentation (default: the model's inference config)")
    p.add_argument("--largest-component", action=argparse.BooleanOptionalAction, default=None,
                   help="keep each class's largest connected component (default: the model's inference config)")
    p.add_argument("--ensemble", action="store_true",
                   help="a model folder gives every fold: the cross-validation models with the all-data model "
                        "(slower by the number of folds, usually a little more accurate)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (where the network runs)")
    p.add_argument("--dicom-seg", action="store_true",
                   help="for DICOM series inputs, also write <case>.seg.dcm, a DICOM-SEG referencing the series")

    p = command("export-bundle", _cmd_export_bundle, "write a trained model as a MONAI bundle (configs/, models/model.pt) "
                                                     "that `python -m monai.bundle run` runs", params=False)
    p.add_argument("--model", required=True, help="model folder (its fold_all), fold_<k> folder, model.pt, or "
                                                  "models:/NAME@champion")
    p.add_argument("--out", required=True, help="the bundle's folder (replaced whole)")
    p.add_argument("--params", default=DEFAULT_PARAMS_FILE,
                   help="the project's params file, whose MLflow store models:/ URIs are looked up in, if it exists")

    p = command("predict-flow", _cmd_predict_flow, "batch prediction as the Prefect flow 'medseg-predict': one task "
                                                    "per study or NIfTI file, on orchestration.task_runner")
    p.add_argument("--model", required=True, help="as for predict: a model folder, fold, model.pt or models:/ URI")
    p.add_argument("input", help="a folder of studies (sub-folders) and/or NIfTI files")
    p.add_argument("--out", required=True, help="output folder")

    command("pipeline", _cmd_pipeline, "run all stages as the Prefect flow 'medseg-pipeline'")
    p = command("serve", _cmd_serve, "serve the Prefect deployment that retrains on a cron schedule")
    p.add_argument("--cron", default=None, help="cron schedule (default: the deployment's)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``medseg`` command; ``argv`` None reads the command line (a process of medseg's own: its allocator keeps
    freed memory, :mod:`medseg.common.malloc_tuning`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if argv is None:
        from medseg.common.malloc_tuning import keep_freed_memory

        keep_freed_memory()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # MONAI 1.6 says, on every image it loads, that NVIDIA's nvImageCodec (a GPU DICOM decoder) is absent: two lines
    # per case in ingest and preprocess that bury the one line a bad case gets. pydicom's own decoders are used.
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    # MLflow logs a database error with its whole traceback, then raises it; the command reports it (a full disk in
    # one line, anything else with its traceback), so the log copy is kept for -v
    if not args.verbose:
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
    from medseg.common.errors import MedsegError
    from medseg.common.params import ParamsError

    try:
        summary = args.func(args)
    except (MedsegError, ParamsError, FileNotFoundError) as err:
        print(f"medseg {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - a full or read-only disk is one line; anything else is a bug to show
        disk = _disk_problem(err, args)
        if disk is None:
            raise
        print(f"medseg {args.command}: error: {disk}; every output is written whole or not at all, so free space "
              f"and run the same command again", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: every stage writes atomically and keeps what it finished
        print(f"medseg {args.command}: interrupted; nothing is left half-written (a re-run of ingest, or train "
              f"--resume, goes on from where it stopped)", file=sys.stderr)
        return 130
    if summary:
        print(json.dumps(summary, indent=2, default=str))
    failed = summary.get("failed") if summary else None
    if failed:  # e.g. predict: the other inputs were done; the run still did not do all it was asked
        total = len(failed) + int(summary.get("succeeded", 0))
        print(f"medseg {args.command}: {len(failed)} of {total} input(s) failed (listed above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

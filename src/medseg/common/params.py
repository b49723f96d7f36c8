"""Typed view of ``params.yaml``: loaded once at the edge, frozen, validated with the key and type named.

Every key is required and has no default here: each value is written once, in ``params.yaml``.

Code below the CLI, the DVC stages and the Prefect flow never opens YAML; it receives these dataclasses.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from medseg.common.typed_config import ParamsError, build

__all__ = ["Params", "ParamsError", "load_params", "params_from_dict", "DEFAULT_PARAMS_FILE"]

DEFAULT_PARAMS_FILE = "params.yaml"


@dataclass(frozen=True)
class PathsParams:
    demo: str
    ingested: str
    preprocessed: str
    model: str
    checkpoints: str
    evaluation: str
    registry: str
    plans: str
    cache: str


@dataclass(frozen=True)
class DataParams:
    source: str
    layout: Literal["auto", "acdc", "msd", "dicom", "nifti", "images"]
    slice_spacing_tolerance: float
    group_pattern: str


@dataclass(frozen=True)
class DemoParams:
    seed: int
    cardiac_patients: int
    ct_patients: int
    polyp_frames: int


@dataclass(frozen=True)
class PlanParams:
    """Overrides of the data-derived plan; ``None`` keeps the planned value."""

    target_spacing: tuple[float, float, float] | None
    spatial_dims: Literal[2, 3] | None
    patch_size: tuple[int, int, int] | None
    batch_size: int | None
    ct_clip: tuple[float, float] | None
    memory_budget_mb: float


@dataclass(frozen=True)
class PreprocessParams:
    folds: int
    seed: int
    test_cases: tuple[str, ...] | None
    test_fraction: float


@dataclass(frozen=True)
class ModelParams:
    name: Literal["unet", "attention_unet", "dynunet"]
    channels: tuple[int, ...] | None
    strides: tuple[int, ...] | None
    base_channels: int
    max_channels: int
    num_res_units: int
    norm: Literal["instance", "batch"]
    dropout: float
    deep_supervision: bool
    encoder: Literal["auto", "none", "efficientnet-lite0"]
    encoder_weights: str | None


AugmentationName = Literal["rotate", "scale", "flip", "noise", "blur", "brightness", "contrast", "lowres",
                           "inverted_gamma", "gamma", "colour"]  # each one ``<name>_prob`` of AugmentationParams


@dataclass(frozen=True)
class AugmentationParams:
    rotate_prob: float
    rotate_range_deg: float | None
    scale_prob: float
    scale_range: tuple[float, float]
    flip_prob: float
    noise_prob: float
    blur_prob: float
    brightness_prob: float
    contrast_prob: float
    lowres_prob: float
    inverted_gamma_prob: float
    gamma_prob: float
    colour_prob: float
    skip_for_frames: tuple[AugmentationName, ...] | None


@dataclass(frozen=True)
class TrainParams:
    fold: int | Literal["all"]
    samples_per_volume: int
    foreground_fraction: float
    steps_per_epoch: int
    max_epochs: int
    time_budget_minutes: float | None
    final_model: bool
    optimizer: Literal["adamw", "sgd"]
    learning_rate: float
    weight_decay: float
    encoder_lr_factor: float
    encoder_warmup_fraction: float
    loss: Literal["dice_ce", "unet_weighted"]
    unet_w0: float
    unet_sigma_px: float
    val_interval: int
    cache: Literal["auto", "memory", "disk", "none"]
    num_workers: int
    seed: int
    device: Literal["auto", "cpu", "cuda"]
    amp: Literal["fp16", "bf16", "off"]
    cpu_amp: Literal["auto", "bf16", "off"]
    compile: bool
    augment_on_device: bool
    augmentation: AugmentationParams

    def folds(self, total: int) -> list[int]:
        """The folds to train: ``fold`` itself, or every fold for ``"all"``."""
        return list(range(total)) if self.fold == "all" else [int(self.fold)]


@dataclass(frozen=True)
class EvaluateParams:
    sw_overlap: float
    sw_batch_size: int
    overlay_cases: int
    tta: bool
    largest_component: bool | Literal["auto"]


@dataclass(frozen=True)
class RegisterParams:
    model_name: str | None  # None: medseg-<dataset> (medseg.common.manifest.registered_model_name)
    noninferiority_margin: float
    max_class_drop: float
    hd95_tolerance_mm: float


@dataclass(frozen=True)
class MlflowParams:
    tracking_uri: str
    artifact_root: str
    experiment: str


@dataclass(frozen=True)
class OrchestrationParams:
    task_runner: Literal["thread", "dask"]
    dask_address: str | None
    dask_workers: int


@dataclass(frozen=True)
class Params:
    paths: PathsParams
    data: DataParams
    demo: DemoParams
    plan: PlanParams
    preprocess: PreprocessParams
    model: ModelParams
    train: TrainParams
    evaluate: EvaluateParams
    register: RegisterParams
    mlflow: MlflowParams
    orchestration: OrchestrationParams

    def section(self, name: str) -> dict[str, Any]:
        """One section as a plain dict (for MLflow params and fingerprints)."""
        return dataclasses.asdict(getattr(self, name))


def params_from_dict(raw: dict[str, Any]) -> Params:
    """Validate a parsed params mapping; raises :class:`ParamsError` naming the offending key."""
    params = build(Params, raw, "")
    _check_consistency(params)
    return params


# Numeric params and their valid range: key -> (low, high or None, low excluded). Each is checked at load, so a
# negative learning rate or zero epochs is one clear line, not a NaN model.
RANGES: dict[str, tuple[float, float | None, bool]] = {
    "plan.batch_size": (1, None, False),
    "model.base_channels": (1, None, False),
    "model.max_channels": (1, None, False),
    "model.num_res_units": (0, None, False),
    "model.dropout": (0, 0.99, False),
    "train.samples_per_volume": (1, None, False),
    "train.foreground_fraction": (0, 1, False),
    "train.steps_per_epoch": (1, None, False),
    "train.max_epochs": (1, None, False),
    "train.learning_rate": (0, 10, True),
    "train.weight_decay": (0, None, False),
    "train.encoder_lr_factor": (0, 1, False),
    "train.encoder_warmup_fraction": (0, 1, False),
    "train.unet_w0": (0, None, False),
    "train.unet_sigma_px": (0, None, True),
    "train.val_interval": (1, None, False),
    "train.num_workers": (0, None, False),
    **{f"train.augmentation.{name}_prob": (0, 1, False) for name in typing.get_args(AugmentationName)},
    "train.augmentation.rotate_range_deg": (0, 180, False),
    "evaluate.sw_overlap": (0, 0.99, False),
    "evaluate.sw_batch_size": (1, None, False),
    "evaluate.overlay_cases": (0, None, False),
    "preprocess.test_fraction": (0, 0.5, False),
    "register.noninferiority_margin": (0, 1, False),
    "register.max_class_drop": (0, 1, False),
    "register.hd95_tolerance_mm": (0, None, False),
    "orchestration.dask_workers": (1, None, False),
    "demo.cardiac_patients": (0, None, False),
    "demo.ct_patients": (0, None, False),
}


def _check_consistency(params: Params) -> None:
    if params.train.loss == "unet_weighted" and params.model.deep_supervision:
        raise ParamsError("params key 'train.loss': unet_weighted weighs full-resolution pixels; it does not combine "
                          "with model.deep_supervision: true")
    from medseg.common.network_spec import check_model

    try:  # the network's own rules, owned by the spec's module
        check_model(params.section("model"))
    except ValueError as err:
        raise ParamsError(f"params: {err}") from None
    if params.plan.spatial_dims == 2 and params.plan.patch_size is not None and params.plan.patch_size[2] != 1:
        raise ParamsError("params key 'plan.patch_size' must end in 1 when 'plan.spatial_dims' is 2 (slices)")
    if params.preprocess.folds < 2:
        raise ParamsError("params key 'preprocess.folds' must be at least 2")
    if params.train.fold != "all" and not 0 <= params.train.fold < params.preprocess.folds:
        raise ParamsError(f"params key 'train.fold' must be in 0..{params.preprocess.folds - 1} or 'all', "
                          f"got {params.train.fold}")
    if params.train.time_budget_minutes is not None and params.train.time_budget_minutes <= 0:
        raise ParamsError("params key 'train.time_budget_minutes' must be positive (or null: use max_epochs)")
    for key, (lo, hi, lo_open) in RANGES.items():
        section, _, name = key.partition(".")
        value = params.section(section)
        for part in name.split("."):
            value = value[part] if isinstance(value, dict) else getattr(value, part)
        if value is None:
            continue
        if (value <= lo if lo_open else value < lo) or (hi is not None and value > hi):
            bound = f"{'above' if lo_open else 'at least'} {lo:g}" + (f" and at most {hi:g}" if hi is not None else "")
            raise ParamsError(f"params key '{key}' must be {bound}, got {value}")
    lo, hi = params.train.augmentation.scale_range
    if not 0 < lo <= hi:
        raise ParamsError("params key 'train.augmentation.scale_range' must be [min, max] with 0 < min <= max")
    if params.plan.memory_budget_mb <= 0:
        raise ParamsError("params key 'plan.memory_budget_mb' must be positive")


def load_params(path: str | Path = DEFAULT_PARAMS_FILE) -> Params:
    """Read and validate ``params.yaml``."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path} (run from the project root or pass --params)")
    try:
        with path.open() as fh:
            raw = yaml.safe_load(fh) or {}
    except yaml.YAMLError as err:  # one line: the problem and where, not the parser's stack
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ParamsError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', None) or err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ParamsError(f"{path}: cannot be read: {err}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: must be a mapping of sections (paths, data, ...), got {type(raw).__name__}")
    try:
        return params_from_dict(raw)
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}") from None

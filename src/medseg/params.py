"""Typed view of ``params.yaml``: loaded once at the edge, frozen, validated with the key and type named.

Every key is required and has no default here: each value is written once, in ``params.yaml``.

Code below the CLI, the DVC stages and the Prefect flow never opens YAML; it receives these dataclasses.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = ["Params", "ParamsError", "load_params", "params_from_dict", "DEFAULT_PARAMS_FILE"]

DEFAULT_PARAMS_FILE = "params.yaml"


class ParamsError(ValueError):
    """A key of params.yaml is missing, unknown or of the wrong type."""


@dataclass(frozen=True)
class PathsParams:
    demo: str
    ingested: str
    preprocessed: str
    model: str
    checkpoints: str
    evaluation: str
    registry: str


@dataclass(frozen=True)
class DataParams:
    source: str
    layout: Literal["auto", "acdc", "msd", "dicom", "nifti"]
    slice_spacing_tolerance: float


@dataclass(frozen=True)
class DemoParams:
    seed: int
    cardiac_patients: int
    ct_patients: int


@dataclass(frozen=True)
class PreprocessParams:
    target_spacing: tuple[float, float, float]
    ct_window: tuple[float, float]
    folds: int
    seed: int


@dataclass(frozen=True)
class ModelParams:
    name: Literal["unet", "attention_unet"]
    spatial_dims: Literal[2, 3]
    channels: tuple[int, ...]
    strides: tuple[int, ...]
    num_res_units: int
    norm: Literal["instance", "batch"]
    dropout: float


@dataclass(frozen=True)
class TrainParams:
    fold: int
    patch_size: tuple[int, int, int]
    batch_size: int
    samples_per_volume: int
    steps_per_epoch: int
    max_epochs: int
    learning_rate: float
    weight_decay: float
    val_interval: int
    cache_rate: float
    num_workers: int
    seed: int
    device: Literal["auto", "cpu", "cuda"]
    amp: bool


@dataclass(frozen=True)
class EvaluateParams:
    sw_overlap: float
    sw_batch_size: int
    overlay_cases: int


@dataclass(frozen=True)
class RegisterParams:
    model_name: str


@dataclass(frozen=True)
class MlflowParams:
    tracking_uri: str
    artifact_root: str
    experiment: str


@dataclass(frozen=True)
class Params:
    paths: PathsParams
    data: DataParams
    demo: DemoParams
    preprocess: PreprocessParams
    model: ModelParams
    train: TrainParams
    evaluate: EvaluateParams
    register: RegisterParams
    mlflow: MlflowParams

    def section(self, name: str) -> dict[str, Any]:
        """One section as a plain dict (for MLflow params and fingerprints)."""
        return dataclasses.asdict(getattr(self, name))


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} {_type_name(args[0])}"
    return {int: "integer", float: "number", str: "string", bool: "boolean"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in canonical form or raise naming ``key``."""
    origin = typing.get_origin(tp)
    wrong = ParamsError(f"params key '{key}' must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) is not bool:
            return value
        raise wrong
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise wrong
        if len(args) == 2 and args[1] is Ellipsis:
            if not value:
                raise wrong
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise wrong
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise wrong
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise wrong
    if tp is str:
        if isinstance(value, str) and value:
            return value
        raise wrong
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if isinstance(tp, types.UnionType):  # pragma: no cover - no unions in the schema today
        raise wrong
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix or "params.yaml"
    if not isinstance(raw, dict):
        raise ParamsError(f"params section '{where}' must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        known = ", ".join(fields)
        raise ParamsError(f"unknown params key '{prefix + '.' if prefix else ''}{unknown[0]}' (known keys: {known})")
    values = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ParamsError(f"missing params key '{key}' (expected {_type_name(hints[name])})")
            continue
        values[name] = _coerce(raw[name], hints[name], key)
    return cls(**values)


def params_from_dict(raw: dict[str, Any]) -> Params:
    """Validate a parsed params mapping; raises :class:`ParamsError` naming the offending key."""
    params = _build(Params, raw, "")
    _check_consistency(params)
    return params


def _check_consistency(p: Params) -> None:
    if len(p.model.strides) != len(p.model.channels) - 1:
        raise ParamsError(
            f"params key 'model.strides' must have one entry fewer than 'model.channels' "
            f"({len(p.model.channels)} channels, {len(p.model.strides)} strides)"
        )
    if p.model.spatial_dims == 2 and p.train.patch_size[2] != 1:
        raise ParamsError("params key 'train.patch_size' must end in 1 when 'model.spatial_dims' is 2 (slices)")
    if not 0 <= p.train.fold < p.preprocess.folds:
        raise ParamsError(f"params key 'train.fold' must be in 0..{p.preprocess.folds - 1}, got {p.train.fold}")
    if p.preprocess.folds < 2:
        raise ParamsError("params key 'preprocess.folds' must be at least 2")


def load_params(path: str | Path = DEFAULT_PARAMS_FILE) -> Params:
    """Read and validate ``params.yaml``."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path} (run from the project root or pass --params)")
    with path.open() as fh:
        raw = yaml.safe_load(fh) or {}
    try:
        return params_from_dict(raw)
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}") from None

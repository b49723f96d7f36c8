"""Frozen dataclasses built from a parsed YAML mapping, checked against their annotations: every key present (unless
the field has a default), none unknown, each value of its annotated type (int, float, bool, non-empty str,
``Literal``, fixed or variable tuples, unions with None, nested dataclasses), the offending key named in one line.
:mod:`medseg.common.params` declares the schema; this is the checking.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

__all__ = ["ParamsError", "build", "type_name"]


class ParamsError(ValueError):
    """A key of params.yaml is missing, unknown or of the wrong type."""


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if isinstance(tp, types.UnionType) or origin is typing.Union:
        names = [type_name(a) for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in typing.get_args(tp) else "")
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {type_name(args[0])}"
        return f"a list of {len(args)} {type_name(args[0])}"
    return {int: "integer", float: "number", str: "string", bool: "boolean"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in canonical form or raise naming ``key``."""
    origin = typing.get_origin(tp)
    wrong = ParamsError(f"params key '{key}' must be {type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) is not bool:
            return value
        if value is False and "off" in typing.get_args(tp):  # YAML 1.1 reads a bare `off` as false
            return "off"
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
        return build(tp, value, key)
    if isinstance(tp, types.UnionType) or origin is typing.Union:
        if value is None and type(None) in typing.get_args(tp):
            return None
        for option in (a for a in typing.get_args(tp) if a is not type(None)):
            try:
                return _coerce(value, option, key)
            except ParamsError:
                continue
        raise wrong
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def build(cls: type, raw: Any, prefix: str) -> Any:
    """An instance of the dataclass ``cls`` from the mapping ``raw`` (the section at ``prefix``), checked."""
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
                raise ParamsError(f"missing params key '{key}' (expected {type_name(hints[name])})")
            continue
        values[name] = _coerce(raw[name], hints[name], key)
    return cls(**values)

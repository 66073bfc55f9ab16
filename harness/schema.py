"""Declarative config fields: `setting(default, choices=..., gt=...)` puts the allowed values on
the dataclass field itself, and `check(obj)` validates every field of a (nested) config
dataclass from that metadata and from its type annotation. The specs of the library API
(`harness.spec`), the CLI's config schema (`harness.config`) and every measure's own config
dataclass use it, so a range is written once, beside its default, and the library and the CLI
give the same messages. Cross-field rules stay explicit code.

Every float must be finite (NaN and inf are never a setting) unless its field says
`finite=False`; an int is never a bool; a float field takes an int; a `tuple[int, ...]` or
`list[int]` field takes a list or tuple of ints (never a string).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is invalid; `key` is its dotted path."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


def setting(
    default: Any,
    *,
    choices: Sequence[Any] | None = None,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    nonempty: bool = False,
    finite: bool = True,
) -> Any:
    """A dataclass field with its allowed values. A list default is copied per instance, and
    the bounds/choices then apply to each element. `finite=False` lets a float be inf."""
    meta: dict[str, Any] = {"nonempty": True} if nonempty else {}
    if not finite:
        meta["finite"] = False
    if choices is not None:
        meta["choices"] = tuple(choices)
    for k, v in (("gt", gt), ("ge", ge), ("lt", lt), ("le", le)):
        if v is not None:
            meta[k] = v
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _check_value(key: str, value: Any, meta: dict[str, Any]) -> None:
    if isinstance(value, numbers.Real) and not math.isfinite(float(value)) and meta.get("finite", True):
        raise ConfigError(key, f"must be a finite number, got {value}")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(key, f"must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")
    for op, ok, word in (("gt", lambda v, b: v > b, ">"), ("ge", lambda v, b: v >= b, ">="),
                         ("lt", lambda v, b: v < b, "<"), ("le", lambda v, b: v <= b, "<=")):
        if op in meta and not ok(value, meta[op]):
            raise ConfigError(key, f"must be {word} {meta[op]}, got {value}")


def _type_name(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin in (list, tuple, Sequence):
        plural = {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}
        return f"a list of {plural.get(args[0], _type_name(args[0]))}" if args else "a list"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _fits(tp: Any, value: Any) -> bool:
    """Whether `value` has type `tp` (the annotations configs use: bool, int, float, str,
    Literal, Optional/Union, list[X], tuple[X, ...], Any, nested dataclasses)."""
    if tp is Any:
        return True
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return value in args
    if origin in (Union, types.UnionType):
        return any(_fits(a, value) for a in args)
    if origin in (list, tuple, Sequence):
        if isinstance(value, str) or not isinstance(value, list | tuple):
            return False
        return all(_fits(args[0], v) for v in value) if args else True
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:  # NumPy integers too
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if tp is float:  # an int, or a NumPy float
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


@typing.no_type_check
def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that cannot be resolved is not checked
        return {}


def check(obj: Any, prefix: str = "") -> None:
    """Validate every field of config dataclass `obj` (recursively) against its type annotation
    and its metadata (choices, bounds, non-empty, finite)."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        key, value = f"{prefix}{f.name}", getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check(value, f"{key}.")
            continue
        tp = hints.get(f.name, Any)
        if not _fits(tp, value):
            raise ConfigError(key, f"must be {_type_name(tp)}, got {value!r}")
        meta = dict(f.metadata)
        if isinstance(value, list | tuple):
            if meta.get("nonempty") and not value:
                raise ConfigError(key, "must not be empty")
            for i, v in enumerate(value):
                _check_value(f"{key}[{i}]", v, meta)
        elif value is not None:
            _check_value(key, value, meta)


def build(cls: type[T], args: Mapping[str, Any], name: str | None = None) -> T:
    """`cls(**args)` for a spec dataclass, with an unknown argument a ConfigError naming it and
    the known ones (a TypeError otherwise)."""
    known = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = [k for k in args if k not in known]
    if unknown:
        raise ConfigError(f"{name or cls.__name__}.{unknown[0]}", f"unknown argument; choose from {', '.join(known)}")
    return cls(**args)


def like(cls: type, name: str, default: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with the same allowed values (metadata) as field `name` of `cls`, and
    its default unless one is given: a config that mirrors a spec under another name declares
    nothing twice."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)  # type: ignore[arg-type]
    value = f.default if default is dataclasses.MISSING else default
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, list):
        return dataclasses.field(default_factory=lambda: list(value), metadata=f.metadata)
    return dataclasses.field(default=value, metadata=f.metadata)


def _hydra_type(tp: Any) -> Any:
    """The type OmegaConf can hold for a spec field's type: a Literal is a str (its choices are
    on the field), a tuple of X a list of X."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return str
    if origin is tuple:
        return list[args[0]]  # type: ignore[valid-type]
    return tp


def config_class(spec: type, name: str, skip: tuple[str, ...] = ()) -> type:
    """A Hydra config dataclass with the fields of `spec` (less `skip`), their defaults and
    rules: the config group and the library's spec are declared once."""
    hints = typing.get_type_hints(spec)
    fields: list[tuple[str, Any, Any]] = []
    for f in dataclasses.fields(spec):
        if f.name not in skip:
            fields.append((f.name, _hydra_type(hints[f.name]), like(spec, f.name)))
    return dataclasses.make_dataclass(name, fields)

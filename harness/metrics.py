"""Typed metrics: a measure declares its record's `metrics` as dataclasses, builds them in `run`,
and they become the record's plain dict through one function, `plain`; `load` reads a record's
metrics back into the type (`tests/test_metrics_types.py` does it for fresh and committed
records, so a change of the schema that the type does not follow fails a test).

Conventions (what `plain` and `load` agree on):
- a field whose default is None is left out of the dict while it is None (so an optional
  quantity is absent, not null, as records have always had it);
- NumPy arrays and scalars become lists and Python numbers; nested dataclasses, lists of them
  and dicts of plain values nest;
- `load(cls, d)` refuses a key the type does not declare and a required key that is missing,
  naming the path (`MetricsError`); `strict=False` ignores undeclared keys (records written by
  older code of the same measure version, which carried more).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar, Union

import numpy as np

T = TypeVar("T")


class MetricsError(ValueError):
    """A record's metrics do not fit the measure's declared type."""


def plain(obj: Any) -> Any:
    """`obj` (a metrics dataclass, or anything inside one) as plain JSON-able data."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if v is None and f.default is None:
                continue
            out[f.name] = plain(v)
        return out
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def load(cls: type[T], data: Any, *, strict: bool = True, path: str = "metrics") -> T:
    """`data` (a record's metrics) as `cls`; MetricsError naming the first key that does not fit."""
    return typing.cast(T, _load(cls, data, strict, path))


def _load(tp: Any, data: Any, strict: bool, path: str) -> Any:
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(data, dict):
            raise MetricsError(f"{path}: expected an object for {tp.__name__}, got {type(data).__name__}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        extra = [k for k in data if k not in fields]
        if extra and strict:
            raise MetricsError(f"{path}.{extra[0]}: not a field of {tp.__name__}")
        kwargs = {}
        for name, f in fields.items():
            if name in data:
                kwargs[name] = _load(hints[name], data[name], strict, f"{path}.{name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise MetricsError(f"{path}.{name}: missing (a required field of {tp.__name__})")
        return tp(**kwargs)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if data is None and type(None) in args:
            return None
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return _load(a, data, strict, path)
            except MetricsError as e:
                errors.append(str(e))
        raise MetricsError(errors[0] if errors else f"{path}: does not fit {tp}")
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(data, list):
            raise MetricsError(f"{path}: expected a list, got {type(data).__name__}")
        return [_load(item, v, strict, f"{path}[{i}]") for i, v in enumerate(data)]
    if origin is dict:
        _, value = typing.get_args(tp) or (str, Any)
        if not isinstance(data, dict):
            raise MetricsError(f"{path}: expected an object, got {type(data).__name__}")
        return {k: _load(value, v, strict, f"{path}.{k}") for k, v in data.items()}
    if tp is Any:
        return data
    if tp is float:
        if isinstance(data, bool) or not isinstance(data, int | float):
            raise MetricsError(f"{path}: expected a number, got {data!r}")
        return float(data)
    if tp is int or tp is bool or tp is str:
        if type(data) is not tp:
            raise MetricsError(f"{path}: expected {tp.__name__}, got {data!r}")
        return data
    raise MetricsError(f"{path}: metrics types know no {tp!r}")

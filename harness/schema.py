"""Declarative config fields: `setting(default, choices=..., gt=...)` puts the allowed values on
the dataclass field itself, and `check(obj)` validates every field of a (nested) config
dataclass from that metadata. `harness.config` and every measure's own config dataclass use it,
so a range is written once, beside its default. Cross-field rules stay explicit code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any


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
) -> Any:
    """A dataclass field with its allowed values. A list default is copied per instance, and
    the bounds/choices then apply to each element."""
    meta: dict[str, Any] = {"nonempty": True} if nonempty else {}
    if choices is not None:
        meta["choices"] = tuple(choices)
    for k, v in (("gt", gt), ("ge", ge), ("lt", lt), ("le", le)):
        if v is not None:
            meta[k] = v
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _check_value(key: str, value: Any, meta: dict[str, Any]) -> None:
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(key, f"{value!r} is not one of {', '.join(map(str, meta['choices']))}")
    for op, ok, word in (("gt", lambda v, b: v > b, ">"), ("ge", lambda v, b: v >= b, ">="),
                         ("lt", lambda v, b: v < b, "<"), ("le", lambda v, b: v <= b, "<=")):
        if op in meta and not ok(value, meta[op]):
            raise ConfigError(key, f"must be {word} {meta[op]}, got {value}")


def check(obj: Any, prefix: str = "") -> None:
    """Validate every field of config dataclass `obj` (recursively) against its metadata."""
    for f in dataclasses.fields(obj):
        key, value = f"{prefix}{f.name}", getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check(value, f"{key}.")
            continue
        meta = dict(f.metadata)
        if isinstance(value, list | tuple):
            if meta.get("nonempty") and not value:
                raise ConfigError(key, "must not be empty")
            for i, v in enumerate(value):
                _check_value(f"{key}[{i}]", v, meta)
        elif value is not None:
            _check_value(key, value, meta)

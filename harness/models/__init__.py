"""The model kinds: every module in this package but `base` is one (found by name, so a new
kind is one module here and one `conf/model/<kind>.yaml`, nothing else). A kind declares:

- `KIND`: its name (`model.kind`, `model=<kind>`);
- `Spec`: its spec, a frozen dataclass subclassing `base.ModelSpec` with the kind's own fields
  and their rules (`harness.schema.setting`); it is both what a backend gets and the schema of
  the config's `model` section (`config_class`: the same fields less those the data decides);
- `params(spec) -> {name: base.Param}`: canonical names (encoder first, layers in order), shapes,
  layouts and fans (`base.glorot` draws the initial weights from them);
- `encode(ops, params, x, spec)` -> (..., 2 latent) and `decode(ops, params, z, spec)` -> the
  input's shape, written once over a framework's primitive ops (`impls.<fw>.ops`);
- `layer_flops(spec) -> [base.LayerFlops]`: the multiply-adds of each layer (the step's FLOP
  count, `base.step_flops`);
- `np_forward(params, block, h, spec) -> (out, cache)`, `np_backward(params, block, cache, d,
  spec, grads, per_example) -> d input` and `np_pre_activations(cache)`: the independent NumPy
  forward and hand-written backward, the oracle every framework is checked against
  (`harness.reference`);
- `layers(spec) -> [base.Layer]`: the layers one by one (op, parameters, stride, input shape),
  for the throughput measure's per-layer forward/backward timing and the conformance floor's
  sum lengths (`base.reduction_terms`);
- `describe(spec) -> str`: one line for tables;
- `example(**fields) -> Spec`: a small instance, for the tests (which iterate the kinds);
- optionally `DATA_FIELDS`: spec fields the data set decides ({field: fn(dataset) -> value};
  `x_dim` always is), left out of the config.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import pkgutil
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from harness.models.base import ModelSpec
from harness.schema import ConfigError, build, config_class

#: kind -> module, in name order (every module of this package but `base` and private ones)
MODELS: dict[str, ModuleType] = {}
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name != "base" and not _info.name.startswith("_"):
        _module = importlib.import_module(f"{__name__}.{_info.name}")
        MODELS[_module.KIND] = _module

#: fields the data set decides, for every kind (left out of the config)
ALWAYS_FROM_DATA = ("x_dim",)


def module_of(spec: ModelSpec) -> ModuleType:
    """The module of `spec`'s kind."""
    try:
        return MODELS[spec.kind]
    except KeyError:
        raise ConfigError("model.kind", f"must be one of {', '.join(MODELS)}, got {spec.kind!r}") from None


def kind_module(kind: str) -> ModuleType:
    if kind not in MODELS:
        raise ConfigError("model.kind", f"must be one of {', '.join(MODELS)}, got {kind!r}")
    return MODELS[kind]


def data_fields(kind: str) -> tuple[str, ...]:
    """The spec fields of `kind` that the data set decides."""
    return (*ALWAYS_FROM_DATA, *getattr(kind_module(kind), "DATA_FIELDS", {}))


def spec(kind: str, **fields: Any) -> ModelSpec:
    """`kind`'s spec from keyword arguments (an unknown one is a ConfigError naming it)."""
    module = kind_module(kind)
    return build(module.Spec, {**fields, "kind": kind})  # type: ignore[no-any-return]


def spec_from(value: ModelSpec | Mapping[str, Any] | None) -> ModelSpec:
    """A spec as given, or built from a mapping of its fields (`kind` picks the class; mlp by
    default)."""
    if isinstance(value, ModelSpec):
        return value
    if value is not None and not isinstance(value, Mapping):
        raise ValueError(f"model must be a ModelSpec or a mapping of its fields, got {type(value).__name__}")
    fields = dict(value or {})
    return spec(str(fields.pop("kind", "mlp")), **fields)


def spec_for_data(fields: Mapping[str, Any], example_shape: tuple[int, ...]) -> ModelSpec:
    """The spec of `fields["kind"]` (mlp by default) for data whose one example has
    `example_shape` (an image (h, w, c), or (x_dim,)): x_dim and the kind's DATA_FIELDS come
    from the data, the rest from `fields` (the config's `model.*`)."""
    fields = dict(fields)
    kind = str(fields.pop("kind", "mlp"))
    module = kind_module(kind)
    derived: dict[str, Any] = {"x_dim": int(math.prod(example_shape))}
    for name, from_shape in getattr(module, "DATA_FIELDS", {}).items():
        derived[name] = from_shape(tuple(example_shape))
    return spec(kind, **fields, **derived)


#: kind -> the Hydra config dataclass of `model.*` for that kind
_CONFIGS: dict[str, type] = {}


def config(kind: str) -> type:
    """The config dataclass of `model.*` when `model.kind=kind`: the spec's fields less those the
    data decides, with the same defaults and rules."""
    if kind not in _CONFIGS:
        module = kind_module(kind)
        name = module.Spec.__name__.removesuffix("Spec") + "Config"
        _CONFIGS[kind] = config_class(module.Spec, name, skip=data_fields(kind))
    return _CONFIGS[kind]


def config_fields(kind: str) -> list[str]:
    return [f.name for f in dataclasses.fields(config(kind))]

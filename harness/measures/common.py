"""Helpers shared by the measures: building a backend from the config, progress bars, tables."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from tqdm.auto import tqdm

from harness import data as data_mod
from harness.api import Backend, ModelSpec, OptimSpec, load_backend, resolve_mode

if TYPE_CHECKING:
    from harness.config import AppConfig

T = TypeVar("T")


@dataclass
class Summary:
    """A measure's table across frameworks, and whether every check passed."""

    title: str
    rows: list[dict[str, Any]]
    ok: bool
    notes: list[str] = field(default_factory=list)


def model_spec(c: AppConfig, x_dim: int) -> ModelSpec:
    m = c.model
    return ModelSpec(
        x_dim=x_dim,
        hidden=tuple(m.hidden),
        latent=m.latent,
        likelihood=m.likelihood,  # type: ignore[arg-type]
        activation=m.activation,  # type: ignore[arg-type]
        obs_sigma=m.obs_sigma,
        stop_gradient_z=m.stop_gradient_z,
        freeze=m.freeze,  # type: ignore[arg-type]
    )


def optim_spec(c: AppConfig) -> OptimSpec:
    o = c.optim
    return OptimSpec(name=o.name, lr=o.lr,  # type: ignore[arg-type]
                      beta1=o.beta1, beta2=o.beta2, eps=o.eps, momentum=o.momentum)


def dataset(c: AppConfig) -> data_mod.Dataset:
    d = c.data
    return data_mod.load(
        d.source,
        path=d.path,
        binarize=d.binarize,
        threshold=d.threshold,
        n_train=d.n_train,
        n_test=d.n_test,
        x_dim=d.x_dim,
        latent=d.latent,
        obs_sigma=d.obs_sigma,
        seed=c.seed,
    )


def backend(
    c: AppConfig,
    framework: str,
    *,
    spec: ModelSpec | None = None,
    x_dim: int | None = None,
    optim: OptimSpec | None = None,
    dtype: str | None = None,
    mode: str | None = None,
    params: Mapping[str, np.ndarray] | None = None,
) -> Backend:
    f = c.framework
    if spec is None:
        assert x_dim is not None
        spec = model_spec(c, x_dim)
    return load_backend(
        framework,
        spec,
        optim or optim_spec(c),
        dtype=dtype or f.precision,
        mode=resolve_mode(framework, mode or f.mode),
        device=f.device,
        seed=c.seed,
        threads=f.threads,
        allow_tf32=f.allow_tf32,
        compile_mode=f.compile_mode,
        params=params,
    )


def progress(it: Iterable[T], c: AppConfig, **kw: Any) -> Iterable[T]:
    return tqdm(it, disable=not c.progress, leave=False, dynamic_ncols=True, **kw)  # type: ignore[no-any-return]


def by_framework(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    order = {"torch": 0, "tensorflow": 1, "jax": 2}
    return sorted(records, key=lambda r: (order.get(r["framework"], 9), r["mode"]))


def fmt(x: Any, spec: str = ".4g") -> str:
    if x is None:
        return "-"
    if isinstance(x, float | int | np.floating):
        return format(float(x), spec)
    return str(x)

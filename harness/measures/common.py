"""Helpers shared by the measures: building a backend from the config, progress bars, tables."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from tqdm.auto import tqdm

from harness import data as data_mod
from harness.api import Backend, ModelSpec, OptimSpec, load_backend, resolve_mode
from harness.config import AppConfig, model_spec, optim_spec

T = TypeVar("T")


@dataclass
class Summary:
    """A measure's table across frameworks, and whether every check passed."""

    title: str
    rows: list[dict[str, Any]]
    ok: bool
    notes: list[str] = field(default_factory=list)


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

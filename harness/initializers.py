"""Canonical initial weights, drawn once in NumPy so that every framework starts equal."""

from __future__ import annotations

import numpy as np

from harness.models.base import ModelSpec, glorot


def init_params(spec: ModelSpec, seed: int, dtype: str = "float64") -> dict[str, np.ndarray]:
    """Glorot-uniform weights (fans from the model kind: a convolution counts its kernel's
    positions), zero biases, in canonical order and layout. Drawn in float64 from
    `np.random.default_rng(seed)`; backends cast to their dtype."""
    return glorot(spec.params(), seed, dtype)


def one_ulp(params: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """Every entry moved to the next representable value of `dtype` (towards +inf): the
    perturbation controls' rounding-level change of the weights."""
    return {k: np.nextafter(v.astype(dtype), np.inf).astype(v.dtype) for k, v in params.items()}


def block_of(name: str) -> str:
    """'encoder.0.weight' -> 'encoder'."""
    return name.split(".", 1)[0]

"""Canonical initial weights, drawn once in NumPy so that every framework starts equal."""

from __future__ import annotations

import numpy as np

from harness.spec import ModelSpec


def init_params(spec: ModelSpec, seed: int, dtype: str = "float64") -> dict[str, np.ndarray]:
    """Glorot-uniform weights (shape in x out), zero biases, in canonical order.

    Drawn in float64 from `np.random.default_rng(seed)`; backends cast to their dtype.
    """
    rng = np.random.default_rng(seed)
    params: dict[str, np.ndarray] = {}
    for name, shape in spec.param_shapes().items():
        if name.endswith(".weight"):
            limit = np.sqrt(6.0 / (shape[0] + shape[1]))
            params[name] = rng.uniform(-limit, limit, size=shape).astype(dtype)
        else:
            params[name] = np.zeros(shape, dtype=dtype)
    return params


def block_of(name: str) -> str:
    """'encoder.0.weight' -> 'encoder'."""
    return name.split(".", 1)[0]

"""model=mlp: a multilayer perceptron VAE on flat inputs.

Encoder: x_dim -> hidden... -> 2 latent (mean first, then log-variance); decoder: latent ->
reversed(hidden)... -> x_dim. Dense layers (canonical weight (in, out)), `activation` between
them, none after the last.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from harness.models.base import (
    Layer,
    LayerFlops,
    ModelSpec,
    Param,
    bias_param,
    dense_layers,
    dense_param,
    np_activation,
    np_activation_backward,
    np_dense_backward,
    np_dense_forward,
)
from harness.schema import setting
from harness.spec import BLOCKS, Activation, choices

KIND = "mlp"


@dataclass(frozen=True)
class MlpSpec(ModelSpec):
    """An MLP VAE (model=mlp)."""

    kind: str = setting(KIND, choices=(KIND,))
    hidden: tuple[int, ...] = setting((128,), gt=0)
    activation: Activation = setting("relu", choices=choices(Activation))


Spec = MlpSpec


def sizes(spec: Any, block: str) -> list[int]:
    """Widths from `block`'s input to its output."""
    hidden = getattr(spec, "hidden", ())  # a kind without hidden layers (linear) reuses these functions
    if block == "encoder":
        return [spec.x_dim, *hidden, 2 * spec.latent]
    return [spec.latent, *reversed(hidden), spec.x_dim]


def params(spec: Any) -> dict[str, Param]:
    out: dict[str, Param] = {}
    for block in BLOCKS:
        s = sizes(spec, block)
        for i, (n_in, n_out) in enumerate(zip(s[:-1], s[1:])):
            out[f"{block}.{i}.weight"] = dense_param(n_in, n_out)
            out[f"{block}.{i}.bias"] = bias_param(n_out)
    return out


def layer_flops(spec: Any) -> list[LayerFlops]:
    return [LayerFlops(block, i, 2 * n_in * n_out)
            for block in BLOCKS for i, (n_in, n_out) in enumerate(zip(sizes(spec, block)[:-1], sizes(spec, block)[1:]))]


def layers(spec: Any) -> list[Layer]:
    """The layers, one by one, for the throughput measure's per-layer timing."""
    return dense_layers(params(spec))


def describe(spec: Any) -> str:
    return f"{spec.kind} {list(spec.hidden)}, latent {spec.latent}"


# -- the layers, written once over a framework's ops ------------------------------------------------


def _stack(ops: Any, p: Mapping[str, Any], block: str, h: Any, spec: Any) -> Any:
    n = len(sizes(spec, block)) - 1
    act = getattr(spec, "activation", "relu")
    for i in range(n):
        h = ops.dense(h, p[f"{block}.{i}.weight"], p[f"{block}.{i}.bias"])
        if i < n - 1:
            h = ops.relu(h) if act == "relu" else ops.tanh(h)
    return h


def encode(ops: Any, p: Mapping[str, Any], x: Any, spec: Any) -> Any:
    """(..., x_dim) -> (..., 2 latent)."""
    return _stack(ops, p, "encoder", x, spec)


def decode(ops: Any, p: Mapping[str, Any], z: Any, spec: Any) -> Any:
    """(..., latent) -> (..., x_dim): logits or means."""
    return _stack(ops, p, "decoder", z, spec)


# -- the NumPy oracle: forward and hand-written backward --------------------------------------------


def np_forward(p: Mapping[str, np.ndarray], block: str, h: np.ndarray, spec: Any) -> tuple[np.ndarray, list[np.ndarray]]:
    """`block`'s output and its cache: the input of each layer (the previous activation)."""
    inputs = []
    n = len(sizes(spec, block)) - 1
    act = getattr(spec, "activation", "relu")
    for i in range(n):
        inputs.append(h)
        h = np_dense_forward(h, p[f"{block}.{i}.weight"], p[f"{block}.{i}.bias"])
        if i < n - 1:
            h = np_activation(act, h)
    return h, inputs


def np_backward(p: Mapping[str, np.ndarray], block: str, cache: list[np.ndarray], d: np.ndarray, spec: Any,
                grads: dict[str, np.ndarray], per_example: bool = False) -> np.ndarray:
    """Backprop d = dF/d(block output) through `block`: writes its weight and bias gradients
    into `grads` (see `np_dense_backward` for `per_example`), returns dF/d(block input)."""
    act = getattr(spec, "activation", "relu")
    for i in reversed(range(len(cache))):
        h = cache[i]
        d, grads[f"{block}.{i}.weight"], grads[f"{block}.{i}.bias"] = np_dense_backward(
            h, p[f"{block}.{i}.weight"], d, per_example)
        if i > 0:
            d = np_activation_backward(act, h, d)
    return d


def np_pre_activations(cache: list[np.ndarray]) -> list[np.ndarray]:
    """The hidden activations (whose signs are those of their pre-activations) of a forward
    pass: two parameter points with the same signs lie on one smooth piece of a ReLU net."""
    return cache[1:]


def example(**fields: Any) -> MlpSpec:
    """A small instance for tests (two hidden layers)."""
    return MlpSpec(**{"x_dim": 6, "hidden": (5, 4), "latent": 3, "obs_sigma": 0.7, **fields})

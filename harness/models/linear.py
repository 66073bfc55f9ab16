"""model=linear: the linear-Gaussian VAE. One dense layer each way (encoder x -> (mean,
log-variance), decoder z -> mean), no hidden layer: with the Gaussian likelihood every term of
the ELBO, log p(x) and the posterior have closed forms (the identity and gaps measures and the
pPCA optimum use them). The MLP's functions with no hidden layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.models import mlp
from harness.models.base import ModelSpec
from harness.schema import setting

KIND = "linear"


@dataclass(frozen=True)
class LinearSpec(ModelSpec):
    """A linear VAE (model=linear)."""

    kind: str = setting(KIND, choices=(KIND,))


Spec = LinearSpec
params, layer_flops, layers, encode, decode = mlp.params, mlp.layer_flops, mlp.layers, mlp.encode, mlp.decode
np_forward, np_backward, np_pre_activations = mlp.np_forward, mlp.np_backward, mlp.np_pre_activations


def describe(spec: Any) -> str:
    return f"linear, latent {spec.latent}"


def example(**fields: Any) -> LinearSpec:
    """A small instance for tests."""
    return LinearSpec(**{"x_dim": 6, "latent": 3, "likelihood": "gaussian", "obs_sigma": 0.7, **fields})

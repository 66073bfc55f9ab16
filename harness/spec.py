"""The leaf of the package: the specs and choices every other module shares. Imports nothing
from harness, so `api`, `init`, `config`, `data` and the measures all build on it without a
cycle. Each choice list is written once, as a Literal alias; `choices(Alias)` gives its values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np

Framework = Literal["torch", "tensorflow", "jax"]
Dtype = Literal["float32", "float64"]
Device = Literal["cpu", "gpu", "auto"]
Likelihood = Literal["bernoulli", "gaussian"]
Activation = Literal["relu", "tanh"]
Freeze = Literal["none", "encoder", "decoder"]
OptimName = Literal["adam", "sgd"]
ModelKind = Literal["mlp", "linear"]
DataSource = Literal["digits", "synthetic", "mnist", "fashion_mnist"]
#: torch.compile modes (torch only; "reduce-overhead" adds CUDA graphs: small GPU steps are launch-bound)
TorchCompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


def choices(alias: Any) -> tuple[str, ...]:
    """The values of a Literal alias: `choices(Dtype) == ("float32", "float64")`."""
    return tuple(get_args(alias))


Term = Literal["loss", "recon", "kl"]
TERMS: tuple[Term, ...] = ("loss", "recon", "kl")
BLOCKS: tuple[str, ...] = ("encoder", "decoder")

FRAMEWORKS: tuple[str, ...] = choices(Framework)
#: Modes each framework implements. "eager" runs op by op everywhere; the others compile.
FRAMEWORK_MODES: dict[str, tuple[str, ...]] = {
    "torch": ("eager", "compiled"),
    "tensorflow": ("eager", "function", "xla"),
    "jax": ("eager", "jit"),
}
#: What the generic mode name "compiled" means in each framework.
COMPILED_ALIAS: dict[str, str] = {"torch": "compiled", "tensorflow": "xla", "jax": "jit"}
#: The Python module each framework is imported as (to check availability without importing).
FRAMEWORK_MODULES: dict[str, str] = {"torch": "torch", "tensorflow": "tensorflow", "jax": "jax"}


class FrameworkUnavailable(RuntimeError):
    """The requested framework is not installed (or cannot be imported)."""


class DeviceUnavailable(RuntimeError):
    """The requested device (e.g. device=gpu) is not visible to the framework."""


@dataclass(frozen=True)
class ModelSpec:
    """The VAE's shape. Encoder: x_dim -> hidden... -> 2*latent (mean first, then
    log-variance). Decoder: latent -> reversed(hidden)... -> x_dim (Bernoulli logits or
    Gaussian mean with fixed standard deviation `obs_sigma`)."""

    x_dim: int = 64
    hidden: tuple[int, ...] = (128,)
    latent: int = 8
    likelihood: Likelihood = "bernoulli"
    activation: Activation = "relu"
    obs_sigma: float = 1.0
    stop_gradient_z: bool = False  # negative control: detach z from the encoder
    freeze: Freeze = "none"  # block that gets no gradient

    def layer_dims(self, block: str) -> list[tuple[int, int]]:
        """(in, out) of each dense layer of `block`, in order."""
        if block == "encoder":
            sizes = [self.x_dim, *self.hidden, 2 * self.latent]
        elif block == "decoder":
            sizes = [self.latent, *reversed(self.hidden), self.x_dim]
        else:
            raise ValueError(f"unknown block {block!r}")
        return list(zip(sizes[:-1], sizes[1:]))

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Canonical parameter names and shapes, encoder first, layers in order."""
        shapes: dict[str, tuple[int, ...]] = {}
        for block in BLOCKS:
            for i, (n_in, n_out) in enumerate(self.layer_dims(block)):
                shapes[f"{block}.{i}.weight"] = (n_in, n_out)
                shapes[f"{block}.{i}.bias"] = (n_out,)
        return shapes

    def n_layers(self, block: str) -> int:
        return len(self.layer_dims(block))


@dataclass(frozen=True)
class OptimSpec:
    name: OptimName = "adam"
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8  # set explicitly: Keras' default (1e-7) differs from torch/optax (1e-8)
    momentum: float = 0.0  # sgd only


@dataclass(frozen=True)
class RuntimeSpec:
    mode: str = "eager"
    dtype: Dtype = "float32"
    device: Device = "cpu"
    seed: int = 0
    threads: int = 0  # 0: the framework's default
    allow_tf32: bool = False  # reduced-precision matmuls off unless asked
    compile_mode: TorchCompileMode = "default"  # torch.compile's mode (torch only)


@dataclass
class Terms:
    """Per-example loss parts (shape (B,)); `loss = recon + kl = -ELBO`."""

    recon: np.ndarray
    kl: np.ndarray
    loss: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.recon = np.asarray(self.recon)
        self.kl = np.asarray(self.kl)
        self.loss = self.recon + self.kl

    def means(self) -> dict[str, float]:
        return {t: float(np.mean(getattr(self, t))) for t in TERMS}


def resolve_mode(framework: str, mode: str) -> str:
    """Map the generic "compiled" to the framework's compiled mode; validate the rest."""
    if framework not in FRAMEWORK_MODES:
        raise ValueError(f"unknown framework {framework!r}; choose from {', '.join(FRAMEWORKS)}")
    if mode == "compiled":
        mode = COMPILED_ALIAS[framework]
    if mode not in FRAMEWORK_MODES[framework]:
        allowed = ", ".join(dict.fromkeys((*FRAMEWORK_MODES[framework], "compiled")))
        raise ValueError(f"{framework} has no mode {mode!r}; choose from {allowed}")
    return mode

"""The one interface every framework implements, and the factory that loads one.

Everything that crosses this boundary is NumPy or a plain Python value; a backend keeps
its device arrays inside. This module imports no framework: `load_backend` imports only
the framework it is asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import numpy as np

Term = Literal["loss", "recon", "kl"]
TERMS: tuple[Term, ...] = ("loss", "recon", "kl")
BLOCKS: tuple[str, ...] = ("encoder", "decoder")

FRAMEWORKS: tuple[str, ...] = ("torch", "tensorflow", "jax")
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


@dataclass(frozen=True)
class ModelSpec:
    """The VAE's shape. Encoder: x_dim -> hidden... -> 2*latent (mean first, then
    log-variance). Decoder: latent -> reversed(hidden)... -> x_dim (Bernoulli logits or
    Gaussian mean with fixed standard deviation `obs_sigma`)."""

    x_dim: int = 64
    hidden: tuple[int, ...] = (128,)
    latent: int = 8
    likelihood: Literal["bernoulli", "gaussian"] = "bernoulli"
    activation: Literal["relu", "tanh"] = "relu"
    obs_sigma: float = 1.0
    stop_gradient_z: bool = False  # negative control: detach z from the encoder
    freeze: Literal["none", "encoder", "decoder"] = "none"  # block that gets no gradient

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
    name: Literal["adam", "sgd"] = "adam"
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8  # set explicitly: Keras' default (1e-7) differs from torch/optax (1e-8)
    momentum: float = 0.0  # sgd only


@dataclass(frozen=True)
class RuntimeSpec:
    mode: str = "eager"
    dtype: Literal["float32", "float64"] = "float32"
    device: Literal["cpu", "gpu", "auto"] = "cpu"
    seed: int = 0
    threads: int = 0  # 0: the framework's default
    allow_tf32: bool = False  # reduced-precision matmuls off unless asked


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


@runtime_checkable
class Backend(Protocol):
    """One framework's implementation of the VAE.

    `eps` is standard-normal noise of shape (B, latent) or (K, B, latent) (K samples per
    example; the reconstruction term is then averaged over K). `x` may be NumPy or what
    `put` returned.
    """

    name: ClassVar[str]
    spec: ModelSpec
    optim: OptimSpec
    runtime: RuntimeSpec

    def set_params(self, params: Mapping[str, np.ndarray]) -> None: ...
    def get_params(self) -> dict[str, np.ndarray]: ...
    def put(self, x: np.ndarray) -> Any: ...
    def terms(self, x: Any, eps: np.ndarray) -> Terms: ...
    def grads(self, x: Any, eps: np.ndarray, term: Term) -> dict[str, np.ndarray]:
        """Gradient of the batch mean of `term` w.r.t. every canonical parameter."""
        ...

    def train_step(self, x: Any, eps: np.ndarray | None = None) -> Any:
        """One optimizer step on the batch mean of -ELBO. Noise from the backend's own
        device RNG unless `eps` is given. Returns the step's loss as a device scalar
        (no host sync); `float()` of it syncs."""
        ...

    def sync(self) -> None: ...
    def log_likelihood(self, x: Any, k: int, seed: int) -> np.ndarray:
        """IWAE-k lower bound on log p(x), per example."""
        ...

    def version(self) -> dict[str, Any]:
        """Framework version, devices and numeric settings, for the record's env."""
        ...

    def compile_count(self) -> int:
        """How many times the training step has been traced/compiled so far."""
        ...

    def get_state(self) -> dict[str, np.ndarray]:
        """The optimizer state under canonical names, the same in every framework.

        Adam: "adam.step" (0-d int64: steps taken so far), then "adam.m.<param>" and
        "adam.v.<param>" for every canonical parameter (order of `ModelSpec.param_shapes`),
        in the backend's dtype and canonical shape: the bias-UNcorrected moments
        m = b1*m + (1-b1)*g and v = b2*v + (1-b2)*g**2. SGD with momentum > 0:
        "sgd.momentum.<param>", the trace b = momentum*b + g (the update is -lr*b).
        SGD without momentum: {}. A fresh backend (or one after `set_params`, which resets
        the optimizer) returns the zero state with step 0."""
        ...

    def set_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Load a canonical optimizer state (as `get_state` returns it; call it after
        `set_params`, which resets the state). Unknown or missing keys, wrong shapes or a
        negative/non-integer step raise ValueError naming the key. Never retraces or
        recompiles a compiled step. `set_state(get_state())` is exact, and a fresh backend
        given `set_params` + `set_state` continues bit-identically to the original (except
        TensorFlow SGD with momentum and a learning rate that is not a power of two: Keras
        stores the velocity -lr*b, which the conversion restores only to within an ulp)."""
        ...


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


def load_backend(
    framework: str,
    model: ModelSpec | Mapping[str, Any] | None = None,
    optim: OptimSpec | Mapping[str, Any] | None = None,
    *,
    dtype: str = "float32",
    mode: str = "eager",
    device: str = "cpu",
    seed: int = 0,
    threads: int = 0,
    allow_tf32: bool = False,
    params: Mapping[str, np.ndarray] | None = None,
) -> Backend:
    """Build `framework`'s backend, loaded with canonical initial weights from `seed`
    (or with `params`). Imports only that framework.

    >>> b = load_backend("torch", ModelSpec(x_dim=64), dtype="float64")  # doctest: +SKIP
    """
    from harness.init import init_params

    spec = model if isinstance(model, ModelSpec) else ModelSpec(**_tuple_hidden(model or {}))
    opt = optim if isinstance(optim, OptimSpec) else OptimSpec(**dict(optim or {}))
    runtime = RuntimeSpec(
        mode=resolve_mode(framework, mode),
        dtype=dtype,  # type: ignore[arg-type]
        device=device,  # type: ignore[arg-type]
        seed=seed,
        threads=threads,
        allow_tf32=allow_tf32,
    )
    try:
        module = importlib.import_module(f"impls.{framework}.backend")
    except ImportError as exc:
        raise FrameworkUnavailable(f"framework {framework!r} is not importable: {exc}") from exc
    backend: Backend = module.BACKEND(spec, opt, runtime)
    backend.set_params(params if params is not None else init_params(spec, seed))
    return backend


def _tuple_hidden(d: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(d)
    if "hidden" in out:
        out["hidden"] = tuple(int(h) for h in out["hidden"])
    return out

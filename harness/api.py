"""The one interface every framework implements, and the factory that loads one.

Everything that crosses this boundary is NumPy or a plain Python value; a backend keeps
its device arrays inside. This module imports no framework: `load_backend` imports only
the framework it is asked for.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from harness.models import MODELS, spec_from  # noqa: F401  (MODELS: the model kinds)
from harness.models.base import ModelSpec  # noqa: F401  (re-exported)
from harness.models.conv import ConvSpec  # noqa: F401  (re-exported)
from harness.models.linear import LinearSpec  # noqa: F401  (re-exported)
from harness.models.mlp import MlpSpec  # noqa: F401  (re-exported)
from harness.schema import ConfigError, build  # noqa: F401  (ConfigError: what a bad argument raises)
from harness.spec import (  # noqa: F401  (re-exported: the public names of the interface)
    BLOCKS,
    COMPILED_ALIAS,
    FRAMEWORK_MODES,
    FRAMEWORK_MODULES,
    FRAMEWORKS,
    TERMS,
    Device,
    DeviceUnavailable,
    Dtype,
    FrameworkUnavailable,
    OptimSpec,
    RuntimeSpec,
    Term,
    Terms,
    choices,
    resolve_mode,
)


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
    def encode(self, x: Any) -> tuple[np.ndarray, np.ndarray]:
        """The encoder's q(z|x) = N(mean, exp(logvar)): (mean, logvar), each (B, latent)."""
        ...

    def grads(self, x: Any, eps: np.ndarray, term: Term) -> dict[str, np.ndarray]:
        """Gradient of the batch mean of `term` w.r.t. every canonical parameter."""
        ...

    def iwae_grads(self, x: Any, eps: np.ndarray, per_example: bool = False) -> dict[str, np.ndarray]:
        """Gradient of the NEGATIVE IWAE-K bound, -mean_b IWAE_K(x_b), w.r.t. every canonical
        parameter for harness noise `eps` of shape (K, B, latent); `per_example=True`: the
        gradient of -IWAE_K(x_b) per example, a leading batch axis (B, *shape)."""
        ...

    def local_grads(self, x: Any, mu: np.ndarray, logvar: np.ndarray, eps: np.ndarray) -> tuple[Terms, np.ndarray, np.ndarray]:
        """Local inference: the per-example `Terms` of q_b = N(mu_b, exp(logvar_b)) given per
        example (the encoder bypassed, the decoder as loaded) and the gradient of each
        example's -ELBO w.r.t. its own mu_b and logvar_b, shape (B, latent) each."""
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


def load_backend(
    framework: str,
    model: ModelSpec | Mapping[str, Any] | None = None,
    optim: OptimSpec | Mapping[str, Any] | None = None,
    runtime: RuntimeSpec | None = None,
    *,
    params: Mapping[str, np.ndarray] | None = None,
    **fields: Any,
) -> Backend:
    """Build `framework`'s backend, loaded with canonical initial weights from the runtime's
    seed (or with `params`). Imports only that framework. `runtime` is a `RuntimeSpec` passed
    whole, or its fields as keywords (dtype, mode, device, seed, threads, allow_tf32,
    compile_mode, conv_transpose), never both. Every argument is validated first, by the rules of
    the CLI's config (a bad one raises a ValueError naming it: `ConfigError`).

    >>> name = FRAMEWORKS[0]  # any registered framework
    >>> b = load_backend(name, MlpSpec(x_dim=64), dtype="float64")  # doctest: +SKIP
    >>> b = load_backend(name, MlpSpec(x_dim=64), RuntimeSpec(mode="compiled"))  # doctest: +SKIP
    """
    from harness.initializers import init_params

    if framework not in FRAMEWORK_MODES:
        raise ValueError(f"unknown framework {framework!r}; choose from {', '.join(FRAMEWORKS)}")
    spec = spec_from(model)
    opt = optim if isinstance(optim, OptimSpec) else build(OptimSpec, _mapping("optim", optim))
    if runtime is not None and fields:
        raise ValueError(f"pass a RuntimeSpec or its fields, not both (got runtime= and {', '.join(sorted(fields))})")
    if runtime is None:
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(RuntimeSpec)})
        if unknown:
            raise ValueError(f"load_backend() got unknown keyword {unknown[0]!r}; "
                             f"choose from params or {', '.join(f.name for f in dataclasses.fields(RuntimeSpec))}")
        runtime = RuntimeSpec(**fields)
    runtime = dataclasses.replace(runtime, mode=resolve_mode(framework, runtime.mode))
    try:
        module = importlib.import_module(f"impls.{framework}.backend")
    except ImportError as exc:
        raise FrameworkUnavailable(f"framework {framework!r} is not importable: {exc}") from exc
    backend: Backend = module.BACKEND(spec, opt, runtime)
    backend.set_params(params if params is not None else init_params(spec, runtime.seed))
    return backend


def _mapping(name: str, value: Any) -> dict[str, Any]:
    """`value` as keyword arguments of a spec; ValueError unless it is a mapping (or None)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be an OptimSpec or a mapping of its fields, got {type(value).__name__}")
    return dict(value)

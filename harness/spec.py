"""The specs and choices every other module shares. Imports only the leaves `harness.schema` and
`harness.frameworks`, so `api`, `init`, `config`, `data` and the measures all build on it without
a cycle. Each choice list is written once, as a Literal alias (`choices(Alias)` gives its values),
except the frameworks and their modes: those come from the registry (`harness.frameworks`, each
framework's `FACTS` in `impls/<name>/__init__.py`).

The specs validate themselves when built (`__post_init__`, the rules declared on their fields
with `harness.schema.setting`): the library API refuses what the CLI refuses, with the same
message (a `ConfigError`, a ValueError, naming the argument: "ModelSpec.latent: must be > 0,
got 0"). The CLI's config groups `model`, `optim` and `framework` are built from these fields
(`harness.config`), so each rule is written once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np

from harness import frameworks as _registry
from harness.schema import ConfigError, check, setting

#: a framework's name: one of `FRAMEWORKS` (the registry; validated where it is used)
Framework = str
#: what a backend computes in: float32 or float64 throughout, or mixed precision (bfloat16,
#: float16: `MIXED`)
Dtype = Literal["float32", "float64", "bfloat16", "float16"]
Device = Literal["cpu", "gpu", "auto"]
Likelihood = Literal["bernoulli", "gaussian"]
Activation = Literal["relu", "tanh"]
Freeze = Literal["none", "encoder", "decoder"]
OptimName = Literal["adam", "sgd"]
DataSource = Literal["digits", "synthetic", "mnist", "fashion_mnist", "mnist5k"]
#: torch.compile modes (torch only; "reduce-overhead" adds CUDA graphs: small GPU steps are launch-bound)
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


ConvTranspose = Literal["native", "dilated"]


#: Mixed precision: the low types, each with its unit roundoff u = 2^-(mantissa bits + 1)
#: (bfloat16 keeps 7 stored bits: u = 2^-8; float16 keeps 10: u = 2^-11). Under a mixed policy
#: the parameters, the optimizer state, the gradients the optimizer applies and every
#: reduction of the loss (its parts, the KL, the IWAE's log-sum-exp) are float32; the
#: encoder's and decoder's layers compute in the low type (`Policy`, `harness.vae`).
MIXED: dict[str, float] = {"bfloat16": 2.0**-8, "float16": 2.0**-11}
#: the dynamic loss scale of float16 training, the same in every framework: start at 2^15,
#: halve on a non-finite gradient (that step is skipped), double after this many finite steps
#: (Keras' LossScaleOptimizer defaults; torch's GradScaler is given the same)
LOSS_SCALE_INIT = 2.0**15
LOSS_SCALE_GROWTH_STEPS = 2000


@dataclass(frozen=True)
class Policy:
    """What a backend computes in: the layers' type, the parameters' (and optimizer state's),
    and the type reductions are accumulated in; `loss_scaling` for float16 (`LOSS_SCALE_INIT`)."""

    compute: str
    param: str
    accumulate: str
    loss_scaling: bool = False

    @staticmethod
    def of(dtype: str) -> Policy:
        if dtype in MIXED:
            return Policy(compute=dtype, param="float32", accumulate="float32", loss_scaling=dtype == "float16")
        return Policy(compute=dtype, param=dtype, accumulate=dtype)

    @property
    def mixed(self) -> bool:
        return self.compute != self.param


def param_dtype(dtype: str) -> str:
    """The dtype a backend of `dtype` keeps its parameters, optimizer state and host arrays in
    (float32 under mixed precision)."""
    return Policy.of(dtype).param


def choices(alias: Any) -> tuple[str, ...]:
    """The values of a Literal alias: `choices(Likelihood) == ("bernoulli", "gaussian")`."""
    return tuple(get_args(alias))


Term = Literal["loss", "recon", "kl"]
TERMS: tuple[Term, ...] = ("loss", "recon", "kl")
BLOCKS: tuple[str, ...] = ("encoder", "decoder")

#: The registered frameworks, in their declared order (`harness.frameworks.registry`).
FRAMEWORKS: tuple[str, ...] = _registry.names()
#: Modes each framework implements. "eager" runs op by op everywhere; the others compile.
FRAMEWORK_MODES: dict[str, tuple[str, ...]] = {n: f.modes for n, f in _registry.registry().items()}
#: What the generic mode name "compiled" means in each framework.
COMPILED_ALIAS: dict[str, str] = {n: f.compiled for n, f in _registry.registry().items()}
#: The Python module each framework is imported as (to check availability without importing).
FRAMEWORK_MODULES: dict[str, str] = {n: f.module for n, f in _registry.registry().items()}


class FrameworkUnavailable(RuntimeError):
    """The requested framework is not installed (or cannot be imported)."""


class DeviceUnavailable(RuntimeError):
    """The requested device (e.g. device=gpu) is not visible to the framework."""


def wants_gpu(framework: str, device: str, gpus_seen: int, hint: str = "") -> bool:
    """The one device rule, for every backend and every plain loop: whether `device`
    ("cpu" | "gpu" | "auto") means a GPU when `framework` sees `gpus_seen` of them; "gpu" with
    none seen raises DeviceUnavailable (the job is then recorded `unavailable`)."""
    want = device == "gpu" or (device == "auto" and gpus_seen > 0)
    if want and gpus_seen == 0:
        raise DeviceUnavailable(f"device=gpu asked for, but {framework} sees no GPU{f' ({hint})' if hint else ''}")
    return want


def _normalize(obj: Any, **values: Any) -> None:
    """Set fields of a frozen dataclass in its `__post_init__`."""
    for k, v in values.items():
        object.__setattr__(obj, k, v)


def _int(value: Any) -> Any:
    """A NumPy integer as an int; anything else unchanged (the type check judges it)."""
    return int(value) if isinstance(value, np.integer) else value


@dataclass(frozen=True)
class OptimSpec:
    """The optimizer: the framework's own Adam or SGD, every hyperparameter explicit. Validated
    when built."""

    name: OptimName = setting("adam", choices=choices(OptimName))
    lr: float = setting(1e-3, gt=0)
    beta1: float = setting(0.9, ge=0.0, lt=1.0)
    beta2: float = setting(0.999, ge=0.0, lt=1.0)
    eps: float = setting(1e-8, gt=0)  # set explicitly: Keras' default (1e-7) differs from torch/optax (1e-8)
    momentum: float = setting(0.0, ge=0.0, lt=1.0)  # sgd only (Adam's momentum is beta1)

    def __post_init__(self) -> None:
        check(self, "OptimSpec.")
        _normalize(self, **{k: float(getattr(self, k)) for k in ("lr", "beta1", "beta2", "eps", "momentum")})
        if self.name != "sgd" and self.momentum != 0.0:
            raise ConfigError("OptimSpec.momentum", f"is read only by sgd (got {self.momentum:g} with {self.name}; "
                                                    "Adam's momentum is beta1)")


#: every framework's modes, and the generic "compiled" (a framework checks its own: `resolve_mode`)
ALL_MODES: tuple[str, ...] = tuple(dict.fromkeys(("eager", "compiled", *(m for ms in FRAMEWORK_MODES.values() for m in ms))))


@dataclass(frozen=True)
class RuntimeSpec:
    """Where and how a backend computes. Validated when built (the mode against the framework
    by `resolve_mode`, when the backend is loaded)."""

    mode: str = setting("eager", choices=ALL_MODES)
    dtype: Dtype = setting("float32", choices=choices(Dtype))
    device: Device = setting("cpu", choices=choices(Device))
    seed: int = setting(0, ge=0, lt=2**32)  # NumPy and every framework's RNG take it
    threads: int = setting(0, ge=0)  # 0: the framework's default
    allow_tf32: bool = False  # reduced-precision matmuls off unless asked
    compile_mode: CompileMode = setting("default", choices=choices(CompileMode))  # torch.compile's mode
    # how a transposed convolution is computed: each framework's own op (native), or its
    # definition, zeros between the input's values and a plain convolution (dilated): the same
    # numbers, another speed (XLA's CPU backward of its own op is slow); throughput reports both
    conv_transpose: ConvTranspose = setting("native", choices=choices(ConvTranspose))

    def __post_init__(self) -> None:
        _normalize(self, seed=_int(self.seed), threads=_int(self.threads))
        check(self, "RuntimeSpec.")


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
    """Map the generic "compiled" to the framework's compiled mode; validate the rest (a
    ConfigError naming the framework's modes otherwise)."""
    if framework not in FRAMEWORK_MODES:
        raise ConfigError("framework", f"must be one of {', '.join(FRAMEWORKS)}, got {framework!r}")
    resolved = COMPILED_ALIAS[framework] if mode == "compiled" else mode
    if resolved not in FRAMEWORK_MODES[framework]:
        allowed = ", ".join(dict.fromkeys((*FRAMEWORK_MODES[framework], "compiled")))
        raise ConfigError("mode", f"must be one of {allowed} for {framework}, got {mode!r}")
    return resolved

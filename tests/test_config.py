"""Every config group composes; malformed configs fail at composition naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from harness.cli import CONF_DIR, prevalidate
from harness.config import AppConfig, ConfigError, register, validate
from harness.data import FORMATS
from tests.test_data import write_data_files

register()


@pytest.fixture(scope="module")
def data_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_data_files(tmp_path_factory.mktemp("data"))


def _compose(*overrides: str) -> AppConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return validate(compose(config_name="config", overrides=list(overrides)))


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["framework", "model", "data", "optim", "measure", "experiment"])
def test_every_group_option_composes(group: str, data_files: dict[str, Path]) -> None:
    options = _options(group)
    assert options, group
    for opt in options:
        extra = [f"data.path={data_files['good']}", "data.batch_size=32"] if opt in ("mnist", "fashion_mnist") else []
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
    ("framework.precision=float8", "framework.precision"),
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
    ("framework.timeout_s=0", "framework.timeout_s"),
    ("framework.memory_limit_mb=-1", "framework.memory_limit_mb"),
    ("framework.threads=-2", "framework.threads"),
    ("framework.device=tpu", "framework.device"),
    ("framework.compile_mode=turbo", "framework.compile_mode"),
    ("framework.allow_tf32=sometimes", "framework.allow_tf32"),  # not a bool
    ("model.activation=swish", "model.activation"),
    ("model.obs_sigma=0", "model.obs_sigma"),
    ("model.freeze=everything", "model.freeze"),
    ("model=linear model.hidden=[8] data=synthetic", "model.hidden"),  # the linear model has no hidden layer
    ("data.threshold=1.5", "data.threshold"),
    ("optim.name=rmsprop", "optim.name"),
    ("optim.momentum=1.0", "optim.momentum"),
    ("optim.eps=0", "optim.eps"),
    ("measure.names=[]", "measure.names"),
    ("measure.convergence.epochs=0", "measure.convergence.epochs"),
    ("measure.convergence.seeds=[1,1]", "measure.convergence.seeds"),
    ("measure.throughput.batch_sizes=[]", "measure.throughput.batch_sizes"),
    ("measure.throughput.repeats=1", "measure.throughput.repeats"),
    ("progress=maybe", "progress"),
    # data files: checked at composition (headers, sizes, finiteness), before any job runs
    ("data=mnist data.path={no_arrays}", "data.path"),
    ("data=mnist data.path={sizes}", "data.path"),  # train and test images of different sizes
    ("data=mnist data.path={all_nan}", "data.path"),
    ("data=fashion_mnist data.path={inf}", "data.path"),
    ("data=mnist data.path={strings}", "data.path"),
    ("data=mnist data.path={junk}", "data.path"),
    ("data=mnist data.path={text}", "data.path"),
    ("data=mnist data.path={idx_magic}", "data.path"),
    ("data=mnist data.path={idx_size}", "data.path"),
    ("data=mnist data.path={idx_size_gz}", "data.path"),
    ("data=mnist data.path={idx_labels}", "data.path"),
    ("data=mnist data.path={empty_folder}", "data.path"),
    ("data=mnist data.path={good} data.batch_size=97", "data.batch_size"),  # 96 training images in the file
    # a file's values as the model would see them: never rescaled unasked, never out of the likelihood's range
    ("data=mnist data.path={normal} data.binarize=false", "data.scale"),  # floats above 1: say the scale
    ("data=mnist data.path={normal} data.binarize=false data.scale=1", "data.binarize"),  # outside [0, 1]: Bernoulli
    ("data=mnist data.path={float255} data.binarize=false", "data.scale"),
    ("data=mnist data.path={binary_uint8}", "data.scale"),  # 0/1 pixels divided by 255: every pixel 0 after binarizing
    ("data=mnist data.path={good} data.scale=0", "data.scale"),
    # keys the chosen source does not read are refused, not recorded and ignored
    ("data.n_train=100", "data.n_train"),
    ("data.obs_sigma=0.3", "data.obs_sigma"),
    ("data.scale=255", "data.scale"),
    ("data.path=/tmp/mnist.npz", "data.path"),
    # numbers that are not finite, and rules of the library's specs
    ("optim.lr=inf", "optim.lr"),
    ("optim.lr=nan", "optim.lr"),
    ("model.obs_sigma=inf", "model.obs_sigma"),
    ("measure.conformance.sgd_lr=inf", "measure.conformance.sgd_lr"),
    ("optim.momentum=0.9", "optim.momentum"),  # Adam has no momentum (beta1)
    ("model.hidden=128", "model.hidden"),  # a number, not a list
    ("model.kind=linear", "model.hidden"),  # the default hidden layer with the linear model
    ("out_dir=/sys/nc", "out_dir"),  # writable by permission bits as root, yet nothing can be created there
    ("out_dir=/dev/null", "out_dir"),  # a file, not a folder
]


def _args(args: str, files: dict[str, Path]) -> list[str]:
    return args.format(**{k: str(v) for k, v in files.items()}).split()


def test_malformed_table_is_large_and_distinct() -> None:
    assert len(MALFORMED) >= 50 and len({a for a, _ in MALFORMED}) == len(MALFORMED)
    assert len({k for _, k in MALFORMED}) >= 30  # thirty different keys named, not one key thirty times


@pytest.mark.parametrize("args,key", MALFORMED)
def test_malformed_config_names_the_key(args: str, key: str, data_files: dict[str, Path]) -> None:
    with pytest.raises(ConfigError) as info:
        prevalidate(_args(args, data_files))
    msg = str(info.value)
    assert key in msg and "\n" not in msg, msg
    if key in ("data.scale", "data.binarize") and "data.path=" in args and "must be" not in msg:  # the file's values: named
        assert next(a for a in _args(args, data_files) if a.startswith("data.path=")).split("=", 1)[1] in msg, msg
    if key == "data.path" and "data.path=" in args and args.startswith(("data=mnist", "data=fashion_mnist")):
        path = next(a for a in _args(args, data_files) if a.startswith("data.path=")).split("=", 1)[1]
        assert path in msg and FORMATS in msg, msg  # names the file and what is expected


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


#: a subset of MALFORMED run as a user would: `vaebench ...` in a subprocess
CLI_SUBSET = [m for m in MALFORMED if m[1] in (
    "data.path", "framework.memory_limit_mb", "framework.timeout_s", "seed", "model.hidden", "measure.convergence.seeds",
    "out_dir", "data.batch_size", "framework",
)]


@pytest.mark.slow
def test_cli_subset_exit_2_one_line_nothing_written(data_files: dict[str, Path], tmp_path: Path) -> None:
    """Exit 2, one line on stderr naming the key, nothing written to out_dir (not even a run
    folder), and no framework imported (the rejection comes before any job)."""
    import os
    import subprocess
    import sys

    from harness.api import FRAMEWORK_MODULES
    from tests.conftest import ROOT

    modules = tuple(FRAMEWORK_MODULES.values())
    assert len(CLI_SUBSET) >= 15
    code = ("import sys, runpy; sys.argv = ['vaebench', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('harness.cli', run_name='__main__')\n"
            f"finally:\n    print('imported:', sorted(m for m in {modules!r} if m in sys.modules), file=sys.stderr)\n")
    for args, key in CLI_SUBSET:
        out = tmp_path / "runs"
        argv = _args(args, data_files)
        if not any(a.startswith("out_dir=") for a in argv):
            argv.append(f"out_dir={out}")
        r = subprocess.run([sys.executable, "-c", code, *argv, "progress=false"], cwd=ROOT, capture_output=True,
                           text=True, timeout=60, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2, (args, r.stderr[-2000:])
        assert lines[-1] == "imported: []", (args, r.stderr)  # no framework imported
        assert len(lines) == 2 and lines[0].startswith("vaebench: config error: ") and key in lines[0], (args, r.stderr)
        assert not out.exists(), args  # nothing written, not even the run folder

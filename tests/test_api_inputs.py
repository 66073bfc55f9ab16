"""Bad input through the library API: one table, every case in every framework.

Each case is an API call a user could make with a bad argument; each must raise a ValueError
(a `ConfigError` where the rule is the config's own) whose message names the argument, before
any framework computes anything: the rules are the ones the CLI applies (declared once, on the
specs' fields), the input checks are framework-neutral (`impls.base`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harness import data, models
from harness.api import FRAMEWORKS, MlpSpec, OptimSpec, RuntimeSpec, load_backend
from harness.schema import ConfigError

SPEC = MlpSpec(x_dim=12, hidden=(10,), latent=3)
RNG = np.random.default_rng(0)
X = (RNG.random((5, 12)) > 0.5).astype(float)
EPS = RNG.standard_normal((5, 3))


@pytest.fixture(scope="module", params=FRAMEWORKS)
def backend(request: pytest.FixtureRequest) -> Any:
    return load_backend(request.param, SPEC, dtype="float64")


def _with(a: np.ndarray, index: tuple[int, ...], value: float) -> np.ndarray:
    b = a.copy()
    b[index] = value
    return b


#: (case, call given the framework's backend, pattern the message must match: it names the argument)
BACKEND_CASES: list[tuple[str, Callable[[Any], Any], str]] = [
    ("x 1-D", lambda b: b.terms(X[0], EPS[:1]), r"x must have shape \(batch, 12\).*got shape \(12,\)"),
    ("x 3-D", lambda b: b.terms(X[None], EPS), r"x must have shape \(batch, 12\)"),
    ("x of the wrong width", lambda b: b.terms(X[:, :10], EPS), r"x must have shape \(batch, 12\).*\(5, 10\)"),
    ("x of the wrong width, train_step", lambda b: b.train_step(X[:, :10]), r"x must have shape \(batch, 12\)"),
    ("x of the wrong width, put", lambda b: b.put(X[:, :10]), r"x must have shape \(batch, 12\)"),
    ("x of the wrong width, log_likelihood", lambda b: b.log_likelihood(X[:, :10], 3, seed=0), r"x must have shape"),
    ("x of the wrong width, grads", lambda b: b.grads(X[:, :10], EPS, "loss"), r"x must have shape"),
    ("empty batch", lambda b: b.terms(X[:0], EPS[:0]), r"x must have shape .*at least one example"),
    ("x outside [0, 1] under Bernoulli", lambda b: b.terms(X * 2.0, EPS), r"x holds values in \[0, 2\].*Bernoulli"),
    ("negative x under Bernoulli", lambda b: b.train_step(X - 0.5), r"x holds values in \[-0.5, 0.5\].*Bernoulli"),
    ("NaN in x", lambda b: b.terms(_with(X, (1, 2), np.nan), EPS), r"x holds a value that is not finite .*row 1, column 2"),
    ("inf in x", lambda b: b.grads(_with(X, (0, 0), np.inf), EPS, "kl"), r"x holds a value that is not finite"),
    ("strings in x", lambda b: b.terms(np.array([["a"] * 12]), EPS[:1]), r"numeric"),
    ("eps of the wrong latent size", lambda b: b.terms(X, EPS[:, :2]), r"eps must have shape \(5, 3\) or \(K, 5, 3\)"),
    ("eps of the wrong batch", lambda b: b.grads(X, EPS[:4], "loss"), r"eps must have shape \(5, 3\)"),
    ("eps 1-D", lambda b: b.terms(X, EPS[0]), r"eps must have shape"),
    ("eps with K in train_step", lambda b: b.train_step(X, EPS[None]), r"eps must have shape \(5, 3\) \(latent = 3\), got shape \(1, 5, 3\)"),
    ("NaN in eps", lambda b: b.terms(X, _with(EPS, (0, 0), np.nan)), r"eps holds a value that is not finite"),
    ("mu of the wrong shape", lambda b: b.local_grads(X, EPS[:, :2], EPS, EPS), r"mu of shape \(5, 3\)"),
    ("bad term", lambda b: b.grads(X, EPS, "elbo"), r"term must be one of loss, recon, kl, got 'elbo'"),
    ("bad k", lambda b: b.log_likelihood(X, 0, seed=0), r"\bk\b.*int >= 1"),
]


@pytest.mark.parametrize("case,call,pattern", BACKEND_CASES, ids=[c[0] for c in BACKEND_CASES])
def test_bad_input_to_a_backend_names_the_argument(backend: Any, case: str, call: Callable[[Any], Any], pattern: str) -> None:
    before = backend.get_params()
    with pytest.raises(ValueError, match=pattern) as info:
        call(backend)
    assert "\n" not in str(info.value), str(info.value)
    for k, v in backend.get_params().items():  # nothing was trained on it
        np.testing.assert_array_equal(v, before[k])


#: (case, call given the framework name, pattern naming the argument)
BUILD_CASES: list[tuple[str, Callable[[str], Any], str]] = [
    ("optimizer name in capitals", lambda fw: load_backend(fw, SPEC, {"name": "Adam"}), r"OptimSpec.name: must be one of adam, sgd, got 'Adam'"),
    ("unknown optimizer", lambda fw: load_backend(fw, SPEC, {"name": "adamw"}), r"OptimSpec.name: .*got 'adamw'"),
    ("negative learning rate", lambda fw: load_backend(fw, SPEC, OptimSpec(lr=-1)), r"OptimSpec.lr: must be > 0, got -1"),
    ("zero learning rate", lambda fw: load_backend(fw, SPEC, {"lr": 0.0}), r"OptimSpec.lr: must be > 0"),
    ("NaN learning rate", lambda fw: load_backend(fw, SPEC, {"lr": float("nan")}), r"OptimSpec.lr: must be a finite number"),
    ("beta2 = 1", lambda fw: load_backend(fw, SPEC, {"beta2": 1.0}), r"OptimSpec.beta2: must be < 1"),
    ("momentum with Adam", lambda fw: load_backend(fw, SPEC, {"momentum": 0.9}), r"OptimSpec.momentum: is read only by sgd"),
    ("unknown optimizer key", lambda fw: load_backend(fw, SPEC, {"lr": 0.1, "decay": 1}), r"OptimSpec.decay: unknown argument"),
    ("latent 0", lambda fw: load_backend(fw, {"x_dim": 12, "latent": 0}), r"MlpSpec.latent: must be > 0, got 0"),
    ("negative x_dim", lambda fw: load_backend(fw, {"x_dim": -1}), r"MlpSpec.x_dim: must be > 0, got -1"),
    ("hidden as a string", lambda fw: load_backend(fw, {"x_dim": 12, "hidden": "128"}), r"MlpSpec.hidden: must be a list of integers, got '128'"),
    ("hidden of floats", lambda fw: load_backend(fw, {"x_dim": 12, "hidden": [1.5]}), r"MlpSpec.hidden: must be a list of integers"),
    ("a zero-width layer", lambda fw: load_backend(fw, {"x_dim": 12, "hidden": [8, 0]}), r"MlpSpec.hidden\[1\]: must be > 0"),
    ("unknown likelihood", lambda fw: load_backend(fw, {"x_dim": 12, "likelihood": "poisson"}), r"MlpSpec.likelihood"),
    ("obs_sigma 0", lambda fw: load_backend(fw, {"x_dim": 12, "obs_sigma": 0}), r"MlpSpec.obs_sigma: must be > 0"),
    ("a linear model with hidden layers", lambda fw: load_backend(fw, {"x_dim": 12, "kind": "linear", "hidden": [8]}), r"LinearSpec.hidden: unknown argument"),
    ("an unknown model kind", lambda fw: load_backend(fw, {"x_dim": 12, "kind": "rnn"}), r"model.kind: must be one of .*, got 'rnn'"),
    ("a conv VAE on an image it cannot halve", lambda fw: load_backend(fw, {"kind": "conv", "image": [10, 10, 1], "x_dim": 100}),
     r"ConvSpec.image: 10 x 10: .*multiples of 4"),
    ("a conv VAE whose x_dim is not its image's", lambda fw: load_backend(fw, {"kind": "conv", "image": [8, 8, 1], "x_dim": 60}),
     r"ConvSpec.x_dim: is 60"),
    ("stop_gradient_z as a string", lambda fw: load_backend(fw, {"x_dim": 12, "stop_gradient_z": "yes"}), r"MlpSpec.stop_gradient_z: must be true or false"),
    ("unknown model key", lambda fw: load_backend(fw, {"x_dim": 12, "layers": 3}), r"MlpSpec.layers: unknown argument"),
    ("model of the wrong type", lambda fw: load_backend(fw, 12), r"model must be a ModelSpec or a mapping"),
    ("unknown dtype", lambda fw: load_backend(fw, SPEC, dtype="float8"), r"RuntimeSpec.dtype: must be one of float32, float64, bfloat16, float16, got 'float8'"),
    ("unknown device", lambda fw: load_backend(fw, SPEC, device="tpu"), r"RuntimeSpec.device: must be one of"),
    ("negative threads", lambda fw: load_backend(fw, SPEC, threads=-1), r"RuntimeSpec.threads: must be >= 0, got -1"),
    ("negative seed", lambda fw: load_backend(fw, SPEC, seed=-1), r"RuntimeSpec.seed: must be >= 0"),
    ("seed as a float", lambda fw: load_backend(fw, SPEC, seed=1.5), r"RuntimeSpec.seed: must be an integer"),
    ("a mode of another framework", lambda fw: load_backend(fw, SPEC, mode={"torch": "jit", "tensorflow": "jit", "jax": "xla"}[fw]),
     r"mode: must be one of .* for (torch|tensorflow|jax)"),
    ("an unknown mode", lambda fw: load_backend(fw, SPEC, mode="turbo"), r"mode: must be one of"),
    ("an unknown compile mode", lambda fw: load_backend(fw, SPEC, compile_mode="fast"), r"RuntimeSpec.compile_mode"),
]


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("case,call,pattern", BUILD_CASES, ids=[c[0] for c in BUILD_CASES])
def test_bad_arguments_to_load_backend_name_the_argument(framework: str, case: str, call: Callable[[str], Any], pattern: str) -> None:
    with pytest.raises(ConfigError if "must be a ModelSpec" not in pattern else ValueError, match=pattern) as info:
        call(framework)
    assert "\n" not in str(info.value)


def test_an_unknown_framework_is_named() -> None:
    with pytest.raises(ValueError, match=rf"unknown framework 'pytorch'; choose from {', '.join(FRAMEWORKS)}$"):
        load_backend("pytorch", SPEC)


def test_the_specs_refuse_what_the_config_refuses() -> None:
    """The same rule and message through the spec (library) and the config (CLI): the config
    groups are built from the specs' fields."""
    from hydra import compose, initialize_config_dir

    from harness.cli import CONF_DIR
    from harness.config import register, validate

    register()
    for spec_call, override, message in [
        (lambda: MlpSpec(latent=0), "model.latent=0", "must be > 0, got 0"),
        (lambda: OptimSpec(beta1=1.5), "optim.beta1=1.5", "must be < 1.0, got 1.5"),
        (lambda: OptimSpec(name="rmsprop"), "optim.name=rmsprop", "must be one of adam, sgd, got 'rmsprop'"),
        (lambda: RuntimeSpec(threads=-2), "framework.threads=-2", "must be >= 0, got -2"),
        (lambda: models.spec_for_data({"kind": "conv"}, (16,)), "model=conv data=synthetic", "model=conv needs images"),
        (lambda: OptimSpec(momentum=0.5), "optim.momentum=0.5", "is read only by sgd"),
    ]:
        with pytest.raises(ConfigError) as lib:
            spec_call()
        with pytest.raises(ConfigError) as cli, initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            validate(compose(config_name="config", overrides=override.split()))
        assert message in lib.value.message and message in cli.value.message, (lib.value, cli.value)
        assert lib.value.key.split(".")[-1] == cli.value.key.split(".")[-1]


def test_specs_take_numpy_integers_and_lists() -> None:
    s = MlpSpec(x_dim=np.int64(12), hidden=[np.int32(10), 4], latent=np.int64(3))
    assert s.hidden == (10, 4) and type(s.x_dim) is int and type(s.hidden[0]) is int
    assert OptimSpec(lr=1).lr == 1.0 and isinstance(OptimSpec(lr=1).lr, float)


# -- data --------------------------------------------------------------------------------------


def _npz(path: Path, **arrays: np.ndarray) -> str:
    np.savez(path, **arrays)
    return str(path)


def test_bad_data_arguments_name_them(tmp_path: Path) -> None:
    normal = _npz(tmp_path / "normal.npz", x_train=RNG.standard_normal((20, 8, 8)), x_test=RNG.standard_normal((5, 8, 8)))
    cases: list[tuple[Callable[[], Any], type[Exception], str]] = [
        (lambda: data.load("digits", threshold=1.5), ConfigError, r"data.threshold: must be < 1.0"),
        (lambda: data.load("digits", n_train=100), ConfigError, r"data.n_train: is read only by data=synthetic"),
        (lambda: data.load("digits", scale=255), ConfigError, r"data.scale: is read only by data read from files"),
        (lambda: data.load("synthetic", x_dim=0), ConfigError, r"data.x_dim: must be > 0"),
        (lambda: data.load("imagenet"), ConfigError, r"data.source: must be one of"),
        (lambda: data.load("mnist"), data.DataError, r"needs data.path"),
        # a user's standard-normal values are never silently divided by 255 and trained as pixels
        (lambda: data.load("mnist", path=normal, binarize=False), data.DataError, r"normal.npz: float values up to .*data.scale"),
        (lambda: data.load("mnist", path=normal, binarize=False, scale=1, likelihood="bernoulli"), data.DataError,
         r"normal.npz: values span \[-.*Bernoulli likelihood needs \[0, 1\]"),
        (lambda: data.load("synthetic", likelihood="bernoulli"), data.DataError, r"data=synthetic: x_train values span .*Bernoulli"),
    ]
    for call, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            call()
    # as data (Gaussian likelihood, scale said), the same file loads, unscaled and recorded so
    ds = data.load("mnist", path=normal, binarize=False, scale=1, likelihood="gaussian")
    assert ds.info["scale"] == 1.0 and ds.x_train.min() < 0

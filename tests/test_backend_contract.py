"""The contract every backend meets, checked against independent computations:
NumPy reference loss parts, central finite differences, closed-form optimizer updates."""

from __future__ import annotations

import importlib
import math
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from harness import ModelSpec, OptimSpec, init_params, load_backend, reference
from harness.api import TERMS, MlpSpec, RuntimeSpec
from harness.frameworks import registry
from impls.base import IWAE_CHUNK, VERSION_KEYS, BackendBase, StreamingLogSumExp
from tests.conftest import FRAMEWORKS, ROOT

SPEC = MlpSpec(x_dim=12, hidden=(10, 7), latent=3, activation="tanh")
RNG = np.random.default_rng(123)
X = (RNG.uniform(size=(6, 12)) > 0.5).astype(np.float64)
EPS = RNG.standard_normal((6, 3))
EPS_K = RNG.standard_normal((4, 6, 3))


def _params(spec: ModelSpec = SPEC, seed: int = 7) -> dict[str, np.ndarray]:
    p = init_params(spec, seed)
    # non-zero biases so every parameter matters
    return {k: v + (0.1 * np.random.default_rng(len(k)).standard_normal(v.shape) if "bias" in k else 0) for k, v in p.items()}


@pytest.fixture(scope="module", params=FRAMEWORKS)
def framework(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 1e-4)])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_terms_match_numpy(framework: str, dtype: str, tol: float, likelihood: str) -> None:
    spec = MlpSpec(**{**SPEC.__dict__, "likelihood": likelihood, "obs_sigma": 0.7})
    params = _params(spec)
    b = load_backend(framework, spec, dtype=dtype, params=params)
    for eps in (EPS, EPS_K):
        got, want = b.terms(X, eps), reference.terms(params, X, eps, spec)
        for t in TERMS:
            g, w = getattr(got, t), getattr(want, t)
            assert g.shape == (6,)
            np.testing.assert_allclose(g, w, rtol=tol, atol=0, err_msg=f"{framework} {dtype} {t}")


def test_relu_terms_match_numpy(framework: str) -> None:
    spec = MlpSpec(x_dim=12, hidden=(16,), latent=3, activation="relu")
    params = _params(spec)
    b = load_backend(framework, spec, dtype="float64", params=params)
    np.testing.assert_allclose(b.terms(X, EPS).loss, reference.terms(params, X, EPS, spec).loss, rtol=1e-12)


def test_params_roundtrip_and_shapes(framework: str) -> None:
    params = _params()
    b = load_backend(framework, SPEC, dtype="float64", params=params)
    got = b.get_params()
    assert list(got) == list(SPEC.param_shapes())
    for k, v in params.items():
        assert got[k].shape == SPEC.param_shapes()[k]
        np.testing.assert_array_equal(got[k], v)


@pytest.mark.parametrize("term", TERMS)
def test_grads_match_finite_differences(framework: str, term: str) -> None:
    """Directional derivative along random directions vs central differences in float64."""
    params = _params()
    b = load_backend(framework, SPEC, dtype="float64", params=params)
    g = b.grads(X, EPS, term)  # type: ignore[arg-type]
    assert set(g) == set(params)
    rng = np.random.default_rng(5)
    h = 1e-5
    for block in ("encoder", "decoder", None):
        names = [k for k in params if block is None or k.startswith(block)]
        d = {k: rng.standard_normal(params[k].shape) for k in names}
        analytic = sum(float(np.sum(g[k] * d[k])) for k in names)

        def f(sign: float, d: dict[str, np.ndarray] = d) -> float:
            shifted = {k: v + sign * h * d[k] if k in d else v for k, v in params.items()}
            return float(getattr(reference.terms(shifted, X, EPS, SPEC), term).mean())

        numeric = (f(1) - f(-1)) / (2 * h)
        if term == "kl" and block == "decoder":
            assert analytic == 0.0 and abs(numeric) < 1e-12
            continue
        assert abs(analytic - numeric) <= 1e-6 * max(abs(numeric), 1e-3), (block, analytic, numeric)


def test_grads_also_match_backend_own_fd(framework: str) -> None:
    """Finite differences of the backend's own loss (not the reference)."""
    params = _params()
    b = load_backend(framework, SPEC, dtype="float64", params=params)
    g = b.grads(X, EPS, "loss")
    d = {k: np.random.default_rng(9).standard_normal(v.shape) for k, v in params.items()}
    h = 1e-5
    vals = []
    for sign in (1, -1):
        b.set_params({k: v + sign * h * d[k] for k, v in params.items()})
        vals.append(float(b.terms(X, EPS).loss.mean()))
    numeric = (vals[0] - vals[1]) / (2 * h)
    analytic = sum(float(np.sum(g[k] * d[k])) for k in params)
    assert abs(analytic - numeric) <= 1e-6 * abs(numeric)


def test_stop_gradient_and_freeze(framework: str) -> None:
    params = _params()
    sg = load_backend(framework, MlpSpec(**{**SPEC.__dict__, "stop_gradient_z": True}), dtype="float64", params=params)
    g = sg.grads(X, EPS, "recon")
    assert all(not np.any(v) for k, v in g.items() if k.startswith("encoder"))
    assert any(np.any(v) for k, v in g.items() if k.startswith("decoder"))
    # the loss value itself is unchanged by the control
    np.testing.assert_allclose(sg.terms(X, EPS).loss, reference.terms(params, X, EPS, SPEC).loss, rtol=1e-12)
    fr = load_backend(framework, MlpSpec(**{**SPEC.__dict__, "freeze": "decoder"}), dtype="float64", params=params)
    g = fr.grads(X, EPS, "loss")
    assert all(not np.any(v) for k, v in g.items() if k.startswith("decoder"))
    assert all(np.any(v) for k, v in g.items() if k.startswith("encoder"))


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_train_step_with_given_noise_matches_closed_form(framework: str, opt: str) -> None:
    """One step from fresh state: SGD moves by -lr*g, Adam by -lr*g/(|g|+eps) after bias
    correction (torch, optax). Keras applies eps to the *uncorrected* sqrt(v), so its first
    step is -lr*g/(|g| + eps/sqrt(1-beta2)): a documented convention, not a bug."""
    params = _params()
    o = OptimSpec(name=opt, lr=0.01, eps=1e-8)  # type: ignore[arg-type]
    b = load_backend(framework, SPEC, o, dtype="float64", params=params)
    g = b.grads(X, EPS, "loss")
    loss = float(b.train_step(X, EPS))
    assert loss == pytest.approx(float(reference.terms(params, X, EPS, SPEC).loss.mean()), rel=1e-12)
    new = b.get_params()
    for k, p in params.items():
        eps_hat = o.eps / np.sqrt(1 - o.beta2) if framework == "tensorflow" else o.eps
        step = g[k] if opt == "sgd" else g[k] / (np.abs(g[k]) + eps_hat)
        np.testing.assert_allclose(new[k], p - o.lr * step, rtol=1e-9, atol=1e-12, err_msg=k)


def test_train_step_seeding(framework: str) -> None:
    """Device RNG: same seed, same trajectory; another seed, another one."""
    runs = []
    for seed in (0, 0, 1):
        b = load_backend(framework, SPEC, OptimSpec(lr=0.01), dtype="float64", seed=seed, params=_params())
        runs.append([float(b.train_step(X)) for _ in range(3)])
    assert runs[0] == runs[1]
    assert runs[0][1:] != runs[2][1:]
    assert all(np.isfinite(runs[0]))


@pytest.mark.slow
def test_training_reduces_loss(framework: str) -> None:
    b = load_backend(framework, SPEC, OptimSpec(lr=0.01), dtype="float32", params=_params())
    x = b.put(X)
    losses = [float(b.train_step(x)) for _ in range(200)]
    assert np.mean(losses[-20:]) < np.mean(losses[:20]) - 1.0


@pytest.mark.slow
def test_log_likelihood_k1_is_unbiased_elbo(framework: str) -> None:
    """IWAE with k=1 is an unbiased estimate of the ELBO: compare to the NumPy reference
    ELBO averaged over many examples, within 4 standard errors."""
    spec = MlpSpec(x_dim=12, hidden=(10,), latent=3)
    params = _params(spec)
    x = (np.random.default_rng(1).uniform(size=(2000, 12)) > 0.5).astype(np.float64)
    b = load_backend(framework, spec, dtype="float64", params=params)
    ll1 = b.log_likelihood(x, k=1, seed=3)
    assert ll1.shape == (2000,)
    eps = np.random.default_rng(4).standard_normal((2000, 3))
    elbo = -reference.terms(params, x, eps, spec).loss
    se = np.sqrt(ll1.var() / len(ll1) + elbo.var() / len(elbo))
    assert abs(ll1.mean() - elbo.mean()) < 4 * se
    # more samples tighten the bound, reproducibly from the seed
    ll = b.log_likelihood(x[:200], k=50, seed=3)
    np.testing.assert_array_equal(ll, b.log_likelihood(x[:200], k=50, seed=3))
    assert ll.mean() > ll1[:200].mean()
    ref = reference.iwae(params, x[:200], np.random.default_rng(8).standard_normal((50, 200, 3)), spec)
    assert abs(ll.mean() - ref.mean()) < 4 * np.sqrt(ll.var() / 200 + ref.var() / 200)


def test_version_info(framework: str) -> None:
    b = load_backend(framework, SPEC, dtype="float64")
    v = b.version()
    assert v["framework"] == framework and v["framework_version"]
    assert list(v)[: len(VERSION_KEYS)] == list(VERSION_KEYS)  # the common keys, first, in order
    assert "platform" not in v  # the record's env keeps the OS string under that name
    assert (v["mode"], v["dtype"], v["device_kind"]) == ("eager", "float64", "cpu")
    assert isinstance(v["device"], str) and isinstance(v["device_name"], str)
    assert isinstance(v["device_count"], int) and v["device_count"] >= 1
    assert isinstance(v["threads"], int) and v["threads"] >= 1
    assert isinstance(v["matmul_precision"], str) and v["matmul_precision"]
    assert v["allow_tf32"] is False


def test_version_keys_are_the_same_in_every_framework() -> None:
    common = []
    for fw in FRAMEWORKS:
        v = load_backend(fw, SPEC).version()
        assert "platform" not in v, fw
        common.append({k for k in v if k in VERSION_KEYS})
    assert all(c == set(VERSION_KEYS) for c in common)


# -- the one skeleton ------------------------------------------------------------------------
def test_backend_is_the_shared_skeleton(framework: str) -> None:
    cls = importlib.import_module(f"impls.{framework}.backend").BACKEND
    assert issubclass(cls, BackendBase) and cls.name == framework
    # the public methods live in the base only: a framework supplies primitives
    public = [m for m in vars(BackendBase) if not m.startswith("_") and callable(getattr(BackendBase, m))]
    assert [m for m in public if m in vars(cls) and m != "sync"] == []
    for m in public:
        assert getattr(BackendBase, m).__doc__, f"BackendBase.{m} has no docstring"


def test_base_imports_no_framework() -> None:
    heavy = {*(registry()[f].module for f in FRAMEWORKS), "jaxlib", "optax", "keras"}
    code = f"import sys, impls.base; print(sorted(set({sorted(heavy)!r}) & set(sys.modules)))"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


# -- bad arguments ---------------------------------------------------------------------------
def test_bad_term_raises(framework: str) -> None:
    b = load_backend(framework, SPEC, dtype="float64")
    with pytest.raises(ValueError, match=r"term must be one of loss, recon, kl, got 'elbo'"):
        b.grads(X, EPS, "elbo")  # type: ignore[arg-type]


@pytest.mark.parametrize("k", [0, -3, 2.0, True, "5", None])
def test_bad_k_raises(framework: str, k: Any) -> None:
    b = load_backend(framework, SPEC, dtype="float64")
    with pytest.raises(ValueError, match=r"\bk\b.*int >= 1"):
        b.log_likelihood(X, k, seed=0)


def test_numpy_integer_k_is_fine(framework: str) -> None:
    b = load_backend(framework, SPEC, dtype="float64")
    np.testing.assert_array_equal(b.log_likelihood(X, np.int64(3), seed=1), b.log_likelihood(X, 3, seed=1))


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"dtype": "float8"}, r"dtype: must be one of float32, float64, bfloat16, float16, got 'float8'"),
        ({"device": "tpu"}, r"device: must be one of cpu, gpu, auto, got 'tpu'"),
        ({"mode": "turbo"}, r"mode: must be one of .*, got 'turbo'"),
        ({"threads": -1}, r"threads: must be >= 0, got -1"),
    ],
)
def test_bad_constructor_arguments_raise(framework: str, kwargs: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        load_backend(framework, SPEC, **kwargs)


def test_bad_mode_raises_at_the_backend_too(framework: str) -> None:
    """Built directly (not through load_backend), the class checks the mode itself, and
    accepts the generic alias "compiled"."""
    cls = importlib.import_module(f"impls.{framework}.backend").BACKEND
    other = {"torch": "jit", "tensorflow": "compiled_please", "jax": "xla"}[framework]
    with pytest.raises(ValueError, match=rf"mode: must be one of .*compiled.*, got '{other}'"):
        cls(SPEC, OptimSpec(), RuntimeSpec(mode=other))
    if framework != "torch":  # torch's compiled mode takes ~15 s to compile: not needed here
        assert cls(SPEC, OptimSpec(), RuntimeSpec(mode="compiled")).runtime.mode != "compiled"


def test_set_params_checks_names_and_shapes(framework: str) -> None:
    params = _params()
    b = load_backend(framework, SPEC, dtype="float64", params=params)
    with pytest.raises(ValueError, match=r"missing \['decoder\.2\.bias'\]"):
        b.set_params({k: v for k, v in params.items() if k != "decoder.2.bias"})
    with pytest.raises(ValueError, match=r"unknown \['encoder\.9\.weight'\]"):
        b.set_params({**params, "encoder.9.weight": np.zeros(3)})
    with pytest.raises(ValueError, match=r"'encoder\.0\.weight' has shape \(10, 12\), expected \(12, 10\)"):
        b.set_params({**params, "encoder.0.weight": params["encoder.0.weight"].T})
    for k, v in b.get_params().items():
        np.testing.assert_array_equal(v, params[k])  # nothing was changed


# -- put ---------------------------------------------------------------------------------------
def test_put_casts_numpy_and_checks_tensor_dtypes(framework: str) -> None:
    b32 = load_backend(framework, SPEC, dtype="float32")
    b64 = load_backend(framework, SPEC, dtype="float64")
    x32 = b32.put(X)  # float64 NumPy is cast
    assert np.asarray(x32).dtype == np.float32
    assert b32.put(x32) is x32  # a tensor of our dtype passes as is
    assert np.asarray(b64.put(X.astype(np.int64))).dtype == np.float64  # ints and bools are cast
    assert np.asarray(b64.put(X > 0.5)).dtype == np.float64
    with pytest.raises(ValueError, match=r"dtype float64.*float32"):
        b32.put(b64.put(X))
    with pytest.raises(ValueError, match=r"dtype float32.*float64"):
        b64.train_step(x32)
    with pytest.raises(ValueError, match=r"numeric"):
        b32.put(np.array([["a", "b"]]))
    with pytest.raises(ValueError, match=r"numeric"):
        b32.put(np.array([object()]))
    with pytest.raises(ValueError, match=r"numeric|regular"):
        b32.put([[1.0, 2.0], [3.0]])


# -- IWAE ---------------------------------------------------------------------------------------
def _np_logsumexp(w: np.ndarray) -> np.ndarray:
    m = w.max(axis=0)
    return m + np.log(np.sum(np.exp(w - m), axis=0))


def test_log_likelihood_streams_a_logsumexp_over_chunks(framework: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """k=250: three chunks (100, 100, 50) whose log-weights the backend reduces on the fly;
    the result equals a NumPy log-sum-exp of all 250 weights at once, minus log k."""
    spec = MlpSpec(x_dim=12, hidden=(10,), latent=3)
    b = load_backend(framework, spec, dtype="float64", params=_params(spec))
    chunks: list[np.ndarray] = []
    primitive = b._iwae_log_weights  # type: ignore[attr-defined]

    def record(x: Any, kk: int, rng: Any) -> Any:
        w, rng = primitive(x, kk, rng)
        chunks.append(np.array(w, copy=True))
        return w, rng

    monkeypatch.setattr(b, "_iwae_log_weights", record)
    k = 250
    ll = b.log_likelihood(X, k, seed=11)
    assert [c.shape for c in chunks] == [(IWAE_CHUNK, 6), (IWAE_CHUNK, 6), (50, 6)]
    assert ll.dtype == np.float64 and ll.shape == (6,)
    w = np.concatenate(chunks)
    assert len({c.tobytes() for c in chunks}) == 3  # every chunk draws fresh noise
    np.testing.assert_allclose(ll, _np_logsumexp(w) - math.log(k), rtol=1e-13, atol=0)
    # and the weights are the model's: their mean is a Monte Carlo ELBO close to the reference
    elbo = -reference.terms(_params(spec), X, np.random.default_rng(2).standard_normal((2000, 6, 3)), spec).loss
    assert np.all(np.abs(w.mean(axis=0) - elbo) < 5 * w.std(axis=0) / np.sqrt(k) + 0.05)
    np.testing.assert_array_equal(ll, b.log_likelihood(X, k, seed=11))  # reproducible from the seed


def test_streaming_logsumexp_edge_cases() -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(250, 6)) * 30.0 - 900.0  # exp underflows: needs the running max
    w[:, 1] += 1800.0  # and here it would overflow
    w[:, 2] = -np.inf  # no weight at all
    w[:120, 3] = -np.inf  # the first chunks have none
    w[7, 4] = np.inf
    w[201, 5] = np.nan
    acc = StreamingLogSumExp()
    for start in range(0, 250, 100):
        acc.add(w[start : start + 100])
    got = acc.result()
    finite = [0, 1, 3]
    np.testing.assert_allclose(got[finite], _np_logsumexp(w[:, finite]), rtol=1e-14)
    assert got[2] == -np.inf and got[4] == np.inf and np.isnan(got[5])
    with pytest.raises(ValueError):
        StreamingLogSumExp().result()


# -- IWAE-K gradient and local (per-example q) gradients ----------------------------------------
EPS_IW = RNG.standard_normal((5, 6, 3))


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_iwae_grads_match_numpy_and_finite_differences(framework: str, likelihood: str) -> None:
    """The gradient of -mean_b IWAE_K, float64: equal to the hand-written NumPy backprop and to
    central differences of the NumPy IWAE bound (an independent computation: no gradient code)."""
    spec = MlpSpec(**{**SPEC.__dict__, "likelihood": likelihood, "obs_sigma": 0.7})
    params = _params(spec)
    b = load_backend(framework, spec, dtype="float64", params=params)
    g = b.iwae_grads(X, EPS_IW)
    want = reference.iwae_grads(params, X, EPS_IW, spec)
    assert list(g) == list(spec.param_shapes())
    for k in params:
        assert g[k].shape == params[k].shape
        np.testing.assert_allclose(g[k], want[k], rtol=1e-10, atol=1e-13, err_msg=f"{framework} {k}")
    rng, h = np.random.default_rng(6), 1e-5
    for block in ("encoder", "decoder"):
        d = {k: rng.standard_normal(v.shape) for k, v in params.items() if k.startswith(block)}

        def f(sign: float, d: dict[str, np.ndarray] = d) -> float:
            shifted = {k: v + sign * h * d[k] if k in d else v for k, v in params.items()}
            return float(-reference.iwae(shifted, X, EPS_IW, spec).mean())

        numeric = (f(1) - f(-1)) / (2 * h)
        analytic = sum(float(np.sum(g[k] * d[k])) for k in d)
        assert abs(analytic - numeric) <= 1e-6 * max(abs(numeric), 1e-3), (block, analytic, numeric)


def test_iwae_grads_per_example(framework: str) -> None:
    """per_example=True: one gradient per example (leading batch axis), equal to the NumPy
    per-example backprop and to the batch gradient of that example alone; their mean is the
    batch gradient."""
    params = _params()
    b = load_backend(framework, SPEC, dtype="float64", params=params)
    per = b.iwae_grads(X, EPS_IW, per_example=True)
    batch = b.iwae_grads(X, EPS_IW)
    want = reference.iwae_grads(params, X, EPS_IW, SPEC, per_example=True)
    alone = b.iwae_grads(X[2:3], EPS_IW[:, 2:3])
    for k, shape in SPEC.param_shapes().items():
        assert per[k].shape == (6, *shape)
        np.testing.assert_allclose(per[k], want[k], rtol=1e-10, atol=1e-13, err_msg=k)
        np.testing.assert_allclose(per[k].mean(axis=0), batch[k], rtol=1e-10, atol=1e-13, err_msg=k)
        np.testing.assert_allclose(per[k][2], alone[k], rtol=1e-10, atol=1e-13, err_msg=k)


def test_iwae_grads_honour_freeze_and_stop_gradient(framework: str) -> None:
    params = _params()
    for kw in ({"freeze": "decoder"}, {"freeze": "encoder"}, {"stop_gradient_z": True}):
        spec = MlpSpec(**{**SPEC.__dict__, **kw})
        b = load_backend(framework, spec, dtype="float64", params=params)
        want = reference.iwae_grads(params, X, EPS_IW, spec)
        for per_example in (False, True):
            g = b.iwae_grads(X, EPS_IW, per_example=per_example)
            for k in params:
                got = g[k].mean(axis=0) if per_example else g[k]
                np.testing.assert_allclose(got, want[k], rtol=1e-10, atol=1e-13, err_msg=f"{kw} {k}")
        frozen = kw.get("freeze")
        if frozen:
            assert all(not np.any(v) for k, v in g.items() if k.startswith(str(frozen)))


@pytest.mark.parametrize("shape", [(6, 3), (5, 4, 3), (5, 6, 2), (0, 6, 3)])
def test_iwae_grads_bad_noise_shape_raises(framework: str, shape: tuple[int, ...]) -> None:
    b = load_backend(framework, SPEC, dtype="float64")
    with pytest.raises(ValueError, match=r"eps of shape \(K, 6, 3\)"):
        b.iwae_grads(X, np.zeros(shape))


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_local_grads_match_numpy_and_finite_differences(framework: str, likelihood: str) -> None:
    """Local inference: the terms of a given per-example q and the gradient of each example's
    -ELBO w.r.t. its own (mu, logvar) equal the NumPy reference and central differences of the
    NumPy terms; with the encoder's own (mu, logvar) the terms are those of `terms`."""
    spec = MlpSpec(**{**SPEC.__dict__, "likelihood": likelihood, "obs_sigma": 0.7})
    params = _params(spec)
    b = load_backend(framework, spec, dtype="float64", params=params)
    rng = np.random.default_rng(3)
    mu, logvar = rng.normal(size=(6, 3)), 0.3 * rng.normal(size=(6, 3))
    for eps in (EPS, EPS_K):
        terms, g_mu, g_logvar = b.local_grads(X, mu, logvar, eps)
        want, w_mu, w_logvar = reference.local_grads(params, X, mu, logvar, eps, spec)
        np.testing.assert_allclose(terms.loss, want.loss, rtol=1e-12)
        np.testing.assert_allclose(g_mu, w_mu, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(g_logvar, w_logvar, rtol=1e-10, atol=1e-13)
        h, d, e = 1e-6, rng.standard_normal(mu.shape), rng.standard_normal(mu.shape)

        def f(s: float, d: np.ndarray = d, e: np.ndarray = e, eps: np.ndarray = eps) -> float:
            return float(reference.local_grads(params, X, mu + s * h * d, logvar + s * h * e, eps, spec)[0].loss.sum())

        numeric = (f(1) - f(-1)) / (2 * h)
        assert abs(float(np.sum(g_mu * d) + np.sum(g_logvar * e)) - numeric) <= 1e-6 * max(abs(numeric), 1e-3)
    mu_enc, logvar_enc = reference.encode(params, X, spec)
    np.testing.assert_allclose(b.local_grads(X, mu_enc, logvar_enc, EPS_K)[0].loss, b.terms(X, EPS_K).loss, rtol=1e-12)
    with pytest.raises(ValueError, match="mu of shape"):
        b.local_grads(X, mu[:2], logvar, EPS)


def test_iwae_chunks_are_bounded_by_activation_memory() -> None:
    """log_likelihood's chunk of samples shrinks where the widest activation x the examples
    would exceed IWAE_BUDGET values (the conv VAE on 1,000 test images: 10 samples a chunk, not
    100, which ran TensorFlow out of memory), and stays IWAE_CHUNK for the MLPs."""
    from harness.api import ConvSpec, MlpSpec
    from impls.base import IWAE_BUDGET, IWAE_CHUNK, iwae_chunk

    assert iwae_chunk(MlpSpec(x_dim=64), 1000) == IWAE_CHUNK
    assert iwae_chunk(ConvSpec(), 1000) == 10 and IWAE_BUDGET >= 10 * 1000 * 28 * 28 * 32
    assert iwae_chunk(ConvSpec(), 10**6) == 1  # never 0

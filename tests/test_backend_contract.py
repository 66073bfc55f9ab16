"""The contract every backend meets, checked against independent computations:
NumPy reference loss parts, central finite differences, closed-form optimizer updates."""

from __future__ import annotations

import numpy as np
import pytest

from harness import ModelSpec, OptimSpec, init_params, load_backend, reference
from harness.api import TERMS

FRAMEWORKS = ["torch", "tensorflow", "jax"]
SPEC = ModelSpec(x_dim=12, hidden=(10, 7), latent=3, activation="tanh")
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
    spec = ModelSpec(**{**SPEC.__dict__, "likelihood": likelihood, "obs_sigma": 0.7})
    params = _params(spec)
    b = load_backend(framework, spec, dtype=dtype, params=params)
    for eps in (EPS, EPS_K):
        got, want = b.terms(X, eps), reference.terms(params, X, eps, spec)
        for t in TERMS:
            g, w = getattr(got, t), getattr(want, t)
            assert g.shape == (6,)
            np.testing.assert_allclose(g, w, rtol=tol, atol=0, err_msg=f"{framework} {dtype} {t}")


def test_relu_terms_match_numpy(framework: str) -> None:
    spec = ModelSpec(x_dim=12, hidden=(16,), latent=3, activation="relu")
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
    sg = load_backend(framework, ModelSpec(**{**SPEC.__dict__, "stop_gradient_z": True}), dtype="float64", params=params)
    g = sg.grads(X, EPS, "recon")
    assert all(not np.any(v) for k, v in g.items() if k.startswith("encoder"))
    assert any(np.any(v) for k, v in g.items() if k.startswith("decoder"))
    # the loss value itself is unchanged by the control
    np.testing.assert_allclose(sg.terms(X, EPS).loss, reference.terms(params, X, EPS, SPEC).loss, rtol=1e-12)
    fr = load_backend(framework, ModelSpec(**{**SPEC.__dict__, "freeze": "decoder"}), dtype="float64", params=params)
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


def test_training_reduces_loss(framework: str) -> None:
    b = load_backend(framework, SPEC, OptimSpec(lr=0.01), dtype="float32", params=_params())
    x = b.put(X)
    losses = [float(b.train_step(x)) for _ in range(200)]
    assert np.mean(losses[-20:]) < np.mean(losses[:20]) - 1.0


def test_log_likelihood_k1_is_unbiased_elbo(framework: str) -> None:
    """IWAE with k=1 is an unbiased estimate of the ELBO: compare to the NumPy reference
    ELBO averaged over many examples, within 4 standard errors."""
    spec = ModelSpec(x_dim=12, hidden=(10,), latent=3)
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
    b = load_backend(framework, SPEC)
    v = b.version()
    assert v["framework"] == framework and v["framework_version"]
    assert "device" in v

"""The NumPy reference itself: its hand-written gradients against finite differences of its own
forward pass, its likelihoods against scipy, its optimizers against torch.optim and Keras."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy.special import expit
from scipy.stats import bernoulli, norm

from harness import reference
from harness.api import BLOCKS, TERMS, MlpSpec, ModelSpec, OptimSpec
from harness.models import MODELS

B, K = 5, 3


def make_problem(spec: ModelSpec, k: int, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Random params (nonzero biases), data of the right kind, and eps of shape (B, L) or (k, B, L)."""
    rng = np.random.default_rng(seed)
    params = {n: rng.normal(0.0, 0.5, size=s) for n, s in spec.param_shapes().items()}
    if spec.likelihood == "bernoulli":
        x = (rng.random((B, *spec.input_shape)) < 0.5).astype(np.float64)
    else:
        x = rng.normal(size=(B, *spec.input_shape))
    eps = rng.normal(size=(B, spec.latent) if k == 0 else (k, B, spec.latent))
    return params, x, eps


def mean_term(params: dict[str, np.ndarray], x: np.ndarray, eps: np.ndarray, spec: ModelSpec, term: str) -> float:
    return reference.terms(params, x, eps, spec).means()[term]


def shifted(params: dict[str, np.ndarray], direction: dict[str, np.ndarray], t: float) -> dict[str, np.ndarray]:
    return {n: p + t * direction.get(n, 0.0) for n, p in params.items()}


def small(kind: str, **kw: object) -> ModelSpec:
    """The kind's small example, with an activation only where the kind has one."""
    module = MODELS[kind]
    if not hasattr(module.Spec, "activation"):
        kw.pop("activation", None)
    return module.example(**kw)  # type: ignore[no-any-return]


CASES = [(kind, act) for kind, m in MODELS.items() for act in (("tanh", "relu") if hasattr(m.Spec, "activation") else ("none",))]


@pytest.mark.parametrize("k", [0, K], ids=["eps2d", "eps3d"])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("kind,activation", CASES, ids=[f"{k}-{a}" for k, a in CASES])
def test_grads_match_finite_differences(kind: str, activation: str, likelihood: str, k: int) -> None:
    """The hand-written backward pass of every model kind (dense layers, convolutions,
    transposed convolutions) and of the VAE's terms against central differences of the NumPy
    forward pass."""
    spec = small(kind, activation=activation, likelihood=likelihood)
    params, x, eps = make_problem(spec, k)
    rng = np.random.default_rng(1)
    h = 1e-6

    def check(term: str, direction: dict[str, np.ndarray], analytic: float) -> None:
        if activation == "relu":  # no kink crossed: FD is then as exact as for tanh
            pattern = reference.activation_pattern(params, x, eps, spec)
            for t in (h, -h):
                assert np.array_equal(
                    reference.activation_pattern(shifted(params, direction, t), x, eps, spec), pattern
                )
        fd = (
            mean_term(shifted(params, direction, h), x, eps, spec, term)
            - mean_term(shifted(params, direction, -h), x, eps, spec, term)
        ) / (2 * h)
        np.testing.assert_allclose(analytic, fd, rtol=1e-6, atol=1e-8)

    for term in TERMS:
        g = reference.grads(params, x, eps, spec, term)
        assert set(g) == set(params) and all(g[n].shape == params[n].shape for n in params)
        for block in (*BLOCKS, "all"):  # random directions per block and over everything
            d = {n: rng.normal(size=p.shape) for n, p in params.items() if block == "all" or n.startswith(block + ".")}
            check(term, d, sum(float(np.sum(g[n] * d[n])) for n in d))
        for n, p in params.items():  # single entries of every parameter
            for _ in range(2):
                idx = tuple(int(rng.integers(s)) for s in p.shape)
                e = np.zeros_like(p)
                e[idx] = 1.0
                check(term, {n: e}, float(g[n][idx]))


def test_grad_zero_patterns() -> None:
    spec = MlpSpec(x_dim=6, hidden=(5,), latent=3, activation="tanh")
    params, x, eps = make_problem(spec, 0)
    base = {t: reference.grads(params, x, eps, spec, t) for t in TERMS}
    enc = [n for n in params if n.startswith("encoder.")]
    dec = [n for n in params if n.startswith("decoder.")]
    assert all(np.all(base["kl"][n] == 0) for n in dec)  # kl never reaches the decoder
    assert all(np.any(base[t][n] != 0) for t in ("loss", "recon") for n in params)

    sg = replace(spec, stop_gradient_z=True)
    g_sg = {t: reference.grads(params, x, eps, sg, t) for t in TERMS}
    for n in enc:  # recon does not reach the encoder: only kl is left there
        assert np.all(g_sg["recon"][n] == 0)
        np.testing.assert_allclose(g_sg["loss"][n], base["kl"][n], rtol=1e-14, atol=1e-15)
    for n in dec:
        np.testing.assert_allclose(g_sg["loss"][n], base["loss"][n], rtol=1e-14, atol=1e-15)

    for frozen in BLOCKS:
        fr = replace(spec, freeze=frozen)  # type: ignore[arg-type]
        for t in TERMS:
            g = reference.grads(params, x, eps, fr, t)
            for n in params:
                if n.startswith(frozen + "."):
                    assert np.all(g[n] == 0)
                else:  # the other block's gradient is unchanged (it still flows through a frozen decoder)
                    np.testing.assert_array_equal(g[n], base[t][n])


def test_relu_derivative_at_zero_is_zero() -> None:
    spec = MlpSpec(x_dim=4, hidden=(3,), latent=2, activation="relu")
    params, _, eps = make_problem(spec, 0)
    params["encoder.0.bias"][:] = 0.0
    x = np.zeros((B, spec.x_dim))  # every first-layer pre-activation is exactly 0
    g = reference.grads(params, x, eps, spec, "loss")
    assert np.all(g["encoder.0.bias"] == 0) and np.all(g["encoder.0.weight"] == 0)
    assert np.any(g["encoder.1.bias"] != 0)


def test_unknown_term_rejected() -> None:
    spec = MlpSpec(x_dim=4, hidden=(3,), latent=2)
    params, x, eps = make_problem(spec, 0)
    with pytest.raises(ValueError):
        reference.grads(params, x, eps, spec, "elbo")


def test_log_likelihoods_against_scipy() -> None:
    rng = np.random.default_rng(0)
    x = (rng.random((7, 10)) < 0.4).astype(np.float64)
    logits = rng.uniform(-6.0, 6.0, size=(7, 10))
    want = bernoulli.logpmf(x, expit(logits)).sum(axis=-1)
    got = reference.log_px_given_z(logits, x, MlpSpec(likelihood="bernoulli"))
    np.testing.assert_allclose(got, want, rtol=1e-10)

    xg, mean = rng.normal(size=(7, 10)), rng.normal(size=(7, 10))
    got = reference.log_px_given_z(mean, xg, MlpSpec(likelihood="gaussian", obs_sigma=0.3))
    np.testing.assert_allclose(got, norm.logpdf(xg, loc=mean, scale=0.3).sum(axis=-1), rtol=1e-12)


# -- optimizers ---------------------------------------------------------------------------

SHAPES = {"encoder.0.weight": (3, 4), "encoder.0.bias": (4,)}
ADAM = OptimSpec(name="adam", lr=0.05, beta1=0.8, beta2=0.95, eps=1e-3)  # eps large: conventions differ


def grad_sequence(n: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(2)
    return [{k: rng.normal(0.0, 1e-2, size=s) for k, s in SHAPES.items()} for _ in range(n)]


def run_reference(optim: OptimSpec, convention: str = "standard") -> list[tuple[dict, dict]]:
    params = {k: np.random.default_rng(3).normal(size=s) for k, s in SHAPES.items()}
    state = reference.init_state(params, optim)
    out = []
    for g in grad_sequence():
        params, state = reference.optimizer_step(params, state, g, optim, convention)
        out.append((params, state))
    return out


def test_init_state_layout() -> None:
    params = {k: np.ones(s) for k, s in SHAPES.items()}
    st = reference.init_state(params, ADAM)
    assert st["adam.step"].shape == () and st["adam.step"].dtype == np.int64 and int(st["adam.step"]) == 0
    assert set(st) == {"adam.step", *(f"adam.{mv}.{k}" for mv in "mv" for k in SHAPES)}
    assert set(reference.init_state(params, OptimSpec(name="sgd", momentum=0.9))) == {
        f"sgd.momentum.{k}" for k in SHAPES
    }
    assert reference.init_state(params, OptimSpec(name="sgd")) == {}


@pytest.mark.parametrize(
    "optim",
    [ADAM, OptimSpec(name="sgd", lr=0.1, momentum=0.9), OptimSpec(name="sgd", lr=0.1)],
    ids=["adam", "sgd_momentum", "sgd"],
)
def test_optimizer_step_matches_torch(optim: OptimSpec) -> None:
    torch = pytest.importorskip("torch")
    ps = [
        torch.tensor(np.random.default_rng(3).normal(size=s), dtype=torch.float64, requires_grad=True)
        for s in SHAPES.values()
    ]
    if optim.name == "adam":
        opt = torch.optim.Adam(ps, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, foreach=False)
    else:
        opt = torch.optim.SGD(ps, lr=optim.lr, momentum=optim.momentum, foreach=False)
    for g, (want_p, want_s) in zip(grad_sequence(), run_reference(optim)):
        for p, k in zip(ps, SHAPES):
            p.grad = torch.tensor(g[k], dtype=torch.float64)
        opt.step()
        for p, k in zip(ps, SHAPES):
            np.testing.assert_allclose(p.detach().numpy(), want_p[k], rtol=1e-12, atol=1e-15)
            st = opt.state[p]
            if optim.name == "adam":
                assert float(st["step"]) == int(want_s["adam.step"])
                np.testing.assert_allclose(st["exp_avg"].numpy(), want_s[f"adam.m.{k}"], rtol=1e-12)
                np.testing.assert_allclose(st["exp_avg_sq"].numpy(), want_s[f"adam.v.{k}"], rtol=1e-12)
            elif optim.momentum > 0:
                np.testing.assert_allclose(st["momentum_buffer"].numpy(), want_s[f"sgd.momentum.{k}"], rtol=1e-12)


@pytest.mark.parametrize("optim", [ADAM, OptimSpec(name="sgd", lr=0.1, momentum=0.9)], ids=["adam", "sgd_momentum"])
def test_optimizer_step_matches_keras(optim: OptimSpec) -> None:
    tf = pytest.importorskip("tensorflow")
    f64 = tf.float64
    vs = [tf.Variable(np.random.default_rng(3).normal(size=s), dtype=f64) for s in SHAPES.values()]

    def lr() -> object:  # a float would become a float32 Keras variable
        return tf.constant(optim.lr, dtype=f64)

    if optim.name == "adam":
        opt = tf.keras.optimizers.Adam(
            learning_rate=lr,
            beta_1=tf.constant(optim.beta1, dtype=f64),
            beta_2=tf.constant(optim.beta2, dtype=f64),
            epsilon=tf.constant(optim.eps, dtype=f64),
        )
    else:
        opt = tf.keras.optimizers.SGD(learning_rate=lr, momentum=np.float64(optim.momentum))
    keras_conv, standard = run_reference(optim, "keras"), run_reference(optim)
    for g, (want_p, _), (std_p, _) in zip(grad_sequence(), keras_conv, standard):
        opt.apply([tf.constant(g[k], dtype=f64) for k in SHAPES], vs)
        for v, k in zip(vs, SHAPES):
            np.testing.assert_allclose(v.numpy(), want_p[k], rtol=1e-12, atol=1e-15)
            if optim.name == "adam":  # the test can tell the conventions apart
                assert np.max(np.abs(want_p[k] - std_p[k])) > 1e-6

"""The gaps measure: the closed-form best diagonal Gaussian against numerical minimisation, the
gap identities through every backend, the local optimiser against the closed form, and the
measure end to end with a small trained MLP."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.optimize import minimize

from harness import MlpSpec, ModelSpec, load_backend, reference
from harness import lingauss as lg
from harness.initializers import init_params
from harness.job import Job
from harness.measures import gaps
from tests.conftest import FRAMEWORKS, each_framework, make_config


def _linear(seed: int = 0, x_dim: int = 5, latent: int = 3, sigma: float = 0.6) -> tuple[ModelSpec, dict[str, np.ndarray], np.ndarray]:
    spec = MlpSpec(x_dim=x_dim, hidden=(), latent=latent, likelihood="gaussian", obs_sigma=sigma)
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(0, 0.7, s) for k, s in spec.param_shapes().items()}
    return spec, params, rng.normal(size=(7, x_dim))


def test_best_diagonal_gaussian_minimises_kl() -> None:
    """q* (posterior mean, variances 1/diag(Lambda)) against a numerical minimisation of
    KL(q || p(z|x)) over diagonal Gaussians with the general KL formula; its KL is the closed-form
    approximation gap, for every example."""
    spec, params, x = _linear()
    s, L = spec.obs_sigma, spec.latent
    m_star, v_star = lg.best_diagonal(params, x, s)
    m, S = lg.posterior(params, x, s)
    gap = lg.approximation_gap(params, s)
    for n in range(3):

        def kl(v: np.ndarray, n: int = n) -> float:
            return float(lg.kl_diag_gaussians_to_posterior(v[None, :L], np.exp(v[None, L:]), m[n : n + 1], S)[0])

        res = minimize(kl, np.zeros(2 * L), method="BFGS", options={"gtol": 1e-11})
        np.testing.assert_allclose(res.x[:L], m_star[n], atol=1e-6)
        np.testing.assert_allclose(np.exp(res.x[L:]), v_star, atol=1e-6)
        assert res.fun == pytest.approx(gap, abs=1e-10)
    general = lg.kl_diag_gaussians_to_posterior(m_star, v_star, m, S)
    np.testing.assert_allclose(general, gap, rtol=1e-12)
    # the encoder's own q: the general formula is identity.kl_to_posterior, and it is never below q*'s
    mu, var = lg.q_params(params, x, L)
    kl_q = lg.kl_diag_gaussians_to_posterior(mu, var, m, S)
    np.testing.assert_allclose(kl_q, lg.kl_to_posterior(params, x, s, L), rtol=1e-12)
    assert np.all(kl_q >= gap)


def test_approximation_gap_vanishes_for_a_diagonal_posterior() -> None:
    """Orthogonal decoder rows: the posterior is diagonal, so the Gaussian family is exact."""
    spec = MlpSpec(x_dim=6, hidden=(), latent=2, likelihood="gaussian", obs_sigma=0.5)
    p = lg.orthogonal_decoder_params(spec, 0)
    assert abs(lg.approximation_gap(p, 0.5)) < 1e-14
    _, params, _ = _linear()
    assert lg.approximation_gap(params, 0.6) > 1e-3


@pytest.mark.parametrize("framework", each_framework(slow=["jax"]))  # jax: eager steps ~6 s
def test_linear_gaps_close_in_every_framework(framework: str) -> None:
    """The linear part in float64: both gaps sum to log p(x) - ELBO within 1e-9 per example
    (random and trained encoder), each gap equals its own backend difference, and the local
    optimiser with the backend's gradients finds the closed-form q*."""
    c = make_config(measure={"gaps": {"n_examples": 16, "n_train": 200, "train_steps": 30, "trained": False}})
    res = gaps.run(c, Job("r", "gaps", framework, "eager", {}, "/nonexistent/r.json"))
    for name in ("random", "trained"):
        p = res.metrics["linear"][name]
        assert all(p["checks"].values()), (name, p["checks"])
        assert max(p["residual_sum_max"], p["residual_approx_max"], p["residual_amort_max"]) <= 1e-9
        assert p["approximation_gap"] > 0 and p["amortization_gap_min"] >= 0
    # training shrinks the amortization gap (the encoder learns the posterior mean)
    assert res.metrics["linear"]["trained"]["amortization_gap"] < res.metrics["linear"]["random"]["amortization_gap"]


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_local_optimiser_on_an_mlp_improves_every_example(framework: str) -> None:
    """Bernoulli MLP with fixed noise: L-BFGS with the backend's per-example gradients raises
    every example's ELBO on that noise and stops where the gradient vanishes; the gradient of
    the returned optimum, from the NumPy reference, is ~0."""
    spec = MlpSpec(x_dim=12, hidden=(10,), latent=3, activation="tanh")
    params = {k: v + 0.1 for k, v in init_params(spec, 1).items()}
    x = (np.random.default_rng(0).uniform(size=(5, 12)) > 0.5).astype(np.float64)
    eps = np.random.default_rng(1).standard_normal((8, 5, 3))
    b = load_backend(framework, spec, dtype="float64", params=params)
    mu0, logvar0 = reference.encode(params, x, spec)
    out = gaps.local_optimum(b, x, mu0, logvar0, eps, max_iter=500)
    before = reference.local_grads(params, x, mu0, logvar0, eps, spec)[0].loss
    after, g_mu, g_logvar = reference.local_grads(params, x, out["mu"], out["logvar"], eps, spec)
    assert out["converged"] and np.all(after.loss < before)
    assert max(np.abs(g_mu).max(), np.abs(g_logvar).max()) < 1e-5


def _record(m: dict[str, Any], framework: str = "torch") -> dict[str, Any]:
    return {"framework": framework, "mode": "eager", "status": "ok", "error": None, "metrics": json.loads(json.dumps(m, default=lambda o: o.tolist()))}


def test_measure_end_to_end_small(tmp_path: Path) -> None:
    """Linear part and a tiny trained MLP (torch): the sanity checks hold, the record is
    JSON-able, the summary has a row per part and an empty row for a failed job, the plot is drawn."""
    c = make_config(
        measure={"gaps": {"n_examples": 8, "n_train": 100, "train_steps": 50, "epochs": 2, "n_test": 12, "iwae_k": 200,
                          "elbo_samples": 100, "local_samples": 20}},
        model={"hidden": [32], "latent": 4},
    )
    res = gaps.run(c, Job("r", "gaps", "torch", "eager", {}, str(tmp_path / "r.json")))
    t = res.metrics["trained"]
    assert all(t["checks"].values()), t["checks"]
    assert t["total_gap"] == pytest.approx(t["approximation_gap"] + t["amortization_gap"], rel=1e-12)
    assert t["elbo_star"] > t["elbo"]  # each example's own q beats the shared encoder's
    rec = _record(res.metrics)
    failed = {"framework": "jax", "mode": "eager", "status": "failed", "error": "timeout", "metrics": {}}
    s = gaps.summarize([rec, failed])
    assert [r["framework"] for r in s.rows] == ["torch"] * 3 + ["jax"] and not s.ok
    assert s.rows[-1]["approximation gap"] == "-"
    assert gaps.plot_gaps([rec, failed], tmp_path / "g.png") is not None
    assert gaps.plot_gaps([failed], tmp_path / "h.png") is None
    assert gaps.answer([rec]).startswith("checks pass")
    q = gaps.compared([rec, failed])
    assert q["torch/eager linear random approximation_gap"].rule == "rel" and all(
        v.value is True for k, v in q.items() if v.rule == "same")


def test_partial_metrics_never_crash(tmp_path: Path) -> None:
    """A killed job's record (every other key kept, ok or failed status): summary, plot and
    answer still come out."""
    c = make_config(measure={"gaps": {"n_examples": 4, "n_train": 20, "train_steps": 5, "trained": False}})
    m = json.loads(json.dumps(gaps.run(c, Job("r", "gaps", "torch", "eager", {}, str(tmp_path / "r.json"))).metrics,
                              default=lambda o: o.tolist()))

    def every_other(d: Any, parity: int, depth: int = 0) -> Any:
        if not isinstance(d, dict) or depth > 3:
            return d
        return {k: every_other(v, parity, depth + 1) for i, (k, v) in enumerate(d.items()) if i % 2 == parity or depth == 0}

    for status, parity in (("ok", 0), ("ok", 1), ("failed", 0)):
        rec = {"framework": "torch", "mode": "eager", "status": status, "error": None, "metrics": every_other(m, parity)}
        gaps.summarize([rec])
        gaps.answer([rec])
        gaps.plot_gaps([rec], tmp_path / "p.png")

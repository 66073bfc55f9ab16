"""The ELBO identity: closed forms checked by brute-force integration, and the measure in all
three frameworks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import integrate
from scipy.stats import norm

from harness import MlpSpec, reference
from harness import lingauss as lg
from harness.config import AppConfig
from harness.measures import identity as idm
from harness.worker import Job
from tests.conftest import FRAMEWORKS, make_config


def _tiny(seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray, float]:
    rng = np.random.default_rng(seed)
    params = {
        "encoder.0.weight": rng.normal(0, 0.5, (2, 2)),
        "encoder.0.bias": rng.normal(0, 0.3, 2),
        "decoder.0.weight": rng.normal(0, 1.0, (1, 2)),
        "decoder.0.bias": rng.normal(0, 0.5, 2),
    }
    return params, rng.normal(0, 1.0, (3, 2)), 0.6


def test_closed_forms_match_numerical_integration_over_1d_latent() -> None:
    params, x, s = _tiny()
    W, c = params["decoder.0.weight"][0], params["decoder.0.bias"]
    mu, var = lg.q_params(params, x, 1)
    lp, el, gap = lg.log_px(params, x, s), lg.elbo(params, x, s, 1), lg.kl_to_posterior(params, x, s, 1)
    m, S = lg.posterior(params, x, s)
    for n in range(len(x)):

        def log_joint(z: float, n: int = n) -> float:
            return float(np.sum(norm.logpdf(x[n], z * W + c, s)) + norm.logpdf(z))

        px = integrate.quad(lambda z: math.exp(log_joint(z)), -12, 12, epsabs=0, epsrel=1e-12, limit=200)[0]
        assert lp[n] == pytest.approx(math.log(px), rel=1e-9)
        pm = integrate.quad(lambda z: z * math.exp(log_joint(z)) / px, -12, 12, epsrel=1e-11, limit=200)[0]
        pv = integrate.quad(lambda z: (z - pm) ** 2 * math.exp(log_joint(z)) / px, -12, 12, epsrel=1e-11, limit=200)[0]
        assert m[n, 0] == pytest.approx(pm, rel=1e-8, abs=1e-10) and S[0, 0] == pytest.approx(pv, rel=1e-8)
        q = norm(mu[n, 0], math.sqrt(var[n, 0]))
        lo, hi = mu[n, 0] - 12 * q.std(), mu[n, 0] + 12 * q.std()
        elbo_num = integrate.quad(lambda z: q.pdf(z) * (log_joint(z) - q.logpdf(z)), lo, hi, epsrel=1e-12, limit=200)[0]
        assert el[n] == pytest.approx(elbo_num, rel=1e-9)
        kl_num = integrate.quad(lambda z: q.pdf(z) * (q.logpdf(z) - (log_joint(z) - math.log(px))), lo, hi, epsrel=1e-12, limit=200)[0]
        assert gap[n] == pytest.approx(kl_num, rel=1e-7, abs=1e-10)
    np.testing.assert_allclose(lp, el + gap, rtol=1e-12)  # the identity, in closed form


def test_sigma_points_give_the_exact_expectation() -> None:
    spec = MlpSpec(x_dim=5, hidden=(), latent=3, likelihood="gaussian", obs_sigma=0.4)
    rng = np.random.default_rng(2)
    params = {k: rng.normal(0, 0.5, s) for k, s in spec.param_shapes().items()}
    x = rng.normal(size=(7, 5))
    eps = lg.sigma_points(3, 7)
    assert eps.shape == (6, 7, 3)
    np.testing.assert_allclose(-reference.terms(params, x, eps, spec).loss, lg.elbo(params, x, 0.4, 3), rtol=1e-12)


def test_orthogonal_decoder_posterior_is_exact() -> None:
    spec = MlpSpec(x_dim=6, hidden=(), latent=2, likelihood="gaussian", obs_sigma=0.5)
    p = lg.orthogonal_decoder_params(spec, 0)
    W = p["decoder.0.weight"]
    G = W @ W.T
    assert abs(G[0, 1]) < 1e-12 and G[0, 0] != pytest.approx(G[1, 1])
    x = np.random.default_rng(1).normal(size=(9, 6))
    assert np.max(np.abs(lg.kl_to_posterior(p, x, 0.5, 2))) < 1e-12
    np.testing.assert_allclose(lg.elbo(p, x, 0.5, 2), lg.log_px(p, x, 0.5), rtol=1e-12)


def _config(**identity: object) -> AppConfig:
    return make_config(measure={"identity": identity})


@pytest.mark.slow
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_identity_measure(framework: str, tmp_path: Path) -> None:
    c = _config(mc_samples=500, iwae_ks=[1, 10, 100, 1000])
    res = idm.run(c, Job("r", "identity", framework, "eager", {}, str(tmp_path / "r.json")))
    m = res.metrics
    assert res.status == "ok"
    assert m["residual_max"] <= 1e-9
    assert m["gap_min"] > 0.1  # a generic encoder: the gap is real, and the identity still closes
    assert m["elbo_numpy_vs_backend_max"] <= 1e-9
    assert all(m["checks"].values()), m["checks"]
    ks = [r["iwae"] for r in m["iwae"]]
    assert ks[-1] > ks[0] and ks[-1] < m["log_px_mean"]
    assert abs(m["ortho_elbo_minus_log_px_max"]) <= 1e-9


def test_identity_check_fails_when_the_backend_elbo_is_wrong(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The residual check can fail: shift the backend's ELBO by 1e-6 and it must."""
    real = idm.backend_elbo
    monkeypatch.setattr(idm, "backend_elbo", lambda b, x, latent: real(b, x, latent) + 1e-6)
    res = idm.run(_config(mc_samples=50, iwae_ks=[1, 10]), Job("r", "identity", "torch", "eager", {}, str(tmp_path / "r.json")))
    assert not res.metrics["checks"]["identity residual"]
    summary = idm.summarize([{"framework": "torch", "mode": "eager", "status": "ok", "error": None, "metrics": res.metrics}])
    assert not summary.ok

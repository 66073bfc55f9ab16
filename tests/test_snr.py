"""The SNR measure: the estimator on synthetic draws with known SNR, the toy's mapping to the
canonical linear VAE, the measured SNR at K=1 against its closed form (all frameworks), the
slope fit, and the measure end to end with few draws and small K."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harness import lingauss as lg
from harness import load_backend
from harness.config import ConfigError
from harness.job import Job
from harness.measures import snr
from tests.conftest import FRAMEWORKS, each_framework, make_config


def _moments(draws: np.ndarray, groups: int = 20, batch: int = 250) -> snr.DrawMoments:
    m = snr.DrawMoments(groups)
    for i in range(0, len(draws), batch):
        m.add(draws[i : i + batch])
    return m


def test_bias_corrected_snr_matches_known_snr() -> None:
    """Draws N(mu_p, s_p^2) with known SNR mu_p/s_p: the block statistic estimates the mean
    squared SNR without the +1/n bias of the naive estimator, within its jackknife SE."""
    rng = np.random.default_rng(0)
    P, n = 60, 3000
    s = rng.uniform(0.5, 3.0, P)
    rho = rng.uniform(0.0, 0.15, P)
    draws = rho * s + s * rng.standard_normal((n, P))
    st = snr.block_statistics(_moments(draws))
    want = float(np.mean(rho**2))
    assert abs(st["t"] - want) <= 4 * st["t_se"] + 1e-12, (st["t"], want, st["t_se"])
    naive = float(np.mean(draws.mean(0) ** 2 / draws.var(0, ddof=1)))
    assert naive - st["t"] == pytest.approx(1.0 / n, rel=1e-9)  # the naive estimator's bias is 1/n
    offset = snr.block_statistics(_moments(draws + 1e6))  # a large offset: only the means change,
    assert offset["floor"] == pytest.approx(st["floor"], rel=1e-6)  # the variances stay exact (shifted sums)


def test_noise_floor_on_pure_noise() -> None:
    """Zero-mean draws: the bias-corrected statistic is within a few null spreads of zero, and
    the floor sqrt(2 * spread) matches its independent-coordinate value sqrt(2 sqrt(2/P) / n)."""
    rng = np.random.default_rng(1)
    P, n = 80, 2000
    st = snr.block_statistics(_moments(rng.standard_normal((n, P)) * rng.uniform(0.1, 10, P)))
    theory = math.sqrt(2.0 * math.sqrt(2.0 / P) / n)
    assert st["floor"] == pytest.approx(theory, rel=0.35)
    assert abs(st["t"]) <= 3 * (st["floor"] ** 2 / 2)
    assert st["naive_floor"] == pytest.approx(1 / math.sqrt(n))
    # and a signal 3x the floor is resolved
    sig = snr.block_statistics(_moments(3 * st["floor"] + rng.standard_normal((n, P))))
    assert sig["snr"] == pytest.approx(3 * st["floor"], rel=0.25)


def test_fit_slope_recovers_a_power_law() -> None:
    """Draws whose SNR is 0.4 * K^-0.5: the fitted slope is within 3 jackknife SEs of -0.5 with
    a narrow interval; a K with no signal (below the floor) is left out of the fit."""
    rng = np.random.default_rng(2)
    ks, stats = [1, 3, 10, 30, 300], []
    for K in ks:
        rho = 0.4 * K**-0.5 if K < 300 else 0.0
        stats.append(snr.block_statistics(_moments(rho + rng.standard_normal((2000, 40)))))
    fit = snr.fit_slope(ks, stats, floor_ratio=3.0, groups=20)
    assert fit["resolved"] == [True] * 4 + [False] and fit["fit_ks"] == [1, 3, 10, 30]
    lo, hi = fit["slope_ci"]
    assert abs(fit["slope"] + 0.5) <= 3 * fit["slope_se"] and hi - lo < 0.2, fit
    assert snr.fit_slope(ks[:1] + ks[-1:], stats[:1] + stats[-1:], 3.0, 20)["slope"] is None  # one resolved K: no fit


def test_toy_at_perturb_zero_is_the_optimum() -> None:
    """perturb=0: the encoder's mean is the exact posterior mean (x - mu)/2 in the canonical
    (shifted) latent, its variance is the fixed 2/3 (posterior: 1/2), W = I, c = mu."""
    spec, params, x = lg.rainforth_toy(6, 0.0, 5, seed=3)
    mu_q, var_q = lg.q_params(params, x, 6)
    m, S = lg.posterior(params, x, 1.0)
    np.testing.assert_allclose(mu_q, m, atol=1e-14)
    np.testing.assert_allclose(var_q, 2.0 / 3.0, rtol=1e-14)
    np.testing.assert_allclose(S, np.eye(6) / 2.0, atol=1e-15)
    np.testing.assert_allclose(mu_q, (x - params["decoder.0.bias"]) / 2.0, atol=1e-14)
    sel = snr.block_selection(spec, fixed_logvar=True)
    assert snr.block_sizes(spec, sel) == {"decoder": 6 * 6 + 6, "encoder": 6 * 6 + 6}  # log-variance part left out


def _closed_form_t(params: dict[str, np.ndarray], x: np.ndarray, L: int) -> dict[str, float]:
    """Mean squared SNR at K=1 of the gradient of -IWAE_1 w.r.t. the decoder bias c and the
    encoder's mean bias: both linear in the noise. g_c = -(x - c - zW)/s^2; g_m = -(x - c)W^T
    + z (W W^T + I) (s = 1), z = m + sd * eps."""
    W, c = params["decoder.0.weight"], params["decoder.0.bias"]
    m, var = lg.q_params(params, x, L)
    M = W @ W.T + np.eye(L)
    mean_c, var_c = -(x - c - m @ W), var @ W**2
    mean_m, var_m = -(x - c) @ W.T + m @ M, var @ M**2
    return {"decoder": float(np.mean(mean_c**2 / var_c)), "encoder": float(np.mean(mean_m**2 / var_m))}


@pytest.mark.parametrize("framework", each_framework(slow=["tensorflow"]))  # tensorflow: ~5 s of pfor tracing
def test_snr_at_k1_matches_closed_form(framework: str) -> None:
    """The measure's pipeline (backend per-example gradients, moments, bias correction) on the
    biases of the linear toy at K=1, against the closed-form SNR."""
    L = 5
    spec, params, x = lg.rainforth_toy(L, 0.3, 2, seed=4)
    b = load_backend(framework, spec, dtype="float64", params=params)
    sel: snr.Selection = {"decoder": [("decoder.0.bias", snr._all)], "encoder": [("encoder.0.bias", lambda g: g[..., :L])]}
    drawn = snr.draw_statistics(b, x, [1], 4000, 0, sel, groups=20, seed=0, tag=1, chunk_samples=2000, chunk_values=10**6)
    want = _closed_form_t(params, x, L)
    for blk in ("decoder", "encoder"):
        st = drawn["per_k"][0]["stats"][blk]
        assert st["n"] == 4000
        assert abs(st["t"] - want[blk]) <= 4 * st["t_se"], (blk, st["t"], want[blk], st["t_se"])


def _small(**kw: Any) -> Any:
    base = {"ks": [1, 10], "draws": 100, "samples": 0, "dim": 6, "groups": 10, "min_decades": 0.5,
            "trained_epochs": 1, "trained_ks": [1, 3], "trained_draws": 40, "trained_points": 1}
    return make_config(measure={"snr": {**base, **kw}}, model={"hidden": [16], "latent": 3})


def test_validate_rejects_bad_settings() -> None:
    with pytest.raises(ConfigError, match="measure.snr.ks"):
        snr.validate(_small(ks=[10, 10]))
    with pytest.raises(ConfigError, match="measure.snr.draws"):
        snr.validate(_small(draws=5))


def test_measure_runs_and_summarizes(tmp_path: Path) -> None:
    """End to end with few draws (torch): the record's metrics are JSON-able, the summary and
    both plots are built from them, a failed record gives an empty row."""
    c = _small()
    snr.validate(c)
    res = snr.run(c, Job("r", "snr", "torch", "eager", {}, str(tmp_path / "r.json")))
    m = json.loads(json.dumps(res.metrics))
    for part in ("toy", "trained"):
        for blk in ("decoder", "encoder"):
            r = m[part]["blocks"][blk]
            assert len(r["snr"]) == 2 and len(r["floor"]) == 2 and r["theory"] == snr.THEORY[blk]
    assert m["toy"]["draws"] == [100, 100]
    rec = {"framework": "torch", "mode": "eager", "status": "ok", "error": None, "metrics": m}
    failed = {"framework": "jax", "mode": "eager", "status": "failed", "error": "killed", "metrics": {}}
    s = snr.summarize([rec, failed])
    assert not s.ok and len(s.rows) == 3
    assert s.rows[-1]["framework"] == "jax" and s.rows[-1]["decoder slope [95% CI] (fitted K)"] == "-"
    assert snr.plot_toy([rec], tmp_path / "a.png") == tmp_path / "a.png" and (tmp_path / "a.png").stat().st_size > 0
    assert snr.plot_trained([rec, failed], tmp_path / "b.png") is not None
    assert snr.plot_toy([failed], tmp_path / "c.png") is None
    assert snr.summarize([failed]).rows[0]["status"] == "failed"
    assert snr.answer([rec, failed]).startswith("NO")
    q = snr.compared([rec, failed])
    assert q["torch/eager toy decoder slope"].rule == "abs" and q["torch/eager trained encoder slope"].rule == "info"


@pytest.mark.slow
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_toy_decoder_slope_is_one_half(framework: str, tmp_path: Path) -> None:
    """Few draws suffice for the decoder (its SNR is large): slope +0.5 ± 0.1 over K = 1..100;
    the three frameworks see the same harness noise, so their numbers agree to rounding."""
    c = make_config(measure={"snr": {"ks": [1, 10, 100], "draws": 600, "samples": 0, "trained": False}})
    res = snr.run(c, Job("r", "snr", framework, "eager", {}, str(tmp_path / "r.json")))
    dec = res.metrics["toy"]["blocks"]["decoder"]
    assert dec["fit_ks"] == [1, 10, 100]
    assert abs(dec["slope"] - 0.5) <= 0.1, dec["slope"]
    assert dec["min_floor_ratio"] >= 3


def _every_other(d: Any, parity: int, depth: int = 0) -> Any:
    """A record's metrics as a killed job may leave them: every other key dropped, three levels deep."""
    if not isinstance(d, dict) or depth > 3:
        return d
    return {k: _every_other(v, parity, depth + 1) for i, (k, v) in enumerate(d.items()) if i % 2 == parity or depth == 0}


def test_partial_metrics_never_crash(tmp_path: Path) -> None:
    c = _small(trained=False)
    m = json.loads(json.dumps(snr.run(c, Job("r", "snr", "torch", "eager", {}, str(tmp_path / "r.json"))).metrics))
    for status, parity in (("ok", 0), ("ok", 1), ("failed", 0)):
        rec = {"framework": "torch", "mode": "eager", "status": status, "error": None, "metrics": _every_other(m, parity)}
        snr.summarize([rec])
        snr.answer([rec])
        for fn in snr.PLOTS.values():
            fn([rec], tmp_path / "p.png")

"""The convergence measure: pPCA closed form against numerical optimisation, collapse
diagnostics on a hand-made case, the time-to-target rule and seed aggregation on synthetic
records, lockstep and divergence on real backends, and a summary that survives failures."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.optimize import minimize

from harness import ppca
from harness.api import LinearSpec
from harness.config import AppConfig, validate
from harness.frameworks import registry
from harness.job import Job
from harness.lingauss import elbo, kl_to_posterior, log_px
from harness.measures import convergence as cv
from harness.schema import ConfigError
from tests.conftest import FRAMEWORKS, ROOT, make_config

# --- pPCA with fixed sigma -------------------------------------------------------------------


def _data(sigma_signal: tuple[float, ...], n: int = 80, d: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(d, d)))
    z = rng.normal(size=(n, d)) * np.array(sigma_signal)
    return z @ basis.T + 0.3


def _numerical_max(x: np.ndarray, latent: int, sigma: float, starts: int = 4) -> tuple[float, np.ndarray]:
    """Maximise the exact mean log-likelihood over W and c by BFGS from several starts."""
    d = x.shape[1]
    rng = np.random.default_rng(1)

    def neg(theta: np.ndarray) -> float:
        p = {"decoder.0.weight": theta[: latent * d].reshape(latent, d), "decoder.0.bias": theta[latent * d :]}
        return -float(log_px(p, x, sigma).mean())

    best = min((minimize(neg, rng.normal(size=latent * d + d), method="BFGS", options={"gtol": 1e-10}) for _ in range(starts)),
               key=lambda r: r.fun)
    W = best.x[: latent * d].reshape(latent, d)
    return -float(best.fun), W.T @ W


@pytest.mark.parametrize(("signal", "sigma", "kept"), [((2.0, 1.2, 0.3), 0.5, 2), ((2.0, 0.4, 0.3), 0.7, 1)])
def test_ppca_closed_form_is_the_numerical_maximum(signal: tuple[float, ...], sigma: float, kept: int) -> None:
    """Second case: the second eigenvalue is below sigma^2, so its column is clipped to zero."""
    x = _data(signal)
    fit = ppca.fit(x, 2, sigma)
    assert int(np.sum(fit.eigenvalues[:2] > sigma**2)) == kept
    assert np.count_nonzero(np.linalg.norm(fit.W, axis=1) > 0) == kept
    value, cov = _numerical_max(x, 2, sigma)
    assert fit.train_log_px == pytest.approx(value, rel=1e-9, abs=1e-9)
    np.testing.assert_allclose(fit.W.T @ fit.W, cov, atol=1e-5)  # W is identified up to rotation
    params = fit.params()
    np.testing.assert_allclose(log_px(params, x, sigma).mean(), fit.train_log_px, rtol=1e-12)
    # the ELBO's optimum coincides: with the exact-posterior encoder the bound is tight
    np.testing.assert_allclose(elbo(params, x, sigma, 2), log_px(params, x, sigma), rtol=1e-12)
    assert np.max(np.abs(kl_to_posterior(params, x, sigma, 2))) < 1e-12


# --- pure pieces ------------------------------------------------------------------------------


def test_collapse_diagnostics_on_a_hand_made_case() -> None:
    mu = np.array([[1.0, 0.5, 0.0], [-1.0, 0.5, 0.1], [1.0, 0.5, 0.0], [-1.0, 0.5, 0.1]])  # activities 1, 0, 0.0025
    logvar = np.array([[0.0, 0.0, np.log(0.5)]] * 4)
    d = cv.collapse_diagnostics(mu, logvar, threshold=0.01)
    assert d["activity"] == pytest.approx([1.0, 0.0, 0.0025])
    assert d["active_units"] == 1 and d["latent"] == 3
    kl2 = 0.5 * (0.5 - 1.0 - np.log(0.5)) + 0.5 * np.mean(np.array([0.0, 0.1, 0.0, 0.1]) ** 2)
    assert d["kl_per_dim"] == pytest.approx([0.5, 0.125, kl2])


def test_mean_std_and_max_spread() -> None:
    assert cv.mean_std([-10.0, -12.0, -14.0]) == (pytest.approx(-12.0), pytest.approx(2.0))
    assert cv.mean_std([3.0]) == (3.0, None)
    dev, step = cv.max_spread([[1.0, 2.0, 3.0, 9.0], [1.0, 2.5, 3.1], [1.0, 2.0, 2.9, 0.0]], steps=50)
    assert dev == pytest.approx(0.5) and step == 2  # compared over the 3 common steps
    assert cv.max_spread([[1.0]], steps=50)[1] == 0


def _run(seed: int, finals: float, curve: list[tuple[int, float, float]], **final: Any) -> dict[str, Any]:
    evals = [{"step": s, "wall_s": w, "test_elbo": e} for s, w, e in curve]
    evals[-1]["test_elbo"] = finals
    return {"seed": seed, "status": "ok", "error": None, "steps": evals[-1]["step"], "step_loss": [], "evals": evals,
            "epochs": [], "first_step_s": 0.1, "train_wall_s": evals[-1]["wall_s"],
            "final": {"test_elbo": finals, "iwae_k": 10, "test_log_likelihood": finals + 1.0, "test_log_likelihood_se": 0.1,
                      "gap": 1.0, "kl_per_dim": [1.0, 0.0], "activity": [1.0, 0.0], "active_units": 1, "latent": 2, **final}}


def _record(framework: str, runs: list[dict[str, Any]], status: str = "ok", error: str | None = None, **metrics: Any) -> dict[str, Any]:
    return {"measure": "convergence", "framework": framework, "mode": "eager", "status": status, "error": error,
            "config": {}, "metrics": {"runs": runs, **metrics}}


CURVE = [(0, 0.0, -50.0), (10, 1.0, -30.0), (20, 2.0, -20.8), (30, 3.0, -20.0)]


def test_time_to_target_default_rule_and_explicit_target() -> None:
    a = _record("torch", [_run(0, -20.0, CURVE)])
    slow = [(0, 0.0, -50.0), (10, 4.0, -40.0), (20, 8.0, -22.0), (30, 12.0, -20.5)]
    b = _record("jax", [_run(0, -20.5, slow)])
    target, how = cv.resolve_target([a, b])
    assert target == pytest.approx(-21.0) and "torch" in how  # best final (-20.0) minus 1 nat
    assert cv.first_reaching(a["metrics"]["runs"][0]["evals"], target)["step"] == 20
    rows = {r["framework"]: r for r in cv.summarize([a, b]).rows}
    assert rows["torch"]["time to target (s)"] == "2.00" and rows["torch"]["step at target"] == "20"
    assert rows["jax"]["time to target (s)"] == "12.00" and rows["jax"]["step at target"] == "30"
    # an explicit target overrides the rule; one nobody reaches is said so
    a["metrics"]["target_elbo"] = b["metrics"]["target_elbo"] = -10.0
    assert cv.resolve_target([a, b])[0] == -10.0
    assert {r["time to target (s)"] for r in cv.summarize([a, b]).rows} == {"not reached"}


def test_seed_aggregation_mean_and_std() -> None:
    runs = [_run(s, f, CURVE, test_log_likelihood=f + 1.0) for s, f in ((0, -10.0), (1, -12.0), (2, -14.0))]
    s = cv.summarize([_record("torch", runs)])
    row = s.rows[0]
    assert row["seeds"] == "0,1,2"
    assert row["test ELBO"] == "-12.000 ± 2.000"
    assert row["test log p(x) (IWAE-10)"] == "-11.000 ± 2.000"
    assert row["active units"] == "1 ± 0 / 2"
    assert any("3 seeds" in n for n in s.notes) and s.ok
    # the compatibility keys are the means over seeds
    for r in runs:
        r["epochs"] = [{"epoch": 1, "train_elbo": r["final"]["test_elbo"], "test_elbo": r["final"]["test_elbo"], "wall_s": 3.0}]
        r["time_to_target_s"] = None
    m = cv.seed_means(runs)
    assert m["epochs"][0]["test_elbo"] == pytest.approx(-12.0) and m["time_to_target_s"] is None
    assert m["test_log_likelihood"] == pytest.approx(-11.0)


def test_agreement_check_fails_when_frameworks_disagree() -> None:
    a, b = _record("torch", [_run(0, -20.0, CURVE)]), _record("jax", [_run(0, -21.5, CURVE)])
    s = cv.summarize([a, b])
    assert not s.ok and any("spread across frameworks: 1.500" in n and "FAIL" in n for n in s.notes)


def test_summarize_and_plots_survive_failed_records(tmp_path: Path) -> None:
    ok = _record("torch", [_run(0, -20.0, CURVE)])
    partial = _run(0, -20.0, CURVE)
    del partial["final"]
    partial.update(status="diverged", error="training loss nan (NaN or inf) at step 12, seed 0")
    diverged = _record("tensorflow", [partial], status="diverged", error=partial["error"])
    failed = {"measure": "convergence", "framework": "jax", "mode": "eager", "status": "failed", "error": "killed", "config": {},
              "metrics": {}}
    unavailable = {**failed, "status": "unavailable", "metrics": None, "mode": "jit"}
    for recs in ([ok, diverged, failed, unavailable], [failed], [diverged, unavailable]):
        s = cv.summarize(recs)
        assert not s.ok
        assert len({tuple(r) for r in s.rows}) == 1  # one set of columns (CSV needs it)
        assert any("step 12" in n for n in s.notes) or diverged not in recs
        for name, plot in cv.PLOTS.items():
            plot(recs, tmp_path / name)
    assert (tmp_path / "convergence.png").exists()


def test_older_records_still_summarize() -> None:
    recs = [json.loads(p.read_text()) for p in sorted((ROOT / "results/reference/cpu-2core").glob("convergence-*.json"))]
    if not recs:
        pytest.skip("no reference records")
    s = cv.summarize(recs)
    assert len(s.rows) == len(recs) and all(r["test ELBO"] != "-" for r in s.rows)


def test_validate_cross_field_rules() -> None:
    with pytest.raises(ConfigError, match="measure.convergence.seeds"):
        validate(make_config(measure={"names": ["convergence"], "convergence": {"seeds": [0, 1, 0]}}))
    with pytest.raises(ConfigError, match="measure.convergence.record_steps"):
        validate(make_config(measure={"names": ["convergence"], "convergence": {"shared_noise": True, "record_steps": 10}}))


# --- on real backends -------------------------------------------------------------------------


def _config(data: dict[str, Any] | None = None, optim: dict[str, Any] | None = None, **convergence: Any) -> AppConfig:
    conv = {"epochs": 1, "iwae_k": 10, "elbo_samples": 2, **convergence}
    return make_config(measure={"names": ["convergence"], "convergence": conv}, data=data or {}, optim=optim or {},
                       model={"hidden": [32]})


def _job(framework: str, tmp_path: Path) -> Job:
    return Job("r", "convergence", framework, "eager", {}, str(tmp_path / f"{framework}.json"))


def _as_record(framework: str, res: Any) -> dict[str, Any]:
    return {"measure": "convergence", "framework": framework, "mode": "eager", "status": res.status, "error": res.error,
            "config": {}, "metrics": res.metrics}


LINEAR = {"kind": "linear", "latent": 4, "likelihood": "gaussian", "obs_sigma": 0.5}


def test_diverged_run_stops_and_keeps_what_it_measured(tmp_path: Path) -> None:
    """A planted blow-up (SGD with lr 1e30): status diverged at step 2, the next seed never runs."""
    c = make_config(model=LINEAR, data={"source": "synthetic", "n_train": 128, "n_test": 32, "batch_size": 32},
                    optim={"name": "sgd", "lr": 1e30},
                    measure={"names": ["convergence"], "convergence": {"epochs": 3, "seeds": [0, 1], "eval_every": 2}})
    res = cv.run(c, _job("torch", tmp_path))
    assert res.status == "diverged"
    assert "nan or inf" in res.error.lower() and "step 2" in res.error and "seed 0" in res.error
    runs = res.metrics["runs"]
    assert len(runs) == 1  # the next seed does not start
    run = runs[0]
    assert run["status"] == "diverged" and np.isfinite(run["step_loss"][0]) and not np.isfinite(run["step_loss"][1])
    assert run["evals"][0]["step"] == 0 and np.isfinite(run["evals"][0]["test_elbo"]) and "final" not in run
    s = cv.summarize([_as_record("torch", res)])
    assert not s.ok and s.rows[0]["status"] == "diverged"


@pytest.mark.slow
def test_lockstep_two_frameworks_agree_per_step(tmp_path: Path) -> None:
    """Same weights, batches and noise: two frameworks give the same per-step losses."""
    c = _config(shared_noise=True, eval_every=10)
    records = [_as_record(fw, cv.run(c, _job(fw, tmp_path))) for fw in FRAMEWORKS[:2]]
    assert all(r["status"] == "ok" for r in records)
    losses = [r["metrics"]["runs"][0]["step_loss"] for r in records]
    assert len(losses[0]) == 1500 // 64 == len(losses[1])
    assert np.max(np.abs(np.subtract(*losses))) < 1e-4  # float32 rounding only
    run = records[0]["metrics"]["runs"][0]
    assert [e["step"] for e in run["evals"]] == [0, 10, 20, 23]  # every 10 steps and at the epoch end
    assert run["evals"][-1]["wall_s"] == run["train_wall_s"] and run["final"]["active_units"] <= 8
    for r in records:  # the one-ulp control: the first 50 steps again, from weights one ulp away
        ctrl = r["metrics"]["ulp_control"]
        assert ctrl["seed"] == 0 and len(ctrl["step_loss"]) == 1500 // 64  # one epoch holds fewer than 50 steps
        dev = np.abs(np.subtract(ctrl["step_loss"], r["metrics"]["runs"][0]["step_loss"]))
        assert 0 < dev.max() < 1e-4  # moved, by rounding only
    s = cv.summarize(records)
    assert s.ok, s.notes
    assert any(n.startswith("lockstep") and "one-ulp control within" in n and n.endswith("pass") for n in s.notes)


def _lockstep(framework: str, losses: list[float], control: list[float] | None) -> dict[str, Any]:
    run = {**_run(0, -20.0, CURVE), "step_loss": losses}
    extra = {"ulp_control": {"seed": 0, "step_loss": control}} if control is not None else {}
    return _record(framework, [run], shared_noise=True, lockstep_steps=4, lockstep_tol=1e-3, **extra)


BASE = [30.0, 29.0, 28.0, 27.0, 26.0]


@pytest.mark.parametrize("spread, control, judged, ok", [
    (5e-4, 1e-5, True, True),       # the MLP: controls far inside; spread inside: pass
    (5e-3, 1e-5, True, False),      # spread outside while rounding alone stays inside: FAIL
    (5e-3, None, True, False),      # records from before the control: judged as before
    (0.2, 0.5, False, True),        # the conv VAE: one ulp moves a run 0.5 nats: reported, not judged
    (5e-4, math.nan, True, False),  # a control that is not finite fails, named
])
def test_lockstep_is_judged_unless_one_ulp_moves_a_run_past_the_tolerance(
        spread: float, control: float | None, judged: bool, ok: bool) -> None:
    """The rule, against spreads computed by hand: the largest per-step max - min over the first
    `lockstep_steps` steps (step 5 lies outside them and is ignored)."""
    a = _lockstep("torch", BASE, None if control is None else [30.0, 29.0 + control, 28.0, 27.0, 99.0])
    b = _lockstep("jax", [30.0, 29.0, 28.0 + spread, 27.0, 1.0], None)
    dev, where = cv.lockstep([a, b])
    assert dev == pytest.approx(spread, rel=1e-6) and where == "seed 0, step 3"
    got = cv.control_deviation([a, b])
    if control is None:
        assert got is None
    else:
        assert got[1] == "torch/eager seed 0, step 2"
        assert got[0] == pytest.approx(control, rel=1e-6) if math.isfinite(control) else math.isnan(got[0])
    assert cv.lockstep_judged([a, b])[0] is judged
    s = cv.summarize([a, b])
    note = next(n for n in s.notes if n.startswith("lockstep"))
    assert s.ok is ok, note
    assert note.endswith("pass" if ok and judged else "FAIL" if not ok else "not judged: rounding alone moves a run "
                         "further than the tolerance")
    if control is not None and not math.isfinite(control):
        assert "one-ulp control not finite (torch/eager" in note
        assert "torch/eager seed 0: one-ulp control's training loss is NaN at step 2" in s.notes


def test_linear_evaluator_at_the_optimum(tmp_path: Path) -> None:
    """Backend (float64) set to the pPCA optimum: the gaps vanish, and the backend's Monte Carlo
    test ELBO (sampled reconstruction, closed-form KL) matches the optimum's exact test
    log-likelihood within its standard error (the bound is tight at the exact posterior)."""
    c = make_config(model=LINEAR, data={"source": "synthetic", "n_train": 500, "n_test": 100},
                    framework={"precision": "float64"}, measure={"names": ["convergence"]})
    ds = cv.dataset(c)
    spec = cv.model_spec(c, ds)
    assert spec == LinearSpec(x_dim=16, latent=4, likelihood="gaussian", obs_sigma=0.5)
    ev = cv.Evaluator(c, ds, spec)
    assert ev.optimum is not None
    b = cv.backend(c, "torch", spec=spec, params=ev.optimum.params())
    e, per_example = ev(b, 0, 0.0)
    assert abs(e["gap_to_optimum"]) < 1e-10 and abs(e["train_gap_to_optimum"]) < 1e-10 and e["posterior_gap"] < 1e-10
    noise = per_example - log_px(ev.optimum.params(), ds.x_test, 0.5)  # Monte Carlo error alone
    assert e["test_elbo"] == pytest.approx(ev.optimum_test + noise.mean(), abs=1e-9)
    assert abs(noise.mean()) < 4 * noise.std(ddof=1) / np.sqrt(len(noise))


def test_a_killed_jobs_kept_epochs_are_in_its_row_and_drawn_dashed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job killed mid-run keeps its evaluations (`partial`): its row shows where it got to,
    marked partial, and the plot draws them, dashed, beside the finished curves."""
    ok = _record("torch", [_run(0, -20.0, CURVE)])
    incomplete = {**_run(0, -30.0, CURVE[:2]), "status": "incomplete", "epochs": [{"epoch": 1, "train_elbo": -31.0,
                                                                                   "test_elbo": -30.0, "wall_s": 1.0}]}
    del incomplete["final"]
    killed = _record("jax", [incomplete], status="failed", error="worker died of SIGKILL", partial=True)
    s = cv.summarize([ok, killed])
    row = next(r for r in s.rows if r["framework"] == "jax")
    assert row["status"] == "failed (partial)" and row["steps"] == "10" and row["test ELBO"] == "-30.000"
    assert any("kept 1 finished epoch(s), drawn dashed" in n for n in s.notes) and not s.ok
    figures: list[Any] = []
    monkeypatch.setattr(cv, "save_png", lambda fig, path, **kw: figures.append(fig) or path)
    cv.plot_convergence([ok, killed], tmp_path / "c.png")
    lines = {ln.get_label(): ln for ln in figures[0].axes[0].get_lines()}
    assert lines["jax (failed, partial)"].get_linestyle() == "--" and lines["torch"].get_linestyle() == "-"
    assert list(lines["jax (failed, partial)"].get_ydata()) == [-50.0, -30.0]


def test_notes_name_torch_compile_only_where_it_ran() -> None:
    runs = [_run(0, -20.0, CURVE), _run(1, -20.1, CURVE)]
    eager = _record("torch", runs)
    assert not any("torch.compile" in n for n in cv.summarize([eager]).notes)
    compiled = {**_record("torch", runs), "mode": "compiled"}
    assert any("torch.compile reuses" in n for n in cv.summarize([compiled]).notes)
    # a framework that declares no in-process compile cache gets no such note
    quiet = [f for f, x in registry().items() if not x.compile_cache_note]
    for f in quiet:
        rec = {**_record(f, runs), "mode": registry()[f].compiled}
        assert not any("in-process cache" in n for n in cv.summarize([rec]).notes), f


def test_log_time_axis_labels_do_not_crowd() -> None:
    """Under a decade of training time, matplotlib labels the minor ticks too and they overlap:
    the axis labels at most eight 1-2-5 ticks, the minor ones not at all."""
    from harness.plots import pyplot

    plt = pyplot()
    for lo, hi in ((0.3, 0.9), (0.05, 8.0), (0.01, 3000.0)):
        fig, ax = plt.subplots()
        ax.plot([lo, hi], [0, 1])
        cv.log_time_axis(ax)
        fig.canvas.draw()
        major = [t.get_text() for t in ax.get_xticklabels() if t.get_text() and lo <= _num(t.get_text()) <= hi]
        minor = [t.get_text() for t in ax.get_xticklabels(minor=True) if t.get_text()]
        assert 1 <= len(major) <= 8 and not minor, (lo, hi, major, minor)
        plt.close(fig)


def _num(text: str) -> float:
    return float(text.replace("−", "-"))

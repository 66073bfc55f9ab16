"""Does log p(x) = ELBO + KL(q(z|x) || p(z|x)) hold? On the linear-Gaussian VAE every term has a
closed form, so the identity can be checked to rounding error.

Model (canonical layout): mu, logvar = split(x A + a); x | z ~ N(z W + c, s^2 I), z ~ N(0, I).
- exact log p(x) = log N(x; c, W^T W + s^2 I) and the exact posterior p(z|x) come from NumPy;
- the ELBO comes from the *backend*: its expectation over q is a quadratic in z here, so the
  backend's own `terms` evaluated at the 2L sigma points mu +- sqrt(L) sigma e_j (equal weights)
  gives E_q[log p(x|z)] exactly; KL(q || p(z)) is closed form in every backend;
- KL(q || posterior) between two Gaussians is closed form in NumPy.
Also: a Monte Carlo ELBO from the backend's sampled terms (within 4 standard errors of the
analytic one), the IWAE bound for growing k (non-decreasing, below log p(x), each within 3
standard errors), and a decoder with orthogonal rows whose exact posterior is diagonal: with q
set to it the gap vanishes and ELBO = log p(x).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from harness import lingauss as lg
from harness.api import ModelSpec
from harness.job import Job, Result
from harness.judged import Judged, ge, le
from harness.lingauss import (
    LinearGaussianConfig,
    elbo,
    kl_to_posterior,
    log_px,
    orthogonal_decoder_params,
    sigma_points,
)
from harness.metrics import plain
from harness.schema import setting

if TYPE_CHECKING:
    from harness.config import AppConfig
from harness.measures.common import Quantity, Summary, backend, completed, finished, fmt, split


@dataclass
class IdentityConfig(LinearGaussianConfig):  # x_dim, latent, obs_sigma, n_examples: the problem
    mc_samples: int = setting(2000, gt=1)  # noise samples per example for the Monte Carlo ELBO
    iwae_ks: list[int] = setting([1, 10, 100, 1000], gt=0)
    tol: float = setting(1e-9, gt=0)


Config = IdentityConfig

Array = list[float] | np.ndarray  # an array while the job runs, a list in the record


@dataclass
class IwaeRow:
    k: int
    iwae: float  # mean IWAE-k bound
    minus_log_px: float  # mean of IWAE-k - log p(x), paired per example
    se: float
    increase: float | None = None  # over the previous k (absent for the first)
    increase_se: float | None = None


@dataclass
class PerExample:
    log_px: Array
    elbo: Array
    kl_posterior: Array
    residual: Array


@dataclass
class IdentityMetrics:
    """The identity record's metrics (`harness.metrics`: built here, stored by `plain`, read
    back by `load`)."""

    n_examples: int
    x_dim: int
    latent: int
    log_px_mean: float
    elbo_mean: float
    gap_mean: float
    gap_min: float
    residual_max: float
    residual_mean: float
    tol: float
    elbo_numpy_vs_backend_max: float
    mc_elbo_mean: float
    mc_se: float
    mc_z: float
    mc_samples: int
    iwae: list[IwaeRow]
    ortho_gap_max: float
    ortho_elbo_minus_log_px_max: float
    per_example: PerExample
    checks: dict[str, bool] | None = None  # the verdicts, from the numbers above (`checks`)


METRICS = IdentityMetrics
#: what it reads (`harness.measures`): its own linear-Gaussian model, built from its section
#: alone; no model/data/optim (the backend's optimizer is built, never stepped) and no
#: framework.precision (it computes in float64 whatever that says)
READS = ("framework", "-framework.precision", "seed", "measure.identity")
VERSION = 1


def precision(c: AppConfig) -> str:
    return "float64"  # closed forms checked to rounding error


def problem(c: AppConfig) -> tuple[ModelSpec, dict[str, np.ndarray], np.ndarray]:
    """A generic linear-Gaussian VAE (random encoder, so q is not the posterior) and data
    drawn from its own p(x)."""
    cfg = c.measure.identity
    spec = lg.spec_of(cfg)
    rng = np.random.default_rng([c.seed, 5])
    params = lg.random_vae(spec, c.seed, rng)
    x = lg.sample(params["decoder.0.weight"], params["decoder.0.bias"], spec.obs_sigma, cfg.n_examples, rng)
    return spec, params, x


# --- the measure ------------------------------------------------------------------------


def backend_elbo(b: Any, x: np.ndarray, latent: int) -> np.ndarray:
    return np.asarray(-b.terms(x, sigma_points(latent, len(x))).loss)


def run(c: AppConfig, job: Job) -> Result:
    cfg = c.measure.identity
    spec, params, x = problem(c)
    s, L = spec.obs_sigma, spec.latent
    b = backend(c, job.framework, spec=spec, dtype="float64", params=params)
    exact = log_px(params, x, s)
    elbo_b = backend_elbo(b, x, L)
    gap = kl_to_posterior(params, x, s, L)
    residual = np.abs(exact - elbo_b - gap)

    # Monte Carlo ELBO from sampled terms: K samples per example, one term per (sample, example)
    K = cfg.mc_samples
    rng = np.random.default_rng([c.seed, 11])
    x_rep = np.tile(x, (K, 1))
    per_sample = -b.terms(x_rep, rng.standard_normal((len(x_rep), L))).loss.reshape(K, len(x))
    mc = per_sample.mean(axis=0)
    mc_se_mean = float(per_sample.mean(axis=1).std(ddof=1) / math.sqrt(K))  # SE of the all-example mean
    mc_z = abs(float(mc.mean() - elbo_b.mean())) / mc_se_mean

    iwae_rows = []
    prev: np.ndarray | None = None
    for k in cfg.iwae_ks:
        ll = b.log_likelihood(x, k, seed=c.seed + k)
        below = ll - exact  # paired with the exact value per example
        row = IwaeRow(k=k, iwae=float(ll.mean()), minus_log_px=float(below.mean()),
                      se=float(below.std(ddof=1) / math.sqrt(len(x))))
        if prev is not None:
            inc = ll - prev
            row.increase, row.increase_se = float(inc.mean()), float(inc.std(ddof=1) / math.sqrt(len(x)))
        iwae_rows.append(row)
        prev = ll

    ortho = orthogonal_decoder_params(spec, c.seed)
    b.set_params(ortho)
    x_o = x  # any x: the posterior is exact for every input
    ortho_gap = kl_to_posterior(ortho, x_o, s, L)
    ortho_diff = np.abs(backend_elbo(b, x_o, L) - log_px(ortho, x_o, s))

    metrics = IdentityMetrics(
        n_examples=len(x),
        x_dim=spec.x_dim,
        latent=L,
        log_px_mean=float(exact.mean()),
        elbo_mean=float(elbo_b.mean()),
        gap_mean=float(gap.mean()),
        gap_min=float(gap.min()),
        residual_max=float(residual.max()),
        residual_mean=float(residual.mean()),
        tol=cfg.tol,
        elbo_numpy_vs_backend_max=float(np.abs(elbo(params, x, s, L) - elbo_b).max()),
        mc_elbo_mean=float(mc.mean()),
        mc_se=mc_se_mean,
        mc_z=mc_z,
        mc_samples=K,
        iwae=iwae_rows,
        ortho_gap_max=float(np.abs(ortho_gap).max()),
        ortho_elbo_minus_log_px_max=float(ortho_diff.max()),
        per_example=PerExample(log_px=exact, elbo=elbo_b, kl_posterior=gap, residual=residual),
    )
    metrics.checks = checks(plain(metrics))
    return Result(metrics=plain(metrics), backend_env=b.version())


def checks(m: dict[str, Any]) -> dict[str, bool]:
    """The verdicts, from the record's numbers (so a NaN anywhere in them is a failed check:
    every comparison is written so that NaN makes it False)."""
    tol = m["tol"]
    iw = m.get("iwae") or []
    return {
        "identity residual": le(m["residual_max"], tol) and le(m["per_example"]["residual"], tol),
        "MC ELBO within 4 SE": le(m["mc_z"], 4.0),
        "IWAE non-decreasing in k": all(ge(x["increase"], -3.0 * x["increase_se"]) for x in iw[1:]),
        "IWAE below log p(x)": all(le(x["minus_log_px"], 3.0 * x["se"]) for x in iw),
        "orthogonal decoder: gap vanishes": le(m["ortho_gap_max"], tol) and le(m["ortho_elbo_minus_log_px_max"], tol),
    }


def _row(r: dict[str, Any]) -> dict[str, Any]:
    """A finished record's row."""
    m = r["metrics"]
    verdicts = checks(m)  # recomputed from the numbers: a stored True cannot hide a NaN
    return {
        "framework": r["framework"],
        "log p(x)": fmt(m["log_px_mean"], ".4f"),
        "ELBO": fmt(m["elbo_mean"], ".4f"),
        "KL(q‖posterior)": fmt(m["gap_mean"], ".4f"),
        "max abs(log p − ELBO − KL)": fmt(m["residual_max"], ".1e"),
        "MC ELBO (SE)": f"{m['mc_elbo_mean']:.4f} ({m['mc_se']:.4f})",
        f"IWAE k={','.join(str(x['k']) for x in m['iwae'])}": " ".join(f"{x['iwae']:.4f}" for x in m["iwae"]),
        "orthogonal W: max gap": fmt(m["ortho_gap_max"], ".1e"),
        "pass": "yes" if all(verdicts.values()) else "NO: " + ", ".join(k for k, v in verdicts.items() if not v),
    }


def summarize(records: list[dict[str, Any]]) -> Summary:
    s = split(records, "residual_max", columns=["framework", "status"])
    rows, notes = s.table(lambda r, _: [_row(r)])
    if s.good:
        m = s.good[0]["metrics"]
        notes.append(f"means over {m.get('n_examples')} examples, float64; residual tolerance {m.get('tol')}")
    passed = all(all(checks(r["metrics"]).values()) for r in s.good)
    return Summary("ELBO identity on the linear-Gaussian VAE: log p(x) = ELBO + KL(q ‖ posterior)", rows,
                   s.ok and passed and bool(rows), notes)


PLOTS: dict[str, Any] = {}  # tables only

JUDGED = (
    Judged("residual_max", "identity residual |log p − ELBO − KL|"),
    Judged("per_example.residual", "identity residual |log p − ELBO − KL|", axis="example"),
    Judged("mc_z", "Monte Carlo ELBO's distance to the analytic ELBO (SE)"),
    Judged("iwae.*.minus_log_px", "IWAE − log p(x)"),
    Judged("iwae.*.se", "standard error of IWAE − log p(x)"),
    Judged("iwae.*.increase", "IWAE increase with k"),
    Judged("iwae.*.increase_se", "standard error of the IWAE increase"),
    Judged("ortho_gap_max", "orthogonal decoder: KL(q ‖ posterior)"),
    Judged("ortho_elbo_minus_log_px_max", "orthogonal decoder: |ELBO − log p(x)|"),
)


QUESTION = "Does log p(x) = ELBO + KL(q ‖ posterior) hold?"


def answer(records: list[dict[str, Any]]) -> str:
    """One line for the suite's summary, from the records."""
    good = completed(records, "residual_max")
    bad = [f"{r['framework']} ({r['status']})" for r in records if r not in good]
    held = [r for r in good if all(checks(r["metrics"]).values())]
    worst = max((r["metrics"]["residual_max"] for r in good), default=float("nan"))
    tol = good[0]["metrics"].get("tol") if good else None
    verdict = "yes" if good and len(held) == len(records) else "NO"
    where = ", ".join(r["framework"] for r in held) or "no framework"
    tail = f"; not in {', '.join(bad + [r['framework'] for r in good if r not in held])}" if verdict == "NO" else ""
    return f"{verdict}: holds in {where}, largest |log p − ELBO − KL| {worst:.1e} nats (tolerance {tol}){tail}"


def compared(records: list[dict[str, Any]]) -> dict[str, Quantity]:
    """For `vaebench compare`: float64 closed forms and the backend's ELBO to 1e-9 relative
    (CPU vendors differ at ~1e-15), the residual under its tolerance, the checks' verdicts."""
    out: dict[str, Quantity] = {}
    for fw, m in finished(records, "residual_max"):
        for key in ("log_px_mean", "elbo_mean", "gap_mean", "mc_elbo_mean"):
            out[f"{fw} {key}"] = Quantity(m[key], "rel", 1e-9)
        out[f"{fw} residual_max"] = Quantity(m["residual_max"], "limit", float(m["tol"]))
        out[f"{fw} checks"] = Quantity(",".join(k for k, v in checks(m).items() if not v) or "all pass", "same")
    return out

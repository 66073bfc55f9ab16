"""Why is the ELBO below log p(x)? The inference gap split into an approximation gap and an
amortization gap (Cremer, Li & Duvenaud 2018, "Inference suboptimality in variational
autoencoders").

    log p(x) - ELBO(q) = KL(q(z|x) || p(z|x))
                       = KL(q* || p(z|x))                      approximation gap
                       + [KL(q || p(z|x)) - KL(q* || p(z|x))]  amortization gap

q(z|x) is the encoder's Gaussian and q* the best diagonal Gaussian for this x alone. The
approximation gap is what the Gaussian family cannot do. The amortization gap is what one
shared encoder gives away against optimising each example's own q. Both are >= 0, since q*
is the best member of the family.

Linear-Gaussian VAE (`linear`, float64, closed forms; x | z ~ N(z W + c, s^2 I)). The
posterior is N(m, Lambda^-1) with precision Lambda = I + W W^T / s^2 (the same for every x).
The best diagonal Gaussian has the posterior mean and variances 1/Lambda_ii: d KL / d v_i =
(Lambda_ii - 1/v_i)/2 = 0. So KL(q* || p(z|x)) = (sum_i log Lambda_ii - log det Lambda) / 2,
the same for every example, and zero exactly when the posterior is diagonal. Per example: exact
log p(x), the backend's ELBO of the encoder's q and of q* (its `terms` / `local_grads` at the
2L sigma points, which average the quadratic expected log-likelihood exactly), and both gaps
in closed form. Checks, each within `tol` (1e-9) per example: approximation + amortization
gap = log p(x) - ELBO(q); approximation gap = log p(x) - ELBO(q*); amortization gap =
ELBO(q*) - ELBO(q). One more check tests the method used on the MLP below: the local
optimiser (backend gradients, L-BFGS), started from the encoder's q, must find the
closed-form q* (means and variances within `local_tol`). All of this is done for a random
encoder and decoder, and again after `train_steps` Adam steps of the backend on data drawn
from a random linear-Gaussian model.

The trained model (`trained`: the configured model and data, an MLP on digits by default,
float64). It is trained for `epochs` epochs with the backend's own optimizer and RNG. Then, on
`n_test` test examples:
- log p(x) is estimated by IWAE with `iwae_k` samples (`log_likelihood`). This is a lower
  bound, so the approximation gap below is a lower bound too;
- ELBO(q): the encoder's q (the backend's own `encode`), averaged
  over `elbo_samples` fresh noise draws per example;
- q* is found by local optimisation. Each example's own mean and log-variance start at the
  encoder's output and are moved to maximise the ELBO with the decoder fixed. The gradient
  comes from the backend (`local_grads`), with `local_samples` fixed noise draws per example
  (a deterministic objective), and L-BFGS-B runs until the ELBO stops improving (relative
  change below 1e-12) or `local_max_iter`. ELBO(q*) is then evaluated on the same fresh noise
  as ELBO(q): the pairing cancels most Monte Carlo noise from the amortization gap, and fresh
  noise removes the optimisation's optimism about its own samples;
- per example: approximation gap = log p(x) - ELBO(q*); amortization gap = ELBO(q*) -
  ELBO(q); reported as means with standard errors over the examples.
Sanity checks: the amortization gap >= 0 within 2 standard errors; the local ELBO <= the
IWAE estimate within 2 standard errors (approximation gap >= 0); the optimiser converged.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from harness import data as data_mod
from harness import lingauss as lg
from harness.api import ModelSpec, OptimSpec
from harness.initializers import init_params
from harness.job import Job, Result
from harness.judged import Judged, finite, ge, le
from harness.lingauss import (
    LinearGaussianConfig,
    approximation_gap,
    best_diagonal,
    kl_diag_gaussians_to_posterior,
    kl_to_posterior,
    log_px,
    posterior,
    q_params,
    sigma_points,
)
from harness.measures.identity import backend_elbo
from harness.metrics import plain
from harness.plots import pyplot, save_png
from harness.schema import setting

if TYPE_CHECKING:
    from harness.config import AppConfig
from harness.measures.common import (
    Quantity,
    Summary,
    backend,
    by_framework,
    completed,
    dataset,
    finished,
    fmt,
    model_spec,
    split,
    train,
)

LOGVAR_BOUNDS = (-20.0, 10.0)  # for L-BFGS-B: keeps exp(logvar) finite along the line search
NOISE_TAG = {"fit": 41, "eval": 42, "iwae": 43, "linear": 44}


@dataclass
class GapsConfig(LinearGaussianConfig):
    # linear-Gaussian VAE: closed forms (obs_sigma from LinearGaussianConfig)
    x_dim: int = setting(8, gt=0)
    latent: int = setting(3, gt=0)
    n_examples: int = setting(64, gt=1)  # evaluated examples
    n_train: int = setting(1000, gt=0)  # training data for the trained linear VAE
    train_steps: int = setting(1000, ge=0)  # Adam steps of the trained linear VAE
    train_lr: float = setting(0.01, gt=0)
    tol: float = setting(1e-9, gt=0)  # per-example identities, nats
    local_tol: float = setting(1e-6, gt=0)  # local optimiser vs the closed-form q* (means, variances)
    # the trained model on data (MLP on digits by default)
    trained: bool = True
    epochs: int = setting(20, ge=0)
    n_test: int = setting(100, gt=1)
    iwae_k: int = setting(5000, gt=0)
    elbo_samples: int = setting(1000, gt=0)  # fresh noise draws per example for ELBO(q), ELBO(q*)
    local_samples: int = setting(100, gt=0)  # fixed noise draws per example in the local objective
    local_max_iter: int = setting(1000, gt=0)


Config = GapsConfig

Array = list[float] | np.ndarray  # an array while the job runs, a list in the record


@dataclass
class LinearPerExample:
    log_px: Array
    elbo: Array
    approximation_gap: Array
    amortization_gap: Array


@dataclass(kw_only=True)
class LinearGaps:
    """One linear part (random or trained encoder): means over the examples, the identities'
    largest residuals, the local optimiser against the closed-form q*."""

    n_examples: int
    log_px: float
    elbo: float
    elbo_star: float
    total_gap: float
    approximation_gap: float
    amortization_gap: float
    amortization_gap_min: float
    residual_sum_max: float
    residual_approx_max: float
    residual_amort_max: float
    local_mu_err: float
    local_var_err: float
    local_elbo_minus_closed_form_max: float
    local_iterations: int
    local_converged: bool
    posterior_offdiag_max: float
    # absent from records written before they were stored (`linear_checks` judges those without)
    closed_form_vs_general_kl_max: float | None = None
    tol: float | None = None
    local_tol: float | None = None
    per_example: LinearPerExample
    checks: dict[str, bool] | None = None  # the verdicts, from the numbers above (`linear_checks`)
    train_steps: int | None = None  # Adam steps before it (the trained encoder's part only)


@dataclass
class LinearParts:
    random: LinearGaps
    trained: LinearGaps


@dataclass
class TrainedPerExample:
    log_px: Array
    elbo: Array
    elbo_star: Array


@dataclass(kw_only=True)
class TrainedGaps:
    """The trained model on data: means over the test examples with standard errors (`_se`),
    the local optimiser's run, timings."""

    model: str
    epochs: int
    steps: int
    train_s: float
    n_test: int
    iwae_k: int
    elbo_samples: int
    local_samples: int
    log_px: float
    log_px_se: float
    elbo: float
    elbo_se: float
    elbo_star: float
    elbo_star_se: float
    total_gap: float
    total_gap_se: float
    approximation_gap: float
    approximation_gap_se: float
    amortization_gap: float
    amortization_gap_se: float
    local_iterations: int
    local_calls: int
    local_converged: bool
    local_message: str
    local_objective_start: float
    local_objective_end: float
    local_s: float
    iwae_s: float
    q_paths_diff_max: float | None = None  # absent from records written before it was stored
    per_example: TrainedPerExample
    checks: dict[str, bool] | None = None  # the verdicts, from the numbers above (`trained_checks`)


@dataclass(kw_only=True)
class GapsMetrics:
    """The gaps record's metrics (`harness.metrics`: built here, stored by `plain`, read back by
    `load`)."""

    linear: LinearParts
    trained: TrainedGaps | None = None  # with `trained=true`
    tol: float
    checks: dict[str, bool] | None = None  # every verdict, from the numbers above (`all_checks`)
    seconds: float


METRICS = GapsMetrics
#: what it reads (`harness.measures`): the linear part builds its model and Adam from its
#: section (and batches its data by data.batch_size), in float64; the trained part reads the
#: configured model, data and optimizer (`reads`: only with `trained=true`)
READS = ("framework", "-framework.precision", "seed", "data.batch_size", "model", "data", "optim", "measure.gaps")
VERSION = 1
#: what only the trained part reads
TRAINED_READS = ("model", "data", "optim")
TRAINED_SETTINGS = ("epochs", "n_test", "iwae_k", "elbo_samples", "local_samples")


def reads(config: dict[str, Any]) -> tuple[str, ...]:
    """READS; without the trained part's inputs and settings when `measure.gaps.trained` is false."""
    if ((config.get("measure") or {}).get("gaps") or {}).get("trained", GapsConfig().trained):
        return READS
    return (*(r for r in READS if r not in TRAINED_READS), *(f"-measure.gaps.{k}" for k in TRAINED_SETTINGS))


def precision(c: AppConfig) -> str:
    return "float64"  # closed forms checked to rounding error


# --- local optimisation (backend gradients) ---------------------------------------------------


def local_optimum(
    b: Any, x: np.ndarray, mu0: np.ndarray, logvar0: np.ndarray, eps: np.ndarray, max_iter: int, ftol: float = 1e-12
) -> dict[str, Any]:
    """Each example's own q = N(mu, exp(logvar)) maximising the ELBO averaged over the fixed
    noise `eps` ((B, L) or (S, B, L)), decoder fixed: L-BFGS-B on the sum over examples (which
    separates), gradients from `b.local_grads`; from (mu0, logvar0). Stops when the objective's
    relative improvement falls below `ftol` (the ELBO stops improving) or the projected
    gradient below 1e-10."""
    from scipy.optimize import minimize

    B, L = mu0.shape
    calls = 0

    def f(v: np.ndarray) -> tuple[float, np.ndarray]:
        nonlocal calls
        calls += 1
        mu, logvar = v[: B * L].reshape(B, L), v[B * L :].reshape(B, L)
        terms, g_mu, g_logvar = b.local_grads(x, mu, logvar, eps)
        return float(np.sum(terms.loss)), np.concatenate([g_mu.ravel(), g_logvar.ravel()]).astype(np.float64)

    v0 = np.concatenate([mu0.ravel(), np.clip(logvar0, *LOGVAR_BOUNDS).ravel()])
    bounds = [(None, None)] * (B * L) + [LOGVAR_BOUNDS] * (B * L)
    start = f(v0)[0]
    res = minimize(f, v0, jac=True, method="L-BFGS-B", bounds=bounds,
                   options={"maxiter": max_iter, "ftol": ftol, "gtol": 1e-10, "maxcor": 20})
    mu, logvar = res.x[: B * L].reshape(B, L), res.x[B * L :].reshape(B, L)
    return {
        "mu": mu,
        "logvar": logvar,
        "converged": bool(res.success),
        "message": str(res.message),
        "iterations": int(res.nit),
        "calls": calls,
        "objective_start": start,
        "objective_end": float(res.fun),
        "grad_max": float(np.max(np.abs(res.jac))) if getattr(res, "jac", None) is not None else None,
    }


# --- linear-Gaussian part ---------------------------------------------------------------------


def linear_problem(c: AppConfig) -> tuple[ModelSpec, dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """A random linear-Gaussian VAE (random encoder and decoder, non-zero biases), training data
    and evaluation examples drawn from another random linear-Gaussian model."""
    g = c.measure.gaps
    spec = lg.spec_of(g)
    rng = np.random.default_rng([c.seed, 17])
    params = lg.random_vae(spec, c.seed, rng)
    truth = lg.random_model(spec.x_dim, spec.latent, spec.obs_sigma, c.seed + 1)
    x = lg.sample(truth.W, truth.b, spec.obs_sigma, g.n_train + g.n_examples, rng)
    return spec, params, x[: g.n_train], x[g.n_train :]


def linear_gaps(b: Any, params: dict[str, np.ndarray], x: np.ndarray, spec: ModelSpec, c: AppConfig) -> LinearGaps:
    """Both gaps per example in closed form, the backend's ELBO of q and q*, the identities,
    and the local optimiser against the closed-form q*."""
    g = c.measure.gaps
    s, L = spec.obs_sigma, spec.latent
    pts = sigma_points(L, len(x))
    exact = log_px(params, x, s)
    elbo_q = backend_elbo(b, x, L)
    kl_q = kl_to_posterior(params, x, s, L)
    m_star, v_star = best_diagonal(params, x, s)
    approx = np.full(len(x), approximation_gap(params, s))
    amort = kl_q - approx
    logvar_star = np.broadcast_to(np.log(v_star), m_star.shape).copy()
    elbo_star = -b.local_grads(x, m_star, logvar_star, pts)[0].loss
    m, S = posterior(params, x, s)
    approx_general = kl_diag_gaussians_to_posterior(m_star, v_star, m, S)  # the general KL at q*
    mu_q, var_q = q_params(params, x, L)
    local = local_optimum(b, x, mu_q, np.log(var_q), pts, g.local_max_iter, ftol=1e-15)  # exact objective: to the end
    mu_err = float(np.max(np.abs(local["mu"] - m_star)))
    var_err = float(np.max(np.abs(np.exp(local["logvar"]) - v_star)))
    local_elbo = -b.local_grads(x, local["mu"], local["logvar"], pts)[0].loss
    res_sum = np.abs(exact - elbo_q - (approx + amort))
    res_approx = np.abs(exact - elbo_star - approx)
    res_amort = np.abs(elbo_star - elbo_q - amort)
    out = LinearGaps(
        n_examples=len(x),
        log_px=float(exact.mean()),
        elbo=float(elbo_q.mean()),
        elbo_star=float(elbo_star.mean()),
        total_gap=float((exact - elbo_q).mean()),
        approximation_gap=float(approx[0]),
        amortization_gap=float(amort.mean()),
        amortization_gap_min=float(amort.min()),
        residual_sum_max=float(res_sum.max()),
        residual_approx_max=float(res_approx.max()),
        residual_amort_max=float(res_amort.max()),
        local_mu_err=mu_err,
        local_var_err=var_err,
        local_elbo_minus_closed_form_max=float(np.max(local_elbo - elbo_star)),
        local_iterations=local["iterations"],
        local_converged=local["converged"],
        posterior_offdiag_max=float(np.max(np.abs(S - np.diag(np.diag(S))))),
        closed_form_vs_general_kl_max=float(np.abs(approx_general - approx).max()),
        tol=g.tol,
        local_tol=g.local_tol,
        per_example=LinearPerExample(log_px=exact, elbo=elbo_q, approximation_gap=approx, amortization_gap=amort),
    )
    out.checks = linear_checks(plain(out))
    return out


def linear_checks(p: dict[str, Any]) -> dict[str, bool]:
    """The linear part's verdicts, from its numbers (a NaN or inf in them fails the check). A
    record from before a tolerance was stored is judged with the default; one from before the
    closed-form-vs-general-KL number was stored keeps its stored verdict for that check."""
    defaults = GapsConfig()
    tol, ltol = p.get("tol", defaults.tol), p.get("local_tol", defaults.local_tol)
    general = ("closed_form_vs_general_kl_max" in p and le(p["closed_form_vs_general_kl_max"], tol)) or (
        "closed_form_vs_general_kl_max" not in p and bool((p.get("checks") or {}).get("q* closed form = general KL at q*")))
    return {  # a number the record lacks (a partial record) fails its check: le/ge of None are False
        "approximation + amortization = log p(x) − ELBO": le(p.get("residual_sum_max"), tol),
        "approximation gap = log p(x) − ELBO(q*)": le(p.get("residual_approx_max"), tol),
        "amortization gap = ELBO(q*) − ELBO(q)": le(p.get("residual_amort_max"), tol),
        "q* closed form = general KL at q*": general,
        "amortization gap >= 0": finite(tol) and ge(p.get("amortization_gap_min"), -tol),
        "local optimiser finds q*": le(p.get("local_mu_err"), ltol) and le(p.get("local_var_err"), ltol),
    }


def train_linear(b: Any, x_train: np.ndarray, c: AppConfig) -> int:
    """`train_steps` Adam steps on batches of the training data (the backend's own RNG)."""
    return train(b, x_train, min(c.data.batch_size, len(x_train)), c, steps=c.measure.gaps.train_steps,
                 desc="gaps: training the linear VAE")


def run_linear(c: AppConfig, job: Job) -> tuple[LinearParts, dict[str, Any]]:
    g = c.measure.gaps
    spec, params, x_train, x = linear_problem(c)
    optim = OptimSpec(name="adam", lr=g.train_lr)
    b = backend(c, job.framework, spec=spec, optim=optim, dtype="float64", params=params)
    random_part = linear_gaps(b, params, x, spec, c)
    steps = train_linear(b, x_train, c)
    trained_params = {k: np.asarray(v, dtype=np.float64) for k, v in b.get_params().items()}
    trained_part = linear_gaps(b, trained_params, x, spec, c)
    trained_part.train_steps = steps
    return LinearParts(random=random_part, trained=trained_part), b.version()


# --- the trained model on data ----------------------------------------------------------------


def _se(v: np.ndarray) -> float:
    return float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan


def run_trained(c: AppConfig, job: Job) -> TrainedGaps:
    g = c.measure.gaps
    ds = dataset(c)
    spec = model_spec(c, ds)
    b = backend(c, job.framework, spec=spec, dtype="float64", params=init_params(spec, c.seed))
    t0 = time.perf_counter()
    steps = train(b, ds.x_train, c.data.batch_size, c, epochs=g.epochs, desc=f"gaps {job.framework}: training")
    b.sync()
    train_s = time.perf_counter() - t0
    x = ds.x_test[: g.n_test]
    B, L = len(x), spec.latent
    mu_q, logvar_q = b.encode(x)
    eps_eval = data_mod.noise((g.elbo_samples, B, L), c.seed, NOISE_TAG["eval"])
    eps_fit = data_mod.noise((g.local_samples, B, L), c.seed, NOISE_TAG["fit"])
    elbo_q = -b.terms(x, eps_eval).loss
    elbo_q_local = -b.local_grads(x, mu_q, logvar_q, eps_eval)[0].loss  # the same q, bypassing the encoder
    t1 = time.perf_counter()
    local = local_optimum(b, x, mu_q, logvar_q, eps_fit, g.local_max_iter)
    local_s = time.perf_counter() - t1
    elbo_star = -b.local_grads(x, local["mu"], local["logvar"], eps_eval)[0].loss
    t2 = time.perf_counter()
    log_p = b.log_likelihood(x, g.iwae_k, seed=c.seed + NOISE_TAG["iwae"])
    iwae_s = time.perf_counter() - t2
    total, approx, amort = log_p - elbo_q, log_p - elbo_star, elbo_star - elbo_q
    out = TrainedGaps(
        model=f"{spec.describe()} on {ds.name}",
        epochs=g.epochs,
        steps=steps,
        train_s=train_s,
        n_test=B,
        iwae_k=g.iwae_k,
        elbo_samples=g.elbo_samples,
        local_samples=g.local_samples,
        log_px=float(log_p.mean()),
        log_px_se=_se(log_p),
        elbo=float(elbo_q.mean()),
        elbo_se=_se(elbo_q),
        elbo_star=float(elbo_star.mean()),
        elbo_star_se=_se(elbo_star),
        total_gap=float(total.mean()),
        total_gap_se=_se(total),
        approximation_gap=float(approx.mean()),
        approximation_gap_se=_se(approx),
        amortization_gap=float(amort.mean()),
        amortization_gap_se=_se(amort),
        local_iterations=local["iterations"],
        local_calls=local["calls"],
        local_converged=local["converged"],
        local_message=local["message"],
        local_objective_start=local["objective_start"] / B,
        local_objective_end=local["objective_end"] / B,
        local_s=local_s,
        iwae_s=iwae_s,
        q_paths_diff_max=float(np.max(np.abs(elbo_q_local - elbo_q))),
        per_example=TrainedPerExample(log_px=log_p, elbo=elbo_q, elbo_star=elbo_star),
    )
    out.checks = trained_checks(plain(out))
    return out


#: the encoder's q through `local_grads` and through `terms` must give the same ELBO to this (nats)
Q_PATHS_TOL = 1e-9


def trained_checks(t: dict[str, Any]) -> dict[str, bool]:
    """The trained part's verdicts, from its numbers (a NaN or inf in them fails the check)."""
    stored = t.get("checks") or {}
    q_paths = (le(t["q_paths_diff_max"], Q_PATHS_TOL) if "q_paths_diff_max" in t
               else bool(stored.get("encoder's q via local_grads = via terms", False)))

    def within_2se(key: str) -> bool:
        v, se = t.get(key), t.get(f"{key}_se")
        return se is not None and finite(v, se) and ge(v, -2.0 * float(se))

    return {
        "amortization gap >= 0 within 2 SE": within_2se("amortization_gap"),
        "local ELBO <= IWAE estimate within 2 SE": within_2se("approximation_gap"),
        "local optimiser converged": bool(t.get("local_converged")),
        "encoder's q via local_grads = via terms": q_paths,
    }

def run(c: AppConfig, job: Job) -> Result:
    t0 = time.perf_counter()
    linear, env = run_linear(c, job)
    trained = run_trained(c, job) if c.measure.gaps.trained else None
    metrics = GapsMetrics(linear=linear, trained=trained, tol=c.measure.gaps.tol, seconds=math.nan)  # timed last
    metrics.checks = all_checks(plain(metrics))
    metrics.seconds = time.perf_counter() - t0
    return Result(metrics=plain(metrics), backend_env=env)


def all_checks(m: dict[str, Any]) -> dict[str, bool]:
    """Every verdict of a record, recomputed from its numbers, named as the record lists them."""
    out = {f"linear {name}: {k}": v for name, part in (m.get("linear") or {}).items() if isinstance(part, dict)
           for k, v in linear_checks({"tol": m.get("tol"), **part}).items()}
    if isinstance(m.get("trained"), dict):
        out.update({f"trained: {k}": v for k, v in trained_checks(m["trained"]).items()})
    return out


# --- summary and plot (records alone) ---------------------------------------------------------

COLUMNS = ["framework", "model", "status", "log p(x)", "ELBO(q)", "ELBO(q*)", "log p − ELBO", "approximation gap",
           "amortization gap", "identity residual (max)", "pass"]


def _pm(m: dict[str, Any], key: str, spec: str = ".3f") -> str:
    v, se = m.get(key), m.get(f"{key}_se")
    if v is None:
        return "-"
    return fmt(v, spec) + ("" if se is None else f" ± {fmt(se, spec)}")


def _largest(values: list[Any]) -> float | None:
    """The largest of the numbers given (NaN if one is NaN: it must show); None if there are none."""
    nums = [float(v) for v in values if isinstance(v, int | float)]
    if not nums:
        return None
    return max(nums) if finite(nums) else math.nan


def _passed(checks: dict[str, bool] | None) -> str:
    if not checks:
        return "-"
    return "yes" if all(checks.values()) else "NO: " + ", ".join(k for k, v in checks.items() if not v)


def _rows(r: dict[str, Any], _notes: list[str]) -> list[dict[str, Any]]:
    """A finished record's rows: its linear parts (closed form), then its trained model."""
    m = r["metrics"]
    rows = []
    for name in ("random", "trained"):
        p = m["linear"].get(name)
        if not isinstance(p, dict):
            continue
        rows.append({
            "framework": r["framework"],
            "model": f"linear, {'random' if name == 'random' else 'trained'} encoder (closed form)",
            "status": r["status"],
            "log p(x)": fmt(p.get("log_px"), ".4f"),
            "ELBO(q)": fmt(p.get("elbo"), ".4f"),
            "ELBO(q*)": fmt(p.get("elbo_star"), ".4f"),
            "log p − ELBO": fmt(p.get("total_gap"), ".4f"),
            "approximation gap": fmt(p.get("approximation_gap"), ".4f"),
            "amortization gap": fmt(p.get("amortization_gap"), ".4f"),
            "identity residual (max)": fmt(_largest([p.get(k) for k in ("residual_sum_max", "residual_approx_max",
                                                                         "residual_amort_max")]), ".1e"),
            "pass": _passed(linear_checks({"tol": m.get("tol"), **p})),
        })
    t = m.get("trained")
    if isinstance(t, dict):
        rows.append({
            "framework": r["framework"],
            "model": f"trained: {t.get('model', '?')}, {t.get('epochs')} epochs (IWAE-{t.get('iwae_k')})",
            "status": r["status"],
            "log p(x)": _pm(t, "log_px"),
            "ELBO(q)": _pm(t, "elbo"),
            "ELBO(q*)": _pm(t, "elbo_star"),
            "log p − ELBO": _pm(t, "total_gap"),
            "approximation gap": _pm(t, "approximation_gap"),
            "amortization gap": _pm(t, "amortization_gap"),
            "identity residual (max)": "-",
            "pass": _passed(trained_checks(t)),
        })
    return rows


def summarize(records: list[dict[str, Any]]) -> Summary:
    s = split(records, "linear", dict, columns=COLUMNS)
    rows, notes = s.table(_rows)
    ok = bool(records) and s.ok and all(all(all_checks(r["metrics"]).values()) for r in s.good)
    tol = next((r["metrics"].get("tol") for r in records if isinstance(r.get("metrics"), dict) and r["metrics"].get("tol")), None)
    notes.append(
        "nats per example, means over the examples (± standard error); approximation gap = KL(q* ‖ p(z|x)), "
        "amortization gap = KL(q ‖ p(z|x)) − KL(q* ‖ p(z|x)), q* = the best diagonal Gaussian per example; linear "
        f"rows exact (float64, residuals within {tol}); trained rows: log p(x) by IWAE (a lower bound, so the "
        "approximation gap is one too), q* by local optimisation with the backend's gradients")
    return Summary("Inference gaps: approximation vs amortization (Cremer et al. 2018)", rows, ok, notes)


def _numbers(d: dict[str, Any], *keys: str) -> bool:
    return all(isinstance(d.get(k), int | float) for k in keys)


def plot_gaps(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Stacked bars per framework: approximation and amortization gap of the trained linear
    VAE and of the trained model on data (SE bars; the random encoder's ~26 nats stay in the
    table: they would flatten the rest)."""
    recs = completed(by_framework(records), "linear", dict)
    if not recs:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(recs), figsize=(4.2 * len(recs), 3.8), squeeze=False)
    for ax, r in zip(axes[0], recs):
        m = r["metrics"]
        bars: list[tuple[str, float, float, float, float]] = []
        p = m["linear"].get("trained")
        if isinstance(p, dict) and _numbers(p, "approximation_gap", "amortization_gap"):
            bars.append(("linear VAE\n(closed form)", p["approximation_gap"], p["amortization_gap"], 0.0, 0.0))
        t = m.get("trained")
        if isinstance(t, dict) and _numbers(t, "approximation_gap", "amortization_gap"):
            bars.append((f"{t.get('model', 'model')}\n(IWAE-{t.get('iwae_k')}, local q*)".replace(" on ", "\non "),
                         t["approximation_gap"], t["amortization_gap"],
                         t.get("approximation_gap_se") or 0.0, t.get("amortization_gap_se") or 0.0))
        if not bars:
            continue
        pos = np.arange(len(bars))
        ap = np.array([b[1] for b in bars])
        am = np.array([b[2] for b in bars])
        ax.bar(pos, ap, color="tab:purple", label="approximation gap", yerr=[b[3] for b in bars], capsize=3)
        ax.bar(pos, am, bottom=ap, color="tab:green", label="amortization gap", yerr=[b[4] for b in bars], capsize=3)
        for i, (_, a, z, _, se) in enumerate(bars):
            ax.text(i, a + z + se, f"{a:.3g} + {z:.3g}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(pos, [b[0] for b in bars], fontsize=7)
        ax.set_ylabel("nats per example")
        ax.set_ylim(0, 1.15 * max(b[1] + b[2] + b[4] for b in bars))
        ax.set_title(r["framework"], fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    fig.suptitle("Trained VAEs: log p(x) − ELBO = approximation gap + amortization gap", fontsize=10)
    return save_png(fig, path)


PLOTS = {"gaps.png": plot_gaps}

JUDGED = (
    Judged("linear.*.residual_sum_max", "identity residual: approximation + amortization = log p(x) − ELBO"),
    Judged("linear.*.residual_approx_max", "identity residual: approximation gap = log p(x) − ELBO(q*)"),
    Judged("linear.*.residual_amort_max", "identity residual: amortization gap = ELBO(q*) − ELBO(q)"),
    Judged("linear.*.closed_form_vs_general_kl_max", "q* closed form against the general KL"),
    Judged("linear.*.amortization_gap_min", "smallest amortization gap"),
    Judged("linear.*.local_mu_err", "local optimiser's error in the means of q*"),
    Judged("linear.*.local_var_err", "local optimiser's error in the variances of q*"),
    Judged("trained.amortization_gap", "amortization gap (trained model)"),
    Judged("trained.amortization_gap_se", "standard error of the amortization gap (trained model)"),
    Judged("trained.approximation_gap", "approximation gap (trained model)"),
    Judged("trained.approximation_gap_se", "standard error of the approximation gap (trained model)"),
    Judged("trained.q_paths_diff_max", "encoder's q through local_grads against terms"),
)

QUESTION = "How far is the ELBO below log p(x), and is that the Gaussian family or the shared encoder?"


def answer(records: list[dict[str, Any]]) -> str:
    """One line for the suite's summary, from the records."""
    good = completed(records, "linear", dict)
    if not good:
        return "NO: no completed run"
    held = [r for r in good if all(all_checks(r["metrics"]).values())]
    parts = []
    for r in good:
        t = r["metrics"].get("trained")
        if isinstance(t, dict) and _numbers(t, "approximation_gap", "amortization_gap"):
            parts.append(f"{r['framework']}: approximation {_pm(t, 'approximation_gap', '.2f')}, "
                         f"amortization {_pm(t, 'amortization_gap', '.2f')} nats")
    verdict = "checks pass" if len(held) == len(records) else "NO: checks fail in " + ", ".join(
        r["framework"] for r in records if r not in held)
    return f"{verdict}; trained model: " + ("; ".join(parts) if parts else "not run")


def compared(records: list[dict[str, Any]]) -> dict[str, Quantity]:
    """For `vaebench compare`: the random linear VAE's closed forms and backend ELBOs to 1e-9
    relative (float64, deterministic), every check's verdict; the trained parts (each
    framework's own RNG) are shown, not judged."""
    out: dict[str, Quantity] = {}
    for fw, m in finished(records, "linear", dict):
        p = m["linear"].get("random") or {}
        for key in ("log_px", "elbo", "elbo_star", "approximation_gap", "amortization_gap"):
            if isinstance(p.get(key), int | float):
                out[f"{fw} linear random {key}"] = Quantity(p[key], "rel", 1e-9)
        for key, ok in all_checks(m).items():
            out[f"{fw} {key}"] = Quantity(ok, "same")
        t = m.get("trained") or {}
        for key in ("approximation_gap", "amortization_gap"):
            if isinstance(t.get(key), int | float):
                out[f"{fw} trained {key}"] = Quantity(t[key], "info")
    return out

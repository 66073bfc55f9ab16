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

from harness.api import LinearSpec, ModelSpec
from harness.initializers import init_params
from harness.job import Job, Result
from harness.judged import Judged, ge, le
from harness.schema import setting

if TYPE_CHECKING:
    from harness.config import AppConfig
from harness.measures.common import Quantity, Summary, backend, by_framework, fmt

LOG_2PI = math.log(2.0 * math.pi)


@dataclass
class IdentityConfig:
    x_dim: int = setting(6, gt=0)
    latent: int = setting(2, gt=0)
    obs_sigma: float = setting(0.5, gt=0)
    n_examples: int = setting(64, gt=0)
    mc_samples: int = setting(2000, gt=1)  # noise samples per example for the Monte Carlo ELBO
    iwae_ks: list[int] = setting([1, 10, 100, 1000], gt=0)
    tol: float = setting(1e-9, gt=0)


Config = IdentityConfig
#: what it reads (`harness.measures`): its own linear-Gaussian model, built from its section
#: alone; no model/data/optim (the backend's optimizer is built, never stepped) and no
#: framework.precision (it computes in float64 whatever that says)
READS = ("framework", "-framework.precision", "seed", "measure.identity")
VERSION = 1


def precision(c: AppConfig) -> str:
    return "float64"  # closed forms checked to rounding error


# --- closed forms (NumPy) -----------------------------------------------------------------


def unpack(params: dict[str, np.ndarray], latent: int) -> tuple[np.ndarray, ...]:
    A, a = params["encoder.0.weight"], params["encoder.0.bias"]
    return A[:, :latent], a[:latent], A[:, latent:], a[latent:], params["decoder.0.weight"], params["decoder.0.bias"]


def q_params(params: dict[str, np.ndarray], x: np.ndarray, latent: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of q(z|x), per example."""
    Am, am, Av, av, _, _ = unpack(params, latent)
    return x @ Am + am, np.exp(x @ Av + av)


def log_px(params: dict[str, np.ndarray], x: np.ndarray, sigma: float) -> np.ndarray:
    """Exact log N(x; c, W^T W + s^2 I) per example."""
    W, c = params["decoder.0.weight"], params["decoder.0.bias"]
    cov = W.T @ W + sigma**2 * np.eye(W.shape[1])
    chol = np.linalg.cholesky(cov)
    sol = np.linalg.solve(chol, (x - c).T)
    return -0.5 * (np.sum(sol**2, axis=0) + 2.0 * np.sum(np.log(np.diag(chol))) + x.shape[1] * LOG_2PI)


def posterior(params: dict[str, np.ndarray], x: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact p(z|x) = N(m, S): S = (I + W W^T / s^2)^-1 (shared), m = S W (x - c) / s^2."""
    W, c = params["decoder.0.weight"], params["decoder.0.bias"]
    S = np.linalg.inv(np.eye(W.shape[0]) + W @ W.T / sigma**2)
    return (x - c) @ W.T @ S / sigma**2, S


def elbo(params: dict[str, np.ndarray], x: np.ndarray, sigma: float, latent: int) -> np.ndarray:
    """The ELBO with the expectation over q taken analytically."""
    W, c = params["decoder.0.weight"], params["decoder.0.bias"]
    mu, var = q_params(params, x, latent)
    sq = np.sum((x - c - mu @ W) ** 2, axis=1) + var @ np.sum(W**2, axis=1)
    expected_ll = -0.5 * x.shape[1] * (LOG_2PI + 2.0 * math.log(sigma)) - 0.5 * sq / sigma**2
    kl_prior = 0.5 * np.sum(mu**2 + var - 1.0 - np.log(var), axis=1)
    return np.asarray(expected_ll - kl_prior)


def kl_to_posterior(params: dict[str, np.ndarray], x: np.ndarray, sigma: float, latent: int) -> np.ndarray:
    """KL(N(mu, diag var) || N(m, S)) per example."""
    mu, var = q_params(params, x, latent)
    m, S = posterior(params, x, sigma)
    P = np.linalg.inv(S)
    d = m - mu
    _, logdet_S = np.linalg.slogdet(S)
    return np.asarray(
        0.5 * (var @ np.diag(P) + np.einsum("bi,ij,bj->b", d, P, d) - latent + logdet_S - np.sum(np.log(var), axis=1))
    )


def sigma_points(latent: int, batch: int) -> np.ndarray:
    """(2L, B, L) noise +- sqrt(L) e_j: equal-weight average is exact for quadratics in z."""
    e = math.sqrt(latent) * np.eye(latent)
    pts = np.concatenate([e, -e])
    return np.repeat(pts[:, None, :], batch, axis=1)


def orthogonal_decoder_params(spec: ModelSpec, seed: int) -> dict[str, np.ndarray]:
    """Decoder with orthogonal rows (W W^T diagonal) and q set to the exact (diagonal) posterior."""
    rng = np.random.default_rng([seed, 7])
    L, D, s = spec.latent, spec.x_dim, spec.obs_sigma
    Q, _ = np.linalg.qr(rng.standard_normal((D, D)))
    W = rng.uniform(0.5, 2.0, size=L)[:, None] * Q[:, :L].T
    c = rng.normal(size=D)
    S = np.linalg.inv(np.eye(L) + W @ W.T / s**2)
    assert np.allclose(S, np.diag(np.diag(S)), atol=1e-12)
    A_mu = (S @ W / s**2).T  # (D, L): mu = (x - c) W^T S / s^2
    A = np.concatenate([A_mu, np.zeros((D, L))], axis=1)
    a = np.concatenate([-c @ A_mu, np.log(np.diag(S))])
    return {"encoder.0.weight": A, "encoder.0.bias": a, "decoder.0.weight": W, "decoder.0.bias": c}


def identity_spec(c: AppConfig) -> ModelSpec:
    i = c.measure.identity
    return LinearSpec(x_dim=i.x_dim, latent=i.latent, likelihood="gaussian", obs_sigma=i.obs_sigma)


def problem(c: AppConfig) -> tuple[ModelSpec, dict[str, np.ndarray], np.ndarray]:
    """A generic linear-Gaussian VAE (random encoder, so q is not the posterior) and data
    drawn from its own p(x)."""
    spec = identity_spec(c)
    params = init_params(spec, c.seed)
    rng = np.random.default_rng([c.seed, 5])
    params["decoder.0.bias"] = rng.normal(0.0, 0.5, size=spec.x_dim)
    params["encoder.0.bias"] = rng.normal(0.0, 0.3, size=2 * spec.latent)
    n = c.measure.identity.n_examples
    z = rng.standard_normal((n, spec.latent))
    x = z @ params["decoder.0.weight"] + params["decoder.0.bias"] + spec.obs_sigma * rng.standard_normal((n, spec.x_dim))
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
        se_below = float(below.std(ddof=1) / math.sqrt(len(x)))
        row = {"k": k, "iwae": float(ll.mean()), "minus_log_px": float(below.mean()), "se": se_below}
        if prev is not None:
            inc = ll - prev
            row["increase"] = float(inc.mean())
            row["increase_se"] = float(inc.std(ddof=1) / math.sqrt(len(x)))
        iwae_rows.append(row)
        prev = ll

    ortho = orthogonal_decoder_params(spec, c.seed)
    b.set_params(ortho)
    x_o = x  # any x: the posterior is exact for every input
    ortho_gap = kl_to_posterior(ortho, x_o, s, L)
    ortho_diff = np.abs(backend_elbo(b, x_o, L) - log_px(ortho, x_o, s))

    metrics = {
        "n_examples": len(x),
        "x_dim": spec.x_dim,
        "latent": L,
        "log_px_mean": float(exact.mean()),
        "elbo_mean": float(elbo_b.mean()),
        "gap_mean": float(gap.mean()),
        "gap_min": float(gap.min()),
        "residual_max": float(residual.max()),
        "residual_mean": float(residual.mean()),
        "tol": cfg.tol,
        "elbo_numpy_vs_backend_max": float(np.abs(elbo(params, x, s, L) - elbo_b).max()),
        "mc_elbo_mean": float(mc.mean()),
        "mc_se": mc_se_mean,
        "mc_z": mc_z,
        "mc_samples": K,
        "iwae": iwae_rows,
        "ortho_gap_max": float(np.abs(ortho_gap).max()),
        "ortho_elbo_minus_log_px_max": float(ortho_diff.max()),
        "per_example": {"log_px": exact, "elbo": elbo_b, "kl_posterior": gap, "residual": residual},
    }
    metrics["checks"] = checks(metrics)
    return Result(metrics=metrics, backend_env=b.version())


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


def summarize(records: list[dict[str, Any]]) -> Summary:
    rows, notes, ok = [], [], True
    for r in by_framework(records):
        m = r["metrics"]
        if r["status"] != "ok":
            ok = False
            rows.append({"framework": r["framework"], "status": r["status"]})
            notes.append(f"{r['framework']}: {r['error']}")
            continue
        verdicts = checks(m)  # recomputed from the numbers: a stored True cannot hide a NaN
        ok = ok and all(verdicts.values())
        iw = " ".join(f"{x['iwae']:.4f}" for x in m["iwae"])
        rows.append(
            {
                "framework": r["framework"],
                "log p(x)": fmt(m["log_px_mean"], ".4f"),
                "ELBO": fmt(m["elbo_mean"], ".4f"),
                "KL(q‖posterior)": fmt(m["gap_mean"], ".4f"),
                "max abs(log p − ELBO − KL)": fmt(m["residual_max"], ".1e"),
                "MC ELBO (SE)": f"{m['mc_elbo_mean']:.4f} ({m['mc_se']:.4f})",
                f"IWAE k={','.join(str(x['k']) for x in m['iwae'])}": iw,
                "orthogonal W: max gap": fmt(m["ortho_gap_max"], ".1e"),
                "pass": "yes" if all(verdicts.values()) else "NO: " + ", ".join(k for k, v in verdicts.items() if not v),
            }
        )
    if rows and "log p(x)" in rows[0]:
        notes.append(
            f"means over {records[0]['metrics'].get('n_examples')} examples, float64; "
            f"residual tolerance {records[0]['metrics'].get('tol')}"
        )
    return Summary("ELBO identity on the linear-Gaussian VAE: log p(x) = ELBO + KL(q ‖ posterior)", rows, ok and bool(rows), notes)


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
    good = [r for r in records if r["status"] == "ok" and "residual_max" in r["metrics"]]
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
    for r in records:
        m, fw = r["metrics"], f"{r['framework']}/{r['mode']}"
        if r["status"] != "ok" or "residual_max" not in m:
            continue
        for key in ("log_px_mean", "elbo_mean", "gap_mean", "mc_elbo_mean"):
            out[f"{fw} {key}"] = Quantity(m[key], "rel", 1e-9)
        out[f"{fw} residual_max"] = Quantity(m["residual_max"], "limit", float(m["tol"]))
        out[f"{fw} checks"] = Quantity(",".join(k for k, v in checks(m).items() if not v) or "all pass", "same")
    return out

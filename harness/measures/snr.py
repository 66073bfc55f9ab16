"""Does a tighter bound train the encoder worse? The signal-to-noise ratio of the IWAE-K
gradient for the decoder and for the encoder as K grows (Rainforth et al. 2018, "Tighter
variational bounds are not necessarily better").

Theory. For IWAE-K with one data point, the expected decoder gradient tends to a non-zero
limit (the gradient of log p(x)) while its standard deviation falls like 1/sqrt(K): the
decoder's SNR = |E g| / sd(g) grows like sqrt(K). The encoder's expected gradient vanishes
like 1/K (log p(x) does not depend on the encoder, and IWAE-K -> log p(x)) while its standard
deviation falls only like 1/sqrt(K): the encoder's SNR falls like 1/sqrt(K). On a log-log
plot: slope +0.5 for the decoder, -0.5 for the encoder.

What is measured. For each K, n_K = max(`draws`, `samples` / K) independent draws of the per-example gradient of
-IWAE_K (the backend's `iwae_grads(x, eps, per_example=True)`, harness noise eps of shape
(K, rows, latent), the data points repeated along the rows so that one call gives many draws).
Per parameter p (and data point): mean m_p and variance v_p over the n draws, and the
bias-corrected squared SNR  r2_p = m_p^2 / v_p - 1/n  (E[m^2] = mu^2 + v/n, so m^2/v
overstates mu^2/v by 1/n: a zero-mean gradient would otherwise show an SNR of about
1/sqrt(n)). A block's SNR is the root mean square over its parameters (and the data points)
of the per-parameter SNR: SNR = sqrt(mean_p r2_p); each parameter's SNR scales with the same
power of K, so the block's does too.

Noise floor. The draws are split round-robin into `groups` groups. The floor is what the
block's SNR would read for a gradient with no signal at all: the group sums' deviations from
the overall mean, multiplied by random signs, give mean estimates with the draws' own
covariance (correlations between parameters included) and zero expectation; the standard
deviation of the block statistic over 200 sign patterns is the null spread, and the floor is
sqrt(2 x that spread) (two standard deviations, in SNR units). `naive_floor` = 1/sqrt(n) is
the level the uncorrected |m|/sd cannot go below. A K enters the slope fit only where its
SNR is at least `floor_ratio` times the floor ("resolved").

Confidence intervals. Slope = least squares of log SNR on log K over the resolved Ks;
delete-one-group jackknife over the draw groups (group g removed at every K at once: the
groups are independent) gives its standard error, and the 95% interval uses Student's t
with groups-1 degrees of freedom. Per K, the jackknife also gives an interval for the SNR.

Rainforth's toy via the linear model (`toy`): p(z) = N(mu, I), x | z ~ N(z, I),
q(z|x) = N(Ax + b, 2/3 I), D = latent = `dim` (20). In the canonical linear VAE (z ~ N(0, I),
x | z ~ N(z W + c, s^2 I)) that is W = I, c = mu, s = 1 (z shifted by mu), and an encoder
mean x A_mu + a_mu with A_mu = A^T, a_mu = b - mu. The optimum A = I/2, b = mu/2 (the exact
posterior mean) is perturbed by N(0, `perturb`^2) noise (0.01 as in the paper), and so are
W and c. The data points are drawn from p(x) = N(mu, 2 I), mu ~ N(0, I).
Fixed encoder variance: the canonical encoder also outputs the log-variance, linearly in x.
Its weights are set to zero and its bias to log(2/3), and those parameters are left out of
the encoder block. Since nothing is trained here, a parameter left out of the block is
exactly a frozen one, and the model spec needs no new option.
The perturbation must stay small: near the optimum the importance weights are nearly equal
and the asymptotic regime starts at K ~ 1 (at perturb = 0.05 the decoder slope over
K = 1..1000 is 0.3, not 0.5). The price is a small encoder signal: its SNR is ~0.08 at K = 1
and ~0.003 at K = 1000, while the floor falls only like 1/sqrt(draws) (about 0.6/sqrt(n) here):
resolving K = 1000 at 3x the floor takes ~600,000 draws (`draws=600000`: minutes to tens of
minutes per framework on 2 CPU cores; `framework.mode=compiled` helps). Small K are cheap, so
by default each K gets max(`draws`, `samples` / K) draws: that resolves the encoder over
K = 1..10 and the decoder over the whole range in about a minute per framework.

The trained model (`trained`): the configured model (model=..., data=...) trained for
`trained_epochs` epochs with its own optimizer and RNG, then the same measurement on
`trained_points` test examples for `trained_ks` (all encoder parameters, all decoder
parameters). Reported, not judged against theory: the asymptotic slopes need the weights to
be nearly equal, which a trained MLP may not reach within K <= 1000.

Checks (toy, per block): the resolved Ks span at least `min_decades` decades of K, and the
fitted slope lies within `decoder_tol` of +0.5 and within `encoder_tol` of -0.5.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from harness import data as data_mod
from harness import lingauss as lg
from harness.api import ModelSpec
from harness.initializers import init_params
from harness.job import Job, Result
from harness.judged import Judged, describe, finite, le
from harness.metrics import plain
from harness.plots import pyplot, save_png
from harness.schema import ConfigError, setting

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

THEORY = {"decoder": 0.5, "encoder": -0.5}
BLOCK_ORDER = ("decoder", "encoder")
NULL_PATTERNS = 200  # random sign patterns for the noise floor
NOISE_TAG = {"toy": 31, "trained": 32}


@dataclass
class SnrConfig:
    ks: list[int] = setting([1, 3, 10, 30, 100, 300, 1000], gt=0, nonempty=True)  # toy: IWAE sample counts
    draws: int = setting(4000, gt=1)  # toy: gradient draws per K (and data point), at least
    samples: int = setting(400_000, ge=0)  # toy: ... and at least samples / K draws (small K are cheap)
    points: int = setting(1, gt=0)  # toy: data points (their per-parameter SNRs are pooled)
    dim: int = setting(20, gt=0)  # toy: D = latent
    perturb: float = setting(0.01, ge=0)  # toy: sd of the perturbation of the optimum
    groups: int = setting(20, gt=2)  # draw groups: jackknife intervals and the noise floor
    floor_ratio: float = setting(3.0, gt=0)  # a K enters the fit only if its SNR >= this x the floor
    min_decades: float = setting(1.0, ge=0)  # toy: resolved Ks must span this many decades
    decoder_tol: float = setting(0.1, gt=0)  # toy: |slope - 0.5|
    encoder_tol: float = setting(0.15, gt=0)  # toy: |slope + 0.5|
    chunk_samples: int = setting(20000, gt=0)  # K x rows per backend call (memory, speed)
    chunk_values: int = setting(4_000_000, gt=0)  # rows x parameters per call (per-example gradients)
    trained: bool = True  # also the configured model after a short training run
    trained_epochs: int = setting(5, ge=0)
    trained_ks: list[int] = setting([1, 3, 10, 30, 100], gt=0, nonempty=True)
    trained_draws: int = setting(1000, gt=1)
    trained_samples: int = setting(0, ge=0)
    trained_points: int = setting(2, gt=0)


Config = SnrConfig


@dataclass
class Block:
    """One block of one part: per K (in the order of the part's `ks`) the SNR, its interval
    and floors, and the fit over the resolved Ks (`fit_slope`: null where there is none)."""

    params: int
    snr: list[float]
    t: list[float]
    snr_lo: list[float]
    snr_hi: list[float]
    floor: list[float]
    naive_floor: list[float]
    theory: float
    resolved: list[bool]
    fit_ks: list[int]
    slope: float | None
    slope_se: float | None
    slope_ci: list[float] | None
    intercept: float | None
    min_floor_ratio: float | None  # the smallest SNR / floor over the resolved Ks
    tol: float | None = None  # the toy's: |slope - theory| allowed
    span_decades: float | None = None  # the toy's: decades of K fitted


@dataclass
class Part:
    """What every part has (`summarize_part`): the Ks, draws and seconds per K, the blocks."""

    ks: list[int]
    draws: list[int]
    seconds: list[float]
    points: int
    groups: int
    floor_ratio: float
    blocks: dict[str, Block]  # by block name (BLOCK_ORDER)


@dataclass
class ToyPart(Part):
    dim: int
    perturb: float
    model: str
    min_decades: float | None = None  # absent from records written before it was stored
    checks: dict[str, bool] | None = None  # the verdicts, from the numbers above (`toy_checks`)


@dataclass
class TrainedPart(Part):
    model: str
    epochs: int
    steps: int
    test_elbo: float


@dataclass(kw_only=True)
class SnrMetrics:
    """The snr record's metrics (`harness.metrics`: built here, stored by `plain`, read back by
    `load`)."""

    toy: ToyPart
    trained: TrainedPart | None = None  # with `trained=true`
    checks: dict[str, bool] | None = None  # the toy's verdicts (the trained part is not judged)
    seconds: float


METRICS = SnrMetrics
#: what it reads (`harness.measures`): the toy builds its model from its section, in float64;
#: the trained part reads the configured model, data and optimizer (`reads`: only with `trained=true`)
READS = ("framework", "-framework.precision", "seed", "model", "data", "optim", "measure.snr")
VERSION = 1
#: what only the trained part reads
TRAINED_READS = ("model", "data", "optim")
TRAINED_SETTINGS = ("trained_epochs", "trained_ks", "trained_draws", "trained_samples", "trained_points")


def reads(config: dict[str, Any]) -> tuple[str, ...]:
    """READS; without the trained part's inputs and settings when `measure.snr.trained` is false."""
    if ((config.get("measure") or {}).get("snr") or {}).get("trained", SnrConfig().trained):
        return READS
    return (*(r for r in READS if r not in TRAINED_READS), *(f"-measure.snr.{k}" for k in TRAINED_SETTINGS))


def precision(c: AppConfig) -> str:
    return "float64"  # per-parameter means far below the standard deviation: keep every digit


def validate(c: AppConfig) -> None:
    s = c.measure.snr
    for key in ("ks", "trained_ks"):
        ks = getattr(s, key)
        if len(set(ks)) != len(ks) or len(ks) < 2:
            raise ConfigError(f"measure.snr.{key}", f"needs at least two distinct K values, got {ks}")
    if s.draws < s.groups or s.trained_draws < s.groups:
        raise ConfigError("measure.snr.draws", f"needs at least `groups` ({s.groups}) draws per K")


# --- the estimator (NumPy, no backend) --------------------------------------------------------


class DrawMoments:
    """Streaming sums of gradient draws (rows of shape (P,)) in G groups, draw i in group
    i mod G, shifted by the first batch's mean (so that the variance is not computed as a
    difference of two large numbers)."""

    def __init__(self, groups: int) -> None:
        self.groups = groups
        self.shift: np.ndarray | None = None
        self.s1 = np.zeros(0)
        self.s2 = np.zeros(0)
        self.counts = np.zeros(groups)
        self._next = 0

    def add(self, draws: np.ndarray) -> None:
        d = np.asarray(draws, dtype=np.float64)
        if self.shift is None:
            self.shift = d.mean(axis=0)
            self.s1 = np.zeros((self.groups, d.shape[1]))
            self.s2 = np.zeros((self.groups, d.shape[1]))
        d = d - self.shift
        idx = (self._next + np.arange(len(d))) % self.groups
        self._next = (self._next + len(d)) % self.groups
        for g in range(self.groups):  # G vectorised sums rather than a scatter per row
            sel = d[idx == g]
            if len(sel):
                self.s1[g] += sel.sum(axis=0)
                self.s2[g] += np.einsum("ij,ij->j", sel, sel)
                self.counts[g] += len(sel)

    @property
    def n(self) -> int:
        return int(self.counts.sum())


def _t_stat(s1: np.ndarray, s2: np.ndarray, n: float, shift: np.ndarray) -> float:
    """Mean over coordinates of the bias-corrected squared SNR, m^2/v - 1/n."""
    mean = s1 / n
    var = (s2 - n * mean**2) / (n - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = (mean + shift) ** 2 / var - 1.0 / n
    r2 = r2[np.isfinite(r2)]  # a parameter with zero variance (no gradient at all) carries no SNR
    return float(r2.mean()) if r2.size else math.nan


def block_statistics(m: DrawMoments, seed: int = 0) -> dict[str, Any]:
    """The block statistic T = mean_p r2_p and its SNR sqrt(max(T, 0)), the delete-one-group
    jackknife values of T, the noise floor (see the module docstring) and the naive floor."""
    assert m.shift is not None, "no draws"
    n = m.counts.sum()
    S1, S2 = m.s1.sum(axis=0), m.s2.sum(axis=0)
    t = _t_stat(S1, S2, n, m.shift)
    jack = [_t_stat(S1 - m.s1[g], S2 - m.s2[g], n - m.counts[g], m.shift) for g in range(m.groups)]
    mean = S1 / n
    var = (S2 - n * mean**2) / (n - 1)
    keep = var > 0
    dev = (m.s1 - m.counts[:, None] * mean)[:, keep]  # per-group sums of deviations from the mean
    rng = np.random.default_rng(seed)
    signs = rng.choice([-1.0, 1.0], size=(NULL_PATTERNS, m.groups))
    null_means = signs @ dev / n  # (patterns, P): zero expectation, the mean's covariance
    null_t = (null_means**2 / var[keep] - 1.0 / n).mean(axis=1)
    spread = float(null_t.std())
    jack_a = np.asarray(jack)
    se = float(math.sqrt((m.groups - 1) / m.groups * np.sum((jack_a - jack_a.mean()) ** 2)))
    return {
        "n": int(n),
        "t": t,
        "t_se": se,
        "snr": math.sqrt(max(t, 0.0)),
        "jack": jack,
        "floor": math.sqrt(2.0 * spread),
        "naive_floor": 1.0 / math.sqrt(n),
    }


def t_quantile(dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, dof))


def fit_slope(ks: list[int], stats: list[dict[str, Any]], floor_ratio: float, groups: int) -> dict[str, Any]:
    """Least-squares slope of log SNR on log K over the resolved Ks, with a jackknife 95%
    interval (see the module docstring). `resolved` per K; slope None with fewer than two."""
    resolved = [
        bool(s["t"] > 0 and s["snr"] >= floor_ratio * s["floor"] and all(j > 0 for j in s["jack"])) for s in stats
    ]
    idx = [i for i, r in enumerate(resolved) if r]
    out: dict[str, Any] = {"resolved": resolved, "fit_ks": [ks[i] for i in idx], "slope": None, "slope_se": None,
                           "slope_ci": None, "intercept": None}
    if len(idx) < 2:
        return out
    lk = np.log([ks[i] for i in idx])
    slope, intercept = np.polyfit(lk, [0.5 * math.log(stats[i]["t"]) for i in idx], 1)
    js = np.array([np.polyfit(lk, [0.5 * math.log(stats[i]["jack"][g]) for i in idx], 1)[0] for g in range(groups)])
    se = float(math.sqrt((groups - 1) / groups * np.sum((js - js.mean()) ** 2)))
    half = t_quantile(groups - 1) * se
    out.update(slope=float(slope), intercept=float(intercept), slope_se=se, slope_ci=[float(slope - half), float(slope + half)])
    return out


def snr_interval(s: dict[str, Any], groups: int) -> tuple[float, float]:
    """95% interval for one K's block SNR from the jackknife SE of T (clipped at zero)."""
    half = t_quantile(groups - 1) * s["t_se"]
    return math.sqrt(max(s["t"] - half, 0.0)), math.sqrt(max(s["t"] + half, 0.0))


# --- drawing gradients ------------------------------------------------------------------------

#: block name -> [(parameter name, column selector on its per-example gradient)]
Selection = dict[str, list[tuple[str, Callable[[np.ndarray], np.ndarray]]]]


def _all(g: np.ndarray) -> np.ndarray:
    return g


def block_selection(spec: ModelSpec, *, fixed_logvar: bool) -> Selection:
    """Every parameter by block; with `fixed_logvar` the encoder's output layer keeps only its
    mean columns (the log-variance weights and bias are fixed, out of the block)."""
    last = f"encoder.{spec.n_layers('encoder') - 1}."
    L = spec.latent
    sel: Selection = {b: [] for b in BLOCK_ORDER}
    for name in spec.param_shapes():
        block = name.split(".", 1)[0]
        if fixed_logvar and name.startswith(last):
            sel[block].append((name, lambda g: g[..., :L]))
        else:
            sel[block].append((name, _all))
    return sel


def block_sizes(spec: ModelSpec, sel: Selection) -> dict[str, int]:
    shapes = spec.param_shapes()
    return {b: int(sum(f(np.zeros((1, *shapes[n]))).size for n, f in items)) for b, items in sel.items()}


def draw_statistics(
    b: Any,
    x: np.ndarray,
    ks: list[int],
    draws: int,
    samples: int,
    sel: Selection,
    *,
    groups: int,
    seed: int,
    tag: int,
    chunk_samples: int,
    chunk_values: int,
    on_k: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """For each K: max(draws, samples / K) (or a few more) per-example gradient draws of
    -IWAE_K for every point of `x` (points pooled as coordinates), the block statistics of
    each block, timings."""
    spec: ModelSpec = b.spec
    P, B = sum(int(np.prod(s)) for s in spec.param_shapes().values()), len(x)
    per_k: list[dict[str, Any]] = []
    for K in ks:
        t0 = time.perf_counter()
        n_k = max(draws, -(-samples // K))
        most = max(1, min(chunk_samples // (K * B), chunk_values // (B * P)))
        chunks = -(-n_k // most)
        reps = -(-n_k // chunks)  # equal calls (one trace per K where the framework traces)
        xr = np.tile(x, (reps, 1))
        moments = {blk: DrawMoments(groups) for blk in sel}
        for i in range(chunks):
            eps = data_mod.noise((K, reps * B, spec.latent), seed, tag, K, i)
            g = b.iwae_grads(xr, eps, per_example=True)
            for blk, items in sel.items():
                flat = [f(g[name]).reshape(reps * B, -1) for name, f in items]
                moments[blk].add(np.concatenate(flat, axis=1).reshape(reps, -1))  # draw = (point, param)
        stats = {blk: block_statistics(m, seed=K) for blk, m in moments.items()}
        secs = time.perf_counter() - t0
        per_k.append({"k": K, "draws": chunks * reps, "seconds": secs, "stats": stats})
        if on_k is not None:
            on_k(K, secs)
    return {"per_k": per_k}


def summarize_part(ks: list[int], drawn: dict[str, Any], sel: Selection, spec: ModelSpec, *, groups: int,
                   floor_ratio: float, points: int) -> dict[str, Any]:
    """The record's view of one part: per block the SNR, interval, floors per K and the fit
    (the fields of `Part`, for the part's own type)."""
    sizes = block_sizes(spec, sel)
    per_k = drawn["per_k"]
    blocks: dict[str, Block] = {}
    for blk in sel:
        stats = [pk["stats"][blk] for pk in per_k]
        fit = fit_slope(ks, stats, floor_ratio, groups)
        ci = [snr_interval(s, groups) for s in stats]
        resolved = [s for s, r in zip(stats, fit["resolved"]) if r]
        blocks[blk] = Block(
            params=sizes[blk],
            snr=[s["snr"] for s in stats],
            t=[s["t"] for s in stats],
            snr_lo=[c[0] for c in ci],
            snr_hi=[c[1] for c in ci],
            floor=[s["floor"] for s in stats],
            naive_floor=[s["naive_floor"] for s in stats],
            theory=THEORY[blk],
            **fit,
            min_floor_ratio=min((s["snr"] / s["floor"] for s in resolved), default=None),
        )
    return {
        "ks": list(ks),
        "draws": [pk["draws"] for pk in per_k],
        "seconds": [pk["seconds"] for pk in per_k],
        "points": points,
        "groups": groups,
        "floor_ratio": floor_ratio,
        "blocks": blocks,
    }


# --- the two problems ------------------------------------------------------------------------


def _progress_line(c: AppConfig, job: Job, part: str) -> Callable[[int, float], None]:
    def line(k: int, secs: float) -> None:
        if c.progress:
            print(f"snr {job.framework} {part}: K={k} done in {secs:.1f}s", flush=True)

    return line


def run_toy(c: AppConfig, job: Job) -> tuple[ToyPart, dict[str, Any]]:
    s = c.measure.snr
    spec, params, x = lg.rainforth_toy(s.dim, s.perturb, s.points, c.seed)
    b = backend(c, job.framework, spec=spec, dtype="float64", params=params)
    sel = block_selection(spec, fixed_logvar=True)
    drawn = draw_statistics(b, x, list(s.ks), s.draws, s.samples, sel, groups=s.groups, seed=c.seed, tag=NOISE_TAG["toy"],
                            chunk_samples=s.chunk_samples, chunk_values=s.chunk_values, on_k=_progress_line(c, job, "toy"))
    common = summarize_part(list(s.ks), drawn, sel, spec, groups=s.groups, floor_ratio=s.floor_ratio, points=s.points)
    part = ToyPart(**common, dim=s.dim, perturb=s.perturb, model=f"Rainforth toy (linear-Gaussian, D={s.dim})",
                   min_decades=s.min_decades)
    for blk in BLOCK_ORDER:
        r = part.blocks[blk]
        fk = r.fit_ks
        r.tol = s.decoder_tol if blk == "decoder" else s.encoder_tol
        r.span_decades = math.log10(max(fk) / min(fk)) if len(fk) >= 2 else 0.0
    part.checks = toy_checks(plain(part))
    return part, b.version()


def toy_checks(part: dict[str, Any]) -> dict[str, bool]:
    """The toy's verdicts, per block, from the record's numbers: the fitted Ks span at least
    `min_decades` decades with a finite SNR, t and floor at each of them, and the fitted slope
    (finite) lies within its tolerance of theory. A NaN or inf in them fails the check."""
    md = float(part.get("min_decades", SnrConfig().min_decades))
    ks = list(part.get("ks") or [])
    checks: dict[str, bool] = {}
    for blk in BLOCK_ORDER:
        r = (part.get("blocks") or {}).get(blk) or {}
        fk = list(r.get("fit_ks") or [])
        at = [ks.index(k) for k in fk if k in ks]
        values_ok = all(finite(r[key][i]) for key in ("snr", "t", "floor") for i in at if len(r.get(key) or []) > i)
        span = math.log10(max(fk) / min(fk)) if len(fk) >= 2 else 0.0
        checks[f"{blk}: resolved K span >= {md:g} decades"] = len(fk) >= 2 and values_ok and span >= md - 1e-12
        slope, tol = r.get("slope"), r.get("tol")
        ci = r.get("slope_ci")
        checks[f"{blk}: slope within {THEORY[blk]:+g} ± {tol:g}" if isinstance(tol, int | float) else f"{blk}: slope"] = (
            slope is not None and finite(slope, tol) and (ci is None or finite(ci)) and le(abs(slope - THEORY[blk]), tol))
    return checks


def nonfinite_ks(part: dict[str, Any]) -> list[str]:
    """Where a block's SNR, t or noise floor is not finite, named by K: "encoder SNR is NaN at K=3"."""
    out = []
    ks = list(part.get("ks") or [])
    for blk in BLOCK_ORDER:
        r = (part.get("blocks") or {}).get(blk) or {}
        for key, name in (("snr", "SNR"), ("t", "squared SNR (t)"), ("floor", "noise floor")):
            for k, v in zip(ks, r.get(key) or []):
                if not finite(v):
                    out.append(f"{blk} {name} is {describe(v)} at K={k}")
                    break
    return out


def run_trained(c: AppConfig, job: Job) -> TrainedPart:
    s = c.measure.snr
    ds = dataset(c)
    spec = model_spec(c, ds)
    b = backend(c, job.framework, spec=spec, dtype="float64", params=init_params(spec, c.seed))
    steps = train(b, ds.x_train, c.data.batch_size, c, epochs=s.trained_epochs, desc=f"snr {job.framework}: training")
    x = ds.x_test[: s.trained_points]
    test_elbo = float(np.mean(-b.terms(ds.x_test, data_mod.noise((10, len(ds.x_test), spec.latent), c.seed, 33)).loss))
    sel = block_selection(spec, fixed_logvar=False)
    drawn = draw_statistics(b, x, list(s.trained_ks), s.trained_draws, s.trained_samples, sel, groups=s.groups, seed=c.seed,
                            tag=NOISE_TAG["trained"], chunk_samples=s.chunk_samples, chunk_values=s.chunk_values,
                            on_k=_progress_line(c, job, "trained"))
    common = summarize_part(list(s.trained_ks), drawn, sel, spec, groups=s.groups, floor_ratio=s.floor_ratio,
                            points=len(x))
    return TrainedPart(**common, model=f"{spec.describe()} on {ds.name}", epochs=s.trained_epochs, steps=steps,
                       test_elbo=test_elbo)


def run(c: AppConfig, job: Job) -> Result:
    t0 = time.perf_counter()
    toy, env = run_toy(c, job)
    trained = run_trained(c, job) if c.measure.snr.trained else None
    metrics = SnrMetrics(toy=toy, trained=trained, checks=toy.checks, seconds=time.perf_counter() - t0)
    return Result(metrics=plain(metrics), backend_env=env)


# --- summary and plots (records alone) --------------------------------------------------------


def _slope_cell(r: dict[str, Any]) -> str:
    if not r or r.get("slope") is None:
        return "-"
    lo, hi = r.get("slope_ci") or (None, None)
    ks = r.get("fit_ks") or []
    ci = f" [{lo:+.3f}, {hi:+.3f}]" if lo is not None and hi is not None else ""
    return f"{r['slope']:+.3f}{ci}" + (f" (K {min(ks)}–{max(ks)})" if ks else "")


def _snr_range(r: dict[str, Any], ks: list[int]) -> str:
    """The SNR at the smallest and the largest resolved K."""
    got = [(k, v) for k, v, res in zip(ks, r.get("snr") or [], r.get("resolved") or []) if res]
    if not got:
        return "-"
    (k0, v0), (k1, v1) = got[0], got[-1]
    return f"{fmt(v0, '.3g')} (K={k0}) → {fmt(v1, '.3g')} (K={k1})"


#: the table's columns
COLUMNS = ["framework", "model", "status", "decoder slope [95% CI] (fitted K)", "encoder slope [95% CI] (fitted K)",
           "decoder SNR (resolved K range)", "encoder SNR (resolved K range)", "largest noise floor", "smallest SNR / floor",
           "draws per K", "pass"]


def toy_held(toy: dict[str, Any]) -> bool:
    """Whether the toy part holds: its checks pass and every SNR, t and floor is finite."""
    return all(toy_checks(toy).values()) and not nonfinite_ks(toy)


def _rows(r: dict[str, Any], notes: list[str]) -> list[dict[str, Any]]:
    """A finished record's rows, its toy and its trained part, and a note per block whose Ks
    the fit left out."""
    m = r["metrics"]
    rows = []
    for name in ("toy", "trained"):
        part = m.get(name)
        if not isinstance(part, dict) or not isinstance(part.get("blocks"), dict):
            continue
        bl = part["blocks"]
        dec, enc = bl.get("decoder") or {}, bl.get("encoder") or {}
        floors = [f for blk in (dec, enc) for f in blk.get("floor", [])]
        ratios = [float(blk["min_floor_ratio"]) for blk in (dec, enc) if blk.get("min_floor_ratio") is not None]
        checks = toy_checks(part) if name == "toy" else None
        bad_ks = nonfinite_ks(part) if name == "toy" else []
        passed = "not judged" if checks is None else ("yes" if all(checks.values()) and not bad_ks else
                                                      "NO: " + ", ".join([*bad_ks, *(k for k, v in checks.items() if not v)]))
        draws = part.get("draws") or []
        rows.append({
            "framework": r["framework"],
            "model": "toy" if name == "toy" else f"trained: {part.get('model', '?')}",
            "status": r["status"],
            "decoder slope [95% CI] (fitted K)": _slope_cell(dec),
            "encoder slope [95% CI] (fitted K)": _slope_cell(enc),
            "decoder SNR (resolved K range)": _snr_range(dec, part.get("ks") or []),
            "encoder SNR (resolved K range)": _snr_range(enc, part.get("ks") or []),
            "largest noise floor": fmt(max(floors) if floors else None, ".2g"),
            "smallest SNR / floor": fmt(min(ratios) if ratios else None, ".3g"),
            "draws per K": str(min(draws)) if draws else "-",
            "pass": passed,
        })
        for blk_name, blk in (("decoder", dec), ("encoder", enc)):
            dropped = [k for k, res in zip(part.get("ks", []), blk.get("resolved", [])) if not res]
            if dropped:
                notes.append(f"{r['framework']} {name} {blk_name}: K = {', '.join(map(str, dropped))} below "
                             f"{part.get('floor_ratio')}× the noise floor, left out of the fit (more draws: "
                             f"measure.snr.{'draws' if name == 'toy' else 'trained_draws'})")
    return rows


def summarize(records: list[dict[str, Any]]) -> Summary:
    s = split(records, "toy", dict, columns=COLUMNS)
    rows, notes = s.table(_rows)
    toys = [r["metrics"]["toy"] for r in s.good]
    ok = bool(records) and s.ok and all(toy_held(t) for t in toys if isinstance(t.get("blocks"), dict))
    notes.append("SNR = root mean square over a block's parameters of the bias-corrected per-parameter |E g| / sd(g) "
                 "of the IWAE-K gradient; theory (Rainforth et al. 2018): decoder slope +0.5, encoder −0.5 in log SNR "
                 "vs log K; 95% intervals from a jackknife over draw groups; noise floor = SNR a zero-signal gradient "
                 "would show (2 SD)")
    return Summary("Gradient signal-to-noise ratio vs IWAE K: does a tighter bound starve the encoder?", rows, ok, notes)


def _plot(records: list[dict[str, Any]], path: Path, part_name: str) -> Path | None:
    recs = completed(by_framework(records), part_name, dict)
    if not recs:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(recs), figsize=(4.4 * len(recs), 3.9), squeeze=False)
    colors = {"decoder": "tab:blue", "encoder": "tab:red"}
    for ax, r in zip(axes[0], recs):
        part = r["metrics"][part_name]
        ks = np.asarray(part.get("ks") or [], dtype=float)
        for blk in BLOCK_ORDER:
            b = (part.get("blocks") or {}).get(blk)
            if not b or any(len(b.get(k) or []) != len(ks) for k in ("snr", "resolved", "snr_lo", "snr_hi", "floor")):
                continue
            snr = np.asarray(b["snr"], dtype=float)
            res = np.asarray(b["resolved"], dtype=bool)
            lo, hi = np.asarray(b["snr_lo"], dtype=float), np.asarray(b["snr_hi"], dtype=float)
            pos = snr > 0
            err = np.vstack([snr - lo, hi - snr])
            ax.errorbar(ks[res & pos], snr[res & pos], yerr=err[:, res & pos], fmt="o", color=colors[blk], ms=4,
                        capsize=2, label=f"{blk} (slope {b['slope']:+.2f})" if isinstance(b.get("slope"), float) else blk)
            if np.any(~res & pos):
                ax.plot(ks[~res & pos], snr[~res & pos], "o", mfc="none", color=colors[blk], ms=5, label=f"{blk}: below floor")
            ax.plot(ks, b["floor"], ":", color=colors[blk], lw=1)
            if b.get("slope") is not None and b.get("fit_ks") and b.get("intercept") is not None:
                fk = np.asarray(b["fit_ks"], dtype=float)
                ax.plot(fk, np.exp(b["intercept"]) * fk ** b["slope"], "-", color=colors[blk], lw=1)
                k0 = fk[0]
                s0 = np.exp(b["intercept"]) * k0 ** b["slope"]
                ax.plot(ks, s0 * (ks / k0) ** b.get("theory", THEORY[blk]), "--", color="gray", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("K (IWAE samples)")
        ax.set_title(f"{r['framework']}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[0][0].set_ylabel("gradient SNR (RMS over block)")
    title = "Rainforth toy (D=20)" if part_name == "toy" else f"trained: {recs[0]['metrics'][part_name].get('model', '')}"
    fig.suptitle(f"{title}: log SNR vs log K; dashed: slope ±1/2; dotted: noise floor", fontsize=10)
    return save_png(fig, path)


def plot_toy(records: list[dict[str, Any]], path: Path) -> Path | None:
    return _plot(records, path, "toy")


def plot_trained(records: list[dict[str, Any]], path: Path) -> Path | None:
    return _plot(records, path, "trained")


PLOTS = {"snr_toy.png": plot_toy, "snr_trained.png": plot_trained}

JUDGED = (
    Judged("toy.blocks.*.slope", "toy: fitted slope of log SNR on log K"),
    Judged("toy.blocks.*.slope_ci", "toy: 95% interval of the slope"),
    Judged("toy.blocks.*.snr", "toy: SNR", axis="K no."),
    Judged("toy.blocks.*.t", "toy: squared SNR (t)", axis="K no."),
    Judged("toy.blocks.*.floor", "toy: noise floor", axis="K no."),
)

QUESTION = "Does a tighter bound (IWAE-K) starve the encoder of gradient signal?"


def answer(records: list[dict[str, Any]]) -> str:
    """One line for the suite's summary, from the records."""
    good = completed(records, "toy", dict)
    if not good:
        return "NO: no completed run"
    parts = []
    for r in good:
        bl = r["metrics"]["toy"].get("blocks") or {}
        cells = []
        for blk in BLOCK_ORDER:
            b = bl.get(blk) or {}
            if b.get("slope") is None or not b.get("slope_ci"):
                cells.append(f"{blk} unresolved")
            else:
                cells.append(f"{blk} {b['slope']:+.2f} [{b['slope_ci'][0]:+.2f}, {b['slope_ci'][1]:+.2f}]")
        parts.append(f"{r['framework']}: " + ", ".join(cells))
    held = [r for r in good if toy_held(r["metrics"]["toy"])]
    verdict = ("yes, as theory says: the decoder's gradient SNR grows like sqrt(K), the encoder's falls like "
               "1/sqrt(K)" if len(held) == len(records) else
               "NO: not as theory says (or not resolved) in " + ", ".join(r["framework"] for r in records if r not in held))
    return f"{verdict}; toy slopes of log SNR vs log K: " + "; ".join(parts)


def compared(records: list[dict[str, Any]]) -> dict[str, Quantity]:
    """For `vaebench compare`: the toy's fitted slopes to 1e-6 (float64, harness noise: the
    same draws on every CPU), which Ks were resolved, and the checks' verdicts; the trained
    model's slopes (its training uses the framework's own RNG) are shown, not judged."""
    out: dict[str, Quantity] = {}
    for fw, m in finished(records, "toy", dict):
        for part, rule in (("toy", "abs"), ("trained", "info")):
            for blk, b in ((m.get(part) or {}).get("blocks") or {}).items():
                if isinstance(b.get("slope"), int | float):
                    out[f"{fw} {part} {blk} slope"] = Quantity(b["slope"], rule, 1e-6)
                if part == "toy":
                    out[f"{fw} toy {blk} fitted K"] = Quantity(b.get("fit_ks"), "same")
        for key, ok in toy_checks(m["toy"]).items():
            out[f"{fw} {key}"] = Quantity(ok, "same")
    return out

"""Does the ELBO's gradient reach the encoder and the decoder?

-ELBO = recon + kl. Theory, with the reparameterised z = mu + sigma * eps:
  recon -> decoder: non-zero (directly);  recon -> encoder: non-zero (through z);
  kl    -> encoder: non-zero;             kl    -> decoder: exactly zero.
For one fixed batch and noise the measure takes the gradient of each part w.r.t. every
parameter and reports, per part x block, the L2 norm, the fraction of parameter tensors with a
non-zero gradient and the largest absolute entry; a verdict compares the pattern with theory.
It also checks the gradients against central finite differences in float64 along random
directions per block, and records per-block gradient norms while training.
Negative controls: model.stop_gradient_z=true (recon must not reach the encoder) and
model.freeze=decoder (the decoder gets nothing): the verdict must fail.

Finite differences. Step and tolerance are derived per check, not fixed, so that the check
means the same at any input width (the loss is ~ D ln 2 nats at D binary pixels, and the
rounding error of evaluating it grows with it; a fixed 1e-6 failed a healthy 784-pixel model).
- Point: the initial weights with every bias drawn from N(0, FD_BIAS²) (`fd_point`), on the
  first `fd_examples` examples of the batch. With the initial zero biases a convolution over a
  blank patch of an image is exactly 0, on a ReLU's kink, where no central difference is valid;
  and a batch of wide layers (~50k ReLUs per 28x28 image in model=conv) has a kink within any
  resolvable step. The gradient tested is the backend's, at that point, on those examples.
- Direction: per block, a standard-normal direction d scaled to the norm of the block's
  parameters, so the step h is relative to the parameter scale.
- Errors of D(h) = (f(θ+hd) - f(θ-hd)) / 2h: truncation ~ h² |f'''| / 6, rounding
  <= C ε F / h, where ε is the machine epsilon of the loss's dtype (float64: 2.2e-16), F the
  part's magnitude (batch mean of the sum of |summands| of its per-example formula, see
  `magnitudes`: it grows with the input width, ~ D ln 2 for recon at D binary pixels, and
  covers cancellation, e.g. in the KL near the prior) and C = FD_ROUNDING_C ulps per evaluation.
- Step: with |f'''| ~ |f| on the parameter scale the optimum is h0 = (3 ε)^(1/3) (float64:
  8.7e-6). It is quartered until no ReLU changes state between θ - hd and θ + hd (nor at ±h/2):
  central differences are only valid on one smooth piece of the function.
- Truncation is estimated by Richardson: T = 4/3 |D(h) - D(h/2)|.
- A check passes when |analytic - D(h)| <= FD_SAFETY (C ε F / h + T). Each row reports
  `rel_err` and `tol`, both relative to max(|analytic|, |D(h)|, bound), and the `step` used
  (relative to the parameter norm). Measured healthy err/tol: <= 0.08 at 64 and 784 pixels
  in all three frameworks; a gradient wrong by 1e-4 relative gives err/tol > 1000.
- Resolution: the same tolerance relative to the RMS directional derivative of the block,
  |grad| |d| / sqrt(n) (a direction nearly orthogonal to the gradient has a tiny derivative,
  hence a large relative tolerance, by chance). A check whose resolution is above
  FD_RESOLUTION could not see a gradient wrong by that much, and one with no kink-free step
  >= FD_MIN_STEP straddles a kink: both fail, so the check cannot pass vacuously. The best
  float64 resolution of model=conv's encoder (recon through z, at the optimal step, rounding and
  truncation balanced) measured 0.9-1.5e-5; the MLP's <= 3e-6.
`measure.gradflow.fd_step` / `fd_tol` > 0 replace the derived relative step / tolerance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from harness import data as data_mod
from harness import reference
from harness.api import BLOCKS, TERMS, ModelSpec, Terms
from harness.initializers import block_of, init_params
from harness.job import Job, Result
from harness.judged import Judged, describe
from harness.metrics import plain
from harness.plots import pyplot, save_png
from harness.schema import setting

if TYPE_CHECKING:
    from harness.config import AppConfig
from harness.measures.common import (
    Quantity,
    Summary,
    TrainingDiverged,
    TrainingLoop,
    backend,
    completed,
    dataset,
    finished,
    fmt,
    model_spec,
    split,
)

#: theory: does each part reach each block?
THEORY: dict[tuple[str, str], bool] = {
    ("recon", "encoder"): True,
    ("recon", "decoder"): True,
    ("kl", "encoder"): True,
    ("kl", "decoder"): False,
}
MONITOR_BATCH = 64


@dataclass
class GradflowConfig:
    fd_directions: int = setting(3, gt=0)  # random directions per block for the finite-difference check
    # examples of the monitored batch the finite-difference check runs on: central differences need
    # a step on which no ReLU changes state, and a wide net (a conv VAE: ~50k ReLUs per 28x28
    # image) over a whole batch has a kink within any resolvable step
    fd_examples: int = setting(8, gt=0)
    fd_step: float = setting(0.0, ge=0)  # relative step (fraction of the block's parameter norm); 0: derived
    fd_tol: float = setting(0.0, ge=0)  # relative tolerance; 0: derived per check from rounding and truncation
    train_steps: int = setting(100, gt=0)  # training run that records per-block gradient norms
    log_every: int = setting(5, gt=0)


Config = GradflowConfig


# --- the record's metrics (`harness.metrics`: built in `run`, stored by `plain`) -------------


@dataclass
class BlockStats:
    """One part's gradient on one block (`block_stats`)."""

    norm: float
    nonzero_fraction: float  # of the block's tensors
    max_abs: float


@dataclass
class Check:
    """One part x block cell of the verdict against theory."""

    part: str
    block: str
    expected: str  # "non-zero" or "zero"
    measured: str  # "non-zero", "zero", "partial" or "not finite"
    ok: bool


@dataclass
class FdWorst:
    block: str
    direction: int
    part: str
    step: float
    rel_err: float
    tol: float


@dataclass
class Verdict:
    """`verdict` and `fd_verdict` as the job computed them (readers recompute them)."""

    checks: list[Check]
    matches_theory: bool
    elbo_trains_decoder: bool
    elbo_trains_encoder: bool
    fd_max_rel_err: float
    fd_worst: FdWorst
    fd_worst_ratio: float
    fd_tol_range: list[float]
    fd_max_resolution: float
    fd_steps: list[float]
    fd_unresolved: int
    fd_kinked: int
    fd_ok: bool


@dataclass
class FdRow:
    """One finite-difference check (`finite_difference_check`, `fd_row`)."""

    block: str
    direction: int
    part: str
    step: float
    smooth: bool
    analytic: float
    numeric: float
    numeric_half: float
    rounding_bound: float
    truncation_est: float
    rel_err: float
    tol: float
    resolution: float
    resolved: bool
    ok: bool


@dataclass
class FdSettings:
    step: float | str  # "derived" unless measure.gradflow.fd_step is set
    tol: float | str
    derived_step_float64: float
    rounding_ulps: float
    safety: float
    resolution: float
    min_step: float
    bias_std: float | None = None  # absent from records before `fd_point`


@dataclass
class Controls:
    stop_gradient_z: bool
    freeze: str


@dataclass
class GradflowMetrics:
    """The gradflow record's metrics (`harness.metrics`: built in `run`, stored by `plain`)."""

    matrix: dict[str, dict[str, BlockStats]]  # part -> block -> stats, in float64 at the initial weights
    verdict: Verdict
    finite_differences: list[FdRow]
    fd_settings: FdSettings
    # per `log_every` steps of training: "step", "{part}/{block}" gradient norms and "loss" (the
    # loss of the step taken next: none at the last step)
    history: list[dict[str, int | float]]
    controls: Controls
    batch_size: int
    fd_examples: int | None = None  # absent from records before `fd_examples`


METRICS = GradflowMetrics
#: what it reads (`harness.measures`): the configured model, data (and batch size) and optimizer
READS = ("framework", "seed", "model", "data", "optim", "measure.gradflow")
VERSION = 1


def precision(c: AppConfig) -> str:
    """The verdict (matrix, finite differences) is computed in float64; the training history
    in the configured precision."""
    return "float64" if c.framework.precision == "float64" else f"float64+{c.framework.precision}"
#: ulps of rounding error allowed per evaluation of the loss, in units of ε F (measured in
#: float64 at 64 and 784 pixels, 3-6 seeds, all three frameworks: |analytic - D(h)| <= 0.83 ε F / h)
FD_ROUNDING_C = 4.0
#: a check passes when its error is at most this many times its error bound
FD_SAFETY = 2.0
#: a derived relative tolerance above this could not see a wrong gradient: the check fails
FD_RESOLUTION = 5e-5
#: smallest relative step tried when looking for a kink-free interval
FD_MIN_STEP = 1e-10
#: standard deviation of the biases at the finite-difference check's point (`fd_point`)
FD_BIAS = 0.05


def fd_point(params: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """The weights the finite-difference check runs at: `params` with every bias drawn from
    N(0, FD_BIAS²), so that no unit sits exactly on its kink (module docstring)."""
    rng = np.random.default_rng([seed, 22])
    return {k: rng.normal(0.0, FD_BIAS, v.shape) if k.endswith(".bias") else v for k, v in params.items()}


def block_stats(grads: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per block: L2 norm, fraction of tensors with any non-zero entry, largest |entry|."""
    out = {}
    for block in BLOCKS:
        gs = [g for k, g in grads.items() if block_of(k) == block]
        out[block] = {
            "norm": float(math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in gs))),
            "nonzero_fraction": sum(bool(np.any(g != 0)) for g in gs) / len(gs),
            "max_abs": max(float(np.max(np.abs(g))) for g in gs),
        }
    return out


def verdict(matrix: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Compare the measured pattern with theory. "Reaches" means every tensor of the block
    gets a non-zero gradient of finite norm; "zero" means the block's gradient is exactly zero
    (norm 0, no tensor non-zero). A NaN or inf norm is neither: the check fails."""
    def reaches(s: dict[str, float]) -> bool:
        return s["nonzero_fraction"] == 1.0 and 0.0 < s["norm"] < math.inf

    checks = []
    for (part, block), expected in THEORY.items():
        s = matrix[part][block]
        zero = s["norm"] == 0.0 and s["nonzero_fraction"] == 0.0
        ok = reaches(s) if expected else zero
        measured = "non-zero" if reaches(s) else "zero" if zero else (
            "partial" if math.isfinite(s["norm"]) and math.isfinite(s["nonzero_fraction"]) else "not finite")
        checks.append({"part": part, "block": block, "expected": "non-zero" if expected else "zero",
                       "measured": measured, "ok": ok})
    return {
        "checks": checks,
        "matches_theory": all(c["ok"] for c in checks),
        "elbo_trains_decoder": reaches(matrix["loss"]["decoder"]),
        "elbo_trains_encoder": reaches(matrix["loss"]["encoder"]),
    }


def derived_step(eps_machine: float) -> float:
    """Optimal relative central-difference step when |f'''| ~ |f| on the parameter scale."""
    return float((3.0 * eps_machine) ** (1.0 / 3.0))


def smooth_step(params: dict[str, np.ndarray], d: dict[str, np.ndarray], x: np.ndarray, eps: np.ndarray,
                spec: ModelSpec, h: float, min_step: float = FD_MIN_STEP) -> tuple[float, bool]:
    """Largest step <= h (by quarters) for which no ReLU changes state between params - h d and
    params + h d (checked at ±h and ±h/2, the points evaluated): central differences are only
    valid on one smooth piece of the function. Returns (step, smooth); smooth is False when no
    kink-free step >= min_step was found (the step returned then straddles a kink)."""
    def at(t: float) -> np.ndarray:
        return reference.activation_pattern({k: v + t * d[k] if k in d else v for k, v in params.items()}, x, eps, spec)

    if getattr(spec, "activation", "relu") != "relu" or not at(0.0).size:  # smooth: no kink to keep off
        return h, True
    base = at(0.0)
    while not all(np.array_equal(at(t), base) for t in (h, -h, h / 2, -h / 2)):
        if h / 4.0 < min_step:
            return h, False
        h /= 4.0
    return h, True


def direction(params: dict[str, np.ndarray], names: list[str], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A standard-normal direction over `names`, scaled to the norm of those parameters (to 1 if
    they are all zero)."""
    z = {k: rng.standard_normal(params[k].shape) for k in names}
    z_norm = math.sqrt(sum(float(np.sum(v**2)) for v in z.values()))
    p_norm = math.sqrt(sum(float(np.sum(np.asarray(params[k], np.float64) ** 2)) for k in names)) or 1.0
    return {k: v * (p_norm / z_norm) for k, v in z.items()}


def magnitudes(params: dict[str, np.ndarray], x: np.ndarray, eps: np.ndarray, spec: ModelSpec) -> dict[str, float]:
    """What each part's rounding error scales with: the batch mean of the sum of |summands| of
    its per-example formula (reference.terms), so that cancellation is accounted for:
    recon (Bernoulli) sum |x l| + softplus(l); recon (Gaussian) sum ((x - m)/s)^2 / 2 + |log s| +
    log(2 pi) / 2; kl sum (mu^2 + exp(logvar) + 1 + |logvar|) / 2. loss: recon + kl. (The
    finite-difference check's error scale, computed by the NumPy oracle: not a measured value.)"""
    mu, logvar = reference.encode(params, x, spec)
    out = reference.decode(params, mu + np.exp(0.5 * logvar) * eps, spec)
    if spec.likelihood == "bernoulli":
        rec = np.abs(x * out) + np.logaddexp(0.0, out)
    else:
        s = spec.obs_sigma
        rec = 0.5 * ((x - out) / s) ** 2 + abs(math.log(s)) + 0.5 * reference.LOG_2PI
    kl = 0.5 * (mu**2 + np.exp(logvar) + 1.0 + np.abs(logvar))
    events = tuple(range(-len(spec.input_shape), 0))  # one example's values (an image: three axes)
    m = {"recon": float(np.mean(np.sum(rec, axis=events))), "kl": float(np.mean(np.sum(kl, axis=-1)))}
    return {**m, "loss": m["recon"] + m["kl"]}


def machine_eps(t: Terms) -> float:
    dtype = np.result_type(t.recon, t.kl)
    return float(np.finfo(dtype if np.issubdtype(dtype, np.floating) else np.float64).eps)


def fd_row(analytic: float, numeric: float, numeric_half: float, h: float, eps_machine: float, mag: float,
           typical: float, tol: float = 0.0) -> dict[str, Any]:
    """Error, error bound and tolerance of one central difference (module docstring). `typical`
    is the RMS directional derivative over random directions of this norm, |grad| |d| / sqrt(n):
    `resolution`, the smallest gradient error the check can see, is relative to it, so that a
    direction nearly orthogonal to the gradient does not make the check unresolved."""
    rounding = FD_ROUNDING_C * eps_machine * mag / h
    truncation = 4.0 / 3.0 * abs(numeric - numeric_half)
    bound = rounding + truncation
    scale = max(abs(analytic), abs(numeric), bound) or 1.0
    err = abs(analytic - numeric) / scale
    row_tol = tol if tol > 0 else FD_SAFETY * bound / scale
    resolution = row_tol * scale / (max(abs(analytic), abs(numeric), typical) or 1.0)
    exact = analytic == numeric == 0.0  # structurally zero (kl -> decoder): nothing to resolve
    resolved = exact or tol > 0 or resolution <= FD_RESOLUTION
    return {"analytic": analytic, "numeric": numeric, "numeric_half": numeric_half,
            "rounding_bound": rounding / scale, "truncation_est": truncation / scale,
            "rel_err": err, "tol": row_tol, "resolution": resolution, "resolved": resolved,
            "ok": exact or (resolved and err <= row_tol)}


def finite_difference_check(b: Any, params: dict[str, np.ndarray], x: np.ndarray, eps: np.ndarray,
                            n_dirs: int, seed: int, *, step: float = 0.0, tol: float = 0.0) -> list[dict[str, Any]]:
    """Directional derivative of each part along random directions within each block: the
    backend's analytic gradient against central differences of the backend's own loss.
    step / tol 0: derived from the loss's dtype and scale (module docstring); > 0: a fixed
    relative step / relative tolerance."""
    rows = []
    rng = np.random.default_rng([seed, 21])
    grads = {part: b.grads(x, eps, part) for part in TERMS}
    eps_machine = machine_eps(b.terms(x, eps))
    h0 = step if step > 0 else derived_step(eps_machine)
    mags = magnitudes(params, x, eps, b.spec)
    for block in BLOCKS:
        names = [k for k in params if block_of(k) == block]
        n = sum(params[k].size for k in names)
        for i in range(n_dirs):
            d = direction(params, names, rng)
            d_norm = math.sqrt(sum(float(np.sum(v**2)) for v in d.values()))
            h, smooth = smooth_step(params, d, x, eps, b.spec, h0, min_step=min(FD_MIN_STEP, h0))
            values: dict[float, Terms] = {}
            for t in (h, -h, h / 2, -h / 2):
                b.set_params({k: v + t * d[k] if k in d else v for k, v in params.items()})
                values[t] = b.terms(x, eps)
            means = {t: v.means() for t, v in values.items()}
            for part in TERMS:
                analytic = sum(float(np.sum(grads[part][k] * d[k])) for k in names)
                numeric = (means[h][part] - means[-h][part]) / (2 * h)
                numeric_half = (means[h / 2][part] - means[-h / 2][part]) / h
                g_norm = math.sqrt(sum(float(np.sum(np.asarray(grads[part][k], np.float64) ** 2)) for k in names))
                row = fd_row(analytic, numeric, numeric_half, h, eps_machine, mags[part], g_norm * d_norm / math.sqrt(n), tol)
                row["ok"] = row["ok"] and smooth
                rows.append({"block": block, "direction": i, "part": part, "step": h, "smooth": smooth, **row})
    b.set_params(params)
    return rows


def fd_row_ok(r: dict[str, Any], fixed_tol: bool = False) -> bool:
    """One finite-difference check's verdict, from its numbers (module docstring): every number
    finite, the step kink-free, and either both derivatives exactly 0 or the error within the
    tolerance at a resolution that could see a wrong gradient."""
    nums = [r["analytic"], r["numeric"], r["rel_err"], r["tol"], r["resolution"]]
    if not all(math.isfinite(float(v)) for v in nums):
        return False
    exact = r["analytic"] == r["numeric"] == 0.0
    resolved = exact or fixed_tol or r["resolution"] <= FD_RESOLUTION
    return bool(r["smooth"]) and (exact or (resolved and r["rel_err"] <= r["tol"]))


def fd_verdict(rows: list[dict[str, Any]], fixed_tol: bool = False) -> dict[str, Any]:
    """The finite-difference rows in brief: the largest error, the worst error/tolerance ratio,
    the tolerances and steps used, and whether every check passed (`fd_row_ok`, recomputed from
    the numbers; `fixed_tol`: measure.gradflow.fd_tol was set)."""
    def ratio(r: dict[str, Any]) -> float:
        if not (math.isfinite(r["rel_err"]) and math.isfinite(r["tol"])):
            return math.inf
        return r["rel_err"] / r["tol"] if r["tol"] > 0 else (math.inf if r["rel_err"] > 0 else 0.0)

    worst = max(rows, key=ratio)
    live = [r for r in rows if r["analytic"] != 0.0 or r["numeric"] != 0.0]  # kl -> decoder is exactly 0
    tols = [r["tol"] for r in live] or [0.0]
    return {
        "fd_max_rel_err": max((r["rel_err"] for r in rows), key=lambda e: e if math.isfinite(e) else math.inf),
        "fd_worst": {k: worst[k] for k in ("block", "direction", "part", "step", "rel_err", "tol")},
        "fd_worst_ratio": ratio(worst),
        "fd_tol_range": [min(tols), max(tols)],
        "fd_max_resolution": max((r["resolution"] for r in live), default=0.0),
        "fd_steps": sorted({r["step"] for r in rows}),
        "fd_unresolved": sum(not r["resolved"] for r in rows),
        "fd_kinked": sum(not r["smooth"] for r in rows),
        "fd_ok": all(fd_row_ok(r, fixed_tol) for r in rows),
    }


def fd_settings(step: float, tol: float) -> FdSettings:
    return FdSettings(step=step or "derived", tol=tol or "derived", derived_step_float64=derived_step(float(np.finfo(np.float64).eps)),
                      rounding_ulps=FD_ROUNDING_C, safety=FD_SAFETY, resolution=FD_RESOLUTION, min_step=FD_MIN_STEP, bias_std=FD_BIAS)


def fd_note(v: dict[str, Any], m: dict[str, Any]) -> str:
    if "fd_worst" not in v:  # a record from before the tolerance was derived: one fixed tolerance
        return f"finite differences (float64): max rel. error {v['fd_max_rel_err']:.1e} (tol {m['fd_tol']:.0e})"
    w = v["fd_worst"]
    lo, hi = v["fd_tol_range"]
    on = f", {m['fd_examples']} examples" if "fd_examples" in m else ""
    note = (f"finite differences (float64{on}): max rel. error {v['fd_max_rel_err']:.1e}, per-check tolerance "
            f"{lo:.0e}..{hi:.0e}; worst {w['rel_err']:.1e} vs tol {w['tol']:.1e} "
            f"({w['part']}/{w['block']}, step {w['step']:.1e})")
    if v["fd_unresolved"]:
        note += f"; {v['fd_unresolved']} check(s) unresolved (could not see a gradient error of {FD_RESOLUTION:.0e})"
    if v["fd_kinked"]:
        note += f"; {v['fd_kinked']} check(s) found no kink-free step"
    return note


def run(c: AppConfig, job: Job) -> Result:
    g = c.measure.gradflow
    ds = dataset(c)
    spec = model_spec(c, ds)
    params = init_params(spec, c.seed)
    x = ds.x_train[:MONITOR_BATCH]
    eps = data_mod.noise((len(x), spec.latent), c.seed, 0)

    # the matrix and the finite-difference check, in float64
    b64 = backend(c, job.framework, spec=spec, dtype="float64", params=params)
    matrix: dict[str, dict[str, dict[str, float]]] = {part: block_stats(b64.grads(x, eps, part)) for part in TERMS}
    n_fd = min(g.fd_examples, len(x))
    at = fd_point(params, c.seed)
    b64.set_params(at)
    fd = finite_difference_check(b64, at, x[:n_fd], eps[:n_fd], g.fd_directions, c.seed, step=g.fd_step, tol=g.fd_tol)

    # over training, in the configured precision and mode
    b = backend(c, job.framework, spec=spec, params=params)
    history: list[dict[str, Any]] = []

    def norms(loop: TrainingLoop, _: bool) -> None:
        stats = {part: block_stats(b.grads(x, eps, part)) for part in TERMS}
        history.append({"step": loop.steps, **{f"{part}/{blk}": stats[part][blk]["norm"] for part in TERMS for blk in BLOCKS}})

    loop = TrainingLoop(b, ds.x_train, c.data.batch_size, c, desc=f"gradflow {job.framework}", hook=norms,
                        every=g.log_every, check_every=1)
    status, error = "ok", None
    try:
        loop.run(steps=g.train_steps)
    except TrainingDiverged as d:  # named by the steps taken before it, as gradflow always has
        status, error = "diverged", f"training loss became {d.loss} at step {d.step - 1}"
    for h in history:  # the loss of the step taken right after the norms were measured, if finite
        if h["step"] < len(loop.losses) and math.isfinite(loop.losses[h["step"]]):
            h["loss"] = loop.losses[h["step"]]

    v = verdict(matrix)
    v.update(fd_verdict(fd, fixed_tol=g.fd_tol > 0))
    metrics = GradflowMetrics(
        matrix={part: {blk: BlockStats(**s) for blk, s in blocks.items()} for part, blocks in matrix.items()},
        verdict=Verdict(**{**v, "checks": [Check(**ch) for ch in v["checks"]], "fd_worst": FdWorst(**v["fd_worst"])}),
        finite_differences=[FdRow(**r) for r in fd],
        fd_settings=fd_settings(g.fd_step, g.fd_tol),
        history=history,
        controls=Controls(stop_gradient_z=spec.stop_gradient_z, freeze=spec.freeze),
        batch_size=len(x),
        fd_examples=n_fd,
    )
    return Result(metrics=plain(metrics), status=status, error=error, backend_env=b.version())


def recomputed_verdict(m: dict[str, Any]) -> dict[str, Any]:
    """The verdict from the record's numbers (matrix and finite-difference rows), never the
    booleans stored beside them: a stored True cannot hide a NaN."""
    fixed = (m.get("fd_settings") or {}).get("tol", "derived") != "derived"
    return {**verdict(m["matrix"]), **fd_verdict(m["finite_differences"], fixed_tol=fixed)}


def history_problem(history: list[dict[str, Any]]) -> str | None:
    """The first non-finite training loss or gradient norm in the history, named with its step."""
    for e in history:
        for key, value in e.items():
            if key != "step" and not math.isfinite(float(value)):
                return f"training {'loss' if key == 'loss' else f'gradient norm {key}'} is {describe(value)} at step {e['step']}"
    return None


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def assess(m: dict[str, Any]) -> tuple[dict[str, Any], str | None, bool]:
    """A finished record's verdict (`recomputed_verdict`), the first non-finite number of its
    training history (`history_problem`), and whether it passes: both gradients as theory says,
    the finite differences and a finite history."""
    v = recomputed_verdict(m)
    bad_history = history_problem(m.get("history") or [])
    passed = (v["matches_theory"] and v["elbo_trains_encoder"] and v["elbo_trains_decoder"] and v["fd_ok"]
              and bad_history is None)
    return v, bad_history, passed


def _rows(r: dict[str, Any], notes: list[str]) -> list[dict[str, Any]]:
    """A finished record's rows, a part each, and its notes: its verdict, and the history's
    first non-finite number if any."""
    m = r["metrics"]
    v, bad_history, passed = assess(m)
    rows = []
    for part in TERMS:
        row: dict[str, Any] = {"framework": r["framework"], "part": part}
        for blk in BLOCKS:
            s = m["matrix"][part][blk]
            row[f"{blk} ‖grad‖"] = fmt(s["norm"], ".3e")
            row[f"{blk} tensors≠0"] = fmt(s["nonzero_fraction"], ".0%")
            row[f"{blk} max abs"] = fmt(s["max_abs"], ".2e")
        expect = {c["block"]: c for c in v["checks"] if c["part"] == part}
        row["theory"] = " ".join(f"{blk}:{expect[blk]['expected']}" for blk in BLOCKS if blk in expect) or "-"
        row["matches"] = ("yes" if all(c["ok"] for c in expect.values()) else "NO") if expect else "-"
        rows.append(row)
    if bad_history:
        notes.append(f"{r['framework']}: {bad_history}")
    ctrl = m["controls"]
    label = "" if not (ctrl["stop_gradient_z"] or ctrl["freeze"] != "none") else f" [control: stop_gradient_z={ctrl['stop_gradient_z']}, freeze={ctrl['freeze']}]"
    notes.append(
        f"{r['framework']}{label}: the ELBO trains the decoder: {_yes(v['elbo_trains_decoder'])}; "
        f"the ELBO trains the encoder: {_yes(v['elbo_trains_encoder'])}"
        f" (reconstruction reaches it: {_yes(m['matrix']['recon']['encoder']['nonzero_fraction'] == 1.0)}); "
        f"pattern matches theory: {_yes(v['matches_theory'])}; "
        f"{fd_note(v, m)} -> {'PASS' if passed else 'FAIL'}"
    )
    return rows


def summarize(records: list[dict[str, Any]]) -> Summary:
    s = split(records, "matrix")  # a record that did not finish: a note, no row (the rows are loss parts)
    rows, notes = s.table(_rows)
    ok = s.ok and bool(rows) and all(assess(r["metrics"])[2] for r in s.good)
    return Summary("Gradient flow: which loss part reaches which block (float64, one batch)", rows, ok, notes)


def plot_gradflow(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Heatmap of log10 gradient norm, parts x blocks, one panel per framework; exact zeros
    are shown as such (not as a colour)."""
    recs = completed(records, "matrix")
    if not recs:
        return None
    plt = pyplot()
    parts, blocks = ["loss", "recon", "kl"], ["encoder", "decoder"]
    fig, axes = plt.subplots(1, len(recs), figsize=(3.6 * len(recs) + 0.8, 3.4), squeeze=False)
    im = None
    allnorms = [r["metrics"]["matrix"][p][b]["norm"] for r in recs for p in parts for b in blocks]
    positive = [n for n in allnorms if n > 0] or [1.0]
    vmin, vmax = np.log10(min(positive)) - 0.5, np.log10(max(positive)) + 0.5
    for ax, r in zip(axes[0], recs):
        norms = np.array([[r["metrics"]["matrix"][p][b]["norm"] for b in blocks] for p in parts])
        with np.errstate(divide="ignore"):
            logn = np.where(norms > 0, np.log10(np.where(norms > 0, norms, 1.0)), np.nan)
        im = ax.imshow(logn, cmap="viridis", vmin=vmin, vmax=vmax)
        for i in range(len(parts)):
            for j in range(len(blocks)):
                txt = "0 (exact)" if norms[i, j] == 0 else f"{norms[i, j]:.2g}"
                ax.text(j, i, txt, ha="center", va="center", color="white" if norms[i, j] == 0 else "black", fontsize=9,
                        bbox={"facecolor": "black" if norms[i, j] == 0 else "white", "alpha": 0.6, "lw": 0})
        ax.set_xticks(range(len(blocks)), blocks)
        ax.set_yticks(range(len(parts)), parts)
        v = recomputed_verdict(r["metrics"])
        ax.set_title(f"{r['framework']}: {'matches theory' if v['matches_theory'] else 'DOES NOT match theory'}", fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=axes[0].tolist(), label="log10 gradient L2 norm", shrink=0.8)
    fig.suptitle("Gradient of each ELBO part reaching each block", fontsize=10)
    return save_png(fig, path, tight=False, bbox_inches="tight")


def plot_gradflow_training(records: list[dict[str, Any]], path: Path) -> Path | None:
    recs = [r for r in records if r["measure"] == "gradflow" and r["metrics"].get("history")]
    if not recs:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    for ax, key in zip(axes, ["loss/encoder", "loss/decoder", "recon/encoder"]):
        for r in recs:
            h = r["metrics"]["history"]
            ax.plot([e["step"] for e in h], [max(e[key], 1e-30) for e in h], marker=".", label=r["framework"])
        ax.set_yscale("log")
        ax.set_title(f"|d {key.split('/')[0]} / d {key.split('/')[1]}|")
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("gradient L2 norm")
    axes[0].legend()
    return save_png(fig, path)


PLOTS = {"gradflow.png": plot_gradflow, "gradflow_training.png": plot_gradflow_training}

JUDGED = (
    Judged("matrix.*.*.norm", "gradient norm (part -> block)"),
    Judged("matrix.*.*.nonzero_fraction", "fraction of tensors with a non-zero gradient (part -> block)"),
    Judged("finite_differences.*.analytic", "finite-difference check: analytic directional derivative"),
    Judged("finite_differences.*.numeric", "finite-difference check: central difference"),
    Judged("finite_differences.*.rel_err", "finite-difference check: relative error"),
    Judged("finite_differences.*.tol", "finite-difference check: tolerance"),
    Judged("finite_differences.*.resolution", "finite-difference check: resolution"),
    Judged("history.*.loss", "training loss"),
    Judged("history.*.*/*", "training gradient norm"),
)


QUESTION = "Do gradients reach both blocks?"


def answer(records: list[dict[str, Any]]) -> str:
    """One line for the suite's summary, from the records."""
    good = completed(records, "matrix")
    verdicts = {id(r): recomputed_verdict(r["metrics"]) for r in good}
    both = [r for r in good if verdicts[id(r)]["elbo_trains_encoder"] and verdicts[id(r)]["elbo_trains_decoder"]]
    theory = [r for r in good if verdicts[id(r)]["matches_theory"] and verdicts[id(r)]["fd_ok"]
              and history_problem(r["metrics"].get("history") or []) is None]
    if good and len(both) == len(theory) == len(records):
        return (f"yes: the ELBO's gradient reaches the encoder and the decoder in {', '.join(r['framework'] for r in both)}; "
                "the KL term reaches only the encoder, as theory says")
    missing = [r["framework"] + ("" if r in good else f" ({r['status']})") for r in records if r not in both or r not in theory]
    return f"NO: not as theory says in {', '.join(missing)}"


def compared(records: list[dict[str, Any]]) -> dict[str, Quantity]:
    """For `vaebench compare`: the part x block pattern (which gradients are zero) and the
    verdicts must be the same; the float64 gradient norms at initialisation agree to 1e-8."""
    out: dict[str, Quantity] = {}
    for fw, m in finished(records, "matrix"):
        for part, blocks in m["matrix"].items():
            for blk, s in blocks.items():
                out[f"{fw} {part}->{blk} non-zero"] = Quantity(s["nonzero_fraction"] > 0, "same")
                out[f"{fw} {part}->{blk} norm"] = Quantity(s["norm"], "rel", 1e-8)
        v = recomputed_verdict(m)
        for key in ("elbo_trains_encoder", "elbo_trains_decoder", "matches_theory", "fd_ok"):
            out[f"{fw} {key}"] = Quantity(v.get(key), "same")
    return out

"""How well and how fast does the VAE learn, in each framework, over several seeds?

One job is one framework x mode; it trains once per seed (`measure.convergence.seeds`; [] means
the top-level `seed` alone). For a given seed every framework starts from the same canonical
weights (`harness.initializers.init_params(spec, seed)`), sees the same batches in the same order
(`harness.data.batches(x, batch_size, seed, epoch)`) and its own RNG is seeded with that seed.
The data set itself is fixed by the top-level `seed` (synthetic data), so seeds vary the
initialisation, the batch order and the noise, not the data.

Noise. Own RNG (default): each framework draws the reparameterisation noise from its own RNG
(`train_step(x)`), so curves agree only statistically. Lockstep (`shared_noise=true`): the
harness feeds `harness.data.noise((B, L), seed, step)` to every framework (`train_step(x, eps)`),
so the curves coincide until rounding separates them; the summary reports the largest spread of
the per-step training loss across frameworks over the first `lockstep_steps` steps. How fast
rounding separates them depends on the model: a step can amplify a rounding-level difference
(a ReLU flips at its kink, Adam divides by a small second moment). So each lockstep job also
trains its first seed's first `lockstep_steps` steps once more, in the same framework from the
weights moved by one ulp (`ulp_control`). Where every control stays within `lockstep_tol` of its
own framework's run (the MLP on 8x8 digits: measured at most 4e-5 nats), the spread across frameworks is
judged against `lockstep_tol`. Where a control leaves it (the conv VAE in float32: one ulp
grows to 0.01-0.5 nats within 20 steps, differently in each framework), the spread measures
rounding luck, not the implementation: it is reported beside the controls and not judged, as
conformance reports float32 free-running trajectories; the per-step conformance checks and the
final-ELBO agreement judge such a model.

Recorded per seed:
- the training loss (-ELBO, batch mean, nats per example) of every step (`record_steps`: the
  first N only);
- an evaluation at step 0, every `eval_every` steps (0: once per epoch) and at the last step:
  step, cumulative training wall time (`sync()` before every clock read; the clock stops at
  every evaluation and epoch end, so evaluation and reading the losses are not counted) and the
  test ELBO, averaged over `elbo_samples` harness noise draws per example (the same draws at
  every evaluation and in every framework);
- per epoch: the mean training ELBO over its steps, and the test ELBO if evaluated at its end;
- at the end: the IWAE-k test log-likelihood (`iwae_k`, 1000 by default; the test set in row
  chunks, the backend chunks the samples) with its standard error, the gap IWAE minus final
  test ELBO (paired per example, with its standard error), and posterior-collapse diagnostics
  computed from the backend's own encoder (`encode`): KL(q(z_i|x) ||
  N(0, 1)) per latent dimension (mean over test examples) and the active units,
  Cov_x(E_q[z_i]) > `active_threshold` (Burda et al. 2015).
- Linear-Gaussian model (model.kind=linear, gaussian likelihood): at every evaluation the exact
  test and training log-likelihood of the current decoder, their gaps to the maximum-likelihood
  pPCA solution with the model's fixed obs_sigma (`harness.ppca`, fitted on the training data)
  and the posterior gap KL(q || p(z|x)) (closed forms from `harness.measures.identity`).

Time to target: the first evaluation whose test ELBO reaches `target_elbo`, or, when it is
None, the best final test ELBO among the frameworks compared minus `target_margin` (decided in
`summarize`, across records; "final" is the last evaluation). Reported as training wall time
(also without the first step, which includes tracing and compilation) and as the step.

Failure: a NaN or inf training loss (or test ELBO) stops the job with status `diverged` and the
step where it happened; what was measured up to there stays in the record. A job that dies
(killed, timed out, out of memory, interrupted) keeps what it had reached too: the metrics are
saved beside the record after evaluations and epochs (at most once a second, and always before
the final IWAE evaluation; `harness.job.checkpoint`), the seed in progress as a run with status
`incomplete`, and its `failed` record carries them with `partial: true`.

Checks in `summarize` (PASS/FAIL): every job ok; the final test ELBOs (mean over seeds) of the
frameworks lie within `agree_nats` of each other; with shared noise, the lockstep spread is at
most `lockstep_tol`; for the linear model, in every seed the final |test gap to the optimum| is
at most `optimum_tol` and the posterior gap at most `posterior_gap_tol`.

Mixed precision (framework.precision=bfloat16|float16: float32 parameters, layers in the low
type; one record per precision, `convergence-<fw>-<mode>-<precision>.json`). Records of several
precisions make one table with a precision column (float32 first in each framework and mode;
frameworks are compared, and lockstep judged, within one precision), float16's skipped steps
(steps its dynamic loss scaling skipped for a non-finite gradient, per seed: `SeedRun.skipped_steps`,
else the record's `env.skipped_steps`, the last seed's backend), and each low precision's row
judged against float32 of the same framework and mode (`precision_checks`): its final test ELBO,
mean over seeds, within max(3 x float32's standard deviation over seeds, 0.1) nats of float32's
mean; a NaN or inf final ELBO, or a low-precision job that did not finish, fails by name.
framework.precision is a column of this table, not a variant of the report (`ROW_KEYS`, read by
`harness.records.measured_config`), so `vaebench report` over a precision sweep gives the one
table; records of different precisions still differ in their config hash (resume, newest-per-config).

Record metrics (`ConvergenceMetrics`): the settings the summary needs, `runs` (one `SeedRun`
per seed, see `train_seed`), and for compatibility the means over completed seeds of `epochs`,
`train_wall_s`, `first_step_s`, `time_to_target_s`, `test_log_likelihood(_se)` (one seed: its
own values).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from harness import data as data_mod
from harness import frameworks, ppca
from harness.api import ModelSpec
from harness.initializers import init_params, one_ulp
from harness.job import Checkpointer, Job, Result
from harness.judged import Judged, describe, finite, le
from harness.lingauss import kl_to_posterior, log_px
from harness.metrics import plain
from harness.plots import COLORS, pyplot, save_png
from harness.schema import ConfigError, setting
from harness.spec import MIXED, param_dtype

if TYPE_CHECKING:
    from harness.config import AppConfig
from harness.measures.common import (
    Quantity,
    Summary,
    TrainingDiverged,
    TrainingLoop,
    backend,
    batch_stream,
    blank_row,
    by_framework,
    dataset,
    fmt,
    model_spec,
    pm,
    split,
)

EVAL_NOISE_SEED = 1234
#: decoded rows (samples x examples) per evaluation call: bounds memory at any test-set size
EVAL_ROWS = 50_000
#: the backends' log_likelihood draws its samples in chunks of this many
IWAE_SAMPLE_CHUNK = 100


@dataclass
class ConvergenceConfig:
    epochs: int = setting(10, gt=0)
    seeds: list[int] = setting([], ge=0, lt=2**32)  # one training run per seed; [] = [seed]
    shared_noise: bool = False  # lockstep: the harness feeds the same noise to every framework
    eval_every: int = setting(0, ge=0)  # steps between test evaluations; 0 = once per epoch
    record_steps: int = setting(0, ge=0)  # per-step training losses kept in the record: the first N (0 = all)
    elbo_samples: int = setting(10, gt=0)  # noise draws per test example for the test ELBO
    target_elbo: float | None = None  # None: best final test ELBO across frameworks - target_margin
    target_margin: float = setting(1.0, gt=0)
    iwae_k: int = setting(1000, gt=0)  # samples for the final test log-likelihood
    active_threshold: float = setting(0.01, gt=0)  # unit i active if Cov_x(E_q[z_i]) exceeds it
    agree_nats: float = setting(1.0, gt=0)  # final test ELBOs of the frameworks within this
    lockstep_steps: int = setting(50, gt=0)  # steps compared in lockstep
    lockstep_tol: float = setting(1e-3, gt=0)  # nats per example
    optimum_tol: float = setting(0.05, gt=0)  # linear model: |test log p gap to the pPCA optimum|
    posterior_gap_tol: float = setting(0.01, gt=0)  # linear model: KL(q || p(z|x)), per example


Config = ConvergenceConfig
#: what it reads (`harness.measures`): the configured model, data and optimizer
READS = ("framework", "seed", "model", "data", "optim", "measure.convergence")
VERSION = 1
#: config keys that are a column of this measure's table rather than a variant of the report:
#: records of several precisions make one table, each low precision judged against float32
ROW_KEYS = ("framework.precision",)


def reads(config: dict[str, Any]) -> tuple[str, ...]:
    """READS; without the top-level `seed` when `measure.convergence.seeds` names the seeds and
    the data set does not depend on it (only synthetic data is drawn from it)."""
    seeds = ((config.get("measure") or {}).get("convergence") or {}).get("seeds") or []
    source = (config.get("data") or {}).get("source")
    return READS if not seeds or source == "synthetic" else tuple(r for r in READS if r != "seed")
#: settings the summary reads back from the record (defaults for older records)
SETTINGS = ("target_margin", "agree_nats", "lockstep_steps", "lockstep_tol", "optimum_tol", "posterior_gap_tol")


# --- the record's metrics (`harness.metrics`: built in `run`, stored by `plain`) -------------


@dataclass
class Evaluation:
    """A test evaluation (`Evaluator`)."""

    step: int
    wall_s: float  # training wall time so far
    test_elbo: float
    # the linear-Gaussian model's exact quantities (while its weights are finite)
    test_log_px: float | None = None
    gap_to_optimum: float | None = None
    train_gap_to_optimum: float | None = None
    posterior_gap: float | None = None


@dataclass
class EpochRow:
    epoch: int
    step: int
    train_elbo: float  # mean over the epoch's steps
    test_elbo: float | None  # None unless evaluated at the epoch's end
    wall_s: float


@dataclass
class FinalEvaluation:
    """IWAE-k and the collapse diagnostics of a completed seed (`final_evaluation`)."""

    test_elbo: float
    test_elbo_se: float
    iwae_k: int
    test_log_likelihood: float
    test_log_likelihood_se: float
    gap: float
    gap_se: float
    kl_per_dim: list[float]
    activity: list[float]
    active_units: int
    latent: int


@dataclass(kw_only=True)
class SeedRun:
    """One seed's training run (`train_seed`); partial metrics hold the seed in progress as
    the first six keys, status `incomplete`."""

    seed: int
    status: str  # "ok" or "diverged"
    error: str | None
    step_loss: list[float]  # every step's training loss (`record_steps`: the first N)
    evals: list[Evaluation]
    epochs: list[EpochRow]
    steps: int
    first_step_s: float | None  # None when no step was taken
    train_wall_s: float
    eval_s: float
    compile_count: int
    time_to_target_s: float | None = None  # only with an explicit target_elbo (`TargetedSeedRun`)
    step_to_target: int | None = None
    final: FinalEvaluation | None = None  # a completed seed's
    skipped_steps: int | None = None  # float16: steps skipped for a non-finite gradient (loss scaling)


@dataclass(kw_only=True)
class TargetedSeedRun(SeedRun):
    """A seed's run under an explicit `target_elbo`: the time and step at which it reached it,
    kept as null when it did not (`field()`: required here, without SeedRun's default)."""

    time_to_target_s: float | None = field()
    step_to_target: int | None = field()


@dataclass
class MeanEpoch:
    """An epoch's row averaged over the completed seeds (None where a seed lacks the value)."""

    epoch: int
    train_elbo: float | None
    test_elbo: float | None
    wall_s: float | None


@dataclass
class Optimum:
    """The linear-Gaussian model's maximum-likelihood pPCA solution (`harness.ppca`)."""

    obs_sigma: float
    train_log_px: float
    test_log_px: float
    eigenvalues: list[float]


@dataclass
class UlpControl:
    seed: int
    step_loss: list[float]  # the first `lockstep_steps` losses from weights one ulp away


@dataclass(kw_only=True)
class ConvergenceRuns:
    """The settings and the seeds' runs: what the metrics hold while seeds train (`partial_metrics`)
    and when none completed."""

    seeds: list[int]
    shared_noise: bool
    batch_size: int
    n_train: int
    n_test: int
    steps_per_epoch: int
    eval_every: int
    elbo_samples: int
    iwae_k: int
    target_elbo: float | None
    target_margin: float
    agree_nats: float
    lockstep_steps: int
    lockstep_tol: float
    optimum_tol: float
    posterior_gap_tol: float
    runs: list[TargetedSeedRun] | list[SeedRun]
    optimum: Optimum | None = None  # the linear-Gaussian model
    ulp_control: UlpControl | None = None  # shared noise: the first seed's one-ulp control


@dataclass(kw_only=True)
class ConvergenceMetrics(ConvergenceRuns):
    """The convergence record's metrics (`harness.metrics`): the runs and, for compatibility,
    the means over the completed seeds (`seed_means`)."""

    epochs: list[MeanEpoch]
    train_wall_s: float | None
    first_step_s: float | None
    time_to_target_s: float | None
    test_log_likelihood: float | None
    test_log_likelihood_se: float
    compile_count: int


METRICS = ConvergenceMetrics


def validate(c: AppConfig) -> None:
    cc = c.measure.convergence
    if len(set(cc.seeds)) != len(cc.seeds):
        raise ConfigError("measure.convergence.seeds", f"repeats a seed: {cc.seeds}")
    if cc.shared_noise and 0 < cc.record_steps < cc.lockstep_steps:
        raise ConfigError("measure.convergence.record_steps",
                          f"keeps {cc.record_steps} step losses; lockstep compares the first {cc.lockstep_steps}")


def seeds_of(c: AppConfig) -> list[int]:
    return list(c.measure.convergence.seeds) or [c.seed]


def is_linear_gaussian(c: AppConfig) -> bool:
    return c.model.kind == "linear" and c.model.likelihood == "gaussian"


# --- pure pieces (NumPy, no backend) --------------------------------------------------------


def first_reaching(evals: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first evaluation whose test ELBO is at least `target` (None if none is)."""
    return next((e for e in evals if e.get("test_elbo") is not None and e["test_elbo"] >= target), None)


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1; None for a single value)."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else None)


def collapse_diagnostics(mu: np.ndarray, logvar: np.ndarray, threshold: float) -> dict[str, Any]:
    """Posterior-collapse diagnostics from q(z|x) = N(mu, exp(logvar)) on a set of examples:
    KL(q(z_i|x) || N(0, 1)) per dimension (mean over examples), the activity Cov_x(E_q[z_i]) =
    Var over examples of mu_i, and the number of active units (activity > threshold)."""
    kl = 0.5 * (mu**2 + np.exp(logvar) - 1.0 - logvar)
    activity = mu.var(axis=0)
    return {
        "kl_per_dim": kl.mean(axis=0).tolist(),
        "activity": activity.tolist(),
        "active_units": int(np.sum(activity > threshold)),
        "latent": int(mu.shape[1]),
    }


def max_spread(curves: list[list[float]], steps: int) -> tuple[float, int]:
    """Largest max - min across curves over their first `steps` common entries, and its step
    (1-based; the first step where it is not finite, if one is); (nan, 0) when there is nothing
    to compare."""
    n = min([steps, *(len(c) for c in curves)])
    if len(curves) < 2 or n == 0:
        return math.nan, 0
    a = np.array([c[:n] for c in curves], dtype=np.float64)
    with np.errstate(invalid="ignore"):
        spread = a.max(axis=0) - a.min(axis=0)
    bad = ~np.isfinite(spread)
    i = int(np.argmax(bad)) if bad.any() else int(np.argmax(spread))  # the first step that is not finite
    return float(spread[i]), i + 1


# --- the run --------------------------------------------------------------------------------


class Evaluator:
    """Test ELBO with fixed harness noise and, for the linear model, the exact quantities."""

    def __init__(self, c: AppConfig, ds: data_mod.Dataset, spec: ModelSpec) -> None:
        cc = c.measure.convergence
        self.x_test, self.x_train, self.spec = ds.x_test, ds.x_train, spec
        self.eps = data_mod.noise((cc.elbo_samples, len(ds.x_test), spec.latent), EVAL_NOISE_SEED)
        self.rows = max(1, EVAL_ROWS // cc.elbo_samples)
        self.optimum: ppca.PPCA | None = None
        self.optimum_test = math.nan
        if is_linear_gaussian(c):
            self.optimum = ppca.fit(ds.x_train, spec.latent, spec.obs_sigma)
            self.optimum_test = float(log_px(self.optimum.params(), ds.x_test, spec.obs_sigma).mean())

    def elbo(self, b: Any) -> np.ndarray:
        """Per-example test ELBO, averaged over the fixed noise draws."""
        out = [
            -b.terms(self.x_test[i : i + self.rows], self.eps[:, i : i + self.rows]).loss
            for i in range(0, len(self.x_test), self.rows)
        ]
        return np.concatenate(out).astype(np.float64)

    def __call__(self, b: Any, step: int, wall: float) -> tuple[dict[str, Any], np.ndarray]:
        per_example = self.elbo(b)
        e: dict[str, Any] = {"step": step, "wall_s": wall, "test_elbo": float(per_example.mean())}
        p = params64(b) if self.optimum is not None else {}
        if self.optimum is not None and all(np.isfinite(v).all() for v in p.values()):
            s, L = self.spec.obs_sigma, self.spec.latent
            e["test_log_px"] = float(log_px(p, self.x_test, s).mean())
            e["gap_to_optimum"] = self.optimum_test - e["test_log_px"]
            e["train_gap_to_optimum"] = self.optimum.train_log_px - float(log_px(p, self.x_train, s).mean())
            e["posterior_gap"] = float(kl_to_posterior(p, self.x_test, s, L).mean())
        return e, per_example


def params64(b: Any) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, dtype=np.float64) for k, v in b.get_params().items()}


def iwae(b: Any, x: np.ndarray, k: int) -> np.ndarray:
    """IWAE-k per example, the test set in row chunks (the backend chunks the k samples)."""
    rows = max(1, EVAL_ROWS // min(k, IWAE_SAMPLE_CHUNK))
    return np.concatenate([b.log_likelihood(x[i : i + rows], k, seed=EVAL_NOISE_SEED + i) for i in range(0, len(x), rows)])


def train_seed(c: AppConfig, job: Job, ds: data_mod.Dataset, spec: ModelSpec, seed: int, evaluate: Evaluator,
               save: Callable[[dict[str, Any], bool], Any] | None = None) -> tuple[SeedRun, dict[str, Any]]:
    """Train one seed (`TrainingLoop`, its hook evaluating); returns its run (status "ok" or
    "diverged": `step_loss`, `evals`, `epochs`, timings, `time_to_target_s`/`step_to_target`
    (explicit target only) and `final`, see `final_evaluation`) and the backend's environment.
    `save(run, force)` is called with the run so far (plain: its first six keys) after every
    evaluation and epoch (with the training clock stopped), to keep partial metrics."""
    cc, bs = c.measure.convergence, c.data.batch_size
    cs = dataclasses.replace(c, seed=seed)  # the seed's batches, RNG and weights
    b = backend(cs, job.framework, spec=spec, params=init_params(spec, seed))
    steps_per_epoch = len(ds.x_train) // bs
    every, total = cc.eval_every or steps_per_epoch, cc.epochs * steps_per_epoch
    status, error = "ok", None
    evals: list[Evaluation] = []
    epochs: list[EpochRow] = []
    eval_s, epoch_start = 0.0, 0  # time in evaluations; the step the current epoch began at
    per_example: np.ndarray | None = None  # test ELBO per example at the latest evaluation

    def so_far(loop: TrainingLoop) -> dict[str, Any]:
        return {"seed": seed, "status": status, "error": error, "step_loss": loop.losses[: cc.record_steps or None],
                "evals": plain(evals), "epochs": plain(epochs)}

    def measure(loop: TrainingLoop, epoch_end: bool) -> bool:
        """With the training clock stopped and the losses read: evaluate if due, close an epoch.
        False (and the run marked diverged) on a NaN or inf test ELBO."""
        nonlocal status, error, eval_s, epoch_start, per_example
        step, t = loop.steps, time.perf_counter()
        if step % every == 0 or step == total:
            e, per_example = evaluate(b, step, loop.wall_s)
            evals.append(Evaluation(**e))
            if not math.isfinite(e["test_elbo"]):
                status, error = "diverged", f"test ELBO {e['test_elbo']} (NaN or inf) at step {step}, seed {seed}"
                return False
            if save is not None:
                save(so_far(loop), False)
        eval_s += time.perf_counter() - t
        if epoch_end:
            epoch_loss = 0.0
            for loss in loop.losses[epoch_start:]:  # a running sum, in order (as the records have it)
                epoch_loss += loss
            last = evals[-1]
            epochs.append(EpochRow(epoch=len(epochs) + 1, step=step, train_elbo=-epoch_loss / steps_per_epoch,
                                   test_elbo=last.test_elbo if last.step == step else None, wall_s=loop.wall_s))
            epoch_start = step
            loop.postfix(test=f"{last.test_elbo:.2f}")
            if save is not None:
                save(so_far(loop), False)
        return True

    shared = (lambda step: data_mod.noise((bs, spec.latent), seed, step)) if cc.shared_noise else None
    loop = TrainingLoop(b, ds.x_train, bs, cs, desc=f"convergence {job.framework}/{job.mode} seed {seed}", noise=shared,
                        hook=measure, every=every, check_every=every)
    try:
        loop.run(epochs=cc.epochs)
    except TrainingDiverged as d:
        status, error = "diverged", f"training loss {d.loss} (NaN or inf) at step {d.step}, seed {seed}"
    if save is not None:
        save(so_far(loop), True)  # every epoch reached, before the (possibly long) final evaluation
    target: dict[str, Any] = {}
    if cc.target_elbo is not None:
        hit = first_reaching(plain(evals), cc.target_elbo)
        target = {"time_to_target_s": hit["wall_s"] if hit else None, "step_to_target": hit["step"] if hit else None}
    run = (SeedRun if cc.target_elbo is None else TargetedSeedRun)(
        seed=seed, status=status, error=error, step_loss=loop.losses[: cc.record_steps or None], evals=evals, epochs=epochs,
        steps=loop.steps, first_step_s=loop.first_step_s, train_wall_s=loop.wall_s, eval_s=eval_s,
        compile_count=b.compile_count(), **target)
    env = b.version()
    run.skipped_steps = env.get("skipped_steps")  # float16's dynamic loss scaling (one backend per seed)
    if run.status == "ok" and per_example is not None:
        run.final = final_evaluation(c, b, ds.x_test, spec, per_example)
        if not math.isfinite(run.final.test_log_likelihood):
            run.status, run.error = "diverged", f"test log-likelihood is not finite (seed {seed})"
    return run, env


def ulp_control(c: AppConfig, job: Job, ds: data_mod.Dataset, spec: ModelSpec, seed: int) -> list[float]:
    """The lockstep run's first `lockstep_steps` training losses of `seed` once more, in the same
    framework on the same batches and noise, from the weights moved by one ulp of the type the
    parameters are kept in (float32 under mixed precision: `harness.spec.param_dtype`): how far
    that framework's own rounding carries its run (the perturbation control the lockstep spread
    is judged against)."""
    cc, bs = c.measure.convergence, c.data.batch_size
    params = one_ulp(init_params(spec, seed), param_dtype(c.framework.precision))
    b = backend(dataclasses.replace(c, seed=seed), job.framework, spec=spec, params=params)
    steps = min(cc.lockstep_steps, cc.epochs * (len(ds.x_train) // bs))  # no more than the run took
    batches = itertools.islice(batch_stream(ds.x_train, bs, seed), steps)
    losses = [b.train_step(b.put(xb), data_mod.noise((bs, spec.latent), seed, step)) for step, xb in enumerate(batches)]
    return [float(v) for v in losses]


def final_evaluation(c: AppConfig, b: Any, x: np.ndarray, spec: ModelSpec, elbo: np.ndarray) -> FinalEvaluation:
    """IWAE-k, its gap to the final test ELBO (paired per example), collapse diagnostics."""
    k = c.measure.convergence.iwae_k
    ll = iwae(b, x, k)
    gap = ll - elbo
    mu, logvar = (np.asarray(a, dtype=np.float64) for a in b.encode(x))
    n = math.sqrt(len(x))
    se = (lambda v: float(v.std(ddof=1) / n)) if len(x) > 1 else (lambda v: math.nan)
    return FinalEvaluation(
        test_elbo=float(elbo.mean()),
        test_elbo_se=se(elbo),
        iwae_k=k,
        test_log_likelihood=float(ll.mean()),
        test_log_likelihood_se=se(ll),
        gap=float(gap.mean()),
        gap_se=se(gap),
        **collapse_diagnostics(mu, logvar, c.measure.convergence.active_threshold),
    )


def run(c: AppConfig, job: Job) -> Result:
    ds = dataset(c)
    spec = model_spec(c, ds)
    cc = c.measure.convergence
    evaluate = Evaluator(c, ds, spec)
    runs: list[SeedRun] = []
    head = ConvergenceRuns(
        seeds=seeds_of(c),
        shared_noise=cc.shared_noise,
        batch_size=c.data.batch_size,
        n_train=len(ds.x_train),
        n_test=len(ds.x_test),
        steps_per_epoch=len(ds.x_train) // c.data.batch_size,
        eval_every=cc.eval_every,
        elbo_samples=cc.elbo_samples,
        iwae_k=cc.iwae_k,
        target_elbo=cc.target_elbo,
        **{k: getattr(cc, k) for k in SETTINGS},
        runs=runs,
    )
    if evaluate.optimum is not None:
        head.optimum = Optimum(obs_sigma=spec.obs_sigma, train_log_px=evaluate.optimum.train_log_px,
                               test_log_px=evaluate.optimum_test, eigenvalues=evaluate.optimum.eigenvalues.tolist())
    status, error = "ok", None
    env: dict[str, Any] = {}
    saver = Checkpointer(job)
    for seed in seeds_of(c):
        r, env = train_seed(c, job, ds, spec, seed, evaluate,
                            save=lambda current, force: saver(lambda: partial_metrics(plain(head), current), force))
        runs.append(r)
        if r.status != "ok":
            status, error = r.status, r.error
            break
        if cc.shared_noise and head.ulp_control is None:
            head.ulp_control = UlpControl(seed=seed, step_loss=ulp_control(c, job, ds, spec, seed))
    compile_count = sum(r.compile_count for r in runs)
    means = seed_means(plain([r for r in runs if r.status == "ok"]))
    if not means:  # no seed completed: nothing to average
        return Result(metrics={**plain(head), "compile_count": compile_count}, status=status, error=error, backend_env=env)
    metrics = ConvergenceMetrics(**vars(head), epochs=[MeanEpoch(**e) for e in means.pop("epochs")], **means,
                                 compile_count=compile_count)
    return Result(metrics=plain(metrics), status=status, error=error, backend_env=env)


def partial_metrics(metrics: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """The record's metrics while seed `current` trains: the finished seeds, the current one as
    a run with status `incomplete`, and the compatibility means over the finished seeds (the
    current seed's epochs while none has finished)."""
    finished = [r for r in metrics["runs"] if r["status"] == "ok"]
    out = {**metrics, "runs": [*metrics["runs"], {**current, "status": "incomplete"}], **seed_means(finished)}
    if not finished:
        out["epochs"] = [{k: e[k] for k in ("epoch", "train_elbo", "test_elbo", "wall_s")} for e in current["epochs"]]
        out["train_wall_s"] = current["epochs"][-1]["wall_s"] if current["epochs"] else None
    return out


def seed_means(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The compatibility keys: means over completed seeds (a key is None where a seed lacks it)."""
    if not runs:
        return {}

    def avg(values: list[Any]) -> float | None:
        return None if any(v is None for v in values) else float(np.mean(values))

    n_ep = min(len(r["epochs"]) for r in runs)
    epochs = [{"epoch": i + 1, **{k: avg([r["epochs"][i][k] for r in runs]) for k in ("train_elbo", "test_elbo", "wall_s")}}
              for i in range(n_ep)]
    ll_se = [r["final"]["test_log_likelihood_se"] for r in runs]
    return {
        "epochs": epochs,
        "train_wall_s": avg([r["train_wall_s"] for r in runs]),
        "first_step_s": avg([r["first_step_s"] for r in runs]),
        "time_to_target_s": avg([r.get("time_to_target_s") for r in runs]),
        "test_log_likelihood": avg([r["final"]["test_log_likelihood"] for r in runs]),
        "test_log_likelihood_se": float(np.sqrt(np.sum(np.square(ll_se)))) / len(runs),  # SE of the mean over seeds
    }


# --- summary (from records alone) -------------------------------------------------------------


def runs_of(r: dict[str, Any]) -> list[dict[str, Any]]:
    """A record's per-seed runs; a record from before seeds existed reads as one run."""
    m = r.get("metrics") or {}
    if "runs" in m:
        return list(m["runs"])
    if not m.get("epochs"):
        return []
    spe = m.get("n_train", 0) // max(m.get("batch_size", 1), 1)
    evals = [{"step": e["epoch"] * spe, "wall_s": e["wall_s"], "test_elbo": e["test_elbo"]} for e in m["epochs"]]
    legacy = {"seed": (r.get("config") or {}).get("seed", 0), "status": r.get("status"), "evals": evals,
              "epochs": m["epochs"], "step_loss": [], "train_wall_s": m.get("train_wall_s"), "first_step_s": m.get("first_step_s")}
    if m.get("test_log_likelihood") is not None:
        legacy["final"] = {"test_elbo": evals[-1]["test_elbo"], "iwae_k": m.get("iwae_k"),
                           "test_log_likelihood": m["test_log_likelihood"], "test_log_likelihood_se": m.get("test_log_likelihood_se"),
                           "gap": m["test_log_likelihood"] - evals[-1]["test_elbo"]}
    return [legacy]


def done(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The completed seeds of a record (those with a final evaluation)."""
    return [x for x in runs_of(r) if x.get("status") == "ok" and x.get("final")]


def recorded_setting(records: list[dict[str, Any]], key: str) -> Any:
    """A setting as the records hold it (the config default for records that lack it)."""
    for r in records:
        if key in (r.get("metrics") or {}):
            return r["metrics"][key]
    return getattr(ConvergenceConfig(), key)


def final_elbo(r: dict[str, Any]) -> float:
    """A record's final test ELBO: last evaluation, mean over completed seeds."""
    return float(np.mean([x["evals"][-1]["test_elbo"] for x in done(r)]))


def resolve_target(records: list[dict[str, Any]]) -> tuple[float | None, str]:
    """The target test ELBO and how it was chosen: explicit, or the best final test ELBO among
    the completed records minus the margin."""
    explicit = next((r["metrics"].get("target_elbo") for r in records if (r.get("metrics") or {}).get("target_elbo") is not None), None)
    if explicit is not None:
        return float(explicit), f"test ELBO ≥ {explicit:g} (set by measure.convergence.target_elbo)"
    ok = [r for r in records if done(r) and math.isfinite(final_elbo(r))]
    if not ok:
        return None, "no target: no completed run with a finite final test ELBO"
    best = max(ok, key=final_elbo)
    margin = recorded_setting(records, "target_margin")
    target = final_elbo(best) - margin
    return target, f"test ELBO ≥ {target:.3f}: best final test ELBO ({final_elbo(best):.3f}, {best['framework']}/{best['mode']}) minus {margin:g} nat"


def elbo_spread(finals: dict[str, float]) -> float:
    """Largest minus smallest final test ELBO; NaN when one of them is not finite."""
    vals = list(finals.values())
    return max(vals) - min(vals) if finite(vals) else math.nan


def kept(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs a failed job kept (`partial` metrics): seeds with at least one evaluation."""
    if r.get("status") == "ok" or not (r.get("metrics") or {}).get("partial"):
        return []
    return [x for x in runs_of(r) if x.get("evals") and x.get("epochs")]


def _with(cell: str, suffix: str) -> str:
    """`cell` followed by `suffix` (a bare number stays a number when there is no suffix)."""
    return cell + suffix if suffix else cell


def lockstep(records: list[dict[str, Any]]) -> tuple[float, str] | None:
    """Largest per-step spread of the training loss across the lockstep records, per seed
    compared; None unless at least two completed records used shared noise."""
    recs = [r for r in records if done(r) and r["metrics"].get("shared_noise")]
    if len(recs) < 2:
        return None
    steps = recorded_setting(records, "lockstep_steps")
    worst, where = -math.inf, ""
    seeds = sorted(set.intersection(*({x["seed"] for x in done(r)} for r in recs)))
    for s in seeds:
        curves = [next(x["step_loss"] for x in done(r) if x["seed"] == s) for r in recs]
        dev, step = max_spread(curves, steps)
        if not dev <= worst:  # also takes a NaN
            worst, where = dev, f"seed {s}, step {step}"
    return worst, where


def control_of(r: dict[str, Any]) -> tuple[list[float], list[float], int] | None:
    """A lockstep record's one-ulp control: (its losses, its framework's run's losses, the seed);
    None if it has none, or the seed it controls did not complete."""
    ctrl = (r.get("metrics") or {}).get("ulp_control")
    if not ctrl or not r["metrics"].get("shared_noise"):
        return None
    run = next((x for x in done(r) if x["seed"] == ctrl["seed"]), None)
    return None if run is None else (ctrl["step_loss"], run["step_loss"], ctrl["seed"])


def control_deviation(records: list[dict[str, Any]]) -> tuple[float, str] | None:
    """Largest deviation of a one-ulp control (`ulp_control`) from its own framework's run over
    the first `lockstep_steps` steps, and whose and where; None when no lockstep record has one
    (records from before the control). NaN when a control's loss is not finite."""
    steps = recorded_setting(records, "lockstep_steps")
    worst, where, any_control = -math.inf, "", False
    for r in records:
        got = control_of(r)
        if got is None:
            continue
        any_control = True
        control, run, seed = got
        dev, step = max_spread([run, control], steps)
        if not dev <= worst:
            worst, where = dev, f"{r['framework']}/{r['mode']} seed {seed}, step {step}"
    return (worst, where) if any_control else None


def lockstep_judged(records: list[dict[str, Any]]) -> tuple[bool, str]:
    """Whether the lockstep spread is judged, and the control's note: judged unless a one-ulp
    control leaves `lockstep_tol` (then rounding alone moves a run that far, and the spread
    measures rounding luck); a control that is not finite is judged, and fails, as such."""
    tol = recorded_setting(records, "lockstep_tol")
    control = control_deviation(records)
    if control is None:
        return True, ""
    dev, where = control
    if not math.isfinite(dev):
        return True, f"; one-ulp control not finite ({where})"  # and failed by name in `summarize`
    if le(dev, tol):
        return True, f"; one-ulp control within {dev:.1e} ({where})"
    return False, f"; one-ulp control reaches {dev:.2e} ({where})"


def nonfinite_run(x: dict[str, Any], linear: bool) -> str | None:
    """The first judged number of one seed's run that is not finite (training losses, test ELBOs,
    the final IWAE; on the linear model the gaps to the optimum), named with its step."""
    losses = describe(x.get("step_loss") or [], "step")
    if losses is not None:
        return f"training loss is {losses}"
    keys = {"test_elbo": "test ELBO"}
    if linear:
        keys.update(gap_to_optimum="gap to the pPCA optimum", posterior_gap="KL(q ‖ posterior)")
    for e in x.get("evals") or []:
        for key, name in keys.items():
            if key in e and not finite(e[key]):
                return f"{name} is {describe(e[key])} at step {e.get('step')}"
    fin = x.get("final") or {}
    if "test_log_likelihood" in fin and not finite(fin["test_log_likelihood"]):
        return f"test log-likelihood (IWAE) is {describe(fin['test_log_likelihood'])}"
    return None


def kept_note(r: dict[str, Any]) -> str:
    """How much a failed job kept before it died (`kept`), for its note; "" if nothing."""
    runs = kept(r)
    return f" (kept {sum(len(x['epochs']) for x in runs)} finished epoch(s), drawn dashed)" if runs else ""


def partial_cells(r: dict[str, Any]) -> dict[str, Any]:
    """A failed job's cells for what it kept (`kept`): where it got to, marked partial."""
    runs = kept(r)
    if not runs:
        return {}
    return {
        "status": f"{r['status']} (partial)",
        "seeds": ",".join(str(x["seed"]) for x in runs),
        "steps": str(max(x["evals"][-1]["step"] for x in runs)),
        "test ELBO": pm([x["evals"][-1]["test_elbo"] for x in runs], ".3f"),
    }


# --- precisions: float32 beside mixed precision (from records alone) -----------------------

#: the mixed-precision check: a low precision's final test ELBO (mean over seeds) lies within
#: max(PRECISION_SIGMAS x float32's standard deviation over seeds, PRECISION_FLOOR) nats of
#: float32's mean, in the same framework and mode
PRECISION_SIGMAS = 3.0
PRECISION_FLOOR = 0.1
#: the table's order of precisions within a framework and mode
PRECISION_ORDER = ("float64", "float32", *MIXED)


def precision_of(r: dict[str, Any]) -> str:
    """What a record's job computed in: its `framework.precision` (the backend's dtype for a
    record that lacks it; float32 for one that has neither)."""
    configured = ((r.get("config") or {}).get("framework") or {}).get("precision")
    return str(configured or (r.get("env") or {}).get("dtype") or "float32")


def mixed(records: list[dict[str, Any]]) -> bool:
    """Whether `records` hold more than one precision, or a mixed one: then the table has a
    precision column and the labels name the precision."""
    ps = {precision_of(r) for r in records}
    return len(ps) > 1 or bool(ps & set(MIXED))


def by_precision(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`records` in framework order, then mode, then precision (float32 before the mixed types)."""
    order = {p: i for i, p in enumerate(PRECISION_ORDER)}
    return by_framework(sorted(records, key=lambda r: (order.get(precision_of(r), len(order)), precision_of(r))))


def who(r: dict[str, Any], multi: bool) -> str:
    """'framework/mode', with the precision where the records hold several."""
    base = f"{r.get('framework')}/{r.get('mode')}"
    return f"{base} {precision_of(r)}" if multi else base


def skipped_steps(r: dict[str, Any]) -> tuple[int, str] | None:
    """float16's steps skipped for a non-finite gradient (dynamic loss scaling): the sum over the
    record's seeds and its cell (per seed in brackets); from the backend's environment
    (`env.skipped_steps`, the last seed's backend) for a record without per-seed counts; None
    where the job did not scale its loss."""
    per_seed = [x["skipped_steps"] for x in runs_of(r) if x.get("skipped_steps") is not None]
    if per_seed:
        total = int(sum(per_seed))
        return total, str(total) + (f" ({', '.join(map(str, per_seed))})" if len(per_seed) > 1 else "")
    env = (r.get("env") or {}).get("skipped_steps")
    if env is None:
        return None
    seeds = len(runs_of(r))
    return int(env), f"{int(env)}" + (" (last seed)" if seeds > 1 else "")


@dataclass
class PrecisionCheck:
    """A mixed-precision record's final test ELBO against float32's, in one framework and mode
    (`precision_checks`)."""

    label: str  # "framework/mode"
    precision: str
    record: dict[str, Any]
    ok: bool
    diff: float | None = None  # mean over seeds minus float32's mean (nats)
    tol: float | None = None
    note: str = ""


def _finals(r: dict[str, Any]) -> list[tuple[int, float]]:
    return [(x["seed"], x["evals"][-1]["test_elbo"]) for x in done(r)]


def _not_finite(r: dict[str, Any]) -> str | None:
    """The first completed seed whose final test ELBO is NaN or inf, named."""
    return next((f"{precision_of(r)} final test ELBO is {describe(v)} (seed {seed})"
                 for seed, v in _finals(r) if not finite(v)), None)


def precision_checks(records: list[dict[str, Any]]) -> tuple[list[PrecisionCheck], list[str]]:
    """Each mixed-precision record (bfloat16, float16) judged against the float32 record of the
    same framework and mode: its final test ELBO, mean over its completed seeds, within
    max(PRECISION_SIGMAS x float32's standard deviation over seeds, PRECISION_FLOOR) nats of
    float32's mean (one float32 seed: the floor). A low-precision job that did not finish
    every seed, or a NaN or inf final ELBO on either side, FAILs, named. Returns the checks and
    the notes for mixed-precision records that have no float32 record to compare with (not
    judged)."""
    checks: list[PrecisionCheck] = []
    unjudged: list[str] = []
    for r in by_precision(records):
        prec = precision_of(r)
        if prec not in MIXED:
            continue
        label = f"{r['framework']}/{r['mode']}"
        ref = next((f for f in records if f["framework"] == r["framework"] and f["mode"] == r["mode"]
                    and precision_of(f) == "float32"), None)
        if ref is None:
            unjudged.append(f"{label} {prec}: not judged against float32 (no float32 record of {label} among these)")
            continue
        check = PrecisionCheck(label, prec, r, ok=False)
        checks.append(check)
        base, low = _finals(ref), _finals(r)
        bad = _not_finite(r) or _not_finite(ref)
        if r.get("status") != "ok" or not low:
            check.note = f"{prec} did not finish: {r.get('status')}: {r.get('error') or 'no completed seed'}"
        elif ref.get("status") != "ok" or not base:
            check.note = f"its float32 run did not finish: {ref.get('status')}: {ref.get('error') or 'no completed seed'}"
        elif bad is not None:
            check.note = bad
        else:
            m32, s32 = mean_std([v for _, v in base])
            mean = float(np.mean([v for _, v in low]))
            check.tol = max(PRECISION_SIGMAS * s32, PRECISION_FLOOR) if s32 is not None else PRECISION_FLOOR
            check.diff = mean - m32
            check.ok = le(abs(check.diff), check.tol)
            spread = (f"max({PRECISION_SIGMAS:g} x float32's seed std {s32:.3f}, {PRECISION_FLOOR:g})"
                      if s32 is not None else f"{PRECISION_FLOOR:g} (one float32 seed)")
            check.note = (f"{prec} final test ELBO {mean:.3f} ({len(low)} seeds) against float32's {m32:.3f} "
                          f"({len(base)} seeds): difference {check.diff:+.3f} nats, tolerance {spread} = {check.tol:.3f}")
    return checks, unjudged



#: the columns of the precision check (`precision_checks`), on the rows of a table with several precisions
DIFF_COL, TOL_COL, VERDICT_COL = "Δ test ELBO vs float32", "tolerance (nats)", "vs float32"


def summarize(records: list[dict[str, Any]]) -> Summary:
    recs = by_precision(records)
    multi = mixed(recs)
    target, target_note = resolve_target(recs)
    linear = any("optimum" in (r.get("metrics") or {}) for r in recs)
    k = next((x["final"].get("iwae_k") for r in recs for x in done(r)), recorded_setting(recs, "iwae_k"))
    scaled = any(skipped_steps(r) is not None or precision_of(r) == "float16" for r in recs)
    cols = ["framework", "mode", *(["precision"] if multi else []), "status", "seeds", "steps",
            *(["skipped steps"] if scaled else []), "test ELBO", f"test log p(x) (IWAE-{k})", "log p − ELBO",
            *([DIFF_COL, TOL_COL, VERDICT_COL] if multi else []),
            "time to target (s)", "… after first step (s)", "step at target", "train time (s)", "first step (s)", "active units"]
    if linear:
        cols += ["gap to pPCA optimum (test)", "gap to pPCA optimum (train)", "KL(q ‖ posterior)"]
    tol_opt, tol_post = recorded_setting(recs, "optimum_tol"), recorded_setting(recs, "posterior_gap_tol")
    s = split(recs, per_mode=True)
    for f in s.failed:
        if multi:  # the note names the precision too
            f.note = who(f.record, True) + f.note[len(who(f.record, False)):]
        f.note += kept_note(f.record)
    checks, unjudged = precision_checks(recs)
    check_of = {id(c.record): c for c in checks}
    passed: list[bool] = []  # each record's checks: its seeds' numbers and its one-ulp control finite, at the pPCA optimum

    def precision_cells(r: dict[str, Any]) -> dict[str, Any]:
        """The precision, the skipped steps and the check's cells of a record's row."""
        cells: dict[str, Any] = {}
        if multi:
            cells["precision"] = precision_of(r)
            c = check_of.get(id(r))
            if c is not None:
                cells[DIFF_COL] = fmt(c.diff, "+.3f")
                cells[TOL_COL] = fmt(c.tol, ".3f")
                cells[VERDICT_COL] = "PASS" if c.ok else "FAIL"
            elif precision_of(r) == "float32" and any(x.record["framework"] == r["framework"] and x.record["mode"] == r["mode"]
                                                      for x in checks):
                cells[VERDICT_COL] = "reference"
        if scaled:
            got = skipped_steps(r)
            cells["skipped steps"] = got[1] if got is not None else "-"
        return cells

    def row_of(r: dict[str, Any], notes: list[str]) -> list[dict[str, Any]]:
        """A record's row (a failed one's too: what it kept, the seeds it completed), and its notes."""
        row = {**blank_row(r, cols), **partial_cells(r), **precision_cells(r)}
        for x in done(r):
            bad = nonfinite_run(x, linear)
            passed.append(bad is None)
            if bad is not None:
                notes.append(f"{who(r, multi)} seed {x['seed']}: {bad}")
        ctrl = (r.get("metrics") or {}).get("ulp_control") or {}
        bad = describe(ctrl["step_loss"], "step") if ctrl else None
        passed.append(bad is None)
        if bad is not None:
            notes.append(f"{who(r, multi)} seed {ctrl.get('seed')}: one-ulp control's training loss is {bad}")
        runs = done(r)
        if not runs:
            return [row]
        fin = [x["final"] for x in runs]
        hits = [first_reaching(x["evals"], target) if target is not None else None for x in runs]
        reached = [h for h in hits if h is not None]
        of = "" if len(reached) in (0, len(runs)) else f" ({len(reached)}/{len(runs)} seeds)"
        row.update({
            "seeds": ",".join(str(x["seed"]) for x in runs),
            "steps": str(runs[0].get("steps", runs[0]["evals"][-1]["step"])),
            "test ELBO": pm([x["evals"][-1]["test_elbo"] for x in runs], ".3f"),
            f"test log p(x) (IWAE-{k})": pm([f["test_log_likelihood"] for f in fin], ".3f"),
            "log p − ELBO": pm([f["gap"] for f in fin], ".3f"),
            "time to target (s)": _with(pm([h["wall_s"] for h in reached], ".2f"), of) if reached else "not reached",
            "… after first step (s)": _with(pm([h["wall_s"] - x["first_step_s"] for h, x in zip(hits, runs) if h and x.get("first_step_s")],
                                         ".2f"), of) if reached else "-",
            "step at target": _with(pm([h["step"] for h in reached], ".0f"), of) if reached else "-",
            "train time (s)": pm([x["train_wall_s"] for x in runs], ".2f"),
            "first step (s)": pm([x["first_step_s"] for x in runs], ".3f"),
        })
        if all("active_units" in f for f in fin):
            row["active units"] = pm([f["active_units"] for f in fin], ".3g") + f" / {fin[0]['latent']}"
        if linear and "gap_to_optimum" in runs[0]["evals"][-1]:
            last = [x["evals"][-1] for x in runs]
            row["gap to pPCA optimum (test)"] = pm([e["gap_to_optimum"] for e in last], ".4f")
            row["gap to pPCA optimum (train)"] = pm([e["train_gap_to_optimum"] for e in last], ".4f")
            row["KL(q ‖ posterior)"] = pm([e["posterior_gap"] for e in last], ".4f")
            good = all(le(abs(e["gap_to_optimum"]), tol_opt) and le(e["posterior_gap"], tol_post) for e in last)
            passed.append(good)
            if not good:
                notes.append(f"{who(r, multi)}: not at the pPCA optimum in every seed "
                             f"(|test gap| ≤ {tol_opt:g}, KL(q ‖ posterior) ≤ {tol_post:g} required)")
        return [row]

    rows, notes = s.table(row_of, lambda f, notes: row_of(f.record, notes))
    ok = bool(recs) and s.ok and all(passed)
    n_seeds = max((len(done(r)) for r in recs), default=0)
    notes.append(f"ELBO and log p(x) in nats per example (higher is better); ± is the standard deviation over {n_seeds} seeds"
                 if n_seeds > 1 else "ELBO and log p(x) in nats per example (higher is better); one seed")
    cached = list(dict.fromkeys(cache_note(r) for r in recs if len(done(r)) > 1 and cache_note(r)))
    notes.append(f"time to target: training wall time (evaluation excluded) to the first evaluation with {target_note}; "
                 "'… after first step' leaves out the first step, which includes tracing and compilation"
                 + (f" ({'; '.join(cached)})" if cached else ""))
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in recs:  # frameworks are compared with each other within one precision
        groups.setdefault(precision_of(r), []).append(r)
    for prec, group in groups.items():
        of = f" ({prec})" if multi else ""
        completed = [r for r in group if done(r)]
        if len(completed) > 1:
            finals = {f"{r['framework']}/{r['mode']}": final_elbo(r) for r in completed}
            spread, tol = elbo_spread(finals), recorded_setting(recs, "agree_nats")
            ok = ok and le(spread, tol)
            notes.append(f"final test ELBO spread across frameworks{of}: {spread:.3f} nats (tolerance {tol:g}): "
                         + ("pass" if le(spread, tol) else "FAIL"))
        ls = lockstep(group)
        if ls is not None:
            dev, where = ls
            tol, steps = recorded_setting(recs, "lockstep_tol"), recorded_setting(recs, "lockstep_steps")
            judged, control = lockstep_judged(group)
            good = le(dev, tol) and not control.startswith("; one-ulp control not finite")
            ok = ok and (good or not judged)
            verdict = ("pass" if good else "FAIL") if judged else (
                "reported, not judged: rounding alone moves a run further than the tolerance")
            notes.append(f"lockstep (shared noise{', ' + prec if multi else ''}): largest spread of the per-step training "
                         f"loss across frameworks over the first {steps} steps: {dev:.2e} nats per example at {where} "
                         f"(tolerance {tol:g}{control}): {verdict}")
    if checks or unjudged:
        ok = ok and all(c.ok for c in checks)
        notes.append(f"mixed precision (bfloat16, float16: float32 parameters, layers in the low type): judged per framework "
                     f"and mode against float32: the final test ELBO (mean over seeds) within max({PRECISION_SIGMAS:g} x "
                     f"float32's standard deviation over seeds, {PRECISION_FLOOR:g}) nats of float32's mean; a NaN, inf or "
                     "unfinished run fails")
        notes += [f"{c.label}: {c.note}: " + ("pass" if c.ok else "FAIL") for c in checks]
        notes += unjudged
    if scaled:
        notes.append("skipped steps: float16 training steps skipped for a non-finite gradient (dynamic loss scaling), "
                     "summed over the seeds (each seed's in brackets)")
    if linear:
        opt = next(r["metrics"]["optimum"] for r in recs if "optimum" in (r.get("metrics") or {}))
        notes.append(f"pPCA optimum (ML with fixed obs_sigma {opt['obs_sigma']:g}, from the training data): log p(x) "
                     f"test {opt['test_log_px']:.4f}, train {opt['train_log_px']:.4f}; gaps are optimum minus model at the last "
                     f"evaluation; required |test gap| ≤ {tol_opt:g} and KL(q ‖ posterior) ≤ {tol_post:g}")
    return Summary("Convergence (test ELBO and IWAE log-likelihood, time to target)", rows, ok, notes)


# --- plots (from records alone) ------------------------------------------------------------


def cache_note(r: dict[str, Any]) -> str:
    """What the record's framework says when its compiled mode reuses an in-process compile cache
    for later seeds (`FrameworkFacts.compile_cache_note`), "" otherwise."""
    f = frameworks.get(r["framework"])
    return f.compile_cache_note if f is not None and r["mode"] == f.compiled else ""


def _label(r: dict[str, Any], recs: list[dict[str, Any]]) -> str:
    label = r["framework"] if len({x["mode"] for x in recs}) == 1 else f"{r['framework']}/{r['mode']}"
    return f"{label} {precision_of(r)}" if mixed(recs) else label


#: the line style and marker of each precision in the plots (a framework keeps its colour; "--"
#: is left for the partial curves of failed jobs)
LINE_STYLE = {"bfloat16": "-.", "float16": ":"}
MARKER = {"bfloat16": "s", "float16": "^"}


def _band(ax: Any, x: np.ndarray, ys: np.ndarray, color: Any, label: str, ls: str = "-") -> None:
    """Mean over seeds (rows of ys) as a line, min-max as a band."""
    ax.plot(x, ys.mean(axis=0), color=color, label=label, lw=1.4, ls=ls)
    if len(ys) > 1:
        ax.fill_between(x, ys.min(axis=0), ys.max(axis=0), color=color, alpha=0.2, lw=0)


def _curves(r: dict[str, Any], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(steps, mean wall time, values per seed) over the evaluations all completed seeds share."""
    runs = [x for x in done(r) if x["evals"] and key in x["evals"][0]]
    if not runs:
        return None
    n = min(len(x["evals"]) for x in runs)
    ev = [x["evals"][:n] for x in runs]
    steps = np.array([e["step"] for e in ev[0]], dtype=float)
    wall = np.mean([[e["wall_s"] for e in s] for s in ev], axis=0)
    return steps, wall, np.array([[e[key] for e in s] for s in ev], dtype=float)


def plot_convergence(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Test ELBO against step and against training time: the mean over completed seeds with a
    min-max band, and dashed, the evaluations a failed job kept before it died (partial)."""
    recs = [r for r in by_framework(records) if done(r) or kept(r)]
    if not recs:
        return None
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in recs:
        color = COLORS.get(r["framework"])
        cur = _curves(r, "test_elbo")
        if cur is not None:
            steps, wall, ys = cur
            ls = LINE_STYLE.get(precision_of(r), "-")
            _band(a1, steps, ys, color, _label(r, recs), ls)
            timed = wall > 0  # step 0 has no place on a log axis
            _band(a2, wall[timed], ys[:, timed], color, _label(r, recs), ls)
        for i, x in enumerate(kept(r)):
            if x.get("status") == "ok":
                continue  # a finished seed of a failed job: drawn above
            ev = [e for e in x["evals"] if finite(e.get("test_elbo"))]
            label = f"{_label(r, recs)} ({r['status']}, partial)" if i == 0 or cur is None else None
            a1.plot([e["step"] for e in ev], [e["test_elbo"] for e in ev], color=color, ls="--", lw=1.2, label=label)
            timed_ev = [e for e in ev if e["wall_s"] > 0]
            a2.plot([e["wall_s"] for e in timed_ev], [e["test_elbo"] for e in timed_ev], color=color, ls="--", lw=1.2)
    target, _ = resolve_target(recs)
    n = max(len(done(r)) for r in recs)
    for a in (a1, a2):
        if target is not None:
            a.axhline(target, color="grey", lw=0.8, ls=":", label="target")
        a.set_ylabel("test ELBO (nats per example)")
        a.grid(alpha=0.3)
    a1.set_xlabel("step")
    log_time_axis(a2)
    a2.set_xlabel("training wall time (s, log scale)")
    band = f"mean over {n} seeds, band min-max" if n > 1 else "one seed"
    a1.set_title(f"test ELBO against step ({band})")
    a2.set_title("test ELBO against training time")
    a1.legend(fontsize=8)
    return save_png(fig, path)


def log_time_axis(ax: Any) -> None:
    """A log x axis (call it after plotting) labelled as plain numbers at 1, 2 and 5 times the
    powers of ten over up to three decades, at the powers of ten (at most eight) beyond; minor
    ticks unlabelled (matplotlib's default labels the minor ticks of a range under a decade, and
    they overlap)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    lo, hi = ax.get_xlim()
    decades = math.log10(hi / lo) if lo > 0 and hi > lo else 1.0
    subs = (1.0, 2.0, 5.0) if decades <= 3 else (1.0,)
    ax.xaxis.set_major_locator(LogLocator(base=10.0, subs=subs, numticks=9))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot_iwae(records: list[dict[str, Any]], path: Path) -> Path | None:
    recs = [r for r in by_framework(records) if done(r)]
    if not recs:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4.5))
    pts = []
    for r in recs:
        xs = [x["evals"][-1]["test_elbo"] for x in done(r)]
        ys = [x["final"]["test_log_likelihood"] for x in done(r)]
        ax.scatter(xs, ys, color=COLORS.get(r["framework"]), label=_label(r, recs), s=25, marker=MARKER.get(precision_of(r), "o"))
        pts += xs + ys
    lo, hi = min(pts), max(pts)
    ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls=":", label="log p = ELBO")
    k = done(recs[0])[0]["final"].get("iwae_k")
    ax.set_xlabel("final test ELBO")
    ax.set_ylabel(f"test log p(x), IWAE-{k}")
    ax.set_title("IWAE log-likelihood against ELBO\n(one point per seed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, path)


def plot_kl(records: list[dict[str, Any]], path: Path) -> Path | None:
    recs = [r for r in by_framework(records) if any("kl_per_dim" in x["final"] for x in done(r))]
    if not recs:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in recs:
        for i, x in enumerate(done(r)):
            kl = np.sort(np.asarray(x["final"]["kl_per_dim"]))[::-1]
            ax.plot(np.arange(1, len(kl) + 1), np.maximum(kl, 1e-5), marker=MARKER.get(precision_of(r), "o"), ms=3, lw=1,
                    alpha=0.8, ls=LINE_STYLE.get(precision_of(r), "-"),
                    color=COLORS.get(r["framework"]), label=_label(r, recs) if i == 0 else None)
    ax.set_yscale("log")
    ax.set_xlabel("latent dimension (sorted by KL)")
    ax.set_ylabel("KL(q(z_i|x) ‖ N(0,1)), mean over test (nats)")
    ax.set_title("KL per latent dimension (one line per seed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, path)


def plot_optimum(records: list[dict[str, Any]], path: Path) -> Path | None:
    recs = [r for r in by_framework(records) if done(r) and _curves(r, "gap_to_optimum") is not None]
    if not recs:
        return None
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in recs:
        color = COLORS.get(r["framework"])
        for ax, key in ((a1, "gap_to_optimum"), (a2, "posterior_gap")):
            steps, _, ys = _curves(r, key)  # type: ignore[misc]
            _band(ax, steps, np.maximum(np.abs(ys), 1e-7), color, _label(r, recs))
    tol_opt, tol_post = recorded_setting(recs, "optimum_tol"), recorded_setting(recs, "posterior_gap_tol")
    for ax, tol, what in ((a1, tol_opt, "|gap|"), (a2, tol_post, "KL(q ‖ p(z|x))")):
        ax.axhline(tol, color="grey", lw=0.8, ls=":", label="tolerance")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(f"{what} (nats per example)")
        ax.grid(alpha=0.3)
    a1.set_title("test log p(x): gap to the pPCA optimum")
    a2.set_title("posterior gap, mean over test examples")
    a1.legend(fontsize=8)
    return save_png(fig, path)


def plot_lockstep(records: list[dict[str, Any]], path: Path) -> Path | None:
    recs = [r for r in by_framework(records) if done(r) and r["metrics"].get("shared_noise")]
    if len(recs) < 2:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for s in sorted(set.intersection(*({x["seed"] for x in done(r)} for r in recs))):
        curves = [next(x["step_loss"] for x in done(r) if x["seed"] == s) for r in recs]
        n = min(len(c) for c in curves)
        a = np.array([c[:n] for c in curves])
        ax.plot(np.arange(1, n + 1), np.maximum(a.max(axis=0) - a.min(axis=0), 1e-9), lw=0.8, label=f"seed {s}")
    steps = recorded_setting(recs, "lockstep_steps")
    for r in recs:
        got = control_of(r)
        if got is not None:
            control, run, seed = got
            n = min(steps, len(control), len(run))
            dev = np.abs(np.subtract(control[:n], run[:n]))
            ax.plot(np.arange(1, n + 1), np.maximum(dev, 1e-9), lw=0.8, ls="--", color=COLORS.get(r["framework"]),
                    label=f"{r['framework']}: one-ulp control, seed {seed}")
    ax.axhline(recorded_setting(recs, "lockstep_tol"), color="grey", lw=0.8, ls=":", label="tolerance")
    ax.axvline(recorded_setting(recs, "lockstep_steps"), color="grey", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("max − min training loss across frameworks")
    ax.set_title("lockstep: " + ", ".join(_label(r, recs) for r in recs))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, path)


JUDGED = (
    Judged("runs.*.step_loss", "training loss", axis="step"),
    Judged("ulp_control.step_loss", "one-ulp control's training loss", axis="step"),
    Judged("runs.*.evals.*.test_elbo", "test ELBO"),
    Judged("runs.*.final.test_log_likelihood", "test log-likelihood (IWAE)"),
    Judged("runs.*.evals.*.gap_to_optimum", "gap to the pPCA optimum"),
    Judged("runs.*.evals.*.posterior_gap", "KL(q ‖ posterior)"),
)

PLOTS = {
    "convergence.png": plot_convergence,
    "convergence_iwae.png": plot_iwae,
    "convergence_kl.png": plot_kl,
    "convergence_optimum.png": plot_optimum,
    "convergence_lockstep.png": plot_lockstep,
}


QUESTION = "Which framework reaches the best ELBO?"


def answer(records: list[dict[str, Any]]) -> str:
    """One line for the suite's summary, from the records."""
    multi = mixed(records)
    finals = {who(r, multi): final_elbo(r) for r in by_precision(records) if done(r)}
    if not finals:
        return "no framework finished training"
    best = max(finals, key=lambda k: finals[k])
    others = ", ".join(f"{k} {v:.2f}" for k, v in finals.items() if k != best)
    # across frameworks within each precision: the widest
    spreads = [elbo_spread({f"{r['framework']}/{r['mode']}": final_elbo(r) for r in records if done(r) and precision_of(r) == p})
               for p in dict.fromkeys(precision_of(r) for r in records if done(r))]
    spread = math.nan if any(math.isnan(v) for v in spreads) else max(spreads)  # a NaN spread is the worst
    tol = recorded_setting(records, "agree_nats")
    steps = done(next(r for r in records if done(r)))[0]["evals"][-1]["step"]
    verdict = "within" if le(spread, tol) else "OUTSIDE"
    checks, _ = precision_checks(records)
    failed = [f"{c.label} {c.precision}" for c in checks if not c.ok]
    low = ("; mixed precision within float32's band: " + ("all" if not failed else f"NO ({', '.join(failed)})")
           + f" ({len(checks)} judged)") if checks else ""
    return (f"{best}: test ELBO {finals[best]:.2f} nats after {steps} steps" + (f" ({others})" if others else "") + "; "
            f"spread {spread:.2f} nats, {verdict} the {tol:g}-nat agreement tolerance" + low)


#: the narrowest band `vaebench compare` allows around a final ELBO, in nats per example
BAND_FLOOR = 0.05


def compared(records: list[dict[str, Any]]) -> dict[str, Quantity]:
    """For `vaebench compare`: the final test ELBO and IWAE log-likelihood (mean over seeds)
    within a band of the baseline's spread over seeds (float32 training is not bit-reproducible
    across CPUs), and the number of completed seeds."""
    out: dict[str, Quantity] = {}
    for r in records:
        # float32's and float64's names as they always were; a mixed precision's carry it
        prec = precision_of(r)
        fw, runs = f"{r['framework']}/{r['mode']}" + (f" {prec}" if prec in MIXED else ""), done(r)
        out[f"{fw} seeds completed"] = Quantity(len(runs), "same")
        if not runs:
            continue
        steps = runs[0]["evals"][-1]["step"]
        for key, vals in (("test ELBO", [x["evals"][-1]["test_elbo"] for x in runs]),
                          ("test log p(x)", [x["final"]["test_log_likelihood"] for x in runs])):
            mean, std = mean_std(vals)
            out[f"{fw} {key} at step {steps}"] = Quantity(mean, "band", BAND_FLOOR, spread=std, unit="nats")
    return out

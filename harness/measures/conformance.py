"""Do the frameworks implement the same VAE and the same training step?

Same canonical weights, batch and noise in every framework, in float32 and float64:

1. **Loss parts and gradients** of each part w.r.t. every parameter, pairwise across frameworks
   and against the independent NumPy reference (`harness.reference`).
2. **Per-step checks from a shared state** (the verdict on the training step). A NumPy reference
   trajectory of N SGD and N Adam steps gives, at every step i, parameters θ_i and optimizer
   state s_i. Every framework loads (θ_i, s_i) through `set_params`/`set_state`, takes ONE step
   on batch i with noise i, and its update Δθ = θ' - θ_i and step loss are compared with the
   NumPy step from the same (θ_i, s_i). Nothing compounds from one step to the next, so these
   rows cannot be chaotic: they hold or fail for the same reason on every CPU. Tolerances are
   relative to a rounding floor measured per step (see `FLOOR_FACTOR`).
3. **Free-running trajectories**: each framework trains N steps on its own from the same start.
   float64 is judged (strict); float32 is *reported, never judged*: in float32 a rounding-level
   difference flips a ReLU at its kink and the trajectories part chaotically, which measures
   rounding luck, not the implementation. Beside it stands a control: the same framework started
   from weights one ulp away, i.e. that framework's sensitivity to its own rounding.

A planted disagreement (`measure.conformance.plant`, in `plant_framework` only) proves the
verdict both robust and sensitive: `ulp` (weights one ulp off) must PASS; `weights` (1e-3
relative), `lr` (x 1.001), `beta2` (-1e-3) and `bias_correction` (Adam without it) must FAIL and
name the framework.

Each framework's job writes its arrays next to its record (`<record>.npz`), including the NumPy
reference values it was compared with, so `summarize` rebuilds the table from files alone.
"""

from __future__ import annotations

import io
import itertools
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from harness import data as data_mod
from harness import frameworks, reference
from harness.api import ModelSpec
from harness.initializers import init_params, one_ulp
from harness.job import Job, Result
from harness.judged import Judged, describe
from harness.metrics import load, plain
from harness.models.base import reduction_terms
from harness.schema import ConfigError, setting
from harness.spec import FRAMEWORKS, MIXED, TERMS, Dtype, OptimSpec, Policy, choices, param_dtype

if TYPE_CHECKING:
    from harness.config import AppConfig
from harness.measures.common import Quantity, Summary, backend, completed, dataset, fmt, model_spec, optim_spec, split
from harness.records import write_atomic

#: (quantity, dtype) -> tolerance on the relative deviation (terms/grads: measured worst
#: 4e-7 (float32) and 6e-16 (float64) on two CPU vendors; tolerance ~25x and ~1e5x above)
TOLERANCES: dict[tuple[str, str], float] = {
    ("terms", "float32"): 1e-5,
    ("terms", "float64"): 1e-10,
    ("grads", "float32"): 1e-4,
    ("grads", "float64"): 1e-9,
    ("sgd trajectory", "float64"): 1e-8,  # free-running float64 trajectories of the same step (SGD, Adam per convention)
}
# Mixed precision (`harness.spec.MIXED`): the layers compute in a low type and everything else in
# float32, so every tolerance is a multiple of a unit u, each derived from measurements (median
# over check batches / steps; torch, TensorFlow and JAX on the MLP (digits) and a small conv VAE
# (mnist5k)). u is bfloat16's unit roundoff 2^-8 for both low types (`unit`): on the conv VAE
# float16's deviations are as large as bfloat16's, not 8 x smaller (a ReLU within the low type's
# rounding of its kink flips, and moves a gradient or a step by an amount that does not shrink
# with the type's roundoff: the same gradient deviates 0.041 in bfloat16, 0.052 in float16; the
# step scale 1.5 and 2.2 bfloat16 u); on the MLPs float16 is far inside every bound.
#: terms and gradients against NumPy's float64 and pairwise (the median check batch): measured at
#: most 3.4 u on the MLPs, 22 u on the conv VAE (bfloat16; float16 9 u); judged at 50 u
MIXED_TOL_U = 50.0
#: the per-step Δθ floor adds one u of |Δθ| (relative L2) to float32's; the median step's Δθ /
#: floor is judged against MIXED_FLOOR_FACTOR: healthy at most 4.2 (bfloat16 SGD on the conv VAE,
#: torch; 3.5 on the MLP; float16 0.7 on the conv VAE); the weights plant (scaled to the type: WEIGHTS_PLANT_U) 52 in bfloat16 SGD. Adam's floor carries
#: the gradient's rounding through Adam's step (see `per_step`), which amplifies it where |g| is
#: small: wide, so Adam's faults (lr, beta2, bias correction) are caught by the step scale
MIXED_FLOOR_FACTOR = 10.0
#: a step's loss (a float32 reduction of low-type layers): measured at most 0.09 u (worst step); judged at 1 u
MIXED_STEP_LOSS_U = 1.0
#: the step's scale, median over steps of <Δθ, Δθ_numpy> / |Δθ_numpy|^2 - 1: rounding errors of
#: random sign mostly cancel in the projection, a wrong step size does not. Measured healthy: at
#: most 0.03 u on the MLP of the sample config (50 steps), 0.18 u on a 32-unit MLP over 8 steps
#: (fewer entries and steps average less), 0.27 u for float16 SGD on the conv VAE and 1.5 u for
#: torch's bfloat16 SGD on it (a systematic 0.6% in its gradient's size); judged at 3 u
MIXED_STEP_SCALE_U = 3.0
#: the lr plant in a low type: x 1.001 reads 1e-3 in the step scale, 0.26 u in bfloat16, within
#: the type's own spread; so it is x (1 + 10 u) there (3.9%), 3 x the tolerance: on the conv VAE a
#: smaller error of the step size is not told from the low types' own
LR_PLANT_U = 10.0
#: float16 per-step checks: a step skipped for an overflow (the dynamic loss scale halves) is taken
#: again from the same state, up to this many times (the conv VAE's first steps overflow 2^15 and
#: settle at 2^14; `skipped` in the arrays counts the retries per step)
MAX_SKIPS = 8
#: the weights plant in a low type: 1e-3 relative is below bfloat16's resolution (u = 3.9e-3: the
#: cast to the compute type rounds most of it away, no fault of the computation), so it moves
#: the weights by this many u there (12%)
WEIGHTS_PLANT_U = 30.0


def unit(dtype: str) -> float:
    """The unit of a mixed precision's tolerances: bfloat16's unit roundoff, for both low types."""
    return max(MIXED[dtype], MIXED["bfloat16"])


for _low in MIXED:
    TOLERANCES[("terms", _low)] = TOLERANCES[("grads", _low)] = MIXED_TOL_U * unit(_low)


def floor_factor(dtype: str) -> float:
    """What the median step's Δθ / floor is judged against in `dtype`."""
    return MIXED_FLOOR_FACTOR if dtype in MIXED else FLOOR_FACTOR


def step_loss_tol(dtype: str) -> float:
    return MIXED_STEP_LOSS_U * unit(dtype) if dtype in MIXED else STEP_LOSS_TOL[dtype]
#: per-step checks: the median step's deviation / (rounding floor of that step) must stay below
#: this factor. The floor is what the dtype alone makes unavoidable (see `step_floor`); healthy
#: frameworks measured at most 0.6 (worst step, ReLU-kink steps aside), one-ulp plants at most
#: 1.2, the planted faults >= 180 (float32) and >= 1e11 (float64) on the MLP. On the conv VAE,
#: whose 25,088-term sums widen the floor: healthy at most 2.3 (TensorFlow's XLA SGD step), the
#: learning-rate plant 28 (float32 SGD, its narrowest margin; 140 for Adam) and 1.5e10 (float64).
FLOOR_FACTOR = 20.0
#: loss of one step: the float32 loss of a 64-pixel Bernoulli VAE carries ~1e-7 relative
#: rounding (measured worst 3e-7); float64 ~1e-15.
STEP_LOSS_TOL = {"float32": 1e-5, "float64": 1e-10}
PLANTS = ("none", "ulp", "weights", "lr", "beta2", "bias_correction")
PLANT_NOTES = {
    "ulp": "its weights were moved by one ulp (a rounding-level change): the verdict must still PASS",
    "weights": "its weights were perturbed by 1e-3 relative (30 u in a low type of unit roundoff u): it must FAIL",
    "lr": "its learning rate was x 1.001 (x (1 + 10 u) in a low type of unit roundoff u): it must FAIL",
    "beta2": "its Adam beta2 was lowered by 1e-3: it must FAIL",
    "bias_correction": "its Adam step counter was loaded as 1e9, i.e. Adam without bias correction: it must FAIL",
}
KINK_NOTE = (
    "Free-running float32 trajectories are reported, not judged: a ~1e-7 rounding difference flips a ReLU at "
    "its kink and a trajectory then parts abruptly, which measures rounding luck rather than whether the "
    "frameworks implement the same step (the per-step rows judge that). The one-ulp control shows one "
    "framework's sensitivity to its own rounding: a cross-framework parting of the same size is rounding."
)
#: {keras}: the frameworks in Keras' Adam convention (`FrameworkFacts.adam_convention`), {standard}: the others
KERAS_ADAM_NOTE = (
    "Keras adds Adam's eps to the uncorrected sqrt(v) ({standard} to the bias-corrected one): an effective "
    "eps of eps/sqrt(1-beta2^t). The per-step rows compare {keras} with a NumPy step in Keras' convention; "
    "the convention itself moves Adam's update by {effect:.1e} relative (largest over the steps, NumPy), which "
    "is why {keras}'s free-running float64 Adam trajectory drifts from {standard}'s (reported, not judged: the "
    "trajectories of one convention are judged against each other)."
)
MIXED_NOTE = (
    "Mixed precision ({types}): the layers compute in the low type, parameters, optimizer state and loss "
    "reductions in float32, judged against NumPy's float64 oracle with tolerances in units of bfloat16's unit "
    "roundoff u = 2^-8 (float16's deviations on the conv VAE are as large: ReLU kinks); a step's size "
    "(its projection on NumPy's step) is judged beside its deviation, which the low type's rounding dominates."
)
#: the arrays file's key holding the number of check batches (a record without it has one batch,
#: its terms and gradients without the leading batch axis)
CHECK_BATCHES = "meta/check_batches"
BIG_STEP = 10**9  # Adam's 1 - beta^t is exactly 1 in float64 from t ~ 4e4 on


@dataclass
class ConformanceConfig:
    dtypes: list[str] = setting(["float32", "float64"], choices=choices(Dtype), nonempty=True)
    steps: int = setting(50, gt=0)  # optimizer steps per trajectory (SGD and Adam)
    batch_size: int = setting(32, gt=0)  # the trajectories' batches
    # terms and gradients are compared on this many batches of check_batch_size examples each:
    # judged on the worst batch in float64 and on the median batch in float32, where a ReLU
    # within rounding of its kink may flip in one framework and not in another (`KINK_NOTE`)
    check_batches: int = setting(5, gt=0)
    check_batch_size: int = setting(4, gt=0)
    sgd_lr: float = setting(0.05, gt=0)
    # halve sgd_lr until the float64 NumPy reference trajectory is stable (`stable_step`; the
    # step used is in the record and the notes); false: sgd_lr as given (a divergent step fails)
    stable_sgd: bool = True
    adam_lr: float = setting(1e-3, gt=0)
    # self-test: plant a disagreement in one framework: ulp (must still pass) | weights | lr |
    # beta2 | bias_correction (each must fail, naming the framework)
    plant: str = setting("none", choices=PLANTS)
    plant_framework: str = setting("", choices=("", *FRAMEWORKS))


Config = ConformanceConfig


@dataclass
class DtypeMetrics:
    """One dtype's numbers in the record (its arrays are in the arrays file)."""

    loss: float  # the framework's mean loss over the check batches


@dataclass(kw_only=True)  # keyword-only: `arrays`, required, comes last as in the records
class ConformanceMetrics:
    """The conformance record's metrics (`harness.metrics`: built here, stored by `plain`, read
    back by `load`): what the arrays were made with and where they are; every comparison is
    made from the arrays (`summarize`)."""

    dtypes: list[str]
    steps: int
    batch_size: int
    plant: str  # planted in this framework ("none" when it was not the plant_framework)
    # absent in records from before the check batches and stable_sgd (one check batch, the
    # configured step sizes)
    check_batches: int | None = None
    check_batch_size: int | None = None
    sgd_lr: float | None = None  # the SGD step used (after stable_sgd's halvings)
    adam_lr: float | None = None
    sgd_lr_halved: list[str] | None = None  # the SGD steps stable_sgd tried and rejected
    float32: DtypeMetrics | None = None  # per dtype of `dtypes` (absent when not measured)
    float64: DtypeMetrics | None = None
    bfloat16: DtypeMetrics | None = None
    float16: DtypeMetrics | None = None
    arrays: str  # the arrays file beside the record (`<record>.npz`)


METRICS = ConformanceMetrics
#: what it reads (`harness.measures`): the configured model and data set, but its own dtypes,
#: batch size and SGD/Adam steps (of optim.* only beta1, beta2, eps)
READS = ("framework", "-framework.precision", "seed", "model", "data", "-data.batch_size", "optim", "-optim.name",
         "-optim.lr", "-optim.momentum", "measure.conformance")
VERSION = 1


def reads(config: dict[str, Any]) -> tuple[str, ...]:
    """READS; without `plant_framework` when nothing is planted (`plant=none`); with
    `framework.precision` when it names a mixed precision (it then chooses the dtype: `dtypes`)."""
    plant = ((config.get("measure") or {}).get("conformance") or {}).get("plant", ConformanceConfig().plant)
    out: tuple[str, ...] = READS if plant != "none" else (*READS, "-measure.conformance.plant_framework")
    if (config.get("framework") or {}).get("precision") in MIXED:
        out = tuple(r for r in out if r != "-framework.precision")
    return out


def dtypes(c: AppConfig) -> list[str]:
    """The dtypes compared: `measure.conformance.dtypes`, or the mixed precision that
    `framework.precision` names (bfloat16 | float16), judged against NumPy's float64 oracle."""
    return [c.framework.precision] if c.framework.precision in MIXED else list(c.measure.conformance.dtypes)


def precision(c: AppConfig) -> str:
    return "+".join(dtypes(c))


def validate(c: AppConfig) -> None:
    cf = c.measure.conformance
    if cf.plant != "none" and not cf.plant_framework:
        raise ConfigError("measure.conformance.plant_framework", f"plant={cf.plant} needs the framework to plant it in")


def inputs(c: AppConfig) -> tuple[ModelSpec, dict[str, np.ndarray], list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """The shared inputs: spec, canonical weights, the check batches (consecutive training
    examples, each batch with its own noise), and the training data."""
    ds = dataset(c)
    spec = model_spec(c, ds)
    cf = c.measure.conformance
    n = cf.check_batch_size
    checks = [(ds.x_train[i * n : (i + 1) * n], data_mod.noise((n, spec.latent), c.seed, i)) for i in range(cf.check_batches)]
    if any(len(x) < n for x, _ in checks):
        raise ConfigError("measure.conformance.check_batches",
                          f"{cf.check_batches} x {n} examples exceed the {len(ds.x_train)} training examples")
    return spec, init_params(spec, c.seed), checks, ds.x_train


def trajectory_batches(c: AppConfig, x_train: np.ndarray, latent: int) -> list[tuple[np.ndarray, np.ndarray]]:
    cf = c.measure.conformance
    out: list[tuple[np.ndarray, np.ndarray]] = []
    for epoch in itertools.count():
        for xb in data_mod.batches(x_train, cf.batch_size, c.seed, epoch):
            out.append((xb, data_mod.noise((len(xb), latent), c.seed, 1000 + len(out))))
            if len(out) == cf.steps:
                return out
    raise AssertionError("unreachable")


# --- planted disagreements ----------------------------------------------------------------


def plant_params(params: dict[str, np.ndarray], plant: str, dtype: str, seed: int) -> dict[str, np.ndarray]:
    """The plant's weights: one ulp of the stored type (`param_dtype`), or a relative perturbation
    of 1e-3 (WEIGHTS_PLANT_U unit roundoffs in a low type, where that is more)."""
    if plant == "ulp":
        return one_ulp(params, param_dtype(dtype))
    if plant == "weights":
        rng = np.random.default_rng([seed, 99])
        rel = max(1e-3, WEIGHTS_PLANT_U * unit(dtype)) if dtype in MIXED else 1e-3
        return {k: v * (1.0 + rel * rng.standard_normal(v.shape)) + 1e-5 * rng.standard_normal(v.shape)
                for k, v in params.items()}
    return params


def plant_optim(o: OptimSpec, plant: str, dtype: str = "float32") -> OptimSpec:
    """The plant's optimizer: a learning rate x 1.001 (x (1 + LR_PLANT_U u) in a low type, where
    that is more), or Adam's beta2 lowered by 1e-3."""
    if plant == "lr":
        return replace(o, lr=o.lr * (1.0 + (LR_PLANT_U * unit(dtype) if dtype in MIXED else 1e-3)))
    if plant == "beta2" and o.name == "adam":
        return replace(o, beta2=o.beta2 - 1e-3)
    return o


def plant_state(state: dict[str, np.ndarray], plant: str) -> dict[str, np.ndarray]:
    if plant == "bias_correction" and "adam.step" in state:
        return {**state, "adam.step": np.array(BIG_STEP, dtype=np.int64)}
    return state


# --- the job (one framework, in its own process) ------------------------------------------


def _optims(c: AppConfig) -> dict[str, OptimSpec]:
    cf = c.measure.conformance
    base = optim_spec(c)
    return {
        "sgd": replace(base, name="sgd", lr=cf.sgd_lr, momentum=0.0),
        "adam": replace(base, name="adam", lr=cf.adam_lr, momentum=0.0),
    }


def reference_trajectory(spec: ModelSpec, params: dict[str, np.ndarray], optim: OptimSpec,
                         steps: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """(θ_i, s_i) before each step of a float64 NumPy training run (torch/optax convention)."""
    p, s = params, reference.init_state(params, optim)
    out = []
    with np.errstate(over="ignore", invalid="ignore"):  # a divergent step is judged, not warned about
        for xb, e in steps:
            out.append((p, s))
            p, s = reference.optimizer_step(p, s, reference.grads(p, xb, e, spec, "loss"), optim)
    return out


#: a reference trajectory diverges when a step's loss is not finite or exceeds this multiple
#: of the first step's loss. Each step's loss is on its own batch, so healthy runs vary: the MLP
#: on digits only falls (max/first = 1.0), Adam on the linear model reached 1.56 x; a divergent
#: SGD step on the linear model went 80.8, 100.8, 1354 (17 x), 7.5e7, inf
DIVERGENCE_FACTOR = 10.0
#: stable_sgd halves sgd_lr until no step's loss of the reference exceeds this multiple of the
#: first step's: a step size that doubles the loss is not training, and the per-step rounding
#: differences that a free-running trajectory carries grow through such steps without bound
#: (the conv VAE at 0.05 swung between 300 and 3,000 nats, and drove float64 trajectories that
#: agree per step to 1e-13 apart by 7e-8). The MLP, linear and Adam references stay at or near 1.
STABLE_FACTOR = 2.0
#: stable_sgd halves sgd_lr at most this many times
MAX_HALVINGS = 10


def reference_losses(spec: ModelSpec, traj: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]],
                     steps: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The float64 NumPy loss of each step of a reference trajectory, at the state it starts from."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.array([float(reference.terms(p, xb, e, spec).loss.mean()) for (p, _), (xb, e) in zip(traj, steps)])


def divergence(losses: np.ndarray, factor: float = DIVERGENCE_FACTOR) -> str | None:
    """Where a trajectory's losses diverge (not finite, or above `factor` x the first), as
    "loss inf at step 5 (first step 80.8)"; None when they do not."""
    limit = factor * abs(float(losses[0])) if len(losses) and np.isfinite(losses[0]) else -np.inf
    for i, v in enumerate(losses):
        if not np.isfinite(v) or v > limit:
            return f"loss {v:.4g} at step {i + 1} (first step {losses[0]:.4g})"
    return None


def stable_step(spec: ModelSpec, params: dict[str, np.ndarray], optim: OptimSpec,
                steps: list[tuple[np.ndarray, np.ndarray]]) -> tuple[OptimSpec, list[str]]:
    """`optim` with its learning rate halved until no loss of the float64 NumPy reference
    trajectory exceeds STABLE_FACTOR x its first (`divergence`), and what was tried: ["0.05: loss
    inf at step 5", ...]."""
    tried: list[str] = []
    for _ in range(MAX_HALVINGS + 1):
        traj = reference_trajectory(spec, params, optim, steps)
        why = divergence(reference_losses(spec, traj, steps), STABLE_FACTOR)
        if why is None:
            return optim, tried
        tried.append(f"{optim.lr:g}: {why}")
        optim = replace(optim, lr=optim.lr / 2)
    return replace(optim, lr=optim.lr * 2), tried  # the smallest tried: it diverges, and is judged so


def _flat(params: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in params.values()])


def step_floor(theta: np.ndarray, new: np.ndarray, dtype: str, terms: np.ndarray | float = 1.0) -> float:
    """Relative L2 error of Δθ that rounding alone makes unavoidable: θ' is stored in `dtype`,
    so each entry of Δθ = θ' - θ carries up to half an ulp of θ' (cancellation: ulp(θ)/|Δθ|),
    and the step itself is computed from `dtype` inputs: sqrt(n) ulps of |Δθ| for an entry
    whose gradient sums n terms (`terms`, per entry; `reduction_terms`). A sum of n terms in an
    order the framework chooses (blocked, pairwise, recursive, fused into the step) carries an
    error that grows like sqrt(n) eps |sum| (errors of random sign; Higham, Accuracy and
    Stability of Numerical Algorithms, sec. 4.2): negligible for the MLP's batch sums (n = 32),
    dominant for the conv VAE's output bias (32 x 784 = 25,088 terms), which XLA sums up to
    2,400 eps away from NumPy's pairwise sum in a fused float64 SGD step (measured)."""
    with np.errstate(over="ignore", invalid="ignore"):  # a diverged state: NaN, judged as such
        half_ulp = 0.5 * np.spacing(np.abs(new).astype(dtype)).astype(np.float64)
        unit = np.finfo(dtype).eps * np.sqrt(terms) * np.abs(new - theta)
        return float(np.linalg.norm(half_ulp + unit)) / max(float(np.linalg.norm(new - theta)), 1e-300)


def entry_terms(spec: ModelSpec, params: dict[str, np.ndarray], batch: int) -> np.ndarray:
    """Per entry of `_flat(params)`, the terms its gradient sums over a batch of `batch`."""
    n = reduction_terms(spec.module.layers(spec))
    missing = [k for k in params if k not in n]
    if missing:
        raise ValueError(f"model kind {spec.kind!r}: its layers() do not cover parameter {missing[0]!r} "
                         "(the conformance floor needs every parameter's layer)")
    return np.concatenate([np.full(np.size(v), batch * n[k], dtype=np.float64) for k, v in params.items()])


def adam_convention(framework: str) -> str:
    """Where `framework`'s Adam adds eps (`FrameworkFacts.adam_convention`: "standard" | "keras")."""
    return frameworks.facts(framework).adam_convention


def per_step(c: AppConfig, framework: str, spec: ModelSpec, dtype: str, opt_name: str, optim: OptimSpec,
             traj: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]],
             steps: list[tuple[np.ndarray, np.ndarray]], plant: str) -> dict[str, np.ndarray]:
    """One step per reference state, in the framework and in NumPy (its own Adam convention)."""
    convention = adam_convention(framework) if opt_name == "adam" else "standard"
    b = backend(c, framework, spec=spec, dtype=dtype, optim=plant_optim(optim, plant, dtype))
    hold, u = param_dtype(dtype), unit(dtype) if dtype in MIXED else None  # the stored type; mixed: the unit
    scaling = Policy.of(dtype).loss_scaling
    dev, loss_dev, floor, keras, scale, skips = [], [], [], [], [], []  # type: ignore[var-annotated]
    terms = entry_terms(spec, traj[0][0], len(steps[0][0])) if traj else np.ones(0)
    for (p, s), (xb, e) in zip(traj, steps):
        p = {k: v.astype(hold).astype(np.float64) for k, v in p.items()}  # the state as `dtype` holds it
        s = {k: (v if k.endswith(".step") else v.astype(hold).astype(np.float64)) for k, v in s.items()}
        e = e.astype(hold).astype(np.float64)
        loaded = plant_params(p, plant, dtype, c.seed)
        for tries in range(MAX_SKIPS + 1):
            b.set_params(loaded)
            b.set_state(plant_state(s, plant))
            loss = float(b.train_step(xb, e))
            # float16: a step skipped for a non-finite gradient halved the loss scale; the same
            # step is taken again from the same state (as training goes on at the lower scale)
            if not scaling or b.version()["skipped_steps"] == sum(skips) + tries:
                break
        skips.append(tries)
        got = _flat(b.get_params()) - _flat(loaded)  # the step the framework took from where it stood
        g = reference.grads(p, xb, e, spec, "loss")
        new, _ = reference.optimizer_step(p, s, g, optim, convention=convention)
        want = _flat(new) - _flat(p)
        dev.append(float(np.linalg.norm(got - want)) / max(float(np.linalg.norm(want)), 1e-300))
        # mixed: the layers' rounding of the gradient, u of each tensor's RMS per entry, carried
        # through the optimizer's step (SGD: u of |Δθ|; Adam amplifies it where |g| is small,
        # since its step is g / sqrt(v)), added to the stored type's floor
        low_floor = 0.0
        if u is not None:
            nudged = {k: v + u * np.sqrt(np.mean(v**2)) * np.where(v < 0, -1.0, 1.0) for k, v in g.items()}
            moved, _ = reference.optimizer_step(p, s, nudged, optim, convention=convention)
            low_floor = max(u, float(np.linalg.norm(_flat(moved) - _flat(new)) / max(float(np.linalg.norm(want)), 1e-300)))
        floor.append(step_floor(_flat(p), _flat(new), hold, terms) + low_floor)
        if u is not None:
            scale.append(float(got @ want) / max(float(want @ want), 1e-300) - 1.0)
        ref_loss = float(reference.terms(p, xb, e, spec).loss.mean())
        loss_dev.append(abs(loss - ref_loss) / abs(ref_loss))
        if convention == "keras":
            std, _ = reference.optimizer_step(p, s, g, optim, convention="standard")
            keras.append(float(np.linalg.norm(_flat(std) - _flat(new)) / np.linalg.norm(want)))
    out = {"dtheta": np.array(dev), "floor": np.array(floor), "loss": np.array(loss_dev)}
    if keras:
        out["keras convention effect"] = np.array(keras)
    if scale:
        out["scale"] = np.array(scale)
    if scaling:
        out["skipped"] = np.array(skips)
    return out


def free_run(c: AppConfig, framework: str, spec: ModelSpec, dtype: str, optim: OptimSpec,
             params: dict[str, np.ndarray], steps: list[tuple[np.ndarray, np.ndarray]], plant: str) -> np.ndarray:
    b = backend(c, framework, spec=spec, dtype=dtype, params=params, optim=plant_optim(optim, plant, dtype))
    if plant == "bias_correction":
        b.set_state(plant_state(b.get_state(), plant))
    return np.array([float(b.train_step(b.put(xb), e)) for xb, e in steps])


def run(c: AppConfig, job: Job) -> Result:
    cf = c.measure.conformance
    plant = cf.plant if cf.plant_framework == job.framework else "none"
    spec, params, checks, x_train = inputs(c)
    steps = trajectory_batches(c, x_train, spec.latent)
    optims = _optims(c)
    halved: list[str] = []
    if cf.stable_sgd:
        optims["sgd"], halved = stable_step(spec, params, optims["sgd"], steps)
    trajs = {name: reference_trajectory(spec, params, o, steps) for name, o in optims.items()}
    arrays: dict[str, np.ndarray] = {}
    env: dict[str, Any] = {}
    per_dtype: dict[str, DtypeMetrics] = {}
    for name in optims:
        arrays[f"ref/{name} trajectory"] = reference_losses(spec, trajs[name], steps)
    for dtype in dtypes(c):
        hold = param_dtype(dtype)  # what the backend stores (float32 under mixed precision)
        start = plant_params(params, plant, dtype, c.seed)
        b = backend(c, job.framework, spec=spec, dtype=dtype, params=start)
        # NumPy at the unplanted inputs as `dtype` holds them (a plant must show as a deviation),
        # in float64 (the oracle) and in `dtype` (NumPy's own rounding: the floor of the tolerance)
        # (a mixed precision has no NumPy floor: its tolerances are multiples of its u, MIXED_TOL_U)
        pd = {k: v.astype(hold).astype(np.float64) for k, v in params.items()}
        pn = {k: v.astype(hold) for k, v in params.items()}
        per: dict[str, list[Any]] = {}
        for x, eps in checks:
            t = b.terms(x, eps)
            ed = eps.astype(hold).astype(np.float64)
            xn, en = x.astype(hold), eps.astype(hold)
            ref = reference.terms(pd, x, ed, spec)
            low = None if dtype in MIXED else reference.terms(pn, xn, en, spec)
            for part in TERMS:
                per.setdefault(f"{dtype}/terms/{part}", []).append(getattr(t, part))
                per.setdefault(f"ref/{dtype}/terms/{part}", []).append(getattr(ref, part))
                if low is not None:
                    per.setdefault(f"ref/{dtype}/floor terms/{part}", []).append(_rel(getattr(low, part), getattr(ref, part)))
                ref_g = reference.grads(pd, x, ed, spec, part)  # type: ignore[arg-type]
                low_g = None if low is None else reference.grads(pn, xn, en, spec, part)  # type: ignore[arg-type]
                for name, g in b.grads(x, eps, part).items():  # type: ignore[arg-type]
                    per.setdefault(f"{dtype}/grads/{part}/{name}", []).append(g)
                    per.setdefault(f"{dtype}/grads vs numpy/{part}/{name}", []).append(_rel_l2(g, ref_g[name]))
                    if low_g is not None:
                        per.setdefault(f"ref/{dtype}/floor grads/{part}/{name}", []).append(_rel_l2(low_g[name], ref_g[name]))
        arrays.update({k: np.stack([np.asarray(v) for v in vs]) for k, vs in per.items()})
        for name, o in optims.items():
            for key, arr in per_step(c, job.framework, spec, dtype, name, o, trajs[name], steps, plant).items():
                arrays[f"{dtype}/{name} step/{key}"] = arr
            arrays[f"{dtype}/{name} trajectory"] = free_run(c, job.framework, spec, dtype, o, start, steps, plant)
            if dtype != "float64":
                arrays[f"{dtype}/{name} trajectory/ulp control"] = free_run(
                    c, job.framework, spec, dtype, o, one_ulp(start, hold), steps, plant)
        per_dtype[dtype] = DtypeMetrics(loss=float(np.mean(arrays[f"{dtype}/terms/loss"])))
        env = b.version()
    arrays[CHECK_BATCHES] = np.array(cf.check_batches)
    path = Path(job.record_path).with_suffix(".npz")
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]
    write_atomic(path, buf.getvalue())
    metrics = ConformanceMetrics(
        dtypes=dtypes(c), steps=cf.steps, batch_size=cf.batch_size, plant=plant, check_batches=cf.check_batches,
        check_batch_size=cf.check_batch_size, sgd_lr=optims["sgd"].lr, adam_lr=optims["adam"].lr, sgd_lr_halved=halved,
        float32=per_dtype.get("float32"), float64=per_dtype.get("float64"), bfloat16=per_dtype.get("bfloat16"),
        float16=per_dtype.get("float16"), arrays=path.name)
    diverged = []  # the NumPy reference by the growth rule; the framework's own runs by a non-finite loss
    for key in sorted(k for k in arrays if k.endswith(("trajectory", "ulp control"))):
        why = divergence(arrays[key], DIVERGENCE_FACTOR if key.startswith("ref/") else np.inf)
        if why is not None:
            diverged.append(f"{key}: {why}")
    if diverged:  # the rows stay in the table (summarize reads the arrays of a diverged record too)
        return Result(metrics=plain(metrics), status="diverged", error=f"training diverged: {'; '.join(diverged)}",
                      backend_env=env)
    return Result(metrics=plain(metrics), backend_env=env)


# --- comparison (parent process, from records and their arrays) ---------------------------


def _finite(*arrays: np.ndarray) -> bool:
    return all(bool(np.all(np.isfinite(a))) for a in arrays)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    """Largest elementwise |a - b| / max(|a|, |b|) (0 where both are 0); NaN when either holds
    a value that is not finite (no deviation is measurable there, and NaN fails every check)."""
    if not _finite(a, b):
        return math.nan
    den = np.maximum(np.abs(a), np.abs(b))
    num = np.abs(a - b)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(den > 0, num / den, 0.0)
    return float(np.max(r)) if r.size else 0.0


def _rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / max(||a||, ||b||) (0 when both are 0); NaN when either is not finite."""
    if not _finite(a, b):
        return math.nan
    den = max(float(np.linalg.norm(a)), float(np.linalg.norm(b)))
    return float(np.linalg.norm(np.asarray(a, np.float64) - b)) / den if den > 0 else 0.0


def _worse(dev: float, than: float) -> bool:
    """Whether deviation `dev` is at least as bad as `than`; NaN and inf are worse than any number
    (a plain `dev >= than` is False for NaN, and once dropped a diverged framework's row)."""
    def key(d: float) -> float:
        return d if math.isfinite(d) else math.inf
    return key(dev) >= key(than)


def nonfinite_where(names: dict[str, np.ndarray], axis: str = "index") -> str | None:
    """"torch: inf at step 5 (...)" for the first of `names` (label -> array) that holds a value
    that is not finite; None when all are finite."""
    for label, a in names.items():
        what = describe(a, axis)
        if what is not None:
            return f"{label}: {what}"
    return None


def deviation(quantity: str, dtype: str, a: dict[str, np.ndarray], b: dict[str, np.ndarray],
              names: tuple[str, str] = ("a", "b")) -> tuple[float, str]:
    """Worst relative deviation of `quantity` between two frameworks' arrays (`names` say whose),
    and where; NaN, with the framework and position named, where a value is not finite."""
    worst, where = -1.0, ""
    prefix = f"{dtype}/{quantity}"
    trajectory = quantity.endswith("trajectory")
    for key in sorted(k for k in a if k == prefix or k.startswith(prefix + "/")):
        if key.endswith("/ulp control"):
            continue
        if key not in b:
            return float("inf"), f"{key} missing"
        dev = _rel_l2(a[key], b[key]) if quantity == "grads" else _rel(a[key], b[key])
        if _worse(dev, worst):
            worst, where = dev, key[len(prefix) + 1 :] or quantity
            bad = nonfinite_where({names[0]: a[key], names[1]: b[key]}, "step" if trajectory else "index")
            if bad is not None:
                where = f"{where}: {bad}" if where != quantity else bad
            elif trajectory:
                where = trajectory_where(a[key], b[key])
    return max(worst, 0.0) if math.isfinite(worst) else worst, where


def trajectory_where(a: np.ndarray, b: np.ndarray) -> str:
    """The worst step and the step where the two trajectories first part by more than 1e-5:
    a jump there from ~1e-7 is a discrete event (a ReLU changing state), not drift."""
    per_step = np.abs(a - b) / np.maximum(np.maximum(np.abs(a), np.abs(b)), 1e-300)
    where = f"worst at step {int(np.argmax(per_step)) + 1}/{len(a)}"
    if np.any(per_step > 1e-5):
        first = int(np.argmax(per_step > 1e-5))
        before = float(per_step[first - 1]) if first else 0.0
        where += f"; parts at step {first + 1} (step before: {before:.0e})"
    return where


def _row(quantity: str, dtype: str, pair: str, where: str, dev: float, tol: float | str) -> dict[str, Any]:
    """A table row. A judged row passes when `dev <= tol` (never for NaN); a reported row (`tol`
    a text) is not judged, unless its deviation is not a finite number: that fails too."""
    judged = not isinstance(tol, str)
    if not math.isfinite(dev):
        verdict = "NO"
    elif judged:
        verdict = "yes" if dev <= tol else "NO"  # type: ignore[operator]
    else:
        verdict = "reported"
    return {
        "quantity": quantity,
        "dtype": dtype,
        "worst": pair,
        "where": where,
        "max rel. deviation": fmt(dev, ".2e"),
        "tolerance": fmt(tol, ".0e") if judged else tol,
        "pass": verdict,
    }


def _pairwise(loaded: dict[str, dict[str, np.ndarray]], quantity: str, dtype: str) -> tuple[float, str, str]:
    worst, pair, where = -1.0, "-", ""
    per_batch = quantity in ("terms", "grads")
    for fa, fb in itertools.combinations(loaded, 2):
        if per_batch:
            dev, w = judged_over_batches(dtype, [deviation(quantity, dtype, a, b, names=(fa, fb))
                                                 for a, b in zip(batches(loaded[fa]), batches(loaded[fb]))])
        else:
            dev, w = deviation(quantity, dtype, loaded[fa], loaded[fb], names=(fa, fb))
        if _worse(dev, worst):
            worst, pair, where = dev, f"{fa} vs {fb}", w
    return worst, pair, where


#: arrays compared per check batch (their first axis, in records that have CHECK_BATCHES)
BATCHED = ("/terms/", "/grads/", "/grads vs numpy/", "/floor terms/", "/floor grads/")


def batches(a: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """One framework's per-batch arrays, one dict per check batch (the other arrays left out);
    a record from before the check batches is one batch."""
    keyed = {k: v for k, v in a.items() if any(m in "/" + k for m in BATCHED)}
    if CHECK_BATCHES not in a:
        return [keyed]
    return [{k: v[i] for k, v in keyed.items()} for i in range(int(a[CHECK_BATCHES]))]


def judged_over_batches(dtype: str, per_batch: list[tuple[float, str]]) -> tuple[float, str]:
    """The judged deviation over the check batches and where: the worst batch in float64; in
    float32 the median batch, since a ReLU within rounding of its kink flips in one framework
    and not in another, a discrete jump in that one batch's numbers (KINK_NOTE). A deviation that
    is not finite in any batch is judged as such (NaN fails)."""
    devs = np.array([d for d, _ in per_batch], dtype=np.float64)
    i = int(np.argmax(np.where(np.isfinite(devs), devs, np.inf)))
    where = per_batch[i][1] if len(devs) == 1 else f"batch {i + 1}/{len(devs)}: {per_batch[i][1]}"
    if not np.all(np.isfinite(devs)):
        return math.nan, where
    if dtype == "float64" or len(devs) == 1:
        return float(devs[i]), where
    med = float(np.median(devs))
    return med, f"median of {len(devs)} batches; worst {where}: {devs[i]:.2g}"


def floor_tolerance(loaded: dict[str, dict[str, np.ndarray]], quantity: str, dtype: str) -> tuple[float, float]:
    """(tolerance, floor) of `quantity` ("terms" | "grads") in `dtype`: the fixed tolerance, or
    FLOOR_FACTOR x the floor where that is larger. The floor is NumPy's own deviation from its
    float64 result when it computes in `dtype` (worst over parts or tensors, median over the
    batches): how much rounding this model and data make unavoidable (e.g. the KL near the prior
    cancels: float32 NumPy's KL of model=conv at initialisation deviates 3e-5). A floor that is
    not finite makes the tolerance NaN (the row fails); a record without floors: the fixed one."""
    fixed = TOLERANCES[(quantity, dtype)]
    per = [[float(np.max(v)) for k, v in b.items() if k.startswith(f"ref/{dtype}/floor {quantity}/")]
           for a in loaded.values() for b in batches(a)]
    per = [p for p in per if p]
    if not per:
        return fixed, 0.0
    worst = np.array([max(p) if all(math.isfinite(x) for x in p) else math.nan for p in per])
    if not np.all(np.isfinite(worst)):
        return math.nan, math.nan
    floor = float(np.median(worst))
    return max(fixed, FLOOR_FACTOR * floor), floor


def _worst_vs_numpy(arrs: dict[str, np.ndarray], prefix: str) -> tuple[float, str]:
    """Largest stored deviation against NumPy among one framework's keys under `prefix`, and
    where ("" when it has none)."""
    worst, where = -1.0, ""
    for key in (k for k in arrs if k.startswith(prefix)):
        dev = float(np.max(arrs[key])) if _finite(arrs[key]) else math.nan
        if _worse(dev, worst):
            worst, where = dev, key[len(prefix):] + ("" if math.isfinite(dev) else ": not finite")
    return worst, where


def _per_step_rows(loaded: dict[str, dict[str, np.ndarray]], dtype: str, opt: str) -> list[dict[str, Any]]:
    """Δθ: the median step's deviation / rounding floor against FLOOR_FACTOR. A planted or real
    disagreement moves every step; an isolated outlier step is a ReLU kink lying within rounding
    distance of the shared state (the gradient itself jumps there), shown but not judged.
    The step loss is continuous at kinks: judged on its worst step. A step whose numbers are not
    finite (a diverged state, a NaN update) fails both rows, named with its step."""
    key = f"{dtype}/{opt} step"
    rows = []
    med_worst, who, where, dev_at = -1.0, "-", "", 0.0
    lworst, lwho, lwhere = -1.0, "-", ""
    sworst, swho, swhere = -1.0, "-", ""
    for fw, a in loaded.items():
        if f"{key}/dtheta" not in a:
            continue
        dtheta, floor, loss = a[f"{key}/dtheta"], a[f"{key}/floor"], a[f"{key}/loss"]
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = dtheta / floor
        bad = nonfinite_where({f"{fw}: Δθ": dtheta, f"{fw}: floor": floor, f"{fw}: Δθ / floor": ratio}, "step")
        med = float(np.median(ratio)) if bad is None else math.nan
        if f"{key}/scale" in a:
            sc = a[f"{key}/scale"]
            sbad = nonfinite_where({f"{fw}: step scale": sc}, "step")
            sv = abs(float(np.median(sc))) if sbad is None else math.nan
            if _worse(sv, sworst):
                sworst, swho = sv, f"{fw} vs numpy"
                swhere = sbad or f"median over {len(sc)} steps {float(np.median(sc)):+.2e}"
        if _worse(med, med_worst):
            med_worst, who = med, f"{fw} vs numpy"
            if bad is None:
                i = int(np.argmax(ratio))
                n_out = int(np.sum(ratio > floor_factor(dtype)))
                dev_at = float(np.median(dtheta))
                where = f"median step {med:.2g} x floor; worst step {i + 1}: {ratio[i]:.3g} x; {n_out}/{len(ratio)} steps above"
            else:
                dev_at, where = math.nan, bad
        lbad = nonfinite_where({f"{fw}: step loss": loss}, "step")
        j = int(np.argmax(loss)) if lbad is None else 0
        lv = float(loss[j]) if lbad is None else math.nan
        if _worse(lv, lworst):
            lworst, lwho, lwhere = lv, f"{fw} vs numpy", f"step {j + 1}" if lbad is None else lbad
    if who != "-":
        factor = floor_factor(dtype)
        rows.append(_row(f"{opt} step Δθ", dtype, who, where, med_worst, factor))
        rows[-1]["max rel. deviation"] = f"{dev_at:.2e} (median)"
        rows[-1]["tolerance"] = f"{factor:g} x floor"
        rows.append(_row(f"{opt} step loss", dtype, lwho, lwhere, lworst, step_loss_tol(dtype)))
    if swho != "-":  # mixed precision: the step's size, which a low type's rounding cannot hide
        rows.append(_row(f"{opt} step scale", dtype, swho, swhere, sworst, MIXED_STEP_SCALE_U * unit(dtype)))
    return rows


def _convention(label: str) -> str:
    """The Adam convention of the framework of a "framework/mode" label ("standard" when the
    framework is not registered here)."""
    try:
        return adam_convention(label.split("/")[0])
    except Exception:
        return "standard"


def _free_running_float64(loaded: dict[str, dict[str, np.ndarray]], opt: str) -> list[dict[str, Any]]:
    """Free-running float64 trajectories, judged between frameworks that take the same step:
    SGD all of them; Adam within each eps convention (Keras' moves the update by up to a few
    percent where sqrt(v) ~ eps, so across conventions the trajectories drift apart and, on a
    ReLU net, part at a kink: reported, not judged; the per-step rows judge each framework
    against NumPy in its own convention)."""
    quantity = f"{opt} trajectory"
    groups: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for label, a in loaded.items():
        groups.setdefault(_convention(label) if opt == "adam" else "all", {})[label] = a
    rows = []
    worst, pair, where = -1.0, "-", ""
    for group in groups.values():
        if len(group) >= 2:
            dev, p, w = _pairwise(group, quantity, "float64")
            if _worse(dev, worst):
                worst, pair, where = dev, p, w
    if pair != "-":
        tol = TOLERANCES[("sgd trajectory", "float64")]  # the same step: rounding apart
        rows.append(_row(f"free-running {quantity}", "float64", pair, where, worst, tol))
    if len(groups) > 1:
        dev, p, w = _pairwise(loaded, quantity, "float64")
        rows.append(_row(f"free-running {quantity}, across Adam conventions", "float64", p, w, dev, "reported"))
    return rows


def _reference_rows(loaded: dict[str, dict[str, np.ndarray]]) -> list[dict[str, Any]]:
    """The NumPy reference trajectories (float64) that the per-step rows start from: judged to
    stay below DIVERGENCE_FACTOR x their first loss (a divergent step makes every per-step
    comparison meaningless: `measure.conformance.stable_sgd` halves the SGD step until it holds)."""
    rows = []
    for opt in ("sgd", "adam"):
        ref = next((a[f"ref/{opt} trajectory"] for a in loaded.values() if f"ref/{opt} trajectory" in a), None)
        if ref is None:
            continue
        why = divergence(ref)
        growth = float(np.max(ref) / ref[0]) if _finite(ref) and ref[0] != 0 else math.nan
        where = why or f"largest loss {growth:.3g} x the first step's"
        rows.append(_row(f"NumPy reference {opt} trajectory (loss / first loss)", "float64", "numpy", where,
                         growth, DIVERGENCE_FACTOR))
        if why is not None:
            rows[-1]["pass"] = "NO"
    return rows


def table_rows(loaded: dict[str, dict[str, np.ndarray]], dtypes: list[str]) -> list[dict[str, Any]]:
    """The table: per quantity and dtype, the worst deviation over frameworks against tolerance."""
    rows = _reference_rows(loaded)
    pairs = len(loaded) >= 2  # with one framework there is no pair: no row that cannot fail
    for dtype in dtypes:
        for quantity in ("terms", "grads"):
            tol, _ = floor_tolerance(loaded, quantity, dtype)
            if pairs:
                worst, pair, where = _pairwise(loaded, quantity, dtype)
                rows.append(_row(quantity, dtype, pair, where, worst, tol))
            worst, who, where = -1.0, "-", ""
            for fw, a in loaded.items():
                per_batch = []
                for bt in batches(a):
                    if quantity == "terms":
                        ref = {k[len("ref/"):]: v for k, v in bt.items() if k.startswith(f"ref/{dtype}/terms/")}
                        if ref:
                            per_batch.append(deviation("terms", dtype, bt, ref, names=(fw, "numpy")))
                    else:
                        per_batch.append(_worst_vs_numpy(bt, f"{dtype}/grads vs numpy/"))
                if not per_batch or (quantity == "grads" and per_batch[0][1] == ""):
                    continue
                dev, w = judged_over_batches(dtype, per_batch)
                if _worse(dev, worst):
                    worst, who, where = dev, f"{fw} vs numpy", w
            if who != "-":
                rows.append(_row(f"{quantity} (vs NumPy)", dtype, who, where, worst, tol))
        for opt in ("sgd", "adam"):
            rows.extend(_per_step_rows(loaded, dtype, opt))
        for opt in ("sgd", "adam"):
            quantity = f"{opt} trajectory"
            if not pairs:
                # one framework: no pair to compare, but a diverged trajectory still fails
                for fw, a in loaded.items():
                    bad = nonfinite_where({fw: a[f"{dtype}/{quantity}"]}, "step") if f"{dtype}/{quantity}" in a else None
                    if bad is not None:
                        rows.append(_row(f"free-running {quantity}", dtype, fw, bad, math.nan, "reported"))
                continue
            if dtype == "float64":
                rows.extend(_free_running_float64(loaded, opt))
                continue
            worst, pair, where = _pairwise(loaded, quantity, dtype)
            rows.append(_row(f"free-running {quantity}", dtype, pair, where, worst, "reported"))
            cworst, cwho, cwhere = -1.0, "-", ""
            for fw, a in loaded.items():
                ctl = a.get(f"{dtype}/{quantity}/ulp control")
                if ctl is not None:
                    own = a[f"{dtype}/{quantity}"]
                    dev = _rel(own, ctl)
                    if _worse(dev, cworst):
                        bad = nonfinite_where({fw: own, f"{fw} (1 ulp)": ctl}, "step")
                        cworst, cwho, cwhere = dev, f"{fw} vs itself, 1 ulp", bad or trajectory_where(own, ctl)
            if cwho != "-":
                rows.append(_row(f"  control: {quantity}", dtype, cwho, cwhere, cworst, "reported"))
    return rows


def summarize(records: list[dict[str, Any]]) -> Summary:
    """The table from the records' arrays files; a diverged record's arrays are read too, so its
    rows stay in the table (failing, with the step named)."""
    s = split(records)
    with_arrays = [r for r in s.records if r["status"] in ("ok", "diverged") and r["metrics"].get("arrays")]
    notes = s.notes
    typed = [load(ConformanceMetrics, r["metrics"], strict=False) for r in with_arrays]
    loaded: dict[str, dict[str, np.ndarray]] = {}
    for r, m in zip(with_arrays, typed):
        path = Path(r.get("_file", "")).parent / m.arrays
        if not path.exists():
            notes.append(f"{r['framework']}: arrays file {path} is missing")
            continue
        with np.load(path) as f:
            loaded[f"{r['framework']}/{r['mode']}"] = {k: f[k] for k in f.files}
        if m.plant != "none":
            notes.append(f"{r['framework']} was given a planted disagreement ({m.plant}): {PLANT_NOTES[m.plant]}")
    if not loaded:
        return Summary("Conformance across frameworks", [], False, notes or ["no records"])
    m0 = typed[0]
    dtypes = list(m0.dtypes)
    rows = table_rows(loaded, dtypes)
    if m0.sgd_lr_halved:
        notes.append(f"SGD step: measure.conformance.sgd_lr is unstable on this model in the float64 NumPy reference "
                     f"(a loss above {STABLE_FACTOR:g} x the first step's: {'; '.join(m0.sgd_lr_halved)}), so it was "
                     f"halved to {m0.sgd_lr:g} (stable_sgd=true)")
    keras = [float(np.max(a[k])) for a in loaded.values() for k in a if k.endswith("adam step/keras convention effect")]
    if keras:
        in_keras = [k.split("/")[0] for k, a in loaded.items() if any(n.endswith("adam step/keras convention effect") for n in a)]
        others = [n for n, f in frameworks.registry().items() if f.adam_convention != "keras"]
        notes.append(KERAS_ADAM_NOTE.format(effect=max(keras), keras="/".join(dict.fromkeys(in_keras)),
                                            standard="/".join(others) or "the others"))
    if any(d != "float64" for d in dtypes) and len(loaded) >= 2:
        notes.append(KINK_NOTE)
    if any(d in MIXED for d in dtypes):
        notes.append(MIXED_NOTE.format(types=", ".join(d for d in dtypes if d in MIXED)))
    if len(loaded) < 2:
        notes.append("fewer than two frameworks ran: only the comparisons with NumPy are meaningful")
    judged_rows = [r for r in rows if r["pass"] != "reported"]
    ok = bool(judged_rows) and all(r["pass"] == "yes" for r in judged_rows) and len(loaded) == len(records) and s.ok
    return Summary("Conformance across frameworks (same weights, batch and noise)", rows, ok, notes)


PLOTS: dict[str, Any] = {}  # tables only

JUDGED = (
    Judged("arrays:*/terms/*", "loss part", axis="example"),
    Judged("arrays:*/grads/*", "gradient"),
    Judged("arrays:*/grads vs numpy/*", "gradient deviation from NumPy"),
    Judged("arrays:ref/*/floor */*", "NumPy's own rounding in the dtype (the tolerance's floor)"),
    Judged("arrays:*/* step/dtheta", "one step's update deviation (Δθ)", axis="step"),
    Judged("arrays:*/* step/floor", "one step's rounding floor", axis="step"),
    Judged("arrays:*/* step/loss", "one step's loss deviation", axis="step"),
    Judged("arrays:*/* trajectory", "training trajectory loss", axis="step"),
    Judged("arrays:*/* trajectory/ulp control", "one-ulp control trajectory loss", axis="step"),
)


QUESTION = "Do the frameworks agree?"


def answer(records: list[dict[str, Any]]) -> str:
    """One line for the suite's summary, from the records (and their arrays files)."""
    s = summarize(records)
    judged_rows = [r for r in s.rows if r["pass"] != "reported"]
    failing = [f"{r['quantity']} {r['dtype']} ({r['worst']})" for r in judged_rows if r["pass"] != "yes"]
    fws = ", ".join(dict.fromkeys(r["framework"] for r in completed(records)))
    if s.ok:
        dts = " and ".join(dict.fromkeys(d for r in completed(records) for d in r["metrics"].get("dtypes", [])))
        return (f"yes: {fws} agree with each other and with NumPy in all {len(judged_rows)} judged checks "
                f"(terms, gradients, SGD and Adam steps, {dts})")
    return f"NO: {len(failing)} of {len(judged_rows)} judged checks fail" + (f": {'; '.join(failing)}" if failing else "") + (
        f"; {'; '.join(s.notes[:1])}" if not failing else "")


def compared(records: list[dict[str, Any]]) -> dict[str, Quantity]:
    """For `vaebench compare`: each judged check passes as before and its deviation stays under
    its tolerance (deviations are rounding-level, so their size is not compared across CPUs)."""
    out: dict[str, Quantity] = {}
    for row in summarize(records).rows:
        if row["pass"] == "reported":
            continue
        name = f"{row['quantity']} {row['dtype']}"
        out[f"{name} pass"] = Quantity(row["pass"], "same")
        dev = getattr(row["max rel. deviation"], "raw", None)
        tol = getattr(row["tolerance"], "raw", None)
        if dev is not None and tol is not None:
            out[f"{name} deviation"] = Quantity(dev, "limit", tol)
    return out

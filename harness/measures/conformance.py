"""Do the frameworks compute the same VAE? Same canonical weights, batch and noise in every
framework: loss parts, every parameter's gradient of each part, and loss trajectories over N
SGD and N Adam steps with harness-supplied batches and noise, compared across frameworks (and
the loss parts against the NumPy reference) against fixed tolerances.

Each framework's job saves its raw arrays next to its record (`<record>.npz`); the parent
compares them, so the comparison can be rerun from the files alone.
"""

from __future__ import annotations

import io
import itertools
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from harness import data as data_mod
from harness import reference
from harness.api import TERMS, ModelSpec
from harness.config import AppConfig, model_spec, optim_spec, to_app_config
from harness.init import init_params
from harness.measures.common import Summary, backend, by_framework, dataset, fmt
from harness.records import write_atomic
from harness.worker import Job, Result

#: (quantity, dtype) -> tolerance on the relative deviation
TOLERANCES: dict[tuple[str, str], float] = {
    ("terms", "float32"): 1e-5,
    ("terms", "float64"): 1e-10,
    ("grads", "float32"): 1e-4,
    ("grads", "float64"): 1e-9,
    ("sgd trajectory", "float32"): 1e-3,
    ("sgd trajectory", "float64"): 1e-8,
    ("adam trajectory", "float32"): 1e-3,
    ("adam trajectory", "float64"): 1e-5,  # Keras' Adam eps convention: see KERAS_ADAM_NOTE
}
KINK_NOTE = (
    "A float32 trajectory of a ReLU network can part abruptly: a ~1e-7 rounding difference (e.g. "
    "XLA's fused reductions against eager kernels) flips one unit at a kink and the loss jumps. "
    "If the trajectory agreed to ~1e-7 until the step where it parts while terms and gradients pass, "
    "that is the cause; rerun in float64, or with model.activation=tanh, to compare without kinks."
)
KERAS_ADAM_NOTE = (
    "Keras adds Adam's eps to the uncorrected sqrt(v) (torch and optax to the bias-corrected one): "
    "an effective eps of eps/sqrt(1-beta2^t). With eps=1e-8 this moves TensorFlow's float64 Adam "
    "trajectory by ~1e-6 relative, hence the 1e-5 tolerance there; torch and jax agree to ~1e-15."
)


def inputs(c: AppConfig) -> tuple[ModelSpec, dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """The shared inputs: spec, canonical weights, one batch, its noise, and the training data."""
    ds = dataset(c)
    spec = model_spec(c, ds.x_dim)
    cf = c.measure.conformance
    x = ds.x_train[: cf.batch_size]
    eps = data_mod.noise((len(x), spec.latent), c.seed, 0)
    return spec, init_params(spec, c.seed), x, eps, ds.x_train


def perturbed(params: dict[str, np.ndarray], scale: float, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, 99])
    return {k: v * (1.0 + scale * rng.standard_normal(v.shape)) + scale * 0.01 * rng.standard_normal(v.shape) for k, v in params.items()}


def trajectory_batches(c: AppConfig, x_train: np.ndarray, latent: int) -> list[tuple[np.ndarray, np.ndarray]]:
    cf = c.measure.conformance
    out: list[tuple[np.ndarray, np.ndarray]] = []
    for epoch in itertools.count():
        for xb in data_mod.batches(x_train, cf.batch_size, c.seed, epoch):
            out.append((xb, data_mod.noise((len(xb), latent), c.seed, 1000 + len(out))))
            if len(out) == cf.steps:
                return out
    raise AssertionError("unreachable")


def run(c: AppConfig, job: Job) -> Result:
    cf = c.measure.conformance
    spec, params, x, eps, x_train = inputs(c)
    if cf.perturb_framework == job.framework:
        params = perturbed(params, cf.perturb_scale, c.seed)
    steps = trajectory_batches(c, x_train, spec.latent)
    arrays: dict[str, np.ndarray] = {}
    env: dict[str, Any] = {}
    metrics: dict[str, Any] = {"dtypes": list(cf.dtypes), "steps": cf.steps, "batch_size": cf.batch_size}
    for dtype in cf.dtypes:
        b = backend(c, job.framework, spec=spec, dtype=dtype, params=params)
        t = b.terms(x, eps)
        for part in TERMS:
            arrays[f"{dtype}/terms/{part}"] = getattr(t, part)
            for name, g in b.grads(x, eps, part).items():
                arrays[f"{dtype}/grads/{part}/{name}"] = g
        for opt, lr in (("sgd", cf.sgd_lr), ("adam", cf.adam_lr)):
            o = replace(optim_spec(c), name=opt, lr=lr, momentum=0.0)  # type: ignore[arg-type]
            ob = backend(c, job.framework, spec=spec, dtype=dtype, params=params, optim=o)
            losses = [ob.train_step(ob.put(xb), e) for xb, e in steps]
            arrays[f"{dtype}/{opt} trajectory"] = np.array([float(v) for v in losses])
        metrics[dtype] = {"loss": float(t.loss.mean()), "compile_count": ob.compile_count()}
        env = b.version()
    path = Path(job.record_path).with_suffix(".npz")
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    write_atomic(path, buf.getvalue())
    metrics["arrays"] = path.name
    metrics["perturbed"] = cf.perturb_framework == job.framework
    return Result(metrics=metrics, backend_env=env)


# --- comparison (parent process, from records and their arrays) ---------------------------


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    """Largest elementwise |a - b| / max(|a|, |b|) (0 where both are 0)."""
    den = np.maximum(np.abs(a), np.abs(b))
    num = np.abs(a - b)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(den > 0, num / den, 0.0)
    return float(np.max(r)) if r.size else 0.0


def _rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / max(||a||, ||b||) (0 when both are 0)."""
    den = max(float(np.linalg.norm(a)), float(np.linalg.norm(b)))
    return float(np.linalg.norm(a - b)) / den if den > 0 else 0.0


def deviation(quantity: str, dtype: str, a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> tuple[float, str]:
    """Worst relative deviation of `quantity` between two frameworks' arrays, and where."""
    worst, where = 0.0, ""
    prefix = f"{dtype}/{quantity}"
    for key in sorted(k for k in a if k.startswith(prefix)):
        if key not in b:
            return float("inf"), f"{key} missing"
        dev = _rel_l2(a[key], b[key]) if quantity == "grads" else _rel(a[key], b[key])
        if dev > worst or not np.isfinite(dev):
            worst, where = dev, key[len(prefix) + 1 :] or quantity
            if quantity.endswith("trajectory"):
                where = _trajectory_where(a[key], b[key])
    return worst, where


def _trajectory_where(a: np.ndarray, b: np.ndarray) -> str:
    """The worst step and the step where the two trajectories first part by more than 1e-5:
    a jump there from ~1e-7 is a discrete event (a ReLU changing state), not drift."""
    per_step = np.abs(a - b) / np.maximum(np.maximum(np.abs(a), np.abs(b)), 1e-300)
    where = f"worst at step {int(np.argmax(per_step)) + 1}/{len(a)}"
    if np.any(per_step > 1e-5):
        first = int(np.argmax(per_step > 1e-5))
        before = float(per_step[first - 1]) if first else 0.0
        where += f"; parts at step {first + 1} (step before: {before:.0e})"
    return where


def compare(loaded: dict[str, dict[str, np.ndarray]], reference_terms: dict[str, dict[str, np.ndarray]] | None, dtypes: list[str]) -> list[dict[str, Any]]:
    """Rows: per (quantity, dtype), the worst deviation over framework pairs against tolerance."""
    rows = []
    names = list(loaded)
    for dtype in dtypes:
        for quantity in ("terms", "grads", "sgd trajectory", "adam trajectory"):
            tol = TOLERANCES[(quantity, dtype)]
            if len(names) >= 2:  # with one framework there is no pair: no row that cannot fail
                worst, pair, where = 0.0, "-", ""
                for fa, fb in itertools.combinations(names, 2):
                    dev, w = deviation(quantity, dtype, loaded[fa], loaded[fb])
                    if dev >= worst:
                        worst, pair, where = dev, f"{fa} vs {fb}", w
                rows.append(_row(quantity, dtype, pair, where, worst, tol))
            if quantity == "terms" and reference_terms is not None:
                worst, pair, where = 0.0, "-", ""
                for fa in names:
                    dev, w = deviation("terms", dtype, loaded[fa], reference_terms[dtype])
                    if dev >= worst:
                        worst, pair, where = dev, f"{fa} vs numpy", w
                rows.append(_row("terms (vs NumPy)", dtype, pair, where, worst, tol))
    return rows


def _row(quantity: str, dtype: str, pair: str, where: str, dev: float, tol: float) -> dict[str, Any]:
    return {
        "quantity": quantity,
        "dtype": dtype,
        "worst pair": pair,
        "where": where,
        "max rel. deviation": fmt(dev, ".2e"),
        "tolerance": fmt(tol, ".0e"),
        "pass": "yes" if dev <= tol else "NO",
    }


def numpy_terms(c: AppConfig) -> dict[str, dict[str, np.ndarray]]:
    spec, params, x, eps, _ = inputs(c)
    t = reference.terms(params, x, eps, spec)
    arrs = {f"terms/{p}": getattr(t, p) for p in TERMS}
    return {dt: {f"{dt}/{k}": v.astype(dt) for k, v in arrs.items()} for dt in c.measure.conformance.dtypes}


def summarize(records: list[dict[str, Any]]) -> Summary:
    ok_recs = [r for r in by_framework(records) if r["status"] == "ok"]
    notes = [f"{r['framework']}: {r['status']}: {r['error']}" for r in records if r["status"] != "ok"]
    loaded: dict[str, dict[str, np.ndarray]] = {}
    for r in ok_recs:
        path = Path(r.get("_file", "")).parent / r["metrics"]["arrays"]
        if not path.exists():
            notes.append(f"{r['framework']}: arrays file {path} is missing")
            continue
        with np.load(path) as f:
            loaded[f"{r['framework']}/{r['mode']}"] = {k: f[k] for k in f.files}
        if r["metrics"].get("perturbed"):
            notes.append(f"{r['framework']} was fed perturbed weights (measure.conformance.perturb_framework): it must fail")
    if not ok_recs:
        return Summary("Conformance across frameworks", [], False, notes or ["no records"])
    c = to_app_config(_config(ok_recs[0]))
    rows = compare(loaded, numpy_terms(c), list(c.measure.conformance.dtypes))
    if any(k.startswith("tensorflow") for k in loaded) and "float64" in c.measure.conformance.dtypes:
        notes.append(KERAS_ADAM_NOTE)
    if any(r["pass"] == "NO" and r["quantity"].endswith("trajectory") and r["dtype"] == "float32" for r in rows):
        notes.append(KINK_NOTE)
    if len(loaded) < 2:
        notes.append("fewer than two frameworks ran: only the NumPy comparison is meaningful")
    ok = bool(rows) and all(r["pass"] == "yes" for r in rows) and not [r for r in records if r["status"] != "ok"]
    return Summary("Conformance across frameworks (same weights, batch and noise)", rows, ok, notes)


def _config(record: dict[str, Any]) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.create(record["config"])

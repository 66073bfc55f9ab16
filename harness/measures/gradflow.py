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
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from harness import data as data_mod
from harness import reference
from harness.api import BLOCKS, TERMS, ModelSpec
from harness.config import AppConfig, model_spec
from harness.init import block_of, init_params
from harness.measures.common import Summary, backend, by_framework, dataset, fmt, progress
from harness.worker import Job, Result

#: theory: does each part reach each block?
THEORY: dict[tuple[str, str], bool] = {
    ("recon", "encoder"): True,
    ("recon", "decoder"): True,
    ("kl", "encoder"): True,
    ("kl", "decoder"): False,
}
MONITOR_BATCH = 64


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
    gets a non-zero gradient; "zero" means the block's gradient is exactly zero."""
    checks = []
    for (part, block), expected in THEORY.items():
        s = matrix[part][block]
        reaches = s["nonzero_fraction"] == 1.0
        zero = s["norm"] == 0.0
        ok = reaches if expected else zero
        checks.append({"part": part, "block": block, "expected": "non-zero" if expected else "zero",
                       "measured": "non-zero" if reaches else ("zero" if zero else "partial"), "ok": ok})
    return {
        "checks": checks,
        "matches_theory": all(c["ok"] for c in checks),
        "elbo_trains_decoder": matrix["loss"]["decoder"]["nonzero_fraction"] == 1.0,
        "elbo_trains_encoder": matrix["loss"]["encoder"]["nonzero_fraction"] == 1.0,
    }


def smooth_step(params: dict[str, np.ndarray], d: dict[str, np.ndarray], x: np.ndarray, eps: np.ndarray,
                spec: ModelSpec, h: float) -> float:
    """Largest step <= h (by quarters) for which no ReLU changes state between params - h d and
    params + h d: central differences are only valid on one smooth piece of the function."""
    def at(t: float) -> np.ndarray:
        return reference.activation_pattern({k: v + t * d[k] if k in d else v for k, v in params.items()}, x, eps, spec)

    if spec.activation != "relu" or not spec.hidden:
        return h
    base = at(0.0)
    while h > 1e-9 and not (np.array_equal(at(h), base) and np.array_equal(at(-h), base)):
        h /= 4.0
    return h


def finite_difference_check(b: Any, params: dict[str, np.ndarray], x: np.ndarray, eps: np.ndarray,
                            n_dirs: int, h: float, seed: int) -> list[dict[str, Any]]:
    """Directional derivative of each part along random directions within each block: the
    backend's analytic gradient against central differences of the backend's own loss."""
    rows = []
    rng = np.random.default_rng([seed, 21])
    grads = {part: b.grads(x, eps, part) for part in TERMS}
    for block in BLOCKS:
        names = [k for k in params if block_of(k) == block]
        for i in range(n_dirs):
            d = {k: rng.standard_normal(params[k].shape) for k in names}
            step = smooth_step(params, d, x, eps, b.spec, h)
            values = {}
            for sign in (1.0, -1.0):
                b.set_params({k: v + sign * step * d[k] if k in d else v for k, v in params.items()})
                values[sign] = b.terms(x, eps).means()
            for part in TERMS:
                analytic = sum(float(np.sum(grads[part][k] * d[k])) for k in names)
                numeric = (values[1.0][part] - values[-1.0][part]) / (2 * step)
                scale = max(abs(analytic), abs(numeric))
                err = abs(analytic - numeric) / scale if scale > 1e-12 else abs(analytic - numeric)
                rows.append({"block": block, "direction": i, "part": part, "step": step, "analytic": analytic,
                             "numeric": numeric, "rel_err": err})
    b.set_params(params)
    return rows


def run(c: AppConfig, job: Job) -> Result:
    g = c.measure.gradflow
    ds = dataset(c)
    spec = model_spec(c, ds.x_dim)
    params = init_params(spec, c.seed)
    x = ds.x_train[:MONITOR_BATCH]
    eps = data_mod.noise((len(x), spec.latent), c.seed, 0)

    # the matrix and the finite-difference check, in float64
    b64 = backend(c, job.framework, spec=spec, dtype="float64", params=params)
    matrix: dict[str, dict[str, dict[str, float]]] = {part: block_stats(b64.grads(x, eps, part)) for part in TERMS}
    fd = finite_difference_check(b64, params, x, eps, g.fd_directions, g.fd_step, c.seed)
    fd_max = max(r["rel_err"] for r in fd)

    # over training, in the configured precision and mode
    b = backend(c, job.framework, spec=spec, params=params)
    history = []
    batches: Iterator[np.ndarray] = iter(())
    epoch = 0
    status, error = "ok", None
    for step in progress(range(g.train_steps + 1), c, desc=f"gradflow {job.framework}", unit="step"):
        if step % g.log_every == 0:
            stats = {part: block_stats(b.grads(x, eps, part)) for part in TERMS}
            history.append({"step": step, **{f"{part}/{blk}": stats[part][blk]["norm"] for part in TERMS for blk in BLOCKS}})
        if step == g.train_steps:
            break
        xb = next(batches, None)
        if xb is None:
            batches = data_mod.batches(ds.x_train, c.data.batch_size, c.seed, epoch)
            epoch += 1
            xb = next(batches)
        loss = float(b.train_step(b.put(xb)))
        if not math.isfinite(loss):
            status, error = "diverged", f"training loss became {loss} at step {step}"
            break
        history[-1].setdefault("loss", loss)

    v = verdict(matrix)
    v["fd_max_rel_err"] = fd_max
    v["fd_ok"] = fd_max <= g.fd_tol
    controls = {"stop_gradient_z": spec.stop_gradient_z, "freeze": spec.freeze}
    metrics = {"matrix": matrix, "verdict": v, "finite_differences": fd, "fd_tol": g.fd_tol,
               "history": history, "controls": controls, "batch_size": len(x)}
    return Result(metrics=metrics, status=status, error=error, backend_env=b.version())


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def summarize(records: list[dict[str, Any]]) -> Summary:
    rows, notes, ok = [], [], True
    for r in by_framework(records):
        if r["status"] != "ok":
            ok = False
            notes.append(f"{r['framework']}: {r['status']}: {r['error']}")
            continue
        m = r["metrics"]
        v = m["verdict"]
        for part in TERMS:
            row: dict[str, Any] = {"framework": r["framework"], "part": part}
            for blk in BLOCKS:
                s = m["matrix"][part][blk]
                row[f"{blk} ‖grad‖"] = fmt(s["norm"], ".3e")
                row[f"{blk} tensors≠0"] = f"{s['nonzero_fraction']:.0%}"
                row[f"{blk} max abs"] = fmt(s["max_abs"], ".2e")
            expect = {c["block"]: c for c in v["checks"] if c["part"] == part}
            row["theory"] = " ".join(f"{blk}:{expect[blk]['expected']}" for blk in BLOCKS if blk in expect) or "-"
            row["matches"] = ("yes" if all(c["ok"] for c in expect.values()) else "NO") if expect else "-"
            rows.append(row)
        passed = v["matches_theory"] and v["fd_ok"]
        ok = ok and passed
        ctrl = m["controls"]
        label = "" if not (ctrl["stop_gradient_z"] or ctrl["freeze"] != "none") else f" [control: stop_gradient_z={ctrl['stop_gradient_z']}, freeze={ctrl['freeze']}]"
        notes.append(
            f"{r['framework']}{label}: the ELBO trains the decoder: {_yes(v['elbo_trains_decoder'])}; "
            f"the ELBO trains the encoder: {_yes(v['elbo_trains_encoder'])}"
            f" (reconstruction reaches it: {_yes(m['matrix']['recon']['encoder']['nonzero_fraction'] == 1.0)}); "
            f"pattern matches theory: {_yes(v['matches_theory'])}; "
            f"finite differences (float64): max rel. error {v['fd_max_rel_err']:.1e} (tol {m['fd_tol']:.0e}) "
            f"-> {'PASS' if passed else 'FAIL'}"
        )
    return Summary("Gradient flow: which loss part reaches which block (float64, one batch)", rows, ok and bool(rows), notes)

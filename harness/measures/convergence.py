"""How well and how fast does the VAE learn? Per-epoch train/test ELBO and wall time, time to
a target test ELBO, and the final test log-likelihood by importance sampling (IWAE-k)."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from harness import data as data_mod
from harness.config import AppConfig
from harness.measures.common import Summary, backend, by_framework, dataset, fmt, progress
from harness.worker import Job, Result

EVAL_NOISE_SEED = 1234


def test_elbo(b: Any, x: np.ndarray, latent: int, seed: int, chunk: int = 1000) -> float:
    """Mean test ELBO with harness-supplied noise (one sample per example)."""
    total = 0.0
    for i in range(0, len(x), chunk):
        xb = x[i : i + chunk]
        total += float(np.sum(-b.terms(xb, data_mod.noise((len(xb), latent), seed, i)).loss))
    return total / len(x)


def run(c: AppConfig, job: Job) -> Result:
    ds = dataset(c)
    b = backend(c, job.framework, x_dim=ds.x_dim)
    cc, latent = c.measure.convergence, c.model.latent
    x_test = ds.x_test
    epochs: list[dict[str, Any]] = []
    wall = 0.0
    first_step_s = None
    time_to_target = None
    status, error = "ok", None
    bar = progress(range(cc.epochs), c, desc=f"convergence {job.framework}/{job.mode}", unit="epoch")
    for epoch in bar:
        losses = []
        b.sync()
        t0 = time.perf_counter()
        for i, xb in enumerate(data_mod.batches(ds.x_train, c.data.batch_size, c.seed, epoch)):
            loss = b.train_step(b.put(xb))
            if first_step_s is None and i == 0:
                b.sync()
                first_step_s = time.perf_counter() - t0  # includes tracing/compilation
            losses.append(loss)
        b.sync()
        wall += time.perf_counter() - t0
        train_elbo = -float(np.mean([float(v) for v in losses]))
        if not math.isfinite(train_elbo):
            status, error = "diverged", f"training loss became {train_elbo} in epoch {epoch + 1}"
            break
        te = test_elbo(b, x_test, latent, EVAL_NOISE_SEED)
        epochs.append({"epoch": epoch + 1, "train_elbo": train_elbo, "test_elbo": te, "wall_s": wall})
        if time_to_target is None and te >= cc.target_elbo:
            time_to_target = wall
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(train=f"{train_elbo:.2f}", test=f"{te:.2f}")
    metrics: dict[str, Any] = {
        "epochs": epochs,
        "batch_size": c.data.batch_size,
        "n_train": len(ds.x_train),
        "n_test": len(x_test),
        "first_step_s": first_step_s,
        "train_wall_s": wall,
        "target_elbo": cc.target_elbo,
        "time_to_target_s": time_to_target,
        "compile_count": b.compile_count(),
    }
    if status == "ok":
        ll = b.log_likelihood(x_test, cc.iwae_k, seed=EVAL_NOISE_SEED)
        metrics["test_log_likelihood"] = float(np.mean(ll))
        metrics["test_log_likelihood_se"] = float(np.std(ll) / math.sqrt(len(ll)))
        metrics["iwae_k"] = cc.iwae_k
        if not math.isfinite(metrics["test_log_likelihood"]):
            status, error = "diverged", "test log-likelihood is not finite"
    return Result(metrics=metrics, status=status, error=error, backend_env=b.version())


def summarize(records: list[dict[str, Any]]) -> Summary:
    rows = []
    for r in by_framework(records):
        m = r["metrics"]
        last = m.get("epochs", [{}])[-1] if m.get("epochs") else {}
        rows.append(
            {
                "framework": r["framework"],
                "mode": r["mode"],
                "status": r["status"],
                "epochs": last.get("epoch"),
                "train ELBO": fmt(last.get("train_elbo"), ".3f"),
                "test ELBO": fmt(last.get("test_elbo"), ".3f"),
                f"test log p(x) (IWAE-{m.get('iwae_k', '?')})": fmt(m.get("test_log_likelihood"), ".3f"),
                f"time to ELBO {fmt(m.get('target_elbo'))} (s)": fmt(m.get("time_to_target_s"), ".2f"),
                "train time (s)": fmt(m.get("train_wall_s"), ".2f"),
                "first step (s)": fmt(m.get("first_step_s"), ".3f"),
            }
        )
    ok = all(r["status"] == "ok" for r in records)
    return Summary("Convergence (ELBO in nats per example; higher is better)", rows, ok)

"""Step time of one full training step (forward, ELBO, backward, optimizer update) per
framework x mode, on the digits MLP with batch 64. `make bench` times them; `make test` runs
each once (benchmarks disabled) so the suite cannot rot.

Timing rules: compile/trace once outside the timed rounds (warm-up), data already on the
device, the timed function ends with a device sync, shapes fixed (the compile count must not
move while timing)."""

from __future__ import annotations

import numpy as np
import pytest

from harness import ModelSpec, OptimSpec, data, load_backend

X = data.load("digits").x_train[:64]
CASES = [
    ("torch", "eager"),
    ("torch", "compiled"),
    ("tensorflow", "eager"),
    ("tensorflow", "function"),
    ("tensorflow", "xla"),
    ("jax", "eager"),
    ("jax", "jit"),
]


@pytest.mark.parametrize("framework,mode", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_train_step(benchmark, framework: str, mode: str) -> None:  # type: ignore[no-untyped-def]
    b = load_backend(framework, ModelSpec(x_dim=64), OptimSpec(lr=1e-3), mode=mode, seed=0)
    x = b.put(X)
    for _ in range(3):  # warm-up: tracing / compilation happens here, not in the timed rounds
        b.train_step(x)
    b.sync()
    compiles = b.compile_count()

    def step() -> None:
        b.train_step(x)
        b.sync()

    benchmark.extra_info.update(framework=framework, mode=mode, batch_size=64)
    benchmark.pedantic(step, rounds=30, iterations=5, warmup_rounds=2)
    assert b.compile_count() == compiles, "retraced while timing"
    assert np.isfinite(float(b.train_step(x)))

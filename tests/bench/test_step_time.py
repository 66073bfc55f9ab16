"""Step time of one full training step (forward, ELBO, backward, optimizer update) per
framework x mode, on the digits MLP with batch 64. `make bench` times them; `make test` runs
each once (benchmarks disabled) so the suite cannot rot.

The timed function is the throughput measure's own timed unit: `harness.timing.block` of the
measure's harness step closure (`throughput.harness_contender`: train_step on the staged batch,
then the backend's sync), N steps then one sync. So a pytest-benchmark round is N steps:
divide its statistics by N (`extra_info["steps_per_round"]`; `step_s_median` is filled in
when benchmarks are enabled). Timing rules as in the measure: compile/trace in the warm-up
outside the timed rounds, data already on the device, shapes fixed and the compile count
unchanged while timing."""

from __future__ import annotations

import numpy as np
import pytest

from harness import MlpSpec, OptimSpec, data, load_backend, timing
from harness.measures import throughput
from tests.conftest import framework_modes

X = data.load("digits").flat().x_train[:64]
#: every mode of every registered framework
CASES = framework_modes()
ROUNDS, STEPS, WARMUP = 30, 5, 3  # R repeats of N steps, as the measure's repeats/steps/warmup


@pytest.mark.parametrize("framework,mode", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_train_step(benchmark, framework: str, mode: str) -> None:  # type: ignore[no-untyped-def]
    b = load_backend(framework, MlpSpec(x_dim=64), OptimSpec(lr=1e-3), mode=mode, seed=0)
    c = throughput.harness_contender(b, b.put(X))
    timing.warm_up(c.step, c.sync, WARMUP)  # tracing / compilation happens here, not in the timed rounds
    compiles = b.compile_count()

    benchmark.extra_info.update(framework=framework, mode=mode, batch_size=len(X), steps_per_round=STEPS)
    benchmark.pedantic(timing.block(c.step, c.sync, STEPS), rounds=ROUNDS, iterations=1, warmup_rounds=2)
    if benchmark.stats is not None:  # enabled: record the per-step median beside pytest-benchmark's per-round one
        benchmark.extra_info["step_s_median"] = benchmark.stats.stats.median / STEPS
    assert b.compile_count() == compiles, "retraced while timing"
    assert np.isfinite(float(c.step()))

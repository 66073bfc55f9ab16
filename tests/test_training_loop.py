"""The one training loop the measures share (`harness.measures.common.TrainingLoop`, `train` and
its `batch_stream`): the batches are `data.batches`' (per seed and epoch, in order), epochs or
steps are counted exactly, the hook sees the steps it should with the clock stopped, and a NaN
or inf loss makes the job `diverged`, never a silently broken model; convergence and gradflow
train on it and record a NaN run as diverged, named as they always have."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harness import data, worker
from harness.job import Diverged, Job, Result
from harness.measures.common import CHECK_EVERY, TrainingDiverged, TrainingLoop, batch_stream, train
from harness.metrics import load, plain
from tests.conftest import make_config


class Recorder:
    """A stand-in backend: records each batch it is stepped on (and the noise it is given);
    the loss is `losses[i]`."""

    def __init__(self, losses: list[float] | None = None) -> None:
        self.seen: list[np.ndarray] = []
        self.eps: list[np.ndarray | None] = []
        self.losses = losses or []

    def put(self, x: np.ndarray) -> np.ndarray:
        return x

    def train_step(self, x: np.ndarray, eps: np.ndarray | None = None) -> float:
        self.seen.append(x)
        self.eps.append(eps)
        i = len(self.seen) - 1
        return self.losses[i] if i < len(self.losses) else 1.0

    def sync(self) -> None:
        pass


X = np.arange(50, dtype=np.float64).reshape(25, 2)
C = make_config(seed=7)


def _expected(epochs: int, bs: int = 4) -> list[np.ndarray]:
    return [xb for e in range(epochs) for xb in data.batches(X, bs, 7, e)]


def test_epochs_are_data_batches_in_order() -> None:
    b = Recorder()
    steps = train(b, X, 4, C, epochs=3)  # type: ignore[arg-type]
    want = _expected(3)
    assert steps == len(want) == len(b.seen) and all(np.array_equal(a, w) for a, w in zip(b.seen, want, strict=True))


@pytest.mark.parametrize("steps", [0, 1, 6, 13])
def test_steps_cross_epochs_like_the_stream(steps: int) -> None:
    b = Recorder()
    assert train(b, X, 4, C, steps=steps) == steps  # type: ignore[arg-type]
    want = _expected(3)[:steps]  # 6 batches an epoch: 13 steps reach the third epoch
    assert all(np.array_equal(a, w) for a, w in zip(b.seen, want, strict=True)) and len(b.seen) == steps
    stream = batch_stream(X, 4, 7)
    assert all(np.array_equal(next(stream), w) for w in want)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_nonfinite_loss_raises_diverged_naming_the_step(bad: float) -> None:
    b = Recorder([1.0, 0.5, bad, 0.1])
    with pytest.raises(Diverged, match=f"loss became {bad} at step 3"):
        train(b, X, 4, C, epochs=2, desc="toy")  # type: ignore[arg-type]
    assert len(b.seen) == 12  # 2 epochs of 6: read back at the end, the step still named
    long = Recorder([1.0, 0.5, bad])
    with pytest.raises(Diverged, match=f"loss became {bad} at step 3"):
        train(long, X, 4, C, steps=500)  # type: ignore[arg-type]
    assert len(long.seen) == CHECK_EVERY  # losses are read every CHECK_EVERY steps: it stops at the first read


def test_one_of_epochs_or_steps() -> None:
    with pytest.raises(ValueError, match="epochs or steps"):
        train(Recorder(), X, 4, C)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="epochs or steps"):
        train(Recorder(), X, 4, C, epochs=1, steps=1)  # type: ignore[arg-type]


class _DivergingMeasure:
    """A measure whose training diverges after saving one epoch."""

    def run(self, c: Any, job: Job) -> Result:
        from harness.job import checkpoint

        checkpoint(job, {"epochs": [{"epoch": 1}]})
        train(Recorder([float("nan")]), X, 4, c, steps=3, desc="snr torch: training")  # type: ignore[arg-type]
        raise AssertionError("not reached")

    def __getattr__(self, name: str) -> object:
        from harness.measures import snr

        return getattr(snr, name)


def test_the_worker_records_a_diverged_job_with_what_it_saved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from omegaconf import OmegaConf

    from harness.measures import MEASURES

    monkeypatch.setitem(MEASURES, "snr", _DivergingMeasure())
    resolved = OmegaConf.to_container(OmegaConf.structured(make_config(measure={"names": ["snr"]})))
    rec = worker.run_in_process(Job("t", "snr", "torch", "eager", resolved, str(tmp_path / "snr-torch.json")))  # type: ignore[arg-type]
    assert rec["status"] == "diverged" and rec["error"] == "snr torch: training: the training loss became nan at step 1"
    assert rec["metrics"] == {"epochs": [{"epoch": 1}], "partial": True}


# --- the hook: what convergence and gradflow measure with ------------------------------------


def test_the_hook_sees_step_0_every_nth_step_and_epoch_ends_with_the_losses_read() -> None:
    b = Recorder([float(i) for i in range(1, 19)])
    calls: list[tuple[int, bool, int]] = []
    loop = TrainingLoop(b, X, 4, C, hook=lambda lp, end: calls.append((lp.steps, end, len(lp.losses))), every=4,  # type: ignore[arg-type]
                        noise=lambda i: np.full(2, float(i)))
    assert loop.run(epochs=3) == 18  # 6 batches an epoch
    # step 0, every 4th step and each epoch's end (6, 12, 18), once per step: 12 is both
    assert [(s, end) for s, end, _ in calls] == [(0, False), (4, False), (6, True), (8, False), (12, True), (16, False), (18, True)]
    assert all(read == s for s, _, read in calls)  # every loss is read before the hook
    assert loop.losses == [float(i) for i in range(1, 19)]
    assert all(np.array_equal(a, w) for a, w in zip(b.seen, _expected(3), strict=True))
    assert [None if e is None else e[0] for e in b.eps] == list(range(18))  # noise(i) for step i, 0-based, given as train_step's eps

    stream = Recorder()
    seen: list[tuple[int, bool]] = []
    TrainingLoop(stream, X, 4, C, hook=lambda lp, end: seen.append((lp.steps, end)), every=5).run(steps=13)  # type: ignore[arg-type]
    assert seen == [(0, False), (5, False), (10, False)]  # a stream of steps has no epoch ends
    assert stream.eps == [None] * 13  # no noise given: train_step(x)


def test_a_hook_returning_false_stops_training() -> None:
    b = Recorder()
    loop = TrainingLoop(b, X, 4, C, hook=lambda lp, end: lp.steps < 8, every=4)  # type: ignore[arg-type]
    assert loop.run(epochs=3) == 8 and len(b.seen) == 8
    at_start = Recorder()
    assert TrainingLoop(at_start, X, 4, C, hook=lambda lp, end: False, every=4).run(steps=10) == 0  # type: ignore[arg-type]
    assert at_start.seen == []


def test_the_clock_stops_for_the_hook() -> None:
    pause = 0.05
    loop = TrainingLoop(Recorder(), X, 4, C, hook=lambda lp, end: time.sleep(pause), every=2)  # type: ignore[arg-type]
    loop.run(epochs=2)  # 7 hooks: 0.35 s outside the clock
    assert loop.first_step_s is not None and 0 <= loop.first_step_s <= loop.wall_s < 2 * pause


@pytest.mark.parametrize("check_every,seen", [(CHECK_EVERY, 4), (1, 3)])
def test_a_nan_loss_stops_the_loop_naming_its_step(check_every: int, seen: int) -> None:
    """Read at the next hook (step 4), or at once: the step named is the NaN's, the hook is not
    called after it, and `losses` ends with it."""
    b = Recorder([1.0, 0.5, float("nan"), 0.1])
    calls: list[int] = []
    loop = TrainingLoop(b, X, 4, C, desc="toy", hook=lambda lp, end: calls.append(lp.steps), every=4,  # type: ignore[arg-type]
                        check_every=check_every)
    with pytest.raises(TrainingDiverged, match="toy: the training loss became nan at step 3") as got:
        loop.run(epochs=2)
    assert isinstance(got.value, Diverged) and got.value.step == 3 and math.isnan(got.value.loss)
    assert calls == [0] and len(b.seen) == seen and loop.losses[:2] == [1.0, 0.5] and math.isnan(loop.losses[-1])


# --- convergence and gradflow on the loop ------------------------------------------------------


class NanAfter:
    """A real backend whose training loss reads NaN from step `at` (1-based) on."""

    def __init__(self, b: Any, at: int | None) -> None:
        self.b, self.at, self.steps = b, at, 0

    def train_step(self, x: Any, eps: Any = None) -> Any:
        self.steps += 1
        loss = self.b.train_step(x, eps)
        return float("nan") if self.at is not None and self.steps >= self.at else loss

    def __getattr__(self, name: str) -> Any:
        return getattr(self.b, name)


TINY = {"source": "synthetic", "n_train": 128, "n_test": 32, "batch_size": 32}  # 4 steps an epoch


@pytest.mark.parametrize("bad_seed", [0, 1])
def test_convergence_marks_a_nan_run_diverged_and_stops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad_seed: int) -> None:
    """A NaN training loss at step 5 (read at the evaluation at step 6): the seed is `diverged`
    with the step named, keeps what it measured up to there, and no later seed runs; the means
    are over the seeds that completed (none: no means)."""
    from harness.measures import convergence as cv

    real = cv.backend
    monkeypatch.setattr(cv, "backend", lambda c, fw, **kw: NanAfter(real(c, fw, **kw), 5 if c.seed == bad_seed else None))
    c = make_config(model={"hidden": [16], "likelihood": "gaussian"}, data=TINY, measure={"names": ["convergence"], "convergence": {
        "epochs": 3, "seeds": [0, 1, 2], "eval_every": 3, "iwae_k": 5, "elbo_samples": 2}})
    res = cv.run(c, Job("r", "convergence", "torch", "eager", {}, str(tmp_path / "r.json")))
    assert res.status == "diverged" and res.error == f"training loss nan (NaN or inf) at step 5, seed {bad_seed}"
    m = res.metrics
    assert [r["seed"] for r in m["runs"]] == list(range(bad_seed + 1))  # no later seed
    bad = m["runs"][-1]
    assert bad["status"] == "diverged" and bad["error"] == res.error and "final" not in bad
    assert len(bad["step_loss"]) == 5 and math.isnan(bad["step_loss"][-1]) and all(map(math.isfinite, bad["step_loss"][:-1]))
    assert [e["step"] for e in bad["evals"]] == [0, 3] and [e["step"] for e in bad["epochs"]] == [4] and bad["steps"] == 6
    if bad_seed == 0:  # nothing completed: the settings and the runs, no means
        assert list(m)[-3:] == ["posterior_gap_tol", "runs", "compile_count"]
    else:
        assert m["runs"][0]["status"] == "ok" and [e["epoch"] for e in m["epochs"]] == [1, 2, 3]
        assert load(cv.METRICS, m) is not None


def test_convergence_metrics_round_trip_with_a_target_the_optimum_and_the_control(tmp_path: Path) -> None:
    """The record's variants the sample records lack load strictly into ConvergenceMetrics and
    `plain` gives them back: an explicit target not reached (null time and step to it), the
    linear model's optimum, the lockstep's one-ulp control."""
    from harness.measures import convergence as cv

    c = make_config(model={"kind": "linear", "latent": 2, "likelihood": "gaussian", "obs_sigma": 0.5}, data=TINY,
                    measure={"names": ["convergence"], "convergence": {
                        "epochs": 2, "seeds": [0, 1], "iwae_k": 5, "elbo_samples": 2, "shared_noise": True,
                        "lockstep_steps": 5, "target_elbo": 1e9}})
    res = cv.run(c, Job("r", "convergence", "torch", "eager", {}, str(tmp_path / "r.json")))
    m = res.metrics
    assert res.status == "ok" and "optimum" in m and m["ulp_control"]["seed"] == 0 and len(m["ulp_control"]["step_loss"]) == 5
    assert all(r["time_to_target_s"] is None and r["step_to_target"] is None for r in m["runs"])  # kept as null
    typed = load(cv.METRICS, m)
    assert all(isinstance(r, cv.TargetedSeedRun) for r in typed.runs)
    assert plain(typed) == m and list(plain(typed)) == list(m)


def test_gradflow_marks_a_nan_run_diverged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Norms at steps 0, 2, 4 (the NaN is step 5, 1-based: named 4, the steps before it, as
    gradflow always has); each row carries the loss of the step after it, finite ones only."""
    from harness.measures import gradflow as gf

    real = gf.backend
    monkeypatch.setattr(gf, "backend", lambda c, fw, **kw: NanAfter(real(c, fw, **kw), None if kw.get("dtype") else 5))
    c = make_config(model={"hidden": [16]}, measure={"names": ["gradflow"], "gradflow": {
        "train_steps": 10, "log_every": 2, "fd_directions": 1}})
    res = gf.run(c, Job("r", "gradflow", "torch", "eager", {}, str(tmp_path / "r.json")))
    assert res.status == "diverged" and res.error == "training loss became nan at step 4"
    h = res.metrics["history"]
    assert [e["step"] for e in h] == [0, 2, 4] and ["loss" in e for e in h] == [True, True, False]
    assert list(h[0])[-1] == "loss" and load(gf.METRICS, res.metrics) is not None

"""The one training loop the measures share (`harness.measures.common.train` and its
`batch_stream`): the batches are `data.batches`' (per seed and epoch, in order), epochs or steps
are counted exactly, and a NaN or inf loss makes the job `diverged`, never a silently broken
model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harness import data, worker
from harness.job import Diverged, Job, Result
from harness.measures.common import CHECK_EVERY, batch_stream, train
from tests.conftest import make_config


class Recorder:
    """A stand-in backend: records each batch it is stepped on; the loss is `losses[i]`."""

    def __init__(self, losses: list[float] | None = None) -> None:
        self.seen: list[np.ndarray] = []
        self.losses = losses or []

    def put(self, x: np.ndarray) -> np.ndarray:
        return x

    def train_step(self, x: np.ndarray) -> float:
        self.seen.append(x)
        i = len(self.seen) - 1
        return self.losses[i] if i < len(self.losses) else 1.0


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

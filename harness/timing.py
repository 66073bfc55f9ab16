"""The one timing core (DESIGN.md section 7), framework-neutral: it imports no framework.

Every step time vaebench reports comes from `time_steps` / `time_interleaved`: warm up, then R
repeats of N steps, each repeat timed as

    sync(); t0 = perf_counter(); for N: step(); sync(); t1 = perf_counter()

giving one sample (t1 - t0) / N per repeat; the median and IQR are reported and the samples kept.
An outer wall clock spans the whole block (the leading syncs, the loop, the bookkeeping), so
`clock_ratio = sum of timed repeats / outer wall` shows whether time escaped the timed region.
`compile_count`, when given, is read after the warm-up and after the timing: a change (a
retrace or recompilation while timing) raises `RecompiledWhileTiming`.

`block(step, sync, n)` is the timed unit itself (N steps then a sync), so a benchmark that
times it (tests/bench) times exactly what the throughput measure times.

CPU peak memory (`CpuPeakMemory`) is here too, since it needs no framework.
"""

from __future__ import annotations

import math
import resource
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

Step = Callable[[], Any]
Sync = Callable[[], None]


class RecompiledWhileTiming(RuntimeError):
    """The step was traced or compiled again while being timed: the samples are invalid."""


# -- statistics --------------------------------------------------------------------------


def cotangent(shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """The output gradient a per-layer backward is timed with: standard normal, fixed (seed 0),
    the same in every framework. Never all ones: with tf.ones_like(y) TensorFlow's XLA reduced the
    backward of a transposed convolution to next to nothing (measured: 0 ms beside a 50 ms
    forward), which timed a simplification, not the layer's backward."""
    return np.random.default_rng(0).standard_normal(shape).astype(dtype)


def median(xs: Sequence[float]) -> float:
    if not xs:
        raise ValueError("median of no samples")
    return float(statistics.median(xs))


def quantile(xs: Sequence[float], q: float) -> float:
    """The q-quantile with linear interpolation between order statistics (NumPy's default,
    'linear'/type 7): position q * (n - 1) in the sorted samples."""
    if not xs:
        raise ValueError("quantile of no samples")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return float(s[lo] + (s[hi] - s[lo]) * (pos - lo))


def iqr(xs: Sequence[float]) -> float:
    """Interquartile range q(0.75) - q(0.25) (linear interpolation; 0 for one sample)."""
    return quantile(xs, 0.75) - quantile(xs, 0.25)


# -- timing ------------------------------------------------------------------------------


@dataclass
class TimingResult:
    """Step times of one contender. `samples_s[i]` is repeat i's time per step (seconds)."""

    samples_s: list[float]
    median: float
    iqr: float
    outer_wall_s: float  # outer clock over this contender's share of the timed block
    steps: int  # N, steps per repeat
    warmup: int

    @property
    def repeats(self) -> int:
        return len(self.samples_s)

    @property
    def timed_s(self) -> float:
        """Sum of the timed repeats (each sample times N steps)."""
        return sum(self.samples_s) * self.steps

    @property
    def clock_ratio(self) -> float:
        """Timed repeats / outer wall time: 1 when no time escapes the timed region."""
        return self.timed_s / self.outer_wall_s if self.outer_wall_s > 0 else float("nan")

    def as_metrics(self, prefix: str = "") -> dict[str, Any]:
        return {
            f"{prefix}step_s_median": self.median,
            f"{prefix}step_s_iqr": self.iqr,
            f"{prefix}step_s_samples": list(self.samples_s),
            f"{prefix}outer_wall_s": self.outer_wall_s,
            f"{prefix}clock_ratio": self.clock_ratio,
        }


@dataclass
class Contender:
    """One thing to time: a step closure, its sync, and optionally its compile counter."""

    step: Step
    sync: Sync
    compile_count: Callable[[], int] | None = None


def block(step: Step, sync: Sync, steps: int) -> Callable[[], None]:
    """The timed unit: `steps` calls of `step`, then one `sync`."""

    def run() -> None:
        for _ in range(steps):
            step()
        sync()

    return run


def warm_up(step: Step, sync: Sync, steps: int) -> None:
    """Untimed steps (compilation, caches, allocator), then a sync."""
    for _ in range(steps):
        step()
    sync()


def _check_count(name: str, c: Contender, before: int | None) -> None:
    if c.compile_count is None or before is None:
        return
    after = c.compile_count()
    if after != before:
        raise RecompiledWhileTiming(
            f"{name}: compile count went from {before} to {after} while timing (a retrace or recompilation); "
            "the step times would include compilation"
        )


def time_interleaved(
    contenders: Mapping[str, Contender],
    repeats: int,
    steps: int,
    warmup: int,
) -> dict[str, TimingResult]:
    """Time several contenders with their repeats interleaved (repeat 1 of each, then repeat
    2 of each, ...), so that drift on the machine hits all of them alike. The order within a
    round reverses on every other round (a b, b a, a b, ...): with a fixed order, a machine
    that speeds up or slows down through the block (a CPU's clock settling, the allocator
    warming) would favour whichever contender always runs second. Measured: a float16 torch
    step and its plain loop both went from 2.9 to 2.0 ms over 10 repeats, about 3% from one
    repeat to the next, which a fixed order adds to every pair's ratio.

    Each contender is warmed up (`warmup` steps, then a sync) before any timing starts. The
    outer wall clock partitions the whole timed block: a contender owns the time from the
    clock read just before its repeat's leading sync to the next such read (or the end), so
    the contenders' outer walls add up to the block's wall time, and for one contender it is
    the whole block.
    """
    if repeats < 1 or steps < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1, steps >= 1, warmup >= 0; got {repeats}, {steps}, {warmup}")
    if not contenders:
        raise ValueError("nothing to time")
    for c in contenders.values():
        warm_up(c.step, c.sync, warmup)
    counts = {name: (c.compile_count() if c.compile_count is not None else None) for name, c in contenders.items()}
    runs = {name: block(c.step, c.sync, steps) for name, c in contenders.items()}
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    outer: dict[str, float] = dict.fromkeys(contenders, 0.0)
    # time.perf_counter is looked up on every read (not bound once), so a test can replace it
    owner: str | None = None
    mark = time.perf_counter()
    names = list(contenders)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            c = contenders[name]
            now = time.perf_counter()
            if owner is not None:
                outer[owner] += now - mark
            owner, mark = name, now
            c.sync()
            t0 = time.perf_counter()
            runs[name]()
            t1 = time.perf_counter()
            samples[name].append((t1 - t0) / steps)
    end = time.perf_counter()
    if owner is not None:
        outer[owner] += end - mark
    for name, c in contenders.items():
        _check_count(name, c, counts[name])
    return {
        name: TimingResult(
            samples_s=s,
            median=median(s),
            iqr=iqr(s),
            outer_wall_s=outer[name],
            steps=steps,
            warmup=warmup,
        )
        for name, s in samples.items()
    }


def time_steps(
    step: Step,
    sync: Sync,
    repeats: int,
    steps: int,
    warmup: int,
    *,
    compile_count: Callable[[], int] | None = None,
) -> TimingResult:
    """Warm up, then `repeats` timed repeats of `steps` steps; see the module docstring."""
    return time_interleaved({"step": Contender(step, sync, compile_count)}, repeats, steps, warmup)["step"]


def first_call(step: Step, sync: Sync) -> float:
    """Seconds for one call plus a sync (on a fresh step: tracing and compilation included)."""
    sync()
    t0 = time.perf_counter()
    step()
    sync()
    return time.perf_counter() - t0


# -- CPU peak memory -----------------------------------------------------------------------

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(key: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def ru_maxrss_bytes() -> int:
    """The process's lifetime peak RSS (getrusage: KiB on Linux, bytes on macOS)."""
    v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(v if sys.platform == "darwin" else v * 1024)


@dataclass
class CpuPeakMemory:
    """Peak host memory (RSS) of this process above its level at `reset()`.

    Two methods, the record says which (`method`):
    - "vmhwm": Linux lets a process reset its RSS high-water mark (writing 5 to
      /proc/self/clear_refs sets VmHWM to the current RSS). The reading is then
      VmHWM - RSS at reset: the peak of this window alone, whatever ran before.
    - "ru_maxrss": otherwise, the increase of getrusage's ru_maxrss, a process-lifetime
      high-water mark that cannot be reset: the reading is how much the window raised the
      mark. A window that needs less than an earlier peak reads 0, so measure in increasing
      order of size (the throughput measure runs batch sizes in increasing order).
    Either way it is resident memory of the whole process (allocator caches, compiled code,
    anything the framework allocates during the window), not the tensors of the step alone.
    """

    method: str = "none"
    base_bytes: int = 0
    _hwm_before: int = field(default=0, repr=False)

    def reset(self) -> None:
        self._hwm_before = ru_maxrss_bytes()
        self.method, self.base_bytes = "ru_maxrss", self._hwm_before
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            return
        hwm, rss = _status_kib("VmHWM"), _status_kib("VmRSS")
        # the reset took if the high-water mark now sits at the current RSS (64 KiB slack)
        if hwm is not None and rss is not None and hwm <= rss + 64:
            self.method, self.base_bytes = "vmhwm", rss * 1024

    def peak_bytes(self) -> int | None:
        """Peak increase since `reset()` (bytes), or None before any reset."""
        if self.method == "vmhwm":
            hwm = _status_kib("VmHWM")
            if hwm is None:
                return None
            return max(0, hwm * 1024 - self.base_bytes)
        if self.method == "ru_maxrss":
            return max(0, ru_maxrss_bytes() - self._hwm_before)
        return None


#: the process's one CPU tracker (the plain.py modules' CPU branch uses it)
CPU_PEAK = CpuPeakMemory()

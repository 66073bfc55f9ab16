"""Helpers shared by the measures: building a backend from the config, progress bars, tables."""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from tqdm.auto import tqdm

from harness import data as data_mod
from harness import models
from harness.api import Backend, ModelSpec, OptimSpec, RuntimeSpec, load_backend, resolve_mode
from harness.frameworks import rank
from harness.job import Diverged

if TYPE_CHECKING:
    from harness.config import AppConfig

T = TypeVar("T")


@dataclass
class Summary:
    """A measure's table across frameworks, and whether every check passed."""

    title: str
    rows: list[dict[str, Any]]
    ok: bool
    notes: list[str] = field(default_factory=list)


@dataclass
class Quantity:
    """One number (or verdict) that `vaebench compare` checks between a baseline and a current
    run, with the rule that decides whether a change is a regression:

    - "same": must be equal (verdicts, sparsity patterns);
    - "rel" / "abs": |current - baseline| <= tol (relative to |baseline| for "rel");
    - "limit": current <= tol (a deviation that must stay under its tolerance);
    - "band": |current - baseline| <= max(band_k * spread, tol), spread = the baseline's
      standard deviation over seeds (float32 training is not bit-reproducible across CPUs);
    - "speed": `samples` are per-repeat times (lower is better): a regression when a one-sided
      Mann-Whitney test says current is slower and the median slowdown exceeds the minimum effect;
    - "info": shown, never judged.
    """

    value: Any
    rule: str
    tol: float = 0.0
    spread: float | None = None
    samples: list[float] | None = None
    unit: str = ""


def model_spec(c: AppConfig, data: data_mod.Dataset | tuple[int, ...] | int) -> ModelSpec:
    """The configured model (every `model.*` key: the config group is its kind's spec's fields,
    so none can be left out) for this data: a Dataset, one example's shape, or a width."""
    if isinstance(data, data_mod.Dataset):
        shape: tuple[int, ...] = data.image_shape or (data.x_dim,)
    else:
        shape = (data,) if isinstance(data, int) else tuple(data)
    return models.spec_for_data(dataclasses.asdict(c.model), shape)


def optim_spec(c: AppConfig) -> OptimSpec:
    """The configured optimizer (every `optim.*` key)."""
    return OptimSpec(**dataclasses.asdict(c.optim))


def dataset(c: AppConfig) -> data_mod.Dataset:
    """The configured data set (every `data.*` key but batch_size, which the measures read),
    refused under the Bernoulli likelihood if its values leave [0, 1], in the shape the
    configured model takes: flat (N, x_dim) for a vector model (mlp, linear), images
    (N, H, W, C) for one that takes images (conv): `Dataset.reshaped`, views of the same arrays."""
    d = {k: v for k, v in dataclasses.asdict(c.data).items() if k != "batch_size"}
    ds = data_mod.load(d.pop("source"), **d, seed=c.seed, likelihood=c.model.likelihood)
    return ds.reshaped(model_spec(c, ds).input_shape)


def backend(
    c: AppConfig,
    framework: str,
    *,
    spec: ModelSpec | None = None,
    x_dim: int | None = None,
    optim: OptimSpec | None = None,
    dtype: str | None = None,
    mode: str | None = None,
    params: Mapping[str, np.ndarray] | None = None,
) -> Backend:
    if spec is None:
        assert x_dim is not None
        spec = model_spec(c, x_dim)
    return load_backend(framework, spec, optim or optim_spec(c), runtime_spec(c, framework, dtype=dtype, mode=mode),
                        params=params)


def runtime_spec(c: AppConfig, framework: str, *, dtype: str | None = None, mode: str | None = None) -> RuntimeSpec:
    """The job's `RuntimeSpec`, whole, from `framework.*` and `seed` (a measure that fixes its own
    dtype or mode gives it here); its mode resolved for `framework`."""
    f = c.framework
    fields: dict[str, Any] = dict(mode=resolve_mode(framework, mode or f.mode), dtype=dtype or f.precision,
                                  device=f.device, seed=c.seed, threads=f.threads, allow_tf32=f.allow_tf32,
                                  compile_mode=f.compile_mode, conv_transpose=f.conv_transpose)
    return RuntimeSpec(**fields)  # validated by its own rules (the config's were the same)


def batch_stream(x: np.ndarray, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """The training batches of epoch 0, 1, 2, ... of `x` (`data.batches`: shuffled per seed and
    epoch), without end; empty if `x` gives no batch."""
    for epoch in itertools.count():
        got = False
        for xb in data_mod.batches(x, batch_size, seed, epoch):
            got = True
            yield xb
        if not got:
            return


#: the loop reads its losses back (a host sync) every this many steps (`check_every`), and at the end
CHECK_EVERY = 32


class TrainingDiverged(Diverged):
    """A NaN or inf training loss, at `step` (1-based): what `TrainingLoop` raises. Uncaught,
    the worker records the job `diverged` with this message."""

    def __init__(self, desc: str, step: int, loss: float) -> None:
        super().__init__(f"{desc}: the training loss became {loss} at step {step}")
        self.step, self.loss = step, loss


#: `hook(loop, epoch_end)`, called with the training clock stopped; False stops training
Hook = Callable[["TrainingLoop", bool], "bool | None"]


class TrainingLoop:
    """The one training loop the measures share: gaps and snr through `train`; convergence and
    gradflow, which measure as they train, through a `hook`.

    `run(epochs=n)` trains on `data.batches(x, batch_size, c.seed, epoch)` for each epoch (a
    progress bar per epoch); `run(steps=n)` on the first n batches of `batch_stream` (a bar per
    step). A step is `train_step(put(xb))`, or `train_step(put(xb), noise(i))` with the
    harness's noise for step i (0-based). Its loss is a device scalar: the losses are read back
    into `losses` (a host sync) every `check_every` steps, before each hook and at the end, and
    the first NaN or inf raises `TrainingDiverged` naming its step (`losses` then ends with it).

    `hook(loop, epoch_end)` runs before the first step, after every `every`-th step and after
    each epoch's last (`epoch_end`; epochs only), once per step, with every loss read and the
    training clock stopped; returning False stops training. The clock (`wall_s`; `sync()`
    before every reading) counts training alone: it stops for the hooks and restarts after
    them. `first_step_s` is the first step's time, tracing and compilation included; `steps`
    the steps taken.
    """

    def __init__(self, b: Backend, x: np.ndarray, batch_size: int, c: AppConfig, *, desc: str = "training",
                 noise: Callable[[int], np.ndarray] | None = None, hook: Hook | None = None, every: int = 0,
                 check_every: int = CHECK_EVERY) -> None:
        self.b, self.x, self.batch_size, self.c, self.desc = b, x, batch_size, c, desc
        self.noise, self.hook, self.every, self.check_every = noise, hook, every, check_every
        self.steps, self.wall_s = 0, 0.0
        self.first_step_s: float | None = None
        self.losses: list[float] = []
        self._pending: list[Any] = []  # losses not read yet (device scalars)
        self._running, self._t0 = False, 0.0  # the clock, and when it (re)started
        self._bar: Any = None

    def run(self, *, epochs: int | None = None, steps: int | None = None) -> int:
        """Train for `epochs` epochs or `steps` steps (one of them); returns the steps taken."""
        if (epochs is None) == (steps is None):
            raise ValueError("train() takes epochs or steps, one of them")
        if not self._at_hook(epoch_end=False):
            return self.steps
        if epochs is not None:
            per_epoch = len(self.x) // self.batch_size
            self._bar = progress(range(epochs), self.c, desc=self.desc, unit="epoch")
            for epoch in self._bar:
                if not self._train(data_mod.batches(self.x, self.batch_size, self.c.seed, epoch), per_epoch):
                    break
        else:
            stream = itertools.islice(batch_stream(self.x, self.batch_size, self.c.seed), steps)
            self._bar = progress(stream, self.c, desc=self.desc, unit="step", total=steps)
            self._train(self._bar)
        self._stop_clock()
        self._read()
        return self.steps

    def postfix(self, **kw: Any) -> None:
        """Show `kw` beside the progress bar."""
        if hasattr(self._bar, "set_postfix"):
            self._bar.set_postfix(**kw)

    def _train(self, batches: Iterable[np.ndarray], epoch_len: int = 0) -> bool:
        """A step per batch (an epoch of `epoch_len` batches, or a stream: 0); False if a hook
        stopped training."""
        self._start_clock()
        for i, xb in enumerate(batches, 1):
            eps = None if self.noise is None else self.noise(self.steps)
            x = self.b.put(xb)
            self._pending.append(self.b.train_step(x) if eps is None else self.b.train_step(x, eps))
            self.steps += 1
            if self.first_step_s is None:
                self.b.sync()
                self.first_step_s = time.perf_counter() - self._t0
            epoch_end = i == epoch_len
            if self.hook is not None and (epoch_end or (self.every > 0 and self.steps % self.every == 0)):
                if not self._at_hook(epoch_end):
                    return False
                if not epoch_end:
                    self._start_clock()
            elif len(self._pending) >= self.check_every:
                self._read()
        return True

    def _at_hook(self, epoch_end: bool) -> bool:
        if self.hook is None:
            return True
        self._stop_clock()
        self._read()
        return self.hook(self, epoch_end) is not False

    def _start_clock(self) -> None:
        if not self._running:
            self.b.sync()
            self._running, self._t0 = True, time.perf_counter()

    def _stop_clock(self) -> None:
        if self._running:
            self.b.sync()
            self.wall_s += time.perf_counter() - self._t0
            self._running = False

    def _read(self) -> None:
        """Read the pending losses into `losses`; TrainingDiverged at the first NaN or inf."""
        first = self.steps - len(self._pending) + 1
        values = [float(v) for v in self._pending]
        self._pending.clear()
        for i, loss in enumerate(values):
            self.losses.append(loss)
            if not math.isfinite(loss):
                raise TrainingDiverged(self.desc, first + i, loss)


def train(b: Backend, x: np.ndarray, batch_size: int, c: AppConfig, *, epochs: int | None = None,
          steps: int | None = None, desc: str = "training") -> int:
    """The plain training loop (gaps, snr): `TrainingLoop` without a hook, for `epochs` epochs
    or the first `steps` batches of `x` (seed `c.seed`); returns the steps taken. A NaN or inf
    loss raises `Diverged` (`TrainingDiverged`) naming the step, so the record is `diverged`,
    never a trained model that silently is not."""
    return TrainingLoop(b, x, batch_size, c, desc=desc).run(epochs=epochs, steps=steps)


def progress(it: Iterable[T], c: AppConfig, **kw: Any) -> Iterable[T]:
    return tqdm(it, disable=not (c.progress and on_terminal()), leave=False, dynamic_ncols=True, **kw)  # type: ignore[no-any-return]


def on_terminal() -> bool:
    """Whether the run's output is a terminal (the CLI tells its workers, whose stderr is a pipe,
    through VAEBENCH_TTY): progress bars only there, never in redirected logs."""
    flag = os.environ.get("VAEBENCH_TTY")
    return flag == "1" if flag is not None else sys.stderr.isatty()


def by_framework(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`records` in the frameworks' declared order (`harness.frameworks`; others last), then by mode."""
    return sorted(records, key=lambda r: (rank(r["framework"]), r["mode"]))


class Num(str):
    """A table cell: the text shown in Markdown and LaTeX, with the unrounded number behind it
    (`raw`, and `std` over seeds where the cell is a mean) for the tidy CSV."""

    raw: float
    std: float | None

    def __new__(cls, text: str, raw: float, std: float | None = None) -> Num:
        cell = super().__new__(cls, text)
        cell.raw, cell.std = float(raw), None if std is None else float(std)
        return cell


def completed(records: Iterable[dict[str, Any]], key: str | None = None,
              of: type | tuple[type, ...] = object) -> list[dict[str, Any]]:
    """The records that finished `ok` with `key` in their metrics (an instance of `of`, and not
    an empty list or dict; no `key`: `ok` alone): what a measure's plots, answers and
    comparisons read; the rest are failures a table names (`split`)."""
    def done(r: dict[str, Any]) -> bool:
        if r.get("status") != "ok":
            return False
        if key is None:
            return True
        m = r.get("metrics") or {}
        return key in m and isinstance(m[key], of) and not (isinstance(m[key], list | dict) and not m[key])

    return [r for r in records if done(r)]


def finished(records: Iterable[dict[str, Any]], key: str, of: type | tuple[type, ...] = object) -> Iterator[tuple[str, dict[str, Any]]]:
    """("framework/mode", metrics) of each `completed` record: what a measure's `compared`
    judges. A record that did not finish has no quantities, so `vaebench compare` names it
    MISSING against a baseline that has them."""
    for r in completed(records, key, of):
        yield f"{r['framework']}/{r['mode']}", r["metrics"]


def blank_row(r: dict[str, Any], columns: Iterable[str]) -> dict[str, Any]:
    """A table row of empty cells for record `r`, its framework, its mode (where `columns` have
    one) and its status filled."""
    row = dict.fromkeys(columns, "-")
    row.update(framework=r.get("framework", "?"))
    if "mode" in row:
        row["mode"] = r.get("mode", "?")
    row["status"] = r.get("status", "?")
    return row


def failed_row(r: dict[str, Any], columns: Iterable[str], per_mode: bool = False) -> tuple[dict[str, Any], str]:
    """A record that did not finish as a table row of empty cells (`blank_row`) and the note
    that says why: "framework: status: error" ("framework/mode: ..." for a measure whose table
    has a row per mode)."""
    label = f"{r.get('framework')}/{r.get('mode')}" if per_mode else f"{r.get('framework')}"
    return blank_row(r, columns), f"{label}: {r.get('status', '?')}: {r.get('error') or 'no measurements'}"


@dataclass
class Failed:
    """A record that did not finish: its table row (`failed_row`; None where the measure's
    table shows no row for it) and its note; a measure may add to either (what the job kept)."""

    record: dict[str, Any]
    row: dict[str, Any] | None
    note: str


#: a record's rows for a measure's table, `rows_of(record, notes)`: it may add notes of its own
RowsOf = Callable[[dict[str, Any], list[str]], Iterable[dict[str, Any]]]


@dataclass
class Split:
    """A measure's records in `by_framework` order, split: `good`, those that finished
    (`completed`); `failed`, the rest, each with its row and its note (`failed_row`)."""

    records: list[dict[str, Any]]
    good: list[dict[str, Any]]
    failed: list[Failed]

    @property
    def ok(self) -> bool:
        """Whether every record finished."""
        return not self.failed

    @property
    def notes(self) -> list[str]:
        """The failed records' notes."""
        return [f.note for f in self.failed]

    def table(self, rows_of: RowsOf,
              failed_rows: Callable[[Failed, list[str]], Iterable[dict[str, Any]]] | None = None,
              ) -> tuple[list[dict[str, Any]], list[str]]:
        """The table's rows and notes in record order: a finished record's `rows_of(r, notes)`
        (which may add notes of its own); a failed one's note, then its row (if it has one),
        or `failed_rows(f, notes)` where the measure draws a failed record's rows itself."""
        failed = {id(f.record): f for f in self.failed}
        rows: list[dict[str, Any]] = []
        notes: list[str] = []
        for r in self.records:
            f = failed.get(id(r))
            if f is None:
                rows.extend(rows_of(r, notes))
                continue
            notes.append(f.note)
            if failed_rows is not None:
                rows.extend(failed_rows(f, notes))
            elif f.row is not None:
                rows.append(f.row)
        return rows, notes


def split(records: Iterable[dict[str, Any]], key: str | None = None, of: type | tuple[type, ...] = object, *,
          columns: Iterable[str] | None = None, per_mode: bool = False) -> Split:
    """`records` in `by_framework` order, split into those that finished (`completed` with
    `key`, an instance of `of`) and the rest, each with a row of empty cells under `columns`
    (none without `columns`) and its note (`failed_row`; framework/mode with `per_mode`)."""
    recs = by_framework(list(records))
    good = completed(recs, key, of)
    done = {id(r) for r in good}
    cols = None if columns is None else list(columns)
    failed = []
    for r in recs:
        if id(r) in done:
            continue
        row, note = failed_row(r, cols or [], per_mode)
        failed.append(Failed(r, None if cols is None else row, note))
    return Split(recs, good, failed)


def fmt(x: Any, spec: str = ".4g", scale: float = 1.0) -> str:
    """`x * scale` formatted for a table ("-" for None); numbers keep their raw value (Num)."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, float | int | np.floating | np.integer):
        v = float(x) * scale
        return Num(format(v, spec), v)
    return str(x)


def pm(values: list[float], spec: str) -> str:
    """'mean ± std' over seeds ('mean' for one seed); the raw mean and std ride along (Num)."""
    if not values:
        return "-"
    arr = np.asarray(values, dtype=float)
    with np.errstate(invalid="ignore"):  # a NaN or inf among the values shows as such
        mean = float(arr.mean())
        if len(arr) == 1:
            return Num(format(mean, spec), mean)
        std = float(arr.std(ddof=1))
    return Num(f"{mean:{spec}} ± {std:{spec}}", mean, std)

"""Helpers shared by the measures: building a backend from the config, progress bars, tables."""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import sys
from collections.abc import Iterable, Iterator, Mapping
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


def train(b: Backend, x: np.ndarray, batch_size: int, c: AppConfig, *, epochs: int | None = None,
          steps: int | None = None, desc: str = "training") -> int:
    """The one plain training loop (gaps, snr; gradflow and convergence, which interleave their
    own measurements, draw from the same `batch_stream`): a `train_step` per batch of `x` (seed
    `c.seed`) for `epochs` epochs (a progress bar per epoch) or the first `steps` batches; returns
    the steps taken. A NaN or inf loss raises `Diverged` naming the step, so the record is
    `diverged`, never a trained model that silently is not."""
    if (epochs is None) == (steps is None):
        raise ValueError("train() takes epochs or steps, one of them")
    if epochs is not None:
        stream: Iterable[np.ndarray] = (xb for _ in progress(range(epochs), c, desc=desc, unit="epoch")
                                        for xb in data_mod.batches(x, batch_size, c.seed, _))
    else:
        stream = itertools.islice(batch_stream(x, batch_size, c.seed), steps)
    done, pending = 0, []
    for xb in stream:
        pending.append(b.train_step(b.put(xb)))  # a device scalar: read in batches, not a sync per step
        done += 1
        if len(pending) == CHECK_EVERY:
            _check_losses(pending, done, desc)
    _check_losses(pending, done, desc)
    return done


#: `train` reads its losses back (a host sync) every this many steps, and at the end
CHECK_EVERY = 32


def _check_losses(pending: list[Any], done: int, desc: str) -> None:
    """Diverged naming the first NaN or inf among the last len(pending) steps' losses (ending at
    step `done`); empties `pending`."""
    first = done - len(pending) + 1
    losses = [float(v) for v in pending]
    pending.clear()
    for i, loss in enumerate(losses):
        if not math.isfinite(loss):
            raise Diverged(f"{desc}: the training loss became {loss} at step {first + i}")


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


def completed(records: Iterable[dict[str, Any]], key: str, of: type | tuple[type, ...] = object) -> list[dict[str, Any]]:
    """The records that finished `ok` with `key` in their metrics (an instance of `of`): what a
    measure's plots, answers and comparisons read; the rest are failures a table names."""
    def done(r: dict[str, Any]) -> bool:
        m = r.get("metrics") or {}
        return r.get("status") == "ok" and key in m and isinstance(m[key], of)

    return [r for r in records if done(r)]


def finished(records: Iterable[dict[str, Any]], key: str, of: type | tuple[type, ...] = object) -> Iterator[tuple[str, dict[str, Any]]]:
    """("framework/mode", metrics) of each `completed` record: what a measure's `compared`
    judges. A record that did not finish has no quantities, so `vaebench compare` names it
    MISSING against a baseline that has them."""
    for r in completed(records, key, of):
        yield f"{r['framework']}/{r['mode']}", r["metrics"]


def failed_row(r: dict[str, Any], columns: Iterable[str]) -> tuple[dict[str, Any], str]:
    """A record that did not finish as a table row of empty cells (framework and status filled)
    and the note that says why."""
    row = dict.fromkeys(columns, "-")
    row.update(framework=r.get("framework", "?"), status=r.get("status", "?"))
    return row, f"{r.get('framework')}: {r.get('status')}: {r.get('error')}"


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

"""The measures, and the one table that names them.

Each measure is one module here that declares everything that is its own. `Measure` below is
that contract as a Protocol: the table `MEASURES` is typed with it, so mypy checks every module
against it, and `check` refuses at import a module that lacks a required part, by name.

- `Config`: the dataclass of its section `measure.<name>` (ranges on the fields, via
  `harness.schema.setting`); `harness.config` builds the schema from this table;
- `run(config, job) -> Result`: runs in the job's own process, where it may load a backend;
- `summarize(records) -> Summary`: in the parent, from records (and files beside them) alone;
- `PLOTS`: {file name: plot(records, path) -> path or None}, drawn from records alone;
- `QUESTION` and `answer(records) -> str`: the question it answers and its one-line answer;
- `compared(records) -> {name: Quantity}`: what `vaebench compare` and `make regress` judge;
  a measure with nothing to compare declares `compared = None` (compare names it in a note);
- optional `precision(config) -> str`: what the job computes in, for its record name and
  progress line (default: `framework.precision`); a "float64" in it turns on JAX's x64;
- optional `validate(config)`: cross-field rules, raising `harness.schema.ConfigError`;
- optional `ROW_KEYS`: config keys shown as a column of the measure's own table rather than as
  report variants (`harness.records.measured_config`), e.g. `framework.precision`, so a precision
  sweep is one table; they still tell records apart (`config_hash`);
- `JUDGED`: the quantities its verdict reads (`harness.judged.Judged`: a path into the record
  and a name). A NaN, inf or missing number at any of them fails the measure, named, whatever
  its own comparisons made of it (`summarize` below); tests/test_nonfinite.py plants one at
  every path of real records, so a new measure is covered by declaring its `JUDGED`;
- `READS`: the config it reads, as dotted prefixes of config keys ("framework", "seed",
  "model", "data.batch_size", "measure.<name>", ...; "-prefix" excepts keys under an earlier
  one, e.g. "-framework.precision" for a measure that fixes its own dtype). A record keeps only
  these keys and the neutral ones (`harness.records.NEUTRAL_KEYS`), and only these tell two
  records apart (report variants, resume, compare): a key it does not read is not its input.
  A measure whose reads depend on its config also defines `reads(config) -> tuple[str, ...]`
  (`config`: the nested plain dict a record holds), a subset of its READS. The job runs with
  what its record keeps (the schema's defaults elsewhere), so READS must cover every key the
  measure's `run` uses (tests/test_reads.py checks);
- `METRICS`: the dataclass of its record's `metrics` (`harness.metrics`): `run` builds it and
  stores it with `metrics.plain`; `metrics.load` reads a record's metrics back into it
  (tests/test_metrics_types.py loads fresh and committed records into every measure's type);
- `VERSION`: an int (from 1) its author bumps when what it measures changes (asv's
  benchmark_version); stored in each record (`measure_version`); `vaebench compare` refuses to
  compare records of different versions, and resume never reuses a record of another version.

Adding a measure: write the module, add it to the import and the table below, add
`conf/measure/<name>.yaml`.
Measures import neither `harness.config` (only for type checking) nor the worker.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol, cast

from harness import judged
from harness.measures import conformance, convergence, gaps, gradflow, identity, snr, throughput

if TYPE_CHECKING:
    from harness.config import AppConfig
    from harness.job import Job, Result
    from harness.measures.common import Quantity, Summary

Records = list[dict[str, Any]]


class Measure(Protocol):
    """What every measure module declares (mypy checks each module in `MEASURES` against it;
    `check` below checks a module at run time, naming what it lacks)."""

    # read-only (properties), so a module's narrower types satisfy them
    @property
    def Config(self) -> type: ...  # noqa: N802  (the measure's config dataclass)
    @property
    def QUESTION(self) -> str: ...  # noqa: N802
    @property
    def READS(self) -> tuple[str, ...]: ...  # noqa: N802
    @property
    def VERSION(self) -> int: ...  # noqa: N802
    @property
    def PLOTS(self) -> Mapping[str, Callable[[Records, Path], Path | None]]: ...  # noqa: N802
    @property
    def METRICS(self) -> type: ...  # noqa: N802  (the dataclass of its record's metrics)
    @property
    def JUDGED(self) -> tuple[judged.Judged, ...]: ...  # noqa: N802
    @property
    def compared(self) -> Callable[[Records], dict[str, Quantity]] | None:
        """`compared(records) -> {name: Quantity}` for `vaebench compare` and `make regress`; a
        measure with nothing to compare says so with `compared = None` (compare then names it)."""

    def run(self, c: AppConfig, job: Job) -> Result: ...
    def summarize(self, records: Records) -> Summary: ...
    def answer(self, records: Records) -> str: ...


#: every attribute of the contract, checked at import: a module that lacks one is refused by name
REQUIRED = ("Config", "QUESTION", "READS", "VERSION", "PLOTS", "METRICS", "JUDGED", "compared", "run", "summarize",
            "answer")
#: what a measure may add: `reads(config)`, `precision(c)`, `validate(c)`, `TIMING` (see above)
OPTIONAL = ("reads", "precision", "validate", "TIMING", "ROW_KEYS")


def check(name: str, module: ModuleType) -> Measure:
    """`module` as a `Measure`, or TypeError naming the first attribute of the contract it lacks."""
    missing = [a for a in REQUIRED if not hasattr(module, a)]
    if missing:
        raise TypeError(f"measure {name!r} ({module.__name__}) does not declare {', '.join(missing)}"
                        " (a measure with nothing to compare declares `compared = None`)")
    return cast(Measure, module)


#: name -> module: the one table (a measure is imported with the table, so a broken one fails at once)
MEASURES: dict[str, Measure] = {
    "identity": identity,
    "gradflow": gradflow,
    "conformance": conformance,
    "convergence": convergence,
    "throughput": throughput,
    "gaps": gaps,
    "snr": snr,
}
for _name, _module in MEASURES.items():
    check(_name, cast(ModuleType, _module))


def reads(name: str, config: Mapping[str, Any]) -> tuple[str, ...] | None:
    """What measure `name` reads of `config` (a nested plain dict: the resolved config, or a
    record's): its `reads(config)` or its `READS`; None for a measure that is not registered
    (then every key counts)."""
    module = MEASURES.get(name)
    if module is None:
        return None
    fn = getattr(module, "reads", None)
    return tuple(fn(config)) if callable(fn) else tuple(module.READS)


def version(name: str) -> int:
    """Measure `name`'s current `VERSION` (1 for a measure that is not registered)."""
    module = MEASURES.get(name)
    return 1 if module is None else int(module.VERSION)


def precision(name: str, c: AppConfig) -> str:
    """What job `name` computes in under config `c` (see the module docstring)."""
    fn = getattr(MEASURES[name], "precision", None)
    return str(fn(c)) if fn is not None else str(c.framework.precision)


def validate(name: str, c: AppConfig) -> None:
    """Measure `name`'s cross-field rules on `c`, if it has any (ConfigError on a broken one)."""
    fn = getattr(MEASURES[name], "validate", None)
    if fn is not None:
        fn(c)


def timing(name: str) -> bool:
    """Whether measure `name` times things (its results compare only within one environment)."""
    return bool(getattr(MEASURES.get(name), "TIMING", False))


def summarize(name: str, records: list[dict[str, Any]]) -> Any:
    """Measure `name`'s `Summary` of `records` (framework order), failed wherever a judged
    quantity is not a finite number: each such quantity is named in the notes, first."""
    from harness.measures.common import by_framework

    module = MEASURES[name]
    recs = by_framework(records)
    s = module.summarize(recs)
    bad = judged.problems(module.JUDGED, recs)
    if bad:
        s.ok = False
        s.notes[:0] = [f"FAIL: {b}" for b in bad]
    return s


def answer(name: str, records: list[dict[str, Any]]) -> str:
    """The measure's one-line answer; "NO: ..." naming the first non-finite judged quantity,
    if there is one, whatever the measure's own answer would say."""
    from harness.measures.common import by_framework

    module = MEASURES[name]
    recs = by_framework(records)
    bad = judged.problems(module.JUDGED, recs)
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        return f"NO: {bad[0]}{more}"
    return str(module.answer(recs))

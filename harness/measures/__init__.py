"""The measures, and the one table that names them.

Each measure is one module here that declares everything that is its own:

- `Config`: the dataclass of its section `measure.<name>` (ranges on the fields, via
  `harness.schema.setting`); `harness.config` builds the schema from this table;
- `run(config, job) -> Result`: runs in the job's own process, where it may load a backend;
- `summarize(records) -> Summary`: in the parent, from records (and files beside them) alone;
- `PLOTS`: {file name: plot(records, path) -> path or None}, drawn from records alone;
- optional `precision(config) -> str`: what the job computes in, for its record name and
  progress line (default: `framework.precision`); a "float64" in it turns on JAX's x64;
- optional `validate(config)`: cross-field rules, raising `harness.schema.ConfigError`;
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
- `VERSION`: an int (from 1) its author bumps when what it measures changes (asv's
  benchmark_version); stored in each record (`measure_version`); `vaebench compare` refuses to
  compare records of different versions, and resume never reuses a record of another version.

Adding a measure: write the module, add its line below, add `conf/measure/<name>.yaml`.
Measures import neither `harness.config` (only for type checking) nor the worker.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from harness import judged

#: name -> module: the one table (a measure is imported with the table, so a broken one fails at once)
MEASURES: dict[str, ModuleType] = {
    name: importlib.import_module(path)
    for name, path in {
        "identity": "harness.measures.identity",
        "gradflow": "harness.measures.gradflow",
        "conformance": "harness.measures.conformance",
        "convergence": "harness.measures.convergence",
        "throughput": "harness.measures.throughput",
        "gaps": "harness.measures.gaps",
        "snr": "harness.measures.snr",
    }.items()
}


def reads(name: str, config: Mapping[str, Any]) -> tuple[str, ...] | None:
    """What measure `name` reads of `config` (a nested plain dict: the resolved config, or a
    record's): its `reads(config)` or its `READS`; None for a measure that declares neither or is
    not registered (then every key counts, as before measures declared their reads)."""
    module = MEASURES.get(name)
    fn = getattr(module, "reads", None)
    if callable(fn):
        return tuple(fn(config))
    declared = getattr(module, "READS", None)
    return None if declared is None else tuple(declared)


def version(name: str) -> int:
    """Measure `name`'s current `VERSION` (1 for a measure without one, or not registered)."""
    return int(getattr(MEASURES.get(name), "VERSION", 1))


def precision(name: str, c: object) -> str:
    """What job `name` computes in under config `c` (see the module docstring)."""
    fn = getattr(MEASURES[name], "precision", None)
    return str(fn(c)) if fn is not None else str(c.framework.precision)  # type: ignore[attr-defined]


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

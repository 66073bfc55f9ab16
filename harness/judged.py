"""What a measure's verdict reads, and the rule that a non-finite number there is a FAIL.

Each measure declares `JUDGED`: the quantities its PASS/FAIL depends on, each as a path into a
record (`Judged`). `problems(judged, records)` finds every NaN, inf or missing number at those
paths and names it; `harness.measures.summarize` turns any such finding into a FAIL, whatever
the measure's own comparisons made of it (a comparison with NaN is False both ways, so
`value >= worst` can silently drop a row, and `not (value > tol)` passes it). The registry test
(tests/test_nonfinite.py) plants NaN and inf at every declared path of real records and checks
that each one fails, with its row still in the table and the quantity named.

Paths. `metrics` paths are dotted keys into the record's metrics; `*` matches any key of a dict
or any position of a list (`runs.*.evals.*.test_elbo`), and a key may be a glob (`*/*`). A path that starts with `arrays:` is a
glob (fnmatch) over the keys of the arrays file a record names in `metrics.arrays`
(`arrays:float32/sgd step/*`). A value may be a number or a list/array of numbers; the first
non-finite entry is named by its position along `axis` (1-based: "step 4").
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ARRAYS = "arrays:"


@dataclass(frozen=True)
class Judged:
    """One judged quantity of a measure: where it is in a record and what the verdict calls it."""

    path: str  # dotted metrics path with `*` wildcards, or "arrays:<glob over the arrays file's keys>"
    name: str  # how messages name it, e.g. "identity residual"
    axis: str = "index"  # what positions in a list value are: "step", "example", "K", ...


def describe(value: Any, axis: str = "index") -> str | None:
    """None when `value` is a finite number or a non-empty collection of finite numbers;
    otherwise what is wrong with it, e.g. "NaN", "inf at step 4 (3 of 50 entries not finite)",
    "missing"."""
    if value is None:
        return "missing (null)"
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float | np.integer | np.floating):
        v = float(value)
        return None if math.isfinite(v) else _word(v)
    if isinstance(value, str):
        return f"not a number ({value!r})"
    try:
        a = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return f"not numbers ({type(value).__name__})"
    if a.size == 0:
        return None
    bad = ~np.isfinite(a)
    if not bad.any():
        return None
    first = np.unravel_index(int(np.argmax(bad.ravel())), a.shape)
    where = ", ".join(str(int(i) + 1) for i in first)
    more = f" ({int(bad.sum())} of {a.size} entries not finite)" if bad.sum() > 1 else ""
    return f"{_word(float(a[first]))} at {axis} {where}{more}"


def finite(*values: Any) -> bool:
    """Whether every value (numbers, or arrays/lists of numbers) is finite; None is not."""
    try:
        return all(v is not None and bool(np.all(np.isfinite(np.asarray(v, dtype=np.float64)))) for v in values)
    except (TypeError, ValueError):
        return False


def le(x: Any, bound: Any) -> bool:
    """`x <= bound` for finite numbers (arrays: every entry); False when either is not finite,
    so that a check written with it cannot pass on NaN, inf or -inf."""
    return finite(x, bound) and bool(np.all(np.asarray(x, dtype=np.float64) <= np.asarray(bound, dtype=np.float64)))


def ge(x: Any, bound: Any) -> bool:
    """`x >= bound` for finite numbers (arrays: every entry); False when either is not finite."""
    return finite(x, bound) and bool(np.all(np.asarray(x, dtype=np.float64) >= np.asarray(bound, dtype=np.float64)))


def _word(v: float) -> str:
    return "NaN" if math.isnan(v) else ("inf" if v > 0 else "-inf")


def locate(metrics: Any, path: str) -> Iterator[tuple[str, Any]]:
    """(concrete path, value) for every place in `metrics` that the dotted `path` matches."""

    def walk(node: Any, parts: Sequence[str], here: str) -> Iterator[tuple[str, Any]]:
        if not parts:
            yield here, node
            return
        head, rest = parts[0], parts[1:]
        if isinstance(node, dict):
            keys = [k for k in node if fnmatch.fnmatchcase(str(k), head)] if _glob(head) else [head] if head in node else []
            for k in keys:
                yield from walk(node[k], rest, f"{here}.{k}" if here else str(k))
        elif isinstance(node, list):
            idx = range(len(node)) if head == "*" else [int(head)] if head.isdigit() and int(head) < len(node) else []
            for i in idx:
                yield from walk(node[i], rest, f"{here}.{i}" if here else str(i))

    yield from walk(metrics, path.split("."), "")


def _glob(part: str) -> bool:
    return any(ch in part for ch in "*?[")


def arrays_file(record: dict[str, Any]) -> Path | None:
    """The arrays file beside a record (`metrics.arrays`), if it names one."""
    name = (record.get("metrics") or {}).get("arrays")
    if not isinstance(name, str) or not record.get("_file"):
        return None
    return Path(record["_file"]).parent / name


def sites(record: dict[str, Any], j: Judged, arrays: dict[str, np.ndarray] | None = None) -> Iterator[tuple[str, Any]]:
    """Every value of `record` that `j` points at, with its concrete path. `arrays`: the
    record's arrays file, loaded (read from disk when None and `j` needs it)."""
    if not j.path.startswith(ARRAYS):
        yield from locate(record.get("metrics") or {}, j.path)
        return
    if arrays is None:
        path = arrays_file(record)
        if path is None or not path.exists():
            return
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
    pattern = j.path[len(ARRAYS):]
    for key in sorted(arrays):
        if fnmatch.fnmatchcase(key, pattern):
            yield ARRAYS + key, arrays[key]


def problems(judged: Sequence[Judged], records: Sequence[dict[str, Any]]) -> list[str]:
    """One line per judged quantity that is not a finite number in a record that finished
    (`ok`), naming the framework, the quantity, what is wrong and where."""
    out: list[str] = []
    for r in records:
        if r.get("status") != "ok":
            continue  # its status already fails the measure
        arrays: dict[str, np.ndarray] | None = None
        path = arrays_file(r)
        if path is not None and path.exists() and any(j.path.startswith(ARRAYS) for j in judged):
            with np.load(path) as f:
                arrays = {k: f[k] for k in f.files}
        for j in judged:
            for where, value in sites(r, j, arrays):
                what = describe(value, j.axis)
                if what is not None:
                    out.append(f"{r.get('framework')}/{r.get('mode')}: {j.name} is {what} ({where}): "
                               "a judged quantity that is not a finite number fails the check")
    return out

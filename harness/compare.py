"""`vaebench compare BASELINE CURRENT`: what changed between two sets of records, and whether
it is a regression.

Each measure says what it compares (`compared(records) -> {name: Quantity}` in its module;
the rules are in `harness.measures.common.Quantity`): numerics by tolerances that hold between
CPUs of different vendors (float64 closed forms to 1e-9 relative, conformance verdicts and
their tolerances, gradient sparsity patterns, float32 training ELBOs within a band derived from
the baseline's seed spread), throughput by a one-sided Mann-Whitney test on the per-repeat step
times plus a minimum effect size. Throughput refuses to compare different machines (device, CPU,
threads) unless --allow-env-mismatch is given (a measure with `TIMING = True` in its module).

Across releases: when the two sets differ in framework or library versions (`framework.env`
runs a job under another environment), the heading names each change ("jax 0.10.1 → 0.10.2")
and every quantity is judged by the same rules; throughput then compares without
--allow-env-mismatch, which is still needed for a different machine (CPU, device, threads).

Records are matched by measure and by the config keys that vary within either set (a sweep);
only keys the measure reads count (its READS). A config difference between the two sets (e.g. a
changed learning rate) is reported, and its effect is judged like any other change. A measure
whose records come from different versions of it (`VERSION` in its module, `measure_version` in
the record) measured different things: it is not compared, and the exit code is 2. The full table goes to ./compare.md (or `-o PATH`),
never into BASELINE or CURRENT (a committed reference stays as it is).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tabulate import tabulate

from harness import measures
from harness.measures import MEASURES
from harness.measures.common import Quantity, by_framework
from harness.records import measure_version, measured_config, write_atomic
from harness.report import load, variant_keys, variant_of

#: what must agree between the machines of two throughput measurements (else --allow-env-mismatch)
ENV_KEYS = ("device_name", "cpu_model", "cpu_cores", "threads", "allow_tf32", "dtype")
#: the record's env keys that are releases of software, not the machine: a version change between
#: the two sides is what a release comparison is about, so it is named, and allowed (every key
#: ending in `_version`, the record's `packages`, and these)
RELEASE_KEYS = ("python", "numpy")
#: a band of this many baseline seed standard deviations
BAND_K = 4.0


#: verdicts that fail the comparison: out of tolerance, slower, or no longer measured
FAILURES = ("CHANGED", "SLOWER", "MISSING")
#: the verdict of a measure whose baseline and current records come from different versions of
#: it: not compared (exit 2, as for other input that cannot be compared)
INCOMPARABLE = "NOT COMPARED"


class EnvMismatch(Exception):
    pass


@dataclass
class Change:
    measure: str
    variant: str
    name: str
    baseline: Any
    current: Any
    rule: str
    verdict: str  # ok | faster | new | changed (info only) | and the failures in FAILURES

    @property
    def regression(self) -> bool:
        return self.verdict in FAILURES

    @property
    def refusal(self) -> str | None:
        """Why this measure was not compared (different measure versions), or None."""
        if self.verdict != INCOMPARABLE:
            return None
        return (f"cannot compare {self.measure}: its baseline records are of measure version {self.baseline}, its "
                f"current records of version {self.current} (what it measures changed); {self.measure} not compared")


def _num(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.6g}"
    return str(x)


def mann_whitney_slower(base: Sequence[float], cur: Sequence[float]) -> float:
    """One-sided p-value that `cur` times are stochastically larger than `base` times."""
    from scipy.stats import mannwhitneyu

    distinct = len(set(base) | set(cur)) == len(base) + len(cur)
    method = "exact" if distinct and len(base) + len(cur) <= 200 else "asymptotic"  # exact needs no ties
    return float(mannwhitneyu(cur, base, alternative="greater", method=method).pvalue)


def judge(name: str, b: Quantity | None, c: Quantity | None, min_effect: float, alpha: float) -> tuple[str, str, Any, Any]:
    """(verdict, rule, baseline shown, current shown) for one quantity."""
    if c is None:
        return "MISSING", "missing", _num(b.value if b else None), "missing"
    if b is None:
        return "new", c.rule, "-", _num(c.value)
    rule = c.rule
    if rule == "speed":
        assert b.samples and c.samples
        bm, cm = sorted(b.samples)[len(b.samples) // 2], sorted(c.samples)[len(c.samples) // 2]
        ratio = cm / bm
        p = mann_whitney_slower(b.samples, c.samples)
        p_fast = mann_whitney_slower(c.samples, b.samples)
        shown = f"{_num(cm)} ({ratio - 1:+.1%}, p={p:.2g})"
        if ratio - 1 > min_effect and p < alpha:
            return "SLOWER", f"slower by > {min_effect:.0%}, p < {alpha}", _num(bm), shown
        if 1 - ratio > min_effect and p_fast < alpha:
            return "faster", "speed", _num(bm), shown
        return "ok", "speed", _num(bm), shown
    if rule == "info":
        return ("ok" if b.value == c.value else "changed"), rule, _num(b.value), _num(c.value)
    if rule == "same":
        return ("ok" if b.value == c.value else "CHANGED"), rule, _num(b.value), _num(c.value)
    bv, cv = float(b.value), float(c.value)
    if not (math.isfinite(bv) and math.isfinite(cv)):
        good = bv == cv or (math.isnan(bv) and math.isnan(cv))
        return ("ok" if good else "CHANGED"), rule, _num(bv), _num(cv)
    if rule == "limit":
        return ("ok" if cv <= c.tol else "CHANGED"), f"≤ {c.tol:g}", _num(bv), _num(cv)
    if rule == "rel":
        good = abs(cv - bv) <= c.tol * abs(bv) or cv == bv
        return ("ok" if good else "CHANGED"), f"rel {c.tol:g}", _num(bv), _num(cv)
    if rule == "abs":
        return ("ok" if abs(cv - bv) <= c.tol else "CHANGED"), f"abs {c.tol:g}", _num(bv), _num(cv)
    if rule == "band":
        width = max(BAND_K * (b.spread or 0.0), c.tol)
        return ("ok" if abs(cv - bv) <= width else "CHANGED"), f"± {width:.3g}", _num(bv), _num(cv)
    raise ValueError(f"{name}: unknown comparison rule {rule!r}")


def _groups(records: list[dict[str, Any]], keys: list[str]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        label = ", ".join(f"{k}={v}" for k, v in variant_of(r, keys).items()) or "-"
        out.setdefault(label, []).append(r)
    return out


def versions(env: dict[str, Any]) -> dict[str, str]:
    """Package -> version of one record's environment: the framework (`framework_version`), every
    other `<package>_version` it records (keras, jaxlib, ...), `packages` (every framework and
    library the job's interpreter had), numpy and python."""
    out: dict[str, str] = {}
    for k, v in env.items():
        if k.endswith("_version") and isinstance(v, str):
            out[str(env.get("framework")) if k == "framework_version" else k.removesuffix("_version")] = v
    out.update({str(k): str(v) for k, v in (env.get("packages") or {}).items() if v is not None})
    out.update({k: str(env[k]) for k in RELEASE_KEYS if env.get(k) is not None})
    return out


def release_changes(base: list[dict[str, Any]], cur: list[dict[str, Any]]) -> list[str]:
    """The version changes between the two sets, e.g. "jax 0.10.1 → 0.10.2": each package whose
    version differs between matched frameworks' records (its versions on each side, when a side
    holds several)."""
    def seen(recs: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
        out: dict[tuple[str, str], set[str]] = {}
        for r in recs:
            for pkg, v in versions(r.get("env") or {}).items():
                out.setdefault((r["framework"], pkg), set()).add(v)
        return out

    b, c = seen(base), seen(cur)
    changes: dict[str, None] = {}
    for key in [k for k in b if k in c and b[k] != c[k]]:
        changes[f"{key[1]} {', '.join(sorted(b[key]))} → {', '.join(sorted(c[key]))}"] = None
    return list(changes)


def env_differences(base: list[dict[str, Any]], cur: list[dict[str, Any]]) -> list[str]:
    """What differs between the machines of matched records (per framework); versions are not
    the machine (`release_changes`)."""
    diffs = []
    for fw in dict.fromkeys(r["framework"] for r in base):
        be = [r.get("env") or {} for r in base if r["framework"] == fw]
        ce = [r.get("env") or {} for r in cur if r["framework"] == fw]
        if not be or not ce:
            continue
        for k in ENV_KEYS:
            bv, cv = be[0].get(k), ce[0].get(k)
            if bv != cv:
                diffs.append(f"{fw} {k}: {bv} -> {cv}")
    return diffs


def config_differences(base: list[dict[str, Any]], cur: list[dict[str, Any]]) -> list[str]:
    """Measured config keys both sets have, with different values (a key only one side has is a
    newer schema, not a change)."""
    b, c = measured_config(base[0]), measured_config(cur[0])
    return [f"{k}: {b[k]} -> {c[k]}" for k in sorted(set(b) & set(c)) if b[k] != c[k]]


def compare(base: list[dict[str, Any]], cur: list[dict[str, Any]], *, min_effect: float = 0.10, alpha: float = 0.01,
            allow_env_mismatch: bool = False) -> tuple[list[Change], list[str]]:
    """Every quantity of every measure both sets hold; notes say what could not be matched."""
    changes: list[Change] = []
    notes: list[str] = []
    for measure, module in MEASURES.items():
        mb = [r for r in base if r["measure"] == measure]
        mc = [r for r in cur if r["measure"] == measure]
        if not mb or not mc:
            if mb or mc:
                notes.append(f"{measure}: only in the {'baseline' if mb else 'current'} records; not compared")
            continue
        vb, vc = sorted({measure_version(r) for r in mb}), sorted({measure_version(r) for r in mc})
        if vb != vc:  # different code measured: not comparable (a key of each group where one set mixes versions)
            changes.append(Change(measure, "-", "measure version", ", ".join(map(str, vb)), ", ".join(map(str, vc)),
                                  "same version", INCOMPARABLE))
            continue
        fn = module.compared
        if fn is None:
            notes.append(f"{measure}: the measure declares nothing to compare (`compared = None`)")
            continue
        keys = sorted(set(variant_keys(mb)) | set(variant_keys(mc)))
        gb, gc = _groups(mb, keys), _groups(mc, keys)
        for label in dict.fromkeys([*gb, *gc]):
            if label not in gb or label not in gc:
                notes.append(f"{measure} [{label}]: only in the {'baseline' if label in gb else 'current'} records")
                continue
            rb, rc = by_framework(gb[label]), by_framework(gc[label])
            if measures.timing(measure):  # timings compare only within one environment
                diffs = env_differences(rb, rc)
                if diffs and not allow_env_mismatch:
                    raise EnvMismatch(f"{measure} records come from different machines ({'; '.join(diffs)}); "
                                      "timings compare only on the same machine (a release change alone is allowed): "
                                      "pass --allow-env-mismatch to compare anyway")
                notes.extend(f"{measure} [{label}]: environment differs: {d}" for d in diffs)
            notes.extend(f"{measure} [{label}]: config differs: {d}" for d in config_differences(rb, rc))
            qb, qc = fn(rb), fn(rc)
            for name in dict.fromkeys([*qb, *qc]):
                verdict, rule, shown_b, shown_c = judge(name, qb.get(name), qc.get(name), min_effect, alpha)
                changes.append(Change(measure, label, name, shown_b, shown_c, rule, verdict))
    return changes, notes


def table(changes: list[Change], only_changed: bool) -> str:
    rows = [{"measure": c.measure, "variant": c.variant, "quantity": c.name, "baseline": c.baseline, "current": c.current,
             "rule": c.rule, "verdict": c.verdict} for c in changes if not only_changed or c.verdict != "ok" or (c.rule != "speed" and c.baseline != c.current)]
    return tabulate(rows, headers="keys", tablefmt="github", disable_numparse=True) if rows else "(no differences)"


def main(argv: list[str] | None = None, prog: str = "vaebench compare") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                 epilog="Exit codes: 0 no regression, 1 a regression, 2 bad input, mismatched machines "
                                        "or a measure whose records come from different versions of it (not compared).")
    ap.add_argument("baseline", type=Path, metavar="BASELINE", help="folder (or record file) of the baseline records")
    ap.add_argument("current", type=Path, metavar="CURRENT", help="folder (or record file) of the records to check")
    ap.add_argument("--min-effect", type=float, default=0.10, help="smallest throughput slowdown that counts (default 0.10)")
    ap.add_argument("--alpha", type=float, default=0.01, help="significance level of the throughput test (default 0.01)")
    ap.add_argument("--allow-env-mismatch", action="store_true", help="compare throughput across different machines (CPU, device, threads); a release change alone needs no flag")
    ap.add_argument("-o", "--out", type=Path, help="Markdown file for the full table (default: ./compare.md, in the "
                    "current folder; never written into BASELINE or CURRENT unless -o says so)")
    a = ap.parse_args(argv)
    for p in (a.baseline, a.current):
        if not p.exists():
            print(f"{prog}: no such folder or file: {p}", file=sys.stderr)
            return 2
    out = a.out or Path("compare.md")
    inside = [p for p in (a.baseline, a.current) if p.is_dir() and out.resolve().is_relative_to(p.resolve())]
    if not a.out and inside:
        print(f"{prog}: the current folder is inside {inside[0]}, and compare writes nothing into its inputs: "
              "give -o PATH for the table", file=sys.stderr)
        return 2
    base, cur = load([a.baseline]), load([a.current])
    for p, recs in ((a.baseline, base), (a.current, cur)):
        if not recs:
            print(f"{prog}: no records under {p}", file=sys.stderr)
            return 2
    try:
        changes, notes = compare(base, cur, min_effect=a.min_effect, alpha=a.alpha, allow_env_mismatch=a.allow_env_mismatch)
    except EnvMismatch as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    bad = [c for c in changes if c.regression]
    refused = [r for c in changes if (r := c.refusal)]
    releases = release_changes(base, cur)
    across = f" ({'; '.join(releases)})" if releases else ""
    head = (f"compare {a.baseline} -> {a.current}{across}: {len(changes) - len(refused)} quantities, {len(bad)} regression(s)"
            + (f", {len(refused)} measure(s) not compared (different measure versions)" if refused else ""))
    full = "\n".join([f"# {head}", "", table(changes, only_changed=False), "", *[f"- {n}" for n in [*refused, *notes]], ""])
    write_atomic(out, full.encode())
    print(table(changes, only_changed=True))
    for n in notes:
        print(f"note: {n}")
    print(head)
    print(f"table: {out}")
    for r in refused:
        print(f"{prog}: {r}", file=sys.stderr)
    if refused:
        return 2
    if not changes:
        print(f"{prog}: nothing in common to compare", file=sys.stderr)
        return 2
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m harness.compare"))

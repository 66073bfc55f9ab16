"""`vaebench history DIR... [-o OUT]`: each measured quantity across commits and framework
releases (asv's published history), from the records under DIR and, with --git, from every
earlier committed version of those record files.

    vaebench history results/reference/ -o /tmp/history

What a point is: one number of one record, one of the quantities its measure's own
`compared(records)` gives (`harness.measures.common.Quantity`: what `vaebench compare` judges),
taken per record; numbers only (verdicts and patterns are `compare`'s business). A series is
(measure, quantity, framework, mode, variant, env): the variant is the measured config that
differs between the measure's records (`report.variant_keys`: model kind, precision, ...; keys
that only some records have, i.e. keys added to the config later, do not split a series), env
the record's environment (`records.env_name`: `framework.env`, else `env.env_name`, else "default"). The framework's version changes along a
series (a release is a point's label, and a step can appear at one); `--split-releases` makes
each version its own series instead. A point's x is the commit date of the commit its record was
measured at (`env.git_commit`), else the record's `created_at`.

Steps are change points of a series found by PELT (Killick et al. 2012, the `ruptures` package)
with an l2 cost and a BIC-like penalty 2 sigma^2 log n, sigma estimated robustly from the first
differences (MAD / 0.6745 / sqrt 2), so a step has to stand out of the series' own noise. A
series with fewer than MIN_POINTS points gets no step detection (the table says so).

Written into OUT (default ./history/, never into an input folder): history.csv (a row per
point), history.html (one file: plots inline as PNG data URIs, no script, nothing fetched).
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import html
import io
import json
import math
import re
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harness.measures import MEASURES
from harness.records import (
    RecordError,
    decode_nonfinite,
    env_name,
    measure_version,
    measured_config,
    read_record,
    schema_problem,
    write_atomic,
)
from harness.report import variant_keys, variant_of

#: a series needs this many points before steps are looked for
MIN_POINTS = 4
#: the penalty is PENALTY_K * sigma^2 * log(n) (BIC for one extra mean: 2 parameters per change)
PENALTY_K = 2.0
#: and a step must be at least this many sigmas
MIN_STEP_SIGMAS = 3.0
#: and significant: a two-sample t-test of the segments either side (their pooled sd, which a
#: handful of points cannot make small by chance as easily as a MAD), at this level split over
#: the n - 1 places a step could be (Bonferroni)
STEP_ALPHA = 0.05
#: sigma is at least this fraction of the series' median magnitude: a deterministic number (a
#: closed form, a seeded float32 run) whose last digits move is not a step (3 sigma = 0.3%)
REL_NOISE_FLOOR = 1e-3
#: the CSV's columns, in order
COLUMNS = ("measure", "quantity", "framework", "mode", "variant", "env", "framework_version", "commit", "date",
           "value", "source")
#: the columns that make a series (framework_version too with --split-releases)
SERIES = ("measure", "quantity", "framework", "mode", "variant", "env")
#: report.variant_keys' environment columns (and the config's environment): history has its own env and commit axes
_ENV_COLUMNS = ("version", "device", "cpu", "commit", "run", "seed", "env", "framework.env")


class HistoryError(Exception):
    """Input history cannot use (no records, a missing folder): one line for the user."""


# --- records, from the working tree and from git ----------------------------------------------


def _is_record_name(path: str) -> bool:
    """A name that may be a record (report's rules: not a job spec, checkpoint, temp or Hydra file)."""
    p = Path(path)
    return (p.suffix == ".json" and not p.name.startswith(".") and ".hydra" not in p.parts
            and not p.name.endswith((".job.json", ".partial.json")))


def _record_from_text(text: str, source: str) -> dict[str, Any] | None:
    """A record from a committed file's text, checked as `records.read_record` checks a file; None if it is not one."""
    try:
        rec = json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return None
    if schema_problem(rec):
        return None
    return {**rec, "metrics": decode_nonfinite(rec["metrics"]), "_file": source}


class Git:
    """One git work tree, read through `git cat-file --batch` (one process for many objects)
    with the answers cached: committed files and commit dates."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._objects: dict[str, str | None] = {}
        self.calls = 0

    @staticmethod
    def find(folder: Path) -> Git | None:
        """The work tree `folder` lies in, or None (not in one, or no git)."""
        try:
            out = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=folder, capture_output=True, text=True,
                                 timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return Git(Path(out.stdout.strip()).resolve()) if out.returncode == 0 and out.stdout.strip() else None

    def run(self, *args: str) -> str:
        self.calls += 1
        out = subprocess.run(["git", *args], cwd=self.root, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise HistoryError(f"git {' '.join(args[:2])} failed in {self.root}: {out.stderr.strip()[:200]}")
        return out.stdout

    def objects(self, names: Iterable[str]) -> dict[str, str | None]:
        """The contents of objects named `rev:path` or by commit id (None: missing), one batch for all not cached."""
        names = list(names)
        todo = [n for n in dict.fromkeys(names) if n not in self._objects and "\n" not in n]
        if todo:
            self.calls += 1
            out = subprocess.run(["git", "cat-file", "--batch"], cwd=self.root, input="".join(f"{n}\n" for n in todo).encode(),
                                 capture_output=True, timeout=300).stdout
            pos = 0
            for name in todo:
                end = out.index(b"\n", pos)
                head = out[pos:end].split()
                pos = end + 1
                if len(head) == 3 and head[2].isdigit():
                    size = int(head[2])
                    self._objects[name] = out[pos:pos + size].decode("utf-8", "replace")
                    pos += size + 1
                else:  # "<name> missing" or "ambiguous"
                    self._objects[name] = None
        return {n: self._objects.get(n) for n in names}

    def commit_dates(self, commits: Iterable[str]) -> dict[str, str]:
        """Commit id -> its committer date (ISO 8601, its own time zone), for the ids this repository has."""
        dates = {}
        for c, text in self.objects([c for c in commits if re.fullmatch(r"[0-9a-f]{7,40}", c)]).items():
            m = re.search(r"^committer .* (\d+) ([+-])(\d\d)(\d\d)$", text or "", re.M)
            if m:
                tz = _dt.timezone((1 if m[2] == "+" else -1) * _dt.timedelta(hours=int(m[3]), minutes=int(m[4])))
                dates[c] = _dt.datetime.fromtimestamp(int(m[1]), tz).isoformat()
        return dates

    def versions(self, folder: Path) -> list[tuple[str, str, str]]:
        """(commit, commit date, path from the root) of every committed version of a possible record file
        under `folder`, newest first: one `git log --name-only` for the folder."""
        rel = folder.resolve().relative_to(self.root)
        text = self.run("log", "--format=%x00%H%x09%cI", "--name-only", "--no-renames", "--", str(rel) or ".")
        out = []
        for block in text.split("\0")[1:]:
            head, _, names = block.partition("\n")
            commit, _, date = head.partition("\t")
            out += [(commit, date, n) for n in names.splitlines() if n.strip() and _is_record_name(n)]
        return out


def _identity(rec: dict[str, Any]) -> tuple[Any, ...]:
    """What makes two copies of a file one measurement: the same job of the same run."""
    return (rec["run_id"], rec["created_at"], rec["measure"], rec["framework"], rec["mode"])


def collect(dirs: Sequence[Path], use_git: bool | None = None) -> tuple[list[dict[str, Any]], list[str], Git | None]:
    """Every record under `dirs` (the working tree) and, with git (None: when the first folder is
    in a work tree), every committed version of the record files under them; one copy of each
    measurement (the working tree's, else the newest committed). Returns (records, notes, git)."""
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        raise HistoryError(f"no such folder: {', '.join(missing)}")
    git = Git.find(dirs[0]) if use_git is not False else None
    if use_git and git is None:
        raise HistoryError(f"--git: {dirs[0]} is not inside a git work tree")
    found: dict[tuple[Any, ...], dict[str, Any]] = {}
    notes: list[str] = []
    skipped = 0
    for d in dirs:
        for f in sorted(d.rglob("*.json")):
            if not _is_record_name(str(f.relative_to(d))):
                continue
            try:
                rec = read_record(f)
            except RecordError:
                skipped += 1
                continue
            rec["_source"] = str(f)
            found.setdefault(_identity(rec), rec)
    old = 0
    if git is not None:
        versions = [v for d in dirs if d.resolve().is_relative_to(git.root) for v in git.versions(d)]
        texts = git.objects(f"{c}:{p}" for c, _, p in versions)
        for c, _, p in versions:  # newest first: the newest committed copy of a measurement is kept
            committed = _record_from_text(texts[f"{c}:{p}"] or "", f"{c}:{p}")
            if committed is None:
                continue
            committed["_source"] = f"{c[:10]}:{p}"
            if _identity(committed) not in found:
                found[_identity(committed)] = committed
                old += 1
        notes.append(f"git: {len(versions)} committed versions of record files under {', '.join(map(str, dirs))}; "
                     f"{old} measurement(s) found only in git history")
    if skipped:
        notes.append(f"skipped {skipped} file(s) that are not records of this schema")
    return sorted(found.values(), key=lambda r: r["created_at"]), notes, git


# --- points -------------------------------------------------------------------------------------


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _variants(records: list[dict[str, Any]]) -> dict[int, str]:
    """id(record) -> its variant label: the measured config keys that differ between the
    records of its measure (report's `variant_keys`: the measure's version where it differs,
    model, data, optimizer, precision, threads), less the environment columns (history has its
    own), less the measure's own knobs (`measure.<name>.*`: how it measures, e.g. repeats; a
    change there is named at a step, `config changed`), less keys some records lack (a key the
    config gained later is not a different benchmark)."""
    out: dict[int, str] = {}
    for m in dict.fromkeys(r["measure"] for r in records):
        recs = [r for r in records if r["measure"] == m]
        keys = [k for k in variant_keys(recs) if k not in _ENV_COLUMNS and not k.startswith("measure.")]
        keys = [k for k in keys if k == "measure_version" or all(variant_of(r, [k])[k] is not None for r in recs)]
        for r in recs:
            v = variant_of(r, keys)
            out[id(r)] = ", ".join(f"{'v' if k == 'measure_version' else k + '='}{val}" for k, val in v.items()) or "-"
    return out


def _condensed(notes: list[str]) -> list[str]:
    """Notes of the same kind (the text after the file name) as one line with their count."""
    kinds: dict[str, list[str]] = {}
    for n in notes:
        src, _, why = n.partition(": ")
        kinds.setdefault(why, []).append(src)
    return [f"{len(srcs)} record version(s): {why}; e.g. {srcs[0]}" if len(srcs) > 1 else f"{srcs[0]}: {why}"
            for why, srcs in kinds.items()]


def points(records: list[dict[str, Any]], git: Git | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """One row (the CSV's COLUMNS) per numeric quantity of each ok record, and notes (records
    whose measure could not give its quantities)."""
    bad: list[str] = []
    commits = [str((r.get("env") or {}).get("git_commit") or "") for r in records]
    dates = git.commit_dates(c for c in commits if c) if git else {}
    variants = _variants(records)
    rows: list[dict[str, Any]] = []
    for r, commit in zip(records, commits):
        source = str(r.get("_source") or r.get("_file") or "?")
        module = MEASURES.get(r["measure"])
        if r["status"] != "ok" or module is None or module.compared is None:
            continue
        try:
            qs = module.compared([r])
        except Exception as exc:  # an old record the measure's current code cannot read: named, not fatal
            bad.append(f"{source}: {r['measure']} (version {measure_version(r)}) cannot read it: "
                       f"{type(exc).__name__}: {exc}")
            continue
        env = r.get("env") or {}
        prefix = f"{r['framework']}/{r['mode']} "
        for name, q in qs.items():
            value = _number(q.value)
            if value is None:
                continue
            rows.append({
                "measure": r["measure"],
                "quantity": name.removeprefix(prefix),
                "framework": r["framework"],
                "mode": r["mode"],
                "variant": variants[id(r)],
                "env": env_name(r),
                "framework_version": str(env.get("framework_version") or "-"),
                "commit": commit + ("+dirty" if commit and env.get("git_dirty") else ""),
                "date": dates.get(commit) or r["created_at"],
                "value": value,
                "source": source,
                "_config": measured_config(r),
            })
    rows.sort(key=lambda row: (*(str(row[k]) for k in SERIES), _time(row["date"]), row["source"]))
    return rows, _condensed(bad)


# --- steps ----------------------------------------------------------------------------------------


@dataclass
class Step:
    """A change in a series' level: at `index` (the first point after it)."""

    index: int
    before: float
    after: float

    @property
    def size(self) -> float:
        return self.after - self.before

    @property
    def relative(self) -> float:
        return self.size / abs(self.before) if self.before else math.inf if self.size else 0.0


def noise_sigma(y: np.ndarray) -> float:
    """A robust estimate of the noise sd of a piecewise-constant series: the MAD of its first
    differences / 0.6745 / sqrt(2) (a step changes one difference, not the median)."""
    d = np.diff(y)
    return float(np.median(np.abs(d - np.median(d))) / 0.6745 / math.sqrt(2)) if d.size else 0.0


def detect_steps(values: Sequence[float], min_points: int = MIN_POINTS) -> list[Step] | None:
    """The level changes of `values` (in order) by PELT with an l2 cost and the penalty
    PENALTY_K * sigma^2 * log(n), sigma = `noise_sigma` (at least REL_NOISE_FLOOR of the
    median magnitude); a change smaller than MIN_STEP_SIGMAS * sigma is dropped.
    None when the series is too short to tell a step from noise."""
    y = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    if y.size < min_points:
        return None
    sigma = max(noise_sigma(y), REL_NOISE_FLOOR * float(np.median(np.abs(y))), 1e-300)
    import ruptures

    ends = ruptures.Pelt(model="l2", min_size=2, jump=1).fit(y.reshape(-1, 1)).predict(
        pen=PENALTY_K * sigma**2 * math.log(y.size))
    cuts = [0, *ends]
    steps = []
    for a, b, c in zip(cuts, cuts[1:], cuts[2:]):
        left, right = y[a:b], y[b:c]
        before, after = float(np.mean(left)), float(np.mean(right))
        df = left.size + right.size - 2
        rss = float(np.sum((left - before) ** 2) + np.sum((right - after) ** 2))
        s = max(math.sqrt(rss / df) if df > 0 else 0.0, REL_NOISE_FLOOR * float(np.median(np.abs(y))), 1e-300)
        t = abs(after - before) / (s * math.sqrt(1 / left.size + 1 / right.size))
        from scipy.stats import t as student_t

        p = 2 * float(student_t.sf(t, df)) if df > 0 else 1.0
        if abs(after - before) >= MIN_STEP_SIGMAS * sigma and p < STEP_ALPHA / (y.size - 1):
            steps.append(Step(b, before, after))
    return steps


# --- output -----------------------------------------------------------------------------------------


def _short(commit: str) -> str:
    return commit[:8] + ("+" if commit.endswith("+dirty") else "") if commit else "-"


def series_of(rows: list[dict[str, Any]], split_releases: bool = False) -> dict[tuple[str, ...], list[dict[str, Any]]]:
    """Rows grouped into series (SERIES, + framework_version), each in time order."""
    key = (*SERIES, "framework_version") if split_releases else SERIES
    out: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in sorted(rows, key=lambda r: (_time(r["date"]), r["source"])):
        out.setdefault(tuple(str(row[k]) for k in key), []).append(row)
    return out


def _time(date: str) -> _dt.datetime:
    t = _dt.datetime.fromisoformat(date.replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=_dt.timezone.utc)


def step_table(series: dict[tuple[str, ...], list[dict[str, Any]]]) -> tuple[list[dict[str, Any]], int]:
    """A row per detected step; and how many series were too short to look at."""
    out, short = [], 0
    for key, rows in series.items():
        finite = [r for r in rows if math.isfinite(r["value"])]
        found = detect_steps([r["value"] for r in finite])
        if found is None:
            short += 1
            continue
        for s in found:
            at, prev = finite[s.index], finite[s.index - 1]
            changed = sorted(k for k in set(at["_config"]) & set(prev["_config"]) if at["_config"][k] != prev["_config"][k])
            out.append({**dict(zip(SERIES, key)), "before": s.before, "after": s.after, "change": s.size,
                        "relative": s.relative, "at commit": _short(at["commit"]), "at date": at["date"],
                        "release": at["framework_version"],
                        "release changed": at["framework_version"] != prev["framework_version"],
                        "config changed": ", ".join(f"{k}: {prev['_config'][k]} -> {at['_config'][k]}" for k in changed)
                        or "-", "points": len(finite)})
    return out, short


def _label(key: tuple[str, ...]) -> str:
    d = dict(zip(SERIES, key))
    return "/".join(x for x in (d["framework"], d["mode"]) if x) + ("" if d["env"] == "default" else f" [{d['env']}]") + \
        (f" {key[len(SERIES)]}" if len(key) > len(SERIES) else "")


def plot(title: str, lines: dict[tuple[str, ...], list[dict[str, Any]]], steps: list[dict[str, Any]]) -> bytes:
    """One small trend plot: a line per series (framework/mode/env), x = date; each commit's
    short id along the top, each line's framework version where it starts and where it changes;
    detected steps as dashed red lines."""
    from harness.plots import COLORS, pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    styles: dict[str, str] = {}
    commits: dict[str, Any] = {}
    try:
        for key, rows in lines.items():
            xs, ys = [_time(r["date"]) for r in rows], [r["value"] for r in rows]
            color = COLORS.get(key[2])
            style = styles.setdefault(key[2], "")
            styles[key[2]] += "x"  # a framework's second mode/env: another marker and dash
            marker, ls = "os^Dv<>"[len(style) % 7], ("-", "--", ":", "-.")[len(style) % 4]
            ax.plot(xs, ys, marker=marker, ls=ls, ms=4, lw=1, label=_label(key), color=color)
            release = None
            for x, y, r in zip(xs, ys, rows):  # the release where a line starts and where it changes
                if r["framework_version"] != release:
                    ax.annotate(r["framework_version"], (x, y), textcoords="offset points", xytext=(3, -8), fontsize=5,
                                color=color or "0.3")
                release = r["framework_version"]
                commits.setdefault(_short(r["commit"]), x)
        for text, x in commits.items():  # each commit once, along the top
            ax.annotate(text, (x, 1.0), xycoords=("data", "axes fraction"), xytext=(0, 2), textcoords="offset points",
                        fontsize=5, rotation=60, color="0.35")
        for s in steps:
            ax.axvline(_time(s["at date"]), color="#c00", ls="--", lw=0.8)
        ax.set_title(title, fontsize=8, pad=28)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        fig.autofmt_xdate()
        fig.subplots_adjust(left=0.1, right=0.77, top=0.8, bottom=0.2)  # fixed: tight_layout costs a draw
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        return buf.getvalue()
    finally:
        plt.close(fig)


def _cell(col: str, v: Any) -> str:
    if isinstance(v, float):
        return f"{v:+.1%}" if col == "relative" else f"{v:.4g}"
    return str(v)


def _html_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>(none)</p>"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{esc(_cell(c, r.get(c, '')))}</td>" for c in cols) + "</tr>" for r in rows)
    return f'<div class="t"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def page(rows: list[dict[str, Any]], series: dict[tuple[str, ...], list[dict[str, Any]]], steps: list[dict[str, Any]],
         short: int, notes: Sequence[str]) -> str:
    """history.html: one file, the plots inline (PNG data URIs), no script, nothing fetched."""
    esc = html.escape
    commits = {r["commit"] for r in rows}
    body = ["<h1>vaebench history</h1>",
            f"<p>{len(rows)} points in {len(series)} series from {len({r['source'] for r in rows})} record versions at "
            f"{len(commits)} commit(s); {len(steps)} step(s) detected. Series with fewer than {MIN_POINTS} points "
            f"({short}) get no step detection; a quantity none of whose series has two points is listed, not "
            "plotted. `vaebench history DIR...` rebuilds this page.</p>"]
    if notes:
        body.append("<ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")
    body += ["<h2>Detected steps</h2>",
             "<p>PELT (l2 cost), penalty 2&#963;&#178; log n, &#963; from the MAD of first differences; a step is "
             "shown at the first point after it (its commit and framework release).</p>", _html_table(steps)]
    by_quantity: dict[tuple[str, str, str], dict[tuple[str, ...], list[dict[str, Any]]]] = {}
    for key, srows in series.items():
        by_quantity.setdefault((key[0], key[4], key[1]), {})[key] = srows
    measure = None
    single: list[dict[str, Any]] = []
    for (m, variant, quantity), lines in sorted(by_quantity.items()):
        if m != measure:
            body.append(f'<h2 id="{esc(m)}">{esc(m)}</h2>')
            measure = m
        if all(len(v) < 2 for v in lines.values()):
            single += [{k: r[k] for k in COLUMNS if k != "source"} for v in lines.values() for r in v]
            continue
        title = f"{m}: {quantity}" + ("" if variant == "-" else f" [{variant}]")
        marks = [s for s in steps if (s["measure"], s["variant"], s["quantity"]) == (m, variant, quantity)]
        data = base64.b64encode(plot(title, lines, marks)).decode()
        n = sum(len(v) for v in lines.values())
        body.append(f'<figure><img alt="{esc(title)}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{esc(title)} ({n} points, {len(lines)} line(s), {len(marks)} step(s))</figcaption></figure>")
    body += ["<h2>Measured once</h2><p>Quantities with a single point per series (no trend yet).</p>",
             _html_table(single)]
    style = ("body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}"
             ".t{overflow-x:auto}img{max-width:100%}figure{display:inline-block;margin:4px}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>vaebench history</title>'
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    import pandas as pd

    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    write_atomic(path, frame.to_csv(index=False, float_format="%.17g").encode())


def build(dirs: Sequence[Path], out: Path, use_git: bool | None = None, split_releases: bool = False) -> dict[str, Any]:
    """Collect, compute and write history.csv and history.html into `out`; what was found."""
    records, notes, git = collect(dirs, use_git)
    if not records:
        raise HistoryError(f"no records under {', '.join(map(str, dirs))}")
    rows, more = points(records, git)
    notes += more
    if not rows:
        raise HistoryError(f"the records under {', '.join(map(str, dirs))} hold no numbers to follow")
    series = series_of(rows, split_releases)
    steps, short = step_table(series)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "history.csv", rows)
    write_atomic(out / "history.html", page(rows, series, steps, short, notes).encode())
    return {"records": len(records), "points": len(rows), "series": len(series), "steps": steps, "short": short,
            "notes": notes, "git_calls": git.calls if git else 0}


def main(argv: list[str] | None = None, prog: str = "vaebench history") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Exit codes: 0 written, 2 no records, a missing folder or bad arguments.")
    ap.add_argument("dirs", type=Path, nargs="+", metavar="DIR", help="folders searched recursively for records")
    ap.add_argument("-o", "--out", type=Path, default=Path("history"), help="output folder (default ./history; "
                    "never inside an input folder)")
    ap.add_argument("--git", action=argparse.BooleanOptionalAction, default=None,
                    help="also read every committed version of the record files (default: on inside a git work tree)")
    ap.add_argument("--split-releases", action="store_true", help="each framework version its own series")
    a = ap.parse_args(argv)
    inside = [d for d in a.dirs if d.is_dir() and a.out.resolve().is_relative_to(d.resolve())]
    if inside:
        print(f"{prog}: the output folder {a.out} is inside the input {inside[0]}: give -o elsewhere", file=sys.stderr)
        return 2
    try:
        found = build(a.dirs, a.out, a.git, a.split_releases)
    except HistoryError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    for n in found["notes"]:
        print(f"note: {n}")
    for s in found["steps"]:
        print(f"step: {s['measure']} {s['quantity']} {s['framework']}/{s['mode']} [{s['variant']}] "
              f"{s['before']:.4g} -> {s['after']:.4g} ({s['relative']:+.1%}) at {s['at commit']} ({s['release']})"
              + ("" if s["config changed"] == "-" else f"; config changed: {s['config changed']}"))
    print(f"history: {a.out / 'history.csv'}, {a.out / 'history.html'} ({found['records']} records, {found['points']} "
          f"points, {found['series']} series, {len(found['steps'])} steps; {found['short']} series too short for "
          f"step detection)")
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m harness.history"))

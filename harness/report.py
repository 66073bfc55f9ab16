"""Tables (Markdown, tidy CSV, LaTeX), plots (PNG), report.md and a self-contained report.html,
built from records alone, for one run or several runs and sweeps combined.

    vaebench report results/runs/<run>                 # rebuild that run's report in place
    vaebench report results/runs/a results/runs/b -o results/combined

Rows carry every config key that differs between the records combined and that their measure
reads (its READS), the measure's version where it differs (and the framework
version, device and commit where those differ for one framework); records that differ only in
their seed are aggregated to mean ± std. Of records with the same config (`records.config_hash`:
say a killed run and its resumed run) only the newest `ok` one is kept (else the newest), and the
report says which files it dropped; `--all-runs` keeps them all, told apart by a `run` column.
A record that is malformed or of another schema is skipped with a warning naming its file;
records are read as JSON, never evaluated. First, the jobs of runs whose `vaebench` was killed
get their `failed` records (`records.recover_stopped_runs`).
"""

from __future__ import annotations

import argparse
import base64
import csv
import datetime as _dt
import html
import io
import json
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tabulate import tabulate

from harness import measures
from harness.measures import MEASURES
from harness.measures.common import Num, Summary, by_framework
from harness.records import (
    config_hash,
    env_name,
    measure_version,
    measured_config,
    read_records,
    recover_stopped_runs,
    write_atomic,
)

#: environment facts that become columns when they differ for one framework: (column, env key)
ENV_COLUMNS = (("version", "framework_version"), ("device", "device_name"), ("cpu", "cpu_model"), ("commit", "git_commit"))
#: columns that name a row (rows of different seeds with the same names are aggregated)
LABELS = ("framework", "mode", "batch", "quantity", "dtype", "check")


@dataclass
class Table:
    """One measure's table over all the records combined."""

    measure: str
    title: str
    ok: bool
    rows: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)


# --- which records differ in what -----------------------------------------------------------


def _short(key: str, value: Any) -> Any:
    return value[:10] if key == "commit" and isinstance(value, str) else value


def variant_keys(records: Sequence[dict[str, Any]], by_run: bool = False) -> list[str]:
    """"measure_version" where the measure's versions differ, then the config keys (that the
    measure reads) whose values differ between `records`, then env columns that differ for one
    framework, then "env" where the environments that ran them differ (`framework.env`), then
    (`by_run`) "run" where run ids differ; "seed" (if it differs) last."""
    configs = [measured_config(r) for r in records]
    keys = sorted({k for c in configs for k in c})
    differ = ["measure_version"] if len({measure_version(r) for r in records}) > 1 else []
    differ += [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]
    for col, env_key in ENV_COLUMNS:
        per_fw: dict[str, set[str]] = {}
        for r in records:
            value = (r.get("env") or {}).get(env_key)
            if value is not None:  # a record the parent wrote for a dead job has no framework facts
                per_fw.setdefault(r["framework"], set()).add(str(value))
        if any(len(v) > 1 for v in per_fw.values()):
            differ.append(col)
    if len({env_name(r) for r in records}) > 1:  # run under different environments (framework.env)
        differ.append("env")
    if by_run and len({r["run_id"] for r in records}) > 1:
        differ.append("run")
    return [k for k in differ if k != "seed"] + (["seed"] if "seed" in differ else [])


def variant_of(rec: dict[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    cfg, env, cols = measured_config(rec), rec.get("env") or {}, dict(ENV_COLUMNS)
    special = {"run": rec["run_id"], "measure_version": measure_version(rec), "env": env_name(rec)}
    return {k: special[k] if k in special else _short(k, env.get(cols[k])) if k in cols else cfg.get(k) for k in keys}


def newest_per_config(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(kept, dropped): of records with the same `config_hash`, the newest `ok` one is kept, or
    the newest when none is ok. Records that differ in their seed differ in their hash."""
    best: dict[str, dict[str, Any]] = {}
    for r in sorted(records, key=lambda r: r["created_at"]):
        h = config_hash(r)
        if h not in best or r["status"] == "ok" or best[h]["status"] != "ok":
            best[h] = r
    kept = {id(r) for r in best.values()}
    return [r for r in records if id(r) in kept], [r for r in records if id(r) not in kept]


def _label(v: dict[str, Any]) -> str:
    return ", ".join(f"{k}={val}" for k, val in v.items())


# --- tables -----------------------------------------------------------------------------------


def summarize(measure: str, records: list[dict[str, Any]]) -> Summary:
    """The measure's own summary; a summary that raises becomes a failed one naming why (a
    report never dies of one odd record)."""
    try:  # the registry's summary: a non-finite judged quantity fails it, named (harness.judged)
        return measures.summarize(measure, records)  # type: ignore[no-any-return]
    except Exception as exc:  # the report must still be written, with the reason in it
        files = ", ".join(sorted({Path(r.get("_file", "?")).name for r in records}))
        return Summary(measure, [], False, [f"could not summarize {files}: {type(exc).__name__}: {exc}"])


def _aggregate(per_seed: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Rows of the same label across seeds -> one row; numbers become mean ± std."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for rows in per_seed:
        for row in rows:
            groups.setdefault(tuple(str(row.get(k)) for k in LABELS if k in row), []).append(row)
    out = []
    for rows in groups.values():
        agg: dict[str, Any] = {}
        for col in dict.fromkeys(k for row in rows for k in row):
            cells = [row.get(col, "-") for row in rows]
            nums = [c.raw for c in cells if isinstance(c, Num)]
            if len(rows) > 1 and len(nums) == len(cells):
                mean, std = float(np.mean(nums)), float(np.std(nums, ddof=1))
                agg[col] = Num(f"{mean:.4g} ± {std:.2g}", mean, std)
            else:
                agg[col] = cells[0] if len({str(c) for c in cells}) == 1 else " / ".join(dict.fromkeys(map(str, cells)))
        agg["seeds"] = len(rows)
        out.append(agg)
    return out


def measure_table(measure: str, records: list[dict[str, Any]], plot_dir: Path | None = None, by_run: bool = False) -> Table:
    """The measure's table over `records`: one block of rows per variant (the keys that differ,
    and the run with `by_run`), seeds aggregated; plots per variant into `plot_dir`."""
    keys = variant_keys(records, by_run)
    seeded = "seed" in keys
    outer = [k for k in keys if k != "seed"]
    variants: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        variants.setdefault(json.dumps(variant_of(r, outer), sort_keys=True, default=str), []).append(r)
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    ok, title = True, measure
    plots: list[Path] = []
    for vkey, recs in variants.items():
        v = json.loads(vkey)
        by_seed: dict[str, list[dict[str, Any]]] = {}
        for r in recs:
            by_seed.setdefault(str(variant_of(r, ["seed"])["seed"]) if seeded else "", []).append(r)
        sums = [summarize(measure, rs) for rs in by_seed.values()]
        title = sums[0].title
        ok = ok and all(s.ok for s in sums)
        body = _aggregate([s.rows for s in sums]) if seeded else sums[0].rows
        rows.extend({**v, **row} for row in body)
        prefix = f"[{_label(v)}] " if len(variants) > 1 else ""
        for s in sums:
            notes.extend(prefix + n for n in s.notes if prefix + n not in notes)
        if plot_dir is not None:
            slug = "-" + "-".join(str(x).replace("/", "_").replace(" ", "") for x in v.values()) if len(variants) > 1 else ""
            for name, fn in MEASURES[measure].PLOTS.items():
                path = plot_dir / (Path(name).stem + slug + Path(name).suffix)
                try:
                    made = fn(by_framework(recs), path)
                except Exception as exc:  # a plot that cannot be drawn is a note, not a lost report
                    notes.append(f"{prefix}plot {path.name} not drawn: {type(exc).__name__}: {exc}")
                    continue
                if made is not None:
                    plots.append(Path(made))
    if seeded:
        notes.append("rows aggregate seeds: numbers are mean ± standard deviation over the `seeds` runs")
    return Table(measure, title, ok and bool(rows or records), rows, notes, plots)


def tables(records: list[dict[str, Any]], plot_dir: Path | None = None, by_run: bool = False) -> list[Table]:
    return [measure_table(m, recs, plot_dir, by_run) for m in MEASURES if (recs := [r for r in records if r["measure"] == m])]


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(k for row in rows for k in row))


def render(t: Table, fmt: str = "github") -> str:
    """The table as Markdown (github), LaTeX or HTML; a missing cell is blank."""
    cols = _columns(t.rows)
    body = [[("" if row.get(c) in (None, "-") else str(row[c])) for c in cols] for row in t.rows]
    return tabulate(body, headers=cols, tablefmt=fmt, disable_numparse=True)


def tidy_csv(t: Table) -> str:
    """One tidy CSV: a row per table row, raw (unrounded) numbers, units in the column names,
    a `<column> std` beside a column that aggregates seeds; missing values empty."""
    cols: list[str] = []
    for c in _columns(t.rows):
        cols.append(c)
        if any(isinstance(row.get(c), Num) and row[c].std is not None for row in t.rows):
            cols.append(f"{c} std")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for row in t.rows:
        out: dict[str, Any] = {}
        for c, v in row.items():
            if isinstance(v, Num):
                out[c] = repr(v.raw)
                if v.std is not None:
                    out[f"{c} std"] = repr(v.std)
            else:
                out[c] = "" if v is None or v == "-" else v
        w.writerow(out)
    return buf.getvalue()


# --- environments -----------------------------------------------------------------------------


def environments(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per distinct environment the records ran in."""
    seen: dict[str, dict[str, Any]] = {}
    for r in by_framework(records):
        e = r.get("env") or {}
        row = {
            "framework": r["framework"],
            "version": e.get("framework_version", "-"),
            "device": e.get("device_name") or e.get("device") or "-",
            "cpu": e.get("cpu_model", "-"),
            "threads": e.get("threads", "-"),
            "python": e.get("python", "-"),
            "commit": _short("commit", e.get("git_commit") or "-") + (" (dirty)" if e.get("git_dirty") else ""),
        }
        key = json.dumps(row, sort_keys=True, default=str)
        seen.setdefault(key, {**row, "records": 0})["records"] += 1
    return list(seen.values())


# --- the whole report -------------------------------------------------------------------------


def answers(records: list[dict[str, Any]]) -> list[str]:
    """One line per question a measure answers (its QUESTION and answer(records))."""
    out = []
    names = [n for r in records for n in ((r.get("config") or {}).get("measure") or {}).get("names", [])]
    for name in dict.fromkeys([*(n for n in names if n in MEASURES), *MEASURES]):  # in the suite's order
        module = MEASURES[name]
        recs = [r for r in records if r["measure"] == name]
        if recs:
            try:
                out.append(f"{module.QUESTION} {measures.answer(name, recs)}")
            except Exception as exc:  # an answer that cannot be given says so
                out.append(f"{module.QUESTION} no answer ({type(exc).__name__}: {exc})")
    return out


def markdown(ts: list[Table], envs: list[dict[str, Any]], lines: list[str], out_dir: Path, notes: Sequence[str] = ()) -> str:
    n = sum(int(e["records"]) for e in envs)
    parts = ["# vaebench report", "", f"Built from {n} records alone (`vaebench report DIR` rebuilds it).", ""]
    if notes:
        parts += [*[f"- {x}" for x in notes], ""]
    if lines:
        parts += ["## Answers", "", *[f"- {x}" for x in lines], ""]
    parts += ["## Environments", "", tabulate(envs, headers="keys", tablefmt="github", disable_numparse=True), ""]
    parts += ["## Results", ""]
    for t in ts:
        parts += [f"### {t.title}: {'PASS' if t.ok else 'FAIL'}", "", render(t), ""]
        parts += [f"- {n}" for n in t.notes]
        parts += [""] + [f"![{p.stem}]({p.relative_to(out_dir) if p.is_relative_to(out_dir) else p})" for p in t.plots]
        parts.append("")
    return "\n".join(parts)


def page(ts: list[Table], envs: list[dict[str, Any]], lines: list[str], notes: Sequence[str] = ()) -> str:
    """report.html: one file, images inline, no script and nothing fetched."""
    esc = html.escape
    body = ["<h1>vaebench report</h1>"]
    if notes:
        body.append("<ul>" + "".join(f"<li>{esc(x)}</li>" for x in notes) + "</ul>")
    if lines:
        body.append("<h2>Answers</h2><ul>" + "".join(f"<li>{esc(x)}</li>" for x in lines) + "</ul>")
    body.append('<h2>Environments</h2><div class="t">' + tabulate(envs, headers="keys", tablefmt="html", disable_numparse=True) + "</div>")
    for t in ts:
        verdict = '<span class="pass">PASS</span>' if t.ok else '<span class="fail">FAIL</span>'
        body.append(f'<h2 id="{esc(t.measure)}">{esc(t.title)}: {verdict}</h2><div class="t">{render(t, "html")}</div>')
        if t.notes:
            body.append("<ul>" + "".join(f"<li>{esc(n)}</li>" for n in t.notes) + "</ul>")
        for p in t.plots:
            data = base64.b64encode(p.read_bytes()).decode()
            body.append(f'<figure><img alt="{esc(p.stem)}" src="data:image/png;base64,{data}"><figcaption>{esc(p.name)}</figcaption></figure>')
    style = ("body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}"
             ".t{overflow-x:auto}.pass{color:#080}.fail{color:#c00}img{max-width:100%}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>vaebench report</title>'
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def build(out_dir: Path, records: list[dict[str, Any]] | None = None, notes: Sequence[str] = (),
          by_run: bool = False) -> tuple[str, bool, list[Path]]:
    """Write per-measure tables (<measure>.md/.csv/.tex), plots, report.md and report.html
    into `out_dir` from `records` (default: the records under `out_dir`), with `notes` under
    the title and (`by_run`) a `run` column. Returns the Markdown text, whether every measure
    passed, and the plots."""
    records = read_records(out_dir) if records is None else records
    ts = tables(records, out_dir, by_run)
    envs, lines = environments(records), answers(records)
    for t in ts:
        write_atomic(out_dir / f"{t.measure}.md", (f"## {t.title}: {'PASS' if t.ok else 'FAIL'}\n\n{render(t)}\n\n"
                                                   + "".join(f"- {n}\n" for n in t.notes)).encode())
        write_atomic(out_dir / f"{t.measure}.csv", tidy_csv(t).encode())
        write_atomic(out_dir / f"{t.measure}.tex", (f"% {t.title}\n" + render(t, "latex") + "\n").encode())
    text = markdown(ts, envs, lines, out_dir, notes)
    write_atomic(out_dir / "report.md", text.encode())
    write_atomic(out_dir / "report.html", page(ts, envs, lines, notes).encode())
    return text, all(t.ok for t in ts), [p for t in ts for p in t.plots]


def console(text: str, out_dir: Path) -> str:
    """report.md's text for a terminal: each image tag `![name](path)` becomes `plot: path`."""
    return re.sub(r"^!\[[^\]]*\]\(([^)]*)\)$", lambda m: f"plot: {out_dir / m[1]}", text, flags=re.M)


def recover(paths: Sequence[Path], say_live: bool = True) -> None:
    """Give the jobs of stopped runs under `paths` their records (`records.recover_stopped_runs`),
    with one line per run recovered (and, `say_live`, per live run left alone)."""
    for p in paths:
        found, live = recover_stopped_runs(p)
        for run, n in found:
            print(f"recovered {run}: its vaebench was stopped; wrote {n} failed record(s) for the jobs it left "
                  "without one", flush=True)
        for run in live if say_live else []:
            print(f"note: {run} is still running (a vaebench holds its lock): its unfinished jobs are not in this "
                  "report", flush=True)


def _shown(file: str) -> str:
    """A record's file as the user named it: relative to the current folder when inside it."""
    path, here = Path(file), Path.cwd()
    return str(path.relative_to(here)) if path.is_relative_to(here) else file


def load(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """Records under each folder (recursively) or the given record files; bad files skipped
    with a warning naming them; the same file twice counts once."""
    seen: dict[str, dict[str, Any]] = {}
    for p in paths:
        for r in read_records(p if p.is_dir() else [p]):
            seen.setdefault(r["_file"], r)
    return sorted(seen.values(), key=lambda r: (r["created_at"], r["measure"], r["framework"]))


def main(argv: list[str] | None = None, prog: str = "vaebench report") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Exit codes: 0 every measure passed, 1 one failed, 2 no records or bad arguments.")
    ap.add_argument("dirs", type=Path, nargs="+", metavar="DIR", help="run or sweep folders (searched recursively) or record files")
    ap.add_argument("-o", "--out", type=Path, help="where to write the report (default: DIR when one is given, "
                    "else results/reports/<time>)")
    ap.add_argument("--format", choices=["github", "latex", "html"], default="github", help="table format printed")
    ap.add_argument("--all-runs", action="store_true", help="keep every record, with a `run` column (run_id) telling "
                    "runs apart; by default, of records with the same config only the newest ok one (else the newest) "
                    "is kept")
    a = ap.parse_args(argv)
    missing = [str(d) for d in a.dirs if not d.exists()]
    if missing:
        print(f"{prog}: no such folder or file: {', '.join(missing)}", file=sys.stderr)
        return 2
    recover(a.dirs)
    records = load(a.dirs)
    if not records:
        print(f"{prog}: no records under {', '.join(map(str, a.dirs))}", file=sys.stderr)
        return 2
    notes = []
    if not a.all_runs:
        records, dropped = newest_per_config(records)
        if dropped:
            notes.append(f"dropped {len(dropped)} record(s) of a config that a newer record has (the newest ok one "
                         f"is kept; `--all-runs` keeps every record): {', '.join(_shown(r['_file']) for r in dropped)}")
    out = a.out or (a.dirs[0] if len(a.dirs) == 1 and a.dirs[0].is_dir() else
                    Path("results/reports") / f"{_dt.datetime.now():%Y%m%d-%H%M%S}")
    text, ok, plots = build(out, records, notes, by_run=a.all_runs)
    print(console(text, out) if a.format == "github" else "\n\n".join(render(t, a.format) for t in tables(records, by_run=a.all_runs)))
    print(f"report: {out / 'report.md'}, {out / 'report.html'} ({len(records)} records, {len(plots)} plots)")
    for n in notes:
        print(f"note: {n}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(prog="python -m harness.report"))

"""Tables (Markdown, CSV, LaTeX) and plots (PNG) built from records alone.

    python -m harness.report results/runs/<run>      # rebuild summary.md, tables and plots
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path
from typing import Any

from tabulate import tabulate

from harness.measures import MEASURES
from harness.measures.common import Summary
from harness.records import read_records, write_atomic


def summaries(records: list[dict[str, Any]]) -> list[Summary]:
    out = []
    for measure, module in MEASURES.items():
        recs = [r for r in records if r["measure"] == measure]
        if recs:
            out.append(module.summarize(recs))
    return out


def table(s: Summary, fmt: str = "github") -> str:
    if fmt == "csv":
        buf = io.StringIO()
        if s.rows:
            w = csv.DictWriter(buf, fieldnames=list(s.rows[0]))
            w.writeheader()
            w.writerows(s.rows)
        return buf.getvalue()
    return tabulate(s.rows, headers="keys", tablefmt=fmt, disable_numparse=True)


def render(sums: list[Summary], fmt: str = "github") -> str:
    parts = []
    for s in sums:
        verdict = "PASS" if s.ok else "FAIL"
        parts.append(f"### {s.title}: {verdict}\n\n{table(s, fmt)}\n")
        parts.extend(f"- {n}" for n in s.notes)
        if s.notes:
            parts.append("")
    return "\n".join(parts)


def build(run_dir: Path, records: list[dict[str, Any]] | None = None) -> tuple[str, bool, list[Path]]:
    """Write summary.md, summary.csv, summary.tex and the plots into `run_dir`."""
    records = read_records(run_dir) if records is None else records
    sums = summaries(records)
    text = render(sums)
    write_atomic(run_dir / "summary.md", text.encode())
    write_atomic(run_dir / "summary.csv", "\n".join(f"# {s.title}\n{table(s, 'csv')}" for s in sums).encode())
    write_atomic(run_dir / "summary.tex", "\n\n".join(f"% {s.title}\n{table(s, 'latex')}" for s in sums).encode())
    plots = []
    for measure, module in MEASURES.items():
        recs = [r for r in records if r["measure"] == measure]
        plots += [p for name, fn in module.PLOTS.items() if recs and (p := fn(recs, run_dir / name)) is not None]
    return text, all(s.ok for s in sums), plots


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.report", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="folder holding the records (searched recursively)")
    ap.add_argument("--format", choices=["github", "csv", "latex"], default="github", help="table format to print")
    a = ap.parse_args(argv)
    if not a.run_dir.is_dir():
        print(f"report: no such folder: {a.run_dir}", file=sys.stderr)
        return 2
    records = read_records(a.run_dir)
    if not records:
        print(f"report: no records under {a.run_dir}", file=sys.stderr)
        return 2
    _, ok, plots = build(a.run_dir, records)
    print(render(summaries(records), a.format))
    for p in plots:
        print(f"plot: {p}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

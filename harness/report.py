"""Tables (Markdown, CSV, LaTeX) and plots (PNG) built from records alone.

    python -m harness.report results/runs/<run>      # rebuild summary.md, tables and plots
"""

from __future__ import annotations

import argparse
import csv
import importlib
import io
import sys
from pathlib import Path
from typing import Any

from tabulate import tabulate

from harness.config import MEASURES
from harness.measures.common import Summary
from harness.records import read_records, write_atomic


def summaries(records: list[dict[str, Any]]) -> list[Summary]:
    out = []
    for measure in MEASURES:
        recs = [r for r in records if r["measure"] == measure]
        if recs:
            module = importlib.import_module(f"harness.measures.{measure}")
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


def plot_convergence(records: list[dict[str, Any]], path: Path) -> Path | None:
    recs = [r for r in records if r["measure"] == "convergence" and r["metrics"].get("epochs")]
    if not recs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in recs:
        ep = r["metrics"]["epochs"]
        label = f"{r['framework']}/{r['mode']}"
        (line,) = a1.plot([e["epoch"] for e in ep], [e["test_elbo"] for e in ep], marker="o", label=f"{label} test")
        a1.plot([e["epoch"] for e in ep], [e["train_elbo"] for e in ep], ls="--", color=line.get_color(), label=f"{label} train")
        a2.plot([e["wall_s"] for e in ep], [e["test_elbo"] for e in ep], marker="o", color=line.get_color(), label=label)
    target = recs[0]["metrics"].get("target_elbo")
    for a in (a1, a2):
        if target is not None:
            a.axhline(target, color="grey", lw=0.8, ls=":")
        a.set_ylabel("ELBO (nats per example)")
        a.grid(alpha=0.3)
    a1.set_xlabel("epoch")
    a2.set_xscale("log")
    a2.set_xlabel("training wall time (s, log scale)")
    a1.set_title("ELBO per epoch")
    a2.set_title("test ELBO against time")
    a1.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buf.getvalue())
    return path


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buf.getvalue())
    return path


def plot_gradflow(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Heatmap of log10 gradient norm, parts x blocks, one panel per framework; exact zeros
    are shown as such (not as a colour)."""
    recs = [r for r in records if r["measure"] == "gradflow" and r["status"] == "ok"]
    if not recs:
        return None
    import numpy as np

    plt = _pyplot()
    parts, blocks = ["loss", "recon", "kl"], ["encoder", "decoder"]
    fig, axes = plt.subplots(1, len(recs), figsize=(3.6 * len(recs) + 0.8, 3.4), squeeze=False)
    im = None
    allnorms = [r["metrics"]["matrix"][p][b]["norm"] for r in recs for p in parts for b in blocks]
    positive = [n for n in allnorms if n > 0] or [1.0]
    vmin, vmax = np.log10(min(positive)) - 0.5, np.log10(max(positive)) + 0.5
    for ax, r in zip(axes[0], recs):
        norms = np.array([[r["metrics"]["matrix"][p][b]["norm"] for b in blocks] for p in parts])
        with np.errstate(divide="ignore"):
            logn = np.where(norms > 0, np.log10(np.where(norms > 0, norms, 1.0)), np.nan)
        im = ax.imshow(logn, cmap="viridis", vmin=vmin, vmax=vmax)
        for i in range(len(parts)):
            for j in range(len(blocks)):
                txt = "0 (exact)" if norms[i, j] == 0 else f"{norms[i, j]:.2g}"
                ax.text(j, i, txt, ha="center", va="center", color="white" if norms[i, j] == 0 else "black", fontsize=9,
                        bbox={"facecolor": "black" if norms[i, j] == 0 else "white", "alpha": 0.6, "lw": 0})
        ax.set_xticks(range(len(blocks)), blocks)
        ax.set_yticks(range(len(parts)), parts)
        v = r["metrics"]["verdict"]
        ax.set_title(f"{r['framework']}: {'matches theory' if v['matches_theory'] else 'DOES NOT match theory'}", fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=axes[0].tolist(), label="log10 gradient L2 norm", shrink=0.8)
    fig.suptitle("Gradient of each ELBO part reaching each block", fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_atomic(path, buf.getvalue())
    return path


def plot_gradflow_training(records: list[dict[str, Any]], path: Path) -> Path | None:
    recs = [r for r in records if r["measure"] == "gradflow" and r["metrics"].get("history")]
    if not recs:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    for ax, key in zip(axes, ["loss/encoder", "loss/decoder", "recon/encoder"]):
        for r in recs:
            h = r["metrics"]["history"]
            ax.plot([e["step"] for e in h], [max(e[key], 1e-30) for e in h], marker=".", label=r["framework"])
        ax.set_yscale("log")
        ax.set_title(f"|d {key.split('/')[0]} / d {key.split('/')[1]}|")
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("gradient L2 norm")
    axes[0].legend()
    return _save(fig, path)


PLOTS = {
    "convergence.png": plot_convergence,
    "gradflow.png": plot_gradflow,
    "gradflow_training.png": plot_gradflow_training,
}


def build(run_dir: Path, records: list[dict[str, Any]] | None = None) -> tuple[str, bool, list[Path]]:
    """Write summary.md, summary.csv, summary.tex and the plots into `run_dir`."""
    records = read_records(run_dir) if records is None else records
    sums = summaries(records)
    text = render(sums)
    write_atomic(run_dir / "summary.md", text.encode())
    write_atomic(run_dir / "summary.csv", "\n".join(f"# {s.title}\n{table(s, 'csv')}" for s in sums).encode())
    write_atomic(run_dir / "summary.tex", "\n\n".join(f"% {s.title}\n{table(s, 'latex')}" for s in sums).encode())
    plots = [p for name, fn in PLOTS.items() if (p := fn(records, run_dir / name)) is not None]
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

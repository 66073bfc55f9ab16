"""Sweeps through Hydra's launchers: a combined report, resume, refusals, logs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from harness.records import read_records, write_record
from tests.conftest import FRAMEWORKS, ROOT

QUICK = ("+experiment=quick", "measure.convergence.epochs=1", "progress=false")


def _vaebench(*args: str, out: Path, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "harness.cli", *args, f"out_dir={out}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_joblib_sweep_has_one_combined_report_and_resumes(tmp_path: Path) -> None:
    """Every framework x 2 latent sizes under joblib: a combined report with a row each. With one
    job turned into a failure, a rerun with resume=true runs only that job."""
    out = tmp_path / "runs"
    n = 2 * len(FRAMEWORKS)
    sweep = ("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"framework={','.join(FRAMEWORKS)}", "model.latent=2,8")
    r = _vaebench(*sweep, *QUICK, out=out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    sweep_dir = next(out.glob("multirun-*"))
    tidy = pd.read_csv(sweep_dir / "convergence.csv")
    assert len(tidy) == n and sorted(set(tidy["model.latent"])) == [2, 8]
    assert (sweep_dir / "report.html").exists() and f"sweep report ({n} records: {n} ok" in r.stdout
    assert "sweep: " in r.stdout and " left | [1/1]" in r.stdout  # the progress line
    assert "recovered" not in r.stdout  # runs side by side are live: none finalizes another's jobs
    # `vaebench report` over the sweep folder gives the same table
    rebuilt = tmp_path / "rebuilt"
    assert subprocess.run([sys.executable, "-m", "harness.cli", "report", str(sweep_dir), "-o", str(rebuilt)],
                          cwd=ROOT, capture_output=True).returncode == 0
    assert (rebuilt / "convergence.md").read_text() == (sweep_dir / "convergence.md").read_text()
    # one job failed (as a kill leaves it): resume reruns just that one
    victim = next(x for x in read_records(sweep_dir) if x["framework"] == FRAMEWORKS[-1] and x["config"]["model"]["latent"] == 8)
    write_record(Path(victim["_file"]), {**victim, "status": "failed", "error": "worker died of SIGKILL"})
    again = _vaebench(*sweep, *QUICK, "resume=true", out=out)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("resume: skipped 1 of 1 jobs") == n - 1 and again.stdout.count("resume: skipped 0 of 1 jobs") == 1
    new_sweep = max(out.glob("multirun-*"), key=lambda p: p.stat().st_mtime)
    recs = read_records(new_sweep)
    assert len(recs) == n and all(x["status"] == "ok" for x in recs)
    assert len({x["run_id"] for x in recs}) == n  # the adopted records keep their own run ids


@pytest.mark.slow
def test_submitit_local_sweep_of_two_tiny_jobs(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    r = _vaebench("-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "framework=torch",
                  "model.latent=2,4", *QUICK, out=out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    sweep_dir = next(out.glob("multirun-*"))
    recs = read_records(sweep_dir)
    assert len(recs) == 2 and all(x["status"] == "ok" for x in recs)
    assert (sweep_dir / ".submitit").is_dir()  # it really went through submitit
    assert len(pd.read_csv(sweep_dir / "convergence.csv")) == 2


def test_parallel_throughput_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    r = _vaebench("-m", "hydra/launcher=joblib", "measure=throughput", "framework=torch,jax", out=out)
    assert r.returncode == 2 and "hydra/launcher: joblib runs jobs side by side" in r.stderr
    assert "parallel_throughput=true" in r.stderr and not out.exists()


@pytest.mark.slow
def test_the_log_holds_what_the_run_printed_and_no_bars(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    r = _vaebench("framework=torch", "+experiment=quick", "measure.convergence.epochs=1", out=out)  # progress=true
    assert r.returncode == 0, r.stderr[-2000:]
    log = next(out.glob("*/cli.log")).read_text()
    assert "[1/1] convergence: torch" in log and "Answers:" in log and "### Convergence" in log
    assert "\r" not in r.stderr and "it/s" not in r.stderr  # no progress bars in a redirected log


@pytest.mark.slow
def test_a_sweep_with_a_failed_job_exits_1_and_reports_it(tmp_path: Path) -> None:
    """One diverging job in a sweep: the others finish, the combined report has both rows, and
    the sweep's exit code is 1 (set by the callback, also under `python -m harness.cli`)."""
    out = tmp_path / "runs"
    r = _vaebench("-m", "framework=torch", "optim=sgd", "optim.lr=0.01,1e6", *QUICK, out=out)
    assert r.returncode == 1, r.stdout[-3000:]
    sweep_dir = next(out.glob("multirun-*"))
    assert sorted(x["status"] for x in read_records(sweep_dir)) == ["diverged", "ok"]
    tidy = pd.read_csv(sweep_dir / "convergence.csv")
    assert sorted(tidy["status"]) == ["diverged", "ok"] and "optim.lr" in tidy.columns
    assert "1 not ok" in r.stdout

"""End to end: the CLI in a subprocess, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from harness import report
from harness.frameworks import registry
from harness.records import REQUIRED, read_records
from tests.conftest import FRAMEWORKS, ROOT


def test_convergence_end_to_end_torch(cli) -> None:  # type: ignore[no-untyped-def]
    r = cli("framework=torch", "+experiment=quick", "measure.convergence.target_elbo=-34")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Convergence" in r.stdout and "| torch" in r.stdout
    recs = read_records(cli.out_dir)
    assert len(recs) == 1
    rec = recs[0]
    assert all(k in rec for k in REQUIRED)
    assert rec["status"] == "ok" and rec["framework"] == "torch" and rec["measure"] == "convergence"
    m = rec["metrics"]
    assert [e["epoch"] for e in m["epochs"]] == [1, 2]
    assert all(e["test_elbo"] < 0 and e["train_elbo"] < 0 for e in m["epochs"])
    # time to target = training wall time at the end of the first epoch whose test ELBO reaches it
    reached = [e for e in m["epochs"] if e["test_elbo"] >= -34]
    assert reached and m["time_to_target_s"] == reached[0]["wall_s"]
    assert m["epochs"][0]["wall_s"] < m["epochs"][1]["wall_s"] == m["train_wall_s"]
    # the IWAE bound is at least the ELBO on average (importance sampling tightens it)
    assert m["test_log_likelihood"] >= m["epochs"][-1]["test_elbo"] - 3 * m["test_log_likelihood_se"]
    assert rec["config"]["framework"]["name"] == "torch"
    assert rec["env"]["framework_version"] and rec["env"]["python"]
    assert rec["env"]["compile_cache"] == "cold"  # a fresh torch.compile cache per job
    run_dir = next(Path(cli.out_dir).glob("*/"))
    assert (run_dir / "convergence.png").stat().st_size > 1000
    # the terminal gets plain `plot:` lines; report.md keeps its image tags
    assert "![" not in r.stdout and f"plot: {run_dir / 'convergence.png'}" in r.stdout
    assert "![convergence](convergence.png)" in (run_dir / "report.md").read_text()
    # tables are rebuilt from the records alone
    again = subprocess.run([sys.executable, "-m", "harness.report", str(run_dir)], cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0
    assert again.stdout.split("\nreport: ")[0].strip() == report.console((run_dir / "report.md").read_text(), run_dir).strip()


def test_failed_job_still_finishes_with_record(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A framework that cannot be imported gives an `unavailable` record; the others run."""
    *others, broken = FRAMEWORKS
    module = registry()[broken].module
    fake = tmp_path / "fake"
    (fake / module).mkdir(parents=True)
    (fake / module / "__init__.py").write_text(f"raise ImportError('simulated: {module} is broken')\n")
    r = cli("framework=all", "+experiment=quick", "measure.convergence.epochs=1", env={"PYTHONPATH": str(fake)})
    assert r.returncode == 1
    recs = {x["framework"]: x for x in read_records(cli.out_dir)}
    assert set(recs) == set(FRAMEWORKS)
    assert recs[broken]["status"] == "unavailable" and "simulated" in recs[broken]["error"]
    assert all(recs[f]["status"] == "ok" for f in others), {f: recs[f]["error"] for f in others}
    assert "unavailable" in r.stdout


def test_diverged_training_is_reported(cli) -> None:  # type: ignore[no-untyped-def]
    r = cli("framework=torch", "+experiment=quick", "optim=sgd", "optim.lr=1e6")
    assert r.returncode == 1
    rec = read_records(cli.out_dir)[0]
    assert rec["status"] == "diverged" and "nan" in rec["error"].lower()
    json.dumps(rec)  # still a valid record


def test_ctrl_c_stops_the_suite_and_keeps_a_record(tmp_path: Path) -> None:
    """SIGINT while a job runs: the job gets a `failed` record saying so, no further job starts
    and each gets a `failed` record saying it was not started, the report is still written,
    exit code 130."""
    import os
    import signal
    import time

    out = tmp_path / "runs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "framework=all", "measure=convergence", "measure.convergence.epochs=100000",
         f"out_dir={out}", "progress=false"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        # as from a terminal: a shell's background job (a CI script started with `&`) ignores SIGINT
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout is not None
    first, *rest_fw = FRAMEWORKS
    assert proc.stdout.readline().startswith(f"[1/{len(FRAMEWORKS)}]")
    time.sleep(8)  # the first framework's job is training
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, rest
    recs = {x["framework"]: x for x in read_records(out)}
    assert set(recs) == set(FRAMEWORKS) and all(x["status"] == "failed" for x in recs.values())
    assert recs[first]["error"].startswith("interrupted by the user (SIGINT)"), recs[first]["error"]
    for fw in rest_fw:
        assert recs[fw]["error"] == "not started: the run was stopped by SIGINT before this job began"
    assert f"[2/{len(FRAMEWORKS)}]" not in rest
    assert (next(out.glob("*/")) / "report.md").exists()


def test_mnist_from_a_local_file(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import numpy as np

    rng = np.random.default_rng(0)
    path = tmp_path / "mnist.npz"
    np.savez(path, x_train=rng.integers(0, 256, (256, 28, 28), dtype=np.uint8), x_test=rng.integers(0, 256, (64, 28, 28), dtype=np.uint8))
    r = cli("framework=torch", "+experiment=quick", "data=mnist", f"data.path={path}", "model.hidden=[32]")
    assert r.returncode == 0, r.stderr[-2000:]
    rec = read_records(cli.out_dir)[0]
    assert rec["metrics"]["n_train"] == 256 and rec["metrics"]["n_test"] == 64
    assert rec["config"]["data"]["path"] == str(path)


def test_threads_limit_the_job_to_that_many_cores(cli) -> None:  # type: ignore[no-untyped-def]
    import os

    r = cli("framework=jax", "+experiment=quick", "measure.convergence.epochs=1", "framework.threads=1")
    assert r.returncode == 0, r.stderr[-2000:]
    env = read_records(cli.out_dir)[0]["env"]
    assert env["cpu_affinity"] == sorted(os.sched_getaffinity(0))[:1]
    assert env["thread_env"]["OMP_NUM_THREADS"] == "1"

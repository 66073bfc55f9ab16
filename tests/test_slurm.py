"""vaebench on a real SLURM cluster: a single-node cluster of the test session's own
(`scripts/slurm-local`, the `slurm_cluster` fixture), sweeps submitted through
`hydra/launcher=slurm`, and what cancelled, timed-out and node-lost tasks leave; plus the
pieces that need no cluster (how a stop's reason is read, the throughput refusal)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from harness import slurm
from harness.cli import prevalidate
from harness.config import ConfigError, register
from harness.job import Job, checkpoint, write_spec
from harness.records import read_record
from tests.conftest import ROOT, SLURM_LOCAL

SWEEP = ("-m", "hydra/launcher=slurm", "framework=torch,tensorflow,jax", "model.latent=2,8", "+experiment=quick",
         "hydra.launcher.cpus_per_task=1", "hydra.launcher.poll_s=1")


# --- without a cluster ------------------------------------------------------------------------


def test_array_indices_and_slurm_times_are_read_as_slurm_writes_them() -> None:
    assert slurm._indices("3") == [3]
    assert slurm._indices("[2-5%6]") == [2, 3, 4, 5]
    assert slurm._indices("1,3-4") == [1, 3, 4]
    assert slurm._seconds("00:01:13") == 73
    assert slurm._seconds("1-02:00:05") == 93605
    assert slurm._seconds("05:30") == 330
    assert slurm._seconds("UNLIMITED") is None


@pytest.mark.parametrize(("info", "says"), [
    ({"JobState": "COMPLETING", "Reason": "None", "RunTime": "00:00:05", "TimeLimit": "01:00:00"}, "cancelled (scancel)"),
    ({"JobState": "COMPLETING", "Reason": "TimeLimit", "RunTime": "00:01:13", "TimeLimit": "00:01:00"},
     "it reached its SLURM time limit (00:01:00, TIMEOUT)"),
    ({"JobState": "NODE_FAIL", "RunTime": "00:00:40", "TimeLimit": "01:00:00"}, "its node failed (NODE_FAIL)"),
    ({"JobState": "PREEMPTED", "RunTime": "00:00:40", "TimeLimit": "UNLIMITED"}, "it was pre-empted (PREEMPTED)"),
    ({"JobState": "RUNNING", "RunTime": "00:00:40", "TimeLimit": "UNLIMITED"}, "signalled by SLURM or a user while RUNNING"),
])
def test_a_stop_is_named_from_the_controllers_view(monkeypatch: pytest.MonkeyPatch, info: dict[str, str], says: str) -> None:
    """The state `scontrol` shows when SLURM's SIGTERM arrives (read from a real cluster: a
    cancelled task is COMPLETING within its limit, a timed-out one COMPLETING past it)."""
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "40")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURMD_NODENAME", "n7")
    monkeypatch.setattr(slurm, "_scontrol", lambda job: [info] if job == "41" else [])
    assert slurm.stop_reason("SIGTERM") == f"SLURM task 40_1 on node n7: {says}"
    assert "time limit is near" in slurm.stop_reason("SIGUSR2")
    assert slurm.facts()["slurm"] == {"job_id": "40_1", "raw_job_id": "41", "node": "n7", "partition": None,
                                      "cluster": None, "cpus_on_node": None}


def test_outside_slurm_nothing_is_said_or_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(key, raising=False)
    assert slurm.stop_reason("SIGTERM") == ""
    assert slurm.facts() == {}
    assert not slurm.in_task()


def test_close_task_run_gives_the_unfinished_job_a_record_naming_the_tasks_end(tmp_path: Path) -> None:
    """What the launcher does for a task that ended without finishing: the job's record is
    `failed`, keeps the metrics it had saved, says how the task ended and names the task."""
    run = tmp_path / "0"
    job = Job("r1", "convergence", "torch", "eager", {"seed": 0}, str(run / "convergence-torch-eager-float32.json"))
    write_spec(run / "jobs" / f"{job.name}.job.json", job, started=True)
    checkpoint(job, {"epochs": [{"epoch": 1, "test_elbo": -40.0}]})
    why = slurm.describe("9_0", {"state": "NODE_FAIL", "reason": "None", "node": "n3"})
    assert why == "SLURM task 9_0 on node n3: its node failed (NODE_FAIL)"
    assert slurm.close_task_run(run, why, ["framework=torch"], {"job_id": "9_0", "node": "n3", "state": "NODE_FAIL"})
    rec = read_record(Path(job.record_path))
    assert rec["status"] == "failed" and rec["error"].startswith(why)
    assert rec["metrics"]["partial"] is True and rec["metrics"]["epochs"][0]["test_elbo"] == -40.0
    assert rec["env"]["slurm"] == {"job_id": "9_0", "node": "n3", "state": "NODE_FAIL"}
    assert not slurm.close_task_run(tmp_path / "never-began", why, ["framework=jax"], {})  # nothing to close: the sweep fails


@pytest.mark.parametrize(("extra", "refused"), [
    ((), True),
    (("hydra.launcher.exclusive=true",), False),
    (("parallel_throughput=true",), False),
])
def test_throughput_on_a_cluster_needs_a_node_of_its_own(extra: tuple[str, ...], refused: bool) -> None:
    register()
    args = ["-m", "hydra/launcher=slurm", "measure=throughput", "framework=torch,jax", *extra]
    if refused:
        with pytest.raises(ConfigError, match=r"may put two tasks on one node.*hydra\.launcher\.exclusive=true"):
            prevalidate(args)
    else:
        assert prevalidate(args) == 2


# --- on the local cluster ---------------------------------------------------------------------


def _start(args: tuple[str, ...], out: Path, env: dict[str, str]) -> tuple[subprocess.Popen[str], Path]:
    log = out.parent / f"{out.name}.log"
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", *args, f"out_dir={out}", "progress=false"], cwd=ROOT,
                            env={**env, "PYTHONUNBUFFERED": "1"}, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)
    return proc, log


def _wait_for(what: str, cond: Any, timeout: float, proc: subprocess.Popen[str] | None = None) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = cond()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.5)
    raise AssertionError(f"no {what} within {timeout} s")


def _array_job(log: Path) -> str:
    found = re.search(r"as array job (\d+)", log.read_text())
    return found.group(1) if found else ""


def _sweep_records(out: Path) -> tuple[Path, dict[str, dict[str, Any]]]:
    (sweep,) = sorted(out.glob("multirun-*"))
    return sweep, {p.parent.name: read_record(p) for p in sorted(sweep.glob("*/*.json"))}


def _finish(proc: subprocess.Popen[str], log: Path, timeout: float = 300) -> tuple[int, str]:
    rc = proc.wait(timeout=timeout)
    return rc, log.read_text()


def test_a_sweep_runs_one_slurm_task_per_config_and_reports_when_the_last_ends(slurm_cluster: dict[str, str],
                                                                               tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    rc, text = _finish(*_start(SWEEP, out, slurm_cluster))
    assert rc == 0, text[-3000:]
    sweep, recs = _sweep_records(out)
    assert sorted(recs) == ["0", "1", "2", "3", "4", "5"] and all(r["status"] == "ok" for r in recs.values())
    array = _array_job(out.parent / "sweep.log")
    ids = {r["env"]["slurm"]["job_id"] for r in recs.values()}
    assert ids == {f"{array}_{i}" for i in range(6)}  # one task per config, each record names its own
    assert {r["env"]["slurm"]["node"] for r in recs.values()} == {socket.gethostname().split(".")[0]}
    assert {(r["framework"], r["config"]["model"]["latent"]) for r in recs.values()} == {
        (f, z) for f in ("torch", "tensorflow", "jax") for z in (2, 8)}
    assert (sweep / "report.md").is_file() and (sweep / "report.html").is_file()
    assert "sweep report (6 records: 6 ok, 0 not ok)" in text


def test_scancel_of_one_task_leaves_a_partial_failed_record_and_resume_reruns_only_it(slurm_cluster: dict[str, str],
                                                                                      tmp_path: Path) -> None:
    out = tmp_path / "cancel"
    args = (*SWEEP, "measure.convergence.epochs=40")
    proc, log = _start(args, out, slurm_cluster)
    _wait_for("partial metrics of task 0", lambda: list(out.glob("multirun-*/0/*.partial")), 240, proc)
    array = _array_job(log)
    subprocess.run(["scancel", f"{array}_0"], env=slurm_cluster, check=True)
    rc, text = _finish(proc, log)
    assert rc == 1, text[-3000:]
    _, recs = _sweep_records(out)
    assert [k for k, r in recs.items() if r["status"] == "ok"] == ["1", "2", "3", "4", "5"]
    failed = recs["0"]
    assert failed["status"] == "failed"
    assert f"SLURM task {array}_0 on node" in failed["error"] and "cancelled (scancel)" in failed["error"]
    assert failed["metrics"]["partial"] is True and failed["metrics"]["runs"], failed["metrics"]  # what it reached
    assert failed["env"]["slurm"]["job_id"] == f"{array}_0"

    rc, text = _finish(*_start((*args, "resume=true"), out, slurm_cluster))
    assert rc == 0, text[-3000:]
    new = sorted(out.glob("multirun-*"))[-1]
    recs2 = {p.parent.name: read_record(p) for p in sorted(new.glob("*/*.json"))}
    assert len(recs2) == 6 and all(r["status"] == "ok" for r in recs2.values())
    reran = {k for k, r in recs2.items() if r["env"]["slurm"]["job_id"].split("_")[0] != array}
    assert reran == {"0"}, {k: r["env"]["slurm"]["job_id"] for k, r in recs2.items()}  # only the cancelled job ran again
    said = [(r / "cli.log").read_text() for r in sorted(new.iterdir()) if (r / "cli.log").is_file()]
    assert sum("resume: skipped 1 of 1 jobs" in t for t in said) == 5, said


def test_a_task_past_its_time_limit_says_so_and_keeps_what_it_reached(slurm_cluster: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "timeout"
    args = ("-m", "hydra/launcher=slurm", "framework=torch", "+experiment=quick", "measure.convergence.epochs=100000",
            "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=1", "hydra.launcher.poll_s=1")
    rc, text = _finish(*_start(args, out, slurm_cluster))
    assert rc == 1, text[-3000:]
    _, recs = _sweep_records(out)
    rec = recs["0"]
    assert rec["status"] == "failed" and "it reached its SLURM time limit (00:01:00, TIMEOUT)" in rec["error"], rec["error"]
    assert rec["metrics"]["partial"] is True


def test_a_lost_node_leaves_a_record_that_says_so(slurm_cluster: dict[str, str], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """slurmd stopped mid-task: the controller declares the node DOWN and the task NODE_FAIL;
    when slurmd comes back it ends the orphaned task. Its job's record says the node failed."""
    monkeypatch.setenv("SLURM_CONF", slurm_cluster["SLURM_CONF"])  # this process asks the controller too
    out = tmp_path / "node"
    args = ("-m", "hydra/launcher=slurm", "framework=torch", "+experiment=quick", "measure.convergence.epochs=100000",
            "hydra.launcher.cpus_per_task=1", "hydra.launcher.poll_s=1")
    proc, log = _start(args, out, slurm_cluster)
    _wait_for("partial metrics", lambda: list(out.glob("multirun-*/0/*.partial")), 240, proc)
    job = _array_job(log)
    subprocess.run([str(SLURM_LOCAL), "stop-node"], env=slurm_cluster, check=True)
    try:
        _wait_for("NODE_FAIL", lambda: slurm.states([job]).get(job, {}).get("state") == "NODE_FAIL", 120)
    finally:
        subprocess.run([str(SLURM_LOCAL), "start-node"], env=slurm_cluster, check=True)
    rc, text = _finish(proc, log)
    assert rc == 1, text[-3000:]
    _, recs = _sweep_records(out)
    rec = recs["0"]
    assert rec["status"] == "failed" and "its node failed (NODE_FAIL)" in rec["error"], rec["error"]
    assert rec["metrics"]["partial"] is True


def test_the_cluster_script_reports_a_cluster_that_is_not_up(tmp_path: Path) -> None:
    env = {**os.environ, "SLURM_LOCAL_DIR": str(tmp_path / "none")}
    down = subprocess.run([str(SLURM_LOCAL), "status"], env=env, capture_output=True, text=True)
    assert down.returncode == 1 and "slurmctld: not running" in down.stdout
    usage = subprocess.run([str(SLURM_LOCAL)], env=env, capture_output=True, text=True)
    assert usage.returncode == 2 and "start" in usage.stdout and "stop-node" in usage.stdout


def test_without_a_slurm_client_the_sweep_is_refused_before_anything_runs(monkeypatch: pytest.MonkeyPatch,
                                                                          tmp_path: Path) -> None:
    register()
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    with pytest.raises(ConfigError, match=r"slurm submits with sbatch, which is not on PATH"):
        prevalidate(["-m", "hydra/launcher=slurm", "framework=torch,jax", "+experiment=quick"])


def test_a_cluster_that_cannot_be_reached_gives_one_line_and_leaves_nothing(slurm_cluster: dict[str, str],
                                                                            tmp_path: Path) -> None:
    broken = tmp_path / "slurm.conf"
    broken.write_text("")  # sbatch cannot read a cluster from it (a missing file: it retries for a minute)
    env = {**slurm_cluster, "SLURM_CONF": str(broken)}
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "harness.cli", "-m", "hydra/launcher=slurm", "framework=torch,jax",
                        "+experiment=quick", f"out_dir={out}", "progress=false"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("vaebench: slurm: sbatch refused the sweep, nothing was run: ")
    assert "Traceback" not in r.stderr
    assert not list(out.glob("multirun-*"))  # no empty sweep folder left behind

"""Faults, each injected on purpose, and what survives them: a worker killed mid-run, a job over
its timeout, a job interrupted, a job out of memory, a loss that turns NaN, a framework that is
not installed, a data file that is missing or malformed, a corrupt record in the results folder,
eight writers in one folder at once, two runs started in the same second, `vaebench` itself
stopped by SIGTERM or killed by SIGKILL. Each test checks the fault's own record (status,
reason, the metrics it had reached) and that nothing else was lost.

The fast tests drive `harness.worker.run_job` with stand-in worker commands; the slow ones run
real torch jobs (`framework=torch`, digits, small models).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from omegaconf import OmegaConf

from harness import cli, worker
from harness.config import AppConfig, record_config
from harness.frameworks import registry
from harness.job import Checkpointer, Job, Result, Stopped, checkpoint, partial_path, read_partial, write_spec
from harness.records import (
    HARNESS_STOPPED,
    HARNESS_STOPPED_EARLY,
    REQUIRED,
    make_record,
    read_record,
    read_records,
    recover_stopped_runs,
    run_lock,
    write_record,
)
from tests.conftest import FRAMEWORKS, ROOT, make_config, run_cli

# --- helpers ---------------------------------------------------------------------------------


def _job(tmp_path: Path, name: str = "convergence", fw: str = "torch", **sections: Any) -> tuple[Job, AppConfig]:
    """A job of measure `name` in framework `fw`; `sections` override the config's sections."""
    c = make_config(**{**sections, "framework": {"name": fw, "timeout_s": 60, **sections.get("framework", {})}})
    plain = OmegaConf.to_container(OmegaConf.structured(c))
    path = tmp_path / f"{name}-{fw}-eager-float32.json"
    return Job("run", name, fw, "eager", plain, str(path)), c  # type: ignore[arg-type]


#: a stand-in worker: saves partial metrics as a measure would, says so, then does ACTION
FAKE_WORKER = """
import json, os, signal, sys, time
from harness.job import checkpoint, read_spec
job = read_spec(sys.argv[1])
checkpoint(job, {"epochs": [{"epoch": 1, "test_elbo": -40.0}, {"epoch": 2, "test_elbo": float("nan")}]})
print("trained 2 epochs", file=sys.stderr, flush=True)
ACTION
"""
PARTIAL = {"epochs": [{"epoch": 1, "test_elbo": -40.0}, {"epoch": 2, "test_elbo": None}], "partial": True}


def _nulled(o: Any) -> Any:
    """`o` with NaN as None, to compare with PARTIAL however a record stores the stand-in's NaN."""
    if isinstance(o, dict):
        return {k: _nulled(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_nulled(v) for v in o]
    return None if isinstance(o, float) and o != o else o


def _fake(action: str) -> list[str]:
    return [sys.executable, "-c", FAKE_WORKER.replace("ACTION", action)]


def _no_leftovers(folder: Path) -> None:
    """No partial-metrics file and no temp file of an atomic write left in `folder`."""
    left = [p.name for p in folder.rglob("*") if p.name.endswith(".partial") or p.name.endswith(".tmp")]
    assert not left, left


def _wait_for(predicate: Any, timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _pids_with(*texts: str) -> list[int]:
    """Processes whose command line holds every one of `texts` (paths only this test uses)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if all(t in cmdline for t in texts):
                pids.append(int(d.name))
    return pids


# --- partial metrics: kill, timeout, interrupt, no record, exception -------------------------


@pytest.mark.parametrize("action,reason", [
    ("os.kill(os.getpid(), signal.SIGKILL)", "worker died of SIGKILL"),
    ("time.sleep(60)", "timed out after 3 s (framework.timeout_s, counted from the worker's start: it includes importing"),
    ("sys.exit(0)", "worker wrote no record"),
    ("sys.exit(3)", "worker exited with code 3"),
])
def test_dead_job_keeps_its_partial_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, action: str, reason: str) -> None:
    job, c = _job(tmp_path, framework={"timeout_s": 3})
    monkeypatch.setattr(worker, "WORKER_CMD", _fake(action))
    rec = worker.run_job(job, c, tmp_path / "jobs")
    assert rec["status"] == "failed" and rec["error"].startswith(reason), rec["error"]
    assert "last output: trained 2 epochs" in rec["error"]
    stored = read_record(Path(job.record_path))
    assert _nulled(stored["metrics"]) == PARTIAL  # the epochs reached, marked partial
    assert (stored["status"], stored["error"]) == (rec["status"], rec["error"])
    _no_leftovers(tmp_path)


@pytest.fixture
def sigterm_stops() -> Any:
    """SIGTERM handled in this process as `vaebench` handles it (raises job.Stopped), and SIGINT
    raising KeyboardInterrupt as in any Python started from a terminal (a shell's background job,
    e.g. a CI script started with `&`, starts with SIGINT ignored)."""
    old = signal.signal(signal.SIGTERM, cli._stop)
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGTERM, old)
    signal.signal(signal.SIGINT, old_int)


def _signal_once_saved(record_path: str, signum: int, delay: float = 0.2) -> None:
    """From a thread: send `signum` to this process once the job has saved its partial metrics."""
    def send() -> None:
        _wait_for(lambda: partial_path(record_path).exists(), 30, "the partial metrics")
        time.sleep(delay)
        os.kill(os.getpid(), signum)

    threading.Thread(target=send, daemon=True).start()


@pytest.mark.parametrize("signum,raised,reason", [
    (signal.SIGINT, KeyboardInterrupt, "interrupted by the user (SIGINT): the run was stopped"),
    (signal.SIGTERM, Stopped, "stopped by SIGTERM: the run was stopped"),
])
def test_interrupted_job_keeps_its_partial_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sigterm_stops: Any,
                                                   signum: int, raised: type, reason: str) -> None:
    """Ctrl-C or SIGTERM while a job runs: its worker is killed, its record keeps the epochs and
    names the signal, and the stop goes on to the caller (the suite stops)."""
    job, c = _job(tmp_path)
    monkeypatch.setattr(worker, "WORKER_CMD", _fake("time.sleep(60)"))
    _signal_once_saved(job.record_path, signum)
    with pytest.raises(raised):
        worker.run_job(job, c, tmp_path / "jobs")
    rec = read_record(Path(job.record_path))
    assert rec["status"] == "failed" and rec["error"].startswith(reason), rec["error"]
    assert _nulled(rec["metrics"]) == PARTIAL
    assert not _pids_with(str(tmp_path / "jobs"), "trained 2 epochs")  # the worker is gone
    _no_leftovers(tmp_path)


def _suite(tmp_path: Path, names: list[str]) -> tuple[AppConfig, dict[str, Any], Path]:
    """A torch run of the measures `names` into a run folder under `tmp_path/runs` (its out_dir)."""
    c = make_config(measure={"names": names}, framework={"name": "torch", "timeout_s": 60}, out_dir=str(tmp_path / "runs"))
    resolved = OmegaConf.to_container(OmegaConf.structured(c))
    assert isinstance(resolved, dict)
    return c, resolved, tmp_path / "runs" / "run"  # type: ignore[return-value]


def test_sigterm_gives_every_job_of_the_run_a_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str], sigterm_stops: Any) -> None:
    """SIGTERM while the first of three jobs runs (stand-in workers): exit 143; the running job's
    record keeps its epochs, the two jobs never started have `failed` records naming the signal,
    and the report is built. The plan (every job's spec) was written before the first job
    started, and a stopped run found under out_dir at the start got its records first."""
    c, resolved, run_dir = _suite(tmp_path, ["convergence", "identity", "gradflow"])
    dead = tmp_path / "runs" / "dead"  # an earlier run whose vaebench was killed before its job began
    write_spec(dead / "jobs" / "identity-torch-eager-float64.job.json",
               Job("dead", "identity", "torch", "eager", record_config(resolved), str(dead / "identity-torch-eager-float64.json")))
    seen = tmp_path / "seen.txt"
    monkeypatch.setattr(worker, "WORKER_CMD", _fake(
        f"open({str(seen)!r}, 'w').write(' '.join(sorted(os.listdir(os.path.dirname(sys.argv[1])))))\ntime.sleep(60)"))
    _signal_once_saved(str(run_dir / "convergence-torch-eager-float32.json"), signal.SIGTERM)
    assert cli.run_suite(c, resolved, run_dir) == 143
    out = capsys.readouterr().out
    recs = {r["measure"]: r for r in read_records(run_dir)}
    assert set(recs) == {"convergence", "identity", "gradflow"} and all(r["status"] == "failed" for r in recs.values())
    assert seen.read_text().split() == sorted(f"{Path(r['_file']).stem}.job.json" for r in recs.values())  # the plan
    assert recs["convergence"]["error"].startswith("stopped by SIGTERM: the run was stopped"), recs["convergence"]["error"]
    assert _nulled(recs["convergence"]["metrics"]) == PARTIAL
    for m in ("identity", "gradflow"):
        assert recs[m]["error"] == "not started: the run was stopped by SIGTERM before this job began"
        assert recs[m]["metrics"] == {} and recs[m]["run_id"] == recs["convergence"]["run_id"]
        assert recs[m]["config"] == record_config(resolved, m)  # what that measure reads
    assert (run_dir / "report.md").exists() and (run_dir / "report.html").exists()
    assert "-> stopped by SIGTERM" in out and "[2/3]" not in out
    assert f"recovered {dead}: its vaebench was stopped; wrote 1 failed record(s)" in out
    assert read_record(dead / "identity-torch-eager-float64.json")["error"] == HARNESS_STOPPED_EARLY
    _no_leftovers(tmp_path)


_HOLDER = "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)"


def test_a_live_run_is_left_alone(tmp_path: Path) -> None:
    """A run whose lock is held (by this process, or by another that is then SIGKILLed) is live:
    its jobs without a record are not touched. Once no process holds the lock, they get their
    records (a job with saved metrics: `failed`, its metrics kept and marked partial)."""
    job, _ = _job(tmp_path / "run")
    spec = tmp_path / "run" / "jobs" / f"{job.name}.job.json"
    write_spec(spec, job)
    checkpoint(job, {"epochs": [{"epoch": 1, "test_elbo": -40.0}]})
    with run_lock(tmp_path / "run"):
        assert recover_stopped_runs(tmp_path) == ([], [tmp_path / "run"])
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path / "run" / ".vaebench.lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert recover_stopped_runs(tmp_path) == ([], [tmp_path / "run"])
        assert not Path(job.record_path).exists() and partial_path(job.record_path).exists()
    finally:
        holder.kill()  # SIGKILL: the kernel releases the lock
        holder.wait()
    assert recover_stopped_runs(tmp_path) == ([(tmp_path / "run", 1)], [])
    rec = read_record(Path(job.record_path))
    assert rec["status"] == "failed" and rec["error"] == HARNESS_STOPPED and rec["run_id"] == job.run_id
    assert rec["metrics"] == {"epochs": [{"epoch": 1, "test_elbo": -40.0}], "partial": True}
    assert recover_stopped_runs(tmp_path) == ([], [])  # every job has its record now
    _no_leftovers(tmp_path)


_PARENT = """
import sys
from pathlib import Path
from harness import worker
from harness.records import run_lock
from tests.test_faults import _fake, _job
run = Path(sys.argv[1])
job, c = _job(run)
worker.WORKER_CMD = _fake("time.sleep(60)")  # a stand-in that does not end with its parent
with run_lock(run) as lock:
    worker.run_job(job, c, run / "jobs", lock)
"""


def test_a_worker_keeps_its_run_live_after_vaebench_dies(tmp_path: Path) -> None:
    """The worker shares its run's lock: while it lives on after its `vaebench` was SIGKILLed,
    the run is live and left alone; once it is gone, the job gets its record, with the epochs
    it had saved and the reason that vaebench itself was stopped."""
    run = tmp_path / "run"
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, str(run)], cwd=ROOT, stderr=subprocess.DEVNULL,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    record = run / "convergence-torch-eager-float32.json"
    try:
        _wait_for(lambda: partial_path(record).exists(), 60, "the partial metrics")
        parent.kill()
        parent.wait()
        workers = _pids_with("trained 2 epochs", str(run / "jobs"))
        assert len(workers) == 1, workers
        assert recover_stopped_runs(tmp_path) == ([], [run])
    finally:
        for pid in _pids_with("trained 2 epochs", str(run / "jobs")):
            os.killpg(pid, signal.SIGKILL)
    _wait_for(lambda: not _pids_with("trained 2 epochs", str(run / "jobs")), 30, "the worker to end")
    got: list[Any] = []

    def released() -> bool:  # the lock goes when the killed process group has fully exited, a moment later
        got.append(recover_stopped_runs(tmp_path))
        return bool(got[-1] != ([], [run]))
    _wait_for(released, 10, "the run's lock to be released")
    assert got[-1] == ([(run, 1)], [])
    rec = read_record(record)
    assert rec["status"] == "failed" and rec["error"] == HARNESS_STOPPED and _nulled(rec["metrics"]) == PARTIAL
    _no_leftovers(tmp_path)


def test_finished_job_replaces_its_partial_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job that ends with its own record keeps that record's metrics; the partial file goes,
    and a stale one from an earlier attempt is never merged in."""
    job, c = _job(tmp_path)
    checkpoint(job, {"stale": True})
    writes = ("from harness.records import make_record, write_record\n"
              "write_record(__import__('pathlib').Path(job.record_path), make_record(run_id='r', measure=job.measure, "
              "framework=job.framework, mode=job.mode, status='ok', config={}, env={}, metrics={'epochs': [1, 2, 3]}))")
    monkeypatch.setattr(worker, "WORKER_CMD", _fake(writes))
    rec = worker.run_job(job, c, tmp_path / "jobs")
    assert rec["status"] == "ok" and rec["metrics"] == {"epochs": [1, 2, 3]}
    _no_leftovers(tmp_path)
    monkeypatch.setattr(worker, "WORKER_CMD", [sys.executable, "-c", "import sys; sys.exit(1)"])  # saves nothing
    checkpoint(job, {"stale": True})
    rec = worker.run_job(job, c, tmp_path / "jobs")
    assert rec["status"] == "failed" and rec["metrics"] == {}


def test_kill_after_the_record_is_written_loses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker killed after it wrote its final record (while the interpreter shuts down): the
    finished record stands; it is not replaced by a `failed` one without metrics."""
    job, c = _job(tmp_path)
    writes = ("from harness.records import make_record, write_record\n"
              "write_record(__import__('pathlib').Path(job.record_path), make_record(run_id='r', measure=job.measure, "
              "framework=job.framework, mode=job.mode, status='ok', config={}, env={}, metrics={'epochs': [1, 2, 3]}))\n"
              "os.kill(os.getpid(), signal.SIGKILL)")
    monkeypatch.setattr(worker, "WORKER_CMD", _fake(writes))
    rec = worker.run_job(job, c, tmp_path / "jobs")
    assert rec["status"] == "ok" and rec["metrics"] == {"epochs": [1, 2, 3]}
    assert read_record(Path(job.record_path))["status"] == "ok"
    _no_leftovers(tmp_path)


def test_unreadable_record_from_the_worker_is_a_failed_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job, c = _job(tmp_path)
    monkeypatch.setattr(worker, "WORKER_CMD", _fake("open(job.record_path, 'w').write('{\"run_id\": ')"))
    rec = worker.run_job(job, c, tmp_path / "jobs")
    assert rec["status"] == "failed" and rec["error"].startswith("worker wrote an unreadable record")
    stored = read_record(Path(job.record_path))
    assert stored["status"] == "failed" and _nulled(stored["metrics"]) == PARTIAL


class _Exploding:
    """A measure that saves one epoch and then fails with `exc`."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def run(self, c: AppConfig, job: Job) -> Result:
        checkpoint(job, {"epochs": [{"epoch": 1}]})
        raise self.exc

    def __getattr__(self, name: str) -> object:  # the rest of the contract: the real measure's
        from harness.measures import convergence

        return getattr(convergence, name)


@pytest.mark.parametrize("exc,says", [
    (MemoryError(), "out of memory: MemoryError"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to allocate 4194304000 bytes"),
     "out of memory: RuntimeError"),
    (type("ResourceExhaustedError", (Exception,), {})("OOM when allocating tensor with shape[1572864000]"),
     "out of memory: ResourceExhaustedError"),
    (type("JaxRuntimeError", (Exception,), {})("RESOURCE_EXHAUSTED: Out of memory allocating 6291456000 bytes."),
     "out of memory: JaxRuntimeError"),
    (ValueError("shapes (3,4) and (5,6) not aligned"), "ValueError: shapes"),
])
def test_exception_in_the_job_keeps_partial_metrics_and_names_oom(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: BaseException, says: str
) -> None:
    from harness.measures import MEASURES

    job, _ = _job(tmp_path)
    monkeypatch.setitem(MEASURES, "convergence", _Exploding(exc))
    rec = worker.run_in_process(job)
    assert rec["status"] == "failed" and rec["error"].startswith(says), rec["error"]
    assert rec["metrics"] == {"epochs": [{"epoch": 1}], "partial": True}


def test_memory_limit_named_in_reasons() -> None:
    cfg = {"framework": {"memory_limit_mb": 512}}
    assert worker._describe_exit(-signal.SIGKILL, cfg) == "worker died of SIGKILL (out of memory? framework.memory_limit_mb=512)"
    assert worker._describe_exit(-signal.SIGABRT, cfg).endswith("(out of memory? framework.memory_limit_mb=512)")
    assert "by the kernel when out of memory" in worker._describe_exit(-signal.SIGKILL, {})
    assert worker._describe_exit(-signal.SIGTERM, {}) == "worker died of SIGTERM"
    assert not worker.is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_memory_limit_applies_to_the_process(tmp_path: Path) -> None:
    """framework.memory_limit_mb caps the data segment: a NumPy allocation over it fails with
    MemoryError at once (nothing is touched), while small work goes on."""
    code = ("from harness.worker import set_memory_limit; set_memory_limit(300)\n"
            "import numpy as np; np.ones(1000)\n"
            "try:\n    np.ones(80_000_000)\nexcept MemoryError:\n    print('MemoryError')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "MemoryError", r.stderr[-2000:]


def test_worker_ends_when_its_parent_dies(tmp_path: Path) -> None:
    """A killed `vaebench` leaves no worker computing on: the worker watches its parent and
    ends its process group when the parent is gone."""
    marker = tmp_path / "started"
    child = (f"import time; from harness.worker import _exit_with_parent; open({str(marker)!r}, 'w').close(); "
             "_exit_with_parent(0.1); time.sleep(60)")
    parent = (f"import os, subprocess, sys; p = subprocess.Popen([sys.executable, '-c', {child!r}, {str(tmp_path)!r}], "
              f"start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, "
              f"env={{**os.environ, {worker.PARENT_ENV!r}: str(os.getpid())}}); print(p.pid, flush=True)")  # and exits at once
    r = subprocess.run([sys.executable, "-c", parent], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    pid = int(r.stdout.split()[0])
    _wait_for(marker.exists, 30, "the worker to start")  # it ran, and would sleep a minute
    _wait_for(lambda: not _pids_with("_exit_with_parent", str(tmp_path)), 30, f"worker {pid} to end")


def test_checkpointer_writes_at_most_every_interval(tmp_path: Path) -> None:
    job, _ = _job(tmp_path)
    save = Checkpointer(job, every_s=60)
    built: list[int] = []

    def metrics(n: int) -> Any:
        return lambda: built.append(n) or {"n": n}

    assert save(metrics(1)) and read_partial(job.record_path) == {"n": 1}
    assert not save(metrics(2)) and read_partial(job.record_path) == {"n": 1}  # within the interval: skipped
    assert save(metrics(3), force=True) and read_partial(job.record_path) == {"n": 3}
    assert built == [1, 3]  # metrics are built only when written
    checkpoint(job, {"a": np.float32(1.5), "b": np.arange(2), "c": float("inf")})
    assert read_partial(job.record_path) == {"a": 1.5, "b": [0, 1], "c": float("inf")}
    partial_path(job.record_path).write_text("{trunc")
    assert read_partial(job.record_path) is None  # an unreadable partial file is ignored, not trusted


@pytest.mark.slow
def test_convergence_saves_epochs_as_it_goes(tmp_path: Path) -> None:
    """In process: after training the partial file holds every epoch (written before the final
    evaluation) and the seed in progress as `incomplete`; the finished result is complete."""
    from harness.measures import convergence

    job, c = _job(tmp_path, measure={"names": ["convergence"], "convergence": {"epochs": 3, "iwae_k": 5, "elbo_samples": 2}},
                  model={"hidden": [16]})
    res = convergence.run(c, job)
    saved = read_partial(job.record_path)
    assert res.status == "ok" and saved is not None
    assert [e["epoch"] for e in saved["epochs"]] == [1, 2, 3] == [e["epoch"] for e in res.metrics["epochs"]]
    assert saved["runs"][-1]["status"] == "incomplete" and "final" not in saved["runs"][-1]
    assert saved["train_wall_s"] == saved["epochs"][-1]["wall_s"]


@pytest.mark.slow
def test_throughput_saves_after_each_batch_size(tmp_path: Path) -> None:
    from harness.api import MlpSpec, RuntimeSpec
    from harness.measures import throughput as T
    from harness.metrics import plain

    cfg = T.ThroughputConfig(batch_sizes=[16, 8], repeats=2, steps=2, warmup=0, matmul_n=32, matmul_repeats=2, plain=False,
                               layers=False)
    saves: list[dict[str, Any]] = []
    typed, _ = T.measure_batches("torch", RuntimeSpec(), cfg, MlpSpec(x_dim=16, hidden=(12,), latent=3),
                                 save=lambda m: saves.append(json.loads(json.dumps(m))))
    metrics = plain(typed)
    assert [s["batch_sizes"] for s in saves] == [[8], [8, 16]]
    assert [r["batch"] for r in saves[-1]["batches"]] == [8, 16] and saves[-1]["settings"] == metrics["settings"]
    assert "matmul_flops_per_s" not in saves[-1] and "matmul_flops_per_s" in metrics


# --- missing framework, missing data ---------------------------------------------------------


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_missing_framework_gives_unavailable_with_the_install_command(framework: str, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The framework's module (`FrameworkFacts.module`) not found: `unavailable`, with the
    command that installs its extra (`FrameworkFacts.extra`)."""
    import importlib.util

    facts = registry()[framework]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == facts.module else real(name, *a))
    job, _ = _job(tmp_path, fw=framework)
    rec = worker.run_in_process(job)
    cmd = worker.install_command(framework)
    assert rec["status"] == "unavailable" and rec["error"].endswith(f"install it with: {cmd}"), rec["error"]
    assert cmd.startswith(sys.executable) and " -m pip install -e " in cmd and f"{ROOT}[{facts.extra}]" in cmd
    assert all(k in rec for k in REQUIRED)


def test_data_file_gone_after_validation_gives_failed_record(tmp_path: Path) -> None:
    """The file passed validation, then vanished before the job read it: the job's record says
    which file, and the job fails without importing a framework."""
    job, c = _job(tmp_path, data={"source": "mnist", "path": str(tmp_path / "gone.npz")})
    rec = worker.run_job(job, c, tmp_path / "jobs")
    assert rec["status"] == "failed" and "data file not found" in rec["error"] and "gone.npz" in rec["error"]


@pytest.mark.slow
def test_missing_data_file_rejected_before_anything_is_written(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    for path in (tmp_path / "nope.npz", tmp_path / "nope-folder"):
        r = run_cli("framework=torch", "data=mnist", f"data.path={path}", out_dir=out, timeout=60)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert "data.path" in r.stderr and str(path) in r.stderr and "expected a .npz file" in r.stderr
        assert not out.exists()


# --- records: corrupt files, eight writers, two runs in one second ---------------------------


def _rec(i: int, **kw: Any) -> dict[str, Any]:
    base = dict(run_id=f"r{i}", measure="convergence", framework="torch", mode="eager", status="ok", config={"i": i},
                env={}, metrics={"i": i, "values": list(range(2000))})
    return make_record(**{**base, **kw})


def test_corrupt_record_is_skipped_with_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A truncated record (a writer killed without atomic writes, a disk filling up) or a JSON file
    that is not a record is reported and skipped, never trusted; the valid records are all read."""
    for i in range(3):
        write_record(tmp_path / f"good-{i}.json", _rec(i))
    text = (tmp_path / "good-0.json").read_text()
    (tmp_path / "truncated.json").write_text(text[: len(text) // 2])
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "not-a-record.json").write_text('{"hello": "world"}')
    (tmp_path / "bad-status.json").write_text(json.dumps({**_rec(9), "status": "great"}))
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    recs = read_records(tmp_path)
    assert sorted(r["run_id"] for r in recs) == ["r0", "r1", "r2"]
    err = capsys.readouterr().err
    for name in ("truncated.json", "empty.json", "not-a-record.json", "binary.json", "bad-status.json"):
        assert name in err, (name, err)


_WRITER = """
import sys, time
from pathlib import Path
from harness.records import make_record, write_record
i, folder, start = int(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
rec = lambda n: make_record(run_id=f"r{i}", measure="convergence", framework="torch", mode="eager", status="ok",
                            config={"writer": i}, env={}, metrics={"writer": i, "n": n, "values": list(range(20000))})
while time.time() < start:
    pass
write_record(folder / f"job-{i}.json", rec(0))
for n in range(20):  # and all of them at once over one shared file
    write_record(folder / "shared.json", rec(n))
"""


@pytest.mark.slow
def test_eight_writers_at_once_leave_eight_valid_records(tmp_path: Path) -> None:
    start = time.time() + 3.0  # every writer starts writing at this instant
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(i), str(tmp_path), str(start)], cwd=ROOT,
                              stderr=subprocess.PIPE, text=True) for i in range(8)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read() if p.stderr else ""
    recs = {Path(r["_file"]).name: r for r in read_records(tmp_path)}
    assert sorted(recs) == sorted([f"job-{i}.json" for i in range(8)] + ["shared.json"])
    for i in range(8):
        m = recs[f"job-{i}.json"]["metrics"]
        assert m["writer"] == i and m["values"] == list(range(20000))  # each whole, none mixed with another
    shared = recs["shared.json"]["metrics"]
    assert shared["n"] == 19 and shared["values"] == list(range(20000))  # one writer's complete last version
    _no_leftovers(tmp_path)


def test_eight_jobs_in_one_results_folder_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Eight jobs run side by side (as a parallel launcher runs them) into one folder, each
    killed after saving partial metrics: eight failed records, each with its own metrics."""
    monkeypatch.setattr(worker, "WORKER_CMD", _fake("time.sleep(0.5); os.kill(os.getpid(), signal.SIGKILL)"))
    job, c = _job(tmp_path)
    jobs = [(dataclasses.replace(job, run_id=f"r{i}", record_path=str(tmp_path / f"job-{i}.json")), c) for i in range(8)]
    results: dict[int, dict[str, Any]] = {}

    def run(i: int) -> None:
        results[i] = worker.run_job(*jobs[i], tmp_path / "jobs")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    recs = read_records(tmp_path)
    assert len(recs) == 8 and sorted(r["run_id"] for r in recs) == [f"r{i}" for i in range(8)]
    assert all(r["status"] == "failed" and _nulled(r["metrics"]) == PARTIAL for r in recs)
    _no_leftovers(tmp_path)


def test_run_folders_carry_a_unique_token() -> None:
    """Two runs started in the same second get different folders: the folder name ends in
    `${uid:}`, a random token that is cached (one value however often one run resolves it)."""
    import harness.cli  # noqa: F401  (registers the resolver)

    cfg = OmegaConf.load(ROOT / "conf" / "config.yaml")
    for key in ("run", "sweep"):
        pattern = OmegaConf.to_container(cfg.hydra[key])["dir"]  # type: ignore[index]
        assert "${now:" in pattern and pattern.endswith("-${uid:}"), pattern
    one = OmegaConf.create({"out_dir": "x", "a": "${uid:}", "b": "${uid:}"})
    other = OmegaConf.create({"a": "${uid:}"})
    assert one.a == one.b and one.a == one.a and one.a != other.a


@pytest.mark.slow
def test_two_runs_started_in_the_same_second_get_different_folders(tmp_path: Path) -> None:
    """Two `vaebench` runs started together, into one out_dir: two run folders, each with its
    own record. (Their one job finds torch missing, so each run takes a second or two.)"""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(_HIDE.format(names=["torch"]))
    out = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(hide), "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "harness.cli", "framework=torch", "measure=identity", f"out_dir={out}", "progress=false"]
    procs = [subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        p.communicate(timeout=120)
    folders = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(folders) == 2, folders
    for f in folders:
        recs = read_records(f)
        assert len(recs) == 1 and recs[0]["status"] == "unavailable"
    assert len({r["run_id"] for f in folders for r in read_records(f)}) == 2


# --- real jobs: kill, timeout, memory limit, NaN, missing framework --------------------------

#: sitecustomize.py that makes frameworks look uninstalled: find_spec says None, import fails
_HIDE = """
import importlib.abc, importlib.util, sys
HIDDEN = set({names})
_find_spec = importlib.util.find_spec
def find_spec(name, package=None):
    return None if name.split(".")[0] in HIDDEN else _find_spec(name, package)
importlib.util.find_spec = find_spec
class _Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, _Hide())
"""

#: a long convergence run (it never finishes on its own) and a second, quick job after it
LONG_THEN_IDENTITY = ("framework=torch", "measure.names=[convergence,identity]", "measure.convergence.epochs=100000",
                      "measure.convergence.iwae_k=10", "measure.convergence.elbo_samples=2", "model.hidden=[32]")


@pytest.mark.slow
def test_sigkill_mid_run_keeps_the_epochs_and_the_suite_goes_on(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", *LONG_THEN_IDENTITY, f"out_dir={out}", "progress=false"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        def two_epochs_saved() -> list[dict[str, Any]] | None:
            for p in out.glob("*/convergence-torch-*.json.partial"):
                saved = read_partial(p.with_name(p.name.removesuffix(".partial")))
                if saved and len(saved.get("epochs", [])) >= 2:
                    return [saved]
            return None

        seen = _wait_for(two_epochs_saved, 180, "two epochs in the partial metrics")[0]
        pids = _pids_with("harness.worker", str(out), "convergence-torch")
        assert len(pids) == 1, pids
        os.killpg(pids[0], signal.SIGKILL)  # the worker and everything it started
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, stdout[-3000:] + stderr[-3000:]
    recs = {r["measure"]: r for r in read_records(out)}
    conv, ident = recs["convergence"], recs["identity"]
    assert conv["status"] == "failed" and conv["error"].startswith("worker died of SIGKILL"), conv["error"]
    m = conv["metrics"]
    assert m["partial"] is True and len(m["epochs"]) >= len(seen["epochs"]) >= 2
    assert m["epochs"][: len(seen["epochs"])] == json.loads(json.dumps(seen["epochs"]))
    assert m["runs"][0]["status"] == "incomplete" and len(m["runs"][0]["step_loss"]) >= 2 * m["steps_per_epoch"]
    assert ident["status"] == "ok"  # the next job ran and finished
    run_dir = next(out.glob("*/"))
    assert any((run_dir / f).exists() for f in ("report.md", "summary.md"))  # the run's report was still built
    assert "-> failed: worker died of SIGKILL" in stdout
    _no_leftovers(out)


def _start_long_run(out: Path, *extra: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """`vaebench` of LONG_THEN_IDENTITY into `out`, once its convergence job has saved two epochs:
    the process and the partial metrics seen then."""
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", *extra, *LONG_THEN_IDENTITY, f"out_dir={out}",
                             "progress=false"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def two_epochs_saved() -> list[dict[str, Any]] | None:
        for p in out.rglob("convergence-torch-*.json.partial"):
            saved = read_partial(p.with_name(p.name.removesuffix(".partial")))
            if saved and len(saved.get("epochs", [])) >= 2:
                return [saved]
        return None

    try:
        return proc, _wait_for(two_epochs_saved, 180, "two epochs in the partial metrics")[0]
    except BaseException:
        proc.kill()
        raise


def _kept_epochs(rec: dict[str, Any], seen: dict[str, Any]) -> None:
    """`rec` is a failed record that kept at least the epochs seen in the partial metrics."""
    m = rec["metrics"]
    assert rec["status"] == "failed" and m["partial"] is True and len(m["epochs"]) >= len(seen["epochs"]) >= 2
    assert m["epochs"][: len(seen["epochs"])] == json.loads(json.dumps(seen["epochs"]))


@pytest.mark.slow
def test_sigkill_of_vaebench_leaves_a_record_for_every_job(tmp_path: Path) -> None:
    """`vaebench` itself SIGKILLed mid-run: its worker ends, and `vaebench report DIR` gives every
    planned job its record (the running one with its epochs, the one not started saying so)
    and the report; a second `report` finds nothing left to recover."""
    out = tmp_path / "runs"
    proc, seen = _start_long_run(out)
    proc.kill()
    proc.communicate(timeout=60)
    _wait_for(lambda: not _pids_with("harness.worker", str(out)), 30, "the worker to end with its parent")
    run_dir = next(p for p in out.iterdir() if p.is_dir())
    assert not read_records(run_dir)  # only the plan and the partial metrics: no record yet
    r = subprocess.run([sys.executable, "-m", "harness.cli", "report", str(run_dir)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert f"recovered {run_dir}: its vaebench was stopped; wrote 2 failed record(s)" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    recs = {x["measure"]: x for x in read_records(run_dir)}
    assert set(recs) == {"convergence", "identity"}
    assert recs["convergence"]["error"] == HARNESS_STOPPED
    _kept_epochs(recs["convergence"], seen)
    assert recs["identity"]["status"] == "failed" and recs["identity"]["error"] == HARNESS_STOPPED_EARLY
    assert (run_dir / "report.md").exists() and (run_dir / "report.html").exists()
    assert "could not summarize" not in (run_dir / "report.md").read_text()
    again = subprocess.run([sys.executable, "-m", "harness.cli", "report", str(run_dir)], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert "recovered" not in again.stdout and len(read_records(run_dir)) == 2
    _no_leftovers(out)


@pytest.mark.slow
def test_sigterm_stops_a_sweep_like_ctrl_c(tmp_path: Path) -> None:
    """SIGTERM (as `timeout` sends it) to `vaebench -m` with the basic launcher: exit 143, the
    running job's worker is killed and its record keeps the epochs, the job not started gets a
    record saying so, the run's report and the sweep's combined report are built, and the
    sweep's next run does not start."""
    out = tmp_path / "runs"
    proc, seen = _start_long_run(out, "-m", "seed=0,1")
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stdout[-3000:] + stderr[-3000:]
    assert not _pids_with("harness.worker", str(out))
    sweep_dir = next(out.glob("multirun-*"))
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")) == ["0"]
    recs = {x["measure"]: x for x in read_records(sweep_dir / "0")}
    assert recs["convergence"]["error"].startswith("stopped by SIGTERM: the run was stopped"), recs["convergence"]["error"]
    _kept_epochs(recs["convergence"], seen)
    assert recs["identity"]["error"] == "not started: the run was stopped by SIGTERM before this job began"
    for folder in (sweep_dir / "0", sweep_dir):
        assert (folder / "report.md").exists() and (folder / "report.html").exists(), folder
    assert "-> stopped by SIGTERM" in stdout and "sweep report (2 records: 0 ok, 2 not ok)" in stdout
    _no_leftovers(out)


@pytest.mark.slow
def test_timeout_counts_import_and_keeps_the_epochs(tmp_path: Path) -> None:
    """A job that never ends on its own, over a 20 s timeout: killed at 20 s after its worker
    started (the torch import counts), with the evaluations and epochs it reached (on an idle
    2-core machine about a hundred epochs; under load fewer, so only the step-0 evaluation is
    required)."""
    job, c = _job(tmp_path, framework={"timeout_s": 20},
                  measure={"names": ["convergence"], "convergence": {"epochs": 100000, "iwae_k": 10, "elbo_samples": 2}},
                  model={"hidden": [32]})
    t = time.monotonic()
    rec = worker.run_job(job, c, tmp_path / "jobs")
    assert time.monotonic() - t < 40
    assert rec["status"] == "failed" and rec["error"].startswith(worker.timeout_message(20)), rec["error"]
    assert "importing the framework" in rec["error"]
    m = rec["metrics"]
    assert m["partial"] is True and m["runs"][0]["status"] == "incomplete" and m["runs"][0]["evals"][0]["step"] == 0
    assert len(m["epochs"]) == len(m["runs"][0]["epochs"])
    assert not _pids_with("harness.worker", str(tmp_path / "jobs"))
    _no_leftovers(tmp_path)


@pytest.mark.slow
def test_memory_limit_gives_an_out_of_memory_record_with_the_batches_reached(tmp_path: Path) -> None:
    """Throughput at batch sizes 8 and 8,000,000 under framework.memory_limit_mb=800: batch 8 is
    measured, the 1 GB batch does not fit; the record says out of memory and keeps batch 8."""
    tiny = {"batch_sizes": [8, 8_000_000], "repeats": 2, "steps": 1, "warmup": 0, "matmul_n": 32,
            "matmul_repeats": 2, "plain": False, "layers": False}
    job, c = _job(tmp_path, "throughput", framework={"memory_limit_mb": 800}, model={"hidden": [12], "latent": 3},
                  measure={"names": ["throughput"], "throughput": tiny})
    rec = worker.run_job(job, c, tmp_path / "jobs")
    assert rec["status"] == "failed", rec
    assert rec["error"].startswith("out of memory (framework.memory_limit_mb=800): MemoryError"), rec["error"]
    m = rec["metrics"]
    assert m["partial"] is True and m["batch_sizes"] == [8] and m["batches"][0]["samples_per_s"] > 0
    _no_leftovers(tmp_path)


@pytest.mark.slow
def test_nan_loss_is_diverged_at_its_step_and_the_suite_goes_on(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    r = run_cli("framework=torch", "measure.names=[convergence,identity]", "measure.convergence.epochs=2",
                "measure.convergence.iwae_k=10", "model.hidden=[32]", "optim=sgd", "optim.lr=1e6", out_dir=out, timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    recs = {x["measure"]: x for x in read_records(out)}
    conv = recs["convergence"]
    assert conv["status"] == "diverged" and "NaN or inf" in conv["error"] and " at step " in conv["error"], conv["error"]
    step = int(conv["error"].split(" at step ")[1].split(",")[0])
    assert step >= 1 and len(conv["metrics"]["runs"][0]["step_loss"]) == step  # losses up to the NaN are kept
    assert recs["identity"]["status"] == "ok"


@pytest.mark.slow
def test_missing_framework_unavailable_and_the_others_run(tmp_path: Path) -> None:
    """One framework looks uninstalled (find_spec gives None, import fails): its record is
    `unavailable` with the exact install command; the others run to `ok`."""
    *others, hidden = FRAMEWORKS
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(_HIDE.format(names=[registry()[hidden].module]))
    out = tmp_path / "runs"
    r = run_cli("framework=all", "measure=convergence", "measure.convergence.epochs=1", "measure.convergence.iwae_k=10",
                "model.hidden=[32]", out_dir=out, env={"PYTHONPATH": str(hide)}, timeout=400)
    assert r.returncode == 1, r.stderr[-3000:]
    recs = {x["framework"]: x for x in read_records(out)}
    assert set(recs) == set(FRAMEWORKS)
    gone = recs[hidden]
    assert gone["status"] == "unavailable" and gone["error"].endswith(f"install it with: {worker.install_command(hidden)}")
    assert "-m pip install" in gone["error"] and f"[{registry()[hidden].extra}]" in gone["error"]
    assert all(recs[f]["status"] == "ok" for f in others), {f: recs[f]["error"] for f in others}

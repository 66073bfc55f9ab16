"""One job in a fresh process: `python -m harness.worker JOB.json` -> one record.

The parent (`run_job`) sets the environment before the child imports any framework, enforces
the timeout, and turns a crash, a kill or a timeout into a `failed` record, so a job never
ends without one.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from harness.api import FRAMEWORK_MODULES, DeviceUnavailable, FrameworkUnavailable
from harness.config import AppConfig, to_app_config
from harness.fingerprint import framework_isa
from harness.job import Job, Result
from harness.measures import MEASURES, precision
from harness.records import REPO_ROOT, host_env, make_record, read_record, write_atomic, write_record

WORKER_CMD = [sys.executable, "-m", "harness.worker"]


def app_config(job: Job) -> AppConfig:
    return to_app_config(OmegaConf.create(job.config))


def child_env(c: AppConfig, measure: str) -> dict[str, str]:
    """Environment for a job's process, set before any framework is imported."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # JAX: allocate GPU memory as needed
    env["TF_FORCE_GPU_ALLOW_GROWTH"] = "true"  # TensorFlow: memory growth on
    if "float64" in precision(measure, c):
        env["JAX_ENABLE_X64"] = "1"  # JAX refuses float64 arrays without it
    if c.framework.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["JAX_PLATFORMS"] = "cpu"
    if c.framework.threads > 0:
        n = str(c.framework.threads)
        env.update(OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n)
    return env


def run_in_process(job: Job) -> dict[str, Any]:
    """Run the job here (the child's body). Always returns a record."""
    env = host_env()
    status, error, metrics = "failed", None, {}
    try:
        c = app_config(job)
        if c.framework.threads > 0:
            # XLA's CPU client has no working thread-count flag (measured: no effect), so the
            # thread budget is enforced for every framework the same way: CPU affinity, set
            # before the framework starts its thread pools
            cores = sorted(os.sched_getaffinity(0))[: c.framework.threads]
            os.sched_setaffinity(0, cores)
        env["cpu_affinity"] = sorted(os.sched_getaffinity(0))
        if importlib.util.find_spec(FRAMEWORK_MODULES[job.framework]) is None:
            raise FrameworkUnavailable(
                f"framework {job.framework!r} is not installed (pip install 'vaebench[{job.framework}]')"
            )
        result: Result = MEASURES[job.measure].run(c, job)
        status, error, metrics = result.status, result.error, result.metrics
        env.update(result.backend_env)
        env["framework_isa"] = framework_isa(job.framework)  # what decides float32 results here
    except (FrameworkUnavailable, DeviceUnavailable) as exc:
        status, error = "unavailable", str(exc)
    except Exception as exc:  # the record must say what went wrong, in one line
        traceback.print_exc()
        status, error = "failed", f"{type(exc).__name__}: {exc}".splitlines()[0]
    return job_record(job, status, error, env, metrics)


def job_record(job: Job, status: str, error: str | None, env: dict[str, Any],
               metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    return make_record(run_id=job.run_id, measure=job.measure, framework=job.framework, mode=job.mode,
                       status=status, error=error, config=job.config, env=env, metrics=metrics)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m harness.worker JOB.json", file=sys.stderr)
        return 2
    job = Job(**json.loads(Path(argv[0]).read_text()))
    write_record(Path(job.record_path), run_in_process(job))
    return 0


# --- parent side ------------------------------------------------------------------------


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (killed: out of memory?)" if -code == signal.SIGKILL else ""
        return f"worker died of {name}{hint}"
    return f"worker exited with code {code}"


def run_job(job: Job, c: AppConfig, jobs_dir: Path) -> dict[str, Any]:
    """Run `job` in a fresh child process; always leaves a record at job.record_path."""
    jobs_dir.mkdir(parents=True, exist_ok=True)
    spec = jobs_dir / f"{job.name}.job.json"
    write_atomic(spec, json.dumps(job.__dict__, indent=1).encode())
    record_path = Path(job.record_path)
    record_path.unlink(missing_ok=True)
    tail: list[bytes] = []
    # compile caches start empty for every job, so compile times are cold, not a leftover
    # of an earlier run (torch.compile keeps an on-disk cache across processes by default)
    cache_dir = tempfile.mkdtemp(prefix="vaebench-compile-cache-")
    env = child_env(c, job.measure)
    env["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    env["TRITON_CACHE_DIR"] = os.path.join(cache_dir, "triton")

    proc = subprocess.Popen(
        [*WORKER_CMD, str(spec)],
        env=env,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )

    def pump() -> None:  # forward the child's stderr (progress bars) and keep its tail
        assert proc.stderr is not None
        for chunk in iter(lambda: os.read(proc.stderr.fileno(), 4096), b""):  # type: ignore[union-attr]
            sys.stderr.buffer.write(chunk)
            sys.stderr.buffer.flush()
            tail.append(chunk)
            del tail[:-16]

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    start = time.monotonic()
    error = None
    interrupted = False
    try:
        code = proc.wait(timeout=c.framework.timeout_s)
        if code != 0:
            error = _describe_exit(code)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        error = f"timed out after {c.framework.timeout_s} s (framework.timeout_s)"
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        error, interrupted = "interrupted by the user", True
    reader.join(timeout=5)
    shutil.rmtree(cache_dir, ignore_errors=True)
    if error is None and record_path.exists():
        return read_record(record_path)
    last = b"".join(tail).decode(errors="replace").strip().splitlines()
    reason = error or "worker wrote no record"
    if last:
        reason += f"; last output: {last[-1][:300]}"
    rec = job_record(job, "failed", reason, {**host_env(), "wall_s": round(time.monotonic() - start, 3)})
    write_record(record_path, rec)
    if interrupted:
        raise KeyboardInterrupt  # the record is written; the caller stops the suite
    return rec


if __name__ == "__main__":
    sys.exit(main())

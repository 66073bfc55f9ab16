"""One job in a fresh process: `python -m harness.worker JOB.json` -> one record.

The parent (`run_job`) sets the environment before the child imports any framework, enforces
the timeout, and turns a crash, a kill or a timeout into a `failed` record, so a job never
ends without one.

Faults, and what the record says:
- killed, timed out (`framework.timeout_s`, counted from the start of the worker process, so
  it includes the framework's import and compilation), interrupted (Ctrl-C, or SIGTERM to
  `vaebench`: the run is stopped), or an exception: `failed` with the reason; the metrics the
  measure had saved with `harness.job.checkpoint` are kept, marked `partial: true`;
- out of memory (a MemoryError, or a framework's allocation failure): `failed`, the reason
  starts with "out of memory". `framework.memory_limit_mb` caps the job's process with
  RLIMIT_DATA (set before any framework is imported; RLIMIT_AS would count the virtual memory
  TensorFlow and JAX reserve, and breaks them);
- the framework not installed: `unavailable`, with the command that installs it;
- a non-finite loss: `diverged` (the measure says where).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import re
import resource
import shlex
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
from harness.envs import job_env, record_facts, worker_python
from harness.fingerprint import framework_isa
from harness.frameworks import JobSettings, registry
from harness.frameworks import get as get_facts
from harness.job import Diverged, Job, Result, partial_path, read_partial, read_spec, stop_signal, write_spec
from harness.measures import MEASURES, precision
from harness.records import (
    COMPILE_CACHE_ENV,
    DEFAULT_ENV,
    REPO_ROOT,
    RecordError,
    host_env,
    make_record,
    read_record,
    write_record,
)
from harness.slurm import in_task as in_slurm_task

WORKER_CMD = [sys.executable, "-m", "harness.worker"]
#: environment variable naming the worker's parent process (see `_exit_with_parent`)
PARENT_ENV = "VAEBENCH_PARENT_PID"


def app_config(job: Job) -> AppConfig:
    return to_app_config(OmegaConf.create(job.config))


def child_env(c: AppConfig, measure: str, cache_dir: str | None = None) -> dict[str, str]:
    """Environment for a job's process, set before any framework is imported: what every
    registered framework asks for (`FrameworkFacts.env_before_import`: memory growth, float64,
    platforms, its compile cache in `cache_dir` ...), CUDA hidden for `device=cpu`, the thread
    variables."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    settings = JobSettings(device=c.framework.device, float64="float64" in precision(measure, c),
                           threads=c.framework.threads, cache_dir=cache_dir, inherited=dict(env))
    for facts in registry().values():
        env.update(facts.env(settings))
    if cache_dir:
        env[COMPILE_CACHE_ENV] = cache_dir
    if c.framework.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    if c.framework.threads > 0:
        n = str(c.framework.threads)
        env.update(OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n)
    return job_env(c.framework.env, env)  # the environment's name (for the record), its bin/ on PATH


def worker_cmd(env_name: str) -> list[str]:
    """The job process's command: WORKER_CMD, under the interpreter of environment `env_name`
    (`framework.env`: "default" is this interpreter, any other envs/<name>/bin/python)."""
    return WORKER_CMD if env_name == DEFAULT_ENV else [worker_python(env_name), *WORKER_CMD[1:]]


def install_command(framework: str) -> str:
    """The exact command that installs `framework` (the package's extra) into this Python (in a
    job of `framework.env=NAME`, the job's process is envs/NAME/bin/python: the command installs
    into that environment)."""
    facts = get_facts(framework)
    extra = facts.extra if facts is not None else framework
    py = shlex.quote(sys.executable)
    if (REPO_ROOT / "pyproject.toml").exists():  # a source checkout
        return f"{py} -m pip install -e {shlex.quote(f'{REPO_ROOT}[{extra}]')}"
    return f"{py} -m pip install 'vaebench[{extra}]'"


#: what frameworks say when an allocation fails (torch: RuntimeError "can't allocate memory",
#: "CUDA out of memory"; TensorFlow: ResourceExhaustedError "OOM when allocating"; JAX:
#: "RESOURCE_EXHAUSTED: Out of memory"; NumPy: MemoryError "Unable to allocate")
_OOM = re.compile(r"out of memory|can't allocate memory|cannot allocate memory|unable to allocate|"
                  r"oom when allocating|resource_exhausted|resourceexhausted|bad_alloc", re.IGNORECASE)


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or bool(_OOM.search(f"{type(exc).__name__}: {exc}"))


def set_memory_limit(mb: int) -> None:
    """Cap this process's data segment (heap and private writable mappings) at `mb` MiB
    (0: no cap). RLIMIT_DATA, not RLIMIT_AS: address space that TensorFlow and JAX reserve
    without writing it does not count, so they still start."""
    if mb > 0:
        limit = mb * 2**20
        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))


def _with_partial(job: Job, metrics: dict[str, Any]) -> dict[str, Any]:
    """`metrics`, or the partial metrics the job saved if it returned none."""
    if metrics:
        return metrics
    saved = read_partial(job.record_path)
    return {**saved, "partial": True} if saved else {}


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
                f"framework {job.framework!r} is not installed; install it with: {install_command(job.framework)}"
            )
        result: Result = MEASURES[job.measure].run(c, job)
        status, error, metrics = result.status, result.error, result.metrics
        env.update(result.backend_env)
        env["framework_isa"] = framework_isa(job.framework)  # what decides float32 results here
    except FrameworkUnavailable as exc:
        status, error = "unavailable", str(exc)
        if "install it with" not in error:  # importable module missing (e.g. optax): the same command fixes it
            error += f"; install it with: {install_command(job.framework)}"
    except DeviceUnavailable as exc:
        status, error = "unavailable", str(exc)
    except Diverged as exc:  # a NaN or inf training loss: what was saved stays, marked partial
        status, error = "diverged", str(exc)
        metrics = _with_partial(job, metrics)
    except Exception as exc:  # the record must say what went wrong, in one line
        traceback.print_exc()
        status, error = "failed", f"{type(exc).__name__}: {exc}".splitlines()[0]
        if is_out_of_memory(exc):
            error = f"out of memory{_limit_note(job.config)}: {error}"
        elif _memory_limit_mb(job.config):  # allocations failing under a cap surface as odd errors too
            error += f" (under framework.memory_limit_mb={_memory_limit_mb(job.config)}: out of memory?)"
        metrics = _with_partial(job, metrics)
    return job_record(job, status, error, env, metrics)


def _memory_limit_mb(config: dict[str, Any]) -> int:
    return int((config.get("framework") or {}).get("memory_limit_mb") or 0)


def _limit_note(config: dict[str, Any]) -> str:
    mb = _memory_limit_mb(config)
    return f" (framework.memory_limit_mb={mb})" if mb else ""


def job_record(job: Job, status: str, error: str | None, env: dict[str, Any],
               metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    return make_record(run_id=job.run_id, measure=job.measure, framework=job.framework, mode=job.mode,
                       status=status, error=error, config=job.config, env=env, metrics=metrics)


def _exit_with_parent(poll_s: float = 1.0) -> None:
    """End this job (and its process group) when the process that started it dies: a killed
    `vaebench` leaves no worker computing on. Its partial metrics stay beside the record.
    The parent is the one `run_job` names (so a parent that died while this process started
    counts too), else whoever started this process."""
    parent = int(os.environ.get(PARENT_ENV) or os.getppid())

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:  # our own group only when we lead it (run_job starts a new session)
                if os.getpgrp() == os.getpid():
                    os.killpg(os.getpgrp(), signal.SIGKILL)
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m harness.worker JOB.json", file=sys.stderr)
        return 2
    job = read_spec(Path(argv[0]))
    if in_slurm_task():  # SLURM signals every process of the task: the vaebench that started this one stops it
        for sig in (signal.SIGTERM, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_IGN)
    _exit_with_parent()
    set_memory_limit(_memory_limit_mb(job.config))  # before any framework is imported
    write_record(Path(job.record_path), run_in_process(job))
    partial_path(job.record_path).unlink(missing_ok=True)  # the record holds the final metrics now
    return 0


# --- parent side ------------------------------------------------------------------------


def _describe_exit(code: int, config: dict[str, Any] | None = None) -> str:
    limit = _memory_limit_mb(config or {})
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = ""
        if limit and -code in (signal.SIGKILL, signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS):
            hint = f" (out of memory? framework.memory_limit_mb={limit})"
        elif -code == signal.SIGKILL:
            hint = " (killed: by a user, or by the kernel when out of memory)"
        return f"worker died of {name}{hint}"
    return f"worker exited with code {code}"


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def timeout_message(timeout_s: int) -> str:
    return (f"timed out after {timeout_s} s (framework.timeout_s, counted from the worker's start: "
            "it includes importing the framework and compiling)")


def stop_message(signame: str) -> str:
    """The reason on the record of the job that was running when the run was stopped."""
    if signame == "SIGINT":
        return "interrupted by the user (SIGINT): the run was stopped"
    from harness.slurm import stop_reason

    why = stop_reason(signame)  # inside a SLURM task: cancelled, time limit, pre-empted, node failure
    return f"stopped by {signame}{': ' + why if why else ''}: the run was stopped"


def run_job(job: Job, c: AppConfig, jobs_dir: Path, lock_fd: int | None = None) -> dict[str, Any]:
    """Run `job` in a fresh child process; always leaves a record at job.record_path. `lock_fd`
    (the run's lock, `records.run_lock`) is passed on to the child: the run stays live while
    it runs, even if this process dies first. A stop (KeyboardInterrupt: Ctrl-C, or
    `job.Stopped` on SIGTERM) kills the child, writes the record and is raised again."""
    jobs_dir.mkdir(parents=True, exist_ok=True)
    spec = jobs_dir / f"{job.name}.job.json"
    write_spec(spec, job, started=True)
    record_path = Path(job.record_path)
    record_path.unlink(missing_ok=True)
    partial_path(record_path).unlink(missing_ok=True)  # an earlier attempt's
    tail: list[bytes] = []
    # compile caches start empty for every job, so compile times are cold, not a leftover of an
    # earlier run: a framework that keeps an on-disk cache across processes points it here
    cache_dir = tempfile.mkdtemp(prefix="vaebench-compile-cache-")
    env = child_env(c, job.measure, cache_dir)
    env[PARENT_ENV] = str(os.getpid())  # the worker ends itself if this process dies

    def pump(proc: subprocess.Popen[bytes]) -> None:  # forward the child's stderr (progress bars) and keep its tail
        assert proc.stderr is not None
        for chunk in iter(lambda: os.read(proc.stderr.fileno(), 4096), b""):  # type: ignore[union-attr]
            sys.stderr.buffer.write(chunk)
            sys.stderr.buffer.flush()
            tail.append(chunk)
            del tail[:-16]

    start = time.monotonic()
    error = None
    stopped: KeyboardInterrupt | None = None
    proc: subprocess.Popen[bytes] | None = None
    reader = None
    try:
        proc = subprocess.Popen([*worker_cmd(c.framework.env), str(spec)], env=env, stderr=subprocess.PIPE, start_new_session=True,
                                pass_fds=() if lock_fd is None else (lock_fd,))
        reader = threading.Thread(target=pump, args=(proc,), daemon=True)
        reader.start()
        code = proc.wait(timeout=c.framework.timeout_s)
        if code != 0:
            error = _describe_exit(code, job.config)
            _kill_group(proc.pid)  # what the worker started (compile workers) dies with it
    except subprocess.TimeoutExpired:
        assert proc is not None
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        error = timeout_message(c.framework.timeout_s)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM to vaebench (job.Stopped)
        if proc is not None:
            _kill_group(proc.pid)
            proc.wait()
        error, stopped = stop_message(stop_signal(exc)), exc
    if reader is not None:
        reader.join(timeout=5)
    shutil.rmtree(cache_dir, ignore_errors=True)
    if record_path.exists():  # written by this worker (removed above): its final word, complete (atomic)
        try:
            rec = read_record(record_path)
        except RecordError as exc:
            error = error or f"worker wrote an unreadable record ({exc})"
        else:  # a kill, timeout or stop after the record was written loses nothing
            partial_path(record_path).unlink(missing_ok=True)
            if stopped is not None:
                raise stopped
            return rec
    last = b"".join(tail).decode(errors="replace").strip().splitlines()
    reason = error or "worker wrote no record"
    if last:
        reason += f"; last output: {last[-1][:300]}"
    metrics = _with_partial(job, {})  # what the job had reached when it died
    env_facts = {**host_env(), **record_facts(c.framework.env)}  # the job's interpreter's, not this one's
    rec = job_record(job, "failed", reason, {**env_facts, "wall_s": round(time.monotonic() - start, 3)}, metrics)
    write_record(record_path, rec)
    partial_path(record_path).unlink(missing_ok=True)
    if stopped is not None:
        raise stopped  # the record is written; the caller stops the suite
    return rec


if __name__ == "__main__":
    sys.exit(main())

"""vaebench inside a SLURM task (`hydra/launcher=slurm`): what its records say about the task,
why it was stopped, and what the submitting side reads of a task that ended.

A sweep submitted with `hydra/launcher=slurm` runs each Hydra job (one config of the sweep) as
one SLURM array task (`hydra_plugins.vaebench_slurm`); inside it, vaebench runs each measure x
framework in a fresh worker process, as on one machine. Here:

- `facts()`: the task's SLURM job id, array ids and node, for every record's `env`;
- `stop_reason(signame)`: why SLURM signalled the task (cancelled, time limit, pre-empted, its
  node failed), read from `scontrol` at the moment the signal came, for the stopped job's record;
- `states(job_ids)`: each task's state as the controller reports it (`scontrol`, which needs no
  accounting database), for the launcher that waits for the tasks.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

#: the states in which a SLURM job has ended (squeue/scontrol's JobState)
ENDED = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE", "SPECIAL_EXIT", "REVOKED"}
#: what each way of ending means, in the words of a record
MEANING = {"CANCELLED": "cancelled (scancel)", "TIMEOUT": "it reached its SLURM time limit",
           "NODE_FAIL": "its node failed", "PREEMPTED": "it was pre-empted", "OUT_OF_MEMORY": "it ran out of memory",
           "BOOT_FAIL": "its node failed to boot", "DEADLINE": "it reached its deadline", "FAILED": "it failed"}


def in_task() -> bool:
    """Whether this process runs inside a SLURM job."""
    return "SLURM_JOB_ID" in os.environ


def task_id() -> str | None:
    """The task's id as squeue and scancel name it: `<array job>_<index>` for an array task."""
    e = os.environ
    if "SLURM_ARRAY_JOB_ID" in e and "SLURM_ARRAY_TASK_ID" in e:
        return f"{e['SLURM_ARRAY_JOB_ID']}_{e['SLURM_ARRAY_TASK_ID']}"
    return e.get("SLURM_JOB_ID")


def facts() -> dict[str, Any]:
    """`{"slurm": {...}}` for a record made inside a SLURM job, else `{}`."""
    if not in_task():
        return {}
    e = os.environ
    return {"slurm": {"job_id": task_id(), "raw_job_id": e.get("SLURM_JOB_ID"), "node": e.get("SLURMD_NODENAME"),
                      "partition": e.get("SLURM_JOB_PARTITION"), "cluster": e.get("SLURM_CLUSTER_NAME"),
                      "cpus_on_node": e.get("SLURM_CPUS_ON_NODE")}}


def _scontrol(job: str) -> list[dict[str, str]]:
    """`scontrol show job -o JOB`, one dict per line (an array job: a line per task, pending
    ones grouped); [] when the controller does not know the job (any more) or cannot be asked."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0:
        return []
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.stdout.splitlines() if line.strip()]


def states(job_ids: list[str]) -> dict[str, dict[str, str]]:
    """`job id -> {"state", "reason", "node"}` for the given ids (`<array>_<index>` or plain),
    as the controller reports them now; an id it does not report is absent."""
    found: dict[str, dict[str, str]] = {}
    for array in sorted({j.split("_")[0] for j in job_ids}):
        for info in _scontrol(array):
            state = {"state": info.get("JobState", "UNKNOWN"), "reason": info.get("Reason", ""),
                     "node": info.get("BatchHost") or info.get("NodeList", "")}
            task = info.get("ArrayTaskId")
            if task is None:
                found[info.get("JobId", array)] = state
            else:
                for index in _indices(task):
                    found[f"{info.get('ArrayJobId', array)}_{index}"] = state
    return {j: found[j] for j in job_ids if j in found}


def _indices(spec: str) -> list[int]:
    """`3`, `1-4`, `[0-5%2]`, `1,3-4` as the indices they name."""
    out: list[int] = []
    for part in spec.strip("[]").split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit():
            out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def describe(job_id: str, state: dict[str, str]) -> str:
    """A task's end in a record's words: `SLURM task 7_2 on node vm: its node failed (NODE_FAIL)`."""
    s = state.get("state", "UNKNOWN")
    why = MEANING.get(s, s.lower())
    reason = state.get("reason", "")
    extra = f", {reason}" if reason and reason not in ("None", s) else ""
    node = f" on node {state['node']}" if state.get("node") else ""
    return f"SLURM task {job_id}{node}: {why} ({s}{extra})"


def _seconds(t: str) -> float | None:
    """SLURM's `[days-]hours:minutes:seconds` (or `minutes:seconds`) in seconds; None for UNLIMITED."""
    days, _, clock = t.rpartition("-")
    try:
        parts = [int(x) for x in clock.split(":")]
    except ValueError:
        return None
    while len(parts) < 3:
        parts.insert(0, 0)
    return (int(days) if days else 0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]


def stop_reason(signame: str) -> str:
    """Why SLURM signalled this task, e.g. `SLURM task 7_2 on node vm: cancelled (scancel)`;
    "" outside SLURM. When the signal comes the controller shows the task COMPLETING: past its
    time limit (RunTime >= TimeLimit) it timed out, else it was cancelled. SIGUSR2 is
    submitit's warning before the time limit (`harness.cli` says it and goes on)."""
    job = task_id()
    if job is None:
        return ""
    node = os.environ.get("SLURMD_NODENAME")
    where = f"SLURM task {job}" + (f" on node {node}" if node else "")
    if signame == "SIGUSR2":
        return f"{where}: its time limit is near (SIGUSR2, hydra.launcher.signal_delay_s before it)"
    info = next(iter(_scontrol(os.environ["SLURM_JOB_ID"])), {})
    state = info.get("JobState", "UNKNOWN")
    if state in MEANING and state != "CANCELLED":
        return f"{where}: {MEANING[state]} ({state})"
    run, limit = _seconds(info.get("RunTime", "")), _seconds(info.get("TimeLimit", "UNLIMITED"))
    if run is not None and limit is not None and run >= limit:
        return f"{where}: it reached its SLURM time limit ({info['TimeLimit']}, TIMEOUT)"
    if state in ("COMPLETING", "CANCELLED"):
        return f"{where}: cancelled (scancel)"
    return f"{where}: signalled by SLURM or a user while {state}"


# --- the submitting side: waiting for the tasks, closing the runs of tasks that ended badly ---


def wait(jobs: list[Any], poll_s: float) -> dict[str, dict[str, str]]:
    """Wait until every task has a result or has ended without one; returns the latter's states.
    A task counts as ended without a result when the controller says it ended and no result
    has appeared 10 s later (a result written as the task ended may take that long on NFS)."""
    pending = {j.job_id: j for j in jobs}
    ended_at: dict[str, float] = {}
    ends: dict[str, dict[str, str]] = {}
    while pending:
        now = states(list(pending))
        for job_id, job in list(pending.items()):
            if job.paths.result_pickle.exists():
                del pending[job_id]
                continue
            state = now.get(job_id) or {"state": job.state}  # forgotten by the controller: sacct, via submitit
            if state["state"].split()[0] in ENDED:
                first = ended_at.setdefault(job_id, time.monotonic())
                if time.monotonic() - first > 10:
                    ends[job_id] = state
                    del pending[job_id]
        if pending:
            time.sleep(poll_s)
    return ends


def close_task_run(run_dir: Path, why: str, overrides: list[str], facts: dict[str, Any], lock_wait_s: float = 600) -> bool:
    """Give every job of the task's run that has no record a `failed` one saying `why`, once
    no process holds the run: a task whose node SLURM gave up on may still be running there
    (its slurmd lost, not its processes) and write its own records; after `lock_wait_s` the
    run is left to `vaebench report`, which gives it its records when it is no longer live.
    Returns False where the task's jobs are left without records (the sweep must exit 1)."""
    from harness.records import close_stopped_run, host_env

    if not (run_dir / "jobs").is_dir():
        print(f"slurm: {why}, before its run began: no records for {' '.join(overrides)}", flush=True)
        return False
    deadline = time.monotonic() + lock_wait_s
    env = {**host_env(), "slurm": facts}
    while (n := close_stopped_run(run_dir, f"{why}: the job did not finish", f"not started: {why}", env)) is None:
        if time.monotonic() > deadline:
            print(f"slurm: {why}, but its run {run_dir} is still live after {lock_wait_s:.0f} s; "
                  f"`vaebench report {run_dir}` gives its jobs their records once it is not", flush=True)
            return False
        time.sleep(1)
    if n:
        print(f"slurm: {why}: {n} job(s) of {run_dir} got a failed record", flush=True)
    return True

"""A job and what a measure's `run` returns: the leaf that measures, worker and CLI share.

Partial metrics: a measure calls `checkpoint(job, metrics)` as it goes (convergence after an
evaluation or epoch, throughput after each batch size). The metrics reached so far are written
atomically beside the record (`partial_path`); if the job then dies (killed, out of memory,
timed out, interrupted, an exception), its `failed` record keeps them, marked
`metrics["partial"] = true` (`harness.worker`). A finished job's record replaces them.

Job specs: `jobs/<name>.job.json` in the run folder, one per job, all written when the run
starts (the run's plan, `write_spec`); the parent writes a job's spec again with `started_at`
when it starts the job's worker. A spec without a record beside it is a job that never ended
(`harness.records.close_unfinished`).
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

#: suffix of the partial-metrics file beside a record (not `.json`, so a folder's records never include it)
PARTIAL_SUFFIX = ".partial"


@dataclass
class Job:
    run_id: str
    measure: str
    framework: str
    mode: str
    config: dict[str, Any]  # resolved AppConfig as a plain dict
    record_path: str

    @property
    def name(self) -> str:
        return Path(self.record_path).stem


class Diverged(Exception):
    """Training reached a NaN or inf loss: the job's record is `diverged`, with this message and
    the metrics it had saved (raised by `harness.measures.common.train`)."""


class Stopped(KeyboardInterrupt):
    """The run was stopped by a signal other than SIGINT (`vaebench` raises it on SIGTERM), and is
    wound up like Ctrl-C; a plain KeyboardInterrupt is SIGINT."""

    def __init__(self, signame: str) -> None:
        super().__init__(signame)
        self.signame = signame


def stop_signal(exc: BaseException) -> str:
    """The name of the signal that stopped the run: SIGTERM (Stopped) or SIGINT (Ctrl-C)."""
    return exc.signame if isinstance(exc, Stopped) else "SIGINT"


def write_spec(path: Path, job: Job, started: bool = False) -> None:
    """Write the job's spec (atomically); `started` adds `started_at`: its worker is starting."""
    from harness.records import write_atomic  # here, so that this module stays a leaf

    spec: dict[str, Any] = asdict(job)
    if started:
        spec["started_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    write_atomic(path, json.dumps(spec, indent=1).encode())


def read_spec(path: Path) -> Job:
    """The job a spec describes (other keys of the spec, such as `started_at`, are ignored)."""
    spec = json.loads(Path(path).read_text())
    return Job(**{f.name: spec[f.name] for f in fields(Job)})


@dataclass
class Result:
    """What a measure's `run` returns."""

    metrics: dict[str, Any]
    status: str = "ok"
    error: str | None = None
    backend_env: dict[str, Any] = field(default_factory=dict)


def partial_path(record_path: str | Path) -> Path:
    """Where the job with this record keeps its partial metrics: `<record>.json.partial`."""
    p = Path(record_path)
    return p.with_name(p.name + PARTIAL_SUFFIX)


def _plain(o: Any) -> Any:
    """JSON fallback for NumPy scalars and arrays (`tolist`); anything else as its repr."""
    return o.tolist() if hasattr(o, "tolist") else repr(o)


def checkpoint(job: Job, metrics: dict[str, Any]) -> None:
    """Save the metrics reached so far (atomically): what a `failed` record keeps if the job
    dies before it returns. NaN and inf are kept (the record writer turns them into JSON)."""
    from harness.records import write_atomic  # here, so that this module stays a leaf

    write_atomic(partial_path(job.record_path), json.dumps(metrics, default=_plain).encode())


def read_partial(record_path: str | Path) -> dict[str, Any] | None:
    """The partial metrics saved for this record, or None (none saved, or unreadable)."""
    try:
        m = json.loads(partial_path(record_path).read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


class Checkpointer:
    """`checkpoint` at most every `every_s` seconds, and at most 5% of the time (a write that
    took d seconds waits 20 d before the next), so a run with many short epochs or large
    metrics does not spend its time writing; the first call always writes. `metrics` is a
    function building them, called only when a write is due; `force=True` writes regardless."""

    def __init__(self, job: Job, every_s: float = 1.0) -> None:
        self.job, self.every_s = job, every_s
        self.next = -float("inf")

    def __call__(self, metrics: Callable[[], dict[str, Any]], force: bool = False) -> bool:
        t = time.monotonic()
        if not force and t < self.next:
            return False
        checkpoint(self.job, metrics())
        done = time.monotonic()
        self.next = done + max(self.every_s, 20 * (done - t))
        return True

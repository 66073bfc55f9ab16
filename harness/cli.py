"""`vaebench`: compose and validate the Hydra config, run each job in its own process, print
the tables. See `vaebench --help`.

Subcommands: `vaebench report DIR...` rebuilds tables, plots, report.md and report.html from
records; `vaebench compare BASELINE CURRENT` checks two sets of records for regressions.

Exit codes: 0 every job ran and every check passed; 1 a job failed, diverged, was unavailable
or a check broke its tolerance; 2 the config is invalid (nothing was run); 130 stopped by
Ctrl-C (SIGINT), 143 stopped by SIGTERM: the running job's worker is killed, every job of the
run gets its record (the ones not started: `failed`, saying so) and the report is still built.
"""

from __future__ import annotations

import io
import itertools
import os
import re
import shutil
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from harness import slurm
from harness.config import AppConfig, ConfigError, frameworks, record_config, register, validate
from harness.job import Stopped, stop_signal
from harness.records import REPO_ROOT, read_records, write_atomic

CONF_DIR = REPO_ROOT / "conf"
if not OmegaConf.has_resolver("uid"):
    # `${uid:}` in the run and sweep folder names: two runs started in the same second (or
    # microsecond) get different folders. Cached, so every resolution in one run gives one value
    # (the cache travels with the config to the launchers' job processes).
    OmegaConf.register_new_resolver("uid", lambda: uuid.uuid4().hex[:6], use_cache=True)
_EXIT = {"code": 0}
_SWEEP: dict[str, Path] = {}  # the folder of the sweep running in this process (basic launcher)
_NO_RUN_FLAGS = {"--help", "-h", "--hydra-help", "--version", "--info", "-i", "--cfg", "-c", "--shell-completion", "-sc"}


# --- validation before anything runs ------------------------------------------------------


def _parse_error(override: str, message: str) -> str:
    """An override Hydra's grammar rejects: which one, and (for a value with non-ASCII letters,
    which only a quoted value may hold) the same override quoted."""
    key, sep, value = override.partition("=")
    quoted = re.sub(r"[^\s,\[\]{}()=:]+", lambda m: m[0] if m[0].isascii() else f'"{m[0]}"', value)
    if sep and quoted != value:
        return (f"{override}: the override could not be parsed: an unquoted value may hold only ASCII "
                f"characters; quote it: '{key}={quoted}'")
    return f"{override}: the override could not be parsed ({message.splitlines()[0]})"


def _one_line(exc: BaseException) -> str:
    """A config error as `key: problem`, whatever layer raised it."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(exc, ConfigError):
        return str(exc)
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if isinstance(e, ConfigError):
            return str(e)
        if isinstance(e, OmegaConfBaseException) and getattr(e, "full_key", None):
            msg = str(getattr(e, "msg", None) or e).splitlines()[0]
            return f"{e.full_key}: {msg}"
    for e in chain:
        if isinstance(e, OverrideParseException):
            return _parse_error(e.override, e.message)
        found = re.search(r"Could not find '([^']+)/([^'/]+)'", str(e))
        if isinstance(e, MissingConfigException) and found and e.options:
            group, name = found.groups()
            return f"{group}: no option {name!r}; choose from {', '.join(sorted(e.options))}"
    return str(exc).strip().splitlines()[0]


def _combinations(overrides: list[str], multirun: bool) -> list[list[str]]:
    """Every override list a sweep would compose (capped), so each can be validated."""
    if not multirun:
        return [overrides]
    from hydra.core.override_parser.overrides_parser import OverridesParser

    choices: list[list[str]] = []
    for o in OverridesParser.create().parse_overrides(overrides):
        if o.is_sweep_override():
            key = o.get_key_element()
            choices.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            choices.append([o.input_line or ""])
    return [list(c) for c in itertools.islice(itertools.product(*choices), 256)]


def _refuse_side_by_side(cfg: DictConfig, launcher: str, timed: list[str]) -> None:
    """Timing next to other jobs means nothing: refuse a launcher that runs jobs side by side
    (joblib, submitit, SLURM without `exclusive`) for a timed measure."""
    target = str(cfg.hydra.launcher.get("_target_", ""))
    if target.endswith("BasicLauncher"):
        return
    if "slurm" in target.lower():
        if cfg.hydra.launcher.get("exclusive"):
            return
        raise ConfigError("hydra/launcher", f"{launcher} may put two tasks on one node, and {', '.join(timed)} timed next "
                          "to another job means nothing; set hydra.launcher.exclusive=true (sbatch --exclusive), or "
                          "parallel_throughput=true to time it anyway")
    raise ConfigError("hydra/launcher", f"{launcher} runs jobs side by side, and {', '.join(timed)} timed next to other "
                      "jobs means nothing; run it with the basic launcher, or set parallel_throughput=true to time it anyway")


def prevalidate(args: list[str]) -> int:
    """Compose the config exactly as Hydra will and validate it; raise ConfigError. Returns
    how many jobs (measure x framework) the run or sweep will start."""
    from hydra import compose, initialize_config_dir

    from harness import measures

    multirun = any(a in ("-m", "--multirun") for a in args)
    overrides = [a for a in args if not a.startswith("-")]
    launcher = next((a.split("=", 1)[1] for a in overrides if a.startswith("hydra/launcher=")), "basic")
    total = 0
    try:
        combos = _combinations(overrides, multirun)
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            for combo in combos:
                c = validate(compose(config_name="config", overrides=combo))
                total += len(c.measure.names) * len(frameworks(c))
                if multirun and launcher == "slurm" and shutil.which("sbatch") is None:
                    raise ConfigError("hydra/launcher", "slurm submits with sbatch, which is not on PATH: install a SLURM "
                                      "client (scripts/slurm-local install starts a one-node cluster)")
                timed = [n for n in c.measure.names if measures.timing(n)]
                if multirun and launcher != "basic" and timed and not c.parallel_throughput:
                    _refuse_side_by_side(compose(config_name="config", overrides=combo, return_hydra_config=True),
                                         launcher, timed)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError("config", _one_line(exc)) from exc
    return total


# --- running ------------------------------------------------------------------------------


class _Tee(io.TextIOBase):
    """A text stream that also appends what it is given to the run's log file (and a `buffer`
    that does the same for bytes: the workers' stderr is forwarded as bytes)."""

    def __init__(self, stream: Any, log: Any) -> None:
        self.stream, self.log = stream, log

    def write(self, s: str) -> int:
        self.stream.write(s)
        self.log.write(s)
        return len(s)

    def flush(self) -> None:
        self.stream.flush()
        self.log.flush()

    def isatty(self) -> bool:
        return bool(self.stream.isatty())

    @property
    def buffer(self) -> Any:
        tee = self

        class _Bytes:
            def write(self, b: bytes) -> int:
                tee.stream.buffer.write(b)
                tee.log.write(b.decode(errors="replace"))
                return len(b)

            def flush(self) -> None:
                tee.flush()

        return _Bytes()


def resume_index(out_dir: Path) -> dict[str, dict[str, Any]]:
    """config hash -> the newest `ok` record under `out_dir`."""
    from harness.records import config_hash

    index: dict[str, dict[str, Any]] = {}
    for r in read_records(out_dir) if out_dir.is_dir() else []:
        if r["status"] == "ok":
            index[config_hash(r)] = r
    return index


def _adopt(rec: dict[str, Any], dest: Path) -> None:
    """Copy an earlier `ok` record (and its arrays file) into this run, unchanged."""
    src = Path(rec["_file"])
    if src.resolve() == dest.resolve():
        return
    arrays = (rec.get("metrics") or {}).get("arrays")
    if isinstance(arrays, str) and (src.parent / arrays).exists():
        write_atomic(dest.parent / arrays, (src.parent / arrays).read_bytes())
    write_atomic(dest, src.read_bytes())


def _sweep_progress(sweep_dir: Path | None) -> str:
    """`done, failed, left` over the whole sweep, from the records on disk (any launcher)."""
    total = int(os.environ.get("VAEBENCH_SWEEP_TOTAL", "0"))
    if sweep_dir is None or not total:
        return ""
    recs = read_records(sweep_dir) if sweep_dir.is_dir() else []
    failed = sum(r["status"] != "ok" for r in recs)
    return f"sweep: {len(recs)} done, {failed} failed, {max(total - len(recs), 0)} left | "


def run_suite(c: AppConfig, resolved: dict[str, Any], run_dir: Path, sweep_dir: Path | None = None) -> int:
    """Run every job of the config into `run_dir` (one process each) and build the run's report;
    returns the exit code. The run holds `run_dir`'s lock throughout and writes every job's spec
    before the first job starts, so a job whose vaebench dies still gets its record later
    (`records.recover_stopped_runs`, done here over `out_dir` first). Ctrl-C or SIGTERM kills the
    running job's worker, gives every job not run a `failed` record saying so, builds the report
    and returns 128 + the signal (130, 143)."""
    from harness import report
    from harness.envs import record_facts
    from harness.job import Job, write_spec
    from harness.measures import precision, version
    from harness.records import close_unfinished, config_hash, host_env, run_lock
    from harness.spec import resolve_mode
    from harness.worker import run_job, stop_message

    report.recover([Path(c.out_dir)], say_live=False)
    run_id = f"{run_dir.name}-{uuid.uuid4().hex[:6]}"
    jobs = []
    for measure in c.measure.names:
        for fw in frameworks(c):
            mode = resolve_mode(fw, c.framework.mode)
            path = run_dir / f"{measure}-{fw}-{mode}-{precision(measure, c)}.json"
            # what the measure reads (and the neutral keys): its record keeps it, and its job gets no more
            jobs.append(Job(run_id, measure, fw, mode, record_config(resolved, measure), str(path)))
    records = []
    stopped: KeyboardInterrupt | None = None
    n_failed = 0
    with run_lock(run_dir) as lock:  # the run is live while this process (or a worker of it) holds the lock
        try:
            for job in jobs:  # the run's plan, before anything runs
                write_spec(run_dir / "jobs" / f"{job.name}.job.json", job)
            if c.resume:
                index = resume_index(Path(c.out_dir))
                todo = []
                for job in jobs:
                    done = index.get(config_hash({"measure": job.measure, "measure_version": version(job.measure),
                                                  "framework": job.framework, "mode": job.mode, "config": job.config}))
                    if done is None:
                        todo.append(job)
                    else:
                        _adopt(done, Path(job.record_path))
                print(f"resume: skipped {len(jobs) - len(todo)} of {len(jobs)} jobs that already have an ok record of "
                      f"the same config under {c.out_dir}; running {len(todo)}", flush=True)
                jobs = todo
            for i, job in enumerate(jobs, 1):
                print(f"{_sweep_progress(sweep_dir)}[{i}/{len(jobs)}] {job.measure}: {job.framework} ({job.mode}, "
                      f"{precision(job.measure, c)}) | {i - 1} done, {n_failed} failed, {len(jobs) - i + 1} left",
                      flush=True)
                rec = run_job(job, c, run_dir / "jobs", lock)
                if rec["status"] != "ok":
                    n_failed += 1
                    print(f"  -> {rec['status']}: {rec['error']}", flush=True)
                records.append(rec)
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (job.Stopped)
            stopped, name = exc, stop_signal(exc)
            close_unfinished(run_dir, stop_message(name), f"not started: the run was stopped by {name} before this job began",
                             {**host_env(), **record_facts(c.framework.env)})
            print(f"  -> stopped by {name}: the remaining jobs were not started (each has a failed record saying so)",
                  flush=True)
        text, ok, _ = report.build(run_dir)  # from the records on disk, as anyone can rebuild them
    print()
    print(report.console(text.split("\n## Results\n", 1)[-1].strip(), run_dir))
    print()
    print(f"records and report: {run_dir} (report.md, report.html)")
    lines = report.answers(read_records(run_dir))
    if lines:
        print("\nAnswers:")
        for line in lines:
            print(f"  {line}")
    if stopped is not None:
        return 128 + signal.Signals[stop_signal(stopped)]
    return 0 if ok and all(r["status"] == "ok" for r in records) else 1


def sweep_report(sweep_dir: Path) -> int:
    """One combined report over every run of a sweep, written into the sweep folder; returns
    the sweep's exit code (0, or 1: a record not ok, a measure failed, or no records)."""
    from harness import report

    recs = report.load([sweep_dir]) if sweep_dir.is_dir() else []
    if not recs:
        print(f"sweep: no records under {sweep_dir}", flush=True)
        return 1
    _, ok, _ = report.build(sweep_dir, recs)
    bad = [r for r in recs if r["status"] != "ok"]
    print(f"\nsweep report ({len(recs)} records: {len(recs) - len(bad)} ok, {len(bad)} not ok): "
          f"{sweep_dir / 'report.md'}, {sweep_dir / 'report.html'}", flush=True)
    return 0 if ok and not bad else 1


class SweepReport(Callback):
    """At the end of a `-m` sweep (any launcher): one combined report over every run of the
    sweep, written into the sweep folder, and the sweep's exit code."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        _EXIT["code"] = max(_EXIT["code"], sweep_report(Path(str(config.hydra.sweep.dir))))


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    c = validate(cfg)
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    sweep_dir = Path(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None
    if sweep_dir is not None:
        _SWEEP["dir"] = sweep_dir
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    run_dir.mkdir(parents=True, exist_ok=True)
    if slurm.in_task():  # SLURM's SIGTERM (scancel, time limit, node lost) stops this task's run
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGUSR2, _time_limit_near)  # submitit would requeue the task: its run would restart
    os.environ.setdefault("VAEBENCH_TTY", "1" if sys.stderr.isatty() else "0")  # workers draw bars only on a terminal
    with open(run_dir / "cli.log", "a", encoding="utf-8") as log:  # the run's log holds what it printed
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(out, log), _Tee(err, log)
        try:
            code = run_suite(c, {str(k): v for k, v in resolved.items()}, run_dir, sweep_dir)
        finally:
            sys.stdout, sys.stderr = out, err
    _EXIT["code"] = max(_EXIT["code"], code)
    if code > 128 and slurm.in_task():  # one SLURM task stopped (scancel, time limit): the sweep goes on
        return
    if code > 128:  # stopped: a sweep stops too
        name = signal.Signals(code - 128).name
        raise KeyboardInterrupt if name == "SIGINT" else Stopped(name)


def _time_limit_near(signum: int, frame: Any) -> None:
    """submitit's warning before a SLURM task's time limit (sbatch --signal, up to a minute early):
    said, and the run goes on; SLURM's SIGTERM at the limit stops it (`_stop`)."""
    print(f"slurm: {slurm.stop_reason('SIGUSR2')}; the running job goes on until SLURM stops it", file=sys.stderr,
          flush=True)


def _stop(signum: int, frame: Any) -> None:
    """SIGTERM (`timeout`, a scheduler, `kill`) stops the run as Ctrl-C does."""
    raise Stopped(signal.Signals(signum).name)


SUBCOMMANDS = {"report": "harness.report", "compare": "harness.compare", "history": "harness.history",
               "env": "harness.envs"}


def main() -> None:
    args = sys.argv[1:]
    if args and args[0] in SUBCOMMANDS:  # `vaebench report DIR...`, `vaebench compare BASE CUR`
        import importlib

        sys.exit(importlib.import_module(SUBCOMMANDS[args[0]]).main(args[1:], prog=f"vaebench {args[0]}"))
    register()
    if not any(a in _NO_RUN_FLAGS or a.startswith("--cfg") for a in args):
        try:
            os.environ["VAEBENCH_SWEEP_TOTAL"] = str(prevalidate(args))
        except ConfigError as exc:
            print(f"vaebench: config error: {exc.message if exc.key == 'config' else exc}", file=sys.stderr)
            sys.exit(2)
    signal.signal(signal.SIGTERM, _stop)
    try:
        _hydra_main()
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: the stopped run has its records and report
        if "dir" in _SWEEP:  # and a stopped sweep its combined report, over the runs it made
            sweep_report(_SWEEP["dir"])
        sys.exit(128 + signal.Signals[stop_signal(exc)])
    sys.exit(_EXIT["code"])


if __name__ == "__main__":
    import harness.cli  # one module object: the sweep callback (imported by name) sets ITS exit code

    harness.cli.main()

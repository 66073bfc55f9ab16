"""`vaebench`: compose and validate the Hydra config, run each job in its own process, print
the tables. See `vaebench --help`.

Exit codes: 0 every job ran and every check passed; 1 a job failed, diverged, was unavailable
or a check broke its tolerance; 2 the config is invalid (nothing was run).
"""

from __future__ import annotations

import itertools
import re
import sys
import uuid
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from harness.config import AppConfig, ConfigError, frameworks, record_config, register, validate
from harness.records import REPO_ROOT

CONF_DIR = REPO_ROOT / "conf"
_EXIT = {"code": 0}
_NO_RUN_FLAGS = {"--help", "-h", "--hydra-help", "--version", "--info", "-i", "--cfg", "-c", "--shell-completion", "-sc"}


# --- validation before anything runs ------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    """A config error as `key: problem`, whatever layer raised it."""
    from hydra.errors import MissingConfigException
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


def prevalidate(args: list[str]) -> None:
    """Compose the config exactly as Hydra will and validate it; raise ConfigError."""
    from hydra import compose, initialize_config_dir

    multirun = any(a in ("-m", "--multirun") for a in args)
    overrides = [a for a in args if not a.startswith("-")]
    try:
        combos = _combinations(overrides, multirun)
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            for combo in combos:
                validate(compose(config_name="config", overrides=combo))
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError("config", _one_line(exc)) from exc


# --- running ------------------------------------------------------------------------------


def run_suite(c: AppConfig, resolved: dict[str, Any], run_dir: Path) -> int:
    from harness import report
    from harness.job import Job
    from harness.measures import precision
    from harness.spec import resolve_mode
    from harness.worker import run_job

    run_id = f"{run_dir.name}-{uuid.uuid4().hex[:6]}"
    jobs = []
    for measure in c.measure.names:
        for fw in frameworks(c):
            mode = resolve_mode(fw, c.framework.mode)
            path = run_dir / f"{measure}-{fw}-{mode}-{precision(measure, c)}.json"
            jobs.append(Job(run_id, measure, fw, mode, record_config(resolved), str(path)))
    records = []
    interrupted = False
    for i, job in enumerate(jobs, 1):
        print(f"[{i}/{len(jobs)}] {job.measure}: {job.framework} ({job.mode}, {precision(job.measure, c)})", flush=True)
        try:
            rec = run_job(job, c, run_dir / "jobs")
        except KeyboardInterrupt:
            print("  -> interrupted: the remaining jobs were not started", flush=True)
            interrupted = True
            break
        if rec["status"] != "ok":
            print(f"  -> {rec['status']}: {rec['error']}", flush=True)
        records.append(rec)
    text, ok, plots = report.build(run_dir)  # from the records on disk, as anyone can rebuild them
    print()
    print(text)
    for p in plots:
        print(f"plot: {p}")
    print(f"records: {run_dir}")
    if interrupted:
        return 130
    return 0 if ok and all(r["status"] == "ok" for r in records) else 1


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    c = validate(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    _EXIT["code"] = max(_EXIT["code"], run_suite(c, {str(k): v for k, v in resolved.items()}, run_dir))


def main() -> None:
    register()
    args = sys.argv[1:]
    if not any(a in _NO_RUN_FLAGS or a.startswith("--cfg") for a in args):
        try:
            prevalidate(args)
        except ConfigError as exc:
            print(f"vaebench: config error: {exc.message if exc.key == 'config' else exc}", file=sys.stderr)
            sys.exit(2)
    _hydra_main()
    sys.exit(_EXIT["code"])


if __name__ == "__main__":
    main()

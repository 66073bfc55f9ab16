from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from harness.config import AppConfig, to_app_config
from harness.frameworks import registry

ROOT = Path(__file__).resolve().parent.parent
#: the registered frameworks (`harness.frameworks`), in their declared order: tests iterate these,
#: never a list of names written out
FRAMEWORKS: tuple[str, ...] = tuple(registry())


def each_framework(*, slow: Iterable[str] = ()) -> list[Any]:
    """The registered frameworks as pytest parameters, those named in `slow` marked slow (a
    framework's own speed: a new framework is fast until it says otherwise)."""
    return [pytest.param(f, marks=pytest.mark.slow) if f in set(slow) else f for f in FRAMEWORKS]


def framework_modes(*, eager: bool = True, compiled: bool = True, skip: Iterable[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """(framework, mode) for every registered framework's modes: eager, its compiled ones, or both;
    less those in `skip`."""
    leave = set(skip)
    return [(n, m) for n, f in registry().items() for m in f.modes
            if (eager if m == "eager" else compiled) and (n, m) not in leave]


def adam_convention(framework: str) -> str:
    """Where `framework`'s Adam adds eps (`FrameworkFacts.adam_convention`)."""
    return registry()[framework].adam_convention


def make_config(**sections: object) -> AppConfig:
    """The schema's defaults merged with nested overrides, e.g. make_config(model={"hidden": [32]});
    progress bars off. Not validated: tests call `validate` where they mean it."""
    return to_app_config({"progress": False, **sections})


def run_cli(*args: str, out_dir: Path, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """`vaebench ARGS out_dir=...` in a subprocess, as a user would run it."""
    e = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", *args, f"out_dir={out_dir}", "progress=false"],
        cwd=ROOT,
        env=e,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def cli(tmp_path: Path):  # type: ignore[no-untyped-def]
    def _run(*args: str, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, out_dir=tmp_path / "runs", env=env, timeout=timeout)

    _run.out_dir = tmp_path / "runs"  # type: ignore[attr-defined]
    return _run


#: a test measured over this many seconds (setup + call + teardown, DURATIONS) is marked slow:
#: `make test-fast` (-m "not slow") leaves it to `make test`, so the edit-test loop stays short
SLOW_S = 1.0
#: a test not marked slow that takes over this many seconds is named at the end of every run
#: (CI's log included): a drift of `make test-fast` that `make durations` should re-measure
DRIFT_S = 10.0
#: each test's measured seconds (setup + call + teardown, a quiet 2-core machine), written by
#: `make durations` (pytest --store-durations): what marks a test slow, by measurement
DURATIONS = ROOT / "tests" / "durations.json"
_UNMARKED: list[tuple[float, str]] = []
_MEASURED: dict[str, float] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--store-durations", action="store_true",
                     help=f"store each test's duration in {DURATIONS.relative_to(ROOT)} (the tests run update theirs)")


def measured_durations() -> dict[str, float]:
    """{test node id: seconds} from DURATIONS ({} where there is none yet)."""
    try:
        return {k: float(v) for k, v in json.loads(DURATIONS.read_text()).items()}
    except FileNotFoundError:
        return {}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test measured over SLOW_S seconds (DURATIONS) is marked slow; a test not measured yet
    is fast until it is (the summary names it if it takes longer), or marked slow by hand."""
    times = measured_durations()
    for item in items:
        if times.get(item.nodeid, 0.0) > SLOW_S:
            item.add_marker(pytest.mark.slow)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _MEASURED[report.nodeid] = _MEASURED.get(report.nodeid, 0.0) + report.duration
    if report.when == "teardown" and _MEASURED[report.nodeid] > DRIFT_S and "slow" not in report.keywords:
        _UNMARKED.append((_MEASURED[report.nodeid], report.nodeid))


def pytest_sessionfinish(session: pytest.Session) -> None:
    """With --store-durations: the tests of this run get their measured time in DURATIONS (the
    others keep theirs), sorted, so a re-measured subset updates the file in place."""
    worker = hasattr(session.config, "workerinput")  # under pytest-xdist the controller writes
    if session.config.getoption("--store-durations", default=False) and _MEASURED and not worker:
        times = {**measured_durations(), **{k: round(v, 2) for k, v in _MEASURED.items()}}
        DURATIONS.write_text(json.dumps(dict(sorted(times.items())), indent=0) + "\n")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Name the tests not marked slow that took over DRIFT_S seconds, so a drift of `make
    test-fast` shows in every run (CI's log included) rather than in someone's patience."""
    if _UNMARKED:
        terminalreporter.section(f"tests over {DRIFT_S:.0f} s not marked slow")
        for d, nodeid in sorted(_UNMARKED, reverse=True):
            terminalreporter.write_line(f"{d:7.1f} s  {nodeid}")


SLURM_LOCAL = ROOT / "scripts" / "slurm-local"


def _free_port_pair() -> int:
    """A port p with p and p + 1 free (the local cluster's controller and node)."""
    import random
    import socket

    for _ in range(100):
        p = random.randrange(20000, 30000, 2)
        try:
            for q in (p, p + 1):
                with socket.socket() as s:
                    s.bind(("", q))
        except OSError:
            continue
        return p
    raise RuntimeError("no two free ports next to each other")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterable[dict[str, str]]:
    """A single-node SLURM cluster of its own (`scripts/slurm-local`, in a temporary folder, on
    free ports), up for the session; yields the environment that reaches it (SLURM_CONF,
    SLURM_LOCAL_DIR). Skips only where SLURM is not installed, and fails there instead when
    VAEBENCH_REQUIRE_SLURM=1 (CI, which installs it)."""
    import shutil

    missing = [b for b in ("slurmctld", "slurmd", "munged", "sbatch") if shutil.which(b) is None]
    if missing:
        why = f"SLURM is not installed ({', '.join(missing)} missing): scripts/slurm-local install"
        if os.environ.get("VAEBENCH_REQUIRE_SLURM") == "1":
            pytest.fail(why)
        pytest.skip(why)
    d = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_LOCAL_DIR": str(d), "SLURM_LOCAL_PORT": str(_free_port_pair()),
           "SLURM_CONF": str(d / "slurm.conf")}
    subprocess.run([str(SLURM_LOCAL), "start"], env=env, check=True, timeout=120)
    try:
        yield env
    finally:
        subprocess.run([str(SLURM_LOCAL), "stop"], env=env, timeout=120)

from __future__ import annotations

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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """End-to-end CLI runs and the benchmarks (run once each with timing disabled) are slow:
    `make test-fast` (-m "not slow") leaves them to `make test`."""
    for item in items:
        path = Path(str(item.fspath))
        if path.name == "test_cli.py" or path.parent.name == "bench" or "cli" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
        # the state API in compiled modes: eager covers the logic fast, the compiled ones compile
        if path.name == "test_state.py" and any(m in item.name for m in ("-xla-", "-jit-", "compiled", "-function-")):
            item.add_marker(pytest.mark.slow)


#: a test over this many seconds (its call, on a quiet 2-core machine) belongs under `slow`
SLOW_S = 10.0
_UNMARKED: list[tuple[float, str]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" and report.duration > SLOW_S and "slow" not in report.keywords:
        _UNMARKED.append((report.duration, report.nodeid))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Name the tests not marked slow that took over SLOW_S seconds, so a drift of `make
    test-fast` shows in every run (CI's log included) rather than in someone's patience."""
    if _UNMARKED:
        terminalreporter.section(f"tests over {SLOW_S:.0f} s not marked slow")
        for d, nodeid in sorted(_UNMARKED, reverse=True):
            terminalreporter.write_line(f"{d:7.1f} s  {nodeid}")

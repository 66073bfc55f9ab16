from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.config import AppConfig, to_app_config

ROOT = Path(__file__).resolve().parent.parent


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

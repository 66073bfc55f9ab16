from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


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

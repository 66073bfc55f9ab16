"""Overrides Hydra's grammar cannot parse (say a value with a non-ASCII letter): one line that
says so and how to quote the value, exit 2, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli import prevalidate
from harness.config import ConfigError, register
from tests.conftest import ROOT

register()


@pytest.mark.parametrize("args,quoted", [
    (["framework=tørch"], "'framework=\"tørch\"'"),
    (["-m", "framework=tørch,jax"], "'framework=\"tørch\",jax'"),
])
def test_non_ascii_value_says_how_to_quote_it(tmp_path: Path, args: list[str], quoted: str) -> None:
    out = tmp_path / "runs"
    r = subprocess.run([sys.executable, "-m", "harness.cli", *args, f"out_dir={out}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"vaebench: config error: {args[-1]}: the override could not be parsed")
    assert lines[0].endswith(f"quote it: {quoted}") and "Exception" not in lines[0], lines[0]
    assert not out.exists()


def test_the_quoted_value_parses() -> None:
    """The quoting suggested gets past the parser: the value then meets the real check."""
    with pytest.raises(ConfigError, match=r"quote it: 'framework=\"tørch\"'"):
        prevalidate(["framework=tørch"])
    with pytest.raises(ConfigError, match=r"^config: framework: no option 'tørch'; choose from all, jax"):
        prevalidate(['framework="tørch"'])


def test_other_parse_errors_name_the_override() -> None:
    with pytest.raises(ConfigError, match=r"model\.hidden=\[32: the override could not be parsed \(no viable alternative"):
        prevalidate(["model.hidden=[32"])

"""The harness core is framework-neutral: importing it (and `vaebench --help`) loads none of
torch, tensorflow, jax."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

CHECK = """
import sys
{body}
loaded = sorted({{'torch', 'tensorflow', 'jax', 'jaxlib', 'keras', 'optax'}} & set(sys.modules))
print('LOADED', loaded)
"""


def _loaded(body: str) -> str:
    r = subprocess.run([sys.executable, "-c", CHECK.format(body=body)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1]


def test_import_harness_loads_no_framework() -> None:
    body = "import harness, harness.cli, harness.report, harness.worker, harness.data, harness.reference\n"
    body += "import harness.measures.convergence, harness.measures.common"
    assert _loaded(body) == "LOADED []"


def test_help_loads_no_framework() -> None:
    body = (
        "sys.argv = ['vaebench', '--help']\n"
        "from harness.cli import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
    )
    out = _loaded(body)
    assert out == "LOADED []"


def test_help_lists_groups_and_options() -> None:
    r = subprocess.run([sys.executable, "-m", "harness.cli", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for line in ("framework: all, jax, tensorflow, torch", "measure: ", "model: linear, mlp", "data: digits"):
        assert line in r.stdout, line
    assert "Exit codes" in r.stdout

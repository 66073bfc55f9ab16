"""The harness core is framework-neutral: importing it (and `vaebench --help`, and a framework's
declaration `impls.<name>`) loads no framework."""

from __future__ import annotations

import subprocess
import sys

import pytest

from harness.api import FRAMEWORK_MODULES
from harness.models import MODELS
from tests.conftest import FRAMEWORKS, ROOT

#: every registered framework's module, and the companions they bring
HEAVY = sorted({*FRAMEWORK_MODULES.values(), "jaxlib", "keras", "optax"})
CHECK = f"""
import sys
{{body}}
loaded = sorted(set({HEAVY!r}) & set(sys.modules))
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
    for line in (f"framework: {', '.join(sorted(['all', *FRAMEWORKS]))}", "measure: ", f"model: {', '.join(sorted(MODELS))}", "data: digits"):
        assert line in r.stdout, line
    assert "Exit codes" in r.stdout


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_framework_declaration_loads_no_framework(framework: str) -> None:
    """`import impls.<name>` (its FACTS) imports no framework, also when it is the first import
    (the registry is then built after the declaration has run, not in the middle of it)."""
    body = f"import impls.{framework} as m\nfrom harness.spec import FRAMEWORKS\nassert m.FACTS.name in FRAMEWORKS"
    assert _loaded(body) == "LOADED []"

"""The shape the code promises (ARCHITECTURE.md): no import cycle in harness/, one registry of
measures whose modules own everything of theirs, and a new measure that plugs in by one module,
one table line and one YAML file."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.measures import MEASURES

ROOT = Path(__file__).resolve().parent.parent


def _module_imports(path: Path, package: str) -> set[str]:
    """harness modules imported at module level (imports inside functions and under
    `if TYPE_CHECKING:` run later or never, so they cannot form an import-time cycle)."""
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("harness"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("harness"):
            base = node.module
            for a in node.names:  # `from harness import data` names a module; `from harness.x import f` does not
                sub = f"{base}.{a.name}"
                found.add(sub if (ROOT / (sub.replace(".", "/") + ".py")).exists() else base)
    return found - {package}


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for path in (ROOT / "harness").rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        package = name if rel.name == "__init__" else name.rsplit(".", 1)[0]
        graph[name] = _module_imports(path, package)
    # MEASURES names its modules as strings: those edges are real too
    graph["harness.measures"] |= {m.__name__ for m in MEASURES.values()}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_harness_has_no_import_cycle() -> None:
    graph = import_graph()
    assert graph["harness.schema"] == set(), "schema.py must stay a leaf"
    assert "harness.spec" in graph and graph["harness.spec"] <= {"harness.schema"}, "spec.py builds on the leaf schema.py only"
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])
    # and the detector finds one when there is one
    assert find_cycle({**graph, "harness.spec": {"harness.api"}}) is not None


def test_every_measure_owns_its_parts() -> None:
    for name, module in MEASURES.items():
        assert dataclasses.is_dataclass(module.Config), name
        assert callable(module.run) and callable(module.summarize), name
        assert isinstance(module.PLOTS, dict), name
        assert (ROOT / "conf" / "measure" / f"{name}.yaml").exists(), name
    # nothing outside a measure's module names it (report, worker, config, cli iterate the table)
    for f in ("report.py", "compare.py", "worker.py", "config.py", "cli.py"):
        text = (ROOT / "harness" / f).read_text()
        assert not [n for n in MEASURES if f'"{n}"' in text], f


TOY = '''"""A toy measure: the mean loss of one batch at the canonical weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harness import data
from harness.job import Job, Result
from harness.judged import Judged, finite
from harness.measures.common import Summary, backend, dataset, model_spec
from harness.plots import pyplot, save_png
from harness.schema import setting


@dataclass
class ToyConfig:
    batch: int = setting(16, gt=0)


Config = ToyConfig


def run(c: Any, job: Job) -> Result:
    ds = dataset(c)
    b = backend(c, job.framework, spec=model_spec(c, ds.x_dim))
    x = ds.x_train[: c.measure.toy.batch]
    loss = float(b.terms(x, data.noise((len(x), c.model.latent), c.seed, 0)).loss.mean())
    return Result(metrics={"loss": loss}, backend_env=b.version())


def summarize(records: list[dict[str, Any]]) -> Summary:
    rows = [{"framework": r["framework"], "toy loss": f"{r['metrics']['loss']:.4f}"} for r in records]
    return Summary("Toy measure", rows, all(r["status"] == "ok" and finite(r["metrics"]["loss"]) for r in records))


def plot(records: list[dict[str, Any]], path: Path) -> Path:
    fig, ax = pyplot().subplots()
    ax.bar([r["framework"] for r in records], [r["metrics"]["loss"] for r in records])
    return save_png(fig, path)


PLOTS = {"toy.png": plot}
JUDGED = (Judged("loss", "toy loss"),)
'''


@pytest.mark.slow
def test_a_new_measure_plugs_in_by_one_module_one_line_one_yaml(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for d in ("harness", "impls", "conf"):
        shutil.copytree(ROOT / d, tree / d, ignore=shutil.ignore_patterns("__pycache__"))
    before = {p: p.read_bytes() for p in tree.rglob("*") if p.is_file()}
    (tree / "harness/measures/toy.py").write_text(TOY)
    registry = tree / "harness/measures/__init__.py"
    text = registry.read_text()
    anchor = '        "throughput": "harness.measures.throughput",\n'
    registry.write_text(text.replace(anchor, anchor + '        "toy": "harness.measures.toy",\n'))
    (tree / "conf/measure/toy.yaml").write_text("names: [toy]\n")
    changed = {p for p in tree.rglob("*") if p.is_file() and before.get(p) != p.read_bytes()}
    assert {p.relative_to(tree).as_posix() for p in changed} == {
        "harness/measures/toy.py", "harness/measures/__init__.py", "conf/measure/toy.yaml"}
    assert len(registry.read_text().splitlines()) == len(text.splitlines()) + 1

    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONUNBUFFERED": "1"}
    out = tmp_path / "runs"
    r = subprocess.run([sys.executable, "-m", "harness.cli", "measure=toy", "framework=torch", "measure.toy.batch=8",
                        f"out_dir={out}", "progress=false"], cwd=tree, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "### Toy measure: PASS" in r.stdout
    run_dir = next(out.glob("*/"))
    rec = json.loads(next(run_dir.glob("toy-torch-*.json")).read_text())
    assert rec["status"] == "ok" and rec["config"]["measure"]["toy"] == {"batch": 8}
    assert (run_dir / "toy.png").stat().st_size > 0
    # its config section is validated like any other: a bad value is a one-line config error
    bad = subprocess.run([sys.executable, "-m", "harness.cli", "measure=toy", "measure.toy.batch=0", f"out_dir={out}"],
                         cwd=tree, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "measure.toy.batch: must be > 0" in bad.stderr
    # the report rebuilds it from the records alone
    rep = subprocess.run([sys.executable, "-m", "harness.report", str(run_dir)], cwd=tree, env=env,
                         capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0 and "Toy measure" in rep.stdout, rep.stderr[-2000:]

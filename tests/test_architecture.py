"""The shape the code promises (ARCHITECTURE.md): no import cycle in harness/, one registry of
measures whose modules own everything of theirs, and a new measure that plugs in by one module,
one table line and one YAML file; one registry of frameworks (`harness.frameworks`, declared in
`impls/<name>/__init__.py`), no framework named anywhere in harness/, and a new framework that
plugs in by files under impls/<name>/ and one YAML file."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.frameworks import registry
from harness.measures import MEASURES, REQUIRED, check

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
    # spec.py builds the framework registry when it is imported: it imports every declaration
    # (impls/<name>/__init__.py), which must not lead back into spec
    for name in registry():
        graph[f"impls.{name}"] = _module_imports(ROOT / "impls" / name / "__init__.py", f"impls.{name}")
        graph["harness.spec"].add(f"impls.{name}")
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
    declarations = {f"impls.{name}" for name in registry()}
    assert graph["harness.schema"] == set(), "schema.py must stay a leaf"
    assert graph["harness.frameworks"] == set(), "frameworks.py (the registry) must stay a leaf"
    assert all(graph[d] <= {"harness.frameworks"} for d in declarations), \
        {d: graph[d] for d in declarations}  # a declaration imports only the registry's leaf
    assert "harness.spec" in graph and graph["harness.spec"] <= {"harness.schema", "harness.frameworks", *declarations}, \
        "spec.py builds on the leaves schema.py and frameworks.py (and the declarations) only"
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])
    # and the detector finds one when there is one: in the harness, or through a declaration
    assert find_cycle({**graph, "harness.spec": {"harness.api"}}) is not None
    assert find_cycle({**graph, next(iter(declarations)): {"harness.api"}}) is not None


def test_every_measure_owns_its_parts() -> None:
    for name, module in MEASURES.items():
        assert all(hasattr(module, a) for a in REQUIRED), name
        assert dataclasses.is_dataclass(module.Config) and dataclasses.is_dataclass(module.METRICS), name
        assert callable(module.run) and callable(module.summarize) and callable(module.answer), name
        assert module.compared is None or callable(module.compared), name
        assert isinstance(module.PLOTS, dict) and isinstance(module.VERSION, int), name
        assert (ROOT / "conf" / "measure" / f"{name}.yaml").exists(), name
    # nothing outside a measure's module names it (report, worker, config, cli iterate the table)
    for f in ("report.py", "compare.py", "worker.py", "config.py", "cli.py"):
        text = (ROOT / "harness" / f).read_text()
        assert not [n for n in MEASURES if f'"{n}"' in text], f


def test_a_measure_without_compared_is_refused_by_name() -> None:
    import types

    full = types.ModuleType("harness.measures.fake")
    for a in REQUIRED:
        setattr(full, a, getattr(MEASURES["identity"], a))
    assert check("fake", full) is full
    full.compared = None  # declared: nothing to compare
    assert check("fake", full) is full
    del full.compared  # not declared at all
    with pytest.raises(TypeError, match="measure 'fake' .* does not declare compared"):
        check("fake", full)


@pytest.mark.slow
def test_mypy_checks_the_measure_contract(tmp_path: Path) -> None:
    """The registry is typed `dict[str, Measure]`: a measure module that drops `compared` (or
    changes a signature) is a mypy error, not a surprise in `vaebench compare`."""
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "harness", tree / "harness", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "impls", tree / "impls", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")

    def mypy() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"), "harness/measures"],
                              cwd=tree, capture_output=True, text=True, timeout=600)

    assert mypy().returncode == 0
    f = tree / "harness/measures/identity.py"
    f.write_text(f.read_text().replace("\ndef compared(", "\ndef compared_by_another_name("))
    r = mypy()
    assert r.returncode == 1 and '"Measure"' in r.stdout, r.stdout[-2000:]


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
from harness.metrics import plain
from harness.plots import pyplot, save_png
from harness.schema import setting


@dataclass
class ToyConfig:
    batch: int = setting(16, gt=0)


Config = ToyConfig


@dataclass
class ToyMetrics:
    loss: float


METRICS = ToyMetrics


def run(c: Any, job: Job) -> Result:
    ds = dataset(c)
    b = backend(c, job.framework, spec=model_spec(c, ds))
    x = ds.x_train[: c.measure.toy.batch]
    loss = float(b.terms(x, data.noise((len(x), c.model.latent), c.seed, 0)).loss.mean())
    return Result(metrics=plain(ToyMetrics(loss=loss)), backend_env=b.version())


def summarize(records: list[dict[str, Any]]) -> Summary:
    rows = [{"framework": r["framework"], "toy loss": f"{r['metrics']['loss']:.4f}"} for r in records]
    return Summary("Toy measure", rows, all(r["status"] == "ok" and finite(r["metrics"]["loss"]) for r in records))


def plot(records: list[dict[str, Any]], path: Path) -> Path:
    fig, ax = pyplot().subplots()
    ax.bar([r["framework"] for r in records], [r["metrics"]["loss"] for r in records])
    return save_png(fig, path)


PLOTS = {"toy.png": plot}
JUDGED = (Judged("loss", "toy loss"),)
QUESTION = "What is the toy loss?"
READS = ("framework", "seed", "model", "data", "measure.toy")
VERSION = 1
compared = None  # nothing to compare: said, not omitted


def answer(records: list[dict[str, Any]]) -> str:
    return ", ".join(f"{r['framework']}: {r['metrics']['loss']:.4f}" for r in records)
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
    imports = "from harness.measures import conformance, convergence, gaps, gradflow, identity, snr, throughput\n"
    anchor = '    "throughput": throughput,\n'
    assert imports in text and anchor in text
    registry.write_text(text.replace(imports, imports[:-1] + ", toy\n").replace(anchor, anchor + '    "toy": toy,\n'))
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


# --- frameworks ------------------------------------------------------------------------------


def framework_names(source: str, names: set[str]) -> list[str]:
    """Where `source` names a framework of `names` (its name or its module: `FrameworkFacts.name`,
    `.module`), as "line N: ...": an import of it (at any depth, inside functions too), or a
    string constant that says it as a word (a key, a comparison, a message; f-strings included).
    Docstrings and comments are free to mention any framework."""
    tree = ast.parse(source)
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)
                  and isinstance(n.body[0].value.value, str)}
    word = re.compile(r"\b(" + "|".join(sorted(map(re.escape, names))) + r")\b", re.IGNORECASE)
    found = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            found += [f"line {n.lineno}: import {a.name}" for a in n.names if a.name.split(".")[0] in names]
        elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0 and n.module.split(".")[0] in names:
            found.append(f"line {n.lineno}: from {n.module} import ...")
        elif isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings and word.search(n.value):
            found.append(f"line {n.lineno}: {n.value[:80]!r}")
    return found


def _registered_names() -> set[str]:
    return {x for f in registry().values() for x in (f.name, f.module)}


def test_harness_names_no_framework() -> None:
    """Every framework fact lives in its declaration (impls/<name>/__init__.py): nothing under
    harness/ imports a framework or spells its name in code."""
    names = _registered_names()
    found = {p.relative_to(ROOT).as_posix(): hits for p in sorted((ROOT / "harness").rglob("*.py"))
             if (hits := framework_names(p.read_text(), names))}
    assert found == {}, found


def test_the_name_check_finds_what_harness_used_to_say() -> None:
    """The check above, on lines harness/ held before the registry (it fails on each), and on
    what it must leave alone."""
    names = _registered_names()
    caught = [
        'COLORS = {"torch": "tab:red", "tensorflow": "tab:orange", "jax": "tab:blue"}',
        'Framework = Literal["torch", "tensorflow", "jax"]',
        'convention = "keras" if framework == "tensorflow" and opt_name == "adam" else "standard"',
        'cached = any(r["framework"] == "torch" and r["mode"] == "compiled" for r in recs)',
        'note = " (torch.compile reuses its in-process cache for later seeds)"',
        'msg = f"{x} differs from TensorFlow\'s"',
        'def _jax_isa():\n    import jax.numpy as jnp\n    return {}',
        'def probe():\n    from tensorflow.python.util import _pywrap_util_port',
    ]
    for line in caught:
        assert framework_names(line, names), line
    free = [
        '"""Docstrings may say torch, tensorflow and jax."""\nx = 1  # and comments: torch',
        'def f():\n    """torch.compile, like jax.jit."""\n    return "TORCHINDUCTOR_CACHE_DIR", "jax2x", "keras"',
        'from harness import frameworks\nname = f"impls.{framework}.backend"',
    ]
    for src in free:
        assert not framework_names(src, names), src


JAX2_FACTS = '''"""jax2: JAX again under another name (a test of the framework registry)."""

from harness.frameworks import FrameworkFacts
from impls.jax import env_before_import

FACTS = FrameworkFacts(name="jax2", module="jax", extra="jax", modes=("eager", "jit"), compiled="jit", order=3,
                       color="tab:green", env_before_import=env_before_import)  # no ISA probe: recorded "unknown"
'''
JAX2_BACKEND = '''"""jax2's backend: JAX's, under its own name."""

from typing import ClassVar

from impls.jax.backend import BACKEND as _Jax


class Jax2Backend(_Jax):
    name: ClassVar[str] = "jax2"


BACKEND = Jax2Backend
'''


@pytest.mark.slow
def test_a_new_framework_plugs_in_by_files_under_impls_and_one_yaml(tmp_path: Path) -> None:
    """A 4th framework (JAX under the name jax2) in a copy of the tree: its declaration, its
    backend and its conf/framework YAML, added files only; nothing under harness/ changes. The
    registry lists it, `vaebench framework=jax2 measure=identity` runs it to `ok` with its ISA
    recorded (as "unknown": it declares no probe)."""
    tree = tmp_path / "tree"
    for d in ("harness", "impls", "conf"):
        shutil.copytree(ROOT / d, tree / d, ignore=shutil.ignore_patterns("__pycache__"))
    before = {p: p.read_bytes() for p in tree.rglob("*") if p.is_file()}
    (tree / "impls/jax2").mkdir()
    (tree / "impls/jax2/__init__.py").write_text(JAX2_FACTS)
    (tree / "impls/jax2/backend.py").write_text(JAX2_BACKEND)
    yaml = (tree / "conf/framework/jax.yaml").read_text().replace("name: jax", "name: jax2")
    (tree / "conf/framework/jax2.yaml").write_text(yaml)
    added = {p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.is_file() and p not in before}
    assert added == {"impls/jax2/__init__.py", "impls/jax2/backend.py", "conf/framework/jax2.yaml"}
    assert len(added) <= 6

    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONUNBUFFERED": "1"}
    listed = subprocess.run([sys.executable, "-c", "from harness.api import FRAMEWORKS, COMPILED_ALIAS; "
                             "print(','.join(FRAMEWORKS), COMPILED_ALIAS['jax2'])"],
                            cwd=tree, env=env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert listed.stdout.split() == [",".join([*registry(), "jax2"]), "jit"]
    out = tmp_path / "runs"
    r = subprocess.run([sys.executable, "-m", "harness.cli", "framework=jax2", "measure=identity",
                        "measure.identity.mc_samples=50", "measure.identity.iwae_ks=[1,10]", "measure.identity.n_examples=8",
                        f"out_dir={out}", "progress=false"], cwd=tree, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rec = json.loads(next(next(out.glob("*/")).glob("identity-jax2-*.json")).read_text())
    assert rec["status"] == "ok" and rec["framework"] == "jax2", rec["error"]
    assert rec["env"]["framework_isa"] == {"framework": "jax2", "isa": "unknown"}
    # `framework=all` plans it after the others, in its declared order
    plan = subprocess.run([sys.executable, "-c", "from harness.config import frameworks, to_app_config; "
                           "print(frameworks(to_app_config({'framework': {'name': 'all'}})))"],
                          cwd=tree, env=env, capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0 and plan.stdout.strip() == str([*registry(), "jax2"]), plan.stdout + plan.stderr[-2000:]
    # nothing under harness/ (or anywhere else in the tree) changed
    changed = [p.relative_to(tree).as_posix() for p, b in before.items() if p.read_bytes() != b]
    assert changed == []
    assert not [p for p in (tree / "harness").rglob("*") if p.is_file() and p not in before and "__pycache__" not in p.parts]

"""The framework registry (`harness.frameworks`): each framework declares its facts once, in
`impls/<name>/__init__.py`, and every framework fact the harness uses (modes, availability,
install extra, environment, ISA probe, plot colour, table order, Adam convention, notes) is read
from there. Framework-neutral tests use a made-up framework to show that the harness only asks."""

from __future__ import annotations

import dataclasses
import importlib
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import api, frameworks, plots, spec, worker
from harness.config import FrameworkConfig
from harness.config import frameworks as planned
from harness.frameworks import FrameworkFacts, JobSettings, registry
from harness.measures import conformance
from harness.measures.common import by_framework
from tests.conftest import FRAMEWORKS, make_config


def test_the_registry_is_what_the_harness_exports() -> None:
    facts = registry()
    assert api.FRAMEWORKS == spec.FRAMEWORKS == FRAMEWORKS == tuple(facts) == frameworks.names()
    assert [f.order for f in facts.values()] == sorted(f.order for f in facts.values())
    for name, f in facts.items():
        assert api.FRAMEWORK_MODES[name] == f.modes and api.COMPILED_ALIAS[name] == f.compiled
        assert api.FRAMEWORK_MODULES[name] == f.module
        assert api.resolve_mode(name, "compiled") == f.compiled and api.resolve_mode(name, "eager") == "eager"
        assert set(f.modes) <= set(spec.ALL_MODES)
        assert plots.COLORS.get(name) == f.color
        assert conformance.adam_convention(name) == f.adam_convention
        assert f"[{f.extra}]" in worker.install_command(name)
    # the config's choices: every registered framework, and all of them
    choices = dict(dataclasses.fields(FrameworkConfig)[0].metadata)["choices"]
    assert dataclasses.fields(FrameworkConfig)[0].name == "name" and tuple(choices) == (*FRAMEWORKS, "all")
    assert planned(make_config(framework={"name": "all"})) == list(FRAMEWORKS)
    with pytest.raises(ValueError, match=r"unknown framework 'mxnet'; choose from " + ", ".join(FRAMEWORKS)):
        frameworks.facts("mxnet")
    assert frameworks.get("mxnet") is None and frameworks.rank("mxnet") == len(FRAMEWORKS)


def test_the_declarations_say_what_harness_used_to_hard_code() -> None:
    """The three frameworks' facts, as harness/ held them before the registry."""
    f = registry()
    assert {n: x.modes for n, x in f.items()} == {"torch": ("eager", "compiled"), "tensorflow": ("eager", "function", "xla"),
                                                  "jax": ("eager", "jit")}
    assert {n: x.compiled for n, x in f.items()} == {"torch": "compiled", "tensorflow": "xla", "jax": "jit"}
    assert list(f) == ["torch", "tensorflow", "jax"]
    assert {n: x.color for n, x in f.items()} == {"torch": "tab:red", "tensorflow": "tab:orange", "jax": "tab:blue"}
    assert {n: x.adam_convention for n, x in f.items()} == {"torch": "standard", "tensorflow": "keras", "jax": "standard"}
    assert [n for n, x in f.items() if x.compile_cache_note] == ["torch"]
    assert spec.ALL_MODES == ("eager", "compiled", "function", "xla", "jit")
    s = JobSettings(device="cpu", float64=True, threads=2, cache_dir="/c", inherited={"TF_CPP_MIN_LOG_LEVEL": "0"})
    assert f["jax"].env(s) == {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "JAX_ENABLE_X64": "1", "JAX_PLATFORMS": "cpu"}
    assert f["jax"].env(JobSettings(device="gpu")) == {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    assert f["tensorflow"].env(s) == {"TF_CPP_MIN_LOG_LEVEL": "0", "TF_FORCE_GPU_ALLOW_GROWTH": "true"}
    assert f["tensorflow"].env(JobSettings())["TF_CPP_MIN_LOG_LEVEL"] == "2"
    assert f["torch"].env(s) == {"TORCHINDUCTOR_CACHE_DIR": "/c", "TRITON_CACHE_DIR": "/c/triton"}


def test_facts_are_checked_when_declared() -> None:
    ok = {"name": "newfw", "modes": ("eager", "graph"), "compiled": "graph"}
    f = FrameworkFacts(**ok)  # type: ignore[arg-type]
    assert (f.module, f.extra, f.adam_convention, f.env(JobSettings()), f.isa_probe) == ("newfw", "newfw", "standard", {}, None)
    for bad, match in (({"name": "New-FW"}, "lowercase identifier"), ({"modes": ("graph",)}, "must include eager"),
                       ({"compiled": "eager"}, "other than eager"), ({"compiled": "xla"}, "other than eager"),
                       ({"adam_convention": "keras2"}, "standard, keras"),
                       ({"modes": ("eager", "compiled", "graph")}, "a mode named compiled")):
        with pytest.raises(ValueError, match=match):
            FrameworkFacts(**{**ok, **bad})  # type: ignore[arg-type]


@pytest.fixture
def fake_impls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty package in place of `impls` (the registry rebuilt from it, and back after)."""
    root = tmp_path / "pkgs"
    (root / "fakeimpls").mkdir(parents=True)
    (root / "fakeimpls" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setattr(frameworks, "PACKAGE", "fakeimpls")
    frameworks.registry.cache_clear()
    yield root / "fakeimpls"
    frameworks.registry.cache_clear()
    for m in [m for m in sys.modules if m == "fakeimpls" or m.startswith("fakeimpls.")]:
        del sys.modules[m]


def _declare(pkg: Path, name: str, body: str) -> None:
    (pkg / name).mkdir()
    (pkg / name / "__init__.py").write_text(textwrap.dedent(body))
    importlib.invalidate_caches()


def test_the_registry_finds_the_declarations_in_their_order(fake_impls: Path) -> None:
    """Subpackages with FACTS, ordered by `order` then name; a subpackage without FACTS is not
    a framework; a FACTS of the wrong type or name is an error naming the package."""
    head = "from harness.frameworks import FrameworkFacts\n"
    _declare(fake_impls, "zeta", head + "FACTS = FrameworkFacts(name='zeta', modes=('eager', 'jit'), compiled='jit', order=1)\n")
    _declare(fake_impls, "alpha", head + "FACTS = FrameworkFacts(name='alpha', modes=('eager', 'jit'), compiled='jit', order=2)\n")
    _declare(fake_impls, "beta", head + "FACTS = FrameworkFacts(name='beta', modes=('eager', 'jit'), compiled='jit', order=2)\n")
    _declare(fake_impls, "helpers", "X = 1\n")
    (fake_impls / "loose.py").write_text("FACTS = 1\n")  # a module, not a subpackage: not looked at
    assert frameworks.names() == ("zeta", "alpha", "beta")
    frameworks.registry.cache_clear()
    _declare(fake_impls, "gamma", head + "FACTS = FrameworkFacts(name='delta', modes=('eager', 'jit'), compiled='jit')\n")
    with pytest.raises(ValueError, match=r"fakeimpls.gamma.FACTS.name must be 'gamma'"):
        frameworks.registry()
    (fake_impls / "gamma" / "__init__.py").write_text("FACTS = {'name': 'gamma'}\n")
    del sys.modules["fakeimpls.gamma"]
    frameworks.registry.cache_clear()
    with pytest.raises(TypeError, match=r"fakeimpls.gamma.FACTS must be a harness.frameworks.FrameworkFacts"):
        frameworks.registry()


def test_the_worker_environment_asks_every_framework(monkeypatch: pytest.MonkeyPatch) -> None:
    """`child_env` sets what each registered framework asks for, given the job's settings (a
    made-up framework's variables too), and nothing framework-specific of its own."""
    seen: list[JobSettings] = []

    def env(s: JobSettings) -> dict[str, str]:
        seen.append(s)
        return {"NEWFW_DEVICE": s.device, "NEWFW_X64": str(s.float64), "NEWFW_CACHE": str(s.cache_dir)}

    new = FrameworkFacts(name="newfw", modes=("eager", "graph"), compiled="graph", env_before_import=env)
    real = registry()
    monkeypatch.setattr(worker, "registry", lambda: {**real, "newfw": new})
    c = make_config(framework={"device": "cpu", "threads": 3})
    e = worker.child_env(c, "identity", "/tmp/cache")  # identity computes in float64
    assert e["NEWFW_DEVICE"] == "cpu" and e["NEWFW_X64"] == "True" and e["NEWFW_CACHE"] == "/tmp/cache"
    assert seen[0].threads == 3 and seen[0].inherited.get("PATH") == e.get("PATH")
    settings = JobSettings(device="cpu", float64=True, threads=3, cache_dir="/tmp/cache", inherited=seen[0].inherited)
    for f in real.values():
        assert f.env(settings).items() <= e.items(), f.name
    assert e["CUDA_VISIBLE_DEVICES"] == "" and e["OMP_NUM_THREADS"] == "3"
    e32 = worker.child_env(make_config(framework={"device": "gpu"}, measure={"conformance": {"dtypes": ["float32"]}}),
                           "conformance")
    assert seen[-1].float64 is False and seen[-1].device == "gpu" and seen[-1].cache_dir is None
    assert e32["NEWFW_DEVICE"] == "gpu" and e32["NEWFW_X64"] == "False"


def test_tables_follow_the_declared_order() -> None:
    recs = [{"framework": f, "mode": m} for f in ("mxnet", *reversed(FRAMEWORKS)) for m in ("eager", "b")]
    assert [r["framework"] for r in by_framework(recs)] == [f for f in (*FRAMEWORKS, "mxnet") for _ in range(2)]


def test_a_cold_compile_cache_is_recorded_without_naming_a_framework(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker hands each job an empty cache folder under one neutral variable; the record
    says "cold" from it, whichever framework points its own cache there."""
    from harness import records, worker
    from tests.conftest import make_config

    monkeypatch.delenv(records.COMPILE_CACHE_ENV, raising=False)
    env = worker.child_env(make_config(), "identity", "/tmp/vaebench-compile-cache-x")
    assert env[records.COMPILE_CACHE_ENV] == "/tmp/vaebench-compile-cache-x"
    assert records.COMPILE_CACHE_ENV not in worker.child_env(make_config(), "identity", None)
    monkeypatch.setenv(records.COMPILE_CACHE_ENV, "/tmp/vaebench-compile-cache-x")
    assert records.compile_cache_state() == "cold"
    monkeypatch.delenv(records.COMPILE_CACHE_ENV)
    assert records.compile_cache_state() == "default"

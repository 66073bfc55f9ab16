"""Named environments (`vaebench env`, `framework.env=NAME`): requirement merging, the bad
inputs through the real CLI (a missing environment, one without the framework, one whose harness
is older), what records say of the environment, and a real job under another interpreter.

The environments here are cheap stand-ins built in tmp_path (`fake_env`): a venv without pip
whose site-packages adds this interpreter's (a .pth line), so it holds every package the tests'
own interpreter has, optionally with a framework hidden or an older vaebench's metadata in front.
`VAEBENCH_ENVS_DIR` points the CLI at them."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest
import tomllib

from harness import envs, report
from harness.config import ConfigError, validate
from harness.frameworks import registry
from harness.records import (
    DEFAULT_ENV,
    ENV_NAME_VAR,
    config_hash,
    env_name,
    host_env,
    read_record,
    read_records,
    schema_problem,
    write_record,
)
from tests.conftest import FRAMEWORKS, ROOT, make_config, run_cli

REF = ROOT / "results" / "reference" / "cpu-2core"
#: the framework the tests' jobs use (the registry's first: a test names none)
FW = FRAMEWORKS[0]

#: a site-packages module that makes the named modules look uninstalled (find_spec gives None,
#: importing raises), as tests/test_faults.py hides a framework
_HIDE = """
import importlib.abc, importlib.util, sys
HIDDEN = set({names!r})
_find_spec = importlib.util.find_spec
def find_spec(name, package=None):
    return None if name.split(".")[0] in HIDDEN else _find_spec(name, package)
importlib.util.find_spec = find_spec
class _Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, _Hide())
"""


def fake_env(envs_dir: Path, name: str, *, hide: tuple[str, ...] = (), vaebench: str | None = None,
             overrides: tuple[str, ...] = ()) -> Path:
    """A stand-in environment `envs_dir/name`: a venv (no pip) that sees this interpreter's
    packages; `hide`: modules made to look uninstalled; `vaebench`: the version its own vaebench
    metadata says (in front of the shared one)."""
    where = envs_dir / name
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    site = where / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    assert site.is_dir()
    (site / "base.pth").write_text(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    if hide:
        (site / "_vaebench_hide.py").write_text(_HIDE.format(names=list(hide)))
        (site / "hide.pth").write_text("import _vaebench_hide\n")
    if vaebench is not None:
        meta = site / f"vaebench-{vaebench}.dist-info"
        meta.mkdir()
        (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vaebench\nVersion: {vaebench}\n")
    (where / "env.json").write_text(json.dumps({"name": name, "overrides": list(overrides)}))
    return where


def _cli(tmp_path: Path, *args: str, envs_dir: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, out_dir=tmp_path / "runs", env={envs.ENVS_DIR_VAR: str(envs_dir or tmp_path / "envs")},
                   timeout=timeout)


def _env_cli(*args: str, envs_dir: Path, timeout: int = 120, env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-m", "harness.cli", "env", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, envs.ENVS_DIR_VAR: str(envs_dir), **(env or {})})


def _config_error(r: subprocess.CompletedProcess[str]) -> str:
    """The one line of a config error (exit 2)."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, (r.returncode, r.stderr[-2000:])
    assert lines[0].startswith("vaebench: config error: framework.env: "), lines[0]
    return lines[0]


# --- requirements ------------------------------------------------------------------------------


def test_overrides_replace_the_pin_of_the_same_package_by_canonical_name() -> None:
    base = ["numpy>=1.24", "torch==2.13.0", "jax[cpu]==0.10.2", "optax==0.2.8", "ml_dtypes==0.5", "mlxtend==0.25.0"]
    merged = envs.merge_requirements(base, ["jax[cpu]==0.10.1", "JAXLIB==0.10.1", "Optax>=0.2.5", "ml.dtypes==0.4",
                                            " numpy==2.0.0 "])
    # in place where the base had the package, extras and spelling as given; a new package appended
    assert merged == ["numpy==2.0.0", "torch==2.13.0", "jax[cpu]==0.10.1", "Optax>=0.2.5", "ml.dtypes==0.4",
                      "mlxtend==0.25.0", "JAXLIB==0.10.1"]
    # extras do not make another package; of two overrides of one package the last counts
    assert envs.merge_requirements(["jax[cpu]==0.10.2"], ["jax==0.9.0", "jax[cuda12]==0.9.1"]) == ["jax[cuda12]==0.9.1"]
    assert envs.merge_requirements(base, []) == base
    assert envs.canonical("Tensorflow_CPU") == "tensorflow-cpu" == envs.requirement_name("tensorflow.cpu[and-cuda]>=2")


def test_a_requirement_that_does_not_parse_is_named() -> None:
    with pytest.raises(envs.EnvError, match=r"'jax\[cpu\]=0.1' is not a requirement"):
        envs.merge_requirements(["jax==0.10.2"], ["jax[cpu]=0.1"])


def test_an_environment_gets_the_base_dependencies_and_the_pins_with_the_overrides() -> None:
    pins = envs.read_requirements((ROOT / "requirements-ci.txt").read_text())
    assert pins and not [p for p in pins if "#" in p or not p.strip()]  # comments (a trailing one too) dropped
    merged = envs.environment_requirements(["jax[cpu]==0.10.1", "jaxlib==0.10.1"])
    names = [envs.requirement_name(r) for r in merged]
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert len(names) == len(set(names))  # one line per package
    assert {envs.requirement_name(d) for d in deps} <= set(names)
    assert {envs.requirement_name(p) for p in pins} <= set(names)
    assert "jax[cpu]==0.10.1" in merged and "jaxlib==0.10.1" in merged and "jax[cpu]==0.10.2" not in merged


def test_the_harness_version_is_the_packages() -> None:
    """What an environment's vaebench is compared with (harness.__version__) is pyproject's version."""
    assert envs.harness_version() == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


# --- bad input through the CLI -------------------------------------------------------------------


def test_a_missing_environment_is_a_config_error_naming_the_command_that_creates_it(tmp_path: Path) -> None:
    r = _cli(tmp_path, f"framework={FW}", "framework.env=nope", "measure=identity")
    line = _config_error(r)
    assert "'nope'" in line and "vaebench env create nope" in line, line
    assert not (tmp_path / "runs").exists()  # nothing written, not even the run folder


def test_a_missing_environment_in_a_sweep_is_refused_before_any_job(tmp_path: Path) -> None:
    r = _cli(tmp_path, "-m", f"framework={FW}", "framework.env=default,nope", "measure=identity",
             f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert "vaebench env create nope" in _config_error(r)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "sweep").exists()


def test_an_environment_with_an_older_harness_is_refused_naming_both_versions(tmp_path: Path) -> None:
    fake_env(tmp_path / "envs", "old", vaebench="0.0.1", overrides=("jax==0.10.1",))
    r = _cli(tmp_path, f"framework={FW}", "framework.env=old", "measure=identity")
    line = _config_error(r)
    assert "vaebench 0.0.1" in line and f"this vaebench {envs.harness_version()}" in line, line
    assert "vaebench env remove old && vaebench env create old jax==0.10.1" in line, line
    assert not (tmp_path / "runs").exists()


def test_validation_refuses_a_bad_name_and_a_half_made_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(envs.ENVS_DIR_VAR, str(tmp_path))
    (tmp_path / "half" / "bin").mkdir(parents=True)  # no env.json: not complete
    for name, says in (("half", "is not a complete environment"), ("../x", "not an environment name"),
                       ("gone", "does not exist")):
        with pytest.raises(ConfigError, match="framework.env") as info:
            validate(make_config(framework={"name": FW, "env": name}, measure={"names": ["identity"]}))
        assert says in str(info.value) and "\n" not in str(info.value), str(info.value)
    validate(make_config(framework={"name": FW, "env": "default"}, measure={"names": ["identity"]}))  # the caller's interpreter: nothing to check


def test_an_environment_without_the_framework_gives_unavailable_with_its_own_install_command(tmp_path: Path) -> None:
    where = fake_env(tmp_path / "envs", "bare", hide=(registry()[FW].module,))
    r = _cli(tmp_path, f"framework={FW}", "framework.env=bare", "measure=identity")
    assert r.returncode == 1, r.stderr[-3000:]
    (rec,) = read_records(tmp_path / "runs")
    assert rec["status"] == "unavailable", rec["error"]
    fix = f"{where / 'bin' / 'python'} -m pip install -e "
    assert fix in rec["error"] and f"[{registry()[FW].extra}]" in rec["error"], rec["error"]
    assert rec["env"]["env_name"] == "bare" and rec["env"]["python_executable"] == str(where / "bin" / "python")


# --- the env subcommand ----------------------------------------------------------------------------


def test_env_list_and_remove(tmp_path: Path) -> None:
    d = tmp_path / "envs"
    r = _env_cli("list", envs_dir=d)
    assert r.returncode == 0 and "no environments" in r.stdout, r.stderr
    fake_env(d, "one")
    fake_env(d, "old", vaebench="0.0.1")
    r = _env_cli("list", envs_dir=d)
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line for line in r.stdout.splitlines()[2:]}
    assert set(rows) == {"one", "old"}
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in rows["one"] and FW in rows["one"], rows
    assert "older than" in rows["old"] and "older than" not in rows["one"], rows
    r = _env_cli("remove", "one", envs_dir=d)
    assert r.returncode == 0 and not (d / "one").exists() and (d / "old").exists(), r.stderr
    assert not [p for p in d.iterdir() if p.name.startswith(".")]  # nothing half-removed left


@pytest.mark.parametrize("args,says", [
    (("create", "default"), "the caller's own interpreter"),
    (("create", "a/b"), "not an environment name"),
    (("create", "x", "jax[cpu]=0.1"), "is not a requirement"),
    (("create", "there"), "exists already; remove it first: vaebench env remove there"),
    (("remove", "nope"), "no environment 'nope'"),
    (("remove", "notanenv"), "is not an environment (no env.json)"),
])
def test_env_bad_arguments_exit_2_with_one_line_and_nothing_made(args: tuple[str, ...], says: str, tmp_path: Path) -> None:
    d = tmp_path / "envs"
    fake_env(d, "there")
    (d / "notanenv").mkdir()
    before = sorted(p.name for p in d.iterdir())
    r = _env_cli(*args, envs_dir=d)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and says in lines[0], r.stderr
    assert lines[0].startswith(f"vaebench env {args[0]}: ")
    assert sorted(p.name for p in d.iterdir()) == before


def test_a_failed_create_leaves_nothing_behind(tmp_path: Path) -> None:
    """The venv step fails (an interpreter that cannot make one): exit 1, no envs/NAME, no
    temporary folder, no env.json anywhere."""
    d = tmp_path / "envs"
    r = _env_cli("create", "broken", "--python", "/bin/false", envs_dir=d)
    assert r.returncode == 1 and "nothing was left behind" in r.stderr, r.stderr
    assert d.is_dir() and not list(d.iterdir())


def test_a_failed_install_leaves_nothing_behind(tmp_path: Path) -> None:
    """pip fails (a wheel that is not there, and no package index: nothing is fetched, with or
    without a network): exit 1, nothing left."""
    d = tmp_path / "envs"
    base = tmp_path / "pins.txt"
    base.write_text("# nothing pinned\n")
    r = _env_cli("create", "nowheel", f"nosuchpkg @ file://{tmp_path}/nosuchpkg-1.0-py3-none-any.whl", "--base",
                 str(base), envs_dir=d, timeout=300, env={"PIP_NO_INDEX": "1"})
    assert r.returncode == 1 and "installing the requirements failed" in r.stderr, r.stderr[-3000:]
    assert d.is_dir() and not list(d.iterdir())


# --- records ---------------------------------------------------------------------------------


def test_host_env_names_the_environment_the_interpreter_and_the_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    env = host_env()
    assert env["env_name"] == DEFAULT_ENV and env["python_executable"] == sys.executable
    assert env["packages"]["numpy"] == env["numpy"]
    monkeypatch.setenv(ENV_NAME_VAR, "jax0101")
    assert host_env()["env_name"] == "jax0101"
    from importlib import metadata

    for name in FRAMEWORKS:  # every installed framework's distribution is listed, with its version
        dists = metadata.packages_distributions().get(registry()[name].module, [])
        for dist in dists:
            assert envs.canonical(dist) in env["packages"], (dist, sorted(env["packages"]))


def _identity_record() -> dict[str, Any]:
    return next(r for r in read_records(REF) if r["measure"] == "identity")


def test_records_with_and_without_an_environment_load_and_hash(tmp_path: Path) -> None:
    """A committed record (from before environments: no framework.env, no env_name) loads and is
    the default environment's; a record of another environment has another config hash and
    makes an `env` column when combined with the default one's."""
    old = _identity_record()
    assert "env_name" not in old["env"] and "env" not in (old["config"].get("framework") or {})
    assert report.variant_keys([old]) == [] and env_name(old) == DEFAULT_ENV
    new = copy.deepcopy(old)
    new["config"]["framework"]["env"] = "default"
    new["env"].update(env_name="default", python_executable=sys.executable, packages={"numpy": "2.0"})
    assert config_hash(new) == config_hash(old)  # the default environment changes no hash
    other = copy.deepcopy(new)
    other["config"]["framework"]["env"] = "jax0101"
    other["env"]["env_name"] = "jax0101"
    assert config_hash(other) != config_hash(old)
    for rec in (new, other):
        stored = {k: v for k, v in rec.items() if k != "_file"}
        assert schema_problem(stored) is None
        path = write_record(tmp_path / f"{rec['env']['env_name']}.json", stored)
        assert read_record(path)["env"]["packages"] == {"numpy": "2.0"}
    assert report.variant_keys([old, other]) == ["env"]
    assert [report.variant_of(r, ["env"]) for r in (old, other)] == [{"env": "default"}, {"env": "jax0101"}]
    kept, dropped = report.newest_per_config([old, new, other])
    assert len(kept) == 2 and len(dropped) == 1  # old and new are one config; other is another


def test_the_reference_report_still_builds(tmp_path: Path) -> None:
    """The committed reference runs (no environment fields) report as before: no env column."""
    r = subprocess.run([sys.executable, "-m", "harness.cli", "report", str(REF), "-o", str(tmp_path / "rep")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode in (0, 1), r.stderr[-2000:]
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "| env " not in text and "env=" not in text


# --- a real job under another interpreter ------------------------------------------------------------


@pytest.mark.slow
def test_a_sweep_over_environments_runs_each_job_under_its_interpreter(tmp_path: Path) -> None:
    """`-m framework.env=default,other`: one job under this interpreter, one under the stand-in
    environment's; each record names its environment and interpreter, and the sweep's report has
    an env column."""
    where = fake_env(tmp_path / "envs", "other")
    sweep = tmp_path / "sweep"
    r = _cli(tmp_path, "-m", f"framework={FW}", "framework.env=default,other", "measure=identity",
             f"hydra.sweep.dir={sweep}", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = {rec["env"]["env_name"]: rec for rec in read_records(sweep)}
    assert set(recs) == {"default", "other"} and all(rec["status"] == "ok" for rec in recs.values())
    assert recs["other"]["env"]["python_executable"] == str(where / "bin" / "python")
    assert recs["default"]["env"]["python_executable"] == sys.executable
    assert recs["other"]["config"]["framework"]["env"] == "other"
    assert recs["other"]["env"]["packages"] == recs["default"]["env"]["packages"]  # the same packages: a stand-in
    text = (sweep / "report.md").read_text()
    assert "| env " in text and "| default " in text and "| other " in text, text


def test_a_create_checks_every_override_against_what_was_installed(tmp_path: Path) -> None:
    """What `env create` checks before it keeps an environment: each requirement given is met by
    the version the environment's interpreter has (a mismatch or an absent package: refused)."""
    where = fake_env(tmp_path / "envs", "probe")
    have = envs.probe(where / "bin" / "python", asked=["numpy", "no-such-package"])
    from importlib import metadata

    numpy = metadata.version("numpy")
    assert have["vaebench"] == envs.harness_version() and have["asked"] == {"numpy": numpy, "no-such-package": None}
    assert have["executable"] == str(where / "bin" / "python")
    envs._check_installed([f"numpy=={numpy}", "numpy>=1", "no-such-package==1; python_version < '3'"], have)
    for line, says in ((f"numpy>{numpy}", f"numpy {numpy} is installed"), ("no-such-package==1", "is not installed")):
        with pytest.raises(envs.EnvError, match=says):
            envs._check_installed([line], have)


def test_a_job_that_dies_in_an_environment_gets_a_record_naming_that_environment(tmp_path: Path) -> None:
    """The parent writes the record of a job whose worker it killed (here: timed out); it names
    the job's environment and interpreter, and the packages that interpreter has, not its own."""
    where = fake_env(tmp_path / "envs", "slow")
    r = _cli(tmp_path, f"framework={FW}", "framework.env=slow", "measure=identity", "framework.timeout_s=1")
    assert r.returncode == 1, r.stderr[-3000:]
    (rec,) = read_records(tmp_path / "runs")
    assert rec["status"] == "failed" and "timed out" in rec["error"], rec["error"]
    assert rec["env"]["env_name"] == "slow" and rec["env"]["python_executable"] == str(where / "bin" / "python")
    assert rec["env"]["packages"] and rec["env"]["packages"]["numpy"] == host_env()["packages"]["numpy"]

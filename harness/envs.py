"""`vaebench env`: named environments, so that any job can run under another release of a
framework (`framework.env=NAME`).

    vaebench env create NAME [REQUIREMENT ...]   # a venv in envs/NAME: the pins, with these instead
    vaebench env list                            # each environment: python, vaebench, framework versions
    vaebench env remove NAME

An environment is a venv under `envs/` (the repository's; `VAEBENCH_ENVS_DIR` moves it) holding
the package's base dependencies (pyproject's `dependencies`) and the pinned frameworks of
requirements-ci.txt, where each REQUIREMENT given replaces the line of the same package (by its
canonical name: `jax[cpu]==0.10.1` replaces `jax[cpu]==0.10.2`; a new name is added), and this
harness installed editable without dependencies (`pip install --no-deps -e .`). The merged list is
kept as envs/NAME/requirements.txt, and envs/NAME/env.json (name, requirements, created, the
harness version) is written only once everything installed: an environment is built in a
temporary folder under envs/ and renamed into place, so a failed or interrupted create leaves
none behind.

A job with `framework.env=NAME` runs its worker process under envs/NAME/bin/python (the default,
`framework.env=default`, is the caller's own interpreter); its record names the environment
(`env.env_name`, `env.python_executable`) and the versions the interpreter had (`env.packages`).
The config is refused (exit 2, before any job) when the environment does not exist, or when the
vaebench it holds is older than the caller's: one run never mixes two harness versions.

Example (a previous release of a framework, then a job in it and one sweep over both):

    vaebench env create jax0101 'jax[cpu]==0.10.1' 'jaxlib==0.10.1'
    vaebench framework=jax framework.env=jax0101 measure=identity
    vaebench -m framework=jax framework.env=default,jax0101 measure=throughput

Exit codes: 0 done; 1 the install failed (nothing was left behind); 2 bad arguments (a bad name,
an environment that exists already or does not exist, a requirement that does not parse).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from harness.records import DEFAULT_ENV, ENV_NAME_VAR, REPO_ROOT, canonical_name, write_atomic

#: environment variable naming the folder environments live in (default: envs/ in the repository)
ENVS_DIR_VAR = "VAEBENCH_ENVS_DIR"
#: the pinned requirements an environment starts from
BASE_REQUIREMENTS = REPO_ROOT / "requirements-ci.txt"
#: the file in an environment that says it is complete
ENV_FILE = "env.json"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class EnvError(Exception):
    """A problem with an environment's name, requirements or contents, said in one line."""


def envs_dir() -> Path:
    """Where environments live: $VAEBENCH_ENVS_DIR, else envs/ in the repository."""
    return Path(os.environ.get(ENVS_DIR_VAR) or REPO_ROOT / "envs").expanduser().absolute()


def env_path(name: str) -> Path:
    return envs_dir() / name


def python_path(name: str) -> Path:
    """The interpreter of environment `name` (not checked)."""
    return env_path(name) / "bin" / "python"


def _shown(path: Path) -> str:
    """`path` relative to the working folder when it lies under it (as a user would type it)."""
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


def harness_version() -> str:
    """The version of the harness code that is running (pyproject's `version`)."""
    from harness import __version__

    return __version__


def name_problem(name: str) -> str | None:
    if name == DEFAULT_ENV:
        return f"{DEFAULT_ENV!r} is the caller's own interpreter, not an environment to create or remove"
    if not _NAME.fullmatch(name):
        return (f"{name!r} is not an environment name: letters, digits and . _ - only, starting with a letter "
                "or digit")
    return None


# --- requirements ---------------------------------------------------------------------------


#: a package name as pip compares them (PEP 503): "Jax_Lib" -> "jax-lib" (the records' own rule)
canonical = canonical_name


def requirement_name(line: str) -> str:
    """The canonical package name of a requirement string (`jax[cpu]==0.10.1` -> `jax`); an
    EnvError naming the string when it does not parse."""
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        return canonical(Requirement(line).name)
    except InvalidRequirement as exc:
        raise EnvError(f"{line!r} is not a requirement ({str(exc).splitlines()[0]}); "
                       "give one as pip takes it, e.g. 'NAME[EXTRA]==VERSION'") from None


def read_requirements(text: str) -> list[str]:
    """The requirement lines of a requirements file's text (comments and blank lines dropped)."""
    out = []
    for raw in text.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if line:
            out.append(line)
    return out


def merge_requirements(base: Iterable[str], overrides: Iterable[str]) -> list[str]:
    """`base` with each of `overrides` in place of the base line of the same package (canonical
    name, extras ignored: `jax[cpu]==0.10.1` replaces `jax[cpu]==0.10.2`, `JAX==0.9` too), a package
    the base lacks appended; of two overrides of one package the last counts."""
    merged: dict[str, str] = {}
    for line in base:
        merged[requirement_name(line)] = line
    for line in overrides:
        merged[requirement_name(line.strip())] = line.strip()
    return list(merged.values())


def base_dependencies() -> list[str]:
    """The package's own base dependencies (pyproject's `project.dependencies`; before Python
    3.11, which reads TOML, those of the installed package's metadata)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        from importlib import metadata

        return [r for r in metadata.requires("vaebench") or [] if ";" not in r]
    data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    return [str(d) for d in data["project"]["dependencies"]]


def environment_requirements(overrides: Sequence[str], base_file: Path = BASE_REQUIREMENTS) -> list[str]:
    """What an environment installs: the base dependencies, then the pins of `base_file`, each
    line replaced by the override of the same package (`merge_requirements`)."""
    return merge_requirements([*base_dependencies(), *read_requirements(base_file.read_text())], overrides)


# --- what an environment holds --------------------------------------------------------------

#: run by an environment's interpreter in isolated mode (`-I`: no PYTHONPATH, no working folder on
#: sys.path), so the vaebench found is the environment's own; then, with the running harness's
#: code first on the path, what `harness.records` records of it
_PROBE = """
import importlib.metadata as m, json, platform, sys
try:
    version = m.version("vaebench")
except m.PackageNotFoundError:
    version = None
out = {"python": platform.python_version(), "executable": sys.executable, "vaebench": version, "asked": {}}
for name in ASKED:
    try:
        out["asked"][name] = m.version(name)
    except m.PackageNotFoundError:
        out["asked"][name] = None
if FULL:
    sys.path.insert(0, REPO)
    try:
        from harness.records import framework_versions, installed_packages
        out["frameworks"] = framework_versions()
        out["packages"] = installed_packages()
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
print(json.dumps(out))
"""


def probe(python: Path, full: bool = False, asked: Sequence[str] = ()) -> dict[str, Any]:
    """What the interpreter `python` has: its Python version, executable and vaebench version
    (None: not installed), the versions of the packages `asked` (`asked`: name -> version or None),
    and with `full` each registered framework's version and every package's
    (`records.installed_packages`). An EnvError when it does not run."""
    code = (_PROBE.replace("FULL", repr(full)).replace("REPO", repr(str(REPO_ROOT)))
            .replace("ASKED", repr(list(asked))))
    try:
        r = subprocess.run([str(python), "-I", "-c", code], capture_output=True, text=True, timeout=300,
                           cwd=tempfile.gettempdir())
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EnvError(f"{_shown(python)} does not run ({exc})") from None
    last = (r.stderr.strip().splitlines() or ["no output"])[-1]
    if r.returncode != 0:
        raise EnvError(f"{_shown(python)} failed (exit {r.returncode}: {last})")
    try:
        out = json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise EnvError(f"{_shown(python)} gave no answer ({last})") from None
    assert isinstance(out, dict)
    return out


@functools.cache
def _cached_probe(python: str, full: bool) -> dict[str, Any]:
    return probe(Path(python), full)


def read_env_file(name: str) -> dict[str, Any]:
    try:
        data = json.loads((env_path(name) / ENV_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EnvError(f"{_shown(env_path(name) / ENV_FILE)} is not readable ({exc})") from None
    if not isinstance(data, dict):
        raise EnvError(f"{_shown(env_path(name) / ENV_FILE)} does not hold an object")
    return data


def _existing() -> list[str]:
    d = envs_dir()
    return sorted(p.name for p in d.iterdir() if not p.name.startswith(".") and (p / ENV_FILE).is_file()) if d.is_dir() else []


def _recreate(name: str, overrides: Sequence[str] = ()) -> str:
    reqs = " ".join(shlex.quote(r) for r in overrides) if overrides else "[REQUIREMENT ...]"
    return f"vaebench env create {name} {reqs}"


def env_problem(name: str) -> str | None:
    """Why a job cannot run in environment `name` (None: it can): not a name, not there, not
    complete, its interpreter does not start, or the vaebench in it is older than this one. One
    line, with the command that fixes it."""
    if name == DEFAULT_ENV:
        return None
    bad = name_problem(name)
    if bad is not None:
        return bad
    where = env_path(name)
    if not (where / ENV_FILE).is_file():
        have = ", ".join(_existing()) or "none"
        what = "is not a complete environment (no env.json)" if where.exists() else "does not exist"
        return (f"environment {name!r} {what} under {_shown(envs_dir())} (environments: {have}); "
                f"create it with: {_recreate(name)}")
    try:
        overrides = [str(r) for r in read_env_file(name).get("overrides") or []]
        found = _cached_probe(str(python_path(name)), False)
    except EnvError as exc:
        return (f"environment {name!r} is broken: {exc}; recreate it: vaebench env remove {name} && "
                f"{_recreate(name)}")
    ours, theirs = harness_version(), found.get("vaebench")
    redo = f"vaebench env remove {name} && {_recreate(name, overrides)}"
    if theirs is None:
        return f"environment {name!r} has no vaebench installed (this one is {ours}); recreate it: {redo}"
    if _older(str(theirs), ours):
        return (f"environment {name!r} has vaebench {theirs}, older than this vaebench {ours} (one run never mixes "
                f"two harness versions); recreate it: {redo}")
    return None


def _older(theirs: str, ours: str) -> bool:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(theirs) < Version(ours)
    except InvalidVersion:
        return theirs != ours


def worker_python(name: str) -> str:
    """The interpreter a job of `framework.env=name` runs under."""
    return sys.executable if name == DEFAULT_ENV else str(python_path(name))


def job_env(name: str, env: dict[str, str]) -> dict[str, str]:
    """A job process's environment variables (`env`) for environment `name`: the name, for its
    record; for a named environment its bin/ first on PATH and VIRTUAL_ENV, as if activated."""
    out = {**env, ENV_NAME_VAR: name}
    if name != DEFAULT_ENV:
        out["VIRTUAL_ENV"] = str(env_path(name))
        out["PATH"] = os.pathsep.join(p for p in (str(env_path(name) / "bin"), env.get("PATH", "")) if p)
    return out


def record_facts(name: str) -> dict[str, Any]:
    """What a record the parent writes (a job that died) says of the job's environment."""
    if name == DEFAULT_ENV:
        return {"env_name": DEFAULT_ENV}
    out: dict[str, Any] = {"env_name": name, "python_executable": str(python_path(name))}
    try:
        facts = _cached_probe(str(python_path(name)), True)
        out.update(python=facts.get("python"), packages=facts.get("packages") or {})
    except EnvError:
        out["packages"] = {}  # the parent's own would be wrong
    return out


# --- the subcommands ------------------------------------------------------------------------


def _relocate(src: Path, dest: Path) -> None:
    """Make the venv built in `src` right for `dest` before it is renamed there: the scripts'
    `#!` lines, the activate scripts and pyvenv.cfg name the folder it was built in."""
    old, new = str(src).encode(), str(dest).encode()
    for f in [*(src / "bin").iterdir(), src / "pyvenv.cfg"]:
        if f.is_file() and not f.is_symlink():
            data = f.read_bytes()
            if old in data and b"\0" not in data[:4096]:
                f.write_bytes(data.replace(old, new))


def _run(cmd: Sequence[str | Path], step: str) -> None:
    """Run one step of a create, its output (pip's progress) shown as it comes."""
    print(f"$ {shlex.join(str(c) for c in cmd)}", flush=True)
    r = subprocess.run([str(c) for c in cmd], cwd=REPO_ROOT)
    if r.returncode != 0:
        raise EnvError(f"{step} failed (exit {r.returncode}; pip's output above says why)")


def _check_installed(overrides: Sequence[str], have: dict[str, Any]) -> None:
    """Every override is what the environment holds (`have`: its probe, the overrides asked), so
    that a job there never measures another release than the one asked for."""
    from packaging.requirements import Requirement

    asked = have.get("asked") or {}
    for line in overrides:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue  # not for this interpreter
        got = asked.get(canonical(req.name))
        if got is None:
            raise EnvError(f"{line!r} was asked for, and {req.name} is not installed")
        if req.specifier and not req.specifier.contains(got, prereleases=True):
            raise EnvError(f"{line!r} was asked for, and {req.name} {got} is installed")
    if have.get("vaebench") is None:
        raise EnvError("vaebench is not installed in it")


def create(name: str, overrides: Sequence[str], *, python: str = sys.executable,
           base_file: Path = BASE_REQUIREMENTS) -> int:
    prog = "vaebench env create"
    bad = name_problem(name)
    if bad is None and env_path(name).exists():
        bad = f"{_shown(env_path(name))} exists already; remove it first: vaebench env remove {name}"
    if bad is None:
        try:
            merged = environment_requirements(overrides, base_file)
        except (EnvError, OSError) as exc:
            bad = str(exc)
    if bad is not None:
        print(f"{prog}: {bad}", file=sys.stderr)
        return 2
    envs_dir().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.creating-", dir=envs_dir()))
    start, done = time.monotonic(), False
    try:
        os.chmod(tmp, 0o755)
        _run([python, "-m", "venv", tmp], "creating the venv")
        header = (f"# environment {name}: {BASE_REQUIREMENTS.name} and the package's base dependencies, with these "
                  f"given instead:\n#   {' '.join(overrides) or '(none)'}\n# installed with: pip install -r "
                  f"requirements.txt; pip install --no-deps -e {REPO_ROOT}\n")
        (tmp / "requirements.txt").write_text(header + "".join(f"{r}\n" for r in merged))
        py = tmp / "bin" / "python"
        _run([py, "-m", "pip", "install", "-r", tmp / "requirements.txt"], "installing the requirements")
        _run([py, "-m", "pip", "install", "--no-deps", "-e", REPO_ROOT], "installing vaebench (editable)")
        have = probe(py, full=True, asked=[requirement_name(r) for r in overrides])
        if "error" in have:
            raise EnvError(f"the harness does not load in it: {have['error']}")
        packages = have.get("packages") or {}
        _check_installed(overrides, have)
        _relocate(tmp, env_path(name))
        info: dict[str, Any] = {"name": name, "overrides": list(overrides), "requirements": merged,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "harness_version": have.get("vaebench"), "python": have.get("python"), "base_python": python,
                "frameworks": have.get("frameworks") or {}, "packages": packages}
        write_atomic(tmp / ENV_FILE, (json.dumps(info, indent=1) + "\n").encode())
        os.rename(tmp, env_path(name))
        done = True
    except (EnvError, OSError) as exc:
        print(f"{prog}: {name}: {exc}; nothing was left behind", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: {name}: interrupted; nothing was left behind", file=sys.stderr)
        return 130
    finally:
        if not done:
            shutil.rmtree(tmp, ignore_errors=True)
    versions = ", ".join(f"{k} {v}" for k, v in (info["frameworks"] or {}).items() if v)
    print(f"\ncreated {_shown(env_path(name))} in {time.monotonic() - start:.0f} s: python {info['python']}, "
          f"vaebench {info['harness_version']}, {versions}\nrun a job in it: vaebench framework.env={name} ...")
    return 0


def list_envs() -> int:
    from tabulate import tabulate

    rows: list[list[Any]] = []
    for name in _existing():
        try:
            info = read_env_file(name)
            have = _cached_probe(str(python_path(name)), True)
        except EnvError as exc:
            rows.append([name, "-", "-", f"broken: {exc}", "-", "-"])
            continue
        fws, theirs = have.get("frameworks") or {}, have.get("vaebench")
        if theirs is None or _older(str(theirs), harness_version()):  # refused by framework.env=NAME
            theirs = f"{theirs or 'none'} (older than {harness_version()}: recreate it)"
        rows.append([name, have.get("python"), theirs,
                     ", ".join(f"{k} {v}" for k, v in fws.items() if v) or have.get("error", "none"),
                     " ".join(info.get("overrides") or []) or "-", info.get("created", "?")])
    if not rows:
        print(f"no environments under {_shown(envs_dir())}; create one with: {_recreate('NAME')}")
        return 0
    print(tabulate(rows, headers=["name", "python", "vaebench", "frameworks", "given", "created"]))
    return 0


def remove(name: str) -> int:
    prog = "vaebench env remove"
    bad = name_problem(name)
    if bad is None and not (env_path(name) / ENV_FILE).is_file():
        bad = (f"no environment {name!r} under {_shown(envs_dir())} (environments: {', '.join(_existing()) or 'none'})"
               if not env_path(name).exists() else f"{_shown(env_path(name))} is not an environment (no {ENV_FILE})")
    if bad is not None:
        print(f"{prog}: {bad}", file=sys.stderr)
        return 2
    # out of the way first (one rename), so a half-removed folder never looks like an environment
    trash = Path(tempfile.mkdtemp(prefix=f".{name}.removing-", dir=envs_dir()))
    os.rename(env_path(name), trash / name)
    shutil.rmtree(trash, ignore_errors=True)
    print(f"removed {_shown(env_path(name))}")
    return 0


def _example() -> str:
    """The module docstring's example: its "Example" paragraph and the commands after it."""
    parts = (__doc__ or "").split("\n\n")
    i = next(i for i, p in enumerate(parts) if p.startswith("Example"))
    return "\n\n".join(parts[i:i + 2])


def main(argv: list[str] | None = None, prog: str = "vaebench env") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    sub = ap.add_subparsers(dest="command", metavar="{create,list,remove}", required=True)
    c = sub.add_parser("create", help="build envs/NAME: the pinned requirements with REQUIREMENTs instead",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Build the environment envs/NAME: a venv with the package's base dependencies "
                       f"and the pins of {BASE_REQUIREMENTS.name}, each REQUIREMENT replacing the pin of the same "
                       "package, and this harness installed editable. Then run a job in it with "
                       "`vaebench framework.env=NAME ...`.",
                       epilog=_example())
    c.add_argument("name", metavar="NAME", help="the environment's name (letters, digits, . _ -)")
    c.add_argument("requirements", metavar="REQUIREMENT", nargs="*",
                   help="a requirement as pip takes it, e.g. 'NAME[EXTRA]==VERSION': replaces the pin of package NAME")
    c.add_argument("--python", default=sys.executable,
                   help="the interpreter the venv is made from (default: this one, %(default)s)")
    c.add_argument("--base", type=Path, default=BASE_REQUIREMENTS,
                   help=f"the pinned requirements file to start from (default: {BASE_REQUIREMENTS.name})")
    sub.add_parser("list", help="each environment: python, vaebench and framework versions, what was given",
                   description="Each environment under envs/: its Python, its vaebench, the version of each "
                   "framework its interpreter has (read from its installed packages' metadata), the requirements "
                   "given to create it and when it was created.")
    r = sub.add_parser("remove", help="delete envs/NAME", description="Delete the environment envs/NAME.")
    r.add_argument("name", metavar="NAME")
    a = ap.parse_args(argv)
    if a.command == "create":
        return create(a.name, a.requirements, python=a.python, base_file=a.base)
    if a.command == "list":
        return list_envs()
    return remove(a.name)

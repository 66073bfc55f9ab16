"""Run records: one JSON file per job, written atomically, with the environment fingerprint."""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import functools
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from harness.job import partial_path, read_partial
from harness.slurm import facts as slurm_facts

SCHEMA_VERSION = 1
STATUSES = ("ok", "failed", "diverged", "unavailable")
REQUIRED = ("schema_version", "run_id", "created_at", "measure", "framework", "mode", "status", "error", "config", "env", "metrics")
REPO_ROOT = Path(__file__).resolve().parent.parent


class RecordError(ValueError):
    pass


def make_record(
    *,
    run_id: str,
    measure: str,
    framework: str,
    mode: str,
    status: str,
    config: dict[str, Any],
    env: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    error: str | None = None,
    measure_version: int | None = None,
) -> dict[str, Any]:
    """A record; `measure_version` defaults to the registered measure's `VERSION` (the code
    that measured is this code: the worker, or the parent writing a job's `failed` record)."""
    if status not in STATUSES:
        raise RecordError(f"status {status!r} is not one of {STATUSES}")
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "measure": measure,
        "measure_version": registered_version(measure) if measure_version is None else measure_version,
        "framework": framework,
        "mode": mode,
        "status": status,
        "error": error,
        "config": config,
        "env": env,
        "metrics": metrics or {},
    }


def _jsonable(o: Any) -> Any:
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_jsonable(v) for v in o]
    if isinstance(o, np.ndarray):
        return _jsonable(o.tolist())
    if isinstance(o, np.generic):
        return _jsonable(o.item())
    if isinstance(o, float) and not math.isfinite(o):
        return NONFINITE_TEXT[0] if math.isnan(o) else NONFINITE_TEXT[1 if o > 0 else 2]
    return o


#: how a record stores NaN, inf and -inf (JSON has no such numbers); `read_record` turns them
#: back into floats, so a measure's summary sees a NaN where the job measured one (older
#: records stored NaN as null)
NONFINITE_TEXT = ("nan", "inf", "-inf")
_FROM_TEXT = {t: float(t) for t in NONFINITE_TEXT}


def decode_nonfinite(o: Any) -> Any:
    """`o` (parsed JSON) with the strings of NONFINITE_TEXT turned back into floats."""
    if isinstance(o, dict):
        return {k: decode_nonfinite(v) for k, v in o.items()}
    if isinstance(o, list):
        return [decode_nonfinite(v) for v in o]
    if isinstance(o, str):
        return _FROM_TEXT.get(o, o)
    return o


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_record(path: Path, record: dict[str, Any]) -> Path:
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise RecordError(f"record lacks {missing}")
    stored = {k: v for k, v in record.items() if not k.startswith("_")}  # `_file` is in-memory only
    write_atomic(path, (json.dumps(_jsonable(stored), indent=1, allow_nan=False) + "\n").encode())
    return path


#: the type of each top-level field of a record (schema version SCHEMA_VERSION)
FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "schema_version": int, "run_id": str, "created_at": str, "measure": str, "framework": str, "mode": str,
    "status": str, "error": (str, type(None)), "config": dict, "env": dict, "metrics": dict,
}
#: top-level fields a record may lack (records written before them): their type when present.
#: `measure_version`: the `VERSION` of the measure's code that wrote the record (an int >= 1,
#: bumped by the measure's author when what it measures changes); absent means 1.
OPTIONAL_TYPES: dict[str, type] = {"measure_version": int}


def schema_problem(rec: Any) -> str | None:
    """Why `rec` is not a record of this schema, or None when it is one."""
    if not isinstance(rec, dict):
        return f"holds a JSON {type(rec).__name__}, not an object"
    missing = [k for k in REQUIRED if k not in rec]
    if missing:
        return f"lacks {', '.join(missing)}"
    if rec["schema_version"] != SCHEMA_VERSION:
        return f"has schema_version {rec['schema_version']!r}; this vaebench reads {SCHEMA_VERSION}"
    for key, typ in FIELD_TYPES.items():
        if not isinstance(rec[key], typ) or (typ is int and isinstance(rec[key], bool)):
            return f"field {key!r} is a {type(rec[key]).__name__}"
    for key, typ in OPTIONAL_TYPES.items():
        if key in rec and (not isinstance(rec[key], typ) or isinstance(rec[key], bool)):
            return f"field {key!r} is a {type(rec[key]).__name__}"
    if rec["status"] not in STATUSES:
        return f"status {rec['status']!r} is not one of {', '.join(STATUSES)}"
    if "measure_version" in rec and rec["measure_version"] < 1:
        return f"has measure_version {rec['measure_version']}; versions start at 1"
    return None


def read_record(path: Path) -> dict[str, Any]:
    """One record, checked against the schema (JSON only: nothing is evaluated)."""
    try:
        rec = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordError(f"{path}: not a readable record ({exc})") from None
    problem = schema_problem(rec)
    if problem:
        raise RecordError(f"{path}: not a vaebench record: it {problem}")
    metrics = decode_nonfinite(rec["metrics"])  # NaN and inf come back as floats (the rest is text)
    return {**rec, "metrics": metrics, "_file": str(Path(path).resolve())}  # where it was read from (not stored)


def read_records(folder: Path | Iterable[Path]) -> list[dict[str, Any]]:
    """All records under `folder` (recursively), or from the given files, oldest first."""
    files = sorted(Path(folder).rglob("*.json")) if isinstance(folder, str | Path) else list(folder)
    records = []
    for f in files:
        if f.name.startswith(".") or ".hydra" in f.parts or f.name.endswith(".partial.json"):
            continue  # temp files of atomic writes, Hydra's own, a running job's checkpoint
        try:
            records.append(read_record(f))
        except RecordError as exc:
            if f.name.endswith(".job.json"):
                continue  # job specs, not records
            print(f"warning: skipped {exc}", file=sys.stderr)
    return sorted(records, key=lambda r: (r["created_at"], r["measure"], r["framework"]))


#: config keys that never tell two measurements apart (where results go, how progress shows)
#: (`framework.env`, the environment whose interpreter ran the job, is kept in the record but is
#: not a measured key: `config_hash` and the report's `env` column read it through `env_name`, so
#: records from before named environments, which lack it, are the default environment's)
NEUTRAL_KEYS = ("out_dir", "progress", "resume", "parallel_throughput", "framework.name", "framework.mode",
                "framework.timeout_s", "framework.memory_limit_mb", "framework.env", "measure.names")


def flat(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as {"a.b.c": value}; lists as compact JSON text."""
    if not isinstance(d, dict):
        return {prefix.rstrip("."): json.dumps(d) if isinstance(d, list) else d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}."))
    return out


def covers(prefix: str, key: str) -> bool:
    """Whether the dotted config key `key` is `prefix` or lies under it ("data" covers
    "data.batch_size", not "database")."""
    return key == prefix or key.startswith(prefix + ".")


def is_read(key: str, reads: Sequence[str]) -> bool:
    """Whether a measure's declaration `reads` (its READS: dotted prefixes, each "-prefix" an
    exception to them) covers the dotted config key `key`."""
    return (any(covers(p, key) for p in reads if not p.startswith("-"))
            and not any(covers(p[1:], key) for p in reads if p.startswith("-")))


def select(config: dict[str, Any], keep: Callable[[str], bool], prefix: str = "") -> dict[str, Any]:
    """The nested `config` with only the leaves whose dotted key `keep` accepts (a section
    left empty is left out)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            inner = select(v, keep, f"{key}.")
            if inner:
                out[k] = inner
        elif keep(key):
            out[k] = v
    return out


def measure_reads(measure: str, config: dict[str, Any]) -> tuple[str, ...] | None:
    """What measure `measure` reads of `config` (`harness.measures.reads`: its current
    declaration, applied to records of any age), or None for a measure that declares nothing
    (or is not registered): then every key but the neutral ones and other measures' sections."""
    from harness.measures import reads  # the registry builds on this module: looked up when asked

    return reads(measure, config)


def registered_version(measure: str) -> int:
    """The registered measure's current `VERSION` (1 for one without, or not registered)."""
    from harness.measures import version  # the registry builds on this module: looked up when asked

    return version(measure)


def measure_version(rec: dict[str, Any]) -> int:
    """The version of the measure's code that wrote `rec` (1 for a record from before versions)."""
    v = rec.get("measure_version", 1)
    return v if isinstance(v, int) and not isinstance(v, bool) else 1


def kept_config(measure: str, config: dict[str, Any]) -> dict[str, Any]:
    """What a record of `measure` keeps of the nested `config`: the keys the measure reads and
    the neutral keys the harness itself needs (the whole `config` for a measure that declares
    nothing)."""
    reads = measure_reads(measure, config)
    if reads is None:
        return config
    return select(config, lambda k: k in NEUTRAL_KEYS or is_read(k, reads))


def measure_row_keys(measure: str) -> tuple[str, ...]:
    """The config keys measure `measure` shows as a column of its own table (its optional
    `ROW_KEYS`), as framework.mode is for every measure: the report and compare keep its records
    of different values in one summary rather than splitting them into variants, and
    `config_hash` still tells them apart."""
    from harness.measures import MEASURES  # the registry builds on this module: looked up when asked

    return tuple(getattr(MEASURES.get(measure), "ROW_KEYS", ()))


def measured_config(rec: dict[str, Any], *, rows: bool = False) -> dict[str, Any]:
    """The flattened config keys that can change what `rec`'s measure measures: the keys its
    measure reads (its current declaration, also for records written before there was one, which
    kept the whole config), less the neutral keys and (unless `rows`) its `ROW_KEYS`. A measure
    that declares nothing: every key but the neutral ones and other measures' sections."""
    config = rec.get("config") or {}
    reads = measure_reads(rec["measure"], config)
    own = f"measure.{rec['measure']}."
    row_keys = () if rows else measure_row_keys(rec["measure"])

    def counts(k: str) -> bool:
        if k in NEUTRAL_KEYS or k in row_keys:
            return False
        if reads is None:
            return not k.startswith("measure.") or k.startswith(own)
        return is_read(k, reads)

    return {k: v for k, v in flat(config).items() if counts(k)}


def env_name(rec: dict[str, Any]) -> str:
    """The environment whose interpreter ran `rec`'s job: its config's `framework.env`, else its
    env's `env_name`, else (a record from before named environments) "default"."""
    framework = (rec.get("config") or {}).get("framework")
    name = framework.get("env") if isinstance(framework, dict) else None
    name = name or (rec.get("env") or {}).get("env_name")
    return name if isinstance(name, str) and name else DEFAULT_ENV


def config_hash(rec: dict[str, Any]) -> str:
    """What `resume=true` matches on: measure, its version, framework, mode, the measured config
    (its `ROW_KEYS` included) and the environment (`env_name`; the default one adds nothing, so
    older records keep their hash)."""
    import hashlib

    key = {"measure": rec["measure"], "measure_version": measure_version(rec), "framework": rec["framework"],
           "mode": rec["mode"], **measured_config(rec, rows=True)}
    if env_name(rec) != DEFAULT_ENV:
        key["env"] = env_name(rec)
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --- runs that stopped: the run's lock, and records for jobs that never ended -----------------

#: a run folder's lock file: `vaebench` holds an advisory lock on it (fcntl.flock) for the whole
#: run, and its workers share it (they inherit the descriptor); the kernel releases it when the
#: last of them dies, even of SIGKILL. A run whose lock can be taken is not live.
LOCK_NAME = ".vaebench.lock"
SPEC_SUFFIX = ".job.json"
#: the errors of a job whose `vaebench` died (killed, or its machine went down) while the job ran,
#: and before it began (`recover_stopped_runs`)
HARNESS_STOPPED = "the harness (vaebench) itself was stopped before this job finished"
HARNESS_STOPPED_EARLY = "not started: the harness (vaebench) itself was stopped before this job began"


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[int]:
    """Hold `run_dir`'s lock while the block runs (waiting while a recovery holds it); yields its
    file descriptor, which `worker.run_job` passes on to a worker to keep the run live with it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


def _take_lock(run_dir: Path) -> int | None:
    """`run_dir`'s lock, taken without waiting (its file descriptor), or None: a live `vaebench`
    (or one of its workers) holds it."""
    fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def spec_record(spec: Path) -> Path:
    """The record of the job planned by `spec`: `<run>/jobs/<name>.job.json` -> `<run>/<name>.json`."""
    return spec.parent.parent / (spec.name.removesuffix(SPEC_SUFFIX) + ".json")


def unfinished(run_dir: Path) -> list[Path]:
    """The specs of the jobs planned in `run_dir` that have no record beside them."""
    return [s for s in sorted((run_dir / "jobs").glob(f"*{SPEC_SUFFIX}")) if not spec_record(s).exists()]


def close_unfinished(run_dir: Path, began: str, not_begun: str, env: dict[str, Any] | None = None) -> int:
    """Write a `failed` record for every job planned in `run_dir` that has none: run_id, measure,
    framework, mode and config from its spec, the metrics it had saved (marked `partial`), and
    the error `began` (its worker had started: the spec says so, or metrics were saved) or
    `not_begun`. Only for a run no live `vaebench` owns, or from the run's own `vaebench`.
    Returns how many records it wrote; an unreadable spec is skipped with a warning."""
    written = 0
    for spec_path in unfinished(run_dir):
        record_path = spec_record(spec_path)
        try:
            spec = json.loads(spec_path.read_text())
            saved = read_partial(record_path)
            rec = make_record(run_id=spec["run_id"], measure=spec["measure"], framework=spec["framework"],
                              mode=spec["mode"], status="failed", config=spec["config"], env=env or {},
                              metrics={**saved, "partial": True} if saved else {},
                              error=began if saved is not None or "started_at" in spec else not_begun)
            problem = schema_problem(rec)
            if problem:
                raise RecordError(f"it would make a record that {problem}")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"warning: skipped job spec {spec_path}: {exc}", file=sys.stderr)
            continue
        write_record(record_path, rec)
        partial_path(record_path).unlink(missing_ok=True)  # the record holds them now
        written += 1
    return written


def close_stopped_run(run_dir: Path, began: str, not_begun: str, env: dict[str, Any] | None = None) -> int | None:
    """`close_unfinished` under the run's lock, taken without waiting (the run is ours then, and
    checked again under it); None where a live `vaebench` or worker holds the lock."""
    fd = _take_lock(run_dir)
    if fd is None:
        return None
    try:
        return close_unfinished(run_dir, began, not_begun, env)
    finally:
        os.close(fd)


def recover_stopped_runs(folder: Path) -> tuple[list[tuple[Path, int]], list[Path]]:
    """Give every job of a stopped run under `folder` (a run or sweep folder, or a folder of
    them) its record: each run folder whose plan has jobs without a record, and whose lock can
    be taken (no live `vaebench` or worker holds it), gets `close_unfinished` with the reason
    that vaebench itself was stopped. Returns the runs recovered, with how many records each
    got, and the live runs left alone. Cheap where every planned job has its record."""
    recovered: list[tuple[Path, int]] = []
    live: list[Path] = []
    for jobs_dir in sorted(folder.rglob("jobs")) if folder.is_dir() else []:
        run_dir = jobs_dir.parent
        if not jobs_dir.is_dir() or not unfinished(run_dir):
            continue
        try:
            n = close_stopped_run(run_dir, HARNESS_STOPPED, HARNESS_STOPPED_EARLY)
            if n is None:
                live.append(run_dir)
                continue
        except OSError as exc:  # a folder we may not write into
            print(f"warning: could not recover the stopped run {run_dir}: {exc}", file=sys.stderr)
            continue
        if n:
            recovered.append((run_dir, n))
    return recovered, live


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


# --- the CPU: what decides which vector kernels run ---------------------------------------

#: CPU features that decide which vector code paths the kernels take, in the order recorded
#: (x86: /proc/cpuinfo "flags"; ARM: "Features"). Two CPUs with the same model name can differ
#: here (e.g. AVX-512 or not), and with them the float32 results of the same program.
VECTOR_FEATURES = (
    "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c",
    "avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl", "avx512ifma", "avx512vbmi", "avx512vbmi2",
    "avx512_vnni", "avx512_bitalg", "avx512_vpopcntdq", "avx512_bf16", "avx512_fp16",
    "avx_vnni", "avx_vnni_int8", "avx_ne_convert", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16",
    "asimd", "asimdhp", "asimddp", "fphp", "sve", "sve2", "bf16", "i8mm", "sme",
)
#: environment variables that cap or pick the ISA (or the code path) the kernels use
ISA_ENV = (
    "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ONEDNN_DEFAULT_FPMATH_MODE", "TF_ENABLE_ONEDNN_OPTS", "XLA_FLAGS",
    "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "MKL_DEBUG_CPU_TYPE", "OPENBLAS_CORETYPE",
)


def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpuinfo_fields(text: str) -> dict[str, str]:
    """`key: value` lines of the first processor block of a /proc/cpuinfo text."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_vector_features(text: str) -> list[str]:
    """The VECTOR_FEATURES a /proc/cpuinfo text lists (x86 `flags`, ARM `Features`), in
    VECTOR_FEATURES order."""
    fields = cpuinfo_fields(text)
    have = set((fields.get("flags", "") + " " + fields.get("Features", "")).split())
    return [f for f in VECTOR_FEATURES if f in have]


def cpu_id(text: str) -> dict[str, str]:
    """Vendor, family, model, stepping and microcode: what tells two CPUs of one model name apart."""
    fields = cpuinfo_fields(text)
    keys = {"vendor": "vendor_id", "family": "cpu family", "model": "model", "stepping": "stepping", "microcode": "microcode",
            "implementer": "CPU implementer", "part": "CPU part", "variant": "CPU variant"}
    return {k: fields[f] for k, f in keys.items() if f in fields}


def isa_env() -> dict[str, str]:
    return {k: os.environ[k] for k in ISA_ENV if k in os.environ}


def _cpu_model(text: str | None = None) -> str:
    model = cpuinfo_fields(_read_cpuinfo() if text is None else text).get("model name")
    return model or platform.processor() or platform.machine()


#: set by the worker to the empty compile-cache folder it gives a job (each framework points its
#: own cache there through `FrameworkFacts.env_before_import`)
COMPILE_CACHE_ENV = "VAEBENCH_COMPILE_CACHE"


def compile_cache_state() -> str:
    """"cold" when the worker gave this job an empty compile cache (worker.run_job), else "default"."""
    return "cold" if os.environ.get(COMPILE_CACHE_ENV) else "default"


#: set by the worker's parent to the name of the environment (`framework.env`) whose interpreter
#: runs the job: `host_env` records it as `env_name` ("default": the caller's own interpreter)
ENV_NAME_VAR = "VAEBENCH_ENV_NAME"
#: `env_name` of a job run by the caller's own interpreter (and of records from before named environments)
DEFAULT_ENV = "default"


def canonical_name(name: str) -> str:
    """A distribution's name as PEP 503 compares them ("Tensorflow_CPU" -> "tensorflow-cpu")."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _plain_requires(requires: Iterable[str] | None, extras: Iterable[str] = ()) -> list[str]:
    """The distribution names among `requires` (metadata requirement strings) that apply here:
    no marker, or a marker true on this interpreter for no extra or one of `extras`."""
    try:
        from packaging.requirements import InvalidRequirement, Requirement
    except ImportError:  # an environment without `packaging`: the requirements without a marker
        return [m[0] for line in requires or () if ";" not in line and (m := re.match(r"[A-Za-z0-9._-]+", line))]
    names = []
    for line in requires or ():
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", *extras)):
            names.append(req.name)
    return names


@functools.lru_cache(maxsize=1)
def installed_packages() -> dict[str, str]:
    """The frameworks and libraries a job's numbers depend on, with the versions this interpreter
    has (the record's `env.packages`; absent ones left out), by canonical name: the distributions
    that provide each registered framework's module, vaebench's own dependencies (base, and each
    framework's extra: an optimizer library) and the framework distributions' own requirements
    (a compiler runtime, Keras ...). Read with importlib.metadata: nothing is imported."""
    from importlib import metadata

    from harness.frameworks import registry

    facts = registry().values()
    provides = metadata.packages_distributions()
    frameworks = [d for f in facts for d in provides.get(f.module, [])]
    try:
        own = _plain_requires(metadata.requires("vaebench"), [f.extra for f in facts])
    except metadata.PackageNotFoundError:  # a source tree that was never installed
        own = []
    names = [*frameworks, *own]
    for dist in dict.fromkeys(frameworks):
        with contextlib.suppress(metadata.PackageNotFoundError):
            names += _plain_requires(metadata.requires(dist))
    out: dict[str, str] = {}
    for name in sorted({canonical_name(n) for n in names}):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def _packages() -> dict[str, str]:
    """`installed_packages()`, or {} where the metadata cannot be read (never a failed job)."""
    try:
        return dict(installed_packages())
    except Exception as exc:  # an odd distribution's metadata: the job goes on without the list
        print(f"warning: the installed packages' versions could not be read ({exc})", file=sys.stderr)
        return {}


def framework_versions() -> dict[str, str | None]:
    """Each registered framework's installed version in this interpreter (None: not installed),
    from the distribution that provides its module."""
    from importlib import metadata

    from harness.frameworks import registry

    provides = metadata.packages_distributions()
    out: dict[str, str | None] = {}
    for name, f in registry().items():
        out[name] = None
        for dist in provides.get(f.module, []):
            with contextlib.suppress(metadata.PackageNotFoundError):
                out[name] = metadata.version(dist)
                break
    return out


def host_env() -> dict[str, Any]:
    """The framework-neutral part of the environment fingerprint: the interpreter's (`env_name`,
    the environment `framework.env` named; `python_executable`; `packages`, every framework and
    library's version), the machine's, the tree's."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    cpuinfo = _read_cpuinfo()
    return {
        "env_name": os.environ.get(ENV_NAME_VAR) or DEFAULT_ENV,
        "python_executable": sys.executable,
        "packages": _packages(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu_model": _cpu_model(cpuinfo),
        "cpu_id": cpu_id(cpuinfo),
        "cpu_features": cpu_vector_features(cpuinfo),
        "cpu_cores": os.cpu_count(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "thread_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "XLA_FLAGS") if k in os.environ},
        "compile_cache": compile_cache_state(),
        "isa_env": isa_env(),
        **slurm_facts(),  # inside a SLURM task: its job id, node and partition
    }

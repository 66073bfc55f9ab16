from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from harness import worker
from harness.config import AppConfig
from harness.measures import MEASURES
from harness.records import (
    REQUIRED,
    RecordError,
    make_record,
    measure_version,
    read_record,
    read_records,
    schema_problem,
    write_record,
)
from tests.conftest import FRAMEWORKS, make_config


def _rec(**kw) -> dict:  # type: ignore[no-untyped-def,type-arg]
    base = dict(run_id="r", measure="convergence", framework="torch", mode="eager", status="ok", config={}, env={})
    return make_record(**{**base, **kw})


def test_write_read_roundtrip(tmp_path: Path) -> None:
    p = write_record(tmp_path / "a.json", _rec(metrics={"x": 1.5, "nan": float("nan"), "inf": float("inf")}))
    r = read_record(p)
    assert all(k in r for k in REQUIRED)
    assert r["metrics"]["x"] == 1.5 and math.isnan(r["metrics"]["nan"]) and r["metrics"]["inf"] == math.inf
    assert '"nan": "nan"' in p.read_text() and '"inf": "inf"' in p.read_text()  # JSON holds them as text
    assert [f.name for f in tmp_path.iterdir()] == ["a.json"]  # no temp file left behind
    assert read_records(tmp_path)[0]["run_id"] == "r"


def test_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = write_record(tmp_path / "a.json", _rec(metrics={"v": 1}))

    def boom(*a: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_record(p, _rec(metrics={"v": 2}))
    assert json.loads(p.read_text())["metrics"] == {"v": 1}  # old record intact
    assert [f.name for f in tmp_path.iterdir()] == ["a.json"]


def test_bad_records_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(RecordError):
        _rec(status="great")
    (tmp_path / "x.json").write_text('{"run_id": 1}')
    with pytest.raises(RecordError, match="lacks"):
        read_record(tmp_path / "x.json")
    assert read_records(tmp_path) == []


def test_measure_version_is_stored_and_optional(tmp_path: Path) -> None:
    """A new record holds its measure's VERSION (`measure_version`); a record from before
    versions (without the field) is still a record, of version 1; anything but an int >= 1 in
    the field is refused by name."""
    rec = _rec()
    assert rec["measure_version"] == MEASURES["convergence"].VERSION and schema_problem(rec) is None
    assert _rec(measure_version=3)["measure_version"] == 3
    old = {k: v for k, v in rec.items() if k != "measure_version"}
    assert schema_problem(old) is None and measure_version(old) == 1 and measure_version(rec) == rec["measure_version"]
    write_record(tmp_path / "old.json", old)
    assert measure_version(read_record(tmp_path / "old.json")) == 1
    for bad in (True, "2", 1.5, None, 0, -1):
        problem = schema_problem({**rec, "measure_version": bad})
        assert problem is not None and "measure_version" in problem, bad
    write_record(tmp_path / "bad.json", {**rec, "measure_version": "2"})
    with pytest.raises(RecordError, match="measure_version"):
        read_record(tmp_path / "bad.json")
    assert [r["_file"] for r in read_records(tmp_path)] == [str((tmp_path / "old.json").resolve())]


def _job(tmp_path: Path, **cfg) -> tuple[worker.Job, AppConfig]:  # type: ignore[no-untyped-def]
    c = make_config(**{**cfg, "framework": {"name": "torch", "timeout_s": 60, **cfg.get("framework", {})}})
    plain = OmegaConf.to_container(OmegaConf.structured(c))
    job = worker.Job("run", "convergence", "torch", "eager", plain, str(tmp_path / "rec.json"))  # type: ignore[arg-type]
    return job, c


def test_hard_crash_gives_failed_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job, c = _job(tmp_path)
    monkeypatch.setattr(worker, "WORKER_CMD", [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    rec = worker.run_job(job, c, tmp_path / "jobs")
    assert rec["status"] == "failed" and "SIGKILL" in rec["error"]
    assert read_record(tmp_path / "rec.json")["status"] == "failed"


def test_timeout_gives_failed_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job, c = _job(tmp_path, framework={"name": "torch", "timeout_s": 1})
    monkeypatch.setattr(worker, "WORKER_CMD", [sys.executable, "-c", "import time; time.sleep(30)"])
    rec = worker.run_job(job, c, tmp_path / "jobs")
    assert rec["status"] == "failed" and "timed out after 1 s" in rec["error"]


def test_exception_in_measure_gives_failed_record_with_reason(tmp_path: Path) -> None:
    job, c = _job(tmp_path, data={"source": "mnist", "path": str(tmp_path / "missing.npz")})
    rec = worker.run_job(job, c, tmp_path / "jobs")
    assert rec["status"] == "failed"
    assert rec["error"].startswith("DataError: data file not found") and "missing.npz" in rec["error"]
    assert rec["env"]["python"] and "git_commit" in rec["env"]


# --- the CPU's vector features and the ISA the kernels chose --------------------------------

FAKE_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
stepping\t: 1
microcode\t: 0xa101148
flags\t\t: fpu vme de pse sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx512_bf16 avx512_vnni avx512vbmi vaes sha_ni xsave
bogomips\t: 4792.81

processor\t: 1
vendor_id\t: AuthenticAMD
flags\t\t: fpu sse2 amx_tile amx_bf16
"""


def test_cpu_features_parsed_from_cpuinfo_text() -> None:
    from harness.records import cpu_id, cpu_vector_features, cpuinfo_fields

    assert cpu_vector_features(FAKE_CPUINFO) == [
        "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl",
        "avx512vbmi", "avx512_vnni", "avx512_bf16",
    ]  # VECTOR_FEATURES order; irrelevant flags and the second processor's ignored
    assert cpuinfo_fields(FAKE_CPUINFO)["model name"] == "AMD EPYC"
    assert cpu_id(FAKE_CPUINFO) == {"vendor": "AuthenticAMD", "family": "25", "model": "17", "stepping": "1", "microcode": "0xa101148"}
    arm = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes sha1 asimdhp asimddp sve sve2 i8mm bf16\nCPU implementer\t: 0x41\n"
    assert cpu_vector_features(arm) == ["asimd", "asimdhp", "asimddp", "sve", "sve2", "bf16", "i8mm"]
    assert cpu_vector_features("") == [] and cpu_id("") == {}


def test_host_env_records_features_of_this_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from harness.records import ISA_ENV, VECTOR_FEATURES, host_env

    for key in ISA_ENV:  # only what this test sets: a machine may set some of them itself (OPENBLAS_CORETYPE)
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    env = host_env()
    assert env["isa_env"] == {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    first = text.split("\n\n")[0]
    flags = set(next((ln.split(":", 1)[1] for ln in first.splitlines() if ln.split(":")[0].strip() in ("flags", "Features")), "").split())
    assert set(env["cpu_features"]) <= flags and set(env["cpu_features"]) == flags & set(VECTOR_FEATURES)
    assert json.loads(json.dumps(env)) == env  # plain JSON


def test_onednn_isa_follows_onednn_order_and_cap() -> None:
    from harness.fingerprint import onednn_isa
    from harness.records import cpu_vector_features

    epyc = cpu_vector_features(FAKE_CPUINFO)
    assert onednn_isa(epyc) == "avx512_core_bf16"
    assert onednn_isa(epyc, "AVX2") == "avx2" and onednn_isa(epyc, "avx512_core") == "avx512_core" and onednn_isa(epyc, "DEFAULT") == "avx512_core_bf16"
    spr = [*epyc, "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "avx_vnni"]
    assert onednn_isa(spr) == "avx10_1_512_amx" and onednn_isa(spr, "AVX512_CORE_FP16") == "avx10_1_512"
    assert onednn_isa(spr, "AVX2_VNNI") == "avx2_vnni"
    assert onednn_isa(["sse4_1", "sse4_2", "avx", "avx2", "fma"]) == "avx2" and onednn_isa(["avx"]) == "avx"
    assert onednn_isa(epyc, "AVX9000").startswith("unknown cap")


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_framework_isa_probe(framework: str) -> None:
    from harness.fingerprint import framework_isa

    r = framework_isa(framework)
    assert r["framework"] == framework and "error" not in r, r
    fp = r["fingerprint"]
    assert "error" not in fp, fp
    assert fp["fma"] in ("fused", "unfused") and float.fromhex(fp["sum"]) != 0.0 and len(fp["matmul"]) == 16
    assert framework_isa(framework)["fingerprint"] == fp  # deterministic in one process
    if framework == "torch":
        assert r["aten_cpu_capability"]  # e.g. AVX512, AVX2, DEFAULT
        import torch

        assert r["aten_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
        if r["aten_cpu_capability"] in ("AVX2", "AVX512"):
            assert fp["fma"] == "fused"  # ATen's vectorized addcmul uses fmadd
    if framework == "tensorflow" and r["onednn_enabled"]:
        assert r["onednn_isa_expected"] and not r["onednn_isa_expected"].startswith("unknown")
    assert json.loads(json.dumps(r)) == r


def test_framework_isa_of_an_unknown_or_unprobed_framework_is_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unregistered framework, one without a probe and one whose probe raises (or returns
    something odd) each record "unknown", with the reason, and never raise: the ISA is a note on
    the record, not a reason to fail its job."""
    import dataclasses

    from harness import frameworks
    from harness.fingerprint import framework_isa

    assert framework_isa("mxnet") == {"framework": "mxnet", "isa": "unknown"}
    base = frameworks.registry()[FRAMEWORKS[0]]

    def boom() -> dict[str, str]:
        raise RuntimeError("no such kernel\nsecond line")

    fake = {"noprobe": dataclasses.replace(base, name="noprobe", isa_probe=None),
            "raises": dataclasses.replace(base, name="raises", isa_probe=boom),
            "odd": dataclasses.replace(base, name="odd", isa_probe=lambda: "AVX2")}  # type: ignore[arg-type, return-value]
    real = frameworks.registry()
    monkeypatch.setattr(frameworks, "registry", lambda: {**real, **fake})
    assert framework_isa("noprobe") == {"framework": "noprobe", "isa": "unknown"}
    assert framework_isa("raises") == {"framework": "raises", "isa": "unknown", "error": "RuntimeError: no such kernel"}
    odd = framework_isa("odd")
    assert odd["isa"] == "unknown" and "not a mapping" in odd["error"]

    def broken() -> dict[str, frameworks.FrameworkFacts]:
        raise ImportError("a broken declaration")

    monkeypatch.setattr(frameworks, "registry", broken)
    assert framework_isa(FRAMEWORKS[0]) == {"framework": FRAMEWORKS[0], "isa": "unknown",
                                            "error": "ImportError: a broken declaration"}

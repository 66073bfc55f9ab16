from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from harness import worker
from harness.config import AppConfig, to_app_config
from harness.records import REQUIRED, RecordError, make_record, read_record, read_records, write_record


def _rec(**kw) -> dict:  # type: ignore[no-untyped-def,type-arg]
    base = dict(run_id="r", measure="convergence", framework="torch", mode="eager", status="ok", config={}, env={})
    return make_record(**{**base, **kw})


def test_write_read_roundtrip(tmp_path: Path) -> None:
    p = write_record(tmp_path / "a.json", _rec(metrics={"x": 1.5, "nan": float("nan"), "inf": float("inf")}))
    r = read_record(p)
    assert all(k in r for k in REQUIRED)
    assert r["metrics"] == {"x": 1.5, "nan": None, "inf": "inf"}
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


def _job(tmp_path: Path, **cfg) -> tuple[worker.Job, AppConfig]:  # type: ignore[no-untyped-def]
    c = OmegaConf.merge(OmegaConf.structured(AppConfig), {"framework": {"name": "torch", "timeout_s": 60}, **cfg})
    plain = OmegaConf.to_container(c)
    job = worker.Job("run", "convergence", "torch", "eager", plain, str(tmp_path / "rec.json"))  # type: ignore[arg-type]
    return job, to_app_config(c)


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

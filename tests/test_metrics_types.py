"""Typed metrics (`harness.metrics`): a measure's records load back into its declared type, and
a change of the schema that the type does not follow fails here."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from harness.measures import MEASURES
from harness.metrics import MetricsError, load, plain
from harness.records import read_records
from tests.conftest import ROOT

TYPED = {name: m.METRICS for name, m in MEASURES.items()}
SAMPLES = ROOT / "tests" / "records"
REFERENCE = ROOT / "results" / "reference"


def _records(root: Path, measure: str) -> list[dict]:
    dirs = sorted(d for d in root.iterdir() if d.is_dir()) if root.exists() else []
    return [r for d in dirs for r in read_records(d) if r["measure"] == measure and r["status"] == "ok"]


def test_every_measure_declares_a_metrics_dataclass() -> None:
    assert set(TYPED) == set(MEASURES)
    assert all(dataclasses.is_dataclass(t) for t in TYPED.values()), TYPED


@pytest.mark.parametrize("measure", sorted(TYPED))
def test_fresh_records_load_strictly_and_round_trip(measure: str) -> None:
    """The sample records (`make sample-records`: the current code) fit the type exactly: no key
    it does not declare, none it requires missing; `plain` gives the stored metrics back."""
    recs = _records(SAMPLES, measure)
    assert recs, f"no sample records of {measure}: run make sample-records"
    for r in recs:
        typed = load(TYPED[measure], r["metrics"])
        assert json.loads(json.dumps(plain(typed))) == json.loads(json.dumps(r["metrics"])), r["_file"]


@pytest.mark.parametrize("measure", sorted(TYPED))
def test_committed_reference_records_load(measure: str) -> None:
    """Records written by older code of the same measure version carry keys since dropped:
    they load with strict=False."""
    recs = _records(REFERENCE, measure)
    assert recs
    for r in recs:
        load(TYPED[measure], r["metrics"], strict=False)


def test_a_schema_change_is_caught() -> None:
    r = _records(SAMPLES, "identity")[0]
    m = r["metrics"]
    added = {**copy.deepcopy(m), "new_quantity": 1.0}
    with pytest.raises(MetricsError, match=r"metrics\.new_quantity: not a field of IdentityMetrics"):
        load(TYPED["identity"], added)
    dropped = {k: v for k, v in m.items() if k != "mc_z"}
    with pytest.raises(MetricsError, match=r"metrics\.mc_z: missing"):
        load(TYPED["identity"], dropped)
    renamed = copy.deepcopy(m)
    renamed["iwae"][0]["minus_logpx"] = renamed["iwae"][0].pop("minus_log_px")
    with pytest.raises(MetricsError, match=r"metrics\.iwae\[0\]\.minus_logpx: not a field of IwaeRow"):
        load(TYPED["identity"], renamed)
    wrong = {**copy.deepcopy(m), "mc_samples": "2000"}
    with pytest.raises(MetricsError, match=r"metrics\.mc_samples: expected int"):
        load(TYPED["identity"], wrong)


@dataclasses.dataclass
class Row:
    k: int
    v: float
    extra: float | None = None


@dataclasses.dataclass
class M:
    rows: list[Row]
    arr: list[float] | np.ndarray
    flags: dict[str, bool]


def test_plain_leaves_out_absent_optionals_and_converts_numpy() -> None:
    m = M(rows=[Row(1, np.float64(0.5)), Row(2, 1.5, extra=2.0)], arr=np.arange(3.0), flags={"a": True})
    d = plain(m)
    assert d == {"rows": [{"k": 1, "v": 0.5}, {"k": 2, "v": 1.5, "extra": 2.0}], "arr": [0.0, 1.0, 2.0], "flags": {"a": True}}
    assert type(d["rows"][0]["v"]) is float
    back = load(M, d)
    assert back.rows[1].extra == 2.0 and back.rows[0].extra is None and back.arr == [0.0, 1.0, 2.0]

"""The conformance measure: all three frameworks agree, and a planted disagreement is flagged."""

from __future__ import annotations

import numpy as np

from harness.measures.conformance import TOLERANCES, compare, deviation
from harness.records import read_records


def _arrays(scale: float = 0.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    base = {
        "float32/terms/loss": np.array([40.0, 41.0]),
        "float32/grads/loss/encoder.0.weight": np.ones((3, 2)),
        "float32/grads/kl/decoder.0.weight": np.zeros((2, 3)),
        "float32/sgd trajectory": np.linspace(40, 30, 5),
        "float32/adam trajectory": np.linspace(40, 35, 5),
    }
    return {k: v * (1 + scale * rng.standard_normal(v.shape)) for k, v in base.items()}


def test_compare_identical_and_perturbed() -> None:
    rows = compare({"a": _arrays(), "b": _arrays()}, None, ["float32"])
    assert all(r["pass"] == "yes" and float(r["max rel. deviation"]) == 0.0 for r in rows)
    rows = compare({"a": _arrays(), "b": _arrays(1e-3)}, None, ["float32"])
    failed = {r["quantity"] for r in rows if r["pass"] == "NO"}
    assert failed == {"terms", "grads", "sgd trajectory", "adam trajectory"}
    # relative L2 for gradients, 0/0 counted as agreement, a missing array as infinite
    dev, where = deviation("grads", "float32", _arrays(), _arrays(1e-3))
    assert 1e-4 < dev < 1e-2 and where == "loss/encoder.0.weight"
    b = _arrays()
    del b["float32/terms/loss"]
    assert deviation("terms", "float32", _arrays(), b)[0] == float("inf")
    # one framework: only the NumPy comparison, no pairwise row that could not fail
    ref = {"float32": {"float32/terms/loss": np.array([40.0, 41.0])}}
    rows = compare({"a": _arrays()}, ref, ["float32"])
    assert [r["quantity"] for r in rows] == ["terms (vs NumPy)"] and rows[0]["pass"] == "yes"
    assert TOLERANCES[("terms", "float32")] == 1e-5 and TOLERANCES[("grads", "float64")] == 1e-9


def test_three_frameworks_conform_float32_and_float64(cli) -> None:  # type: ignore[no-untyped-def]
    r = cli("measure=conformance", "framework=all")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    recs = read_records(cli.out_dir)
    assert {x["framework"] for x in recs} == {"torch", "tensorflow", "jax"}
    assert all(x["status"] == "ok" for x in recs)
    table = r.stdout.split("### Conformance")[1]
    for dtype in ("float32", "float64"):
        for q in ("terms ", "terms (vs NumPy)", "grads", "sgd trajectory", "adam trajectory"):
            assert any(q in line and dtype in line and "| yes" in line for line in table.splitlines()), (q, dtype)
    assert "| NO" not in table


def test_planted_disagreement_is_flagged(cli) -> None:  # type: ignore[no-untyped-def]
    r = cli(
        "measure=conformance",
        "framework=all",
        "measure.conformance.perturb_framework=jax",
        "measure.conformance.dtypes=[float64]",
        "measure.conformance.steps=5",
    )
    assert r.returncode == 1, r.stdout[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if "| NO" in ln]
    assert any("terms" in ln and "jax" in ln for ln in lines), r.stdout
    assert any("grads" in ln and "jax" in ln for ln in lines)
    assert "perturbed weights" in r.stdout

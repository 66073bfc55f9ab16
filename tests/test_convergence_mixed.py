"""Convergence in mixed precision (framework.precision=bfloat16|float16): one table with every
precision beside float32, the judged row of each low precision against float32's seed band, a
NaN or an unfinished run failing by name, float16's skipped steps, the one-ulp control in the
parameters' type, and a tiny real run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harness import measures
from harness.initializers import init_params
from harness.job import Job
from harness.measures import convergence as cv
from tests.conftest import make_config


def _run(seed: int, final: float, skipped: int | None = None) -> dict[str, Any]:
    evals = [{"step": 0, "wall_s": 0.0, "test_elbo": -50.0}, {"step": 30, "wall_s": 3.0, "test_elbo": final}]
    run = {"seed": seed, "status": "ok", "error": None, "steps": 30, "step_loss": [], "evals": evals, "epochs": [],
           "first_step_s": 0.1, "train_wall_s": 3.0,
           "final": {"test_elbo": final, "iwae_k": 10, "test_log_likelihood": final + 0.5, "test_log_likelihood_se": 0.1,
                     "gap": 0.5, "kl_per_dim": [1.0, 0.5], "activity": [1.0, 0.5], "active_units": 2, "latent": 2}}
    if skipped is not None:
        run["skipped_steps"] = skipped
    return run


def _record(framework: str, precision: str, finals: list[float], skipped: list[int] | None = None,
            status: str = "ok", error: str | None = None, env: dict[str, Any] | None = None) -> dict[str, Any]:
    runs = [_run(s, f, None if skipped is None else skipped[s]) for s, f in enumerate(finals)]
    return {"measure": "convergence", "framework": framework, "mode": "eager", "status": status, "error": error,
            "config": {"framework": {"precision": precision}}, "env": {"dtype": precision, **(env or {})},
            "metrics": {"runs": runs}}


F32 = [-22.0, -22.2, -21.8]  # mean -22.0, std 0.2: the band is max(3 x 0.2, 0.1) = 0.6 nats


def _rows(s: Any) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["framework"], r["precision"]): r for r in s.rows}


def test_one_table_holds_every_precision_and_judges_each_low_one_against_float32() -> None:
    recs = [_record("jax", "bfloat16", [-22.3, -22.4, -22.2]), _record("torch", "float16", [-22.1, -21.9, -22.3], [0, 3, 1]),
            _record("torch", "float32", F32), _record("torch", "bfloat16", [-22.5, -22.6, -22.4]),
            _record("jax", "float32", F32)]
    s = cv.summarize(recs)
    assert s.ok, s.notes
    # framework order, float32 first within a framework
    assert [(r["framework"], r["precision"]) for r in s.rows] == [
        ("torch", "float32"), ("torch", "bfloat16"), ("torch", "float16"), ("jax", "float32"), ("jax", "bfloat16")]
    rows = _rows(s)
    assert rows["torch", "float32"][cv.VERDICT_COL] == "reference" and rows["torch", "float32"]["skipped steps"] == "-"
    bf = rows["torch", "bfloat16"]
    assert (bf[cv.DIFF_COL], bf[cv.TOL_COL], bf[cv.VERDICT_COL]) == ("-0.500", "0.600", "PASS")
    assert bf["test ELBO"] == "-22.500 ± 0.100" and bf["test log p(x) (IWAE-10)"] == "-22.000 ± 0.100"
    assert rows["torch", "float16"]["skipped steps"] == "4 (0, 3, 1)" and rows["torch", "float16"][cv.VERDICT_COL] == "PASS"
    assert rows["jax", "bfloat16"][cv.DIFF_COL] == "-0.300"
    assert any(n.startswith("torch/eager: bfloat16 final test ELBO -22.500 (3 seeds) against float32's -22.000")
               and n.endswith("= 0.600: pass") for n in s.notes)
    assert any("final test ELBO spread across frameworks (bfloat16): 0.200" in n for n in s.notes)
    assert len({tuple(r) for r in s.rows}) == 1  # one set of columns (the CSV needs it)
    assert "mixed precision within float32's band: all (3 judged)" in cv.answer(recs)


@pytest.mark.parametrize(("f32", "low", "tol", "ok"), [
    (F32, [-22.5, -22.6, -22.55], 0.6, True),        # 0.55 away: inside 3 sigma
    (F32, [-22.7, -22.6, -22.8], 0.6, False),        # 0.7 away: outside
    ([-22.0, -22.01, -21.99], [-22.08], 0.1, True),   # a tight float32: the 0.1-nat floor
    ([-22.0, -22.01, -21.99], [-22.15], 0.1, False),
    ([-22.0], [-21.95], 0.1, True),                   # one float32 seed: the floor alone
    (F32, [-21.2, -21.3, -21.4], 0.6, False),        # better by 0.7 is outside too: the band is two-sided
])
def test_the_judged_row_passes_within_the_band_and_fails_outside(f32: list[float], low: list[float], tol: float, ok: bool) -> None:
    recs = [_record("torch", "float32", f32), _record("torch", "bfloat16", low)]
    s = cv.summarize(recs)
    row = _rows(s)["torch", "bfloat16"]
    assert row[cv.TOL_COL] == f"{tol:.3f}" and row[cv.VERDICT_COL] == ("PASS" if ok else "FAIL")
    assert float(row[cv.DIFF_COL]) == pytest.approx(np.mean(low) - np.mean(f32), abs=1e-3)
    assert s.ok is ok
    note = next(n for n in s.notes if n.startswith("torch/eager: bfloat16 final test ELBO"))
    assert note.endswith("pass" if ok else "FAIL")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("side", ["bfloat16", "float32"])
def test_a_nan_or_inf_final_elbo_fails_and_is_named(bad: float, side: str) -> None:
    low, ref = [-22.1, bad, -22.0], list(F32)
    if side == "float32":
        low, ref = [-22.1, -22.2, -22.0], [-22.0, bad, -21.8]
    recs = [_record("torch", "float32", ref), _record("torch", "bfloat16", low)]
    s = cv.summarize(recs)
    assert not s.ok and _rows(s)["torch", "bfloat16"][cv.VERDICT_COL] == "FAIL"
    word = "NaN" if math.isnan(bad) else ("inf" if bad > 0 else "-inf")
    assert f"torch/eager: {side} final test ELBO is {word} (seed 1): FAIL" in s.notes
    # the registry's summary (what reports use) names the judged quantity as well
    reg = measures.summarize("convergence", recs)
    assert not reg.ok and any(n.startswith("FAIL: ") and "test ELBO" in n and word in n for n in reg.notes)
    assert "mixed precision within float32's band: NO (torch/eager bfloat16)" in cv.answer(recs)


def test_a_diverged_low_precision_run_fails_naming_why() -> None:
    err = "training loss nan (NaN or inf) at step 7, seed 0"
    diverged = _record("torch", "float16", [], status="diverged", error=err)
    diverged["metrics"]["runs"] = [{**_run(0, -40.0), "status": "diverged", "error": err}]
    del diverged["metrics"]["runs"][0]["final"]
    s = cv.summarize([_record("torch", "float32", F32), diverged])
    assert not s.ok
    assert f"torch/eager: float16 did not finish: diverged: {err}: FAIL" in s.notes
    assert f"torch/eager float16: diverged: {err}" in s.notes  # the failed record's note names its precision
    assert _rows(s)["torch", "float16"]["status"] == "diverged"


def test_skipped_steps_from_the_env_and_a_low_precision_without_float32() -> None:
    """A record without per-seed counts shows its backend environment's (the last seed's); a
    mixed-precision record with no float32 record beside it is said to be unjudged, not failed."""
    r = _record("jax", "float16", [-22.0, -22.1], env={"skipped_steps": 2, "loss_scale": 16384.0})
    s = cv.summarize([r])
    assert s.ok and s.rows[0]["skipped steps"] == "2 (last seed)" and s.rows[0][cv.VERDICT_COL] == "-"
    assert any("not judged against float32 (no float32 record of jax/eager" in n for n in s.notes)


def test_float32_tables_and_compare_names_are_unchanged() -> None:
    """Records of float32 alone: no precision columns, and `compare`'s names as before; a mixed
    precision's names carry it, so the two never collide."""
    s = cv.summarize([_record("torch", "float32", F32)])
    assert "precision" not in s.rows[0] and cv.VERDICT_COL not in s.rows[0] and "skipped steps" not in s.rows[0]
    names = set(cv.compared([_record("torch", "float32", F32), _record("torch", "bfloat16", F32)]))
    assert {"torch/eager seeds completed", "torch/eager bfloat16 seeds completed",
            "torch/eager test ELBO at step 30", "torch/eager bfloat16 test ELBO at step 30"} <= names


def test_the_one_ulp_control_moves_the_float32_parameters_by_a_float32_ulp(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under mixed precision the parameters are float32: the control's perturbation is one float32
    ulp (`harness.spec.param_dtype`), not one of the layers' low type (which NumPy may not know)."""
    c = make_config(framework={"precision": "bfloat16"}, model={"hidden": [8]}, measure={"names": ["convergence"]})
    ds = cv.dataset(c)
    spec = cv.model_spec(c, ds)
    got: dict[str, Any] = {}

    class Stop(Exception):
        pass

    def capture(*_: Any, params: dict[str, np.ndarray], **__: Any) -> None:
        got.update(params)
        raise Stop

    monkeypatch.setattr(cv, "backend", capture)
    with pytest.raises(Stop):
        cv.ulp_control(c, Job("r", "convergence", "torch", "eager", {}, "x.json"), ds, spec, 0)
    want = {k: np.nextafter(v.astype(np.float32), np.float32(np.inf)) for k, v in init_params(spec, 0).items()}
    assert set(got) == set(want) and all(np.array_equal(got[k].astype(np.float32), want[k]) for k in want)


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_a_tiny_real_run_in_mixed_precision_finishes_with_a_finite_elbo(precision: str, tmp_path: Path) -> None:
    """Two seeds of 5 steps in torch, lockstep (so the one-ulp control runs too): ok, finite test
    ELBO and IWAE, the policy in the backend's environment, float16's skipped steps per seed."""
    c = make_config(framework={"precision": precision}, data={"batch_size": 256}, model={"hidden": [16]},
                    measure={"names": ["convergence"], "convergence": {
                        "epochs": 1, "seeds": [0, 1], "iwae_k": 5, "elbo_samples": 1, "shared_noise": True, "lockstep_steps": 3}})
    res = cv.run(c, Job("r", "convergence", "torch", "eager", {}, str(tmp_path / "r.json")))
    assert res.status == "ok", res.error
    runs = res.metrics["runs"]
    assert all(math.isfinite(x["evals"][-1]["test_elbo"]) and math.isfinite(x["final"]["test_log_likelihood"]) for x in runs)
    assert res.backend_env["policy"]["compute"] == precision and res.backend_env["policy"]["param"] == "float32"
    assert len(res.metrics["ulp_control"]["step_loss"]) == 3 and all(map(math.isfinite, res.metrics["ulp_control"]["step_loss"]))
    assert [x.get("skipped_steps") for x in runs] == ([0, 0] if precision == "float16" else [None, None])
    rec = {"measure": "convergence", "framework": "torch", "mode": "eager", "status": res.status, "error": res.error,
           "config": {"framework": {"precision": precision}}, "env": res.backend_env, "metrics": res.metrics}
    s = cv.summarize([rec])
    assert s.rows[0]["precision"] == precision and s.rows[0]["test ELBO"] != "-"


def test_a_report_over_a_precision_sweep_is_one_table() -> None:
    """framework.precision is a row key of this measure (`ROW_KEYS`): the report summarizes the
    precisions together (one block of rows, the judged ones included), while the records' config
    hashes still differ (resume and newest-per-config keep each precision)."""
    from harness import records as records_mod
    from harness import report

    recs = [_record(fw, p, F32 if p == "float32" else [-22.1, -22.2, -21.9]) for fw in ("torch", "jax")
            for p in ("float32", "bfloat16", "float16")]
    for i, r in enumerate(recs):
        r.update(run_id=f"run{i}", created_at=f"2026-01-01T00:00:0{i}+00:00", schema_version=1)
    table = report.measure_table("convergence", recs)
    assert "framework.precision" not in table.rows[0]  # not a variant column
    assert [(r["framework"], r["precision"], r[cv.VERDICT_COL]) for r in table.rows] == [
        ("torch", "float32", "reference"), ("torch", "bfloat16", "PASS"), ("torch", "float16", "PASS"),
        ("jax", "float32", "reference"), ("jax", "bfloat16", "PASS"), ("jax", "float16", "PASS")]
    assert table.ok and len({records_mod.config_hash(r) for r in recs}) == len(recs)

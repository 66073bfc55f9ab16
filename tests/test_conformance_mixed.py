"""Conformance in mixed precision (framework.precision=bfloat16|float16): the frameworks pass
against NumPy's float64 oracle with tolerances in units of the low type's roundoff, and the
planted faults still fail, named, in each low type; the step-scale row that catches a wrong
learning rate below the type's resolution is judged (and fails on NaN)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from harness.measures import conformance as cf
from harness.records import read_records, write_record
from harness.spec import MIXED
from harness.worker import Job, run_in_process
from tests.conftest import FRAMEWORKS, make_config

SMALL_CONV = {"kind": "conv", "filters": [4, 8], "dense": 8, "latent": 4}


def _steps(dtype: str, scale: float, dev: float = 1.0) -> dict[str, np.ndarray]:
    u = MIXED[dtype]
    return {f"{dtype}/sgd step/dtheta": np.full(5, dev * u), f"{dtype}/sgd step/floor": np.full(5, u),
            f"{dtype}/sgd step/loss": np.full(5, 1e-6), f"{dtype}/sgd step/scale": np.full(5, scale)}


@pytest.mark.parametrize("dtype", list(MIXED))
def test_the_step_scale_row_is_judged_in_units_of_u(dtype: str) -> None:
    u = cf.unit(dtype)  # bfloat16's unit roundoff for both low types
    tol = cf.MIXED_STEP_SCALE_U * u
    rows = {r["quantity"]: r for r in cf.table_rows({"a": _steps(dtype, 0.05 * u)}, [dtype])}
    assert rows["sgd step scale"]["pass"] == "yes" and rows["sgd step Δθ"]["pass"] == "yes"
    assert rows["sgd step Δθ"]["tolerance"] == f"{cf.MIXED_FLOOR_FACTOR:g} x floor"
    bad = {r["quantity"]: r for r in cf.table_rows({"a": _steps(dtype, 0.8 * tol), "b": _steps(dtype, -1.2 * tol)}, [dtype])}
    assert bad["sgd step scale"]["pass"] == "NO" and bad["sgd step scale"]["worst"] == "b vs numpy"
    assert bad["sgd step Δθ"]["pass"] == "yes"  # a wrong lr below the type's rounding: only the scale sees it
    nan = _steps(dtype, 0.0)
    nan[f"{dtype}/sgd step/scale"][2] = np.nan
    row = {r["quantity"]: r for r in cf.table_rows({"a": nan}, [dtype])}["sgd step scale"]
    assert row["pass"] == "NO" and "step 3" in row["where"]
    # the Δθ row: its factor in units of the floor, which adds u to the stored type's
    far = {r["quantity"]: r for r in cf.table_rows({"a": _steps(dtype, 0.0, dev=cf.MIXED_FLOOR_FACTOR * 1.5)}, [dtype])}
    assert far["sgd step Δθ"]["pass"] == "NO"


def test_mixed_precision_chooses_the_dtype_and_is_read() -> None:
    c = make_config(framework={"precision": "bfloat16"})
    assert cf.dtypes(c) == ["bfloat16"] and cf.precision(c) == "bfloat16"
    assert cf.dtypes(make_config()) == ["float32", "float64"]
    assert "-framework.precision" not in cf.reads({"framework": {"precision": "float16"}})
    assert "-framework.precision" in cf.reads({"framework": {"precision": "float32"}})


def test_the_weights_plant_stands_above_a_low_types_resolution() -> None:
    p = {"w": np.random.default_rng(1).standard_normal(20000) + 3.0}
    for dtype, rel in (("float32", 1e-3), ("bfloat16", cf.WEIGHTS_PLANT_U * 2.0**-8), ("float16", cf.WEIGHTS_PLANT_U * 2.0**-8)):
        moved = cf.plant_params(p, "weights", dtype, 0)["w"] / p["w"] - 1
        assert np.std(moved) == pytest.approx(rel, rel=0.05), dtype
    # the lr plant: x 1.001, or x (1 + LR_PLANT_U u) in a low type
    from harness.spec import OptimSpec

    assert cf.plant_optim(OptimSpec(lr=1.0), "lr", "float32").lr == pytest.approx(1.001)
    assert cf.plant_optim(OptimSpec(lr=1.0), "lr", "bfloat16").lr == pytest.approx(1 + cf.LR_PLANT_U * 2.0**-8)
    assert cf.plant_optim(OptimSpec(lr=1.0), "lr", "float16").lr == pytest.approx(1 + cf.LR_PLANT_U * 2.0**-8)  # in bfloat16's unit (`unit`)
    # one ulp of the stored type: float32 under mixed precision
    assert np.array_equal(cf.plant_params(p, "ulp", "bfloat16", 0)["w"], cf.one_ulp(p, "float32")["w"])


def _run(frameworks: list[str], tmp_path: Path, dtype: str, model: dict[str, object] | None = None,
         data: dict[str, object] | None = None, **conf: object) -> cf.Summary:
    c = make_config(framework={"precision": dtype}, model=model or {"hidden": [32]}, data=data or {},
                    measure={"conformance": {"steps": 8, **conf}})
    resolved = OmegaConf.to_container(OmegaConf.structured(c))
    assert isinstance(resolved, dict)
    for fw in frameworks:
        path = tmp_path / f"conformance-{fw}.json"
        write_record(path, run_in_process(Job("t", "conformance", fw, "eager", resolved, str(path))))  # type: ignore[arg-type]
    recs = read_records(tmp_path)
    assert all(r["status"] == "ok" for r in recs), [r["error"] for r in recs]
    assert all(r["metrics"]["dtypes"] == [dtype] for r in recs)
    return cf.summarize(recs)


CASES = [  # (dtype, plant, planted in, the other framework): each plant in each low type, somewhere
    ("bfloat16", "ulp", FRAMEWORKS[0], FRAMEWORKS[1]),
    ("float16", "ulp", FRAMEWORKS[2], FRAMEWORKS[0]),
    ("bfloat16", "lr", FRAMEWORKS[1], FRAMEWORKS[2]),
    ("float16", "lr", FRAMEWORKS[2], FRAMEWORKS[1]),
    ("bfloat16", "weights", FRAMEWORKS[2], FRAMEWORKS[0]),
    ("float16", "weights", FRAMEWORKS[0], FRAMEWORKS[2]),
    ("bfloat16", "beta2", FRAMEWORKS[0], FRAMEWORKS[1]),
    ("float16", "bias_correction", FRAMEWORKS[1], FRAMEWORKS[0]),
]


@pytest.mark.slow
@pytest.mark.parametrize("dtype,plant,where,other", CASES, ids=[f"{d}-{p}-{w}" for d, p, w, _ in CASES])
def test_mixed_precision_passes_one_ulp_and_fails_each_planted_fault(dtype: str, plant: str, where: str, other: str,
                                                                     tmp_path: Path) -> None:
    s = _run([other, where], tmp_path, dtype, plant=plant, plant_framework=where)
    failed = [r for r in s.rows if r["pass"] == "NO"]
    if plant == "ulp":
        assert s.ok, failed
        assert any(r["quantity"] == "adam step scale" and r["pass"] == "yes" for r in s.rows)
        return
    assert not s.ok and failed, s.rows
    assert all(where in r["worst"] for r in failed), failed
    assert any("step" in r["quantity"] for r in failed)
    if plant == "lr":  # below bfloat16's resolution: the step's scale catches it
        assert {r["quantity"] for r in failed} >= {"sgd step scale", "adam step scale"}


@pytest.mark.slow
@pytest.mark.parametrize("dtype,plant", [("bfloat16", "lr"), ("float16", "none")])
def test_the_conv_vae_in_mixed_precision(dtype: str, plant: str, tmp_path: Path) -> None:
    """model=conv data=mnist5k in a low type: passes, and a planted lr fails on the step scale."""
    s = _run([FRAMEWORKS[0], FRAMEWORKS[2]], tmp_path, dtype, model=SMALL_CONV, data={"source": "mnist5k"}, steps=6,
             plant=plant, plant_framework=FRAMEWORKS[2] if plant != "none" else "")
    failed = [r for r in s.rows if r["pass"] == "NO"]
    if plant == "none":
        assert s.ok, failed
        return
    assert not s.ok and all(FRAMEWORKS[2] in r["worst"] for r in failed), failed
    assert {r["quantity"] for r in failed} >= {"sgd step scale", "adam step scale"}

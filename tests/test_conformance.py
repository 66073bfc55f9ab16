"""The conformance measure: the frameworks agree; the verdict is robust to rounding-level changes
(one ulp, thread count) and still fails, naming the framework, on each real disagreement."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from harness.config import AppConfig
from harness.initializers import init_params
from harness.measures import conformance as cf
from harness.records import read_records, write_record
from harness.worker import Job, run_in_process
from tests.conftest import FRAMEWORKS, make_config


def _arrays(scale: float = 0.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    base = {
        "float32/terms/loss": np.array([40.0, 41.0]),
        "float32/grads/loss/encoder.0.weight": np.ones((3, 2)),
        "float32/grads/kl/decoder.0.weight": np.zeros((2, 3)),
        "float32/sgd trajectory": np.linspace(40, 30, 5),
        "float32/adam trajectory": np.linspace(40, 35, 5),
        "float64/sgd trajectory": np.linspace(40, 30, 5),
    }
    return {k: v * (1 + scale * rng.standard_normal(v.shape)) for k, v in base.items()}


def test_compare_identical_and_perturbed() -> None:
    rows = cf.table_rows({"a": _arrays(), "b": _arrays()}, ["float32", "float64"])
    assert rows and all(r["pass"] in ("yes", "reported") and float(r["max rel. deviation"]) == 0.0 for r in rows)
    rows = cf.table_rows({"a": _arrays(), "b": _arrays(1e-3)}, ["float32", "float64"])
    failed = {(r["quantity"], r["dtype"]) for r in rows if r["pass"] == "NO"}
    assert failed == {("terms", "float32"), ("grads", "float32"), ("free-running sgd trajectory", "float64")}
    # float32 free-running trajectories are reported, never judged, however far apart
    assert {r["pass"] for r in rows if "trajectory" in r["quantity"] and r["dtype"] == "float32"} == {"reported"}
    # relative L2 for gradients, 0/0 counted as agreement, a missing array as infinite
    dev, where = cf.deviation("grads", "float32", _arrays(), _arrays(1e-3))
    assert 1e-4 < dev < 1e-2 and where == "loss/encoder.0.weight"
    b = _arrays()
    del b["float32/terms/loss"]
    assert cf.deviation("terms", "float32", _arrays(), b)[0] == float("inf")
    # one framework: no pairwise row (it could not fail)
    assert cf.table_rows({"a": _arrays()}, ["float32"]) == []


def test_per_step_rows_judge_against_the_rounding_floor() -> None:
    floor = np.full(4, 1e-6)

    def arrs(dev: float) -> dict[str, np.ndarray]:
        return {"float32/adam step/dtheta": np.full(4, dev), "float32/adam step/floor": floor,
                "float32/adam step/loss": np.full(4, 1e-7)}

    ok = cf.table_rows({"a": arrs(3e-6)}, ["float32"])
    assert [r["pass"] for r in ok] == ["yes", "yes"] and ok[0]["worst"] == "a vs numpy"
    bad = cf.table_rows({"a": arrs(3e-6), "b": arrs(1e-3)}, ["float32"])
    step_row = next(r for r in bad if r["quantity"] == "adam step Δθ")
    assert step_row["pass"] == "NO" and step_row["worst"] == "b vs numpy"
    # one step at a ReLU kink (the gradient jumps there) is shown, not judged; most steps off fail
    kink = arrs(3e-6)
    kink["float32/adam step/dtheta"][2] = 3e-2
    row = cf.table_rows({"a": kink}, ["float32"])[0]
    assert row["pass"] == "yes" and "worst step 3" in row["where"] and "1/4 steps above" in row["where"]
    kink["float32/adam step/dtheta"][:3] = 3e-2
    assert cf.table_rows({"a": kink}, ["float32"])[0]["pass"] == "NO"


def test_step_floor_is_the_cancellation_error() -> None:
    theta = np.full(100, 1.0)
    new = theta - 1e-3
    f32 = cf.step_floor(theta, new, "float32")
    # half an ulp of ~1 in float32 (6e-8) over |Δθ| = 1e-3, plus eps32
    assert f32 == pytest.approx(0.5 * np.spacing(np.float32(0.999)) / 1e-3 + np.finfo(np.float32).eps, rel=1e-6)
    assert cf.step_floor(theta, new, "float64") < 1e-12
    # an entry whose gradient sums n terms carries sqrt(n) ulps of |Δθ| (half the entries here)
    terms = np.r_[np.full(50, 1.0), np.full(50, 25_088.0)]
    eps = np.finfo(np.float32).eps
    per_entry = 0.5 * np.spacing(np.float32(0.999)) + eps * np.sqrt(terms) * 1e-3
    assert cf.step_floor(theta, new, "float32", terms) == pytest.approx(np.linalg.norm(per_entry) / np.linalg.norm(new - theta),
                                                                        rel=1e-6)


def test_entry_terms_refuse_a_parameter_no_layer_covers(monkeypatch: pytest.MonkeyPatch) -> None:
    from harness.models import MODELS

    spec = MODELS["mlp"].example()
    monkeypatch.setattr(MODELS["mlp"], "layers", lambda s: [])
    with pytest.raises(ValueError, match=r"model kind 'mlp': its layers\(\) do not cover parameter 'encoder.0.weight'"):
        cf.entry_terms(spec, init_params(spec, 0), batch=2)


def test_entry_terms_follow_the_canonical_flat_order() -> None:
    """`entry_terms` lines up with `_flat`: each parameter's entries carry batch x its terms."""
    from harness.models import MODELS
    from harness.models.base import reduction_terms

    spec = MODELS["conv"].example()
    params = init_params(spec, 0)
    got = cf.entry_terms(spec, params, batch=3)
    per = reduction_terms(spec.module.layers(spec))
    assert len(got) == len(cf._flat(params))
    i = 0
    for name, v in params.items():
        assert np.all(got[i : i + v.size] == 3 * per[name]), name
        i += v.size


def test_one_ulp_moves_every_entry_by_one_representable_step() -> None:
    p = {"w": np.array([1.0, -0.3, 0.0])}
    for dtype in ("float32", "float64"):
        q = cf.one_ulp(p, dtype)["w"].astype(dtype)
        assert np.all(q > p["w"].astype(dtype))
        assert np.all(np.nextafter(p["w"].astype(dtype), np.inf) == q)


def _config(model: dict[str, object] | None = None, data: dict[str, object] | None = None, **conf: object) -> AppConfig:
    return make_config(model=model or {"hidden": [32]}, data=data or {}, measure={"conformance": {"steps": 6, **conf}})


def _run(frameworks: list[str], tmp_path: Path, model: dict[str, object] | None = None,
         data: dict[str, object] | None = None, **conf: object) -> cf.Summary:
    c = _config(model, data, **conf)
    resolved = OmegaConf.to_container(OmegaConf.structured(c))
    assert isinstance(resolved, dict)
    for fw in frameworks:
        path = tmp_path / f"conformance-{fw}.json"
        write_record(path, run_in_process(Job("t", "conformance", fw, "eager", resolved, str(path))))  # type: ignore[arg-type]
    recs = read_records(tmp_path)
    assert all(r["status"] == "ok" for r in recs), [r["error"] for r in recs]
    return cf.summarize(recs)


@pytest.mark.slow
@pytest.mark.parametrize("plant,where", [(p, FRAMEWORKS[(i + 2) % len(FRAMEWORKS)])  # each planted somewhere
                                         for i, p in enumerate(("weights", "lr", "beta2", "bias_correction"))])
def test_each_real_disagreement_fails_and_names_the_framework(plant: str, where: str, tmp_path: Path) -> None:
    other = next(f for f in FRAMEWORKS if f != where)
    s = _run([other, where], tmp_path, plant=plant, plant_framework=where)
    failed = [r for r in s.rows if r["pass"] == "NO"]
    assert not s.ok and failed, s.rows
    assert all(where in r["worst"] for r in failed), failed
    # it fails in both precisions, on the per-step checks that are the verdict
    assert {r["dtype"] for r in failed if "step" in r["quantity"]} == {"float32", "float64"}
    assert any(f"planted disagreement ({plant})" in n for n in s.notes)


#: a small conv VAE on real MNIST digits (the conv kind's layers at a test's size)
SMALL_CONV = {"kind": "conv", "filters": [4, 8], "dense": 8, "latent": 4}


@pytest.mark.slow
@pytest.mark.parametrize("plant,where,other", [("ulp", "tensorflow", "torch"), ("weights", "torch", "tensorflow"),
                                               ("lr", "jax", "tensorflow"), ("beta2", "tensorflow", "torch"),
                                               ("bias_correction", "torch", "tensorflow")])
def test_the_conv_vae_passes_one_ulp_and_fails_each_planted_fault(plant: str, where: str, other: str, tmp_path: Path) -> None:
    """model=conv data=mnist5k, float32 and float64: the floor that allows a long convolution
    sum its rounding (`reduction_terms`) still leaves every planted fault failing, named, and a
    one-ulp change passing."""
    s = _run([other, where], tmp_path, model=SMALL_CONV, data={"source": "mnist5k"}, steps=5, plant=plant,
             plant_framework=where)
    failed = [r for r in s.rows if r["pass"] == "NO"]
    if plant == "ulp":
        assert s.ok, failed
        return
    assert not s.ok and failed, s.rows
    assert all(where in r["worst"] for r in failed), failed
    assert {r["dtype"] for r in failed if "step" in r["quantity"]} == {"float32", "float64"}


@pytest.mark.slow
@pytest.mark.parametrize("where", FRAMEWORKS)
def test_one_ulp_perturbation_still_passes(where: str, tmp_path: Path) -> None:
    """Robust: a rounding-level change of one framework's weights (one ulp of each entry, at the
    start of the free runs and at every per-step check) leaves every verdict PASS."""
    other = next(f for f in FRAMEWORKS if f != where)
    s = _run([other, where], tmp_path, plant="ulp", plant_framework=where)
    assert s.ok, [r for r in s.rows if r["pass"] == "NO"]


def test_three_frameworks_conform_float32_and_float64_on_one_thread(cli) -> None:  # type: ignore[no-untyped-def]
    """The CLI, all frameworks: every check passes in both precisions, and at one thread (a
    perturbation of the summation order: the sample records and `make regress` run the default
    threads); 10 steps, enough for the per-step checks, which judge the median step."""
    r = cli("measure=conformance", "framework=all", "framework.threads=1", "measure.conformance.steps=10")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    recs = read_records(cli.out_dir)
    assert {x["framework"] for x in recs} == set(FRAMEWORKS)
    assert all(x["status"] == "ok" for x in recs)
    assert all(x["env"]["cpu_affinity"] == [x["env"]["cpu_affinity"][0]] for x in recs)
    table = r.stdout.split("### Conformance")[1]
    for dtype in ("float32", "float64"):
        for q in ("terms ", "terms (vs NumPy)", "grads ", "grads (vs NumPy)", "sgd step Δθ", "adam step Δθ",
                  "sgd step loss", "adam step loss"):
            assert any(q in line and dtype in line and "| yes" in line for line in table.splitlines()), (q, dtype)
    assert any("free-running adam trajectory" in ln and "float64" in ln and "| yes" in ln for ln in table.splitlines())
    assert any("control: adam trajectory" in ln and "| reported" in ln for ln in table.splitlines())
    assert "| NO" not in table
    # the summary rebuilds from the records and arrays alone (no data set needed)
    from harness import report

    text, ok, _ = report.build(next(cli.out_dir.glob("*/")))
    rebuilt = text.split("### Conformance")[1].split("###")[0].strip()
    assert ok and rebuilt == table.split("###")[0].split("\nrecords and report:")[0].strip()


def test_a_diverged_trajectory_fails_named_with_its_step_and_keeps_its_rows() -> None:
    """A trajectory that reaches inf (a divergent step) fails, float32 too (whose free runs are
    otherwise only reported), names the framework and the step, and drops no row."""
    good = cf.table_rows({"a": _arrays(), "b": _arrays()}, ["float32", "float64"])
    bad_b = _arrays()
    for key in ("float32/sgd trajectory", "float64/sgd trajectory"):
        bad_b[key] = np.array([40.0, 50.0, 1354.0, np.inf, np.nan])
    rows = cf.table_rows({"a": _arrays(), "b": bad_b}, ["float32", "float64"])
    assert [r["quantity"] for r in rows] == [r["quantity"] for r in good]
    for dtype in ("float32", "float64"):
        row = next(r for r in rows if r["quantity"] == "free-running sgd trajectory" and r["dtype"] == dtype)
        assert row["pass"] == "NO" and "b: inf at step 4" in row["where"], row
    # the per-step rows of a framework whose steps are NaN stay, fail and say where
    nan_steps = {"float32/sgd step/dtheta": np.array([1e-6, np.nan, 1e-6]), "float32/sgd step/floor": np.full(3, 1e-6),
                 "float32/sgd step/loss": np.array([1e-7, 1e-7, np.inf])}
    ok_steps = {k: np.where(np.isfinite(v), v, 1e-7) for k, v in nan_steps.items()}
    rows = [r for r in cf.table_rows({"a": ok_steps, "b": nan_steps}, ["float32"]) if " step " in r["quantity"]]
    assert [(r["quantity"], r["pass"]) for r in rows] == [("sgd step Δθ", "NO"), ("sgd step loss", "NO")]
    assert "NaN at step 2" in rows[0]["where"] and "inf at step 3" in rows[1]["where"]
    assert rows[0]["worst"] == rows[1]["worst"] == "b vs numpy"


def test_divergence_of_the_reference_trajectory() -> None:
    assert cf.divergence(np.array([80.8, 100.8, 60.0])) is None  # a noisy but healthy run
    assert cf.divergence(np.array([80.8, 100.8, 1354.0, 7.5e7, np.inf])) == "loss 1354 at step 3 (first step 80.8)"
    assert cf.divergence(np.array([80.8, np.nan])) == "loss nan at step 2 (first step 80.8)"
    assert cf.divergence(np.array([80.8, 1354.0]), factor=np.inf) is None  # the frameworks' runs: non-finite only


def _linear_job(tmp_path: Path, **conf: object) -> dict:  # type: ignore[type-arg]
    c = make_config(model={"kind": "linear", "latent": 4, "likelihood": "gaussian", "obs_sigma": 0.5},
                    framework={"name": "torch"}, measure={"conformance": {"steps": 5, **conf}})
    resolved = OmegaConf.to_container(OmegaConf.structured(c))
    path = tmp_path / "conformance-torch.json"
    write_record(path, run_in_process(Job("t", "conformance", "torch", "eager", resolved, str(path))))  # type: ignore[arg-type]
    return read_records(tmp_path)  # type: ignore[return-value]


def test_stable_step_halves_until_no_loss_doubles(monkeypatch: pytest.MonkeyPatch) -> None:
    """A step size whose reference loss swings above 2 x its first (not diverged: under 10 x) is
    halved; the first that keeps every loss within 2 x is used, and what was tried is said."""
    swings = {0.05: [300.0, 3000.0, 900.0], 0.025: [300.0, 650.0, 280.0], 0.0125: [300.0, 290.0, 250.0]}
    monkeypatch.setattr(cf, "reference_trajectory", lambda spec, params, optim, steps: optim.lr)
    monkeypatch.setattr(cf, "reference_losses", lambda spec, lr, steps: np.array(swings[lr]))
    from harness.spec import OptimSpec

    got, tried = cf.stable_step(None, {}, OptimSpec(name="sgd", lr=0.05), [])  # type: ignore[arg-type]
    assert got.lr == 0.0125
    assert tried == ["0.05: loss 3000 at step 2 (first step 300)", "0.025: loss 650 at step 2 (first step 300)"]
    assert cf.divergence(np.array(swings[0.05])) is None  # under DIVERGENCE_FACTOR: not a divergence


@pytest.mark.slow
def test_linear_model_gets_a_stable_sgd_step_and_says_so(tmp_path: Path) -> None:
    """`model=linear measure=conformance`: SGD at 0.05 diverges on the linear-Gaussian VAE
    (80.8, 100.8, 1354, ... in the NumPy reference); the measure halves the step until the
    reference is stable, says so, and passes."""
    recs = _linear_job(tmp_path)
    assert recs[0]["status"] == "ok", recs[0]["error"]
    assert recs[0]["metrics"]["sgd_lr"] < 0.05 and recs[0]["metrics"]["sgd_lr_halved"][0].startswith("0.05: loss")
    s = cf.summarize(recs)
    assert s.ok, [r for r in s.rows if r["pass"] == "NO"]
    assert any("halved to" in n and "stable_sgd=true" in n for n in s.notes)


@pytest.mark.slow
def test_linear_model_with_the_step_as_given_diverges_and_fails(tmp_path: Path) -> None:
    recs = _linear_job(tmp_path / "as-given", stable_sgd=False)
    rec = recs[0]
    assert rec["status"] == "diverged" and "diverged" in rec["error"] and "sgd trajectory" in rec["error"], rec["error"]
    s = cf.summarize(recs)
    assert not s.ok
    ref = next(r for r in s.rows if r["quantity"].startswith("NumPy reference sgd"))
    assert ref["pass"] == "NO" and "at step 3" in ref["where"], ref
    assert any(r["quantity"] == "sgd step Δθ" for r in s.rows)  # the per-step rows stay in the table


def _batched(devs: list[float], floor: float = 0.0, dtype: str = "float32") -> dict[str, np.ndarray]:
    """A framework's per-batch terms (one value per batch, `devs` relative off 40) and NumPy's."""
    n = len(devs)
    return {cf.CHECK_BATCHES: np.array(n), f"{dtype}/terms/kl": np.array([[40.0 * (1 + d)] for d in devs]),
            f"ref/{dtype}/terms/kl": np.full((n, 1), 40.0), f"ref/{dtype}/floor terms/kl": np.full(n, floor)}


def test_float32_judges_the_median_batch_float64_the_worst() -> None:
    """A jump in one check batch (a ReLU flipping at its kink in one framework) is shown, not
    judged, in float32; float64 judges its worst batch; a NaN in any batch fails both."""
    flip = [1e-7, 1e-7, 5e-3, 1e-7, 1e-7]
    row = next(r for r in cf.table_rows({"a": _batched(flip)}, ["float32"]) if r["quantity"] == "terms (vs NumPy)")
    assert row["pass"] == "yes" and "worst batch 3/5" in row["where"] and float(row["max rel. deviation"]) < 1e-6
    shifted = [5e-3] * 3 + [1e-7] * 2  # a real disagreement moves most batches
    row = next(r for r in cf.table_rows({"a": _batched(shifted)}, ["float32"]) if r["quantity"] == "terms (vs NumPy)")
    assert row["pass"] == "NO"
    row = next(r for r in cf.table_rows({"a": _batched(flip, dtype="float64")}, ["float64"]) if r["quantity"] == "terms (vs NumPy)")
    assert row["pass"] == "NO" and row["where"].startswith("batch 3/5")
    assert cf.judged_over_batches("float32", [(1e-7, "x"), (float("nan"), "y"), (1e-7, "z")])[0] != 0.0
    assert np.isnan(cf.judged_over_batches("float32", [(1e-7, "x"), (float("nan"), "y"), (1e-7, "z")])[0])


def test_the_tolerance_rises_to_numpys_own_rounding_and_no_further() -> None:
    """Where NumPy computing in the dtype itself deviates (the KL near the prior cancels), the
    tolerance is FLOOR_FACTOR x that floor, never below the fixed one; a NaN floor fails."""
    fixed = cf.TOLERANCES[("terms", "float32")]
    assert cf.floor_tolerance({"a": _batched([1e-7] * 3, floor=1e-9)}, "terms", "float32") == (fixed, 1e-9)
    tol, floor = cf.floor_tolerance({"a": _batched([1e-7] * 3, floor=3e-5)}, "terms", "float32")
    assert floor == 3e-5 and tol == pytest.approx(cf.FLOOR_FACTOR * 3e-5)
    ok = cf.table_rows({"a": _batched([2e-4] * 3, floor=3e-5)}, ["float32"])
    assert next(r for r in ok if r["quantity"] == "terms (vs NumPy)")["pass"] == "yes"
    nan = cf.table_rows({"a": _batched([1e-7] * 3, floor=float("nan"))}, ["float32"])
    assert next(r for r in nan if r["quantity"] == "terms (vs NumPy)")["pass"] == "NO"


def test_float64_adam_trajectories_are_judged_within_one_eps_convention() -> None:
    """Keras' Adam eps convention is a different step: its float64 trajectory is reported beside
    the others; frameworks of one convention are judged against each other at 1e-8."""
    conv = {fw: cf.adam_convention(fw) for fw in FRAMEWORKS}
    keras = [fw for fw, c in conv.items() if c == "keras"]
    standard = [fw for fw, c in conv.items() if c == "standard"]
    if not keras or len(standard) < 2:
        pytest.skip("needs a Keras-convention framework and two standard ones")
    traj = np.linspace(40, 35, 5)
    loaded = {f"{fw}/eager": {"float64/adam trajectory": traj * (1 + (1e-4 if fw in keras else 0.0))} for fw in FRAMEWORKS}
    rows = {r["quantity"]: r for r in cf.table_rows(loaded, ["float64"])}
    assert rows["free-running adam trajectory"]["pass"] == "yes"
    assert rows["free-running adam trajectory, across Adam conventions"]["pass"] == "reported"
    loaded[f"{standard[0]}/eager"]["float64/adam trajectory"] = traj * (1 + 1e-6)
    assert {r["quantity"]: r for r in cf.table_rows(loaded, ["float64"])}["free-running adam trajectory"]["pass"] == "NO"

"""Throughput in mixed precision (framework.precision=bfloat16|float16): the CPU's native low
types read from its flags, the plain loops under the backend's policy (layers in the low type,
float32 parameters, float16's loss scaling), the roofline's matmul in the step's compute type, and
the table's precision, speed-up and native columns, one table across a precision sweep.

Nothing here is a timing claim: tiny models and synthetic records check the bookkeeping."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harness.api import COMPILED_ALIAS, MlpSpec, OptimSpec, RuntimeSpec, resolve_mode
from harness.fingerprint import EMULATED, cpu_low_precision, low_precision_support, native_support
from harness.initializers import init_params
from harness.measures import throughput as T
from harness.metrics import plain
from harness.records import config_hash, make_record, measure_row_keys, measured_config
from harness.spec import LOSS_SCALE_INIT, MIXED
from tests.conftest import FRAMEWORKS

LOW = tuple(MIXED)


# -- the CPU's native low types ------------------------------------------------------------------

#: two processors of a /proc/cpuinfo: the first block is read
CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse4_1 avx2 fma f16c avx512f avx512bw avx512_vnni avx512_bf16 avx512_fp16 amx_tile amx_bf16 amx_int8

processor\t: 1
flags\t\t: fpu
"""


def test_low_precision_flags_are_read_from_cpuinfo() -> None:
    assert cpu_low_precision(CPUINFO) == {"bfloat16": ["avx512_bf16", "amx_bf16"], "float16": ["avx512_fp16"]}
    old = CPUINFO.replace(" avx512_bf16 avx512_fp16 amx_tile amx_bf16 amx_int8", "")  # an AVX2/AVX-512 CPU without them
    assert cpu_low_precision(old) == {"bfloat16": [], "float16": []}
    arm = "processor\t: 0\nFeatures\t: fp asimd fphp asimdhp bf16 i8mm\n"
    assert cpu_low_precision(arm) == {"bfloat16": ["bf16"], "float16": ["asimdhp", "fphp"]}
    assert cpu_low_precision("") == {"bfloat16": [], "float16": []}
    # the table's cell
    support = cpu_low_precision(CPUINFO)
    assert native_support("bfloat16", support) == "avx512_bf16, amx_bf16"
    assert native_support("float16", support) == "avx512_fp16"
    assert native_support("bfloat16", cpu_low_precision(old)) == EMULATED == "emulated"
    assert native_support("float32", support) == "-" and native_support("float64", None) == "-"
    assert native_support("float16", None) == "unknown"
    # the same from the vector features every record's env keeps (records from before the flags)
    assert low_precision_support(["avx2", "avx512_bf16", "amx_fp16"]) == {"bfloat16": ["avx512_bf16"], "float16": ["amx_fp16"]}


# -- the plain loops under the mixed policy -----------------------------------------------------------

#: the decoder's weights scaled up: large logits make the loss sensitive to its layers' rounding
#: (at the canonical scale random-sign errors cancel in the loss to ~0.01 u)
SPEC = MlpSpec(x_dim=16, hidden=(12,), latent=3)
DECODER_SCALE = 6.0
#: one example per step, a new one each step; a vanishing SGD step keeps the weights where they are
BATCHES = range(6)
STILL = OptimSpec(name="sgd", lr=1e-12)


def _params(seed: int) -> dict[str, np.ndarray]:
    return {k: v * (DECODER_SCALE if k.startswith("decoder.") else 1.0) for k, v in init_params(SPEC, seed).items()}


def _name(dtype: Any) -> str:
    """A framework's dtype as its name ("bfloat16")."""
    return str(getattr(dtype, "name", None) or dtype).removeprefix("torch.")


def _host(v: Any) -> np.ndarray:
    return np.asarray(v.detach() if hasattr(v, "detach") else v)


def _plain(framework: str, dtype: str, optim: OptimSpec = STILL, params: dict[str, np.ndarray] | None = None) -> Any:
    """The framework's plain loop in `dtype`: torch eager (a torch.compile per loop costs seconds),
    TensorFlow and JAX compiled (one XLA compilation beats compiling each eager op)."""
    mode = "eager" if framework == "torch" else COMPILED_ALIAS[framework]
    return T.plain_module(framework).PlainStep(SPEC, optim, _params(0) if params is None else params,
                                               RuntimeSpec(mode=resolve_mode(framework, mode), dtype=dtype))


def _losses(p: Any) -> list[float]:
    """The loop's loss at each of its steps, one new example each (the same in every dtype)."""
    return [float(p(p.put(T.synthetic_batch(1, SPEC.x_dim, seed=s)))) for s in BATCHES]


_FLOAT32: dict[str, list[float]] = {}


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_plain_loops_compute_in_the_low_type(framework: str, dtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plain loop's loss on the same weights, examples and noise differs from its float32
    loss by more than 0.1 unit roundoffs of the low type on some of 6 examples (measured: 0.4 to
    3.7 u at the worst example; float32 layers are within ~1e-7, under 0.01 u of either type) and
    by less than 20 u on every one; its layers see the low type (inputs and weights, traced or run;
    biases stay float32, added in float32: the policy), its parameters stay float32 and its loss
    is float32."""
    u = MIXED[dtype]
    if framework not in _FLOAT32:
        _FLOAT32[framework] = _losses(_plain(framework, "float32"))
    p = _plain(framework, dtype)
    seen: list[tuple[str, str, str]] = []
    dense = p.ops.dense

    def spy(x: Any, w: Any, b: Any) -> Any:
        seen.append((_name(x.dtype), _name(w.dtype), _name(b.dtype)))
        return dense(x, w, b)

    monkeypatch.setattr(p.ops, "dense", spy)
    low = _losses(p)
    rel = [abs(a - b) / abs(b) for a, b in zip(low, _FLOAT32[framework])]
    assert 0.1 * u < max(rel) < 20 * u, [r / u for r in rel]
    assert seen and set(seen) == {(dtype, dtype, "float32")}, seen  # every layer's input, weight and bias
    assert _name(p(p.put(T.synthetic_batch(1, SPEC.x_dim))).dtype) == "float32"
    assert {_name(v.dtype) for v in p.params.values()} == {"float32"}


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_the_plain_float16_step_skips_a_non_finite_gradient(framework: str) -> None:
    """The plain loop's float16 step scales its loss as the backend's does: encoder weights x 1e6
    overflow float16 (65504), the step is skipped (parameters unchanged) and the scale halves; a
    finite step moves the weights and keeps the scale; bfloat16 has no loss scale."""
    big = {k: v * (1e6 if k.startswith("encoder.0.") else 1.0) for k, v in init_params(SPEC, 7).items()}
    p = _plain(framework, "float16", OptimSpec(), big)
    before = {k: _host(v).copy() for k, v in p.params.items()}
    assert p.loss_scale() == LOSS_SCALE_INIT
    x = p.put(T.synthetic_batch(4, SPEC.x_dim))
    p(x)
    p.sync()
    assert all(np.array_equal(before[k], _host(v)) for k, v in p.params.items()), "a non-finite float16 step was applied"
    assert p.loss_scale() == LOSS_SCALE_INIT / 2
    ok = _plain(framework, "float16", OptimSpec(), init_params(SPEC, 7))
    start = _host(ok.params["encoder.0.weight"]).copy()
    ok(x)
    ok.sync()
    assert not np.array_equal(_host(ok.params["encoder.0.weight"]), start)
    assert ok.loss_scale() == LOSS_SCALE_INIT
    assert _plain(framework, "bfloat16").loss_scale() is None


@pytest.mark.parametrize("dtype", ["float32", *LOW])
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_the_matmul_rate_is_measured_in_the_requested_dtype(framework: str, dtype: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The matmul the roofline divides by multiplies operands of the type asked for (the step's
    compute type): the timed step's product is of that type, and the rate is 2 n^3 / its median."""
    pl = T.plain_module(framework)
    got: list[str] = []

    class Timed:
        median = 0.5

    def fake_time_steps(step: Any, sync: Any, repeats: int, steps: int, warmup: int = 0, **kw: Any) -> Timed:
        out = step()
        sync()
        got.append(_name(out.dtype))
        assert tuple(out.shape) == (8, 8)
        return Timed()

    monkeypatch.setattr(pl, "time_steps", fake_time_steps)
    assert pl.matmul_rate(dtype, "cpu", 8, repeats=2) == 2.0 * 8**3 / 0.5
    assert got == [dtype]


def test_measure_batches_takes_the_roofline_in_the_compute_type(monkeypatch: pytest.MonkeyPatch) -> None:
    """bfloat16: the job's matmul rate is asked for in bfloat16 and recorded so, the roofline
    divides by it, and the env says which low types this CPU has natively."""
    pl = T.plain_module("torch")
    asked: list[str] = []
    monkeypatch.setattr(pl, "matmul_rate", lambda dtype, *a, **kw: asked.append(dtype) or 1e9)
    cfg = T.ThroughputConfig(batch_sizes=[8], repeats=2, steps=2, warmup=1, matmul_n=8, layers=False)
    m, env = T.measure_batches("torch", RuntimeSpec(dtype="bfloat16"), cfg, MlpSpec(x_dim=16, hidden=(12,), latent=3))
    assert asked == ["bfloat16"] and (m.matmul_dtype, m.matmul_flops_per_s, m.precision) == ("bfloat16", 1e9, "bfloat16")
    assert m.batches[0].roofline_fraction == pytest.approx(m.batches[0].achieved_flops / 1e9)
    assert env["cpu_low_precision"] == cpu_low_precision() and set(env["cpu_low_precision"]) == set(LOW)
    assert env["policy"]["compute"] == "bfloat16" and math.isfinite(m.batches[0].overhead_ratio or math.nan)


# -- the table -------------------------------------------------------------------------------------


def _batch(samples_per_s: float, batch: int = 8) -> T.BatchRow:
    step = batch / samples_per_s
    return T.BatchRow(batch=batch, first_call_s=0.1, compile_count_first_call=0, compile_count=0,
                      compile_count_unchanged=True, step_s_median=step, step_s_iqr=0.0, step_s_samples=[step] * 3,
                      outer_wall_s=3 * step, clock_ratio=1.0, repeats=3, steps=1, samples_per_s=samples_per_s,
                      step_flops=10**6, achieved_flops=1e9, peak_memory_bytes=2**20, peak_memory_method="cpu-rss-vmhwm",
                      loss_after=40.0, overhead_ratio=1.01, roofline_fraction=0.5)


def _rec(precision: str, samples_per_s: float, *, mode: str = "eager", flags: list[str] | None = None,
         low: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """A finished throughput record of one batch size on a CPU with `flags` (none of the low
    types' by default), its env's `cpu_low_precision` = `low` where given."""
    env: dict[str, Any] = {"cpu_model": "Some CPU", "cpu_features": flags if flags is not None else ["avx2", "avx512f"]}
    if low is not None:
        env["cpu_low_precision"] = low
    if precision == "float16":
        env.update(loss_scale=16384.0, skipped_steps=1)
    settings = T.ThroughputConfig(batch_sizes=[8], repeats=3, steps=1, matmul_n=64)
    metrics = T.ThroughputMetrics(
        batches=[_batch(samples_per_s)], matmul_flops_per_s=2e9, matmul_dtype=precision, batch_sizes=[8], matmul_n=64,
        matmul_flops_per_example=10**5, optimizer_flops=10**4, model={"describe": "MLP 16-12-3"}, optimizer="adam",
        settings=settings, repeats=3, steps=1, warmup=3, precision=precision, device="cpu", threads=0, allow_tf32=False,
        compile_mode="default", compile_cache="cold")
    return make_record(run_id=f"r-{precision}-{mode}", measure="throughput", framework="torch", mode=mode, status="ok",
                       error=None, config={"framework": {"precision": precision, "threads": 0}}, env=env,
                       metrics=plain(metrics))


def test_the_table_shows_precision_speedup_over_float32_and_emulation() -> None:
    """Two synthetic records, float32 and bfloat16 (same framework, mode and batch), on a CPU
    without bfloat16 flags: the bfloat16 row's speed-up is its samples/s over the float32 row's
    and its native cell says "emulated"; a float16 row without a float32 row of its mode has a
    blank speed-up; with the flags the cell names them."""
    f32, bf16 = _rec("float32", 1000.0), _rec("bfloat16", 1500.0)
    lone = _rec("float16", 1200.0, mode="compiled")
    s = T.summarize([bf16, lone, f32])
    assert s.ok, s.notes
    rows = {(r["mode"], r["precision"]): r for r in s.rows}
    assert [(r["mode"], r["precision"]) for r in s.rows] == [("compiled", "float16"), ("eager", "float32"), ("eager", "bfloat16")]
    assert rows["eager", "bfloat16"]["speed-up vs float32"] == "1.50"
    assert rows["eager", "bfloat16"]["speed-up vs float32"].raw == pytest.approx(1.5)
    assert rows["eager", "float32"]["speed-up vs float32"] == "1.00"
    assert rows["compiled", "float16"]["speed-up vs float32"] == "-"  # no float32 row of that mode
    assert rows["eager", "bfloat16"]["native"] == "emulated" and rows["compiled", "float16"]["native"] == "emulated"
    assert rows["eager", "float32"]["native"] == "-"
    assert any("torch/compiled float16: loss scale 16384, 1 step(s) skipped" in n for n in s.notes)
    assert any(n.startswith("matmul rates (GFLOP/s") and "torch/eager bfloat16 2" in n for n in s.notes), s.notes
    native = T.summarize([f32, _rec("bfloat16", 1500.0, flags=["avx512_bf16", "amx_bf16"])])
    assert next(r for r in native.rows if r["precision"] == "bfloat16")["native"] == "avx512_bf16, amx_bf16"
    # the env's own reading (cpuinfo's whole flags line) comes first
    told = T.summarize([f32, _rec("bfloat16", 1500.0, low={"bfloat16": ["amx_bf16"], "float16": []})])
    assert next(r for r in told.rows if r["precision"] == "bfloat16")["native"] == "amx_bf16"
    assert T.answer([f32, bf16]).startswith("torch (eager) at batch 8: 1,000 samples/s; bfloat16: at best 1.50x float32")
    # float32 alone: no speed-up or native columns (the tables of float32 runs keep their columns)
    only = T.summarize([f32])
    assert "speed-up vs float32" not in only.rows[0] and "native" not in only.rows[0] and only.rows[0]["precision"] == "float32"


def test_compared_keys_keep_float32_names_and_name_other_precisions() -> None:
    """`vaebench compare` keys: a float32 record's are those of the records from before mixed
    precision (the committed references still match); another precision's name it."""
    keys = set(T.compared([_rec("float32", 1000.0), _rec("bfloat16", 1500.0)]))
    assert keys == {"torch/eager batch 8 step time (s)", "torch/eager bfloat16 batch 8 step time (s)"}


def test_a_precision_sweep_is_one_table_and_its_records_stay_apart(tmp_path: Path) -> None:
    """framework.precision is a column of the throughput table (`ROW_KEYS`), not a report variant:
    the report summarizes the runs of a precision sweep together (so the speed-up has its float32
    row), while the records' config hashes (resume, newest-per-config) still tell them apart."""
    from harness import report

    f32, bf16 = _rec("float32", 1000.0), _rec("bfloat16", 1500.0)
    assert "framework.precision" not in measured_config(f32) and config_hash(f32) != config_hash(bf16)
    assert measured_config(f32, rows=True)["framework.precision"] == "float32"
    assert report.variant_keys([f32, bf16]) == []
    t = report.measure_table("throughput", [f32, bf16])
    assert [r["precision"] for r in t.rows] == ["float32", "bfloat16"]
    assert t.rows[1]["speed-up vs float32"] == "1.50" and "framework.precision" not in t.rows[0]
    kept, dropped = report.newest_per_config([f32, bf16])
    assert len(kept) == 2 and not dropped
    # a measure that declares none keeps its precisions as variants
    assert measure_row_keys("throughput") == ("framework.precision",) and measure_row_keys("gradflow") == ()
    other = {**f32, "measure": "gradflow", "config": {"framework": {"precision": "float32"}}}
    assert measured_config(other) == measured_config(other, rows=True) == {"framework.precision": "float32"}


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_layers_are_timed_in_the_compute_type_with_a_float32_bias(framework: str) -> None:
    """Each layer alone is timed as the step runs it: under bfloat16 the matmul in bfloat16 and
    the bias (float32) added in float32, the output in bfloat16; the bias's gradient float32."""
    pl = T.plain_module(framework)
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((4, 6)), rng.standard_normal((6, 5)), rng.standard_normal(5)
    fwd, both, sync = pl.layer_steps("dense", 1, x, w, b, dtype="bfloat16", device="cpu", mode="eager")
    got = both()
    sync()
    grads = got if framework == "torch" else got[1]  # torch's backward returns the gradients alone
    assert [_name(g.dtype) for g in grads] == ["bfloat16", "bfloat16", "float32"]
    fwd()
    sync()
    if framework != "torch":
        assert _name(got[0].dtype) == "bfloat16"
        np.testing.assert_allclose(np.asarray(got[0], dtype=np.float64), x @ w + b, rtol=0.05, atol=0.05)

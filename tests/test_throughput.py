"""The throughput measure: the FLOP count, the timing core's arithmetic (exact, with a fake
clock), the per-job function in every framework's eager and compiled mode on a tiny model,
a planted retrace, the peak-memory dispatch (GPU branches by monkeypatching), summary and plot.

Nothing here is a timing claim: sleeps and tiny models only check the bookkeeping."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harness import timing
from harness.api import (
    COMPILED_ALIAS,
    ConvSpec,
    DeviceUnavailable,
    MlpSpec,
    ModelSpec,
    OptimSpec,
    RuntimeSpec,
    load_backend,
)
from harness.config import AppConfig
from harness.measures import throughput as T
from harness.metrics import plain
from harness.records import host_env, make_record
from harness.worker import Job
from tests.conftest import FRAMEWORKS

TINY = T.ThroughputConfig(batch_sizes=[16, 8], repeats=2, steps=3, warmup=1, matmul_n=64, matmul_repeats=3)
#: the model the tiny runs time (throughput times the configured model)
TINY_SPEC = MlpSpec(x_dim=16, hidden=(12,), latent=3)
#: every framework in eager and in its compiled mode (what "compiled" means there)
CASES = [(f, m) for f in FRAMEWORKS for m in ("eager", COMPILED_ALIAS[f])]


# -- FLOP count ----------------------------------------------------------------------------------


def test_step_flops_by_hand_one_layer() -> None:
    """x_dim 3, no hidden layer, latent 2, batch 5: encoder 3 -> 4 (mean and log-variance),
    decoder 2 -> 3."""
    spec = MlpSpec(x_dim=3, hidden=(), latent=2)
    B = 5
    fwd = 2 * B * 3 * 4 + 2 * B * 2 * 3  # 120 + 60
    weight_grads = fwd  # 180
    input_grads = 2 * B * 2 * 3  # decoder's, into z (and on to the encoder); x needs none
    assert T.matmul_flops(spec, B) == fwd + weight_grads + input_grads == 420
    n_params = (3 * 4 + 4) + (2 * 3 + 3)  # 25
    assert T.optimizer_flops(spec, "adam") == 12 * n_params == 300
    assert T.step_flops(spec, B) == 720
    assert T.step_flops(spec, B, "sgd") == 420 + 2 * n_params
    # stop_gradient_z: the decoder's input gradient is not computed
    assert T.matmul_flops(MlpSpec(x_dim=3, hidden=(), latent=2, stop_gradient_z=True), B) == 360


def test_step_flops_784_512_256_mlp() -> None:
    spec = MlpSpec(x_dim=784, hidden=(512, 256), latent=20)
    assert T.matmul_flops(spec, 1) == 5_679_104
    assert T.step_flops(spec, 2048) == 5_679_104 * 2048 + 12 * 1_082_680


@pytest.mark.parametrize(
    "spec",
    [
        MlpSpec(x_dim=16, hidden=(12,), latent=3),
        MlpSpec(x_dim=20, hidden=(16, 8), latent=4),
        MlpSpec(x_dim=20, hidden=(16, 8), latent=4, stop_gradient_z=True),
        MlpSpec(x_dim=20, hidden=(16, 8), latent=4, freeze="decoder"),
        MlpSpec(x_dim=20, hidden=(16, 8), latent=4, freeze="encoder"),
        MlpSpec(x_dim=20, hidden=(16, 8), latent=4, freeze="decoder", stop_gradient_z=True),
        ConvSpec(x_dim=96, image=(8, 4, 3), filters=(4, 5), dense=6, latent=3),
        ConvSpec(x_dim=96, image=(8, 4, 3), filters=(4, 5), dense=6, latent=3, stop_gradient_z=True),
        ConvSpec(x_dim=64, image=(8, 8, 1), filters=(2, 3, 4), dense=6, latent=3, freeze="encoder"),
    ],
    ids=["1hidden", "2hidden", "stop_gradient_z", "freeze_decoder", "freeze_encoder", "freeze_decoder_stop_z",
         "conv", "conv_stop_gradient_z", "conv3_freeze_encoder"],
)
def test_matmul_flops_match_torch_flop_counter(spec: ModelSpec) -> None:
    """Independent count: torch's FlopCounterMode over the loss and its backward (it counts
    the matmuls and convolutions autograd actually runs)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from harness import vae
    from harness.initializers import init_params
    from impls.torch import ops

    B = 7
    desc = spec.params()
    params = {k: torch.tensor(ops.to_native(desc[k], v).copy(), dtype=torch.float32, requires_grad=True)
              for k, v in init_params(spec, 0).items()}
    x = torch.tensor(ops.input_to_native(T.synthetic_batch(B, spec.input_shape), spec.input_shape), dtype=torch.float32)
    eps = torch.randn(B, spec.latent)
    counter = FlopCounterMode(display=False)
    with counter:
        recon, kl = vae.loss_terms(ops, params, x, eps, spec)
        (recon + kl).mean().backward()
    assert counter.get_total_flops() == T.matmul_flops(spec, B)


# -- timing core -----------------------------------------------------------------------------


def test_stats_helpers_match_numpy() -> None:
    rng = np.random.default_rng(1)
    for n in (1, 2, 5, 10):
        xs = list(rng.random(n))
        assert timing.median(xs) == pytest.approx(float(np.median(xs)))
        assert timing.iqr(xs) == pytest.approx(float(np.percentile(xs, 75) - np.percentile(xs, 25)))
    with pytest.raises(ValueError):
        timing.median([])


class FakeClock:
    """time.perf_counter replaced by a counter that only the fake steps and syncs advance."""

    def __init__(self) -> None:
        self.t = 100.0
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.t


def test_time_steps_bookkeeping_with_a_fake_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(time, "perf_counter", clock)
    R, N, W, SYNC = 5, 4, 2, 0.5
    costs = [3.0, 1.0, 5.0, 2.0, 4.0]  # seconds per step in timed repeat r
    calls = {"step": 0, "sync": 0}

    def step() -> None:
        i = calls["step"]
        calls["step"] += 1
        clock.t += 0.25 if i < W else costs[(i - W) // N]  # warm-up steps cost 0.25

    def sync() -> None:
        calls["sync"] += 1
        clock.t += SYNC

    res = timing.time_steps(step, sync, R, N, W)
    assert calls["step"] == W + R * N
    assert calls["sync"] == 1 + 2 * R  # after the warm-up; before and after each repeat
    # a repeat: leading sync (outside t0..t1), N steps, trailing sync (inside)
    want = [(N * c + SYNC) / N for c in costs]
    assert res.samples_s == pytest.approx(want)
    assert res.median == pytest.approx(float(np.median(want)))
    assert res.iqr == pytest.approx(float(np.percentile(want, 75) - np.percentile(want, 25)))
    # the outer clock also sees the leading syncs, and nothing else (the fake clock only moves
    # in step/sync): R * (N c + 2 SYNC) in all
    assert res.outer_wall_s == pytest.approx(sum(N * c + 2 * SYNC for c in costs))
    assert res.timed_s == pytest.approx(sum(N * c + SYNC for c in costs))
    assert res.clock_ratio == pytest.approx(res.timed_s / res.outer_wall_s)
    assert (res.repeats, res.steps, res.warmup) == (R, N, W)


def test_interleaved_outer_walls_partition_the_block(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(time, "perf_counter", clock)
    order: list[str] = []

    def make(name: str, cost: float) -> timing.Contender:
        def step() -> None:
            order.append(name)
            clock.t += cost

        return timing.Contender(step, lambda: None)

    res = timing.time_interleaved({"a": make("a", 1.0), "b": make("b", 3.0)}, repeats=3, steps=2, warmup=1)
    # warm-ups first, then the repeats interleaved, the order reversing every other round
    assert order == ["a", "b"] + ["a", "a", "b", "b"] + ["b", "b", "a", "a"] + ["a", "a", "b", "b"]
    assert res["a"].samples_s == [1.0] * 3 and res["b"].samples_s == [3.0] * 3
    assert res["a"].outer_wall_s == pytest.approx(6.0) and res["b"].outer_wall_s == pytest.approx(18.0)
    assert res["a"].clock_ratio == pytest.approx(1.0) and res["b"].clock_ratio == pytest.approx(1.0)


def test_interleaving_cancels_a_steady_drift(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two identical contenders on a machine that speeds up steadily through the block (every
    step costs less than the one before, as when a CPU's clock settles): the alternating order
    gives them the same median and a paired ratio of 1; a fixed order (a before b in every
    round) would have charged a 10% overhead to a."""
    clock = FakeClock()
    monkeypatch.setattr(time, "perf_counter", clock)
    calls = {"n": 0}

    def step() -> None:
        clock.t += 1.0 - 0.01 * calls["n"]  # 1% less than the step before
        calls["n"] += 1

    res = timing.time_interleaved({"a": timing.Contender(step, lambda: None), "b": timing.Contender(step, lambda: None)},
                                  repeats=10, steps=1, warmup=0)
    a, b = np.array(res["a"].samples_s), np.array(res["b"].samples_s)
    assert res["a"].median == pytest.approx(res["b"].median)
    assert float(np.median(a / b)) == pytest.approx(1.0, abs=1e-3)  # a fixed order: every pair > 1.01


def test_time_steps_with_a_sleeping_step() -> None:
    """Real clock: a step that sleeps 10 ms times at about 10 ms (loose: arithmetic, not a timing claim)."""
    res = timing.time_steps(lambda: time.sleep(0.01), lambda: None, repeats=3, steps=3, warmup=1)
    assert 0.01 <= res.median < 0.015
    assert len(res.samples_s) == 3
    assert 0.9 < res.clock_ratio <= 1.0


def test_a_compile_count_change_while_timing_raises() -> None:
    count = {"n": 1}

    def step() -> None:
        count["n"] += 1  # "retraces" on every call, also after the warm-up

    with pytest.raises(timing.RecompiledWhileTiming, match="compile count went from"):
        timing.time_steps(step, lambda: None, 2, 2, 1, compile_count=lambda: count["n"])
    # a step that does not retrace passes
    timing.time_steps(lambda: None, lambda: None, 2, 2, 1, compile_count=lambda: 7)


@pytest.mark.slow
def test_a_real_retrace_raises() -> None:
    """A jitted backend fed a new batch shape on every call really recompiles; the timing
    core's compile-count check catches it."""
    b = load_backend("jax", TINY_SPEC, mode="jit")
    xs = [b.put(T.synthetic_batch(n, TINY_SPEC.x_dim)) for n in range(2, 8)]
    it = iter(xs)
    with pytest.raises(timing.RecompiledWhileTiming):
        timing.time_steps(lambda: b.train_step(next(it)), b.sync, 2, 2, 1, compile_count=b.compile_count)


def test_planted_retrace_in_run_one_raises() -> None:
    """run_one refuses samples taken while the step's compile count moved."""

    class Retracing:
        def __init__(self, *args: Any, **kw: Any) -> None:
            self.b = load_backend(*args, **kw)
            self.calls = 0

        def __getattr__(self, name: str) -> Any:
            return getattr(self.b, name)

        def train_step(self, x: Any) -> Any:
            self.calls += 1
            return self.b.train_step(x)

        def compile_count(self) -> int:
            return self.calls // 4  # moves as steps run: a retrace every 4 steps

    with pytest.raises(timing.RecompiledWhileTiming):
        T.run_one("torch", RuntimeSpec(), 8, TINY, TINY_SPEC, backend_factory=Retracing)


def test_cpu_peak_memory_sees_an_allocation() -> None:
    """64 MB of fresh pages, touched: an anonymous mapping, so the allocator cannot hand back
    pages an earlier test left resident (under pytest-xdist a worker's np.ones could read 0)."""
    import mmap

    p = timing.CpuPeakMemory()
    p.reset()
    with mmap.mmap(-1, 64 << 20) as m:
        m.write(b"\x01" * (64 << 20))
    peak = p.peak_bytes()
    assert p.method in ("vmhwm", "ru_maxrss")
    assert peak is not None and peak >= (40 << 20 if p.method == "vmhwm" else 0)


# -- the per-job function in every framework ----------------------------------------------------

NUMERIC = (
    "first_call_s",
    "step_s_median",
    "step_s_iqr",
    "outer_wall_s",
    "clock_ratio",
    "samples_per_s",
    "achieved_flops",
    "roofline_fraction",
    "plain_first_call_s",
    "plain_step_s_median",
    "plain_step_s_iqr",
    "plain_clock_ratio",
    "overhead_ratio",
    "overhead_ratio_paired",
    "loss_after",
)


@pytest.mark.slow
@pytest.mark.parametrize("framework,mode", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_run_batches(framework: str, mode: str) -> None:
    typed, env = T.measure_batches(framework, RuntimeSpec(mode=mode), TINY, TINY_SPEC, optim=OptimSpec(lr=1e-3))
    metrics = plain(typed)  # what the record stores
    assert env["framework"] == framework
    assert metrics["batch_sizes"] == [8, 16]  # increasing order
    assert metrics["matmul_flops_per_s"] > 0 and math.isfinite(metrics["matmul_flops_per_s"])
    assert (metrics["repeats"], metrics["steps"], metrics["precision"], metrics["device"]) == (2, 3, "float32", "cpu")
    assert metrics["compile_cache"] in ("cold", "default")
    for row in metrics["batches"]:
        for k in NUMERIC:
            assert k in row and math.isfinite(row[k]), (k, row.get(k))
        assert row["step_s_median"] > 0 and row["first_call_s"] > 0
        assert len(row["step_s_samples"]) == 2 and len(row["plain_step_s_samples"]) == 2
        assert row["step_s_median"] == pytest.approx(float(np.median(row["step_s_samples"])))
        assert row["compile_count_unchanged"] is True
        if mode != "eager":
            assert row["compile_count_first_call"] >= 1  # the first call compiled
        assert row["compile_count"] == row["compile_count_first_call"]
        assert row["step_flops"] == T.step_flops(TINY_SPEC, row["batch"])
        assert row["step_flops"] == metrics["matmul_flops_per_example"] * row["batch"] + metrics["optimizer_flops"]
        assert row["samples_per_s"] == pytest.approx(row["batch"] / row["step_s_median"])
        assert row["roofline_fraction"] == pytest.approx(row["achieved_flops"] / metrics["matmul_flops_per_s"])
        assert row["peak_memory_bytes"] is not None and row["peak_memory_bytes"] >= 0
        assert row["peak_memory_method"].startswith("cpu-rss-")


@pytest.mark.slow
@pytest.mark.parametrize("framework,mode", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_plain_step_trains(framework: str, mode: str) -> None:
    """The plain loop runs in every mode from the canonical weights; its compile counter
    sees its compilation."""
    from harness.api import resolve_mode
    from harness.initializers import init_params

    spec = TINY_SPEC
    pl = T.plain_module(framework)
    p = pl.PlainStep(spec, OptimSpec(), init_params(spec, 0), RuntimeSpec(mode=resolve_mode(framework, mode)))
    x = p.put(T.synthetic_batch(8, spec.x_dim))
    losses = [float(p(x)) for _ in range(3)]
    assert all(math.isfinite(v) for v in losses)
    assert abs(losses[0] - 16 * math.log(2)) < 8  # binary pixels, random decoder: about D ln 2 nats
    assert p.compile_count() >= (0 if mode == "eager" else 1)


# -- device dispatch (GPU branches, monkeypatched) --------------------------------------------------


def test_torch_peak_memory_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from impls.torch import plain

    if not torch.cuda.is_available():  # a requested GPU that is absent is a clear error
        with pytest.raises(DeviceUnavailable, match="device=gpu asked for"):
            plain.resolve_device("gpu")
    seen: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: seen.append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d=None: seen.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: 123)
    plain.reset_peak_memory("gpu")
    assert plain.peak_memory_bytes("gpu") == 123
    assert plain.peak_memory_bytes("auto") == 123
    assert seen == ["sync", "reset", "sync", "sync"]
    assert plain.peak_memory_method("gpu") == "torch.cuda.max_memory_allocated"
    # the CPU branch goes to the shared RSS tracker and never touches CUDA
    plain.reset_peak_memory("cpu")
    assert plain.peak_memory_bytes("cpu") == timing.CPU_PEAK.peak_bytes()
    assert seen == ["sync", "reset", "sync", "sync"]


def test_jax_peak_memory_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    import jax

    from impls.jax import plain

    class FakeGpu:
        platform = "gpu"

        def memory_stats(self) -> dict[str, int]:
            return {"peak_bytes_in_use": 456, "bytes_in_use": 10}

    if not any(d.platform == "gpu" for d in jax.devices()):
        with pytest.raises(DeviceUnavailable, match="device=gpu asked for"):
            plain.resolve_device("gpu")
    real = plain.resolve_device
    monkeypatch.setattr(plain, "resolve_device", lambda d: FakeGpu() if d in ("gpu", "auto") else real(d))
    plain.reset_peak_memory("gpu")  # nothing to reset in JAX; must not touch the CPU tracker
    assert plain.peak_memory_bytes("gpu") == 456
    assert "process lifetime" in plain.peak_memory_method("gpu")
    plain.reset_peak_memory("cpu")
    assert plain.peak_memory_bytes("cpu") == timing.CPU_PEAK.peak_bytes()


def test_tensorflow_peak_memory_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    import tensorflow as tf

    from impls.tensorflow import plain

    if not tf.config.list_physical_devices("GPU"):
        with pytest.raises(DeviceUnavailable, match="device=gpu asked for"):
            plain.resolve_device("gpu")
    seen: list[str] = []
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: ["fake-gpu"] if kind == "GPU" else [])
    monkeypatch.setattr(tf.config.experimental, "reset_memory_stats", lambda name: seen.append(f"reset {name}"))
    monkeypatch.setattr(tf.config.experimental, "get_memory_info", lambda name: {"current": 1, "peak": 789} if name == "GPU:0" else {})
    monkeypatch.setattr(tf.test.experimental, "sync_devices", lambda: seen.append("sync"))
    monkeypatch.setattr(tf.config.experimental, "set_memory_growth", lambda g, on: None)  # the backend's rule sets it
    assert plain.resolve_device("auto") == "/GPU:0"
    plain.reset_peak_memory("gpu")
    assert plain.peak_memory_bytes("gpu") == 789
    assert seen == ["sync", "reset GPU:0", "sync"]


# -- run(), summary, plot ---------------------------------------------------------------------------


def test_settings_come_from_the_config() -> None:
    from harness.config import to_app_config

    c = to_app_config({"measure": {"throughput": {"batch_sizes": [4], "repeats": 3}}})
    s = T.settings(c)
    assert isinstance(s, T.ThroughputConfig) and s.batch_sizes == [4] and s.repeats == 3


def _record(tmp_path: Path, status: str, metrics: dict[str, Any], framework: str = "torch", mode: str = "eager",
            error: str | None = None, env: dict[str, Any] | None = None) -> dict[str, Any]:
    return make_record(run_id="t", measure="throughput", framework=framework, mode=mode, status=status, error=error,
                       config={}, env={**host_env(), **(env or {})}, metrics=metrics)


@pytest.mark.slow
def test_run_summarize_and_plot(tmp_path: Path) -> None:
    c = AppConfig()
    c.framework.name, c.progress = "torch", False
    c.measure.throughput = TINY  # type: ignore[attr-defined]
    job = Job(run_id="t", measure="throughput", framework="torch", mode="eager", config={}, record_path=str(tmp_path / "r.json"))
    res = T.run(c, job)
    assert res.status == "ok" and res.error is None
    assert res.metrics["threads"] == 0 and res.metrics["settings"]["batch_sizes"] == [16, 8]
    good = _record(tmp_path, res.status, res.metrics, env=res.backend_env)
    failed = _record(tmp_path, "failed", {}, framework="jax", mode="jit", error="RuntimeError: boom")
    half = _record(tmp_path, "ok", {"batches": [{"batch": 8}]}, framework="tensorflow", mode="xla")  # incomplete row
    s = T.summarize([failed, good, half])
    assert not s.ok  # a failed job fails the summary
    assert [r["batch"] for r in s.rows if r["framework"] == "torch"] == [8, 16]
    assert any("jax/jit: failed: RuntimeError: boom" in n for n in s.notes)
    assert not any(n.startswith("best ") for n in s.notes)  # one mode per framework ran: no "best mode" to name
    assert any(n.startswith("clock check: the timed repeats are") for n in s.notes)  # the clock ratio, explained
    assert "Throughput" in s.title and good["env"]["cpu_model"] in s.title
    row = next(r for r in s.rows if r["framework"] == "torch")
    for k in ("first call (s)", "step (ms, median)", "IQR (ms)", "samples/s", "GFLOP/s", "roofline", "peak mem (MiB)",
              "step time / plain loop's"):
        assert row[k] != "-", k
    assert "clock ratio" not in row  # a check (in the notes), not a column
    assert T.summarize([good]).ok in (True, False)  # a clock ratio off by > 5% may fail it on a loaded machine
    out = T.PLOTS["throughput.png"]([failed, good], tmp_path / "throughput.png")
    assert out == tmp_path / "throughput.png" and out.stat().st_size > 1000
    assert T.PLOTS["throughput.png"]([failed], tmp_path / "none.png") is None


def test_table_without_the_plain_loop_has_no_empty_column_and_best_modes_need_two_modes(tmp_path: Path) -> None:
    """The default suite times without the plain loop: no always-empty "plain loop" column. A
    framework timed in one mode gets no "best mode" line; in two, it does."""
    def batch(step: float) -> dict[str, Any]:
        return {"batch": 8, "first_call_s": 0.1, "step_s_median": step, "step_s_samples": [step] * 3, "step_s_iqr": 0.0,
                "samples_per_s": 8 / step, "clock_ratio": 1.0, "loss_after": 40.0, "achieved_flops": 1e9,
                "roofline_fraction": 0.5, "peak_memory_bytes": 2**20}

    eager = _record(tmp_path, "ok", {"batches": [batch(0.01)]}, framework="torch", mode="eager")
    s = T.summarize([eager])
    assert s.ok and "step time / plain loop's" not in s.rows[0] and not any(n.startswith("best ") for n in s.notes)
    compiled = _record(tmp_path, "ok", {"batches": [batch(0.005)]}, framework="torch", mode="compiled")
    s = T.summarize([eager, compiled])
    assert any(n.startswith("best torch mode at batch 8: samples/s compiled (1600)") for n in s.notes), s.notes


def test_summarize_only_failed_records() -> None:
    failed = make_record(run_id="t", measure="throughput", framework="tensorflow", mode="xla", status="unavailable",
                         error="tensorflow is not installed", config={}, env={}, metrics={})
    s = T.summarize([failed])
    assert not s.ok and s.rows == []
    assert any("tensorflow/xla: unavailable" in n for n in s.notes)


def test_measure_and_timing_core_import_no_framework() -> None:
    from tests.test_neutral import _loaded

    assert _loaded("import harness.timing, harness.measures.throughput") == "LOADED []"


@pytest.mark.parametrize("framework,mode", [("tensorflow", "xla"), ("jax", "jit"), ("tensorflow", "eager")])
def test_layer_backward_is_timed_on_a_random_cotangent(framework: str, mode: str) -> None:
    """The per-layer forward + backward differentiates the fixed random cotangent
    (`timing.cotangent`) and returns the forward output: checked against NumPy's transposed
    convolution and its backward. With an all-ones cotangent XLA simplified TensorFlow's
    backward to almost nothing, and the measure timed that."""
    import importlib

    from harness.models.conv import np_conv_t, np_conv_t_backward

    pl = importlib.import_module(f"impls.{framework}.plain")
    ops = importlib.import_module(f"impls.{framework}.ops")
    rng = np.random.default_rng(3)
    x, w, b = rng.standard_normal((2, 4, 4, 3)), rng.standard_normal((3, 3, 3, 5)), rng.standard_normal(5)
    param = ConvSpec().params()["decoder.2.weight"]  # a transposed convolution's kernel
    _, both, sync = pl.layer_steps("conv2d_transpose", 2, x, ops.to_native(param, w), b, dtype="float32", device="cpu",
                                   mode=mode)
    y, (dx, dw, db) = both()
    sync()
    want_y, cache = np_conv_t(x, w, b, 2)
    ct = timing.cotangent(want_y.shape, "float32").astype(np.float64)  # what the layer was given
    want_dx, want_dw, want_db = np_conv_t_backward(w, cache, ct, 2)  # per-example dW, db: summed below
    close = {"rtol": 1e-4, "atol": 1e-4}  # float32
    np.testing.assert_allclose(np.asarray(y), want_y, **close)
    np.testing.assert_allclose(np.asarray(dx), want_dx, **close)
    np.testing.assert_allclose(ops.from_native(param, np.asarray(dw)), want_dw.sum(axis=0), **close)
    np.testing.assert_allclose(np.asarray(db), want_db.sum(axis=0), **close)
    ones_dw = np_conv_t_backward(w, cache, np.ones_like(ct), 2)[1].sum(axis=0)
    assert not np.allclose(ops.from_native(param, np.asarray(dw)), ones_dw, **close)  # not the all-ones cotangent

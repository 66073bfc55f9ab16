"""How fast is one training step? Per framework x mode x batch size: first-call time
(tracing and compilation), step time (median and IQR of R repeats of N steps), samples/s,
achieved FLOP/s against a matmul rate measured in the same job, peak memory, and the
harness's overhead against a plain hand-written loop of the same step.

Timing follows DESIGN.md section 7 through the one timing core, `harness.timing`:

- One job is one framework x mode; batch sizes run inside it in increasing order (the CPU
  peak-memory fallback and JAX's GPU peak are high-water marks that cannot go down).
- Per batch size: the framework's in-memory compile caches are dropped
  (`impls.<fw>.plain.reset_compile_state`), a new backend is built from the canonical
  weights, the batch (synthetic binary pixels) is staged on the device with `put`, and the
  first `train_step` + sync is timed: that is the first-call time (trace + compile; the
  record's `compile_cache` says whether the on-disk compile cache was cold). Peak memory is
  read over the first call and the harness's warm-up steps.
- Then the plain loop (`impls.<fw>.plain.PlainStep`: same weights, same model functions,
  written as a user would) is built and its first call timed, and both are warmed up and
  timed with their repeats interleaved (harness repeat, plain repeat, ...), so drift on the
  machine hits both. A compile-count change during the timing raises.
- `overhead_ratio = harness median step / plain median step` (and `overhead_ratio_paired`,
  the median over repeats of harness_i / plain_i, taken back to back); `clock_ratio` = the harness's
  timed repeats / its share of an outer wall clock around the whole block (within
  `clock_tol` of 1, or the summary fails).
- After the batch sizes: a dense matmul_n x matmul_n matmul rate in the same framework on the
  same device, in the type the step computes in (bfloat16 or float16 under mixed precision:
  like with like), measured last, so its buffers do not raise the memory peaks;
  `roofline_fraction = achieved FLOP/s / matmul rate`.

Mixed precision (`framework.precision=bfloat16|float16`): the harness's step and the plain loop
run the same policy (`harness.spec.Policy`: layers in the low type, parameters, optimizer state
and loss reductions in float32; float16 with each framework's dynamic loss scaling). The record's
env says which low types this CPU computes in natively (`cpu_low_precision`, from its flags:
`harness.fingerprint.cpu_low_precision`); the table shows each row's precision, its speed-up over
the float32 row of the same framework, mode and batch, and "emulated" where the CPU has no
instructions for the type (the frameworks then convert to float32 and back: a slow row is the
CPU's, not the framework's). Precision is a column of one table, not a report variant
(`ROW_KEYS`), so the speed-up can be read across the runs of a precision sweep.
- After each batch size the rows so far are saved beside the record (`harness.job.checkpoint`):
  a job that dies later (killed, timed out, out of memory) keeps them in its `failed` record.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from harness.api import ModelSpec, OptimSpec, RuntimeSpec, load_backend, resolve_mode
from harness.fingerprint import cpu_low_precision, low_precision_support, native_support
from harness.initializers import init_params
from harness.job import Job, Result, checkpoint
from harness.judged import Judged, describe, finite, le
from harness.measures.common import (
    Quantity,
    Summary,
    by_framework,
    completed,
    dataset,
    finished,
    fmt,
    model_spec,
    optim_spec,
    runtime_spec,
    split,
)
from harness.metrics import load, plain
from harness.models.base import layer_step_flops, optimizer_flops
from harness.models.base import step_flops as models_step_flops
from harness.plots import COLORS, pyplot, save_png
from harness.records import compile_cache_state
from harness.schema import check, setting
from harness.spec import MIXED, Policy
from harness.timing import Contender, first_call, median, time_interleaved, time_steps, warm_up

if TYPE_CHECKING:
    from harness.config import AppConfig

#: seed of the synthetic binary batch
DATA_SEED = 0


@dataclass
class ThroughputConfig:
    """`measure.throughput.*`. The model timed is the configured one (model.*), on inputs of the
    configured data's shape (its own batch sizes, not data.batch_size)."""

    batch_sizes: list[int] = setting([32, 128, 512, 2048], gt=0, nonempty=True)
    repeats: int = setting(10, gt=1)  # R: timed repeats (one sample each)
    steps: int = setting(10, gt=0)  # N: steps per repeat
    warmup: int = setting(3, ge=0)  # untimed steps after the first call, before timing
    matmul_n: int = setting(1024, gt=0)  # the roofline matmul is matmul_n x matmul_n
    matmul_repeats: int = setting(10, gt=0)
    plain: bool = True  # also time the plain hand-written loop (overhead ratio)
    layers: bool = True  # also time each layer alone, forward and backward, at the largest batch size
    layer_repeats: int = setting(5, gt=1)
    clock_tol: float = setting(0.05, gt=0)  # |clock_ratio - 1| allowed


Config = ThroughputConfig


@dataclass(kw_only=True)
class BatchRow:
    """One batch size (`run_one`): the first call, the step times of the timed repeats
    (`harness.timing.TimingResult.as_metrics`), the FLOP counts, the memory peak, the loss after
    timing; with `plain=true` the same for the plain loop and the ratios of the two."""

    batch: int
    plain_first_call_s: float | None = None  # with settings.plain
    first_call_s: float
    compile_count_first_call: int
    compile_count: int
    compile_count_unchanged: bool
    step_s_median: float
    step_s_iqr: float
    step_s_samples: list[float]
    outer_wall_s: float
    clock_ratio: float
    repeats: int
    steps: int
    samples_per_s: float
    step_flops: int
    achieved_flops: float
    peak_memory_bytes: int | None  # null where the framework cannot read its peak
    peak_memory_method: str
    loss_after: float
    plain_step_s_median: float | None = None  # this and the rest of the plain_* and ratios: with settings.plain
    plain_step_s_iqr: float | None = None
    plain_step_s_samples: list[float] | None = None
    plain_outer_wall_s: float | None = None
    plain_clock_ratio: float | None = None
    plain_samples_per_s: float | None = None
    overhead_ratio: float | None = None
    overhead_ratio_paired: float | None = None
    roofline_fraction: float | None = None  # absent from the partial metrics (no matmul rate yet)


@dataclass
class LayerRow:
    """One layer alone in one formulation (`time_layers`): median times of its forward pass and
    of forward and backward, and the repeats behind them."""

    layer: str
    op: str
    formulation: str
    batch: int
    forward_s: float
    forward_backward_s: float
    backward_s: float
    forward_s_samples: list[float]
    forward_backward_s_samples: list[float]


@dataclass(kw_only=True)
class ThroughputMetrics:
    """The throughput record's metrics (`harness.metrics`: built here, stored by `plain`, read
    back by `load`). The partial metrics saved after each batch size are the same type without
    the matmul rate, the roofline fractions and the layers."""

    batches: list[BatchRow]
    matmul_flops_per_s: float | None = None  # measured after the batch sizes
    matmul_dtype: str | None = None  # the type of the roofline's matmul (the step's compute type; absent from older records)
    batch_sizes: list[int]
    matmul_n: int
    # step_flops(B) = matmul_flops_per_example * B + optimizer_flops (the roofline's curve)
    matmul_flops_per_example: int
    optimizer_flops: int
    # the spec's fields (they depend on its kind; tuples as lists), describe() and parameter count
    model: dict[str, Any]
    optimizer: str
    settings: ThroughputConfig
    repeats: int
    steps: int
    warmup: int
    precision: str
    device: str
    threads: int
    allow_tf32: bool
    compile_mode: str
    conv_transpose: str | None = None  # absent from version-1 records
    compile_cache: str
    layers: list[LayerRow] | None = None  # with settings.layers


METRICS = ThroughputMetrics
#: what it reads (`harness.measures`): the configured model on the configured data's input shape
#: (its own batch sizes: not data.batch_size), the configured optimizer (timed, and counted in
#: the FLOPs), the seed of the backend's RNG
READS = ("framework", "seed", "model", "data", "-data.batch_size", "optim", "measure.throughput")
VERSION = 3  # 2: measures the configured model and data, not its own MLP; 3: per-layer backward with a random cotangent
#: config keys that are a column of this measure's table rather than a variant of the report
#: (`harness.records.measured_config`; they still tell records apart: `config_hash`): a
#: precision sweep is one table, with each row's speed-up over float32
ROW_KEYS = ("framework.precision",)


def settings(c: AppConfig) -> ThroughputConfig:
    t: ThroughputConfig = c.measure.throughput
    return t


# -- FLOP count ------------------------------------------------------------------------------


def matmul_flops(spec: ModelSpec, batch: int) -> int:
    """Multiply-add FLOP (2 per multiply-add) of the layers in one training step: the model
    kind's layers (`layer_flops`: dense and convolutions alike), each forward, and its weight
    and input gradients where autograd computes them (`harness.models.base.layer_step_flops`:
    freeze and stop_gradient_z leave some out)."""
    return layer_step_flops(spec.module.layer_flops(spec), spec, batch)


def step_flops(spec: ModelSpec, batch: int, optim: str = "adam", momentum: float = 0.0) -> int:
    """Analytic FLOP count of one training step (forward, ELBO, backward, optimizer update):
    `matmul_flops(spec, B) + optimizer_flops(spec)` (`harness.models.base.step_flops`).

    Neglected: elementwise work (bias adds and their gradients, activations, the
    reparameterisation, softplus / the likelihood, the KL, the means): O(B x sum of layer
    widths) against O(B x the layers' multiply-adds). For the 784-512-256-20 MLP that is about
    2 360 activations per example, some 10-30 FLOP each forward and backward, against 5.7 M
    matmul FLOP per example: under 1%.

    784-512-256 MLP, 20 latents: 5 679 104 B + 12 x 1 082 680 (Adam), e.g. 11.64 GFLOP at B = 2048.
    """
    return models_step_flops(spec, batch, optim, momentum)


# -- one framework x mode x batch --------------------------------------------------------------


def synthetic_batch(batch: int, shape: int | tuple[int, ...], seed: int = DATA_SEED) -> np.ndarray:
    """Binary pixels, each 1 with probability 1/2: `batch` examples of `shape` (a width, or
    the model's input shape)."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    return (np.random.default_rng(seed).random((batch, *shape)) < 0.5).astype(np.float64)


def plain_module(framework: str) -> Any:
    """impls.<framework>.plain (imports that framework)."""
    return importlib.import_module(f"impls.{framework}.plain")


def harness_contender(b: Any, x: Any) -> Contender:
    """The harness step as the timing core times it: `train_step` on the staged batch, the
    backend's sync, its compile counter. tests/bench times the same closure."""
    return Contender(step=lambda: b.train_step(x), sync=b.sync, compile_count=b.compile_count)


def plain_contender(p: Any, x: Any) -> Contender:
    return Contender(step=lambda: p(x), sync=p.sync, compile_count=p.compile_count)


def run_one(
    framework: str,
    runtime: RuntimeSpec,
    batch: int,
    cfg: ThroughputConfig,
    spec: ModelSpec,
    *,
    optim: OptimSpec | None = None,
    fresh_compile_state: bool = True,
    backend_factory: Callable[..., Any] | None = None,
) -> tuple[BatchRow, dict[str, Any]]:
    """Measure one batch size; returns its row of the record (roofline filled in later by
    `measure_batches`, which knows the matmul rate) and the backend's version(), which measure_batches
    puts in the record's env. Raises RecompiledWhileTiming on a retrace.
    `backend_factory` replaces load_backend (same arguments), for tests."""
    runtime = dataclasses.replace(runtime, mode=resolve_mode(framework, runtime.mode))
    device, seed = runtime.device, runtime.seed
    opt = optim or OptimSpec()
    pl = plain_module(framework)
    if fresh_compile_state:
        pl.reset_compile_state()
    make = backend_factory or load_backend
    b = make(framework, spec, opt, runtime)
    x_host = synthetic_batch(batch, spec.input_shape)
    x = b.put(x_host)
    b.sync()
    h = harness_contender(b, x)
    pl.reset_peak_memory(device)
    first_s = first_call(h.step, h.sync)
    compiles_first = b.compile_count()
    warm_up(h.step, h.sync, cfg.warmup)  # so the peak covers steady-state steps too
    peak = pl.peak_memory_bytes(device)
    peak_method = pl.peak_memory_method(device)
    contenders = {"harness": h}
    plain_first_s = None
    if cfg.plain:
        p = pl.PlainStep(spec, opt, init_params(spec, seed), runtime)
        px = p.put(x_host)
        pc = plain_contender(p, px)
        plain_first_s = first_call(pc.step, pc.sync)
        contenders["plain"] = pc
    compiles_before = b.compile_count()
    res = time_interleaved(contenders, cfg.repeats, cfg.steps, cfg.warmup)
    compiles_after = b.compile_count()
    hr = res["harness"]
    flops = step_flops(spec, batch, opt.name, opt.momentum)
    loss = float(b.train_step(x))  # float() syncs
    b.sync()
    vs_plain: dict[str, Any] = {}
    if "plain" in res:
        pr = res["plain"]
        vs_plain = {
            **pr.as_metrics("plain_"),
            "plain_samples_per_s": batch / pr.median,
            "overhead_ratio": hr.median / pr.median,
            # repeats i of both ran back to back: the median of the per-pair ratios is robust to drift
            "overhead_ratio_paired": median([a / b for a, b in zip(hr.samples_s, pr.samples_s)]),
        }
    row = BatchRow(
        batch=int(batch),
        plain_first_call_s=plain_first_s,
        first_call_s=first_s,
        compile_count_first_call=compiles_first,
        compile_count=compiles_after,
        compile_count_unchanged=compiles_after == compiles_before,
        **hr.as_metrics(),
        repeats=hr.repeats,
        steps=hr.steps,
        samples_per_s=batch / hr.median,
        step_flops=flops,
        achieved_flops=flops / hr.median,
        peak_memory_bytes=peak,
        peak_memory_method=peak_method,
        loss_after=loss,
        **vs_plain,
    )
    return row, b.version()


def measure_batches(
    framework: str,
    runtime: RuntimeSpec,
    cfg: ThroughputConfig,
    spec: ModelSpec,
    *,
    optim: OptimSpec | None = None,
    progress: Callable[[str], None] | None = None,
    save: Callable[[dict[str, Any]], Any] | None = None,
) -> tuple[ThroughputMetrics, dict[str, Any]]:
    """Every batch size (increasing), then the matmul rate; returns (metrics, backend env).
    `save(metrics)` is called after each batch size with the metrics so far as plain data (the
    rows finished, no roofline yet), to keep partial metrics."""
    check(cfg, "measure.throughput.")
    runtime = dataclasses.replace(runtime, mode=resolve_mode(framework, runtime.mode))
    mode, dtype, device, seed = runtime.mode, runtime.dtype, runtime.device, runtime.seed
    env: dict[str, Any] = {}
    opt = optim or OptimSpec()
    metrics = ThroughputMetrics(
        batches=[],
        batch_sizes=[],
        matmul_n=cfg.matmul_n,
        matmul_flops_per_example=matmul_flops(spec, 1),
        optimizer_flops=optimizer_flops(spec, opt.name, opt.momentum),
        model={**{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(spec).items()},
               "describe": spec.describe(), "params": sum(math.prod(s) for s in spec.param_shapes().values())},
        optimizer=opt.name,
        settings=cfg,
        repeats=cfg.repeats,
        steps=cfg.steps,
        warmup=cfg.warmup,
        precision=dtype,
        device=device,
        threads=runtime.threads,
        allow_tf32=runtime.allow_tf32,
        compile_mode=runtime.compile_mode,
        conv_transpose=runtime.conv_transpose,
        compile_cache=compile_cache_state(),
    )
    rows = metrics.batches
    for batch in sorted({int(b) for b in cfg.batch_sizes}):
        if progress is not None:
            progress(f"throughput {framework}/{mode} batch {batch}")
        row, env = run_one(framework, runtime, batch, cfg, spec, optim=optim)
        rows.append(row)
        metrics.batch_sizes.append(row.batch)
        if progress is not None:  # a line per combination as it finishes
            ratio = f", {row.overhead_ratio:.2f} x the plain loop's time" if row.overhead_ratio is not None else ""
            progress(f"  batch {batch}: first call {row.first_call_s:.2f} s, {row.step_s_median * 1e3:.3f} ms/step, "
                     f"{row.samples_per_s:.4g} samples/s{ratio}")
        if save is not None:
            save(plain(metrics))
    pl = plain_module(framework)
    if cfg.layers:
        metrics.layers = time_layers(framework, mode, spec, max(metrics.batch_sizes), cfg, dtype=dtype, device=device,
                                     seed=seed, progress=progress)
    # in the type the step's layers compute in (Policy.compute: the low one under mixed precision)
    compute = Policy.of(dtype).compute
    rate = float(pl.matmul_rate(compute, device, cfg.matmul_n, repeats=cfg.matmul_repeats, allow_tf32=runtime.allow_tf32))
    metrics.matmul_flops_per_s, metrics.matmul_dtype = rate, compute
    env["cpu_low_precision"] = cpu_low_precision()  # which low types this CPU computes in natively
    for row in rows:
        row.roofline_fraction = row.achieved_flops / rate
    return metrics, env


def time_layers(framework: str, mode: str, spec: ModelSpec, batch: int, cfg: ThroughputConfig, *, dtype: str = "float32",
                device: str = "cpu", seed: int = 0, progress: Callable[[str], None] | None = None) -> list[LayerRow]:
    """Each layer of the model (`layers(spec)` of its kind) alone on a batch of `batch`: the
    median time of its forward pass and of its forward and backward passes (every input's
    gradient), with the timing core, in the framework's own layout and mode
    (`impls.<fw>.plain.layer_steps`). Where one layer's kernel is the bottleneck of a step, this
    says which and how much: the evidence a step time alone cannot give."""
    pl = plain_module(framework)
    ops = importlib.import_module(f"impls.{framework}.ops")
    desc = spec.params()
    weights = init_params(spec, seed)
    rng = np.random.default_rng([seed, 55])
    out = []
    for layer in spec.module.layers(spec):
        x = rng.standard_normal((batch, *layer.in_shape))
        x = ops.input_to_native(x, layer.in_shape)
        w = ops.to_native(desc[layer.weight], weights[layer.weight])
        b = ops.to_native(desc[layer.bias], weights[layer.bias] + 0.1)
        # a transposed convolution both ways (framework.conv_transpose): the same numbers, timed apart
        forms = [("native", layer.op)] + ([("dilated", "conv2d_transpose_dilated")] if layer.op == "conv2d_transpose" else [])
        for form, op in forms:
            fwd, both, sync = pl.layer_steps(op, layer.stride, x, w, b, dtype=dtype, device=device, mode=mode)
            f = time_steps(fwd, sync, cfg.layer_repeats, cfg.steps, max(cfg.warmup, 1))
            fb = time_steps(both, sync, cfg.layer_repeats, cfg.steps, max(cfg.warmup, 1))
            name = layer.name + ("" if len(forms) == 1 else f" [{form}]")
            out.append(LayerRow(layer=name, op=op, formulation=form, batch=batch, forward_s=f.median,
                                forward_backward_s=fb.median, backward_s=max(fb.median - f.median, 0.0),
                                forward_s_samples=f.samples_s, forward_backward_s_samples=fb.samples_s))
            if progress is not None:
                progress(f"  layer {name}: forward {f.median * 1e3:.3f} ms, backward {max(fb.median - f.median, 0) * 1e3:.3f} ms")
    return out


def run(c: AppConfig, job: Job) -> Result:
    cfg = settings(c)

    def say(msg: str) -> None:
        if c.progress:
            print(msg, file=sys.stderr, flush=True)

    spec = model_spec(c, dataset(c))  # the configured model, on inputs of the configured data's shape
    metrics, env = measure_batches(job.framework, runtime_spec(c, job.framework, mode=job.mode), cfg, spec,
                                   optim=optim_spec(c), progress=say, save=lambda m: checkpoint(job, m))
    status, error = "ok", None
    bad = [r.batch for r in metrics.batches if not math.isfinite(r.loss_after)]
    if bad:
        status, error = "diverged", f"training loss not finite after timing at batch size(s) {bad}"
    return Result(metrics=plain(metrics), status=status, error=error, backend_env=env)


# -- summary and plot ----------------------------------------------------------------------------


def typed(r: dict[str, Any]) -> ThroughputMetrics:
    """An ok record's metrics as the type (undeclared keys of older records ignored)."""
    return load(ThroughputMetrics, r["metrics"], strict=False)


def _device_name(r: dict[str, Any]) -> str:
    env = r.get("env", {})
    if env.get("device_name") and "cpu" not in str(env.get("device", "")).lower():
        return str(env["device_name"])
    cores = env.get("cpu_affinity")
    n = len(cores) if isinstance(cores, list) else env.get("cpu_cores")
    return f"{env.get('cpu_model', 'unknown CPU')} ({n} cores)" if n else str(env.get("cpu_model", "unknown CPU"))


def _mib(b: Any) -> str:
    return fmt(b, ".1f", scale=2**-20)


def _ms(s: Any) -> str:
    return fmt(s, ".3f", scale=1e3)


#: what a batch row of a record must hold as finite numbers (key -> name): a timing or a loss
#: that is not finite voids the row (it stays in the table, and the measure fails)
FINITE_KEYS = {"first_call_s": "first-call time", "step_s_median": "step time (median)",
               "step_s_samples": "step time per repeat", "samples_per_s": "samples/s",
               "clock_ratio": "clock ratio", "loss_after": "loss after timing"}


def _batches(r: dict[str, Any]) -> list[Any]:
    """The batch sizes a record measured (a failed job's: those it finished)."""
    return (r.get("metrics") or {}).get("batches") or []


def _clock_tol(r: dict[str, Any]) -> float:
    return float((r.get("metrics") or {}).get("settings", {}).get("clock_tol", 0.05))


#: the precisions in table order: float32 (the speed-ups' base) first
PRECISION_ORDER = ("float32", "bfloat16", "float16", "float64")


def precision_of(r: dict[str, Any]) -> str:
    """What a record's step computed in: its metrics' `precision` (every throughput record has
    it), else its config's `framework.precision`, else float32."""
    m = r.get("metrics") or {}
    return str(m.get("precision") or ((r.get("config") or {}).get("framework") or {}).get("precision") or "float32")


def _by_precision(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`records` with float32 first, then the low types (a stable sort: `by_framework` keeps it
    within a framework and mode)."""
    rank = {p: i for i, p in enumerate(PRECISION_ORDER)}
    return sorted(records, key=lambda r: rank.get(precision_of(r), len(rank)))


def cpu_support(r: dict[str, Any]) -> dict[str, list[str]] | None:
    """Which low types the record's CPU computes in natively: its env's `cpu_low_precision`,
    else derived from the vector features every record's env keeps (older records); None
    without either (a record the parent wrote for a job that never started)."""
    env = r.get("env") or {}
    if isinstance(env.get("cpu_low_precision"), dict):
        return {k: list(v) for k, v in env["cpu_low_precision"].items()}
    if isinstance(env.get("cpu_features"), list):
        return low_precision_support(env["cpu_features"])
    return None


def _float32_rates(records: list[dict[str, Any]]) -> dict[tuple[str, str, Any], float]:
    """(framework, mode, batch) -> samples/s of the float32 records: the base of the speed-ups."""
    out: dict[tuple[str, str, Any], float] = {}
    for r in records:
        if precision_of(r) != "float32":
            continue
        for b in _batches(r):
            if finite(b.get("samples_per_s")):
                out[(r["framework"], r["mode"], b.get("batch"))] = float(b["samples_per_s"])
    return out


def summarize(records: list[dict[str, Any]]) -> Summary:
    """One table, a row per framework x mode x precision x batch; notes name the device(s),
    failed jobs, values that are not finite, clock-ratio violations and, per framework and
    precision with more than one mode, the best mode at its largest batch size by samples/s,
    roofline fraction, first-call time and peak memory. With a low precision among the rows
    (bfloat16, float16), each row's speed-up over the float32 row of the same framework, mode and
    batch (blank without one), and whether the CPU computes in that type natively (its flags) or
    the frameworks emulate it."""
    s = split(_by_precision(records), "batches", per_mode=True)
    for f in s.failed:  # a failed job's batch sizes stay in the table
        if _batches(f.record):
            f.note += f" (kept the {len(_batches(f.record))} batch size(s) it finished)"
    passed: list[bool] = []  # per batch row: its numbers finite, its clock ratio within tolerance
    ratios: list[float] = []
    base = _float32_rates(s.good)

    def rows_of(r: dict[str, Any], notes: list[str]) -> list[dict[str, Any]]:
        """A record's row per batch size, and a note per batch that failed a check."""
        prec = precision_of(r)
        label, tol, rows = f"{r['framework']}/{r['mode']}" + ("" if prec == "float32" else f" {prec}"), _clock_tol(r), []
        for b in _batches(r):
            void = [f"{name} is {describe(b.get(key), 'repeat')}" for key, name in FINITE_KEYS.items()
                    if describe(b.get(key), "repeat") is not None]
            passed.append(not void)
            if void:
                notes.append(f"{label} batch {b.get('batch')}: {'; '.join(void)}: the measurement is void")
            cr = b.get("clock_ratio")
            if not le(abs(cr - 1.0) if finite(cr) else math.nan, tol):
                passed.append(False)
                notes.append(f"{label} batch {b.get('batch')}: clock ratio {fmt(cr, '.3f')} is outside 1 ± {tol}: "
                             "time escaped the timed region")
            elif finite(cr):
                ratios.append(float(cr))
            f32 = base.get((r["framework"], r["mode"], b.get("batch")))
            rate = b.get("samples_per_s")
            rows.append(
                {
                    "framework": r["framework"],
                    "mode": r["mode"],
                    "precision": prec,
                    "batch": b.get("batch"),
                    "first call (s)": fmt(b.get("first_call_s"), ".3f"),
                    "step (ms, median)": _ms(b.get("step_s_median")),
                    "IQR (ms)": _ms(b.get("step_s_iqr")),
                    "samples/s": fmt(rate, ".4g"),
                    "speed-up vs float32": fmt(rate / f32 if f32 and finite(rate) else None, ".2f"),
                    "GFLOP/s": fmt(None if b.get("achieved_flops") is None else b["achieved_flops"] / 1e9, ".3g"),
                    "roofline": fmt(b.get("roofline_fraction"), ".2f"),
                    "peak mem (MiB)": _mib(b.get("peak_memory_bytes")),
                    "step time / plain loop's": fmt(b.get("overhead_ratio"), ".2f"),
                    "native": native_support(prec, cpu_support(r)),
                }
            )
        return rows

    rows, notes = s.table(rows_of, lambda f, notes: rows_of(f.record, notes))
    ok = s.ok and all(passed)
    good = s.good
    tol = next((_clock_tol(r) for r in reversed(s.records) if _batches(r)), 0.05)
    devices: dict[str, list[str]] = {}
    for r in good:
        devices.setdefault(_device_name(r), []).append(f"{r['framework']}/{r['mode']}")
    if rows and all(row["step time / plain loop's"] == "-" for row in rows):  # the plain loop was not timed
        for row in rows:
            del row["step time / plain loop's"]
    precisions = [precision_of(r) for r in _by_precision(list({precision_of(r): r for r in s.records}.values()))]
    if not any(p in MIXED for p in precisions):  # no low type: no speed-up over float32, nothing native to say
        for row in rows:
            del row["speed-up vs float32"], row["native"]
    where = "; ".join(f"{d} ({', '.join(dict.fromkeys(ls))})" for d, ls in devices.items()) or "no device"
    if len(devices) > 1:
        notes.append("records come from different devices: compare ratios, not absolute times, across them")
    for r in good[:1]:
        m = r["metrics"]
        notes.insert(0, f"device: {where}; {', '.join(p for p in precisions)}, threads={m.get('threads')} "
                        f"(0: framework default), allow_tf32={m.get('allow_tf32')}, R={m.get('repeats')} x "
                        f"N={m.get('steps')} steps, compile cache {m.get('compile_cache')}; absolute times hold "
                        "only for this machine")
    if ratios:
        notes.append(f"clock check: the timed repeats are {min(ratios):.3f} to {max(ratios):.3f} of an outer wall clock "
                     f"around the whole timed block (required: 1 ± {tol:g}; outside it, time escaped the timed region)")
    notes.extend(mixed_notes(good))
    notes.extend(_best_modes(good))
    notes.extend(layer_notes(good))
    model = good[0]["metrics"].get("model", {}) if good else {}
    if model.get("describe"):
        shape = str(model["describe"])
    else:  # a record from before the model kinds: its own MLP
        shape = "MLP " + "-".join(str(v) for v in [model.get("x_dim"), *model.get("hidden", []), model.get("latent")]) if model else "?"
    title = f"Throughput ({shape}, one training step) on {where}"
    return Summary(title, rows, ok, notes)


def mixed_notes(records: list[dict[str, Any]]) -> list[str]:
    """With a low precision among `records`: what its columns mean, the matmul rates the
    rooflines divide by (each in its row's type), the CPU's native low types, and float16's loss
    scale and skipped steps (a skipped step does no optimizer update: it is cheaper)."""
    if not any(precision_of(r) in MIXED for r in records):
        return []
    out = ["mixed precision (bfloat16, float16): layers in the low type, parameters, optimizer state and loss reductions "
           "in float32, float16 with dynamic loss scaling; speed-up vs float32 = this row's samples/s / the float32 row's "
           "(same framework, mode and batch); roofline against a matmul in the row's own type; native: the CPU flags "
           "for that type (emulated: the CPU has none, so the frameworks convert to float32 and back, and a slow row is "
           "the CPU's, not the framework's); whether a framework's kernels use the instructions is its own choice"]
    rates = [f"{r['framework']}/{r['mode']} {m.get('matmul_dtype') or precision_of(r)} {m['matmul_flops_per_s'] / 1e9:.3g}"
             for r in records if finite((m := r["metrics"]).get("matmul_flops_per_s"))]
    if rates:
        out.append(f"matmul rates (GFLOP/s, {records[0]['metrics'].get('matmul_n')}² matmul, the rooflines' base): "
                   + "; ".join(rates))
    cpus = {_device_name(r): cpu_support(r) for r in records}
    for cpu, support in cpus.items():
        if support is not None:
            out.append(f"{cpu}: native " + "; ".join(f"{d}: {native_support(d, support)}" for d in support))
    for r in records:
        env = r.get("env") or {}
        if precision_of(r) == "float16" and env.get("loss_scale") is not None:
            out.append(f"{r['framework']}/{r['mode']} float16: loss scale {env['loss_scale']:g}, "
                       f"{env.get('skipped_steps', 0)} step(s) skipped for a non-finite gradient (largest batch)")
    return out


def layer_notes(records: list[dict[str, Any]]) -> list[str]:
    """Per record timed layer by layer: the layers that take most of the time alone (forward
    and backward, in the formulation the step used), their share of the layers' total, and
    each transposed convolution's time in the other formulation (framework.conv_transpose)."""
    out = []
    for r in records:
        used = r["metrics"].get("conv_transpose", "native")
        every = [x for x in (r["metrics"].get("layers") or []) if finite(x.get("forward_backward_s"))]
        rows = [x for x in every if x.get("formulation", "native") in ("native", used) and
                not (x.get("formulation") == "native" and used != "native" and x["op"] == "conv2d_transpose")]
        if not rows:
            continue
        total = sum(x["forward_backward_s"] for x in rows)
        top = sorted(rows, key=lambda x: -x["forward_backward_s"])[:2]
        parts = [f"{x['layer']} {x['forward_backward_s'] * 1e3:.3g} ms (backward {x['backward_s'] * 1e3:.3g}), "
                 f"{x['forward_backward_s'] / total:.0%}" for x in top]
        prec = precision_of(r)
        note = (f"{r['framework']}/{r['mode']}{'' if prec == 'float32' else ' ' + prec} layer by layer at batch "
                f"{rows[0]['batch']} (forward + backward, each "
                f"layer alone; throughput_layers.png): {'; '.join(parts)} of the layers' {total * 1e3:.3g} ms")
        pairs: dict[str, dict[str, float]] = {}
        for x in every:
            if "formulation" in x and x["op"].startswith("conv2d_transpose"):
                pairs.setdefault(x["layer"].rsplit(" [", 1)[0], {})[x["formulation"]] = x["forward_backward_s"]
        both = {k: v for k, v in pairs.items() if {"native", "dilated"} <= set(v)}
        if both:
            ratio = sum(v["native"] for v in both.values()) / sum(v["dilated"] for v in both.values())
            note += (f"; its transposed convolutions, as the framework's own op, take {ratio:.2g} x the time of their "
                     f"definition computed directly (framework.conv_transpose=dilated: the same numbers; this run's "
                     f"step used {used})")
        out.append(note)
    return out


def _best_modes(records: list[dict[str, Any]]) -> list[str]:
    """Per framework (and precision) timed in more than one mode: its best mode at the largest
    common batch."""
    out = []
    for fw, prec in dict.fromkeys((r["framework"], precision_of(r)) for r in records):
        recs = [r for r in records if r["framework"] == fw and precision_of(r) == prec]
        if len({r["mode"] for r in recs}) < 2:
            continue
        common = set.intersection(*({b["batch"] for b in r["metrics"]["batches"]} for r in recs))
        if not common:
            continue
        batch = max(common)
        at = {r["mode"]: next(b for b in r["metrics"]["batches"] if b["batch"] == batch) for r in recs}

        def best(key: str, high: bool, spec: str, scale: float = 1.0, at: dict[str, dict[str, Any]] = at) -> str:
            vals: dict[str, float] = {mode: float(b[key]) for mode, b in at.items() if b.get(key) is not None}
            if not vals:
                return "-"
            mode = (max if high else min)(vals, key=lambda k: vals[k])
            return f"{mode} ({format(vals[mode] * scale, spec)})"

        out.append(
            f"best {fw}{'' if prec == 'float32' else ' ' + prec} mode at batch {batch}: samples/s {best('samples_per_s', True, '.4g')}; roofline fraction "
            f"{best('roofline_fraction', True, '.2f')}; first call {best('first_call_s', False, '.3f')} s; "
            f"peak memory {best('peak_memory_bytes', False, '.1f', 2**-20)} MiB"
        )
    return out


def plot_throughput(records: list[dict[str, Any]], path: Path) -> Path | None:
    """samples/s against batch size (log-log), a line per framework x mode, and per framework
    the roofline from its measured matmul rate: samples/s <= rate / (step FLOP / batch)."""
    recs = completed(by_framework(records), "batches")
    if not recs:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    colors = COLORS
    styles = ["-", "--", ":", "-."]
    seen: dict[str, int] = {}
    # framework (and precision, where not float32) -> (matmul rate, FLOP/example, fixed FLOP)
    roofs: dict[str, tuple[str, float, float, float]] = {}
    lo, hi = math.inf, 0.0
    for r in _by_precision(recs):
        fw, m, prec = r["framework"], typed(r), precision_of(r)
        i = seen[fw] = seen.get(fw, -1) + 1
        bs = [b.batch for b in m.batches]
        lo, hi = min(lo, *bs), max(hi, *bs)
        name = fw if prec == "float32" else f"{fw} {prec}"
        ax.plot(bs, [b.samples_per_s for b in m.batches], marker="o", ls=styles[i % len(styles)],
                color=colors.get(fw), label=f"{fw}/{r['mode']}" + ("" if prec == "float32" else f" {prec}"))
        rate = m.matmul_flops_per_s
        if rate and m.matmul_flops_per_example and (name not in roofs or rate > roofs[name][1]):
            roofs[name] = (fw, rate, float(m.matmul_flops_per_example), float(m.optimizer_flops))
    grid = np.geomspace(lo / 2, hi * 2, 64)
    dashes = {"bfloat16": (0, (4, 1, 1, 1)), "float16": (0, (6, 2))}  # a low type's roofline: its own dash
    for name, (fw, rate, per_ex, fixed) in roofs.items():
        # samples/s <= rate / (step FLOP / B), step FLOP = per_ex B + fixed
        ax.plot(grid, rate * grid / (per_ex * grid + fixed), color=colors.get(fw), lw=1.0, alpha=0.7,
                ls=dashes.get(name.rsplit(" ", 1)[-1], (0, (1, 1))),
                label=f"{name} roofline ({rate / 1e9:.0f} GFLOP/s matmul)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("samples / s (training steps)")
    ax.set_title(f"Throughput on {_device_name(recs[0])}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return save_png(fig, path)


def plot_layers(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Each layer's time alone, forward and backward stacked, a bar per framework x mode."""
    recs = completed(by_framework(records), "layers")
    if not recs:
        return None
    plt = pyplot()
    layers = [typed(r).layers or [] for r in recs]
    names = list(dict.fromkeys(x.layer for rs in layers for x in rs))
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) * len(recs) + 1.5))
    height = 0.8 / len(recs)
    for i, (r, rs) in enumerate(zip(recs, layers)):
        rows = {x.layer: x for x in rs}
        ys = np.arange(len(names)) + i * height
        fwd = [rows[n].forward_s * 1e3 if n in rows else 0.0 for n in names]
        bwd = [rows[n].backward_s * 1e3 if n in rows else 0.0 for n in names]
        color = COLORS.get(r["framework"])
        who = f"{r['framework']}/{r['mode']}" + ("" if precision_of(r) == "float32" else f" {precision_of(r)}")
        ax.barh(ys, fwd, height, color=color, label=f"{who} forward")
        ax.barh(ys, bwd, height, left=fwd, color=color, alpha=0.45, hatch="//", label=f"{who} backward")
    ax.set_yticks(np.arange(len(names)) + 0.4 - height / 2, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"ms per call, batch {layers[0][0].batch} (each layer alone)")
    ax.set_title("Layer by layer: where a step's time goes", fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=6)
    return save_png(fig, path)


PLOTS = {"throughput.png": plot_throughput, "throughput_layers.png": plot_layers}

JUDGED = tuple(Judged(f"batches.*.{key}", name, axis="repeat") for key, name in FINITE_KEYS.items())


#: its numbers are timings: never run beside other jobs, compared only within one environment
TIMING = True
QUESTION = "Which framework is fastest?"


def answer(records: list[dict[str, Any]]) -> str:
    """One line for the suite's summary: at the largest batch size every record measured, the
    fastest framework/mode by samples/s, and its speed-up over each other framework's best mode."""
    good = completed(records, "batches")
    if not good:
        return "no throughput was measured"
    # frameworks compared like with like, in one precision: float32 where there is one
    everything = good
    prec = next(p for p in (*PRECISION_ORDER, precision_of(good[0])) if any(precision_of(r) == p for r in good))
    good = [r for r in good if precision_of(r) == prec]
    low = "" if prec == "float32" else f", {prec}"
    batches = [(f"{r['framework']} ({r['mode']}{low})", typed(r).batches) for r in good]
    batch = max(set.intersection(*({b.batch for b in bs} for _, bs in batches)), default=None)
    if batch is None:
        return "the records share no batch size"
    rate = {label: next(b.samples_per_s for b in bs if b.batch == batch) for label, bs in batches}
    best_per_fw: dict[str, str] = {}
    for label in sorted(rate, key=lambda k: -rate[k]):
        best_per_fw.setdefault(label.split(" ")[0], label)
    top = next(iter(best_per_fw.values()))
    rest = ", ".join(f"{rate[top] / rate[lab]:.2f}x {lab}" for fw, lab in best_per_fw.items() if lab != top)
    return (f"{top} at batch {batch}: {rate[top]:,.0f} samples/s" + (f", {rest}" if rest else "")
            + _best_speedups(everything, batch) + f" (on {_device_name(good[0])}; one machine's numbers)")


def _best_speedups(records: list[dict[str, Any]], batch: int) -> str:
    """"; bfloat16: at best 1.3x float32 (torch/compiled)" per low type among `records` at `batch`
    (its best speed-up over the float32 row of the same framework and mode); "" without one."""
    base = _float32_rates(records)
    best: dict[str, tuple[float, str]] = {}
    for r in records:
        prec = precision_of(r)
        f32 = base.get((r["framework"], r["mode"], batch))
        b = next((b for b in _batches(r) if b.get("batch") == batch), None)
        if prec in MIXED and f32 and b is not None and finite(b.get("samples_per_s")):
            up = float(b["samples_per_s"]) / f32
            if prec not in best or up > best[prec][0]:
                best[prec] = (up, f"{r['framework']}/{r['mode']}")
    return "".join(f"; {p}: at best {up:.2f}x float32 ({who})" for p, (up, who) in best.items())


def compared(records: list[dict[str, Any]]) -> dict[str, Quantity]:
    """For `vaebench compare`: per framework/mode/batch (and precision, where it is not float32:
    float32 names are those of the records from before mixed precision), the per-repeat step
    times (a statistical test there). Several records of one quantity (the same job run in
    several processes) pool their repeats: a process's own offset then weighs as one of several,
    and the value is the median of the pool."""
    pooled: dict[str, list[float]] = {}
    for fw, m in finished(records, "batches"):
        prec = str(m.get("precision") or "float32")
        fw = fw if prec == "float32" else f"{fw} {prec}"
        for b in m["batches"]:
            if b.get("step_s_samples"):
                pooled.setdefault(f"{fw} batch {b['batch']} step time (s)", []).extend(b["step_s_samples"])
    return {name: Quantity(float(np.median(s)), "speed", samples=s) for name, s in pooled.items()}

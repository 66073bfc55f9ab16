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
  same device and dtype (measured last, so its buffers do not raise the memory peaks);
  `roofline_fraction = achieved FLOP/s / matmul rate`.
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

from harness.api import ModelSpec, OptimSpec, load_backend, resolve_mode
from harness.init import init_params
from harness.job import Job, Result, checkpoint
from harness.judged import Judged, describe, finite, le
from harness.measures.common import Quantity, Summary, by_framework, fmt, optim_spec
from harness.plots import COLORS, pyplot, save_png
from harness.records import compile_cache_state
from harness.schema import check, setting
from harness.timing import Contender, first_call, median, time_interleaved, warm_up

if TYPE_CHECKING:
    from harness.config import AppConfig

#: FLOP per parameter of one optimizer update (see step_flops)
OPTIMIZER_FLOPS_PER_PARAM = {"adam": 12, "sgd": 2, "sgd_momentum": 4}
#: seed of the synthetic binary batch
DATA_SEED = 0


@dataclass
class ThroughputConfig:
    """`measure.throughput.*`. The model timed: 784-512-256, 20 latents, Bernoulli, ReLU, on
    synthetic binary input (not model.*/data.*: the throughput default is its own)."""

    batch_sizes: list[int] = setting([32, 128, 512, 2048], gt=0, nonempty=True)
    hidden: list[int] = setting([512, 256], gt=0)
    latent: int = setting(20, gt=0)
    x_dim: int = setting(784, gt=0)
    repeats: int = setting(10, gt=1)  # R: timed repeats (one sample each)
    steps: int = setting(10, gt=0)  # N: steps per repeat
    warmup: int = setting(3, ge=0)  # untimed steps after the first call, before timing
    matmul_n: int = setting(1024, gt=0)  # the roofline matmul is matmul_n x matmul_n
    matmul_repeats: int = setting(10, gt=0)
    plain: bool = True  # also time the plain hand-written loop (overhead ratio)
    clock_tol: float = setting(0.05, gt=0)  # |clock_ratio - 1| allowed

    def model(self) -> ModelSpec:
        return ModelSpec(x_dim=self.x_dim, hidden=tuple(int(h) for h in self.hidden), latent=self.latent)


Config = ThroughputConfig


def settings(c: AppConfig) -> ThroughputConfig:
    t: ThroughputConfig = c.measure.throughput
    return t


# -- FLOP count ------------------------------------------------------------------------------


def matmul_flops(spec: ModelSpec, batch: int) -> int:
    """Multiply-add FLOP (2 per multiply-add) of the matmuls of one training step.

    Each dense layer (in, out) on B rows costs in the forward pass 2 B in out. Backward, the
    weight gradient h^T dY costs 2 B in out and the input gradient dY W^T another 2 B in out.
    Counted only where autograd computes them:
    - weight gradients of every layer of a block that is trained (none for model.freeze's block);
    - input gradients of a layer when something below it needs a gradient: never for the first
      encoder layer (x needs none); for the first decoder layer (input z, shape (B, latent))
      only if the gradient flows through z into a trained encoder (not stop_gradient_z, not
      freeze=encoder); for a later layer of a block if that block is trained or the gradient
      must pass through it to z and on to the encoder.
    """
    B = int(batch)
    enc_trained = spec.freeze != "encoder"
    dec_trained = spec.freeze != "decoder"
    to_encoder = enc_trained and not spec.stop_gradient_z  # gradient flows through z
    total = 0
    for block, trained in (("encoder", enc_trained), ("decoder", dec_trained)):
        for i, (n_in, n_out) in enumerate(spec.layer_dims(block)):
            mm = 2 * B * n_in * n_out
            total += mm  # forward
            if trained:
                total += mm  # weight gradient
            # input gradient: x needs none; z needs one only on the way to a trained encoder
            needs_input_grad = (enc_trained and i > 0) if block == "encoder" else (to_encoder or (dec_trained and i > 0))
            if needs_input_grad:
                total += mm
    return total


def optimizer_flops(spec: ModelSpec, optim: str = "adam", momentum: float = 0.0) -> int:
    """FLOP of one optimizer update, per parameter: Adam 12 (first moment b1 m + (1 - b1) g: 3;
    second moment b2 v + (1 - b2) g^2: 4; sqrt, + eps, divide, times the step size, subtract:
    5; the bias corrections are per-tensor scalars folded into the step size and eps);
    SGD 2 (lr g, subtract), 4 with momentum."""
    n = sum(math.prod(s) for s in spec.param_shapes().values())
    key = "adam" if optim == "adam" else ("sgd_momentum" if momentum else "sgd")
    return OPTIMIZER_FLOPS_PER_PARAM[key] * n


def step_flops(spec: ModelSpec, batch: int, optim: str = "adam", momentum: float = 0.0) -> int:
    """Analytic FLOP count of one training step (forward, ELBO, backward, optimizer update).

        step_flops = matmul_flops(spec, B) + optimizer_flops(spec)

    matmul part: sum over dense layers (in, out) of 2 B in out forward + 2 B in out for the
    weight gradient + 2 B in out for the input gradient, the last omitted for the first encoder
    layer (x needs no gradient); the decoder's first layer runs on z of shape (B, latent). See
    `matmul_flops` for stop_gradient_z / freeze. Optimizer part: FLOP per parameter x number
    of parameters (Adam 12).

    Neglected: elementwise work (bias adds and their gradients, activations, the
    reparameterisation, softplus / the likelihood, the KL, the means): O(B x sum of layer
    widths) against O(B x sum of in x out). For the default 784-512-256-20 model that is about
    2 360 activations per example, some 10-30 FLOP each forward and backward, against 5.7 M
    matmul FLOP per example: under 1%.

    Default model (784-512-256, 20 latents): 5 679 104 B + 12 x 1 082 680 (Adam), e.g. 11.64 GFLOP
    at B = 2048.
    """
    return matmul_flops(spec, batch) + optimizer_flops(spec, optim, momentum)


# -- one framework x mode x batch --------------------------------------------------------------


def synthetic_batch(batch: int, x_dim: int, seed: int = DATA_SEED) -> np.ndarray:
    """Binary pixels, each 1 with probability 1/2."""
    return (np.random.default_rng(seed).random((batch, x_dim)) < 0.5).astype(np.float64)


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
    mode: str,
    batch: int,
    cfg: ThroughputConfig,
    *,
    optim: OptimSpec | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    seed: int = 0,
    threads: int = 0,
    allow_tf32: bool = False,
    compile_mode: str = "default",
    fresh_compile_state: bool = True,
    backend_factory: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Measure one batch size; returns its row of the record (roofline filled in later by
    `run_batches`, which knows the matmul rate; `row["_version"]` is the backend's version(),
    which run_batches moves to the record's env). Raises RecompiledWhileTiming on a retrace.
    `backend_factory` replaces load_backend (same arguments), for tests."""
    mode = resolve_mode(framework, mode)
    spec, opt = cfg.model(), optim or OptimSpec()
    pl = plain_module(framework)
    if fresh_compile_state:
        pl.reset_compile_state()
    make = backend_factory or load_backend
    b = make(framework, spec, opt, dtype=dtype, mode=mode, device=device, seed=seed, threads=threads, allow_tf32=allow_tf32,
             compile_mode=compile_mode)
    x_host = synthetic_batch(batch, spec.x_dim)
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
    row: dict[str, Any] = {"batch": int(batch)}
    if cfg.plain:
        p = pl.PlainStep(spec, opt, init_params(spec, seed), dtype=dtype, mode=mode, device=device, seed=seed,
                         allow_tf32=allow_tf32, compile_mode=compile_mode)
        px = p.put(x_host)
        pc = plain_contender(p, px)
        row["plain_first_call_s"] = first_call(pc.step, pc.sync)
        contenders["plain"] = pc
    compiles_before = b.compile_count()
    res = time_interleaved(contenders, cfg.repeats, cfg.steps, cfg.warmup)
    compiles_after = b.compile_count()
    hr = res["harness"]
    flops = step_flops(spec, batch, opt.name, opt.momentum)
    loss = float(b.train_step(x))  # float() syncs
    b.sync()
    row.update(
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
    )
    if "plain" in res:
        pr = res["plain"]
        row.update(**pr.as_metrics("plain_"))
        row["plain_samples_per_s"] = batch / pr.median
        row["overhead_ratio"] = hr.median / pr.median
        # repeats i of both ran back to back: the median of the per-pair ratios is robust to drift
        row["overhead_ratio_paired"] = median([a / b for a, b in zip(hr.samples_s, pr.samples_s)])
    row["_version"] = b.version()
    return row


def run_batches(
    framework: str,
    mode: str,
    cfg: ThroughputConfig,
    *,
    optim: OptimSpec | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    seed: int = 0,
    threads: int = 0,
    allow_tf32: bool = False,
    compile_mode: str = "default",
    progress: Callable[[str], None] | None = None,
    save: Callable[[dict[str, Any]], Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every batch size (increasing), then the matmul rate; returns (metrics, backend env).
    `save(metrics)` is called after each batch size with the metrics so far (the rows finished,
    no roofline yet), to keep partial metrics."""
    check(cfg, "measure.throughput.")
    mode = resolve_mode(framework, mode)
    rows: list[dict[str, Any]] = []
    env: dict[str, Any] = {}
    opt = optim or OptimSpec()
    spec = cfg.model()
    settings_metrics: dict[str, Any] = {
        "matmul_n": cfg.matmul_n,
        # step_flops(B) = matmul_flops_per_example * B + optimizer_flops (the roofline's curve)
        "matmul_flops_per_example": matmul_flops(spec, 1),
        "optimizer_flops": optimizer_flops(spec, opt.name, opt.momentum),
        "model": {"x_dim": spec.x_dim, "hidden": list(spec.hidden), "latent": spec.latent,
                  "likelihood": spec.likelihood, "activation": spec.activation,
                  "params": sum(math.prod(s) for s in spec.param_shapes().values())},
        "optimizer": opt.name,
        "settings": dataclasses.asdict(cfg),
        "repeats": cfg.repeats,
        "steps": cfg.steps,
        "warmup": cfg.warmup,
        "precision": dtype,
        "device": device,
        "threads": threads,
        "allow_tf32": allow_tf32,
        "compile_mode": compile_mode,
        "compile_cache": compile_cache_state(),
    }
    for batch in sorted({int(b) for b in cfg.batch_sizes}):
        if progress is not None:
            progress(f"throughput {framework}/{mode} batch {batch}")
        row = run_one(framework, mode, batch, cfg, optim=optim, dtype=dtype, device=device, seed=seed,
                      threads=threads, allow_tf32=allow_tf32, compile_mode=compile_mode)
        env = row.pop("_version")
        rows.append(row)
        if progress is not None:  # a line per combination as it finishes
            ratio = f", {row['overhead_ratio']:.2f} x the plain loop's time" if "overhead_ratio" in row else ""
            progress(f"  batch {batch}: first call {row['first_call_s']:.2f} s, {row['step_s_median'] * 1e3:.3f} ms/step, "
                     f"{row['samples_per_s']:.4g} samples/s{ratio}")
        if save is not None:
            save({"batches": rows, "batch_sizes": [r["batch"] for r in rows], **settings_metrics})
    pl = plain_module(framework)
    rate = float(pl.matmul_rate(dtype, device, cfg.matmul_n, repeats=cfg.matmul_repeats, allow_tf32=allow_tf32))
    for row in rows:
        row["roofline_fraction"] = row["achieved_flops"] / rate
    metrics: dict[str, Any] = {
        "batches": rows,
        "matmul_flops_per_s": rate,
        "batch_sizes": [r["batch"] for r in rows],
        **settings_metrics,
    }
    return metrics, env


def run(c: AppConfig, job: Job) -> Result:
    cfg = settings(c)
    f = c.framework
    dtype = f.precision

    def say(msg: str) -> None:
        if c.progress:
            print(msg, file=sys.stderr, flush=True)

    metrics, env = run_batches(job.framework, job.mode, cfg, optim=optim_spec(c), dtype=dtype, device=f.device,
                               seed=c.seed, threads=f.threads, allow_tf32=f.allow_tf32,
                               compile_mode=f.compile_mode, progress=say, save=lambda m: checkpoint(job, m))
    status, error = "ok", None
    bad = [r["batch"] for r in metrics["batches"] if not math.isfinite(r["loss_after"])]
    if bad:
        status, error = "diverged", f"training loss not finite after timing at batch size(s) {bad}"
    return Result(metrics=metrics, status=status, error=error, backend_env=env)


# -- summary and plot ----------------------------------------------------------------------------


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


def summarize(records: list[dict[str, Any]]) -> Summary:
    """One table, a row per framework x mode x batch; notes name the device(s), failed jobs,
    values that are not finite, clock-ratio violations and, per framework with more than one
    mode, the best mode at its largest batch size by samples/s, roofline fraction, first-call
    time and peak memory."""
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    ok = True
    devices: dict[str, list[str]] = {}
    good: list[dict[str, Any]] = []
    ratios: list[float] = []
    tol = 0.05
    for r in by_framework(records):
        label = f"{r.get('framework')}/{r.get('mode')}"
        m = r.get("metrics") or {}
        batches = m.get("batches") if isinstance(m, dict) else None
        if r.get("status") != "ok" or not batches:
            ok = False
            kept = f" (kept the {len(batches)} batch size(s) it finished)" if batches else ""
            notes.append(f"{label}: {r.get('status', '?')}: {r.get('error') or 'no measurements'}{kept}")
            if not batches:
                continue
        else:
            devices.setdefault(_device_name(r), []).append(label)
            good.append(r)
        tol = float(m.get("settings", {}).get("clock_tol", 0.05))
        for b in batches:
            void = [f"{name} is {describe(b.get(key), 'repeat')}" for key, name in FINITE_KEYS.items()
                    if describe(b.get(key), "repeat") is not None]
            if void:
                ok = False
                notes.append(f"{label} batch {b.get('batch')}: {'; '.join(void)}: the measurement is void")
            cr = b.get("clock_ratio")
            if not le(abs(cr - 1.0) if finite(cr) else math.nan, tol):
                ok = False
                notes.append(f"{label} batch {b.get('batch')}: clock ratio {fmt(cr, '.3f')} is outside 1 ± {tol}: "
                             "time escaped the timed region")
            elif finite(cr):
                ratios.append(float(cr))
            rows.append(
                {
                    "framework": r["framework"],
                    "mode": r["mode"],
                    "batch": b.get("batch"),
                    "first call (s)": fmt(b.get("first_call_s"), ".3f"),
                    "step (ms, median)": _ms(b.get("step_s_median")),
                    "IQR (ms)": _ms(b.get("step_s_iqr")),
                    "samples/s": fmt(b.get("samples_per_s"), ".4g"),
                    "GFLOP/s": fmt(None if b.get("achieved_flops") is None else b["achieved_flops"] / 1e9, ".3g"),
                    "roofline": fmt(b.get("roofline_fraction"), ".2f"),
                    "peak mem (MiB)": _mib(b.get("peak_memory_bytes")),
                    "step time / plain loop's": fmt(b.get("overhead_ratio"), ".2f"),
                }
            )
    if rows and all(row["step time / plain loop's"] == "-" for row in rows):  # the plain loop was not timed
        for row in rows:
            del row["step time / plain loop's"]
    where = "; ".join(f"{d} ({', '.join(ls)})" for d, ls in devices.items()) or "no device"
    if len(devices) > 1:
        notes.append("records come from different devices: compare ratios, not absolute times, across them")
    for r in good[:1]:
        m = r["metrics"]
        notes.insert(0, f"device: {where}; {m.get('precision')}, threads={m.get('threads')} "
                        f"(0: framework default), allow_tf32={m.get('allow_tf32')}, R={m.get('repeats')} x "
                        f"N={m.get('steps')} steps, compile cache {m.get('compile_cache')}; absolute times hold "
                        "only for this machine")
    if ratios:
        notes.append(f"clock check: the timed repeats are {min(ratios):.3f} to {max(ratios):.3f} of an outer wall clock "
                     f"around the whole timed block (required: 1 ± {tol:g}; outside it, time escaped the timed region)")
    notes.extend(_best_modes(good))
    model = good[0]["metrics"].get("model", {}) if good else {}
    shape = "-".join(str(v) for v in [model.get("x_dim"), *model.get("hidden", []), model.get("latent")]) if model else "?"
    title = f"Throughput (MLP {shape}, one training step) on {where}"
    return Summary(title, rows, ok, notes)


def _best_modes(records: list[dict[str, Any]]) -> list[str]:
    """Per framework timed in more than one mode: its best mode at the largest common batch."""
    out = []
    for fw in dict.fromkeys(r["framework"] for r in records):
        recs = [r for r in records if r["framework"] == fw]
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
            f"best {fw} mode at batch {batch}: samples/s {best('samples_per_s', True, '.4g')}; roofline fraction "
            f"{best('roofline_fraction', True, '.2f')}; first call {best('first_call_s', False, '.3f')} s; "
            f"peak memory {best('peak_memory_bytes', False, '.1f', 2**-20)} MiB"
        )
    return out


def plot_throughput(records: list[dict[str, Any]], path: Path) -> Path | None:
    """samples/s against batch size (log-log), a line per framework x mode, and per framework
    the roofline from its measured matmul rate: samples/s <= rate / (step FLOP / batch)."""
    recs = [r for r in by_framework(records) if r.get("measure", "throughput") == "throughput"
            and r.get("status") == "ok" and (r.get("metrics") or {}).get("batches")]
    if not recs:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    colors = COLORS
    styles = ["-", "--", ":", "-."]
    seen: dict[str, int] = {}
    roofs: dict[str, tuple[float, float, float]] = {}  # framework -> (matmul rate, FLOP/example, fixed FLOP)
    lo, hi = math.inf, 0.0
    for r in recs:
        fw, m = r["framework"], r["metrics"]
        i = seen[fw] = seen.get(fw, -1) + 1
        bs = [b["batch"] for b in m["batches"]]
        lo, hi = min(lo, *bs), max(hi, *bs)
        ax.plot(bs, [b["samples_per_s"] for b in m["batches"]], marker="o", ls=styles[i % len(styles)],
                color=colors.get(fw), label=f"{fw}/{r['mode']}")
        rate, per_ex, fixed = m.get("matmul_flops_per_s"), m.get("matmul_flops_per_example"), m.get("optimizer_flops")
        if rate and per_ex and fixed is not None and (fw not in roofs or rate > roofs[fw][0]):
            roofs[fw] = (float(rate), float(per_ex), float(fixed))
    grid = np.geomspace(lo / 2, hi * 2, 64)
    for fw, (rate, per_ex, fixed) in roofs.items():
        # samples/s <= rate / (step FLOP / B), step FLOP = per_ex B + fixed
        ax.plot(grid, rate * grid / (per_ex * grid + fixed), color=colors.get(fw), lw=1.0, alpha=0.7, ls=(0, (1, 1)),
                label=f"{fw} roofline ({rate / 1e9:.0f} GFLOP/s matmul)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("samples / s (training steps)")
    ax.set_title(f"Throughput on {_device_name(recs[0])}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return save_png(fig, path)


PLOTS = {"throughput.png": plot_throughput}

JUDGED = tuple(Judged(f"batches.*.{key}", name, axis="repeat") for key, name in FINITE_KEYS.items())


#: its numbers are timings: never run beside other jobs, compared only within one environment
TIMING = True
QUESTION = "Which framework is fastest?"


def answer(records: list[dict[str, Any]]) -> str:
    """One line for the suite's summary: at the largest batch size every record measured, the
    fastest framework/mode by samples/s, and its speed-up over each other framework's best mode."""
    good = [r for r in records if r["status"] == "ok" and (r.get("metrics") or {}).get("batches")]
    if not good:
        return "no throughput was measured"
    batch = max(set.intersection(*({b["batch"] for b in r["metrics"]["batches"]} for r in good)), default=None)
    if batch is None:
        return "the records share no batch size"
    rate = {f"{r['framework']} ({r['mode']})": next(b["samples_per_s"] for b in r["metrics"]["batches"] if b["batch"] == batch)
            for r in good}
    best_per_fw: dict[str, str] = {}
    for label in sorted(rate, key=lambda k: -rate[k]):
        best_per_fw.setdefault(label.split(" ")[0], label)
    top = next(iter(best_per_fw.values()))
    rest = ", ".join(f"{rate[top] / rate[lab]:.2f}x {lab}" for fw, lab in best_per_fw.items() if lab != top)
    return (f"{top} at batch {batch}: {rate[top]:,.0f} samples/s" + (f", {rest}" if rest else "")
            + f" (on {_device_name(good[0])}; one machine's numbers)")


def compared(records: list[dict[str, Any]]) -> dict[str, Quantity]:
    """For `vaebench compare`: per framework/mode/batch, the per-repeat step times (a
    statistical test there), and the compile count (informational)."""
    out: dict[str, Quantity] = {}
    for r in records:
        fw = f"{r['framework']}/{r['mode']}"
        for b in (r.get("metrics") or {}).get("batches", []) if r["status"] == "ok" else []:
            if b.get("step_s_samples"):
                out[f"{fw} batch {b['batch']} step time (s)"] = Quantity(b["step_s_median"], "speed", samples=b["step_s_samples"])
    return out

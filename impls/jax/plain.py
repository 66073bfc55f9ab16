"""A plain, hand-written JAX training loop of the same step as JaxBackend, and the
device-level probes the throughput measure needs (matmul rate, peak memory).

`PlainStep` is what a JAX user would write: the same canonical initial weights and model
functions (`impls.jax.model.loss_terms`), one `jax.jit` of the whole step (noise drawn with
jax.random inside, value_and_grad, optax update) with params, optimizer state and key
donated; in eager mode the same function un-jitted. It is called bare: no per-call context
managers. The one exception is a GPU run without TF32, where full-precision float32 matmuls
need `jax.default_matmul_precision("highest")` around the call (as the backend has), so both
compute the same thing.
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from harness.timing import CPU_PEAK, time_steps  # noqa: E402

DTYPES = {"float32": np.float32, "float64": np.float64}


def resolve_device(device: str) -> Any:
    """"cpu" | "gpu" | "auto" -> the jax device, by the backend's own rule."""
    from impls.jax.backend import JaxBackend

    return JaxBackend._pick_device(device)


def matmul_rate(dtype: str, device: str, n: int, *, repeats: int = 10, warmup: int = 2, allow_tf32: bool = False) -> float:
    """FLOP/s of a dense n x n @ n x n matmul (2 n^3 FLOP), jitted, median over `repeats`
    single matmuls timed with the shared timing core (block_until_ready before every clock
    read). Full float32 precision unless TF32 is allowed."""
    dev = resolve_device(device)
    precision = jax.lax.Precision.DEFAULT if allow_tf32 else jax.lax.Precision.HIGHEST
    rng = np.random.default_rng(0)
    a = jax.device_put(rng.standard_normal((n, n)).astype(DTYPES[dtype]), dev)
    b = jax.device_put(rng.standard_normal((n, n)).astype(DTYPES[dtype]), dev)
    mm = jax.jit(lambda a, b: jnp.matmul(a, b, precision=precision))
    out: list[jax.Array] = [a]

    def step() -> None:
        out[0] = mm(a, b)

    res = time_steps(step, lambda: jax.block_until_ready(out[0]), repeats, 1, warmup)
    return 2.0 * n**3 / res.median


def reset_peak_memory(device: str) -> None:
    """GPU: nothing to reset (JAX keeps a process-lifetime peak; see peak_memory_bytes).
    CPU: start the process's RSS-peak window."""
    if resolve_device(device).platform == "cpu":
        CPU_PEAK.reset()


def peak_memory_bytes(device: str) -> int | None:
    """GPU: the device's `memory_stats()["peak_bytes_in_use"]`, a process-lifetime peak that
    JAX cannot reset (so measure in increasing order of size). CPU: harness.timing.CPU_PEAK."""
    dev = resolve_device(device)
    if dev.platform == "cpu":
        return CPU_PEAK.peak_bytes()
    stats = dev.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else int(peak)


def peak_memory_method(device: str) -> str:
    if resolve_device(device).platform == "cpu":
        return f"cpu-rss-{CPU_PEAK.method}"
    return "jax peak_bytes_in_use (process lifetime)"


def reset_compile_state() -> None:
    """Drop JAX's in-memory compilation caches (jit executables, eager primitives), so the
    next call compiles as in a fresh process."""
    jax.clear_caches()

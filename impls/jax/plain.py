"""A plain, hand-written JAX training loop of the same step as JaxBackend, and the
device-level probes the throughput measure needs (matmul rate, peak memory).

`PlainStep` is what a JAX user would write: the same canonical initial weights and model
functions (`harness.vae.loss_terms` over `impls.jax.ops`), one `jax.jit` of the whole step (noise drawn with
jax.random inside, value_and_grad, optax update) with params, optimizer state and key
donated; in eager mode the same function un-jitted. It is called bare: no per-call context
managers. The one exception is a GPU run without TF32, where full-precision float32 matmuls
need `jax.default_matmul_precision("highest")` around the call (as the backend has), so both
compute the same thing.

Mixed precision (`framework.precision=bfloat16|float16`) follows the backend's policy
(`harness.spec.Policy`): float32 parameters, optimizer state and noise, the layers in the low
type (the model functions cast to it: `impls.base.formulation`), the loss parts and their mean in
float32. JAX has no loss scaling of its own; for float16 the step does what a JAX user writes by
hand (as in DeepMind's jmp): differentiate the loss times a scale carried in the jitted state,
unscale, keep the old parameters and optimizer state where a gradient is not finite, and halve
the scale then (double it after `LOSS_SCALE_GROWTH_STEPS` finite steps: the backend's rule).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any, cast

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from harness import vae  # noqa: E402
from harness.api import ModelSpec, OptimSpec, RuntimeSpec  # noqa: E402
from harness.spec import LOSS_SCALE_GROWTH_STEPS, LOSS_SCALE_INIT, Dtype, Policy, param_dtype  # noqa: E402
from harness.timing import CPU_PEAK, cotangent, time_steps  # noqa: E402
from impls.base import formulation
from impls.jax import ops  # noqa: E402
from impls.jax.backend import pick_device  # noqa: E402

#: every type a step computes in (`framework.precision`), mixed precision's low types included
DTYPES: dict[str, Any] = {"float32": np.float32, "float64": np.float64, "bfloat16": jnp.bfloat16, "float16": np.float16}


def resolve_device(device: str) -> Any:
    """"cpu" | "gpu" | "auto" -> the device, by the backend's own rule (`pick_device`)."""
    return pick_device(device)


class PlainStep:
    """One Adam (or SGD) step on the batch mean of -ELBO, written the plain way."""

    def __init__(
        self,
        spec: ModelSpec,
        optim: OptimSpec,
        params: Mapping[str, np.ndarray],
        runtime: RuntimeSpec = RuntimeSpec(),  # noqa: B008  (frozen: one shared default is safe)
    ) -> None:
        mode, device, seed, allow_tf32 = runtime.mode, runtime.device, runtime.seed, runtime.allow_tf32
        if mode not in ("eager", "jit"):
            raise ValueError(f"jax has no mode {mode!r}")
        self.spec, self.mode = spec, mode
        # the transposed convolution as the harness's step has it, and mixed precision's compute type
        self.ops = formulation(ops, runtime)
        self.device = resolve_device(device)
        self.policy = Policy.of(runtime.dtype)
        self.dtype = DTYPES[self.policy.param]  # parameters, optimizer state, inputs and noise
        self._precision: Any = (
            jax.default_matmul_precision("highest")
            if self.device.platform == "gpu" and not allow_tf32
            else None
        )
        self.params = {k: jax.device_put(np.array(ops.to_native(spec.params()[k], np.asarray(v)), dtype=self.dtype), self.device)
                       for k, v in params.items()}
        if optim.name == "adam":
            opt = optax.adam(learning_rate=optim.lr, b1=optim.beta1, b2=optim.beta2, eps=optim.eps)
        else:
            opt = optax.sgd(learning_rate=optim.lr, momentum=optim.momentum or None)
        self.opt_state = jax.device_put(opt.init(self.params), self.device)
        self.key = jax.device_put(jax.random.key(seed), self.device)
        # float16: (loss scale, finite steps since it last changed), carried through the step
        self.scale = jax.device_put((jnp.float32(LOSS_SCALE_INIT), jnp.int32(0)), self.device) if self.policy.loss_scaling else None
        latent, dt = spec.latent, self.dtype

        def loss_fn(params: dict[str, jax.Array], x: jax.Array, eps: jax.Array) -> jax.Array:
            recon, kl = vae.loss_terms(self.ops, params, x, eps, spec)
            return jnp.mean(recon + kl)

        def train_step(params: Any, opt_state: Any, key: jax.Array, x: jax.Array) -> tuple[Any, Any, jax.Array, jax.Array]:
            key, sub = jax.random.split(key)
            eps = jax.random.normal(sub, (x.shape[0], latent), dtype=dt)
            loss, grads = jax.value_and_grad(loss_fn)(params, x, eps)
            updates, opt_state = opt.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, key, loss

        def scaled_step(params: Any, opt_state: Any, scale: tuple[jax.Array, jax.Array], key: jax.Array,
                        x: jax.Array) -> tuple[Any, Any, tuple[jax.Array, jax.Array], jax.Array, jax.Array]:
            key, sub = jax.random.split(key)
            eps = jax.random.normal(sub, (x.shape[0], latent), dtype=dt)
            s, good = scale
            scaled, grads = jax.value_and_grad(lambda p: loss_fn(p, x, eps) * s)(params)
            grads = jax.tree.map(lambda g: g / s, grads)
            finite = jnp.all(jnp.array([jnp.isfinite(g).all() for g in jax.tree.leaves(grads)]))
            updates, new_state = opt.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            params = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_params, params)
            opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, opt_state)
            grow = good + 1 == LOSS_SCALE_GROWTH_STEPS
            s = jnp.where(finite, jnp.where(grow, s * 2, s), s / 2)
            good = jnp.where(finite & ~grow, good + 1, 0).astype(jnp.int32)
            return params, opt_state, (s, good), key, scaled / scale[0]

        if self.scale is None:
            self._fn = jax.jit(train_step, donate_argnums=(0, 1, 2)) if mode == "jit" else train_step
        else:
            self._scaled = jax.jit(scaled_step, donate_argnums=(0, 1, 2, 3)) if mode == "jit" else scaled_step

    def put(self, x: Any) -> jax.Array:
        return jax.device_put(np.asarray(ops.input_to_native(np.asarray(x), self.spec.input_shape), dtype=self.dtype), self.device)

    def __call__(self, x: jax.Array) -> jax.Array:
        ctx = self._precision if self._precision is not None else contextlib.nullcontext()
        with ctx:
            if self.scale is None:
                self.params, self.opt_state, self.key, loss = self._fn(self.params, self.opt_state, self.key, x)
            else:
                self.params, self.opt_state, self.scale, self.key, loss = self._scaled(
                    self.params, self.opt_state, self.scale, self.key, x)
        return loss

    def loss_scale(self) -> float | None:
        """float16: the dynamic loss scale now (None in other precisions)."""
        return None if self.scale is None else float(self.scale[0])

    def sync(self) -> None:
        jax.block_until_ready(self.params)

    def compile_count(self) -> int:
        """Executables in the jitted step's cache (0 in eager mode)."""
        size = getattr(self._fn if self.scale is None else self._scaled, "_cache_size", None)
        return int(size()) if self.mode == "jit" and callable(size) else 0


def matmul_rate(dtype: str, device: str, n: int, *, repeats: int = 10, warmup: int = 2, allow_tf32: bool = False) -> float:
    """FLOP/s of a dense n x n @ n x n matmul (2 n^3 FLOP) in `dtype` (the type the step computes
    in: bfloat16 or float16 under mixed precision), jitted, median over `repeats` single matmuls
    timed with the shared timing core (block_until_ready before every clock read). Full float32
    precision unless TF32 is allowed."""
    dev = resolve_device(device)
    precision = jax.lax.Precision.DEFAULT if allow_tf32 else jax.lax.Precision.HIGHEST
    rng = np.random.default_rng(0)
    a = jax.device_put(rng.standard_normal((n, n)).astype(DTYPES[dtype]), dev)
    b = jax.device_put(rng.standard_normal((n, n)).astype(DTYPES[dtype]), dev)
    mm = jax.jit(lambda a, b: jnp.matmul(a, b, precision=precision))
    out: list[jax.Array] = [a]

    def step() -> jax.Array:
        out[0] = mm(a, b)
        return out[0]

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


def _layer_op(op: str, dtype: str) -> Any:
    """`ops.<op>` as the step runs it in `dtype`: under mixed precision the matmul or convolution
    in the low type with the float32 bias added in float32 (`impls.base.formulation`); else the op."""
    dilated = op == "conv2d_transpose_dilated"
    runtime = RuntimeSpec(dtype=cast(Dtype, dtype), conv_transpose="dilated" if dilated else "native")
    return getattr(formulation(ops, runtime), "conv2d_transpose" if dilated else op)


def layer_steps(op: str, stride: int, x: np.ndarray, w: np.ndarray, b: np.ndarray, *, dtype: str, device: str,
                mode: str) -> tuple[Any, Any, Any]:
    """(forward, forward + backward, sync) of one layer (`ops.<op>`) on a batch: op by op, or one
    jax.jit each in jit mode, as the step runs it. The backward (a VJP) computes every input's
    gradient (x, w, b). `dtype` is the type the layers compute in: under mixed precision the low
    one, with the float32 bias added in float32, as the step does (`_layer_op`)."""
    dev = resolve_device(device)
    xt, wt, bt = (jax.device_put(np.asarray(a, dtype=t), dev)
                  for a, t in ((x, DTYPES[dtype]), (w, DTYPES[dtype]), (b, DTYPES[param_dtype(dtype)])))  # mixed: a float32 bias
    fn = _layer_op(op, dtype)

    def run(xt: jax.Array, wt: jax.Array, bt: jax.Array) -> jax.Array:
        with jax.default_matmul_precision("highest"):
            return fn(xt, wt, bt) if op == "dense" else fn(xt, wt, bt, stride)

    def grads(xt: jax.Array, wt: jax.Array, bt: jax.Array, ct: jax.Array) -> Any:
        y, vjp = jax.vjp(run, xt, wt, bt)
        return y, vjp(ct)

    # the cotangent: random, and an argument (a constant, or all ones, lets XLA simplify the
    # backward away); the output is returned too, so the forward is not dead code
    ct = jax.device_put(cotangent(run(xt, wt, bt).shape, param_dtype(dtype)).astype(DTYPES[dtype]), dev)
    if mode != "eager":
        run, grads = jax.jit(run), jax.jit(grads)  # type: ignore[assignment]
    out: dict[str, Any] = {}

    def forward() -> Any:
        out["y"] = run(xt, wt, bt)

    def forward_backward() -> Any:
        out["y"] = grads(xt, wt, bt, ct)
        return out["y"]

    def sync() -> None:
        if "y" in out:
            jax.block_until_ready(out["y"])

    return forward, forward_backward, sync

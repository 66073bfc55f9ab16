"""A plain, hand-written TensorFlow training loop of the same step as TensorFlowBackend, and
the device-level probes the throughput measure needs (matmul rate, peak memory).

`PlainStep` is what a TensorFlow user would write: the same canonical initial weights and
model functions (`harness.vae.loss_terms` over `impls.tensorflow.ops`), Keras Adam with Python-float
hyperparameters, noise from a `tf.random.Generator` drawn inside the step, one function
for the whole step: `tf.function(jit_compile=True)` in xla mode (the noise inside the XLA
cluster), `tf.function` in function mode, plain eager otherwise. It is called bare, with no
per-call device scope, unless the CPU is asked for while a GPU is visible.

Mixed precision (`framework.precision=bfloat16|float16`) follows the backend's policy
(`harness.spec.Policy`): float32 variables, optimizer state and noise, the layers in the low type
(the model functions cast to it: `impls.base.formulation`), the loss parts and their mean in
float32. float16 wraps the optimizer in Keras' `LossScaleOptimizer` (the backend's scale rule) and
writes the step as its documentation does: `opt.scale_loss(loss)` inside the tape, then
`opt.apply_gradients`, which unscales and skips a step whose gradient is not finite.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any, cast

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from harness import vae  # noqa: E402
from harness.api import ModelSpec, OptimSpec, RuntimeSpec  # noqa: E402
from harness.spec import LOSS_SCALE_GROWTH_STEPS, LOSS_SCALE_INIT, Dtype, Policy, param_dtype  # noqa: E402
from harness.timing import CPU_PEAK, cotangent, time_steps  # noqa: E402
from impls.base import formulation
from impls.tensorflow import ops  # noqa: E402
from impls.tensorflow.backend import pick_device  # noqa: E402

#: every type a step computes in (`framework.precision`), mixed precision's low types included
DTYPES = {"float32": tf.float32, "float64": tf.float64, "bfloat16": tf.bfloat16, "float16": tf.float16}


def resolve_device(device: str) -> str:
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
        if mode not in ("eager", "function", "xla"):
            raise ValueError(f"tensorflow has no mode {mode!r}")
        self.spec, self.mode = spec, mode
        # the transposed convolution as the harness's step has it, and mixed precision's compute type
        self.ops = formulation(ops, runtime)
        self.device = resolve_device(device)
        self.policy = Policy.of(runtime.dtype)
        self.dtype = DTYPES[self.policy.param]  # variables, optimizer state, inputs and noise
        tf.config.experimental.enable_tensor_float_32_execution(allow_tf32)
        # a device scope per call only where default placement would pick the wrong device
        self._scope = self.device == "/CPU:0" and bool(tf.config.list_physical_devices("GPU"))
        with tf.device(self.device):
            self.params = {k: tf.Variable(np.asarray(ops.to_native(spec.params()[k], np.asarray(v))), dtype=self.dtype, name=k)
                           for k, v in params.items()}
            self.generator = tf.random.Generator.from_seed(seed)
            if optim.name == "adam":
                self.opt = tf.keras.optimizers.Adam(
                    learning_rate=optim.lr, beta_1=optim.beta1, beta_2=optim.beta2, epsilon=optim.eps
                )
            else:
                self.opt = tf.keras.optimizers.SGD(learning_rate=optim.lr, momentum=optim.momentum)
            if self.policy.loss_scaling:  # float16
                self.opt = tf.keras.mixed_precision.LossScaleOptimizer(
                    self.opt, initial_scale=LOSS_SCALE_INIT, dynamic_growth_steps=LOSS_SCALE_GROWTH_STEPS)
            variables = list(self.params.values())
            self.opt.build(variables)
        latent, dt, generator, opt, ps = spec.latent, self.dtype, self.generator, self.opt, self.params
        scaling = self.policy.loss_scaling

        def train_step(x: tf.Tensor) -> tf.Tensor:
            eps = generator.normal((tf.shape(x)[0], latent), dtype=dt)
            with tf.GradientTape() as tape:
                recon, kl = vae.loss_terms(self.ops, ps, x, eps, spec)
                loss = tf.reduce_mean(recon + kl)
                scaled = opt.scale_loss(loss) if scaling else loss
            grads = tape.gradient(scaled, variables)
            opt.apply_gradients(zip(grads, variables))
            return loss

        if mode == "eager":
            self._fn: Any = train_step
        else:
            self._fn = tf.function(train_step, jit_compile=mode == "xla", autograph=False)

    def put(self, x: Any) -> tf.Tensor:
        with tf.device(self.device):
            return tf.identity(tf.constant(ops.input_to_native(np.asarray(x), self.spec.input_shape), dtype=self.dtype))

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        if self._scope:
            with tf.device(self.device):
                return self._fn(x)
        return self._fn(x)

    def loss_scale(self) -> float | None:
        """float16: the LossScaleOptimizer's dynamic loss scale now (None in other precisions)."""
        return float(self.opt.dynamic_scale.numpy()) if self.policy.loss_scaling else None

    def sync(self) -> None:
        tf.test.experimental.sync_devices()

    def compile_count(self) -> int:
        """Traces of the step's tf.function (0 in eager mode)."""
        if self.mode == "eager":
            return 0
        return int(self._fn.experimental_get_tracing_count())


def matmul_rate(dtype: str, device: str, n: int, *, repeats: int = 10, warmup: int = 2, allow_tf32: bool = False) -> float:
    """FLOP/s of a dense n x n @ n x n matmul (2 n^3 FLOP) in `dtype` (the type the step computes
    in: bfloat16 or float16 under mixed precision), median over `repeats` single eager tf.matmul
    calls timed with the shared timing core (sync before every clock read)."""
    dev = resolve_device(device)
    old = tf.config.experimental.tensor_float_32_execution_enabled()
    tf.config.experimental.enable_tensor_float_32_execution(allow_tf32)
    try:
        rng = np.random.default_rng(0)
        with tf.device(dev):
            a = tf.identity(tf.constant(rng.standard_normal((n, n)), dtype=DTYPES[dtype]))
            b = tf.identity(tf.constant(rng.standard_normal((n, n)), dtype=DTYPES[dtype]))
            out: list[tf.Tensor] = [a]

            def step() -> tf.Tensor:
                out[0] = tf.matmul(a, b)
                return out[0]

            res = time_steps(step, tf.test.experimental.sync_devices, repeats, 1, warmup)
    finally:
        tf.config.experimental.enable_tensor_float_32_execution(old)
    return 2.0 * n**3 / res.median


def _gpu_name(device: str) -> str:
    return device.lstrip("/")  # "/GPU:0" -> "GPU:0", the name the memory-info API takes


def reset_peak_memory(device: str) -> None:
    """GPU: reset TF's allocator peak; CPU: start the process's RSS-peak window."""
    dev = resolve_device(device)
    if dev.startswith("/GPU"):
        tf.test.experimental.sync_devices()
        with contextlib.suppress(ValueError, AttributeError):  # older TF: no reset
            tf.config.experimental.reset_memory_stats(_gpu_name(dev))
    else:
        CPU_PEAK.reset()


def peak_memory_bytes(device: str) -> int | None:
    """GPU: `tf.config.experimental.get_memory_info("GPU:0")["peak"]` since the reset (TF's
    allocator, variables included). CPU: harness.timing.CPU_PEAK."""
    dev = resolve_device(device)
    if dev.startswith("/GPU"):
        tf.test.experimental.sync_devices()
        return int(tf.config.experimental.get_memory_info(_gpu_name(dev))["peak"])
    return CPU_PEAK.peak_bytes()


def peak_memory_method(device: str) -> str:
    if resolve_device(device).startswith("/GPU"):
        return "tf get_memory_info peak"
    return f"cpu-rss-{CPU_PEAK.method}"


def reset_compile_state() -> None:
    """Nothing to drop: every PlainStep/backend builds its own tf.functions, which trace and
    compile on their first call."""


def _layer_op(op: str, dtype: str) -> Any:
    """`ops.<op>` as the step runs it in `dtype`: under mixed precision the matmul or convolution
    in the low type with the float32 bias added in float32 (`impls.base.formulation`); else the op."""
    dilated = op == "conv2d_transpose_dilated"
    runtime = RuntimeSpec(dtype=cast(Dtype, dtype), conv_transpose="dilated" if dilated else "native")
    return getattr(formulation(ops, runtime), "conv2d_transpose" if dilated else op)


def layer_steps(op: str, stride: int, x: np.ndarray, w: np.ndarray, b: np.ndarray, *, dtype: str, device: str,
                mode: str) -> tuple[Any, Any, Any]:
    """(forward, forward + backward, sync) of one layer (`ops.<op>`) on a batch: eager, or a
    tf.function (jit_compile in xla mode) in compiled modes, as the step runs it. The backward
    computes every input's gradient (x, w, b). `dtype` is the type the layers compute in: under
    mixed precision the low one, with the float32 bias added in float32, as the step does (`_layer_op`)."""
    dev = resolve_device(device)
    with tf.device(dev):
        xt, wt = (tf.constant(a, dtype=DTYPES[dtype]) for a in (x, w))
        bt = tf.constant(b, dtype=DTYPES[param_dtype(dtype)])  # mixed precision: a float32 bias
    fn = _layer_op(op, dtype)

    def run(xt: tf.Tensor, wt: tf.Tensor, bt: tf.Tensor) -> tf.Tensor:
        return fn(xt, wt, bt) if op == "dense" else fn(xt, wt, bt, stride)

    def grads(xt: tf.Tensor, wt: tf.Tensor, bt: tf.Tensor, ct: tf.Tensor) -> Any:
        with tf.GradientTape() as tape:
            tape.watch([xt, wt, bt])
            y = run(xt, wt, bt)
        return y, tape.gradient(y, [xt, wt, bt], output_gradients=ct)

    # the cotangent: random, and an argument (with tf.ones_like(y) XLA simplified the backward of
    # a transposed convolution to nearly nothing); the output is returned, so the forward stays
    with tf.device(dev):
        ct = tf.constant(cotangent(tuple(run(xt, wt, bt).shape), param_dtype(dtype)), dtype=DTYPES[dtype])

    if mode != "eager":
        run = tf.function(run, jit_compile=mode == "xla", autograph=False)  # type: ignore[assignment]
        grads = tf.function(grads, jit_compile=mode == "xla", autograph=False)  # type: ignore[assignment]
    out: dict[str, Any] = {}

    def forward() -> Any:
        with tf.device(dev):
            out["y"] = run(xt, wt, bt)

    def forward_backward() -> Any:
        with tf.device(dev):
            out["y"] = grads(xt, wt, bt, ct)
        return out["y"]

    def sync() -> None:
        if "y" in out:  # reading the result back waits for it
            tf.nest.map_structure(lambda t: t.numpy(), out["y"])

    return forward, forward_backward, sync

"""TensorFlowBackend: the VAE's primitives in TensorFlow (eager, tf.function, or XLA) under
`impls.base.BackendBase`, which implements the `Backend` protocol on top of them."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any, ClassVar

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from harness import vae  # noqa: E402
from harness.api import Backend, Term  # noqa: E402
from harness.spec import LOSS_SCALE_GROWTH_STEPS, LOSS_SCALE_INIT, wants_gpu  # noqa: E402
from impls.base import BackendBase, F, StepDrawn, StepGiven, VersionCommon, pick_term  # noqa: E402
from impls.tensorflow import ops  # noqa: E402


def pick_device(device: str) -> str:
    """"cpu" | "gpu" | "auto" -> "/CPU:0" or "/GPU:0", by the one rule (`harness.spec.wants_gpu`);
    a GPU gets memory growth, so two backends can share it."""
    gpus = tf.config.list_physical_devices("GPU")
    if not wants_gpu("tensorflow", device, len(gpus)):
        return "/CPU:0"
    for g in gpus:
        with contextlib.suppress(RuntimeError):  # only before the GPU is initialised
            tf.config.experimental.set_memory_growth(g, True)
    return "/GPU:0"


DTYPES = {"float32": tf.float32, "float64": tf.float64}


class TensorFlowBackend(BackendBase):
    """The VAE in TensorFlow. Modes: "eager", "function" (tf.function), "xla" (tf.function
    with jit_compile). The training noise is drawn by TF's own kernels outside any XLA
    cluster (XLA lowers the generator's ops to another stream): the same seed gives the same
    noise in every mode. Compiled functions have no input signature: one trace per batch
    size (batches are never ragged).

    Process-wide side effects (TensorFlow has no scoped form of these): the intra- and
    inter-op thread counts when `threads > 0` (only before TF's runtime starts, else left as
    they are); TF32 execution (`tf.config.experimental.enable_tensor_float_32_execution`,
    set to `allow_tf32`, read by every later TF computation in the process); GPU memory
    growth when a GPU is used (only before the GPU is initialised); and, on import,
    TF_CPP_MIN_LOG_LEVEL=2 unless already set.
    """

    name: ClassVar[str] = "tensorflow"
    ops_module: ClassVar[Any] = ops
    device: str
    dtype: tf.DType
    params: dict[str, tf.Variable]
    generator: tf.random.Generator
    opt: Any

    # -- setup -----------------------------------------------------------------------------------
    def _setup(self) -> None:
        runtime = self.runtime
        if runtime.threads > 0:
            with contextlib.suppress(RuntimeError):  # only before TF's runtime starts (first op)
                tf.config.threading.set_intra_op_parallelism_threads(runtime.threads)
                tf.config.threading.set_inter_op_parallelism_threads(runtime.threads)
        self.device = pick_device(runtime.device)
        self._gpu = self.device == "/GPU:0"
        # TF places ops on the GPU when there is one: a device scope is needed only when the
        # CPU is asked for while a GPU is visible (it costs ~5 us per call: not entered else)
        self._needs_scope = not self._gpu and bool(tf.config.list_physical_devices("GPU"))
        tf.config.experimental.enable_tensor_float_32_execution(runtime.allow_tf32)
        self.dtype = DTYPES[self.policy.param]
        with tf.device(self.device):
            self.params = {
                k: tf.Variable(tf.zeros(s, dtype=self.dtype), name=k, trainable=True)
                for k, s in self._native_shapes.items()
            }
            self.generator = tf.random.Generator.from_seed(runtime.seed)
        self._make_optimizer()

    def _make_optimizer(self) -> None:
        o, ps = self.optim, list(self.params.values())
        # Keras turns Python-float hyperparameters into float32 tensors before casting them
        # to the variables' dtype (ops.cast(0.999, "float64") == 0.9990000128746033), which
        # breaks float64 runs. So each one is given as a tensor of the parameters' dtype: the
        # learning rate through a callable (a float would become a float32 Keras variable),
        # the betas and epsilon as constant tensors (documented as accepted), and SGD's
        # momentum (which must pass an isinstance(float) check) as a NumPy float64, a float
        # subclass that casts exactly.
        lr_value, dtype = float(o.lr), self.dtype

        def lr() -> tf.Tensor:
            return tf.constant(lr_value, dtype=dtype)

        with tf.device(self.device):
            if o.name == "adam":
                self.opt = tf.keras.optimizers.Adam(
                    learning_rate=lr,
                    beta_1=tf.constant(o.beta1, dtype=dtype),
                    beta_2=tf.constant(o.beta2, dtype=dtype),
                    epsilon=tf.constant(o.eps, dtype=dtype),
                    amsgrad=False,
                )
            else:
                self.opt = tf.keras.optimizers.SGD(learning_rate=lr, momentum=np.float64(o.momentum), nesterov=False)
            # float16: Keras' LossScaleOptimizer around it (it builds the inner one); `opt` stays
            # the inner optimizer, whose variables are the canonical state
            self.scaler = tf.keras.mixed_precision.LossScaleOptimizer(
                self.opt, initial_scale=LOSS_SCALE_INIT, dynamic_growth_steps=LOSS_SCALE_GROWTH_STEPS,
            ) if self.policy.loss_scaling else None
            (self.scaler or self.opt).build(ps)
            self.skipped = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped_steps")

    def _scope(self) -> contextlib.AbstractContextManager[Any]:
        """tf.device(ours) where default placement would pick another device, else nothing."""
        return tf.device(self.device) if self._needs_scope else contextlib.nullcontext()

    # -- data ------------------------------------------------------------------------------------
    def _to_device(self, a: np.ndarray) -> tf.Tensor:
        with self._scope():
            return tf.identity(tf.constant(a))

    def _tensor_dtype(self, x: Any) -> tf.DType | None:
        return x.dtype if isinstance(x, tf.Tensor) else None

    def _from_device(self, t: Any) -> np.ndarray:
        return np.array(t.numpy(), copy=True)

    def sync(self) -> None:
        """Block until every queued device computation of this backend has finished."""
        # Blocks on every logical device's queue (GPU streams, async eager executors);
        # on a synchronous CPU run there is nothing pending and it returns at once.
        tf.test.experimental.sync_devices()

    # -- parameters ------------------------------------------------------------------------------
    def _set_params(self, params: dict[str, np.ndarray]) -> None:
        for k, p in self.params.items():
            p.assign(params[k])
        for v in self.opt.variables:
            v.assign(tf.zeros(v.shape, dtype=v.dtype))

    def _get_params(self) -> dict[str, np.ndarray]:
        return {k: self._from_device(p) for k, p in self.params.items()}

    # -- optimizer state -------------------------------------------------------------------------
    # Keras keeps one variable per parameter and kind, in the order the optimizer was built
    # with (ours: canonical order): Adam's `_momentums` (m) and `_velocities` (v), the
    # uncorrected moments as torch and optax keep them, and `iterations` (int64, the step
    # count). SGD with momentum keeps `momentums`, a velocity u = momentum*u - lr*g added
    # to the weights (keras/src/optimizers/sgd.py), i.e. u = -lr*b for the canonical trace
    # b = momentum*b + g: b = -u/lr out, u = -lr*b in. That conversion rounds unless lr is
    # a power of two, so only then are SGD-momentum round trips and resumes bit-exact here
    # (else within an ulp or so of u; no same-dtype b can represent every u exactly).
    # Assigning to these variables never retraces the compiled step, which captured them.
    def _lr(self) -> np.ndarray:
        """The learning rate as the update computes it (a constant of our dtype)."""
        return np.asarray(self.optim.lr, dtype=self.np_dtype)

    def _state_variables(self) -> dict[str, Any]:
        """Canonical name -> the Keras variable holding it (SGD: the velocity u)."""
        index = {k: self.opt._get_variable_index(p) for k, p in self.params.items()}
        if self.optim.name == "adam":
            out: dict[str, Any] = {"adam.step": self.opt.iterations}
            out.update({f"adam.m.{k}": self.opt._momentums[i] for k, i in index.items()})
            out.update({f"adam.v.{k}": self.opt._velocities[i] for k, i in index.items()})
            return out
        if self.optim.momentum > 0:
            return {f"sgd.momentum.{k}": self.opt.momentums[i] for k, i in index.items()}
        return {}

    def _get_state(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for k, v in self._state_variables().items():
            a = self._from_device(v)
            if k == "adam.step":
                a = a.astype(np.int64)
            elif k.startswith("sgd.momentum."):
                a = -(a / self._lr()) + 0.0  # + 0.0: a zero velocity gives +0, not -0
            out[k] = a
        return out

    def _set_state(self, state: dict[str, np.ndarray]) -> None:
        for k, v in self._state_variables().items():
            a = state[k]
            if k.startswith("sgd.momentum."):
                a = -(a * self._lr()) + 0.0
            v.assign(np.asarray(a, dtype=v.dtype))

    # -- measurement -----------------------------------------------------------------------------
    def _loss_terms(self, x: tf.Tensor, eps: tf.Tensor) -> tuple[np.ndarray, np.ndarray]:
        recon, kl = vae.loss_terms(self.ops, self.params, x, eps, self.spec)
        return self._from_device(recon), self._from_device(kl)

    def _encode(self, x: tf.Tensor) -> tuple[np.ndarray, np.ndarray]:
        mu, logvar = vae.encode(self.ops, self.params, x, self.spec)
        return self._from_device(mu), self._from_device(logvar)

    def _grads(self, x: tf.Tensor, eps: tf.Tensor, term: Term) -> dict[str, np.ndarray | None]:
        names = list(self.params)
        with tf.GradientTape() as tape:
            recon, kl = vae.loss_terms(self.ops, self.params, x, eps, self.spec)
            value = self._scaled(tf.reduce_mean(pick_term(term, recon, kl)))
        gs = tape.gradient(value, [self.params[k] for k in names])
        return {k: (None if g is None else self._from_device(g)) for k, g in zip(names, gs)}

    def _iwae_grads(self, x: tf.Tensor, eps: tf.Tensor, per_example: bool) -> dict[str, np.ndarray | None]:
        names = list(self.params)
        variables = [self.params[k] for k in names]
        if not per_example:
            with tf.GradientTape() as tape:
                value = -tf.reduce_mean(vae.iwae_bound(self.ops, self.params, x, eps, self.spec))
            gs = tape.gradient(value, variables)
        else:
            gs = self._per_example_iwae_grads(x, eps)
        return {k: (None if g is None else self._from_device(g)) for k, g in zip(names, gs)}

    def _per_example_iwae_grads(self, x: tf.Tensor, eps: tf.Tensor) -> list[Any]:
        """The gradient of each example's -IWAE_K, vectorised over the batch by
        `tf.vectorized_map` (pfor). pfor runs in a graph: one tf.function, built on first use
        and traced once per input shape (eager `vectorized_map` would retrace every call)."""
        fn = getattr(self, "_iwae_per_example", None)
        if fn is None:
            spec, names = self.spec, list(self.params)
            variables = [self.params[k] for k in names]

            def per_example(x: tf.Tensor, eps: tf.Tensor) -> list[Any]:
                values = [tf.convert_to_tensor(v) for v in variables]

                def one(args: tuple[tf.Tensor, tf.Tensor]) -> list[Any]:
                    xb, eb = args  # (D,), (K, L): x as one row (TF's matmul needs rank 2)
                    with tf.GradientTape() as tape:
                        tape.watch(values)
                        value = -vae.iwae_bound(self.ops, dict(zip(names, values)), xb[None], eb, spec)  # a scalar
                    return tape.gradient(value, values, unconnected_gradients=tf.UnconnectedGradients.ZERO)  # type: ignore[no-any-return]

                return tf.vectorized_map(one, (x, tf.transpose(eps, [1, 0, 2])))  # type: ignore[no-any-return]

            fn = self._iwae_per_example = tf.function(per_example, autograph=False)
        return fn(x, eps)  # type: ignore[no-any-return]

    def _local_grads(self, x: tf.Tensor, mu: tf.Tensor, logvar: tf.Tensor, eps: tf.Tensor) -> tuple[np.ndarray, ...]:
        with tf.GradientTape() as tape:
            tape.watch([mu, logvar])
            recon, kl = vae.terms_at(self.ops, self.params, x, mu, logvar, eps, self.spec)
            total = tf.reduce_sum(recon + kl)
        g_mu, g_logvar = tape.gradient(total, [mu, logvar])
        return tuple(self._from_device(t) for t in (recon, kl, g_mu, g_logvar))

    def _iwae_rng(self, seed: int) -> tf.random.Generator:
        with self._scope():
            return tf.random.Generator.from_seed(seed)

    def _iwae_log_weights(self, x: tf.Tensor, kk: int, rng: tf.random.Generator) -> tuple[np.ndarray, tf.random.Generator]:
        # drawn eagerly by TF's kernels (outside XLA): the same stream in every mode
        eps = rng.normal((kk, int(x.shape[0]), self.spec.latent), dtype=self.dtype)
        return self._from_device(self._log_weights(x, eps)), rng

    # -- compiled functions ----------------------------------------------------------------------
    def _compile(self, fn: F, what: str, *, xla: bool | None = None) -> F:
        """tf.function of `fn` (jit_compile in xla mode unless `xla` says otherwise)."""
        if not self.compiled:
            return fn
        jit = self.runtime.mode == "xla" if xla is None else xla
        return tf.function(self._counting(fn, what), jit_compile=jit, autograph=False)  # type: ignore[return-value]

    def _build_step(self) -> tuple[StepDrawn, StepGiven]:
        names = list(self.params)
        variables = [self.params[k] for k in names]
        params, spec, opt, generator, dtype = self.params, self.spec, self.opt, self.generator, self.dtype

        scaler, skipped = self.scaler, self.skipped

        def update(x: tf.Tensor, eps: tf.Tensor) -> tf.Tensor:
            with tf.GradientTape() as tape:
                recon, kl = vae.loss_terms(self.ops, params, x, eps, spec)
                loss = tf.reduce_mean(pick_term("loss", recon, kl))
                scaled = loss if scaler is None else scaler.scale_loss(loss)
            # frozen / detached parameters get a zero gradient: Adam and SGD then leave them
            # (and their zero moments) unchanged, as torch does for a None gradient
            gs = tape.gradient(scaled, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            if scaler is None:
                opt.apply(gs, variables)
                return loss
            # LossScaleOptimizer unscales, skips the step on a non-finite gradient and halves
            # the scale then (the only time it falls: how a skip is counted)
            before = tf.identity(scaler.dynamic_scale)
            scaler.apply(gs, variables)
            skipped.assign_add(tf.cast(scaler.dynamic_scale < before, tf.int64))
            return loss

        given = self._compile(update, "step")

        # The noise is drawn by TF's own kernels, never inside the XLA cluster: XLA's lowering
        # of the generator's ops yields another stream for the same seed. One outer tf.function
        # (not jit-compiled) draws and calls the compiled update, which it does not retrace.
        # What that costs, measured (MLP, batch 512, one pinned core): the step runs 1.03 to 1.10
        # times the plain loop's time in every precision (one float16 process 1.20), where JAX's
        # identical harness and plain steps read 1.00 to 1.03; TF's normal costs about 47 us a
        # 512 x 8 draw in a graph. Drawing ten steps' noise per call into a variable the update
        # reads (tried) saved nothing once every timed block held one draw.
        def drawn_update(x: tf.Tensor) -> tf.Tensor:
            return given(x, generator.normal((x.shape[0], spec.latent), dtype=dtype))

        drawn = self._compile(drawn_update, "step", xla=False)
        if not self._needs_scope:
            return drawn, given
        device = self.device

        def step_drawn(x: tf.Tensor) -> tf.Tensor:
            with tf.device(device):
                return drawn(x)

        def step_given(x: tf.Tensor, eps: tf.Tensor) -> tf.Tensor:
            with tf.device(device):
                return given(x, eps)

        return step_drawn, step_given

    def _build_log_weights(self) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
        params, spec = self.params, self.spec

        def log_weights(x: tf.Tensor, eps: tf.Tensor) -> tf.Tensor:
            return vae.iwae_log_weights(self.ops, params, x, eps, spec)

        return self._compile(log_weights, "log_likelihood")

    # -- record ----------------------------------------------------------------------------------
    def _version_common(self) -> VersionCommon:
        kind = "GPU" if self._gpu else "CPU"
        devices = tf.config.list_physical_devices(kind)
        name = "cpu"
        if self._gpu:
            name = str(tf.config.experimental.get_device_details(devices[0]).get("device_name", "unknown"))
        tf32 = bool(tf.config.experimental.tensor_float_32_execution_enabled())
        return VersionCommon(
            framework_version=tf.__version__,
            device=self.device,
            device_name=name,
            device_count=len(devices),
            device_kind=kind.lower(),
            threads=_intra_op_threads(),
            matmul_precision="tf32" if tf32 else "float32",
            allow_tf32=tf32,
        )

    def _loss_scale(self) -> tuple[float, int]:
        assert self.scaler is not None
        return float(self.scaler.dynamic_scale.numpy()), int(self.skipped.numpy())

    def _version_extra(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "keras_version": tf.keras.__version__,
            "intra_op_threads_setting": tf.config.threading.get_intra_op_parallelism_threads(),  # 0: default
            "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),  # 0: default
            "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
        }
        if self._gpu:
            gpus = tf.config.list_physical_devices("GPU")
            build = tf.sysconfig.get_build_info()
            info.update(
                compute_capability=tf.config.experimental.get_device_details(gpus[0]).get("compute_capability"),
                cuda=build.get("cuda_version"),
                cudnn=build.get("cudnn_version"),
            )
        return info


def _intra_op_threads() -> int:
    """The intra-op pool size TF uses: the setting if made, else TF_NUM_INTRAOP_THREADS,
    else (TF's default) the CPUs this process may run on."""
    n = tf.config.threading.get_intra_op_parallelism_threads()
    if n > 0:
        return int(n)
    env = os.environ.get("TF_NUM_INTRAOP_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


BACKEND: type[Backend] = TensorFlowBackend

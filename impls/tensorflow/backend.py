"""TensorFlowBackend: the Backend protocol in TensorFlow (eager, tf.function, or XLA-compiled training step)."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping
from typing import Any, ClassVar

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from harness.api import ModelSpec, OptimSpec, RuntimeSpec, Term, Terms  # noqa: E402
from impls.tensorflow import model  # noqa: E402

DTYPES = {"float32": tf.float32, "float64": tf.float64}


class TensorFlowBackend:
    name: ClassVar[str] = "tensorflow"

    def __init__(self, spec: ModelSpec, optim: OptimSpec, runtime: RuntimeSpec) -> None:
        self.spec, self.optim, self.runtime = spec, optim, runtime
        if runtime.threads > 0:
            with contextlib.suppress(RuntimeError):  # only before TF's runtime starts (first op)
                tf.config.threading.set_intra_op_parallelism_threads(runtime.threads)
                tf.config.threading.set_inter_op_parallelism_threads(runtime.threads)
        gpus = tf.config.list_physical_devices("GPU")
        want_gpu = runtime.device == "gpu" or (runtime.device == "auto" and bool(gpus))
        if want_gpu and not gpus:
            raise RuntimeError("device=gpu asked for, but tensorflow sees no GPU")
        if want_gpu:
            for g in gpus:
                with contextlib.suppress(RuntimeError):  # only before the GPU is initialised
                    tf.config.experimental.set_memory_growth(g, True)
        self.device = "/GPU:0" if want_gpu else "/CPU:0"
        tf.config.experimental.enable_tensor_float_32_execution(runtime.allow_tf32)
        self.dtype = DTYPES[runtime.dtype]
        with tf.device(self.device):
            self.params: dict[str, tf.Variable] = {
                k: tf.Variable(tf.zeros(s, dtype=self.dtype), name=k, trainable=True)
                for k, s in spec.param_shapes().items()
            }
            self.generator = tf.random.Generator.from_seed(runtime.seed)
        self._make_optimizer()
        self._compiles = 0
        self._step_fn = self._build_step()

    # -- parameters ------------------------------------------------------------------
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
            self.opt.build(ps)

    def set_params(self, params: Mapping[str, np.ndarray]) -> None:
        """Load canonical weights; the optimizer state (moments, iteration count) is reset."""
        for k, p in self.params.items():
            p.assign(tf.constant(np.asarray(params[k]), dtype=self.dtype))
        for v in self.opt.variables:
            v.assign(tf.zeros(v.shape, dtype=v.dtype))

    def get_params(self) -> dict[str, np.ndarray]:
        return {k: p.numpy().copy() for k, p in self.params.items()}

    # -- optimizer state -----------------------------------------------------------------
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
        return np.asarray(self.optim.lr, dtype=self.runtime.dtype)

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

    def get_state(self) -> dict[str, np.ndarray]:
        """The optimizer state under canonical names (see `harness.api.Backend.get_state`)."""
        out: dict[str, np.ndarray] = {}
        for k, v in self._state_variables().items():
            a = np.array(v.numpy(), copy=True)
            if k == "adam.step":
                a = a.astype(np.int64)
            elif k.startswith("sgd.momentum."):
                a = -(a / self._lr()) + 0.0  # + 0.0: a zero velocity gives +0, not -0
            out[k] = a
        return out

    def set_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Load a canonical optimizer state (see `harness.api.Backend.set_state`), by
        assignment to the existing Keras variables: no retrace."""
        arrays = _check_state(state, state_shapes(self.spec, self.optim), self.runtime.dtype)
        for k, v in self._state_variables().items():
            a = arrays[k]
            if k.startswith("sgd.momentum."):
                a = -(a * self._lr()) + 0.0
            v.assign(np.asarray(a, dtype=v.dtype))

    # -- data --------------------------------------------------------------------------
    def put(self, x: Any) -> tf.Tensor:
        if isinstance(x, tf.Tensor):
            return x
        with tf.device(self.device):
            return tf.identity(tf.constant(np.asarray(x), dtype=self.dtype))

    def sync(self) -> None:
        # Blocks on every logical device's queue (GPU streams, async eager executors);
        # on a synchronous CPU run there is nothing pending and it returns at once.
        tf.test.experimental.sync_devices()

    # -- measurement -------------------------------------------------------------------
    def terms(self, x: Any, eps: np.ndarray) -> Terms:
        with tf.device(self.device):
            recon, kl = model.loss_terms(self.params, self.put(x), self.put(eps), self.spec)
        return Terms(recon=recon.numpy(), kl=kl.numpy())

    def grads(self, x: Any, eps: np.ndarray, term: Term) -> dict[str, np.ndarray]:
        names = list(self.params)
        with tf.device(self.device), tf.GradientTape() as tape:
            recon, kl = model.loss_terms(self.params, self.put(x), self.put(eps), self.spec)
            value = tf.reduce_mean({"recon": recon, "kl": kl, "loss": recon + kl}[term])
        gs = tape.gradient(value, [self.params[k] for k in names])
        return {
            k: (np.zeros(self.spec.param_shapes()[k], dtype=self.runtime.dtype) if g is None else g.numpy())
            for k, g in zip(names, gs)
        }

    def log_likelihood(self, x: Any, k: int, seed: int) -> np.ndarray:
        with tf.device(self.device):
            xd = self.put(x)
            gen = tf.random.Generator.from_seed(seed)
            chunks = []
            for start in range(0, k, 100):
                kk = min(100, k - start)
                eps = gen.normal((kk, int(xd.shape[0]), self.spec.latent), dtype=self.dtype)
                chunks.append(model.iwae_log_weights(self.params, xd, eps, self.spec))
            log_w = tf.concat(chunks, axis=0)
            out = tf.reduce_logsumexp(log_w, axis=0) - math.log(k)
        return out.numpy()

    # -- training ----------------------------------------------------------------------
    def _loss(self, x: tf.Tensor, eps: tf.Tensor) -> tf.Tensor:
        recon, kl = model.loss_terms(self.params, x, eps, self.spec)
        return tf.reduce_mean(recon + kl)

    def _build_step(self) -> Any:
        names = list(self.params)
        variables = [self.params[k] for k in names]
        backend = self

        def update(x: tf.Tensor, eps: tf.Tensor) -> tf.Tensor:
            with tf.GradientTape() as tape:
                loss = backend._loss(x, eps)
            # frozen / detached parameters get a zero gradient: Adam and SGD then leave them
            # (and their zero moments) unchanged, as torch does for a None gradient
            gs = tape.gradient(loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            backend.opt.apply(gs, variables)
            return loss

        def draw(x: tf.Tensor) -> tf.Tensor:
            return backend.generator.normal((tf.shape(x)[0], backend.spec.latent), dtype=backend.dtype)

        if self.runtime.mode == "eager":

            def step(x: tf.Tensor, eps: tf.Tensor | None) -> tf.Tensor:
                return update(x, draw(x) if eps is None else eps)

            return step

        def step_given(x: tf.Tensor, eps: tf.Tensor) -> tf.Tensor:
            backend._compiles += 1  # a Python side effect: runs once per trace, never per call
            return update(x, eps)

        x_sig = tf.TensorSpec([None, self.spec.x_dim], self.dtype)
        eps_sig = tf.TensorSpec([None, self.spec.latent], self.dtype)
        given = tf.function(step_given, input_signature=[x_sig, eps_sig], jit_compile=self.runtime.mode == "xla")

        # The noise is drawn outside the XLA cluster, by TF's own kernels: XLA's lowering of
        # the generator's ops yields a different stream for the same seed, and the noise
        # should not depend on the mode. The outer function is not jit-compiled; it calls
        # the (compiled) step, which it does not retrace.
        def step_drawn(x: tf.Tensor) -> tf.Tensor:
            backend._compiles += 1
            return given(x, draw(x))

        drawn = tf.function(step_drawn, input_signature=[x_sig])

        def step(x: tf.Tensor, eps: tf.Tensor | None) -> tf.Tensor:
            return drawn(x) if eps is None else given(x, eps)

        return step

    def train_step(self, x: Any, eps: np.ndarray | None = None) -> tf.Tensor:
        with tf.device(self.device):
            xd = self.put(x)
            e = None if eps is None else self.put(eps)
            return self._step_fn(xd, e)

    def compile_count(self) -> int:
        return self._compiles

    def version(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "framework": "tensorflow",
            "framework_version": tf.__version__,
            "keras_version": tf.keras.__version__,
            "device": self.device,
            "threads": tf.config.threading.get_intra_op_parallelism_threads(),  # 0: TF's default
            "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
            "tensor_float_32": tf.config.experimental.tensor_float_32_execution_enabled(),
            "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
        }
        if self.device.startswith("/GPU"):
            gpus = tf.config.list_physical_devices("GPU")
            details = tf.config.experimental.get_device_details(gpus[0])
            build = tf.sysconfig.get_build_info()
            info.update(
                device_name=details.get("device_name", "unknown"),
                device_count=len(gpus),
                compute_capability=details.get("compute_capability"),
                cuda=build.get("cuda_version"),
                cudnn=build.get("cudnn_version"),
            )
        return info


def state_shapes(spec: ModelSpec, optim: OptimSpec) -> dict[str, tuple[int, ...]]:
    """Canonical optimizer-state names and shapes, in order."""
    ps = spec.param_shapes()
    if optim.name == "adam":
        return {
            "adam.step": (),
            **{f"adam.m.{k}": s for k, s in ps.items()},
            **{f"adam.v.{k}": s for k, s in ps.items()},
        }
    if optim.momentum > 0:
        return {f"sgd.momentum.{k}": s for k, s in ps.items()}
    return {}


def _check_state(state: Mapping[str, Any], expected: dict[str, tuple[int, ...]], dtype: str) -> dict[str, np.ndarray]:
    """Validate a canonical state against `expected` names and shapes; return host copies
    (moments in `dtype`, the step as int64). Raises ValueError naming the offending key."""
    listing = ", ".join(f"{k} {s}" for k, s in expected.items()) or "none (this optimizer keeps no state)"
    unknown = [k for k in state if k not in expected]
    if unknown:
        raise ValueError(f"unknown optimizer-state key(s) {unknown}; expected: {listing}")
    missing = [k for k in expected if k not in state]
    if missing:
        raise ValueError(f"missing optimizer-state key(s) {missing}; expected: {listing}")
    out: dict[str, np.ndarray] = {}
    for k, shape in expected.items():
        a = np.asarray(state[k])
        if a.shape != shape:
            raise ValueError(f"optimizer-state key {k!r} has shape {a.shape}, expected {shape}; expected: {listing}")
        if k.endswith(".step"):
            integral = np.issubdtype(a.dtype, np.integer) or (
                np.issubdtype(a.dtype, np.floating) and float(a).is_integer()
            )
            if not integral or not 0 <= float(a) < 2.0**63:
                raise ValueError(f"optimizer-state key {k!r} must be a non-negative integer, got {a!r}")
            out[k] = np.array(int(a), dtype=np.int64)
        else:
            out[k] = np.array(a, dtype=dtype, copy=True)
    return out


BACKEND = TensorFlowBackend

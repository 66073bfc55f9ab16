"""JaxBackend: the Backend protocol in JAX (eager op by op, or one jax.jit'd training step)."""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from harness.api import ModelSpec, OptimSpec, RuntimeSpec, Term, Terms  # noqa: E402
from impls.jax import model  # noqa: E402

DTYPES = {"float32": np.float32, "float64": np.float64}


class JaxBackend:
    name: ClassVar[str] = "jax"

    def __init__(self, spec: ModelSpec, optim: OptimSpec, runtime: RuntimeSpec) -> None:
        self.spec, self.optim, self.runtime = spec, optim, runtime
        if runtime.dtype == "float64":
            # all dtypes may share one process (tests): float32 paths stay explicit below
            jax.config.update("jax_enable_x64", True)
        self.device = self._pick_device(runtime.device)
        # "highest": full float32 matmuls on GPU; "default" lets XLA use TF32 there
        self.precision = "default" if runtime.allow_tf32 else "highest"
        self.dtype = DTYPES[runtime.dtype]
        with self._scope():
            self.params: dict[str, jax.Array] = {
                k: jax.device_put(jnp.zeros(s, dtype=self.dtype), self.device) for k, s in spec.param_shapes().items()
            }
            self.key = jax.device_put(jax.random.key(runtime.seed), self.device)
        self._make_optimizer()
        self._compiles = 0
        self._step_fn, self._step_eps_fn, self._iwae_fn = self._build_step()

    @staticmethod
    def _pick_device(want: str) -> Any:
        try:
            gpus = jax.devices("gpu")
        except RuntimeError:
            gpus = []
        if want == "gpu" and not gpus:
            raise RuntimeError("device=gpu asked for, but jax sees no GPU (is jax[cuda] installed?)")
        if want in ("gpu", "auto") and gpus:
            return gpus[0]
        return jax.devices("cpu")[0]

    @contextlib.contextmanager
    def _scope(self) -> Iterator[None]:
        """Every computation runs on our device with our matmul precision."""
        with jax.default_device(self.device), jax.default_matmul_precision(self.precision):
            yield

    # -- parameters ------------------------------------------------------------------
    def _make_optimizer(self) -> None:
        o = self.optim
        if o.name == "adam":
            self.opt: optax.GradientTransformation = optax.adam(
                learning_rate=o.lr, b1=o.beta1, b2=o.beta2, eps=o.eps, eps_root=0.0
            )
        else:
            self.opt = optax.sgd(learning_rate=o.lr, momentum=o.momentum or None)
        with self._scope():
            self.opt_state = self._init_opt_state()

    def _init_opt_state(self) -> Any:
        # committed to our device like the params: an uncommitted leaf (optax's step count)
        # made the jitted step compile a second executable on its second call
        return jax.device_put(self.opt.init(self.params), self.device)

    def set_params(self, params: Mapping[str, np.ndarray]) -> None:
        """Load canonical weights; the optimizer state is reset."""
        with self._scope():
            self.params = {
                # a fresh host copy: the step donates these buffers
                k: jax.device_put(np.array(params[k], dtype=self.dtype, copy=True), self.device)
                for k in self.params
            }
            self.opt_state = self._init_opt_state()

    def get_params(self) -> dict[str, np.ndarray]:
        return {k: np.array(p, copy=True) for k, p in self.params.items()}

    # -- data --------------------------------------------------------------------------
    def put(self, x: Any) -> jax.Array:
        if isinstance(x, jax.Array) and x.dtype == self.dtype:
            return x
        return jax.device_put(np.asarray(x, dtype=self.dtype), self.device)

    def sync(self) -> None:
        jax.block_until_ready(self.params)

    # -- measurement -------------------------------------------------------------------
    def terms(self, x: Any, eps: np.ndarray) -> Terms:
        with self._scope():
            recon, kl = model.loss_terms(self.params, self.put(x), self.put(eps), self.spec)
        return Terms(recon=np.asarray(recon), kl=np.asarray(kl))

    def grads(self, x: Any, eps: np.ndarray, term: Term) -> dict[str, np.ndarray]:
        spec = self.spec

        def value(params: dict[str, jax.Array], x: jax.Array, eps: jax.Array) -> jax.Array:
            recon, kl = model.loss_terms(params, x, eps, spec)
            return {"recon": recon, "kl": kl, "loss": recon + kl}[term].mean()

        with self._scope():
            gs = jax.grad(value)(self.params, self.put(x), self.put(eps))
        return {k: np.array(gs[k], copy=True) for k in self.params}

    def log_likelihood(self, x: Any, k: int, seed: int) -> np.ndarray:
        with self._scope():
            xd = self.put(x)
            key = jax.random.key(seed)
            chunks = []
            for start in range(0, k, 100):
                kk = min(100, k - start)
                key, sub = jax.random.split(key)
                eps = jax.random.normal(sub, (kk, xd.shape[0], self.spec.latent), dtype=self.dtype)
                chunks.append(self._iwae_fn(self.params, xd, eps))
            log_w = jnp.concatenate(chunks, axis=0)
            out = jax.nn.logsumexp(log_w, axis=0) - math.log(k)
        return np.asarray(out)

    # -- training ----------------------------------------------------------------------
    def _loss(self, params: dict[str, jax.Array], x: jax.Array, eps: jax.Array) -> jax.Array:
        recon, kl = model.loss_terms(params, x, eps, self.spec)
        return (recon + kl).mean()

    def _build_step(self) -> tuple[Any, Any, Any]:
        def update(params: Any, opt_state: Any, x: jax.Array, eps: jax.Array) -> tuple[Any, Any, jax.Array]:
            loss, g = jax.value_and_grad(self._loss)(params, x, eps)
            updates, opt_state = self.opt.update(g, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        def step(params: Any, opt_state: Any, key: jax.Array, x: jax.Array) -> tuple[Any, Any, jax.Array, jax.Array]:
            self._compiles += 1  # runs once per trace under jit (eager: every call, not reported)
            key, sub = jax.random.split(key)
            eps = jax.random.normal(sub, (x.shape[0], self.spec.latent), dtype=self.dtype)
            params, opt_state, loss = update(params, opt_state, x, eps)
            return params, opt_state, key, loss

        def step_eps(params: Any, opt_state: Any, x: jax.Array, eps: jax.Array) -> tuple[Any, Any, jax.Array]:
            self._compiles += 1
            return update(params, opt_state, x, eps)

        iwae = functools.partial(model.iwae_log_weights, spec=self.spec)
        if self.runtime.mode == "eager":
            return step, step_eps, iwae
        return (
            jax.jit(step, donate_argnums=(0, 1, 2)),
            jax.jit(step_eps, donate_argnums=(0, 1)),
            jax.jit(iwae),
        )

    def train_step(self, x: Any, eps: np.ndarray | None = None) -> jax.Array:
        with self._scope():
            xd = self.put(x)
            if eps is None:
                self.params, self.opt_state, self.key, loss = self._step_fn(self.params, self.opt_state, self.key, xd)
            else:
                self.params, self.opt_state, loss = self._step_eps_fn(self.params, self.opt_state, xd, self.put(eps))
        return loss

    def compile_count(self) -> int:
        """Executables compiled for the step (jit cache entries), which also counts a
        recompilation that needs no retrace (e.g. a change of committedness or sharding)."""
        if self.runtime.mode == "eager":
            return 0
        sizes = [getattr(f, "_cache_size", None) for f in (self._step_fn, self._step_eps_fn)]
        if all(callable(size) for size in sizes):
            return max(self._compiles, sum(size() for size in sizes))  # type: ignore[misc]
        return self._compiles

    def version(self) -> dict[str, Any]:
        import jaxlib

        info: dict[str, Any] = {
            "framework": "jax",
            "framework_version": jax.__version__,
            "jaxlib_version": jaxlib.__version__,
            "optax_version": optax.__version__,
            "device": str(self.device),
            "platform": self.device.platform,
            "x64": bool(jax.config.read("jax_enable_x64")),
            "matmul_precision": self.precision,
            "allow_tf32": self.runtime.allow_tf32,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
        }
        info.update(
            device_name=self.device.device_kind,
            device_count=len(jax.devices(self.device.platform)),
        )
        return info


BACKEND = JaxBackend

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
        # canonical order: a jitted step returns the dict with its keys sorted (pytree order)
        return {k: np.array(self.params[k], copy=True) for k in self.spec.param_shapes()}

    # -- optimizer state -----------------------------------------------------------------
    # optax.adam's state is (ScaleByAdamState(count, mu, nu), EmptyState()): count is int32
    # (steps taken), mu/nu the uncorrected moments as dicts like the params. optax.sgd with
    # momentum keeps (TraceState(trace), EmptyState()), trace = g + momentum*trace; without
    # momentum only empty states.
    def _state_node(self, opt_state: Any) -> Any:
        """The ScaleByAdamState / TraceState inside the chain's state (None for plain SGD)."""
        kind = optax.ScaleByAdamState if self.optim.name == "adam" else optax.TraceState
        found = [s for s in opt_state if isinstance(s, kind)]
        return found[0] if found else None

    def get_state(self) -> dict[str, np.ndarray]:
        """The optimizer state under canonical names (see `harness.api.Backend.get_state`)."""
        node = self._state_node(self.opt_state)
        if node is None:
            return {}
        names = list(self.spec.param_shapes())  # canonical order (optax's dicts come back sorted)
        if self.optim.name == "adam":
            out: dict[str, np.ndarray] = {"adam.step": np.array(node.count, dtype=np.int64)}
            out.update({f"adam.m.{k}": np.array(node.mu[k], copy=True) for k in names})
            out.update({f"adam.v.{k}": np.array(node.nu[k], copy=True) for k in names})
            return out
        return {f"sgd.momentum.{k}": np.array(node.trace[k], copy=True) for k in names}

    def set_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Load a canonical optimizer state (see `harness.api.Backend.set_state`) as a pytree
        of the structure, dtypes and (committed) device that `_init_opt_state` gives: the
        jitted step reuses its executable."""
        arrays = _check_state(state, state_shapes(self.spec, self.optim), self.runtime.dtype)
        with self._scope():
            template = self._init_opt_state()
        node = self._state_node(template)
        if node is None:
            self.opt_state = template
            return

        def host(name: str, like: Any) -> np.ndarray:
            # a fresh host copy of the template leaf's dtype: the step donates these buffers
            return np.array(arrays[name], dtype=like.dtype, copy=True)

        names = list(self.spec.param_shapes())
        if self.optim.name == "adam":
            count_dtype = np.dtype(node.count.dtype)
            if arrays["adam.step"] > np.iinfo(count_dtype).max:
                raise ValueError(
                    f"optimizer-state key 'adam.step' = {int(arrays['adam.step'])} exceeds optax's "
                    f"{count_dtype} step count (max {np.iinfo(count_dtype).max})"
                )
            new = node._replace(
                count=host("adam.step", node.count),
                mu={k: host(f"adam.m.{k}", node.mu[k]) for k in names},
                nu={k: host(f"adam.v.{k}", node.nu[k]) for k in names},
            )
        else:
            new = node._replace(trace={k: host(f"sgd.momentum.{k}", node.trace[k]) for k in names})
        with self._scope():
            self.opt_state = jax.device_put(tuple(new if s is node else s for s in template), self.device)

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


BACKEND = JaxBackend

"""JaxBackend: the VAE's primitives in JAX (eager op by op, or jax.jit) under
`impls.base.BackendBase`, which implements the `Backend` protocol on top of them."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, NamedTuple

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from harness import vae  # noqa: E402
from harness.api import Backend, Term  # noqa: E402
from harness.spec import LOSS_SCALE_GROWTH_STEPS, LOSS_SCALE_INIT, wants_gpu  # noqa: E402
from impls.base import BackendBase, F, StepDrawn, StepGiven, VersionCommon, pick_term  # noqa: E402
from impls.jax import ops  # noqa: E402


def pick_device(device: str) -> Any:
    """"cpu" | "gpu" | "auto" -> the jax device, by the one rule (`harness.spec.wants_gpu`)."""
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        gpus = []
    return gpus[0] if wants_gpu("jax", device, len(gpus), "is jax[cuda] installed?") else jax.devices("cpu")[0]


DTYPES: dict[str, np.dtype] = {"float32": np.dtype(np.float32), "float64": np.dtype(np.float64)}


class LossScale(NamedTuple):
    """Dynamic loss scaling for float16 (JAX has none of its own: this is the rule of torch's
    GradScaler and Keras' LossScaleOptimizer, `harness.spec.LOSS_SCALE_INIT`): a non-finite
    gradient skips the step and halves the scale; `LOSS_SCALE_GROWTH_STEPS` finite steps in a
    row double it. A pytree of device scalars, carried through the jitted step."""

    scale: jax.Array  # float32
    good: jax.Array  # int32: finite steps since the scale last changed
    skipped: jax.Array  # int32: steps skipped so far

    @staticmethod
    def initial() -> LossScale:
        return LossScale(jnp.float32(LOSS_SCALE_INIT), jnp.int32(0), jnp.int32(0))

    def next(self, finite: jax.Array) -> LossScale:
        grow = self.good + 1 == LOSS_SCALE_GROWTH_STEPS
        scale = jnp.where(finite, jnp.where(grow, self.scale * 2, self.scale), self.scale / 2)
        good = jnp.where(finite & ~grow, self.good + 1, 0)
        return LossScale(scale, good.astype(jnp.int32), self.skipped + (~finite).astype(jnp.int32))


class JaxBackend(BackendBase):
    """The VAE in JAX. Modes: "eager" (op by op), "jit" (the whole step, noise draw
    included, one jax.jit with parameters, optimizer state and key donated; the IWAE
    log-weights jitted too).

    Matmul precision ("highest", or "default" when `allow_tf32`) is baked into every traced
    function (`jax.default_matmul_precision` inside it), so a jitted call needs no context;
    eager calls and the methods off the hot path run under `jax.default_device(device)` and
    that precision as contexts, scoped to the call.

    Process-wide side effects: a float64 backend turns on `jax_enable_x64` for the whole
    process, for good (JAX has no cheap scoped form: x64 is part of every jit cache key and
    of how arrays are created, so a per-call scope would cost time on every step and a
    missed one would silently give float32). float32 backends are unaffected because every
    dtype here is explicit. On import, XLA_PYTHON_CLIENT_PREALLOCATE=false unless already
    set (effective only before JAX initialises its GPU client).
    """

    name: ClassVar[str] = "jax"
    ops_module: ClassVar[Any] = ops
    device: Any
    precision: str
    dtype: np.dtype
    params: dict[str, jax.Array]
    key: jax.Array
    opt: optax.GradientTransformation
    opt_state: Any

    # -- setup -----------------------------------------------------------------------------------
    def _setup(self) -> None:
        runtime = self.runtime
        if runtime.dtype == "float64":
            # process-wide (see the class docstring); float32 paths stay explicit below
            jax.config.update("jax_enable_x64", True)
        self.device = pick_device(runtime.device)
        self._gpu = self.device.platform != "cpu"
        # "highest": full float32 matmuls on GPU; "default" lets XLA use TF32 there
        self.precision = "default" if runtime.allow_tf32 else "highest"
        self.dtype = DTYPES[self.policy.param]
        self._jitted: dict[str, list[Any]] = {what: [] for what in self._compiles}
        with self._scope():
            self.params = {
                k: jax.device_put(jnp.zeros(s, dtype=self.dtype), self.device) for k, s in self._native_shapes.items()
            }
            self.key = jax.device_put(jax.random.key(runtime.seed), self.device)
        o = self.optim
        if o.name == "adam":
            self.opt = optax.adam(learning_rate=o.lr, b1=o.beta1, b2=o.beta2, eps=o.eps, eps_root=0.0)
        else:
            self.opt = optax.sgd(learning_rate=o.lr, momentum=o.momentum or None)
        with self._scope():
            self.opt_state = self._init_opt_state()
            self.loss_scale = jax.device_put(LossScale.initial(), self.device) if self.policy.loss_scaling else None

    @contextlib.contextmanager
    def _scope(self) -> Iterator[None]:
        """Our device as the default one and our matmul precision, for the duration."""
        with jax.default_device(self.device), jax.default_matmul_precision(self.precision):
            yield

    def _init_opt_state(self) -> Any:
        # committed to our device like the params: an uncommitted leaf (optax's step count)
        # made the jitted step compile a second executable on its second call
        return jax.device_put(self.opt.init(self.params), self.device)

    # -- data ------------------------------------------------------------------------------------
    def _to_device(self, a: np.ndarray) -> jax.Array:
        return jax.device_put(a, self.device)

    def _tensor_dtype(self, x: Any) -> np.dtype | None:
        return x.dtype if isinstance(x, jax.Array) else None

    def _from_device(self, t: Any) -> np.ndarray:
        return np.array(t, copy=True)

    def sync(self) -> None:
        """Block until every queued device computation of this backend has finished."""
        jax.block_until_ready(self.params)  # every step writes them: its last output

    # -- parameters ------------------------------------------------------------------------------
    def _set_params(self, params: dict[str, np.ndarray]) -> None:
        with self._scope():
            # fresh host copies (check_params made them): the step donates these buffers
            self.params = {k: jax.device_put(params[k], self.device) for k in self._param_shapes}
            self.opt_state = self._init_opt_state()

    def _get_params(self) -> dict[str, np.ndarray]:
        return {k: self._from_device(v) for k, v in self.params.items()}

    # -- optimizer state -------------------------------------------------------------------------
    # optax.adam's state is (ScaleByAdamState(count, mu, nu), EmptyState()): count is int32
    # (steps taken), mu/nu the uncorrected moments as dicts like the params. optax.sgd with
    # momentum keeps (TraceState(trace), EmptyState()), trace = g + momentum*trace; without
    # momentum only empty states.
    def _state_node(self, opt_state: Any) -> Any:
        """The ScaleByAdamState / TraceState inside the chain's state (None for plain SGD)."""
        kind = optax.ScaleByAdamState if self.optim.name == "adam" else optax.TraceState
        found = [s for s in opt_state if isinstance(s, kind)]
        return found[0] if found else None

    def _get_state(self) -> dict[str, np.ndarray]:
        node = self._state_node(self.opt_state)
        if node is None:
            return {}
        if self.optim.name == "adam":
            out: dict[str, np.ndarray] = {"adam.step": np.array(node.count, dtype=np.int64)}
            out.update({f"adam.m.{k}": self._from_device(node.mu[k]) for k in self._param_shapes})
            out.update({f"adam.v.{k}": self._from_device(node.nu[k]) for k in self._param_shapes})
            return out
        return {f"sgd.momentum.{k}": self._from_device(node.trace[k]) for k in self._param_shapes}

    def _set_state(self, state: dict[str, np.ndarray]) -> None:
        # a pytree of the structure, dtypes and (committed) device that `_init_opt_state`
        # gives: the jitted step reuses its executable
        with self._scope():
            template = self._init_opt_state()
        node = self._state_node(template)
        if node is None:
            self.opt_state = template
            return

        def host(name: str, like: Any) -> np.ndarray:
            # a fresh host copy of the template leaf's dtype: the step donates these buffers
            return np.array(state[name], dtype=like.dtype, copy=True)

        names = list(self._param_shapes)
        if self.optim.name == "adam":
            count_dtype = np.dtype(node.count.dtype)
            if state["adam.step"] > np.iinfo(count_dtype).max:
                raise ValueError(
                    f"optimizer-state key 'adam.step' = {int(state['adam.step'])} exceeds optax's "
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

    # -- measurement -----------------------------------------------------------------------------
    def _loss_terms(self, x: jax.Array, eps: jax.Array) -> tuple[np.ndarray, np.ndarray]:
        recon, kl = vae.loss_terms(self.ops, self.params, x, eps, self.spec)
        return self._from_device(recon), self._from_device(kl)

    def _encode(self, x: jax.Array) -> tuple[np.ndarray, np.ndarray]:
        mu, logvar = vae.encode(self.ops, self.params, x, self.spec)
        return self._from_device(mu), self._from_device(logvar)

    def _grads(self, x: jax.Array, eps: jax.Array, term: Term) -> dict[str, np.ndarray | None]:
        spec = self.spec

        def value(params: dict[str, jax.Array], x: jax.Array, eps: jax.Array) -> jax.Array:
            recon, kl = vae.loss_terms(self.ops, params, x, eps, spec)
            return self._scaled(pick_term(term, recon, kl).mean())

        # jax.grad gives zeros (never None) where no gradient flows
        gs = jax.grad(value)(self.params, x, eps)
        return {k: self._from_device(gs[k]) for k in self._param_shapes}

    def _measuring(self) -> dict[str, Any]:
        """The jitted gradients of `iwae_grads` and `local_grads`, built on first use. Jitted in
        every mode (as TensorFlow's per-example gradient is always a tf.function): op by op, a
        first call compiles each of the ~100 primitives of a vectorised gradient separately,
        per shape (seconds). Traced once per shape, not counted by `compiles_per_function`."""
        fns: dict[str, Any] | None = getattr(self, "_measure_fns", None)
        if fns is not None:
            return fns
        spec, precision = self.spec, self.precision

        def batch(params: dict[str, jax.Array], x: jax.Array, eps: jax.Array) -> Any:
            with jax.default_matmul_precision(precision):
                return jax.grad(lambda p: -vae.iwae_bound(self.ops, p, x, eps, spec).mean())(params)

        def one(params: dict[str, jax.Array], xb: jax.Array, eb: jax.Array) -> jax.Array:
            with jax.default_matmul_precision(precision):
                return -vae.iwae_bound(self.ops, params, xb, eb, spec)  # xb (D,), eb (K, L): a scalar

        def local(params: dict[str, jax.Array], x: jax.Array, mu: jax.Array, logvar: jax.Array, eps: jax.Array) -> Any:
            def total(q: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
                recon, kl = vae.terms_at(self.ops, params, x, q[0], q[1], eps, spec)
                return (recon + kl).sum(), (recon, kl)

            with jax.default_matmul_precision(precision):
                (_, aux), g = jax.value_and_grad(total, has_aux=True)((mu, logvar))
            return aux, g

        fns = {
            "batch": jax.jit(batch),
            "per_example": jax.jit(jax.vmap(jax.grad(one), in_axes=(None, 0, 1))),  # one example's gradient, vectorised
            "local": jax.jit(local),
        }
        self._measure_fns = fns
        return fns

    def _iwae_grads(self, x: jax.Array, eps: jax.Array, per_example: bool) -> dict[str, np.ndarray | None]:
        gs = self._measuring()["per_example" if per_example else "batch"](self.params, x, eps)
        return {k: self._from_device(gs[k]) for k in self._param_shapes}

    def _local_grads(self, x: jax.Array, mu: jax.Array, logvar: jax.Array, eps: jax.Array) -> tuple[np.ndarray, ...]:
        (recon, kl), (g_mu, g_logvar) = self._measuring()["local"](self.params, x, mu, logvar, eps)
        return tuple(self._from_device(t) for t in (recon, kl, g_mu, g_logvar))

    def _iwae_rng(self, seed: int) -> jax.Array:
        return jax.random.key(seed)

    def _iwae_log_weights(self, x: jax.Array, kk: int, rng: jax.Array) -> tuple[np.ndarray, jax.Array]:
        rng, sub = jax.random.split(rng)
        eps = jax.random.normal(sub, (kk, x.shape[0], self.spec.latent), dtype=self.dtype)
        return self._from_device(self._log_weights(self.params, x, eps)), rng

    # -- compiled functions ----------------------------------------------------------------------
    def _compile(self, fn: F, what: str, *, donate: tuple[int, ...] = ()) -> F:
        """jax.jit of `fn` (arguments `donate` donated) in jit mode."""
        if not self.compiled:
            return fn
        jitted = jax.jit(self._counting(fn, what), donate_argnums=donate)
        self._jitted[what].append(jitted)
        return jitted  # type: ignore[return-value]

    def _compile_count(self, what: str) -> int:
        """Executables compiled (jit cache entries), which also counts a recompilation that
        needs no retrace (e.g. a change of committedness or sharding)."""
        sizes = [getattr(f, "_cache_size", None) for f in self._jitted[what]]
        if sizes and all(callable(size) for size in sizes):
            return max(self._compiles[what], sum(size() for size in sizes))  # type: ignore[misc]
        return self._compiles[what]

    def _build_step(self) -> tuple[StepDrawn, StepGiven]:
        spec, opt, dtype, precision = self.spec, self.opt, self.dtype, self.precision

        def loss_fn(params: dict[str, jax.Array], x: jax.Array, eps: jax.Array) -> jax.Array:
            recon, kl = vae.loss_terms(self.ops, params, x, eps, spec)
            return pick_term("loss", recon, kl).mean()

        def update(params: Any, opt_state: Any, ls: LossScale | None, x: jax.Array,
                   eps: jax.Array) -> tuple[Any, Any, LossScale | None, jax.Array]:
            with jax.default_matmul_precision(precision):  # baked into the trace (HLO dot precision)
                if ls is None:
                    loss, g = jax.value_and_grad(loss_fn)(params, x, eps)
                else:  # float16: the scaled loss differentiated, the gradient unscaled
                    scale = ls.scale
                    scaled, g = jax.value_and_grad(lambda p: loss_fn(p, x, eps) * scale)(params)
                    loss, g = scaled / scale, jax.tree.map(lambda t: t / scale, g)
            updates, new_state = opt.update(g, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            if ls is not None:  # a non-finite gradient: the step is skipped
                finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(t)) for t in jax.tree.leaves(g)]))
                keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
                new_params, new_state = jax.tree.map(keep, new_params, params), jax.tree.map(keep, new_state, opt_state)
                ls = ls.next(finite)
            return new_params, new_state, ls, loss

        def drawn_update(params: Any, opt_state: Any, ls: LossScale | None, key: jax.Array,
                         x: jax.Array) -> tuple[Any, Any, LossScale | None, jax.Array, jax.Array]:
            key, sub = jax.random.split(key)
            eps = jax.random.normal(sub, (x.shape[0], spec.latent), dtype=dtype)
            params, opt_state, ls, loss = update(params, opt_state, ls, x, eps)
            return params, opt_state, ls, key, loss

        given = self._compile(update, "step", donate=(0, 1))
        drawn = self._compile(drawn_update, "step", donate=(0, 1, 3))

        # the state lives on the backend: each call passes it in and stores what comes back
        def step_given(x: jax.Array, eps: jax.Array) -> jax.Array:
            self.params, self.opt_state, self.loss_scale, loss = given(self.params, self.opt_state, self.loss_scale, x, eps)
            return loss

        def step_drawn(x: jax.Array) -> jax.Array:
            self.params, self.opt_state, self.loss_scale, self.key, loss = drawn(
                self.params, self.opt_state, self.loss_scale, self.key, x)
            return loss

        if self.compiled:  # all inputs are committed to our device: no per-call context
            return step_drawn, step_given
        scope = self._scope

        def eager_drawn(x: jax.Array) -> jax.Array:
            with scope():
                return step_drawn(x)

        def eager_given(x: jax.Array, eps: jax.Array) -> jax.Array:
            with scope():
                return step_given(x, eps)

        return eager_drawn, eager_given

    def _build_log_weights(self) -> Callable[[dict[str, jax.Array], jax.Array, jax.Array], jax.Array]:
        spec, precision = self.spec, self.precision

        def log_weights(params: dict[str, jax.Array], x: jax.Array, eps: jax.Array) -> jax.Array:
            with jax.default_matmul_precision(precision):
                return vae.iwae_log_weights(self.ops, params, x, eps, spec)

        return self._compile(log_weights, "log_likelihood")

    # -- record ----------------------------------------------------------------------------------
    def _version_common(self) -> VersionCommon:
        return VersionCommon(
            framework_version=jax.__version__,
            device=str(self.device),
            device_name="cpu" if not self._gpu else str(self.device.device_kind),
            device_count=len(jax.devices(self.device.platform)),
            device_kind="gpu" if self._gpu else "cpu",
            # XLA's CPU client sizes its pool to the CPUs this process may run on (it has no
            # thread-count setting: the worker restricts the affinity instead)
            threads=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
            matmul_precision=self.precision,
            allow_tf32=self.runtime.allow_tf32,
        )

    def _loss_scale(self) -> tuple[float, int]:
        assert self.loss_scale is not None
        return float(self.loss_scale.scale), int(self.loss_scale.skipped)

    def _version_extra(self) -> dict[str, Any]:
        import jaxlib

        return {
            "jaxlib_version": jaxlib.__version__,
            "optax_version": optax.__version__,
            "x64": bool(jax.config.read("jax_enable_x64")),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
        }


BACKEND: type[Backend] = JaxBackend

"""The framework-neutral half of every backend: `BackendBase` implements the `Backend`
protocol once, in NumPy, on top of a few primitives that each framework supplies.

This module imports NumPy and `harness` only, never a framework. `impls/<fw>/backend.py`
subclasses `BackendBase` and overrides only the primitives (the methods at the end of the
class, all but `sync` private; those without a default raise NotImplementedError), the same
names in all three backend files, in the same order:

    setup           _setup                     devices, parameters, RNG, optimizer
    data            _to_device, _tensor_dtype, _from_device, sync, _scope
    parameters      _set_params, _get_params
    optimizer state _get_state, _set_state
    measurement     _loss_terms, _grads, _iwae_grads, _local_grads, _iwae_rng, _iwae_log_weights
    training        _build_step, _build_log_weights, _compile
    record          _version_common, _version_extra

What is decided here, once: argument validation (dtype, device, mode, threads, term, k),
`put`'s dtype policy, the zero-filling of unused gradients (and the noise-shape check of
`iwae_grads`), the noise dispatch of
`train_step`, the IWAE chunking with a streaming float64 log-sum-exp on the host, the
compile counters, the canonical optimizer-state layout and its validation, and the keys of
`version()`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import types
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypedDict, TypeVar

import numpy as np

from harness.api import TERMS, ModelSpec, OptimSpec, RuntimeSpec, Term, Terms, resolve_mode
from harness.models.base import Param
from harness.spec import Policy

#: IWAE samples evaluated per chunk: bounds the device memory of `log_likelihood` to
#: IWAE_CHUNK x batch x (widest layer) activations, whatever k is...
IWAE_CHUNK = 100
#: ...and to this many activation values (samples x batch x widest layer): 100 samples of the
#: conv VAE's 28x28x32 layer on 1,000 test images are 2.5e9 floats, and TensorFlow's XLA step died
#: of std::bad_alloc on a 24 GiB machine (measured); this keeps 10 samples a chunk there and the
#: MLPs' 100
IWAE_BUDGET = 2**28


def iwae_chunk(spec: ModelSpec, rows: int) -> int:
    """Samples per `log_likelihood` chunk for `rows` examples: IWAE_CHUNK, fewer where the model's
    widest activation (its kind's `layers`, and the output) would exceed IWAE_BUDGET values."""
    layers = getattr(spec.module, "layers", None)
    widest = max([spec.x_dim, *(math.prod(layer.in_shape) for layer in (layers(spec) if layers else []))])
    return max(1, min(IWAE_CHUNK, IWAE_BUDGET // max(rows * widest, 1)))

#: float16's `grads`: the gradient of the term x 2^10, divided by it (a power of two: exact for
#: every value that neither underflows nor overflows), as the training step scales its loss: the
#: small cotangents of an unscaled float16 backward fall below float16's normal range (6e-5) and
#: lose digits (measured: the conv VAE's decoder.0 gradient 38 u off NumPy's unscaled, within
#: 20 u scaled); 2^10, not the step's dynamic 2^15, since nothing here skips an overflow
GRADS_LOSS_SCALE = 2.0**10

#: The keys every backend's `version()` reports (framework-specific extras may follow).
VERSION_KEYS: tuple[str, ...] = (
    "framework",
    "framework_version",
    "mode",
    "dtype",
    "device",
    "device_name",
    "device_count",
    "device_kind",
    "threads",
    "matmul_precision",
    "allow_tf32",
)
#: Never a backend key: the record's env already holds the OS string under "platform".
RESERVED_VERSION_KEYS: frozenset[str] = frozenset({"platform"})

F = TypeVar("F", bound=Callable[..., Any])
StepDrawn = Callable[[Any], Any]
StepGiven = Callable[[Any, Any], Any]


class VersionCommon(TypedDict):
    """What each framework reports for the common `version()` keys (the rest is neutral)."""

    framework_version: str
    device: str  # the framework's own name for it, e.g. "cpu", "cuda", "/GPU:0", "TFRT_CPU_0"
    device_name: str  # "cpu" on a CPU (the record's env has the CPU model), else the GPU's name
    device_count: int  # devices of that kind the framework sees
    device_kind: str  # "cpu" | "gpu"
    threads: int  # intra-op threads the framework uses
    matmul_precision: str  # torch: float32_matmul_precision; jax: default|highest; tf: tf32|float32
    allow_tf32: bool


# -- validation -------------------------------------------------------------------------------
def check_runtime(framework: str, runtime: RuntimeSpec) -> RuntimeSpec:
    """`runtime` (its fields validated when it was built) with its mode checked against
    `framework` and the alias "compiled" resolved; a ConfigError (a ValueError) naming the
    mode and the choices otherwise."""
    mode = resolve_mode(framework, runtime.mode)
    return runtime if mode == runtime.mode else dataclasses.replace(runtime, mode=mode)


def formulation(ops: Any, runtime: RuntimeSpec | str) -> Any:
    """The framework's ops as this runtime asks: `conv_transpose=dilated` puts the ops'
    `conv2d_transpose_dilated` (the same numbers, its definition computed directly) in place of
    `conv2d_transpose` (the framework's own op); a mixed-precision dtype (`harness.spec.MIXED`)
    adds the policy's `compute` and `accumulate` type names, which `harness.vae` casts to."""
    transpose = runtime if isinstance(runtime, str) else runtime.conv_transpose
    policy = None if isinstance(runtime, str) else Policy.of(runtime.dtype)
    extra: dict[str, Any] = {}
    if transpose != "native":
        extra["conv2d_transpose"] = ops.conv2d_transpose_dilated
    if policy is not None and policy.mixed:
        extra.update(compute=policy.compute, accumulate=policy.accumulate)
        for name in BIASED_OPS:
            extra[name] = _bias_accumulated(ops, extra.get(name, getattr(ops, name)), policy)
    if not extra:
        return ops
    return types.SimpleNamespace(**{**{k: getattr(ops, k) for k in dir(ops) if not k.startswith("__")}, **extra})


#: the ops that add a bias: under a mixed policy the bias is added in the accumulation type
BIASED_OPS = ("dense", "conv2d", "conv2d_transpose")


def _bias_accumulated(ops: Any, op: Callable[..., Any], policy: Policy) -> Callable[..., Any]:
    """`op` (a dense layer or convolution, computed in the low type) with its bias added in the
    accumulation type and the sum cast back: the bias's gradient, a sum over the batch (and an
    image's pixels: 32 x 784 terms for the conv VAE's output bias), is then accumulated in float32.
    Added in the low type, XLA's CPU backend sums that gradient in the low type (measured: JAX's
    bfloat16 gradient of the conv VAE's output bias 97% off NumPy's, and float16's overflows)."""

    def biased(x: Any, w: Any, b: Any, *rest: Any) -> Any:
        y = ops.cast(op(x, w, None, *rest), policy.accumulate)
        return ops.cast(ops.bias_add(y, b), policy.compute)  # b: float32 (`harness.vae` leaves biases uncast)

    return biased


def shape_of(x: Any) -> tuple[int, ...] | None:
    """The shape of a NumPy array, a framework tensor or a nested list (None if it has none)."""
    shape = getattr(x, "shape", None)
    if shape is None:
        try:
            shape = np.shape(x)
        except ValueError:  # ragged: `put` says so
            return None
    try:
        return tuple(int(d) for d in shape)
    except (TypeError, ValueError):  # an unknown dimension (a symbolic shape)
        return None


def check_term(term: object) -> Term:
    """`term` if it names a loss part, else ValueError."""
    if term not in TERMS:
        raise ValueError(f"term must be one of {', '.join(TERMS)}, got {term!r}")
    return term  # type: ignore[return-value]


def check_k(k: object) -> int:
    """`k` if it is an int >= 1 (NumPy integers included), else ValueError."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k (IWAE samples per example) must be an int >= 1, got {k!r}")
    return int(k)


def dtype_name(d: Any) -> str:
    """"float32" for a NumPy, TensorFlow or torch float32 dtype (and so on)."""
    name = getattr(d, "name", None)  # NumPy and TensorFlow dtypes
    return name if isinstance(name, str) else str(d).removeprefix("torch.")


def pick_term(term: Term, recon: Any, kl: Any) -> Any:
    """The per-example loss part `term` from (recon, kl), for arrays of any framework."""
    if term == "recon":
        return recon
    if term == "kl":
        return kl
    return recon + kl


# -- optimizer state --------------------------------------------------------------------------
def state_shapes(spec: ModelSpec, optim: OptimSpec) -> dict[str, tuple[int, ...]]:
    """Canonical optimizer-state names and shapes, in order (see `Backend.get_state`)."""
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


def check_state(state: Mapping[str, Any], expected: dict[str, tuple[int, ...]], dtype: str) -> dict[str, np.ndarray]:
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


def check_params(params: Mapping[str, Any], expected: dict[str, tuple[int, ...]], dtype: str) -> dict[str, np.ndarray]:
    """Validate canonical weights against `expected` names and shapes; return fresh host
    copies in `dtype`, in canonical order. Raises ValueError naming the offending key."""
    unknown = [k for k in params if k not in expected]
    missing = [k for k in expected if k not in params]
    if unknown or missing:
        raise ValueError(
            f"parameters do not match the model: unknown {unknown}, missing {missing}; "
            f"expected: {', '.join(f'{k} {s}' for k, s in expected.items())}"
        )
    out: dict[str, np.ndarray] = {}
    for k, shape in expected.items():
        a = np.array(params[k], dtype=dtype, copy=True)
        if a.shape != shape:
            raise ValueError(f"parameter {k!r} has shape {a.shape}, expected {shape}")
        out[k] = a
    return out


# -- IWAE -------------------------------------------------------------------------------------
class StreamingLogSumExp:
    """log(sum_k exp(w_k)) over k, fed in chunks of shape (kk, B), in float64 on the host:
    a running maximum m and a running sum s = sum exp(w - m) per example, so memory stays
    O(B) whatever k is. -inf weights contribute nothing; +inf and NaN propagate."""

    def __init__(self) -> None:
        self.m = np.zeros(0)
        self.s = np.zeros(0)
        self.n = 0

    @staticmethod
    def _shift(m: np.ndarray) -> np.ndarray:
        return np.where(np.isfinite(m), m, 0.0)  # no finite maximum (yet): shift by 0

    def add(self, w: np.ndarray) -> None:
        w = np.asarray(w, dtype=np.float64)
        if w.ndim != 2 or (self.n and w.shape[1] != self.m.shape[0]):
            raise ValueError(f"log-weights must have shape (samples, batch), got {w.shape}")
        if not self.n:
            self.m = np.full(w.shape[1], -np.inf)
            self.s = np.zeros(w.shape[1])
        m = np.maximum(self.m, w.max(axis=0, initial=-np.inf))
        new = self._shift(m)
        with np.errstate(invalid="ignore", over="ignore"):
            # s was relative to the old maximum (0 where there was none: then s = 0 and the
            # factor exp(-inf) = 0; an old +inf or NaN maximum propagates)
            self.s = self.s * np.exp(self.m - new) + np.exp(w - new).sum(axis=0)
        self.m = m
        self.n += w.shape[0]

    def result(self) -> np.ndarray:
        """log(sum exp(w)) over everything added, per example."""
        if not self.n:
            raise ValueError("no log-weights were added")
        with np.errstate(divide="ignore", invalid="ignore"):
            return self._shift(self.m) + np.log(self.s)


# -- the skeleton -----------------------------------------------------------------------------
class BackendBase:
    """The `harness.api.Backend` protocol, once, over framework primitives.

    Subclasses set `name` (a key of `harness.api.FRAMEWORK_MODES`) and implement the
    primitives; they do not override the public methods. Construction validates the runtime
    (dtype float32|float64|bfloat16|float16, device cpu|gpu|auto, the framework's modes or "compiled",
    threads >= 0: ValueError naming the argument otherwise), then calls `_setup()`, then
    `_build_step()` and `_build_log_weights()`.
    """

    name: ClassVar[str]
    #: the framework's primitive ops (`impls.<fw>.ops`): what `harness.vae` and the model kinds run on
    ops_module: ClassVar[Any]
    #: those ops in the formulation the runtime asks for (`formulation`)
    ops: Any
    spec: ModelSpec
    optim: OptimSpec
    runtime: RuntimeSpec
    #: the framework's dtype object for `runtime.dtype` (set by `_setup`)
    dtype: Any

    def __init__(self, spec: ModelSpec, optim: OptimSpec, runtime: RuntimeSpec) -> None:
        self.runtime = check_runtime(self.name, runtime)
        self.ops = formulation(type(self).ops_module, self.runtime)
        self.spec, self.optim = spec, optim
        #: what it computes in; `np_dtype` is the parameters' (and host arrays') type
        self.policy = Policy.of(self.runtime.dtype)
        self.np_dtype: np.dtype = np.dtype(self.policy.param)
        self.compiled: bool = self.runtime.mode != "eager"
        self._param_shapes = spec.param_shapes()
        # canonical layout outside, the framework's own inside (`ops.to_native`): the shapes
        # the backend creates its tensors in
        self._params_desc: dict[str, Param] = spec.params()
        self._native_shapes = {k: self.ops.to_native(p, np.empty(p.shape)).shape for k, p in self._params_desc.items()}
        # traces/compilations, by function: incremented by the frameworks' `_compile`
        self._compiles: dict[str, int] = {"step": 0, "log_likelihood": 0}
        self._setup()
        self._step_drawn, self._step_given = self._build_step()
        self._log_weights = self._build_log_weights()

    # -- parameters ---------------------------------------------------------------------------
    def set_params(self, params: Mapping[str, np.ndarray]) -> None:
        """Load canonical weights (`encoder.<i>.weight` in x out, ...): every canonical name,
        nothing else, in the canonical shape (ValueError otherwise). Resets the optimizer
        state to zero (step 0)."""
        self._set_params(self._native(check_params(params, self._param_shapes, self.policy.param)))

    def get_params(self) -> dict[str, np.ndarray]:
        """Host copies of the weights, canonical names and order, in the backend's dtype."""
        got = self._get_params()  # a framework may hold them in another order (JAX's pytrees sort their keys)
        return self._canonical({k: got[k] for k in self._param_shapes})

    def _native(self, arrays: Mapping[str, np.ndarray], prefix: str = "") -> dict[str, np.ndarray]:
        """Canonical arrays named `<prefix><param>` (parameters, their gradients or moments) in the
        framework's layout (contiguous copies); other names (a step count) pass as they are."""
        out = {}
        for k, a in arrays.items():
            p = self._params_desc.get(k[len(prefix):]) if k.startswith(prefix) else None
            out[k] = a if p is None else np.ascontiguousarray(self.ops.to_native(p, a))
        return out

    def _canonical(self, arrays: Mapping[str, np.ndarray], prefix: str = "") -> dict[str, np.ndarray]:
        """The inverse of `_native`, in canonical order of the names given (leading axes, such as
        per-example gradients', pass through)."""
        out = {}
        for k, a in arrays.items():
            p = self._params_desc.get(k[len(prefix):]) if k.startswith(prefix) else None
            out[k] = a if p is None or a is None else np.ascontiguousarray(self.ops.from_native(p, a))
        return out

    # -- optimizer state ----------------------------------------------------------------------
    def get_state(self) -> dict[str, np.ndarray]:
        """The optimizer state under canonical names (see `harness.api.Backend.get_state`)."""
        got = self._get_state()
        return {k: self._canonical_state(k, got[k]) for k in state_shapes(self.spec, self.optim)}

    def set_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Load a canonical optimizer state (see `harness.api.Backend.set_state`); validated
        first, so a rejected state changes nothing. Never recompiles the step."""
        checked = check_state(state, state_shapes(self.spec, self.optim), self.policy.param)
        self._set_state({k: self._native_state(k, a) for k, a in checked.items()})

    def _state_param(self, key: str) -> Param | None:
        """The parameter an optimizer-state key holds a moment of (`adam.m.<param>`, ...)."""
        for prefix in ("adam.m.", "adam.v.", "sgd.momentum."):
            if key.startswith(prefix):
                return self._params_desc[key[len(prefix):]]
        return None

    def _native_state(self, key: str, a: np.ndarray) -> np.ndarray:
        p = self._state_param(key)
        return a if p is None else np.ascontiguousarray(self.ops.to_native(p, a))

    def _canonical_state(self, key: str, a: np.ndarray) -> np.ndarray:
        p = self._state_param(key)
        return a if p is None else np.ascontiguousarray(self.ops.from_native(p, a))

    # -- data ---------------------------------------------------------------------------------
    def put(self, x: Any) -> Any:
        """Stage a batch `x` on the device in the backend's dtype. A NumPy array (or anything
        `np.asarray` takes) must be numeric (bool, int or float), of shape (batch, x_dim), finite,
        and, under the Bernoulli likelihood, within [0, 1]; it is cast. A framework tensor must
        already have the backend's dtype and shape (batch, x_dim), and is returned as is (its
        values are not read: that would sync). ValueError otherwise, naming what is wrong."""
        if self._tensor_dtype(x) is not None:
            self._check_batch(shape_of(x), native=True)
            return self._stage(x)
        a = self._host(x, "x")
        self._check_batch(a.shape)
        if not np.isfinite(a).all():
            bad = np.argwhere(~np.isfinite(a))[0]
            raise ValueError(f"x holds a value that is not finite ({a[tuple(bad)]} at row {bad[0]}, column {bad[1]})")
        if self.spec.likelihood == "bernoulli" and a.size and (a.min() < 0 or a.max() > 1):
            raise ValueError(f"x holds values in [{a.min():g}, {a.max():g}], but the Bernoulli likelihood needs data in "
                             "[0, 1]: binarize or rescale it, or use likelihood='gaussian'")
        return self._to_device(np.asarray(self.ops.input_to_native(a, self.spec.input_shape), dtype=self.np_dtype))

    def _host(self, x: Any, what: str) -> np.ndarray:
        """`x` as a numeric NumPy array; ValueError naming `what` otherwise."""
        try:
            a = np.asarray(x)
        except ValueError as exc:  # ragged nested sequences
            raise ValueError(f"put needs a regular numeric array for {what}: {exc}") from exc
        if a.dtype.kind not in "biuf":
            raise ValueError(f"put needs a numeric array (bool, int or float) for {what}, got dtype {a.dtype}")
        return a

    def _check_batch(self, shape: tuple[int, ...] | None, native: bool = False) -> None:
        """x must be (batch, *input) with batch >= 1: the canonical input (NumPy), or a tensor in
        the framework's own layout (what `put` made)."""
        want = self.ops.native_input(self.spec.input_shape) if native else self.spec.input_shape
        if shape is not None and (len(shape) != 1 + len(want) or tuple(shape[1:]) != tuple(want) or shape[0] < 1):
            what = ", ".join(map(str, want))
            layout = " in this framework's layout" if native and tuple(want) != self.spec.input_shape else ""
            raise ValueError(f"x must have shape (batch, {what}): a batch of at least one example of this model's input"
                             f"{layout}, got shape {shape}")

    def _noise(self, eps: Any, batch: int | None, *, samples: bool = True, what: str = "eps") -> Any:
        """Stage noise `eps` of shape (batch, latent) or, with `samples`, (K, batch, latent);
        ValueError naming the shape expected otherwise (or a value that is not finite)."""
        shape = shape_of(eps)
        L = self.spec.latent
        ok = shape is not None and ((len(shape) == 2 and shape[1] == L and shape[0] == (batch if batch is not None else shape[0]))
                                    or (samples and len(shape) == 3 and shape[0] >= 1 and shape[2] == L
                                        and shape[1] == (batch if batch is not None else shape[1])))
        if not ok:
            b = batch if batch is not None else "batch"
            want = f"({b}, {L})" + (f" or (K, {b}, {L})" if samples else "")
            raise ValueError(f"{what} must have shape {want} (latent = {L}), got shape {shape}")
        if self._tensor_dtype(eps) is None and not np.isfinite(self._host(eps, what)).all():
            raise ValueError(f"{what} holds a value that is not finite")
        return self._stage(eps)

    def _stage(self, a: Any) -> Any:
        """A device tensor of `a` in the backend's dtype (no check of its shape or values): a
        framework tensor of our dtype as is, NumPy cast."""
        got = self._tensor_dtype(a)
        if got is not None:
            if got is not self.dtype and got != self.dtype:  # dtypes are singletons: `is` first (fast)
                raise ValueError(
                    f"put got a {self.name} tensor of dtype {dtype_name(got)}, but this backend's dtype "
                    f"is {self.policy.param} (pass a NumPy array to have it cast)"
                )
            return a
        return self._to_device(np.asarray(self._host(a, "input"), dtype=self.np_dtype))

    @staticmethod
    def _rows(x: Any) -> int:
        shape = shape_of(x)
        return int(shape[0]) if shape else len(x)

    def sync(self) -> None:
        """Block until every queued device computation of this backend has finished."""
        raise NotImplementedError

    # -- measurement --------------------------------------------------------------------------
    def terms(self, x: Any, eps: np.ndarray) -> Terms:
        """Per-example `recon`, `kl` and `loss = recon + kl = -ELBO` (each shape (B,)) for
        noise `eps` of shape (B, latent) or (K, B, latent) (recon then averaged over K)."""
        xd = self.put(x)
        with self._scope():
            recon, kl = self._loss_terms(xd, self._noise(eps, self._rows(xd)))
        return Terms(recon=recon, kl=kl)

    def encode(self, x: Any) -> tuple[np.ndarray, np.ndarray]:
        """The encoder's q(z|x) = N(mean, exp(logvar)) per example: (mean, logvar), host arrays
        of shape (B, latent): what measures read of the encoder (collapse diagnostics, local
        inference's start), from the framework's own forward pass."""
        xd = self.put(x)
        with self._scope():
            return self._encode(xd)

    def grads(self, x: Any, eps: np.ndarray, term: Term) -> dict[str, np.ndarray]:
        """Gradient of the batch mean of `term` ("loss", "recon" or "kl"; ValueError
        otherwise) w.r.t. every canonical parameter, as host arrays in canonical order:
        zeros where no gradient flows (a frozen block, a detached z, the decoder for "kl")."""
        term = check_term(term)
        xd = self.put(x)
        with self._scope():
            gs = self._grads(xd, self._noise(eps, self._rows(xd)), term)
        if self.policy.loss_scaling:  # float16: the scaled term's gradient (`_scaled`), unscaled
            gs = {k: None if g is None else g / GRADS_LOSS_SCALE for k, g in gs.items()}
        got = self._canonical({k: g for k, g in gs.items() if g is not None})
        return {k: got[k] if k in got else np.zeros(shape, dtype=self.np_dtype) for k, shape in self._param_shapes.items()}

    def iwae_grads(self, x: Any, eps: np.ndarray, per_example: bool = False) -> dict[str, np.ndarray]:
        """Gradient of the NEGATIVE IWAE-K bound (a loss, like `grads(..., "loss")` of -ELBO)
        w.r.t. every canonical parameter, for harness noise `eps` of shape (K, B, latent):
        IWAE_K(x_b) = log (1/K) sum_k w_kb, log w_kb = log p(x_b | z_kb) + log N(z_kb; 0, I)
        - log q(z_kb | x_b), z_kb = mu_b + exp(logvar_b / 2) eps_kb (reparameterised: the full
        IWAE gradient, no estimator tricks). `per_example=False`: the gradient of
        -mean_b IWAE_K(x_b), arrays in canonical shapes. `per_example=True`: the gradient of
        -IWAE_K(x_b) for each example b, each array with a leading batch axis (B, *shape)
        (their mean over b is the batch gradient); one call gives B independent gradient draws
        when the rows of `x` repeat. Honours `freeze` and `stop_gradient_z` as `grads` does;
        zeros where no gradient flows. Off the training path: torch runs it eagerly (the
        per-example gradient, torch.func.vmap of grad, is torch.compile'd in compiled mode);
        JAX jits it in every mode (op by op, a first call compiles each primitive separately);
        TensorFlow runs the batch gradient eagerly and the per-example one (tf.vectorized_map)
        as a tf.function, which pfor needs. Traced once per shape, not counted by
        `compiles_per_function`. ValueError unless eps has shape (K, len(x), latent)."""
        xd = self.put(x)
        batch = self._rows(xd)
        shape = shape_of(eps)
        if shape is None or len(shape) != 3 or shape[1] != batch or shape[2] != self.spec.latent or shape[0] < 1:
            raise ValueError(f"iwae_grads needs eps of shape (K, {batch}, {self.spec.latent}) with K >= 1, got {shape}")
        with self._scope():
            gs = self._iwae_grads(xd, self._noise(eps, batch), bool(per_example))
        lead = (batch,) if per_example else ()
        got = self._canonical({k: g for k, g in gs.items() if g is not None})
        return {k: (np.zeros(lead + s, dtype=self.np_dtype) if k not in got else got[k]) for k, s in self._param_shapes.items()}

    def local_grads(self, x: Any, mu: np.ndarray, logvar: np.ndarray, eps: np.ndarray) -> tuple[Terms, np.ndarray, np.ndarray]:
        """Local (non-amortised) inference: q_b = N(mu_b, diag exp(logvar_b)) given per example
        (shape (B, latent) each) in place of the encoder's output; the decoder as loaded.
        Returns the per-example `Terms` of that q (recon averaged over `eps`, (B, latent) or
        (K, B, latent); kl in closed form; loss = -ELBO) and the gradient of each example's loss
        w.r.t. its own mu_b and logvar_b (shape (B, latent) each: one backward pass of the sum
        over b, since example b's loss depends on no other example's parameters). Eager
        (jitted in JAX, see `iwae_grads`). ValueError unless mu and logvar have shape
        (len(x), latent)."""
        xd = self.put(x)
        batch = self._rows(xd)
        for name, a in (("mu", mu), ("logvar", logvar)):
            if shape_of(a) != (batch, self.spec.latent):
                raise ValueError(f"local_grads needs {name} of shape ({batch}, {self.spec.latent}), got {shape_of(a)}")
        with self._scope():
            recon, kl, g_mu, g_logvar = self._local_grads(
                xd, self._noise(mu, batch, samples=False, what="mu"), self._noise(logvar, batch, samples=False, what="logvar"),
                self._noise(eps, batch))
        return Terms(recon=recon, kl=kl), g_mu, g_logvar

    def log_likelihood(self, x: Any, k: int, seed: int) -> np.ndarray:
        """IWAE-k lower bound on log p(x), per example (float64, shape (B,)).

        The k samples per example are drawn by the framework's own RNG seeded with `seed`
        (the same seed gives the same numbers), in chunks of at most `IWAE_CHUNK`, whose
        log-weights are reduced on the host by a streaming float64 log-sum-exp: device
        memory does not grow with k. The per-chunk log-weights are computed by a compiled
        function in every compiled mode (eager in eager mode). ValueError unless k is an
        int >= 1."""
        k = check_k(k)
        with self._scope():
            xd = self.put(x)
            rng = self._iwae_rng(int(seed))
            acc = StreamingLogSumExp()
            chunk = iwae_chunk(self.spec, self._rows(xd))
            for start in range(0, k, chunk):
                w, rng = self._iwae_log_weights(xd, min(chunk, k - start), rng)
                acc.add(w)
        return acc.result() - math.log(k)

    # -- training -----------------------------------------------------------------------------
    def train_step(self, x: Any, eps: np.ndarray | None = None) -> Any:
        """One optimizer step on the batch mean of -ELBO. The noise comes from the backend's
        own device RNG (seeded with `runtime.seed`) when `eps` is None, else `eps` (B, latent)
        is used. Returns the step's loss as a device scalar without a host sync (`float()`
        of it syncs)."""
        xd = self.put(x)
        if eps is None:
            return self._step_drawn(xd)
        return self._step_given(xd, self._noise(eps, self._rows(xd), samples=False))

    def compile_count(self) -> int:
        """How many times the training step has been traced/compiled so far (0 in eager
        mode). `log_likelihood`'s compiled function is counted apart: `compiles_per_function()`."""
        return self.compiles_per_function()["step"]

    def compiles_per_function(self) -> dict[str, int]:
        """Traces/compilations so far of each compiled function: "step" (both step paths)
        and "log_likelihood" (the per-chunk log-weights); zeros in eager mode."""
        if not self.compiled:
            return {what: 0 for what in self._compiles}
        return {what: self._compile_count(what) for what in self._compiles}

    def _compile_count(self, what: str) -> int:
        """Compilations of `what` (a key of `_compiles`); JAX adds its jit cache entries."""
        return self._compiles[what]

    def _counting(self, fn: F, what: str) -> F:
        """`fn`, counting a trace of `what` each time it runs: under tf.function or jax.jit
        that is once per trace, never per call."""

        @functools.wraps(fn)
        def counted(*args: Any) -> Any:
            self._compiles[what] += 1
            return fn(*args)

        return counted  # type: ignore[return-value]

    # -- record -------------------------------------------------------------------------------
    def version(self) -> dict[str, Any]:
        """Framework version, device, threads and numeric settings for the record's env:
        the keys of `VERSION_KEYS` in every backend, then framework-specific extras (never
        one of the common keys, never "platform", which the env keeps for the OS)."""
        common = self._version_common()
        info: dict[str, Any] = {
            "framework": self.name,
            "framework_version": common["framework_version"],
            "mode": self.runtime.mode,
            "dtype": self.runtime.dtype,
            "device": str(common["device"]),
            "device_name": str(common["device_name"]),
            "device_count": int(common["device_count"]),
            "device_kind": str(common["device_kind"]),
            "threads": int(common["threads"]),
            "matmul_precision": str(common["matmul_precision"]),
            "allow_tf32": bool(common["allow_tf32"]),
        }
        extra = self._version_extra()
        clash = sorted((set(extra) & set(info)) | (set(extra) & RESERVED_VERSION_KEYS))
        if clash:
            raise RuntimeError(f"{self.name} version() extras reuse reserved key(s) {clash}")
        info.update(extra)
        # the mixed-precision policy; under float16 the dynamic loss scale reached and the steps
        # it skipped for a non-finite gradient
        info["policy"] = dataclasses.asdict(self.policy)
        if self.policy.loss_scaling:
            info["loss_scale"], info["skipped_steps"] = self._loss_scale()
        return info

    def _scaled(self, value: Any) -> Any:
        """What `_grads` differentiates: the term, times GRADS_LOSS_SCALE under float16 (`grads`
        divides it out), as a float16 user scales a loss."""
        return value * GRADS_LOSS_SCALE if self.policy.loss_scaling else value

    # == primitives: each framework overrides these ============================================
    def _loss_scale(self) -> tuple[float, int]:
        """float16 only: the dynamic loss scale now and the steps skipped so far."""
        raise NotImplementedError

    def _setup(self) -> None:
        """Pick the device; create parameters (zeros), the training RNG and the optimizer."""
        raise NotImplementedError

    def _scope(self) -> contextlib.AbstractContextManager[Any]:
        """Context for the methods off the hot path (terms, grads, log_likelihood): the
        backend's device and numeric settings, where the framework keeps them in a context.
        `train_step` does not enter it: `_build_step`'s functions carry what they need."""
        return contextlib.nullcontext()

    def _to_device(self, a: np.ndarray) -> Any:
        """A device tensor holding `a` (already in the backend's dtype)."""
        raise NotImplementedError

    def _tensor_dtype(self, x: Any) -> Any:
        """The framework dtype of a framework tensor (compared with `self.dtype`); None if
        `x` is not one. On the hot path of `train_step`: keep it to an isinstance check."""
        raise NotImplementedError

    def _from_device(self, t: Any) -> np.ndarray:
        """A host NumPy copy of a device tensor."""
        raise NotImplementedError

    def _set_params(self, params: dict[str, np.ndarray]) -> None:
        """Write validated host weights (fresh copies) into the model; zero the optimizer state."""
        raise NotImplementedError

    def _get_params(self) -> dict[str, np.ndarray]:
        """Host copies of the weights under canonical names."""
        raise NotImplementedError

    def _get_state(self) -> dict[str, np.ndarray]:
        """The optimizer state under canonical names (step int64, moments in our dtype)."""
        raise NotImplementedError

    def _set_state(self, state: dict[str, np.ndarray]) -> None:
        """Write a validated canonical state (host arrays) into the optimizer, no recompile."""
        raise NotImplementedError

    def _loss_terms(self, x: Any, eps: Any) -> tuple[np.ndarray, np.ndarray]:
        """Per-example (recon, kl) as host arrays, no gradient."""
        raise NotImplementedError

    def _encode(self, x: Any) -> tuple[np.ndarray, np.ndarray]:
        """(mean, logvar) of q(z|x) as host arrays, no gradient."""
        raise NotImplementedError

    def _grads(self, x: Any, eps: Any, term: Term) -> dict[str, np.ndarray | None]:
        """Gradient of the batch mean of `pick_term(term, recon, kl)` per canonical
        parameter, as host arrays; None for a parameter the value does not depend on."""
        raise NotImplementedError

    def _iwae_grads(self, x: Any, eps: Any, per_example: bool) -> dict[str, np.ndarray | None]:
        """Gradient of -mean_b IWAE_K (or, `per_example`, of each -IWAE_K(x_b), a leading
        batch axis) per canonical parameter, as host arrays; None where none flows."""
        raise NotImplementedError

    def _local_grads(self, x: Any, mu: Any, logvar: Any, eps: Any) -> tuple[np.ndarray, ...]:
        """(recon, kl, d loss/d mu, d loss/d logvar) per example as host arrays, for q given by
        (mu, logvar) (`model.terms_at`); the gradients of the sum over examples."""
        raise NotImplementedError

    def _iwae_rng(self, seed: int) -> Any:
        """A fresh framework RNG (generator or key) seeded with `seed`, for one log_likelihood."""
        raise NotImplementedError

    def _iwae_log_weights(self, x: Any, kk: int, rng: Any) -> tuple[np.ndarray, Any]:
        """Draw (kk, B, latent) standard normals from `rng` (the framework's own kernels),
        evaluate `self._log_weights` on them; returns the (kk, B) log-weights as NumPy and
        the RNG to draw the next chunk from (the same object where the RNG is stateful)."""
        raise NotImplementedError

    def _build_step(self) -> tuple[StepDrawn, StepGiven]:
        """(step_drawn(x), step_given(x, eps)), each doing one optimizer step on device
        tensors and returning the loss as a device scalar: plain functions in eager mode,
        `_compile`d otherwise. step_drawn draws the noise from the training RNG."""
        raise NotImplementedError

    def _build_log_weights(self) -> Callable[..., Any]:
        """The per-chunk IWAE log-weights function on device tensors, `_compile`d in every
        compiled mode ("log_likelihood" counter), plain in eager mode."""
        raise NotImplementedError

    def _compile(self, fn: F, what: str) -> F:
        """`fn` compiled the framework's way for this mode (counting into `_compiles[what]`);
        `fn` itself in eager mode."""
        raise NotImplementedError

    def _version_common(self) -> VersionCommon:
        """The framework's values for the common `version()` keys."""
        raise NotImplementedError

    def _version_extra(self) -> dict[str, Any]:
        """Framework-specific `version()` keys (versions of companion libraries, flags)."""
        return {}

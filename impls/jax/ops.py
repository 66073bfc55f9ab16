"""The primitive ops the model kinds and `harness.vae` are written over, in JAX, as a JAX user
writes them (flax's layers are these lax calls): images NHWC, kernels HWIO (the canonical
layouts), `lax.conv_transpose` with `transpose_kernel=True` taking the kernel as Keras'
Conv2DTranspose holds it, (kh, kw, out, in); padding "SAME". Matmul precision comes from the
backend's context (`jax.default_matmul_precision`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from impls import conv_layout
from impls.conv_layout import dilated_pads

relu, tanh, exp, log = jax.nn.relu, jnp.tanh, jnp.exp, jnp.log
softplus = jax.nn.softplus
DIMS = ("NHWC", "HWIO", "NHWC")


def bias_add(y: jax.Array, b: jax.Array) -> jax.Array:
    """A layer's output plus its bias (channels last: it broadcasts)."""
    return y + b


def _biased(y: jax.Array, b: jax.Array | None) -> jax.Array:
    """`y + b`; `y` without a bias (None: a mixed-precision policy adds it in float32)."""
    return y if b is None else y + b


def dense(x: jax.Array, w: jax.Array, b: jax.Array | None) -> jax.Array:
    return _biased(x @ w, b)


def sum(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    return jnp.sum(x, axis=axes if len(axes) > 1 else axes[0])


def mean(x: jax.Array, axis: int) -> jax.Array:
    return x.mean(axis=axis)


def logsumexp(x: jax.Array, axis: int) -> jax.Array:
    return jax.nn.logsumexp(x, axis=axis)


def cast(x: jax.Array, dtype: str) -> jax.Array:
    """`x` in `dtype` (a name: "bfloat16", ...); differentiable (the gradient comes back in x's type)."""
    return x.astype(jnp.dtype(dtype))


def stop_gradient(x: jax.Array) -> jax.Array:
    return lax.stop_gradient(x)


def ndim(x: jax.Array) -> int:
    return int(x.ndim)


def shape(x: jax.Array) -> tuple[int, ...]:
    return tuple(x.shape)


def reshape(x: jax.Array, new: tuple[int, ...]) -> jax.Array:
    return x.reshape(new)


# -- images ----------------------------------------------------------------------------------------


def native_image(hwc: tuple[int, int, int]) -> tuple[int, int, int]:
    return hwc


def flatten_image(x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[:-3] + (-1,))


def unflatten_image(x: jax.Array, hwc: tuple[int, int, int]) -> jax.Array:
    return x.reshape(x.shape[:-1] + hwc)


def conv2d(x: jax.Array, w: jax.Array, b: jax.Array | None, stride: int) -> jax.Array:
    return _biased(lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=DIMS), b)


def conv2d_transpose(x: jax.Array, w: jax.Array, b: jax.Array | None, stride: int) -> jax.Array:
    """w: (kh, kw, out, in); output (N, h stride, w stride, out)."""
    return _biased(lax.conv_transpose(x, w, (stride, stride), "SAME", dimension_numbers=DIMS, transpose_kernel=True), b)


# -- canonical <-> native ---------------------------------------------------------------------------


# the canonical layout is channels-last too: only a transposed convolution's kernel differs
to_native = conv_layout.channels_last_to_native
from_native = conv_layout.channels_last_from_native
input_to_native = input_from_native = conv_layout.canonical_input
native_input = conv_layout.canonical_input_shape


def conv2d_transpose_dilated(x: jax.Array, w: jax.Array, b: jax.Array | None, stride: int) -> jax.Array:
    """The same transposed convolution as `conv2d_transpose`, formulated as its definition: the
    input dilated with zeros (`lax.pad`'s interior padding), padded, and a plain stride-1
    convolution with the kernel flipped (framework.conv_transpose=dilated). Its backward is
    plain convolutions too, where `lax.conv_transpose`'s is a dilated one (slow on XLA's CPU)."""
    k = w.shape[0]
    pads = [dilated_pads(size, k, stride) for size in (x.shape[1], x.shape[2])]
    xp = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), (*pads[0], stride - 1), (*pads[1], stride - 1), (0, 0, 0)])
    kernel = jnp.flip(jnp.swapaxes(w, -1, -2), (0, 1))  # (kh, kw, out, in) -> flipped (kh, kw, in, out)
    return _biased(lax.conv_general_dilated(xp, kernel, (1, 1), "VALID", dimension_numbers=DIMS), b)

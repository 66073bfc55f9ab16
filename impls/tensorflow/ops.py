"""The primitive ops the model kinds and `harness.vae` are written over, in TensorFlow, as a
TensorFlow user writes them: images NHWC, convolution kernels HWIO (the canonical layouts), a
transposed convolution's filter (kh, kw, out, in) as `tf.nn.conv2d_transpose` (and Keras'
Conv2DTranspose) keeps it; padding "same"."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from impls import conv_layout  # noqa: E402
from impls.conv_layout import dilated_pads  # noqa: E402

relu, tanh, exp, log = tf.nn.relu, tf.tanh, tf.exp, tf.math.log
softplus = tf.math.softplus


def bias_add(y: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """A layer's output plus its bias (channels last: it broadcasts)."""
    return y + b


def _biased(y: tf.Tensor, b: tf.Tensor | None) -> tf.Tensor:
    """`y + b`; `y` without a bias (None: a mixed-precision policy adds it in float32)."""
    return y if b is None else y + b


def dense(x: tf.Tensor, w: tf.Tensor, b: tf.Tensor | None) -> tf.Tensor:
    return _biased(x @ w, b)


def sum(x: tf.Tensor, axes: tuple[int, ...]) -> tf.Tensor:
    return tf.reduce_sum(x, axis=list(axes) if len(axes) > 1 else axes[0])


def mean(x: tf.Tensor, axis: int) -> tf.Tensor:
    return tf.reduce_mean(x, axis=axis)


def logsumexp(x: tf.Tensor, axis: int) -> tf.Tensor:
    return tf.reduce_logsumexp(x, axis=axis)


def cast(x: tf.Tensor, dtype: str) -> tf.Tensor:
    """`x` in `dtype` (a name: "bfloat16", ...); differentiable (the gradient comes back in x's type)."""
    return tf.cast(x, tf.as_dtype(dtype))


def stop_gradient(x: tf.Tensor) -> tf.Tensor:
    return tf.stop_gradient(x)


def ndim(x: tf.Tensor) -> int:
    return int(x.shape.rank)


def shape(x: tf.Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def reshape(x: tf.Tensor, new: tuple[int, ...]) -> tf.Tensor:
    return tf.reshape(x, new)


# -- images ----------------------------------------------------------------------------------------


def native_image(hwc: tuple[int, int, int]) -> tuple[int, int, int]:
    return hwc


def flatten_image(x: tf.Tensor) -> tf.Tensor:
    return tf.reshape(x, tf.concat([tf.shape(x)[:-3], [-1]], 0)) if None in x.shape[:-3] else \
        tf.reshape(x, tuple(x.shape[:-3]) + (-1,))


def unflatten_image(x: tf.Tensor, hwc: tuple[int, int, int]) -> tf.Tensor:
    if None in x.shape[:-1]:
        return tf.reshape(x, tf.concat([tf.shape(x)[:-1], list(hwc)], 0))
    return tf.reshape(x, tuple(x.shape[:-1]) + hwc)


def conv2d(x: tf.Tensor, w: tf.Tensor, b: tf.Tensor | None, stride: int) -> tf.Tensor:
    return _biased(tf.nn.conv2d(x, w, strides=stride, padding="SAME"), b)


def conv2d_transpose(x: tf.Tensor, w: tf.Tensor, b: tf.Tensor | None, stride: int) -> tf.Tensor:
    """w: (kh, kw, out, in); output (N, h stride, w stride, out)."""
    out_shape = tf.stack([tf.shape(x)[0], x.shape[1] * stride, x.shape[2] * stride, w.shape[2]])
    return _biased(tf.nn.conv2d_transpose(x, w, out_shape, strides=stride, padding="SAME"), b)


# -- canonical <-> native ---------------------------------------------------------------------------


# the canonical layout is channels-last too: only a transposed convolution's kernel differs
to_native = conv_layout.channels_last_to_native
from_native = conv_layout.channels_last_from_native
input_to_native = input_from_native = conv_layout.canonical_input
native_input = conv_layout.canonical_input_shape


def conv2d_transpose_dilated(x: tf.Tensor, w: tf.Tensor, b: tf.Tensor | None, stride: int) -> tf.Tensor:
    """The same transposed convolution as `conv2d_transpose`, formulated as its definition: the
    input dilated with zeros, padded, and a plain stride-1 convolution with the kernel flipped
    (framework.conv_transpose=dilated); w is (kh, kw, out, in) as for `conv2d_transpose`."""
    k, s = int(w.shape[0]), stride
    h, wd, c = int(x.shape[1]), int(x.shape[2]), int(x.shape[3])
    (top, bottom), (left, right) = dilated_pads(h, k, s), dilated_pads(wd, k, s)
    xd = tf.pad(x[:, :, None, :, None, :], [[0, 0], [0, 0], [0, s - 1], [0, 0], [0, s - 1], [0, 0]])
    xd = tf.reshape(xd, tf.stack([tf.shape(x)[0], h * s, wd * s, c]))[:, : (h - 1) * s + 1, : (wd - 1) * s + 1, :]
    kernel = tf.reverse(tf.transpose(w, [0, 1, 3, 2]), [0, 1])  # (kh, kw, out, in) -> flipped (kh, kw, in, out)
    return _biased(tf.nn.conv2d(tf.pad(xd, [[0, 0], [top, bottom], [left, right], [0, 0]]), kernel, strides=1, padding="VALID"), b)

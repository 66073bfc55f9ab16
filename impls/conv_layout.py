"""Framework-neutral arithmetic of image layers for the `impls/<fw>/ops.py`: the canonical <->
native conversions of a channels-last framework (JAX, TensorFlow: the canonical layout but for
a transposed convolution's kernel), and for a channels-first one (torch): Keras' "same" padding (`harness.models.conv.same_pads`, where the model defines it;
a transposed convolution crops its full output by the pads of the convolution it is the
adjoint of, the one from size x stride to size), and the permutation between the canonical
(h, w, c) order of a flattened image and (c, h, w)."""

from __future__ import annotations

import numpy as np

from harness.models.base import Param
from harness.models.conv import same_pads  # Keras' "same": the model kind's definition

# -- a channels-last framework's layout: (N, H, W, C) inputs, (kh, kw, in, out) kernels ---------------


def channels_last_to_native(p: Param, a: np.ndarray) -> np.ndarray:
    """A canonical parameter (or its gradient or moment) in a channels-last framework's layout:
    only a transposed convolution's kernel differs, (kh, kw, in, out) -> (kh, kw, out, in)."""
    return np.swapaxes(a, -1, -2) if p.layout == "conv_t" else a


def channels_last_from_native(p: Param, a: np.ndarray) -> np.ndarray:
    """The inverse of `channels_last_to_native` (a swap of the last two axes is its own inverse)."""
    return np.swapaxes(a, -1, -2) if p.layout == "conv_t" else a


def canonical_input(a: np.ndarray, input_shape: tuple[int, ...]) -> np.ndarray:
    """An input batch to or from a channels-last framework: the canonical layout, unchanged."""
    return a


def canonical_input_shape(input_shape: tuple[int, ...]) -> tuple[int, ...]:
    return input_shape


def dilated_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) padding of an input of `size` dilated by `stride` (zeros between its
    values) such that a plain stride-1 convolution with the flipped kernel gives the "same"
    transposed convolution's output of size x stride: the full transposed output starts
    kernel - 1 before the dilated input, and "same" crops it by the pads of the convolution it
    is the adjoint of (`same_pads` of size x stride)."""
    out = size * stride
    crop, _ = same_pads(out, kernel, stride)
    before = kernel - 1 - crop
    return before, out + kernel - 1 - before - ((size - 1) * stride + 1)


def chw_from_hwc(a: np.ndarray, hwc: tuple[int, int, int], axis: int) -> np.ndarray:
    """Reorder `axis` (length h w c, in (h, w, c) order) into (c, h, w) order."""
    h, w, c = hwc
    a = np.moveaxis(a, axis, -1)
    lead = a.shape[:-1]
    b = a.reshape(*lead, h, w, c)
    b = np.moveaxis(b, -1, -3).reshape(*lead, h * w * c)
    return np.moveaxis(b, -1, axis)


def hwc_from_chw(a: np.ndarray, hwc: tuple[int, int, int], axis: int) -> np.ndarray:
    """The inverse of `chw_from_hwc`."""
    h, w, c = hwc
    a = np.moveaxis(a, axis, -1)
    lead = a.shape[:-1]
    b = a.reshape(*lead, c, h, w)
    b = np.moveaxis(b, -3, -1).reshape(*lead, h * w * c)
    return np.moveaxis(b, -1, axis)

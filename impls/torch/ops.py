"""The primitive ops the model kinds and `harness.vae` are written over, in PyTorch: the VAE
as a PyTorch user writes it. Images are NCHW (torch's own layout); a convolution's weight is
(out, in, kh, kw), a transposed one's (in, out, kh, kw); `to_native` / `from_native` convert
the canonical (NHWC, HWIO) parameters, `input_to_native` a batch of images.

Padding follows Keras' "same" (what the canonical architecture is written in): a stride-1
convolution pads symmetrically and uses torch's own `padding=`, a stride-2 one pads
(0, 1) with F.pad first; a transposed convolution is torch's with `padding=0`, cropped to
in x stride as TensorFlow's "same" crops it (the adjoint of the "same" convolution).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from harness.models.base import Param
from impls.conv_layout import chw_from_hwc, dilated_pads, hwc_from_chw, same_pads

relu, tanh, exp, log = torch.relu, torch.tanh, torch.exp, torch.log
softplus = F.softplus


def bias_add(y: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A layer's output plus its bias, per channel of an image (N, c, h, w) or per unit."""
    return y + b[:, None, None] if y.dim() == 4 else y + b


def dense(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """`x @ w + b`; without a bias when b is None (a mixed-precision policy adds it in float32)."""
    return x @ w if b is None else x @ w + b


def sum(x: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    return torch.sum(x, dim=axes if len(axes) > 1 else axes[0])


def mean(x: torch.Tensor, axis: int) -> torch.Tensor:
    return x.mean(dim=axis)


def logsumexp(x: torch.Tensor, axis: int) -> torch.Tensor:
    return torch.logsumexp(x, dim=axis)


_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cast(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """`x` in `dtype` (a name: "bfloat16", ...); differentiable (the gradient comes back in x's type)."""
    return x.to(_DTYPES[dtype])


def stop_gradient(x: torch.Tensor) -> torch.Tensor:
    return x.detach()


def ndim(x: torch.Tensor) -> int:
    return x.dim()


def shape(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def reshape(x: torch.Tensor, new: tuple[int, ...]) -> torch.Tensor:
    return x.reshape(new)


# -- images ----------------------------------------------------------------------------------------


def native_image(hwc: tuple[int, int, int]) -> tuple[int, int, int]:
    """An image's shape in this framework's layout: (c, h, w)."""
    return (hwc[2], hwc[0], hwc[1])


def flatten_image(x: torch.Tensor) -> torch.Tensor:
    """(..., c, h, w) -> (..., c h w)."""
    return x.reshape(x.shape[:-3] + (-1,))


def unflatten_image(x: torch.Tensor, hwc: tuple[int, int, int]) -> torch.Tensor:
    """(..., c h w) -> (..., c, h, w)."""
    return x.reshape(x.shape[:-1] + native_image(hwc))


def conv2d(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, stride: int) -> torch.Tensor:
    """Keras-"same" convolution of (N, c, h, w) with w (out, in, kh, kw)."""
    (top, bottom), (left, right) = (same_pads(x.shape[-2], w.shape[-2], stride), same_pads(x.shape[-1], w.shape[-1], stride))
    if top == bottom and left == right:
        return F.conv2d(x, w, b, stride=stride, padding=(top, left))
    return F.conv2d(F.pad(x, (left, right, top, bottom)), w, b, stride=stride)


def conv2d_transpose(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, stride: int) -> torch.Tensor:
    """Keras-"same" transposed convolution of (N, c, h, w) with w (in, out, kh, kw): output
    (N, out, h stride, w stride)."""
    h, wd = x.shape[-2] * stride, x.shape[-1] * stride
    (top, bottom), (left, right) = same_pads(h, w.shape[-2], stride), same_pads(wd, w.shape[-1], stride)
    if top == bottom and left == right:
        return F.conv_transpose2d(x, w, b, stride=stride, padding=(top, left))
    full = F.conv_transpose2d(x, w, b, stride=stride)
    return full[..., top : top + h, left : left + wd]


# -- canonical <-> native ---------------------------------------------------------------------------


def to_native(p: Param, a: np.ndarray) -> np.ndarray:
    """A canonical parameter (or a gradient or optimizer moment of it) in torch's layout."""
    if p.layout == "conv":  # (kh, kw, in, out) -> (out, in, kh, kw)
        return np.moveaxis(a, (-4, -3, -2, -1), (-2, -1, -3, -4))
    if p.layout == "conv_t":  # (kh, kw, in, out) -> (in, out, kh, kw)
        return np.moveaxis(a, (-4, -3, -2, -1), (-2, -1, -4, -3))
    if p.layout == "dense_from_image":  # rows (h, w, c) -> (c, h, w)
        return chw_from_hwc(a, p.image, axis=-2)  # type: ignore[arg-type]
    if p.layout in ("dense_to_image", "bias_to_image"):  # columns (h, w, c) -> (c, h, w)
        return chw_from_hwc(a, p.image, axis=-1)  # type: ignore[arg-type]
    return a


def from_native(p: Param, a: np.ndarray) -> np.ndarray:
    """The inverse of `to_native` (leading axes, e.g. per-example gradients, pass through)."""
    if p.layout == "conv":
        return np.moveaxis(a, (-2, -1, -3, -4), (-4, -3, -2, -1))
    if p.layout == "conv_t":
        return np.moveaxis(a, (-2, -1, -4, -3), (-4, -3, -2, -1))
    if p.layout == "dense_from_image":
        return hwc_from_chw(a, p.image, axis=-2)  # type: ignore[arg-type]
    if p.layout in ("dense_to_image", "bias_to_image"):
        return hwc_from_chw(a, p.image, axis=-1)  # type: ignore[arg-type]
    return a


def input_to_native(a: np.ndarray, input_shape: tuple[int, ...]) -> np.ndarray:
    """A batch (B, *input) in torch's layout: images NHWC -> NCHW."""
    return np.ascontiguousarray(np.moveaxis(a, -1, -3)) if len(input_shape) == 3 else a


def native_input(input_shape: tuple[int, ...]) -> tuple[int, ...]:
    return native_image(input_shape) if len(input_shape) == 3 else input_shape  # type: ignore[arg-type]


def input_from_native(a: np.ndarray, input_shape: tuple[int, ...]) -> np.ndarray:
    return np.moveaxis(a, -3, -1) if len(input_shape) == 3 else a


def conv2d_transpose_dilated(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, stride: int) -> torch.Tensor:
    """The same transposed convolution as `conv2d_transpose`, formulated as its definition: the
    input dilated with zeros, padded, and a plain stride-1 convolution with the kernel flipped
    (framework.conv_transpose=dilated); w is (in, out, kh, kw) as for `conv2d_transpose`."""
    k = w.shape[-1]
    (top, bottom), (left, right) = dilated_pads(x.shape[-2], k, stride), dilated_pads(x.shape[-1], k, stride)
    h, wd = (x.shape[-2] - 1) * stride + 1, (x.shape[-1] - 1) * stride + 1
    xd = x.new_zeros((*x.shape[:-2], h, wd))
    xd[..., ::stride, ::stride] = x
    kernel = w.transpose(0, 1).flip(2, 3)  # (in, out, kh, kw) -> flipped (out, in, kh, kw)
    return F.conv2d(F.pad(xd, (left, right, top, bottom)), kernel, b)

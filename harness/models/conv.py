"""model=conv: the convolutional VAE of the Keras VAE example, for images (h, w, c).

Encoder: a convolution per entry of `filters` (3x3, stride 2, "same" padding, `activation`), the
image flattened, a dense layer of `dense` units (`activation`), a dense layer to 2 latent (mean,
then log-variance). Decoder: a dense layer to the smallest image (`activation`), reshaped; a
transposed convolution per entry of `filters`, in reverse (3x3, stride 2, "same",
`activation`); a last transposed convolution (3x3, stride 1) to c channels: Bernoulli logits or
Gaussian means. With the defaults on 28 x 28 x 1: 32 and 64 filters, 7 x 7 x 64 in the middle,
dense 16, as the example.

Canonical layout (what `get_params` returns in every framework): images NHWC, convolution
kernels (kh, kw, in, out), a transposed convolution's (kh, kw, in, out) with `in` its input
channels, a dense layer after a flattened image with its rows in (h, w, c) order. "same" is
Keras' padding (an odd extra row or column after): each framework's ops follow it.

The NumPy oracle below is written from the definitions (windows of the padded input for the
convolution; its adjoint, a scatter of kernel-weighted inputs cropped like Keras', for the
transposed one) and is checked against finite differences.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from harness.models.base import (
    Layer,
    LayerFlops,
    ModelSpec,
    Param,
    bias_param,
    dense_layers,
    dense_param,
    normalize,
    np_activation,
    np_activation_backward,
    np_dense_backward,
    np_dense_forward,
    refuse,
)
from harness.schema import ConfigError, setting
from harness.spec import Activation, choices

KIND = "conv"
STRIDE = 2


@dataclass(frozen=True)
class ConvSpec(ModelSpec):
    """A convolutional VAE (model=conv) for images of `image` (h, w, c)."""

    x_dim: int = setting(0, ge=0)  # 0: the image's h w c
    kind: str = setting(KIND, choices=(KIND,))
    image: tuple[int, ...] = setting((28, 28, 1), gt=0)  # (h, w, c): from the data
    filters: tuple[int, ...] = setting((32, 64), gt=0, nonempty=True)  # one stride-2 convolution each
    dense: int = setting(16, gt=0)  # the dense layer between the convolutions and the latent
    kernel: int = setting(3, gt=0)
    activation: Activation = setting("relu", choices=choices(Activation))

    def validate(self) -> None:
        if len(self.image) != 3:
            raise refuse(self, "image", f"must be (h, w, c), got {list(self.image)}")
        if self.x_dim == 0:
            normalize(self, x_dim=math.prod(self.image))
        if self.x_dim != math.prod(self.image):
            raise refuse(self, "x_dim", f"is {self.x_dim}, but an image {list(self.image)} holds {math.prod(self.image)}")
        if self.kernel % 2 == 0:
            raise refuse(self, "kernel", f"must be odd (centred, as 'same' padding assumes), got {self.kernel}")
        n = 2 ** len(self.filters)
        if self.image[0] % n or self.image[1] % n:
            raise refuse(self, "image", f"{self.image[0]} x {self.image[1]}: each of the {len(self.filters)} stride-2 "
                                        f"convolutions halves it, so height and width must be multiples of {n}")

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.image)


Spec = ConvSpec


def _image_from_data(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The data's example shape, which must be an image: model=conv on vectors is refused."""
    if len(shape) != 3:
        raise ConfigError("ConvSpec.image", f"model=conv needs images (h, w, c), but the data's examples are vectors "
                                            f"of {math.prod(shape)} values: use data=digits, mnist5k, mnist or fashion_mnist")
    return shape


DATA_FIELDS = {"image": _image_from_data}


def smallest(spec: Any) -> tuple[int, int, int]:
    """The image between the convolutions and the dense layers: (h, w, last filters)."""
    n = 2 ** len(spec.filters)
    return (spec.image[0] // n, spec.image[1] // n, spec.filters[-1])


def params(spec: Any) -> dict[str, Param]:
    k, c, f = spec.kernel, spec.image[2], list(spec.filters)
    mid = smallest(spec)
    flat = math.prod(mid)
    out: dict[str, Param] = {}
    chans = [c, *f]
    for i in range(len(f)):  # encoder convolutions
        out[f"encoder.{i}.weight"] = Param((k, k, chans[i], chans[i + 1]), "conv", (k * k * chans[i], k * k * chans[i + 1]))
        out[f"encoder.{i}.bias"] = bias_param(chans[i + 1])
    n = len(f)
    out[f"encoder.{n}.weight"] = dense_param(flat, spec.dense, "dense_from_image", mid)
    out[f"encoder.{n}.bias"] = bias_param(spec.dense)
    out[f"encoder.{n + 1}.weight"] = dense_param(spec.dense, 2 * spec.latent)
    out[f"encoder.{n + 1}.bias"] = bias_param(2 * spec.latent)
    out["decoder.0.weight"] = dense_param(spec.latent, flat, "dense_to_image", mid)
    out["decoder.0.bias"] = bias_param(flat, "bias_to_image", mid)
    dchans = [*reversed(f), c]  # transposed convolutions: f[-1] -> f[-1], ..., f[0] -> c
    ins = [f[-1], *reversed(f)]
    for j in range(n + 1):
        ci, co = ins[j], dchans[j]
        out[f"decoder.{j + 1}.weight"] = Param((k, k, ci, co), "conv_t", (k * k * ci, k * k * co))
        out[f"decoder.{j + 1}.bias"] = bias_param(co)
    return out


def layer_flops(spec: Any) -> list[LayerFlops]:
    """2 multiply-adds per output value per kernel tap: a convolution's output positions x k^2 x
    in x out; a transposed convolution's input positions x k^2 x in x out (the convolution it
    is the adjoint of); dense in x out."""
    k, (h, w, _), f = spec.kernel, spec.image, list(spec.filters)
    chans = [spec.image[2], *f]
    layers, size = [], (h, w)
    for i in range(len(f)):
        size = (math.ceil(size[0] / STRIDE), math.ceil(size[1] / STRIDE))
        layers.append(LayerFlops("encoder", i, 2 * size[0] * size[1] * k * k * chans[i] * chans[i + 1]))
    mid = smallest(spec)
    flat, n = math.prod(mid), len(f)
    layers += [LayerFlops("encoder", n, 2 * flat * spec.dense), LayerFlops("encoder", n + 1, 2 * spec.dense * 2 * spec.latent),
               LayerFlops("decoder", 0, 2 * spec.latent * flat)]
    size = (mid[0], mid[1])
    ins, outs = [f[-1], *reversed(f)], [*reversed(f), spec.image[2]]
    for j in range(n + 1):
        layers.append(LayerFlops("decoder", j + 1, 2 * size[0] * size[1] * k * k * ins[j] * outs[j]))
        if j < n:
            size = (size[0] * STRIDE, size[1] * STRIDE)
    return layers


def layers(spec: Any) -> list[Layer]:
    """The layers in order, one by one, for the throughput measure's per-layer timing."""
    ps = params(spec)
    k, n, out = spec.kernel, len(spec.filters), []
    size = tuple(spec.image)
    for i in range(n):
        w = ps[f"encoder.{i}.weight"].shape
        out.append(Layer(f"encoder.{i} conv {k}x{k} {w[2]}->{w[3]} /{STRIDE}", "conv2d", f"encoder.{i}.weight",
                         f"encoder.{i}.bias", size, STRIDE))
        size = (math.ceil(size[0] / STRIDE), math.ceil(size[1] / STRIDE), w[3])
    dense = dense_layers(ps)
    out += [x for x in dense if x.name.startswith("encoder.")]
    out += [x for x in dense if x.name.startswith("decoder.")]
    size = smallest(spec)
    for j in range(n + 1):
        w = ps[f"decoder.{j + 1}.weight"].shape
        stride = STRIDE if j < n else 1
        out.append(Layer(f"decoder.{j + 1} conv_t {k}x{k} {w[2]}->{w[3]}" + (f" x{stride}" if stride > 1 else ""),
                         "conv2d_transpose", f"decoder.{j + 1}.weight", f"decoder.{j + 1}.bias", size, stride))
        size = (size[0] * stride, size[1] * stride, w[3])
    return out


def describe(spec: Any) -> str:
    return f"conv {list(spec.filters)} dense {spec.dense}, latent {spec.latent}, image {'x'.join(map(str, spec.image))}"


# -- the layers, written once over a framework's ops ------------------------------------------------


def _act(ops: Any, spec: Any, h: Any) -> Any:
    return ops.relu(h) if spec.activation == "relu" else ops.tanh(h)


def _lead(ops: Any, t: Any, event: int) -> tuple[int, ...]:
    """The leading (batch) dims of `t`, whose last `event` dims are one example; an unknown one
    (a traced batch) as -1."""
    return tuple(-1 if d is None else int(d) for d in ops.shape(t)[: len(ops.shape(t)) - event])


def encode(ops: Any, p: Mapping[str, Any], x: Any, spec: Any) -> Any:
    """(..., *image in the framework's layout) -> (..., 2 latent)."""
    lead = _lead(ops, x, 3)
    h = ops.reshape(x, (-1, *ops.native_image(tuple(spec.image))))
    n = len(spec.filters)
    for i in range(n):
        h = _act(ops, spec, ops.conv2d(h, p[f"encoder.{i}.weight"], p[f"encoder.{i}.bias"], STRIDE))
    h = _act(ops, spec, ops.dense(ops.flatten_image(h), p[f"encoder.{n}.weight"], p[f"encoder.{n}.bias"]))
    out = ops.dense(h, p[f"encoder.{n + 1}.weight"], p[f"encoder.{n + 1}.bias"])
    return ops.reshape(out, (*lead, 2 * spec.latent))


def decode(ops: Any, p: Mapping[str, Any], z: Any, spec: Any) -> Any:
    """(..., latent) -> (..., *image in the framework's layout): logits or means."""
    lead = _lead(ops, z, 1)
    h = ops.reshape(z, (-1, spec.latent))
    h = _act(ops, spec, ops.dense(h, p["decoder.0.weight"], p["decoder.0.bias"]))
    h = ops.unflatten_image(h, smallest(spec))
    n = len(spec.filters)
    for j in range(n + 1):
        h = ops.conv2d_transpose(h, p[f"decoder.{j + 1}.weight"], p[f"decoder.{j + 1}.bias"], STRIDE if j < n else 1)
        if j < n:
            h = _act(ops, spec, h)
    return ops.reshape(h, (*lead, *ops.native_image(tuple(spec.image))))


# -- the NumPy oracle: convolutions from their definition, hand-written backward ----------------------


def same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """Keras' "same": out = ceil(size / stride); the padding it needs, the odd one after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _windows(xp: np.ndarray, k: int, s: int, ho: int, wo: int) -> np.ndarray:
    """(N, ho, wo, k, k, c): the k x k window under each output position of a padded input."""
    n, _, _, c = xp.shape
    sn, sh, sw, sc = xp.strides
    return np.lib.stride_tricks.as_strided(xp, (n, ho, wo, k, k, c), (sn, sh * s, sw * s, sh, sw, sc), writeable=False)


def np_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, s: int) -> tuple[np.ndarray, dict[str, Any]]:
    """y[n, i, j, o] = b[o] + sum_{a, c, ch} xpad[n, i s + a, j s + c, ch] w[a, c, ch, o]."""
    k = w.shape[0]
    (t, bt), (lf, rt) = same_pads(x.shape[1], k, s), same_pads(x.shape[2], k, s)
    xp = np.pad(x, ((0, 0), (t, bt), (lf, rt), (0, 0)))
    ho, wo = math.ceil(x.shape[1] / s), math.ceil(x.shape[2] / s)
    cols = _windows(xp, k, s, ho, wo)
    y = np.tensordot(cols, w, axes=([3, 4, 5], [0, 1, 2])) + b
    return y, {"cols": cols, "xp_shape": xp.shape, "pads": (t, lf), "x_shape": x.shape}


def np_conv_backward(w: np.ndarray, cache: dict[str, Any], dy: np.ndarray, s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dx, per-sample dW (N, k, k, in, out), per-sample db (N, out)) of `np_conv`."""
    cols, k = cache["cols"], w.shape[0]
    dw = np.einsum("nhwabc,nhwo->nabco", cols, dy)
    db = dy.sum(axis=(1, 2))
    dcols = np.tensordot(dy, w, axes=([3], [3]))  # (N, ho, wo, k, k, in)
    dxp = np.zeros(cache["xp_shape"], dtype=dcols.dtype)
    ho, wo = dy.shape[1], dy.shape[2]
    for a in range(k):
        for c in range(k):
            dxp[:, a : a + s * (ho - 1) + 1 : s, c : c + s * (wo - 1) + 1 : s, :] += dcols[:, :, :, a, c, :]
    t, lf = cache["pads"]
    n, h, wd, _ = cache["x_shape"]
    return dxp[:, t : t + h, lf : lf + wd, :], dw, db


def np_conv_t(x: np.ndarray, w: np.ndarray, b: np.ndarray, s: int) -> tuple[np.ndarray, dict[str, Any]]:
    """The adjoint of the "same" convolution from (h s, w s) to (h, w): every input pixel adds
    its kernel-weighted values at stride s into a full output, cropped by that convolution's
    pads: y[n, i s + a - t, j s + c - l, o] += x[n, i, j, ch] w[a, c, ch, o] (+ b[o])."""
    k = w.shape[0]
    n, h, wd, _ = x.shape
    H, W = h * s, wd * s
    (t, _), (lf, _) = same_pads(H, k, s), same_pads(W, k, s)
    contrib = np.tensordot(x, w, axes=([3], [2]))  # (N, h, w, k, k, out)
    full = np.zeros((n, (h - 1) * s + k, (wd - 1) * s + k, w.shape[3]), dtype=contrib.dtype)
    for a in range(k):
        for c in range(k):
            full[:, a : a + s * (h - 1) + 1 : s, c : c + s * (wd - 1) + 1 : s, :] += contrib[:, :, :, a, c, :]
    y = full[:, t : t + H, lf : lf + W, :] + b
    return y, {"x": x, "pads": (t, lf), "full_shape": full.shape}


def np_conv_t_backward(w: np.ndarray, cache: dict[str, Any], dy: np.ndarray, s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dx, per-sample dW, per-sample db) of `np_conv_t`: the cropped-out part of the full output
    gets no gradient; dx and dW read each input pixel's window of the full output's gradient."""
    x, k = cache["x"], w.shape[0]
    t, lf = cache["pads"]
    dfull = np.zeros(cache["full_shape"], dtype=dy.dtype)
    dfull[:, t : t + dy.shape[1], lf : lf + dy.shape[2], :] = dy
    h, wd = x.shape[1], x.shape[2]
    win = _windows(np.ascontiguousarray(dfull), k, s, h, wd)  # (N, h, w, k, k, out)
    dx = np.tensordot(win, w, axes=([3, 4, 5], [0, 1, 3]))  # (N, h, w, in)
    dw = np.einsum("nhwi,nhwaco->nacio", x, win)
    return dx, dw, dy.sum(axis=(1, 2))


def _flat_lead(h: np.ndarray, event: int) -> tuple[np.ndarray, tuple[int, ...]]:
    lead = h.shape[: h.ndim - event]
    return h.reshape(-1, *h.shape[h.ndim - event :]), lead


def np_forward(p: Mapping[str, np.ndarray], block: str, h: np.ndarray, spec: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """`block`'s output (canonical NHWC) and its cache. Leading dims (samples, batch) are
    flattened into one and restored."""
    n = len(spec.filters)
    cache: dict[str, Any] = {"layers": [], "acts": []}
    if block == "encoder":
        h, cache["lead"] = _flat_lead(h, 3)
        for i in range(n):
            y, c = np_conv(h, p[f"encoder.{i}.weight"], p[f"encoder.{i}.bias"], STRIDE)
            h = np_activation(spec.activation, y)
            cache["layers"].append(("conv", i, c, h))
        mid = h.shape[1:]
        flat = h.reshape(len(h), -1)
        y = np_activation(spec.activation, np_dense_forward(flat, p[f"encoder.{n}.weight"], p[f"encoder.{n}.bias"]))
        cache["layers"].append(("dense", n, {"h": flat, "image": mid}, y))
        out = np_dense_forward(y, p[f"encoder.{n + 1}.weight"], p[f"encoder.{n + 1}.bias"])
        cache["layers"].append(("dense", n + 1, {"h": y}, None))
        return out.reshape(*cache["lead"], -1), cache
    h, cache["lead"] = _flat_lead(h, 1)
    y = np_activation(spec.activation, np_dense_forward(h, p["decoder.0.weight"], p["decoder.0.bias"]))
    cache["layers"].append(("dense", 0, {"h": h}, y))
    h = y.reshape(len(y), *smallest(spec))
    for j in range(n + 1):
        y, c = np_conv_t(h, p[f"decoder.{j + 1}.weight"], p[f"decoder.{j + 1}.bias"], STRIDE if j < n else 1)
        h = np_activation(spec.activation, y) if j < n else y
        cache["layers"].append(("conv_t", j + 1, c, h if j < n else None))
    return h.reshape(*cache["lead"], *h.shape[1:]), cache


def _sum_samples(g: np.ndarray, lead: tuple[int, ...], per_example: bool) -> np.ndarray:
    """Per-sample gradients (N, ...), N = prod(lead), summed over every sample, or with
    `per_example` over every leading axis but the batch axis (the last), which then leads."""
    if not per_example:
        return g.sum(axis=0)
    g = g.reshape(*lead, *g.shape[1:])
    return g.sum(axis=tuple(range(len(lead) - 1))) if len(lead) > 1 else g


def np_backward(p: Mapping[str, np.ndarray], block: str, cache: dict[str, Any], d: np.ndarray, spec: Any,
                grads: dict[str, np.ndarray], per_example: bool = False) -> np.ndarray:
    """Backprop d = dF/d(block output) through `block` (see `harness.models.mlp.np_backward`)."""
    lead = cache["lead"]
    n = len(spec.filters)
    layers = cache["layers"]
    if block == "encoder":
        d = d.reshape(-1, d.shape[-1])
        for kind, i, c, out in reversed(layers):
            name = f"encoder.{i}"
            if out is not None:  # through the activation that made this layer's output
                d = np_activation_backward(spec.activation, out, d)
            if kind == "dense":
                d_in, gw, gb = _dense_per_sample(c["h"], p[f"{name}.weight"], d)
                grads[f"{name}.weight"], grads[f"{name}.bias"] = (_sum_samples(gw, lead, per_example),
                                                                  _sum_samples(gb, lead, per_example))
                d = d_in.reshape(len(d_in), *c["image"]) if "image" in c else d_in
            else:
                d, gw, gb = np_conv_backward(p[f"{name}.weight"], c, d, STRIDE)
                grads[f"{name}.weight"], grads[f"{name}.bias"] = (_sum_samples(gw, lead, per_example),
                                                                  _sum_samples(gb, lead, per_example))
        return d.reshape(*lead, *d.shape[1:])
    d = d.reshape(-1, *d.shape[len(lead):])
    for kind, j, c, out in reversed(layers):
        name = f"decoder.{j}"
        if kind == "dense":  # the first layer: its output was reshaped to the smallest image
            d = d.reshape(len(d), -1)
        if out is not None:
            d = np_activation_backward(spec.activation, out, d)
        if kind == "conv_t":
            d, gw, gb = np_conv_t_backward(p[f"{name}.weight"], c, d, STRIDE if j <= n else 1)
        else:
            d, gw, gb = _dense_per_sample(c["h"], p[f"{name}.weight"], d)
        grads[f"{name}.weight"], grads[f"{name}.bias"] = _sum_samples(gw, lead, per_example), _sum_samples(gb, lead, per_example)
    return d.reshape(*lead, d.shape[-1])


def _dense_per_sample(h: np.ndarray, w: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(d input, per-sample d weight (N, in, out), per-sample d bias (N, out)) of h w + b."""
    d_in, _, _ = np_dense_backward(h, w, d, per_example=False)
    return d_in, np.einsum("ni,no->nio", h, d), d


def np_pre_activations(cache: dict[str, Any]) -> list[np.ndarray]:
    """The hidden activations of a forward pass (their signs are their pre-activations')."""
    return [out for _, _, _, out in cache["layers"] if out is not None]


def example(**fields: Any) -> ConvSpec:
    """A small instance for tests: 8 x 4 images of 2 channels (not square, more than one
    channel: a layout mix-up shows), 2 and 3 filters, dense 3, latent 2."""
    return ConvSpec(**{"x_dim": 64, "image": (8, 4, 2), "filters": (2, 3), "dense": 3, "latent": 2, "obs_sigma": 0.7, **fields})

"""What every model kind shares: the spec's common fields, the description of a parameter
(canonical shape, layout, fans), Glorot initialisation, the NumPy dense layer (forward and
backward, the oracle's building block), and the FLOP count of a training step from a list of
layers.

A model kind (`harness/models/<kind>.py`, found by `harness.models`) subclasses `ModelSpec`
with its own fields and supplies the functions listed in `harness/models/__init__.py`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from harness.schema import ConfigError, check, setting
from harness.spec import Freeze, Likelihood, choices

#: how a parameter is laid out, canonically; a framework's ops may hold it otherwise
#: (`ops.to_native` / `ops.from_native` convert):
#: dense (in, out); bias (out,); conv (kh, kw, in, out); conv_t (kh, kw, in, out), `in` being
#: the transposed convolution's input channels; dense_from_image (h*w*c, out), rows in (h, w, c)
#: order (after flattening an NHWC image); dense_to_image (in, h*w*c) and bias_to_image
#: (h*w*c,), columns in (h, w, c) order (reshaped to an NHWC image)
LAYOUTS = ("dense", "bias", "conv", "conv_t", "dense_from_image", "dense_to_image", "bias_to_image")


def _ints(value: Any) -> Any:
    """A list or tuple of (NumPy) integers as a tuple of ints; anything else unchanged (and
    refused by the type check: a string is not a list of sizes)."""
    if isinstance(value, list | tuple) and all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in value):
        return tuple(int(v) for v in value)
    return value


def _int(value: Any) -> Any:
    return int(value) if isinstance(value, np.integer) else value


def normalize(obj: Any, **values: Any) -> None:
    """Set fields of a frozen dataclass in its `__post_init__`."""
    for k, v in values.items():
        object.__setattr__(obj, k, v)


@dataclass(frozen=True)
class ModelSpec:
    """The fields every VAE shares: x (x_dim values per example) -> encoder -> (mean,
    log-variance) of `latent` Gaussians -> z -> decoder -> Bernoulli logits or Gaussian means
    with fixed standard deviation `obs_sigma`. A kind adds its own fields (subclass) and is
    named by `kind`. Validated when built, by the rules on the fields."""

    x_dim: int = setting(64, gt=0)
    latent: int = setting(8, gt=0)
    likelihood: Likelihood = setting("bernoulli", choices=choices(Likelihood))
    obs_sigma: float = setting(1.0, gt=0)  # the Gaussian likelihood's standard deviation
    stop_gradient_z: bool = False  # negative control: detach z from the encoder
    freeze: Freeze = setting("none", choices=choices(Freeze))  # block that gets no gradient
    kind: str = "?"  # set by each kind

    def __post_init__(self) -> None:
        if type(self) is ModelSpec:
            from harness.models import MODELS

            raise TypeError(f"ModelSpec is what the model kinds share: build a kind's spec ("
                            f"{', '.join(m.Spec.__name__ for m in MODELS.values())}) or pass a mapping with `kind`")
        fixes = {k: _ints(v) for k, v in vars(self).items() if isinstance(v, list | tuple)}
        fixes.update({k: _int(v) for k, v in vars(self).items() if isinstance(v, np.integer)})
        normalize(self, **fixes)
        check(self, f"{type(self).__name__}.")
        normalize(self, **{k: float(v) for k, v in vars(self).items() if k == "obs_sigma"})
        self.validate()

    def validate(self) -> None:
        """Cross-field rules of a kind (ConfigError naming the field)."""

    # -- what the kind module says about this spec --------------------------------------------------
    @property
    def module(self) -> Any:
        from harness.models import module_of

        return module_of(self)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The canonical shape of one example: (x_dim,), or an image (h, w, c)."""
        return (self.x_dim,)

    def params(self) -> dict[str, Param]:
        """Canonical parameter names (encoder first, layers in order) and their descriptions."""
        return self.module.params(self)  # type: ignore[no-any-return]

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Canonical parameter names and shapes, encoder first, layers in order."""
        return {k: p.shape for k, p in self.params().items()}

    def n_layers(self, block: str) -> int:
        """How many layers (weight tensors) `block` has."""
        return sum(1 for k in self.params() if k.startswith(f"{block}.") and k.endswith(".weight"))

    def describe(self) -> str:
        """One line for tables: the kind and its shape."""
        return str(self.module.describe(self))


@dataclass(frozen=True)
class Param:
    """One parameter: its canonical shape and layout (LAYOUTS), the fans Glorot draws it with
    (None: zeros, for biases), and the image (h, w, c) an *_image layout flattens or makes."""

    shape: tuple[int, ...]
    layout: str
    fans: tuple[int, int] | None = None
    image: tuple[int, int, int] | None = None


def dense_param(n_in: int, n_out: int, layout: str = "dense", image: tuple[int, int, int] | None = None) -> Param:
    return Param((n_in, n_out), layout, (n_in, n_out), image)


def bias_param(n: int, layout: str = "bias", image: tuple[int, int, int] | None = None) -> Param:
    return Param((n,), layout, None, image)


def glorot(params: Mapping[str, Param], seed: int, dtype: str = "float64") -> dict[str, np.ndarray]:
    """Glorot-uniform weights (limit sqrt(6 / (fan_in + fan_out)); a convolution's fans count
    its kernel's positions), zero biases; drawn in canonical order from one
    `np.random.default_rng(seed)`, in float64 (backends cast)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, p in params.items():
        if p.fans is None:
            out[name] = np.zeros(p.shape, dtype=dtype)
        else:
            limit = np.sqrt(6.0 / (p.fans[0] + p.fans[1]))
            out[name] = rng.uniform(-limit, limit, size=p.shape).astype(dtype)
    return out


# -- the NumPy oracle's dense layer ----------------------------------------------------------------


def np_dense_forward(h: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    return h @ w + b


def np_dense_backward(h: np.ndarray, w: np.ndarray, d: np.ndarray, per_example: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(d input, d weight, d bias) of y = h w + b for upstream d = dF/dy. The weight and bias
    gradients sum over every leading axis, or with `per_example` over all but the batch axis
    (the second to last), which then leads."""
    if per_example:
        hb = np.broadcast_to(h, d.shape[:-1] + h.shape[-1:]).reshape(-1, *d.shape[-2:-1], h.shape[-1])
        db = d.reshape(-1, *d.shape[-2:])
        return d @ w.T, np.einsum("kbi,kbj->bij", hb, db), db.sum(axis=0)
    d2 = d.reshape(-1, d.shape[-1])
    return d @ w.T, h.reshape(-1, h.shape[-1]).T @ d2, d2.sum(axis=0)


def np_activation(name: str, h: np.ndarray) -> np.ndarray:
    return np.maximum(h, 0.0) if name == "relu" else np.tanh(h)


def np_activation_backward(name: str, out: np.ndarray, d: np.ndarray) -> np.ndarray:
    """d through the activation that produced `out`; relu'(0) = 0 (out > 0 iff its input is)."""
    return d * ((out > 0) if name == "relu" else 1.0 - out**2)


# -- FLOPs ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerFlops:
    """A layer's multiply-add FLOP (2 per multiply-add) per example in the forward pass; its
    weight gradient and its input gradient cost the same again each (dense: h^T dY and dY W^T;
    a convolution's are convolutions of the same size)."""

    block: str
    index: int  # position within its block (0: the block's first layer)
    forward: int


@dataclass(frozen=True)
class Layer:
    """One layer as the throughput measure times it alone: `op` (an ops function: "dense",
    "conv2d", "conv2d_transpose"), its parameters, stride, and the canonical shape of one
    example of its input."""

    name: str  # e.g. "decoder.1 conv_t 3x3 64->64 /2"
    op: str
    weight: str
    bias: str
    in_shape: tuple[int, ...]
    stride: int = 1


def dense_layers(params: Mapping[str, Param], shapes_in: Mapping[str, tuple[int, ...]] | None = None) -> list[Layer]:
    """The dense layers of `params` (layout dense*, one Layer per weight), inputs (in,)."""
    out = []
    for name, p in params.items():
        if name.endswith(".weight") and p.layout.startswith("dense"):
            stem = name.removesuffix(".weight")
            out.append(Layer(f"{stem} dense {p.shape[0]}->{p.shape[1]}", "dense", name, f"{stem}.bias", (p.shape[0],)))
    return out


def reduction_terms(layers: list[Layer]) -> dict[str, int]:
    """Per parameter, the terms per example that its gradient sums: a dense layer's weight and
    bias 1 (the batch alone); a convolution's weight and bias its output positions; a transposed
    convolution's weight its input positions (each input pixel's window) and its bias its output
    positions. A batch of B examples sums B times as many. The conformance measure's rounding
    floor grows with the square root of this length (summation in an unknown order)."""
    out: dict[str, int] = {}
    for layer in layers:
        spatial = math.prod(layer.in_shape[:-1]) if len(layer.in_shape) > 1 else 1
        s = layer.stride
        if layer.op == "dense":
            out[layer.weight] = out[layer.bias] = 1
        elif layer.op == "conv2d":
            h, w = layer.in_shape[0], layer.in_shape[1]
            out[layer.weight] = out[layer.bias] = math.ceil(h / s) * math.ceil(w / s)
        elif layer.op == "conv2d_transpose":
            out[layer.weight], out[layer.bias] = spatial, spatial * s * s
        else:
            raise ValueError(f"reduction_terms: unknown layer op {layer.op!r} ({layer.name})")
    return out


#: FLOP per parameter of one optimizer update (see `step_flops`)
OPTIMIZER_FLOPS_PER_PARAM = {"adam": 12, "sgd": 2, "sgd_momentum": 4}


def layer_step_flops(layers: list[LayerFlops], spec: ModelSpec, batch: int) -> int:
    """FLOP of the layers in one training step, counted only where autograd computes them:
    forward always; weight gradients of every layer of a trained block (none for model.freeze's
    block); input gradients of a layer when something below it needs a gradient: never for the
    first encoder layer (x needs none); for the first decoder layer (input z) only if the
    gradient flows through z into a trained encoder (not stop_gradient_z, not freeze=encoder);
    for a later layer of a block if that block is trained or the gradient must pass through it
    to z and on to the encoder."""
    B = int(batch)
    enc_trained = spec.freeze != "encoder"
    dec_trained = spec.freeze != "decoder"
    to_encoder = enc_trained and not spec.stop_gradient_z
    total = 0
    for layer in layers:
        mm = B * layer.forward
        trained = enc_trained if layer.block == "encoder" else dec_trained
        total += mm + (mm if trained else 0)
        if layer.block == "encoder":
            needs_input_grad = enc_trained and layer.index > 0
        else:
            needs_input_grad = to_encoder or (dec_trained and layer.index > 0)
        if needs_input_grad:
            total += mm
    return total


def optimizer_flops(spec: ModelSpec, optim: str = "adam", momentum: float = 0.0) -> int:
    """FLOP of one optimizer update, per parameter: Adam 12 (first moment b1 m + (1 - b1) g: 3;
    second moment b2 v + (1 - b2) g^2: 4; sqrt, + eps, divide, times the step size, subtract:
    5; the bias corrections are per-tensor scalars folded into the step size and eps);
    SGD 2 (lr g, subtract), 4 with momentum."""
    n = sum(math.prod(s) for s in spec.param_shapes().values())
    key = "adam" if optim == "adam" else ("sgd_momentum" if momentum else "sgd")
    return OPTIMIZER_FLOPS_PER_PARAM[key] * n


def step_flops(spec: ModelSpec, batch: int, optim: str = "adam", momentum: float = 0.0) -> int:
    """Analytic FLOP count of one training step (forward, ELBO, backward, optimizer update):
    the kind's layers (`layer_step_flops`) plus the optimizer's update. Neglected: elementwise
    work (bias adds, activations, the reparameterisation, the likelihood, the KL), O(B x sum of
    layer widths) against O(B x the layers' multiply-adds): under 1% for the default models."""
    return layer_step_flops(spec.module.layer_flops(spec), spec, batch) + optimizer_flops(spec, optim, momentum)


def refuse(spec: ModelSpec, field: str, message: str) -> ConfigError:
    """A ConfigError naming `field` of `spec`'s class."""
    return ConfigError(f"{type(spec).__name__}.{field}", message)

"""The VAE's loss parts, reparameterised sample and IWAE log-weights, written once over a
framework's primitive ops (`impls.<fw>.ops`: exp, softplus, sum, logsumexp, stop_gradient...),
on top of the model kind's encoder and decoder (`harness.models.<kind>`).

Shapes: x is (B, *input) in the framework's own layout (or one example, without B, where a
framework vectorises per example); eps is (B, L) or (K, B, L) (K samples per example: the
reconstruction term is then averaged over K). Every function returns per-example values.

    recon = -E_q[log p(x|z)],  kl = KL(q(z|x) || N(0, I)),  loss = recon + kl = -ELBO
    log w = log p(x|z) + log N(z; 0, I) - log q(z|x),  IWAE_K = log (1/K) sum_k w_k
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from harness.models.base import ModelSpec

LOG_2PI = math.log(2.0 * math.pi)


def frozen(ops: Any, params: Mapping[str, Any], spec: ModelSpec) -> Mapping[str, Any]:
    """`params` with the block `spec.freeze` names cut from the gradient."""
    if spec.freeze == "none":
        return params
    return {k: (ops.stop_gradient(v) if k.startswith(spec.freeze + ".") else v) for k, v in params.items()}


def _policy(ops: Any, params: Mapping[str, Any], x: Any, other: str) -> tuple[Mapping[str, Any], Any]:
    """Under mixed precision (the ops carry the policy's `compute` type: `impls.base.formulation`),
    a block's weights (all but the `other` block's) and its input cast to the compute type: the
    layers run in it, the float32 weights get float32 gradients through the cast. Biases (the
    vectors) stay float32: the ops add them in float32 (`impls.base.formulation`), so their
    gradient, a sum over the batch and an image's pixels, is never held in the low type (the conv
    VAE's output-bias gradient, 285 at initialisation, overflows float16 at any loss scale above 229)."""
    low = getattr(ops, "compute", None)
    if low is None:
        return params, x
    block = {k: v for k, v in params.items() if not k.startswith(other + ".")}
    return {k: v if ops.ndim(v) == 1 else ops.cast(v, low) for k, v in block.items()}, ops.cast(x, low)


def _accumulate(ops: Any, out: Any) -> Any:
    """A block's output in the policy's accumulation type (float32 under mixed precision): the
    distribution heads, the sample, every loss part and reduction are computed in it."""
    acc = getattr(ops, "accumulate", None)
    return out if acc is None else ops.cast(out, acc)


def encode(ops: Any, params: Mapping[str, Any], x: Any, spec: ModelSpec) -> tuple[Any, Any]:
    """The mean and log-variance of q(z|x), each (..., L)."""
    params, x = _policy(ops, params, x, "decoder")
    out = _accumulate(ops, spec.module.encode(ops, params, x, spec))
    return out[..., : spec.latent], out[..., spec.latent :]


def decode(ops: Any, params: Mapping[str, Any], z: Any, spec: ModelSpec) -> Any:
    """Bernoulli logits or Gaussian means of p(x|z), (..., *input)."""
    params, z = _policy(ops, params, z, "encoder")
    return _accumulate(ops, spec.module.decode(ops, params, z, spec))


def event_axes(spec: ModelSpec) -> tuple[int, ...]:
    """The trailing axes of one example (whatever the framework's layout of them)."""
    return tuple(range(-len(spec.input_shape), 0))


def log_px_given_z(ops: Any, out: Any, x: Any, spec: ModelSpec) -> Any:
    """log p(x|z) summed over one example's values."""
    if spec.likelihood == "bernoulli":
        return ops.sum(x * out - ops.softplus(out), event_axes(spec))
    s = spec.obs_sigma
    return ops.sum(-0.5 * ((x - out) / s) ** 2 - math.log(s) - 0.5 * LOG_2PI, event_axes(spec))


def sample_z(ops: Any, mu: Any, logvar: Any, eps: Any, spec: ModelSpec) -> Any:
    """The reparameterised z = mu + exp(logvar / 2) eps (cut from the gradient under the
    negative control `stop_gradient_z`)."""
    z = mu + ops.exp(0.5 * logvar) * eps
    return ops.stop_gradient(z) if spec.stop_gradient_z else z


def terms_at(ops: Any, params: Mapping[str, Any], x: Any, mu: Any, logvar: Any, eps: Any, spec: ModelSpec) -> tuple[Any, Any]:
    """Per-example (recon, kl) for q(z|x) = N(mu, exp(logvar)): the encoder's output, or
    per-example variational parameters given directly (local inference)."""
    z = sample_z(ops, mu, logvar, eps, spec)
    ll = log_px_given_z(ops, decode(ops, params, z, spec), x, spec)
    recon = -(ops.mean(ll, 0) if ops.ndim(eps) == 3 else ll)
    kl = 0.5 * ops.sum(mu**2 + ops.exp(logvar) - 1.0 - logvar, (-1,))
    return recon, kl


def loss_terms(ops: Any, params: Mapping[str, Any], x: Any, eps: Any, spec: ModelSpec) -> tuple[Any, Any]:
    """Per-example (recon, kl), as differentiated in training (honours `freeze`)."""
    params = frozen(ops, params, spec)
    mu, logvar = encode(ops, params, x, spec)
    return terms_at(ops, params, x, mu, logvar, eps, spec)


def log_normal_diag(ops: Any, z: Any, mu: Any, logvar: Any) -> Any:
    return ops.sum(-0.5 * (LOG_2PI + logvar + (z - mu) ** 2 * ops.exp(-logvar)), (-1,))


def log_weights_at(ops: Any, params: Mapping[str, Any], x: Any, z: Any, mu: Any, logvar: Any, spec: ModelSpec) -> Any:
    """log p(x | z) + log N(z; 0, I) - log q(z | x) for z of shape (K, B, L): shape (K, B)."""
    log_prior = ops.sum(-0.5 * (LOG_2PI + z**2), (-1,))
    return log_px_given_z(ops, decode(ops, params, z, spec), x, spec) + log_prior - log_normal_diag(ops, z, mu, logvar)


def iwae_log_weights(ops: Any, params: Mapping[str, Any], x: Any, eps: Any, spec: ModelSpec) -> Any:
    """log p(x, z_k) - log q(z_k | x) for eps of shape (K, B, L): shape (K, B)."""
    mu, logvar = encode(ops, params, x, spec)
    z = mu + ops.exp(0.5 * logvar) * eps
    return log_weights_at(ops, params, x, z, mu, logvar, spec)


def iwae_bound(ops: Any, params: Mapping[str, Any], x: Any, eps: Any, spec: ModelSpec) -> Any:
    """Per-example IWAE-K bound log (1/K) sum_k w_k for eps of shape (K, B, L), shape (B,), as
    differentiated in training (honours `freeze` and `stop_gradient_z`, as `loss_terms` does)."""
    params = frozen(ops, params, spec)
    mu, logvar = encode(ops, params, x, spec)
    z = sample_z(ops, mu, logvar, eps, spec)
    return ops.logsumexp(log_weights_at(ops, params, x, z, mu, logvar, spec), 0) - math.log(ops.shape(eps)[0])

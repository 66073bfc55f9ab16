"""The VAE in JAX, as pure functions of a parameter dict (canonical layout: W is in x out).

Matmul precision is not fixed here: the backend runs these under
`jax.default_matmul_precision(...)` ("highest" unless TF32 is allowed).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from harness.api import ModelSpec

LOG_2PI = math.log(2.0 * math.pi)


def dense_stack(params: dict[str, jax.Array], block: str, h: jax.Array, spec: ModelSpec) -> jax.Array:
    n = spec.n_layers(block)
    for i in range(n):
        h = h @ params[f"{block}.{i}.weight"] + params[f"{block}.{i}.bias"]
        if i < n - 1:
            h = jax.nn.relu(h) if spec.activation == "relu" else jnp.tanh(h)
    return h


def encode(params: dict[str, jax.Array], x: jax.Array, spec: ModelSpec) -> tuple[jax.Array, jax.Array]:
    out = dense_stack(params, "encoder", x, spec)
    return out[..., : spec.latent], out[..., spec.latent :]


def decode(params: dict[str, jax.Array], z: jax.Array, spec: ModelSpec) -> jax.Array:
    return dense_stack(params, "decoder", z, spec)


def log_px_given_z(out: jax.Array, x: jax.Array, spec: ModelSpec) -> jax.Array:
    if spec.likelihood == "bernoulli":
        return jnp.sum(x * out - jax.nn.softplus(out), axis=-1)
    s = spec.obs_sigma
    return jnp.sum(-0.5 * ((x - out) / s) ** 2 - math.log(s) - 0.5 * LOG_2PI, axis=-1)


def sample_z(mu: jax.Array, logvar: jax.Array, eps: jax.Array, spec: ModelSpec) -> jax.Array:
    z = mu + jnp.exp(0.5 * logvar) * eps
    return jax.lax.stop_gradient(z) if spec.stop_gradient_z else z


def loss_terms(
    params: dict[str, jax.Array], x: jax.Array, eps: jax.Array, spec: ModelSpec
) -> tuple[jax.Array, jax.Array]:
    """Per-example (recon, kl). eps is (B, L) or (K, B, L)."""
    if spec.freeze != "none":
        params = {k: (jax.lax.stop_gradient(v) if k.startswith(spec.freeze + ".") else v) for k, v in params.items()}
    mu, logvar = encode(params, x, spec)
    return terms_at(params, x, mu, logvar, eps, spec)


def terms_at(
    params: dict[str, jax.Array], x: jax.Array, mu: jax.Array, logvar: jax.Array, eps: jax.Array, spec: ModelSpec
) -> tuple[jax.Array, jax.Array]:
    """Per-example (recon, kl) for q(z|x) = N(mu, exp(logvar)): the encoder's output, or
    per-example variational parameters given directly (local inference)."""
    z = sample_z(mu, logvar, eps, spec)
    ll = log_px_given_z(decode(params, z, spec), x, spec)
    recon = -(ll.mean(axis=0) if eps.ndim == 3 else ll)
    kl = 0.5 * jnp.sum(mu**2 + jnp.exp(logvar) - 1.0 - logvar, axis=-1)
    return recon, kl


def log_normal_diag(z: jax.Array, mu: jax.Array, logvar: jax.Array) -> jax.Array:
    return jnp.sum(-0.5 * (LOG_2PI + logvar + (z - mu) ** 2 * jnp.exp(-logvar)), axis=-1)


def log_weights_at(
    params: dict[str, jax.Array], x: jax.Array, z: jax.Array, mu: jax.Array, logvar: jax.Array, spec: ModelSpec
) -> jax.Array:
    """log p(x | z) + log N(z; 0, I) - log q(z | x) for z of shape (K, B, L): shape (K, B)."""
    log_prior = jnp.sum(-0.5 * (LOG_2PI + z**2), axis=-1)
    return log_px_given_z(decode(params, z, spec), x, spec) + log_prior - log_normal_diag(z, mu, logvar)


def iwae_log_weights(params: dict[str, jax.Array], x: jax.Array, eps: jax.Array, spec: ModelSpec) -> jax.Array:
    """log p(x, z_k) - log q(z_k | x) for eps of shape (K, B, L): shape (K, B)."""
    mu, logvar = encode(params, x, spec)
    z = mu + jnp.exp(0.5 * logvar) * eps
    return log_weights_at(params, x, z, mu, logvar, spec)


def iwae_bound(params: dict[str, jax.Array], x: jax.Array, eps: jax.Array, spec: ModelSpec) -> jax.Array:
    """Per-example IWAE-K bound log (1/K) sum_k w_k for eps of shape (K, B, L), shape (B,), as
    differentiated in training (honours `freeze` and `stop_gradient_z`, as `loss_terms` does)."""
    if spec.freeze != "none":
        params = {k: (jax.lax.stop_gradient(v) if k.startswith(spec.freeze + ".") else v) for k, v in params.items()}
    mu, logvar = encode(params, x, spec)
    z = sample_z(mu, logvar, eps, spec)
    return jax.nn.logsumexp(log_weights_at(params, x, z, mu, logvar, spec), axis=0) - math.log(eps.shape[0])

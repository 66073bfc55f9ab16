"""The VAE in TensorFlow, as pure functions of a parameter dict (canonical layout: W is in x out)."""

from __future__ import annotations

import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from harness.api import ModelSpec  # noqa: E402

LOG_2PI = math.log(2.0 * math.pi)


def dense_stack(params: dict[str, tf.Tensor], block: str, h: tf.Tensor, spec: ModelSpec) -> tf.Tensor:
    n = spec.n_layers(block)
    for i in range(n):
        h = h @ params[f"{block}.{i}.weight"] + params[f"{block}.{i}.bias"]
        if i < n - 1:
            h = tf.nn.relu(h) if spec.activation == "relu" else tf.tanh(h)
    return h


def encode(params: dict[str, tf.Tensor], x: tf.Tensor, spec: ModelSpec) -> tuple[tf.Tensor, tf.Tensor]:
    out = dense_stack(params, "encoder", x, spec)
    return out[..., : spec.latent], out[..., spec.latent :]


def decode(params: dict[str, tf.Tensor], z: tf.Tensor, spec: ModelSpec) -> tf.Tensor:
    return dense_stack(params, "decoder", z, spec)


def log_px_given_z(out: tf.Tensor, x: tf.Tensor, spec: ModelSpec) -> tf.Tensor:
    if spec.likelihood == "bernoulli":
        return tf.reduce_sum(x * out - tf.math.softplus(out), axis=-1)
    s = spec.obs_sigma
    return tf.reduce_sum(-0.5 * ((x - out) / s) ** 2 - math.log(s) - 0.5 * LOG_2PI, axis=-1)


def sample_z(mu: tf.Tensor, logvar: tf.Tensor, eps: tf.Tensor, spec: ModelSpec) -> tf.Tensor:
    z = mu + tf.exp(0.5 * logvar) * eps
    return tf.stop_gradient(z) if spec.stop_gradient_z else z


def loss_terms(
    params: dict[str, tf.Tensor], x: tf.Tensor, eps: tf.Tensor, spec: ModelSpec
) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-example (recon, kl). eps is (B, L) or (K, B, L) (its rank must be static)."""
    if spec.freeze != "none":
        params = {k: (tf.stop_gradient(v) if k.startswith(spec.freeze + ".") else v) for k, v in params.items()}
    mu, logvar = encode(params, x, spec)
    return terms_at(params, x, mu, logvar, eps, spec)


def terms_at(
    params: dict[str, tf.Tensor], x: tf.Tensor, mu: tf.Tensor, logvar: tf.Tensor, eps: tf.Tensor, spec: ModelSpec
) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-example (recon, kl) for q(z|x) = N(mu, exp(logvar)): the encoder's output, or
    per-example variational parameters given directly (local inference)."""
    z = sample_z(mu, logvar, eps, spec)
    ll = log_px_given_z(decode(params, z, spec), x, spec)
    recon = -(tf.reduce_mean(ll, axis=0) if eps.shape.rank == 3 else ll)
    kl = 0.5 * tf.reduce_sum(mu**2 + tf.exp(logvar) - 1.0 - logvar, axis=-1)
    return recon, kl


def log_normal_diag(z: tf.Tensor, mu: tf.Tensor, logvar: tf.Tensor) -> tf.Tensor:
    return tf.reduce_sum(-0.5 * (LOG_2PI + logvar + (z - mu) ** 2 * tf.exp(-logvar)), axis=-1)


def log_weights_at(
    params: dict[str, tf.Tensor], x: tf.Tensor, z: tf.Tensor, mu: tf.Tensor, logvar: tf.Tensor, spec: ModelSpec
) -> tf.Tensor:
    """log p(x | z) + log N(z; 0, I) - log q(z | x) for z of shape (K, B, L): shape (K, B)."""
    log_prior = tf.reduce_sum(-0.5 * (LOG_2PI + z**2), axis=-1)
    return log_px_given_z(decode(params, z, spec), x, spec) + log_prior - log_normal_diag(z, mu, logvar)


def iwae_log_weights(params: dict[str, tf.Tensor], x: tf.Tensor, eps: tf.Tensor, spec: ModelSpec) -> tf.Tensor:
    """log p(x, z_k) - log q(z_k | x) for eps of shape (K, B, L): shape (K, B)."""
    mu, logvar = encode(params, x, spec)
    z = mu + tf.exp(0.5 * logvar) * eps
    return log_weights_at(params, x, z, mu, logvar, spec)


def iwae_bound(params: dict[str, tf.Tensor], x: tf.Tensor, eps: tf.Tensor, spec: ModelSpec) -> tf.Tensor:
    """Per-example IWAE-K bound log (1/K) sum_k w_k for eps of shape (K, B, L), shape (B,), as
    differentiated in training (honours `freeze` and `stop_gradient_z`, as `loss_terms` does)."""
    if spec.freeze != "none":
        params = {k: (tf.stop_gradient(v) if k.startswith(spec.freeze + ".") else v) for k, v in params.items()}
    mu, logvar = encode(params, x, spec)
    z = sample_z(mu, logvar, eps, spec)
    log_k = math.log(int(eps.shape[0]))
    return tf.reduce_logsumexp(log_weights_at(params, x, z, mu, logvar, spec), axis=0) - log_k

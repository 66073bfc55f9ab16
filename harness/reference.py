"""An independent NumPy implementation of the VAE's loss parts.

Tests and the conformance measure compare every backend against this. It shares only the
canonical parameter layout with the backends, no code.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from harness.api import ModelSpec, Terms

LOG_2PI = float(np.log(2.0 * np.pi))


def _mlp(params: Mapping[str, np.ndarray], block: str, h: np.ndarray, spec: ModelSpec) -> np.ndarray:
    n = spec.n_layers(block)
    for i in range(n):
        h = h @ params[f"{block}.{i}.weight"] + params[f"{block}.{i}.bias"]
        if i < n - 1:
            h = np.maximum(h, 0.0) if spec.activation == "relu" else np.tanh(h)
    return h


def encode(params: Mapping[str, np.ndarray], x: np.ndarray, spec: ModelSpec) -> tuple[np.ndarray, np.ndarray]:
    out = _mlp(params, "encoder", x, spec)
    return out[..., : spec.latent], out[..., spec.latent :]


def decode(params: Mapping[str, np.ndarray], z: np.ndarray, spec: ModelSpec) -> np.ndarray:
    return _mlp(params, "decoder", z, spec)


def log_px_given_z(out: np.ndarray, x: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """log p(x|z) summed over dimensions; `out` is logits or Gaussian means."""
    if spec.likelihood == "bernoulli":
        # x*l - softplus(l), stably
        return np.sum(x * out - np.logaddexp(0.0, out), axis=-1)
    s = spec.obs_sigma
    return np.sum(-0.5 * ((x - out) / s) ** 2 - np.log(s) - 0.5 * LOG_2PI, axis=-1)


def terms(params: Mapping[str, np.ndarray], x: np.ndarray, eps: np.ndarray, spec: ModelSpec) -> Terms:
    """Per-example recon = -E_q[log p(x|z)] (averaged over the K noise samples) and
    kl = KL(q(z|x) || N(0, I)) in closed form."""
    mu, logvar = encode(params, x, spec)
    z = mu + np.exp(0.5 * logvar) * eps  # eps (B, L) or (K, B, L) broadcasts
    ll = log_px_given_z(decode(params, z, spec), x, spec)
    recon = -(ll.mean(axis=0) if eps.ndim == 3 else ll)
    kl = 0.5 * np.sum(mu**2 + np.exp(logvar) - 1.0 - logvar, axis=-1)
    return Terms(recon=recon, kl=kl)


def activation_pattern(params: Mapping[str, np.ndarray], x: np.ndarray, eps: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """Signs of every hidden pre-activation (encoder and decoder) as one flat boolean array.
    Two parameter points with the same pattern lie on the same smooth piece of a ReLU net."""
    signs = []

    def walk(block: str, h: np.ndarray) -> np.ndarray:
        n = spec.n_layers(block)
        for i in range(n):
            h = h @ params[f"{block}.{i}.weight"] + params[f"{block}.{i}.bias"]
            if i < n - 1:
                signs.append((h > 0).ravel())
                h = np.maximum(h, 0.0) if spec.activation == "relu" else np.tanh(h)
        return h

    out = walk("encoder", x)
    mu, logvar = out[..., : spec.latent], out[..., spec.latent :]
    walk("decoder", mu + np.exp(0.5 * logvar) * eps)
    return np.concatenate(signs) if signs else np.zeros(0, dtype=bool)


def log_normal_diag(z: np.ndarray, mu: np.ndarray, logvar: np.ndarray) -> np.ndarray:
    return np.sum(-0.5 * (LOG_2PI + logvar + (z - mu) ** 2 / np.exp(logvar)), axis=-1)


def iwae(params: Mapping[str, np.ndarray], x: np.ndarray, eps: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """IWAE bound per example with given noise eps of shape (K, B, L)."""
    mu, logvar = encode(params, x, spec)
    z = mu + np.exp(0.5 * logvar) * eps
    log_w = (
        log_px_given_z(decode(params, z, spec), x, spec)
        + log_normal_diag(z, np.zeros_like(z), np.zeros_like(z))
        - log_normal_diag(z, mu, logvar)
    )
    m = log_w.max(axis=0)
    return m + np.log(np.mean(np.exp(log_w - m), axis=0))

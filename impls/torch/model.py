"""The VAE in PyTorch, as pure functions of a parameter dict (canonical layout: W is in x out)."""

from __future__ import annotations

import math

import torch

from harness.api import ModelSpec

LOG_2PI = math.log(2.0 * math.pi)


def dense_stack(params: dict[str, torch.Tensor], block: str, h: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    n = spec.n_layers(block)
    for i in range(n):
        h = h @ params[f"{block}.{i}.weight"] + params[f"{block}.{i}.bias"]
        if i < n - 1:
            h = torch.relu(h) if spec.activation == "relu" else torch.tanh(h)
    return h


def encode(params: dict[str, torch.Tensor], x: torch.Tensor, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    out = dense_stack(params, "encoder", x, spec)
    return out[..., : spec.latent], out[..., spec.latent :]


def decode(params: dict[str, torch.Tensor], z: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    return dense_stack(params, "decoder", z, spec)


def log_px_given_z(out: torch.Tensor, x: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    if spec.likelihood == "bernoulli":
        return torch.sum(x * out - torch.nn.functional.softplus(out), dim=-1)
    s = spec.obs_sigma
    return torch.sum(-0.5 * ((x - out) / s) ** 2 - math.log(s) - 0.5 * LOG_2PI, dim=-1)


def sample_z(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    z = mu + torch.exp(0.5 * logvar) * eps
    return z.detach() if spec.stop_gradient_z else z


def loss_terms(
    params: dict[str, torch.Tensor], x: torch.Tensor, eps: torch.Tensor, spec: ModelSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example (recon, kl). eps is (B, L) or (K, B, L)."""
    if spec.freeze != "none":
        params = {k: (v.detach() if k.startswith(spec.freeze + ".") else v) for k, v in params.items()}
    mu, logvar = encode(params, x, spec)
    return terms_at(params, x, mu, logvar, eps, spec)


def terms_at(
    params: dict[str, torch.Tensor], x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor, spec: ModelSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example (recon, kl) for q(z|x) = N(mu, exp(logvar)): the encoder's output, or
    per-example variational parameters given directly (local inference)."""
    z = sample_z(mu, logvar, eps, spec)
    ll = log_px_given_z(decode(params, z, spec), x, spec)
    recon = -(ll.mean(dim=0) if eps.dim() == 3 else ll)
    kl = 0.5 * torch.sum(mu**2 + torch.exp(logvar) - 1.0 - logvar, dim=-1)
    return recon, kl


def log_normal_diag(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return torch.sum(-0.5 * (LOG_2PI + logvar + (z - mu) ** 2 * torch.exp(-logvar)), dim=-1)


def log_weights_at(
    params: dict[str, torch.Tensor], x: torch.Tensor, z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, spec: ModelSpec
) -> torch.Tensor:
    """log p(x | z) + log N(z; 0, I) - log q(z | x) for z of shape (K, B, L): shape (K, B)."""
    log_prior = torch.sum(-0.5 * (LOG_2PI + z**2), dim=-1)
    return log_px_given_z(decode(params, z, spec), x, spec) + log_prior - log_normal_diag(z, mu, logvar)


def iwae_log_weights(params: dict[str, torch.Tensor], x: torch.Tensor, eps: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """log p(x, z_k) - log q(z_k | x) for eps of shape (K, B, L): shape (K, B)."""
    mu, logvar = encode(params, x, spec)
    z = mu + torch.exp(0.5 * logvar) * eps
    return log_weights_at(params, x, z, mu, logvar, spec)


def iwae_bound(params: dict[str, torch.Tensor], x: torch.Tensor, eps: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """Per-example IWAE-K bound log (1/K) sum_k w_k for eps of shape (K, B, L), shape (B,), as
    differentiated in training (honours `freeze` and `stop_gradient_z`, as `loss_terms` does)."""
    if spec.freeze != "none":
        params = {k: (v.detach() if k.startswith(spec.freeze + ".") else v) for k, v in params.items()}
    mu, logvar = encode(params, x, spec)
    z = sample_z(mu, logvar, eps, spec)
    return torch.logsumexp(log_weights_at(params, x, z, mu, logvar, spec), dim=0) - math.log(eps.shape[0])

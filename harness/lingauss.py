"""The linear-Gaussian VAE, in one place: the model, its closed forms and the config of a
measure's own linear-Gaussian problem (identity, gaps, snr's toy), used by those measures, by
convergence (exact log p(x) of `model=linear`) and by `data=synthetic` (data drawn from one).

Model (canonical layout, as `model=linear`): z ~ N(0, I_L), x | z ~ N(z W + c, s^2 I_D), W of
shape (L, D); encoder q(z|x) = N(x A_mu + a_mu, diag exp(x A_v + a_v)) with
A = [A_mu | A_v] = "encoder.0.weight" (D, 2L), a = "encoder.0.bias". Marginally
x ~ N(c, W^T W + s^2 I), and the posterior is Gaussian, p(z|x) = N(m, S) with
S = (I + W W^T / s^2)^-1 and m = (x - c) W^T S / s^2 (Bishop, PRML 12.2), so log p(x), the ELBO
and KL(q || p(z|x)) are all closed forms: the identity log p(x) = ELBO + KL(q || p(z|x)) holds
to rounding error. The maximum-likelihood fit with s fixed (pPCA) is `harness.ppca`.

Everything here is float64 NumPy; nothing imports a framework.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from harness.initializers import init_params
from harness.models.base import ModelSpec
from harness.models.linear import LinearSpec
from harness.schema import setting

LOG_2PI = math.log(2.0 * math.pi)


@dataclass
class LinearGaussianConfig:
    """The fields of a measure's own linear-Gaussian problem (a measure's config extends it)."""

    x_dim: int = setting(6, gt=0)
    latent: int = setting(2, gt=0)
    obs_sigma: float = setting(0.5, gt=0)
    n_examples: int = setting(64, gt=0)  # evaluated examples


def spec(x_dim: int, latent: int, obs_sigma: float) -> ModelSpec:
    """The linear VAE with a Gaussian likelihood of fixed `obs_sigma`."""
    return LinearSpec(x_dim=x_dim, latent=latent, likelihood="gaussian", obs_sigma=obs_sigma)


def spec_of(cfg: LinearGaussianConfig) -> ModelSpec:
    return spec(cfg.x_dim, cfg.latent, cfg.obs_sigma)


# -- the problems ---------------------------------------------------------------------------------


def random_vae(s: ModelSpec, seed: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A generic linear-Gaussian VAE: the canonical initial weights of `seed` (a random encoder,
    so q is not the posterior) with non-zero biases drawn from `rng`: c ~ N(0, 0.5^2),
    a ~ N(0, 0.3^2)."""
    params = init_params(s, seed)
    params["decoder.0.bias"] = rng.normal(0.0, 0.5, size=s.x_dim)
    params["encoder.0.bias"] = rng.normal(0.0, 0.3, size=2 * s.latent)
    return params


def sample(W: np.ndarray, c: np.ndarray, sigma: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` draws of x = z W + c + sigma * noise, z ~ N(0, I) (z first, then the noise, from `rng`)."""
    latent, x_dim = W.shape
    return np.asarray(rng.standard_normal((n, latent)) @ W + c + sigma * rng.standard_normal((n, x_dim)))


@dataclass
class LinearGaussian:
    """A linear-Gaussian generative model: x = z W + b + sigma * noise, z ~ N(0, I). W has shape
    (latent, x_dim)."""

    W: np.ndarray
    b: np.ndarray
    sigma: float

    def covariance(self) -> np.ndarray:
        return self.W.T @ self.W + self.sigma**2 * np.eye(self.W.shape[1])

    def log_px(self, x: np.ndarray) -> np.ndarray:
        """Exact log N(x; b, W^T W + sigma^2 I), per example."""
        return log_px({"decoder.0.weight": self.W, "decoder.0.bias": self.b}, x, self.sigma)


def random_model(x_dim: int, latent: int, sigma: float, seed: int) -> LinearGaussian:
    """A random linear-Gaussian model (the truth `data=synthetic` and gaps draw from):
    W ~ N(0, 1/latent), b ~ N(0, 0.5^2)."""
    rng = np.random.default_rng([seed, 1])
    return LinearGaussian(
        W=rng.normal(0.0, 1.0 / np.sqrt(latent), size=(latent, x_dim)),
        b=rng.normal(0.0, 0.5, size=x_dim),
        sigma=sigma,
    )


def orthogonal_decoder_params(s: ModelSpec, seed: int) -> dict[str, np.ndarray]:
    """Decoder with orthogonal rows (W W^T diagonal) and q set to the exact (diagonal) posterior."""
    rng = np.random.default_rng([seed, 7])
    L, D, sig = s.latent, s.x_dim, s.obs_sigma
    Q, _ = np.linalg.qr(rng.standard_normal((D, D)))
    W = rng.uniform(0.5, 2.0, size=L)[:, None] * Q[:, :L].T
    c = rng.normal(size=D)
    S = np.linalg.inv(np.eye(L) + W @ W.T / sig**2)
    assert np.allclose(S, np.diag(np.diag(S)), atol=1e-12)
    A_mu = (S @ W / sig**2).T  # (D, L): mu = (x - c) W^T S / s^2
    A = np.concatenate([A_mu, np.zeros((D, L))], axis=1)
    a = np.concatenate([-c @ A_mu, np.log(np.diag(S))])
    return {"encoder.0.weight": A, "encoder.0.bias": a, "decoder.0.weight": W, "decoder.0.bias": c}


def rainforth_toy(dim: int, perturb: float, points: int, seed: int) -> tuple[ModelSpec, dict[str, np.ndarray], np.ndarray]:
    """Rainforth et al.'s (2018) toy (`harness.measures.snr`'s docstring) as canonical linear-VAE
    parameters: with the prior shifted to N(0, I), x | z ~ N(z + mu, I), so W = I, c = mu, the
    posterior mean (x - mu) / 2 (A_mu = I/2, a_mu = -mu/2) and the encoder's variance fixed at
    2/3 as in the paper; every part perturbed by `perturb` times standard normal noise. With
    `points` data points from p(x) = N(mu, 2 I)."""
    s = spec(dim, dim, 1.0)
    rng = np.random.default_rng([seed, 13])
    mu = rng.standard_normal(dim)
    x = mu + math.sqrt(2.0) * rng.standard_normal((points, dim))
    A = np.zeros((dim, 2 * dim))
    A[:, :dim] = np.eye(dim) / 2.0 + perturb * rng.standard_normal((dim, dim))
    a = np.concatenate([-mu / 2.0 + perturb * rng.standard_normal(dim), np.full(dim, math.log(2.0 / 3.0))])
    params = {
        "encoder.0.weight": A,
        "encoder.0.bias": a,
        "decoder.0.weight": np.eye(dim) + perturb * rng.standard_normal((dim, dim)),
        "decoder.0.bias": mu + perturb * rng.standard_normal(dim),
    }
    return s, params, x


# -- closed forms -------------------------------------------------------------------------------


def unpack(params: dict[str, np.ndarray], latent: int) -> tuple[np.ndarray, ...]:
    A, a = params["encoder.0.weight"], params["encoder.0.bias"]
    return A[:, :latent], a[:latent], A[:, latent:], a[latent:], params["decoder.0.weight"], params["decoder.0.bias"]


def q_params(params: dict[str, np.ndarray], x: np.ndarray, latent: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of q(z|x), per example."""
    Am, am, Av, av, _, _ = unpack(params, latent)
    return x @ Am + am, np.exp(x @ Av + av)


def log_px(params: dict[str, np.ndarray], x: np.ndarray, sigma: float) -> np.ndarray:
    """Exact log N(x; c, W^T W + s^2 I) per example."""
    W, c = params["decoder.0.weight"], params["decoder.0.bias"]
    cov = W.T @ W + sigma**2 * np.eye(W.shape[1])
    chol = np.linalg.cholesky(cov)
    sol = np.linalg.solve(chol, (x - c).T)
    return -0.5 * (np.sum(sol**2, axis=0) + 2.0 * np.sum(np.log(np.diag(chol))) + x.shape[1] * LOG_2PI)


def posterior(params: dict[str, np.ndarray], x: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact p(z|x) = N(m, S): S = (I + W W^T / s^2)^-1 (shared), m = S W (x - c) / s^2."""
    W, c = params["decoder.0.weight"], params["decoder.0.bias"]
    S = np.linalg.inv(np.eye(W.shape[0]) + W @ W.T / sigma**2)
    return (x - c) @ W.T @ S / sigma**2, S


def elbo(params: dict[str, np.ndarray], x: np.ndarray, sigma: float, latent: int) -> np.ndarray:
    """The ELBO with the expectation over q taken analytically."""
    W, c = params["decoder.0.weight"], params["decoder.0.bias"]
    mu, var = q_params(params, x, latent)
    sq = np.sum((x - c - mu @ W) ** 2, axis=1) + var @ np.sum(W**2, axis=1)
    expected_ll = -0.5 * x.shape[1] * (LOG_2PI + 2.0 * math.log(sigma)) - 0.5 * sq / sigma**2
    kl_prior = 0.5 * np.sum(mu**2 + var - 1.0 - np.log(var), axis=1)
    return np.asarray(expected_ll - kl_prior)


def kl_to_posterior(params: dict[str, np.ndarray], x: np.ndarray, sigma: float, latent: int) -> np.ndarray:
    """KL(N(mu, diag var) || N(m, S)) per example."""
    mu, var = q_params(params, x, latent)
    m, S = posterior(params, x, sigma)
    P = np.linalg.inv(S)
    d = m - mu
    _, logdet_S = np.linalg.slogdet(S)
    return np.asarray(
        0.5 * (var @ np.diag(P) + np.einsum("bi,ij,bj->b", d, P, d) - latent + logdet_S - np.sum(np.log(var), axis=1))
    )


def best_diagonal(params: dict[str, np.ndarray], x: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """q* = argmin over diagonal Gaussians of KL(q || p(z|x)): the posterior mean (B, L) and the
    variances 1 / diag(Lambda) (L,), Lambda = I + W W^T / s^2 the posterior precision."""
    m, _ = posterior(params, x, sigma)
    W = params["decoder.0.weight"]
    lam = np.eye(W.shape[0]) + W @ W.T / sigma**2
    return m, 1.0 / np.diag(lam)


def approximation_gap(params: dict[str, np.ndarray], sigma: float) -> float:
    """KL(q* || p(z|x)) = (sum_i log Lambda_ii - log det Lambda) / 2, the same for every x."""
    W = params["decoder.0.weight"]
    lam = np.eye(W.shape[0]) + W @ W.T / sigma**2
    _, logdet = np.linalg.slogdet(lam)
    return float(0.5 * (np.sum(np.log(np.diag(lam))) - logdet))


def kl_diag_gaussians_to_posterior(mu: np.ndarray, var: np.ndarray, m: np.ndarray, S: np.ndarray) -> np.ndarray:
    """KL(N(mu_b, diag var_b) || N(m_b, S)) per example, the general formula (no shortcut)."""
    P = np.linalg.inv(S)
    d = m - mu
    var = np.broadcast_to(var, mu.shape)
    _, logdet_S = np.linalg.slogdet(S)
    return np.asarray(0.5 * (var @ np.diag(P) + np.einsum("bi,ij,bj->b", d, P, d) - mu.shape[1] + logdet_S
                             - np.sum(np.log(var), axis=1)))


def sigma_points(latent: int, batch: int) -> np.ndarray:
    """(2L, B, L) noise +- sqrt(L) e_j: equal-weight average is exact for quadratics in z."""
    e = math.sqrt(latent) * np.eye(latent)
    pts = np.concatenate([e, -e])
    return np.repeat(pts[:, None, :], batch, axis=1)

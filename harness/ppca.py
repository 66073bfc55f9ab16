"""The best a linear-Gaussian VAE can do: maximum-likelihood probabilistic PCA with the
observation noise sigma FIXED (the decoder's `model.obs_sigma`), in closed form.

Model (canonical layout, as the linear VAE): z ~ N(0, I_L), x | z ~ N(z W + c, sigma^2 I_D),
W of shape (L, D). Marginally x ~ N(c, C) with C = W^T W + sigma^2 I.

Derivation (Tipping & Bishop 1999, section 3.2, with sigma held fixed). On N training
examples the mean log-likelihood is

    l(W, c) = -1/2 [D log 2 pi + log|C| + tr(C^-1 S_c)],   S_c = mean_n (x_n - c)(x_n - c)^T.

1. c: dl/dc = C^-1 (xbar - c) = 0, so c = xbar (the sample mean) and S_c = S, the sample
   covariance (divided by N), with eigenvalues lambda_1 >= ... >= lambda_D, eigenvectors u_i.
2. W: with M = W^T (D x L), dl/dM = C^-1 S C^-1 M - C^-1 M = 0, i.e. S C^-1 M = M. Write
   M = U diag(l) V^T (U orthonormal columns, V orthogonal). Since C U = U (diag(l)^2 + sigma^2),
   C^-1 u_j = u_j / (l_j^2 + sigma^2), and the condition reads S u_j = (l_j^2 + sigma^2) u_j
   for every j with l_j > 0: u_j is an eigenvector of S and l_j = sqrt(lambda_j - sigma^2),
   which needs lambda_j > sigma^2. Stationary points: pick a set K of at most L eigenpairs
   with lambda_i > sigma^2; the other columns are zero.
3. Which K: C has eigenvalues lambda_i (i in K) and sigma^2 (elsewhere), so with r = lambda / sigma^2

       l(K) = -1/2 [D log 2 pi + D log sigma^2 + sum_all r_i - sum_{i in K} (r_i - 1 - log r_i)].

   r - 1 - log r is positive and increasing for r > 1: every eligible eigenpair raises l, a
   larger one more. l -> -inf as |W| -> inf (log|C| grows) and l is continuous, so its
   maximum is attained at a stationary point: the global maximum keeps the top
   min(L, #{lambda_i > sigma^2}) eigenvalues, l_i = sqrt(max(lambda_i - sigma^2, 0)).
   (When sigma is learned as well its ML value is the mean of the discarded eigenvalues;
   here it is not learned.)
4. Rotation: W^T = U_K diag(l) V^T gives the same C for every orthogonal V. A VAE with a
   factorised Gaussian q reaches log p(x) only where the posterior covariance
   (I + W W^T / sigma^2)^-1 is diagonal, i.e. V a signed permutation; take V = I: the rows of W
   are l_i u_i^T. With the encoder set to the exact posterior, mean (x - c) W^T S_post / sigma^2
   and variance S_post = diag(sigma^2 / (l_i^2 + sigma^2)), the ELBO equals log p(x) for every
   x: the ELBO's optimum coincides with the ML solution (Lucas et al. 2019).

Everything here is float64 NumPy; nothing imports a framework.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LOG_2PI = math.log(2.0 * math.pi)


@dataclass
class PPCA:
    """The ML solution with fixed sigma: decoder W (L, D) and c (D,), and the encoder at its exact
    (diagonal) posterior."""

    W: np.ndarray
    c: np.ndarray
    sigma: float
    eigenvalues: np.ndarray  # of the training covariance, descending
    train_log_px: float  # the maximum: mean log p(x) over the training data

    def params(self) -> dict[str, np.ndarray]:
        """Canonical linear-VAE parameters: the ML decoder and the exact-posterior encoder."""
        L, D = self.W.shape
        s2 = self.sigma**2
        post_var = s2 / (np.sum(self.W**2, axis=1) + s2)  # rows of W are orthogonal
        A_mu = self.W.T * (post_var / s2)  # (D, L): mean = (x - c) W^T S_post / sigma^2
        A = np.concatenate([A_mu, np.zeros((D, L))], axis=1)
        a = np.concatenate([-self.c @ A_mu, np.log(post_var)])
        return {"encoder.0.weight": A, "encoder.0.bias": a, "decoder.0.weight": self.W.copy(), "decoder.0.bias": self.c.copy()}


def max_log_likelihood(eigenvalues: np.ndarray, sigma: float, latent: int) -> float:
    """Mean log-likelihood at the ML solution (step 3 of the module docstring)."""
    lam = np.sort(np.asarray(eigenvalues, dtype=np.float64))[::-1]
    r = lam / sigma**2
    kept = r[:latent][r[:latent] > 1.0]
    D = len(lam)
    return float(-0.5 * (D * LOG_2PI + D * math.log(sigma**2) + r.sum() - np.sum(kept - 1.0 - np.log(kept))))


def fit(x: np.ndarray, latent: int, sigma: float) -> PPCA:
    """ML pPCA with fixed sigma from training data `x` (N, D)."""
    x = np.asarray(x, dtype=np.float64)
    c = x.mean(axis=0)
    S = (x - c).T @ (x - c) / len(x)
    lam, U = np.linalg.eigh(S)
    lam, U = lam[::-1], U[:, ::-1]  # descending
    lengths = np.sqrt(np.maximum(lam[:latent] - sigma**2, 0.0))
    W = np.zeros((latent, x.shape[1]))
    k = min(latent, len(lam))
    W[:k] = (U[:, :k] * lengths[:k]).T
    return PPCA(W=W, c=c, sigma=float(sigma), eigenvalues=lam, train_log_px=max_log_likelihood(lam, sigma, latent))

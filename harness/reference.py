"""An independent NumPy implementation of the VAE: loss parts, a hand-written backward pass
and the optimizers.

Tests and the conformance measure compare every backend against this. It shares only the
canonical parameter layout with the backends, no code: the layers' forward and backward are
the model kind's own NumPy oracle (`np_forward` / `np_backward` in `harness.models.<kind>`),
never the ops the frameworks run. Arrays are canonical: images NHWC.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from harness.api import TERMS, ModelSpec, OptimSpec, Terms

LOG_2PI = float(np.log(2.0 * np.pi))


def encode(params: Mapping[str, np.ndarray], x: np.ndarray, spec: ModelSpec) -> tuple[np.ndarray, np.ndarray]:
    out = _forward(params, "encoder", x, spec)[0]
    return out[..., : spec.latent], out[..., spec.latent :]


def decode(params: Mapping[str, np.ndarray], z: np.ndarray, spec: ModelSpec) -> np.ndarray:
    return _forward(params, "decoder", z, spec)[0]


def _event(spec: ModelSpec) -> tuple[int, ...]:
    """The axes of one example (the last one, or an image's last three)."""
    return tuple(range(-len(spec.input_shape), 0))


def log_px_given_z(out: np.ndarray, x: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """log p(x|z) summed over one example's values; `out` is logits or Gaussian means."""
    if spec.likelihood == "bernoulli":
        # x*l - softplus(l), stably
        return np.sum(x * out - np.logaddexp(0.0, out), axis=_event(spec))
    s = spec.obs_sigma
    return np.sum(-0.5 * ((x - out) / s) ** 2 - math.log(s) - 0.5 * LOG_2PI, axis=_event(spec))


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
    # a hidden layer's activation (relu or tanh) is > 0 exactly where its pre-activation is
    out, enc_cache = _forward(params, "encoder", x, spec)
    mu, logvar = out[..., : spec.latent], out[..., spec.latent :]
    _, dec_cache = _forward(params, "decoder", mu + np.exp(0.5 * logvar) * eps, spec)
    hidden = spec.module.np_pre_activations(enc_cache) + spec.module.np_pre_activations(dec_cache)
    signs = [(h > 0).ravel() for h in hidden]
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


# -- backward pass ------------------------------------------------------------------------


def _forward(params: Mapping[str, np.ndarray], block: str, h: np.ndarray, spec: ModelSpec) -> tuple[np.ndarray, Any]:
    """`block`'s output and its cache for the backward pass (the kind's NumPy oracle)."""
    return spec.module.np_forward(params, block, h, spec)  # type: ignore[no-any-return]


def _backward(params: Mapping[str, np.ndarray], block: str, cache: Any, d: np.ndarray, spec: ModelSpec,
              out: dict[str, np.ndarray], per_example: bool = False) -> np.ndarray:
    """Backprop d = dF/d(block output) through `block`: writes its parameters' gradients into
    `out` (summed over all leading axes; with `per_example`, over all but the batch axis, which
    then leads) and returns dF/d(block input)."""
    return spec.module.np_backward(params, block, cache, d, spec, out, per_example)  # type: ignore[no-any-return]


def grads(
    params: Mapping[str, np.ndarray], x: np.ndarray, eps: np.ndarray, spec: ModelSpec, term: str = "loss"
) -> dict[str, np.ndarray]:
    """Gradient of the batch mean of `term` ("loss" | "recon" | "kl", see `terms`) w.r.t. every
    canonical parameter, by hand. eps is (B, L) or (K, B, L) (recon averaged over K). Honors
    `spec.stop_gradient_z` (recon does not reach the encoder) and `spec.freeze` (zeros)."""
    if term not in TERMS:
        raise ValueError(f"unknown term {term!r}")
    g = {k: np.zeros_like(v) for k, v in params.items()}
    enc_out, enc_in = _forward(params, "encoder", x, spec)
    mu, logvar = enc_out[..., : spec.latent], enc_out[..., spec.latent :]
    std = np.exp(0.5 * logvar)
    dmu, dlogvar = np.zeros_like(mu), np.zeros_like(logvar)
    if term in ("loss", "recon"):
        out, dec_in = _forward(params, "decoder", mu + std * eps, spec)
        if spec.likelihood == "bernoulli":
            dll = x - np.exp(-np.logaddexp(0.0, -out))  # x - sigmoid(out)
        else:
            dll = (x - out) / spec.obs_sigma**2
        n = out.size // int(np.prod(spec.input_shape))  # B, or K*B: mean over B of the mean over K
        dz = _backward(params, "decoder", dec_in, -dll / n, spec, g)
        if not spec.stop_gradient_z:  # z = mu + exp(0.5*logvar)*eps
            lead = (0,) if eps.ndim == 3 else ()
            dmu += dz.sum(axis=lead)
            dlogvar += (dz * eps * 0.5 * std).sum(axis=lead)
    if term in ("loss", "kl"):  # kl = 0.5*sum(mu^2 + exp(logvar) - 1 - logvar)
        dmu += mu / mu.shape[0]
        dlogvar += 0.5 * (np.exp(logvar) - 1.0) / mu.shape[0]
    _backward(params, "encoder", enc_in, np.concatenate([dmu, dlogvar], axis=-1), spec, g)
    if spec.freeze != "none":
        g.update({k: np.zeros_like(v) for k, v in g.items() if k.startswith(spec.freeze + ".")})
    return g


def _dlog_px(out: np.ndarray, x: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """d log p(x|z) / d(decoder output): x - sigmoid(logits) or (x - mean) / sigma^2."""
    if spec.likelihood == "bernoulli":
        return np.asarray(x - np.exp(-np.logaddexp(0.0, -out)))
    return np.asarray((x - out) / spec.obs_sigma**2)


def iwae_grads(
    params: Mapping[str, np.ndarray], x: np.ndarray, eps: np.ndarray, spec: ModelSpec, per_example: bool = False
) -> dict[str, np.ndarray]:
    """Gradient of -mean_b IWAE_K(x_b) (a loss: the negative bound) w.r.t. every canonical
    parameter, by hand, for noise eps of shape (K, B, L); with `per_example` the gradient of
    -IWAE_K(x_b) for each example (a leading batch axis). log w_k = log p(x|z_k) + log N(z_k; 0, I)
    - log q(z_k|x) with z_k = mu + exp(logvar/2) eps_k: along that path log q(z_k|x) =
    -sum(LOG_2PI + logvar + eps_k^2)/2, so d log w / d mu = dz and d log w / d logvar =
    dz * eps * std / 2 + 1/2. The weights' softmax over k gives d IWAE / d log w_k. Honours
    `spec.freeze` (zeros) and `spec.stop_gradient_z` (z a constant: only q's density term
    reaches the encoder)."""
    if eps.ndim != 3:
        raise ValueError(f"eps must have shape (K, B, latent), got {eps.shape}")
    g = {k: np.zeros(((len(x),) if per_example else ()) + v.shape) for k, v in params.items()}
    enc_out, enc_in = _forward(params, "encoder", x, spec)
    mu, logvar = enc_out[..., : spec.latent], enc_out[..., spec.latent :]
    std = np.exp(0.5 * logvar)
    z = mu + std * eps
    out, dec_in = _forward(params, "decoder", z, spec)
    log_w = log_px_given_z(out, x, spec) + log_normal_diag(z, np.zeros_like(z), np.zeros_like(z)) - log_normal_diag(z, mu, logvar)
    w = np.exp(log_w - log_w.max(axis=0))
    scale = -(w / w.sum(axis=0)) / (1.0 if per_example else len(x))  # dF/dlog w_kb, F = -mean_b IWAE_b
    dll = _dlog_px(out, x, spec)
    per_value = scale.reshape(scale.shape + (1,) * len(spec.input_shape))  # one weight per example's values
    dz = _backward(params, "decoder", dec_in, per_value * dll, spec, g, per_example)
    dz = dz - scale[..., None] * z  # log N(z; 0, I)
    dlogvar = np.broadcast_to(0.5 * scale.sum(axis=0)[:, None], logvar.shape)  # -log q along the path
    if spec.stop_gradient_z:  # z constant: -log q(z|x) = sum(LOG_2PI + logvar + (z-mu)^2 exp(-logvar))/2
        r = (z - mu) ** 2 * np.exp(-logvar)
        dmu = (scale[..., None] * -(z - mu) * np.exp(-logvar)).sum(axis=0)
        dlogvar = (scale[..., None] * 0.5 * (1.0 - r)).sum(axis=0)
    else:
        dmu = dz.sum(axis=0)
        dlogvar = dlogvar + (dz * eps * 0.5 * std).sum(axis=0)
    _backward(params, "encoder", enc_in, np.concatenate([dmu, dlogvar], axis=-1), spec, g, per_example)
    if spec.freeze != "none":
        g.update({k: np.zeros_like(v) for k, v in g.items() if k.startswith(spec.freeze + ".")})
    return g


def local_grads(
    params: Mapping[str, np.ndarray], x: np.ndarray, mu: np.ndarray, logvar: np.ndarray, eps: np.ndarray, spec: ModelSpec
) -> tuple[Terms, np.ndarray, np.ndarray]:
    """Local inference by hand: the per-example `Terms` of q_b = N(mu_b, exp(logvar_b)) given
    per example (the encoder bypassed) and the gradient of each example's loss (-ELBO) w.r.t.
    its own mu_b and logvar_b. eps is (B, L) or (K, B, L) (recon averaged over K)."""
    std = np.exp(0.5 * logvar)
    z = mu + std * eps
    out, dec_in = _forward(params, "decoder", z, spec)
    ll = log_px_given_z(out, x, spec)
    recon = -(ll.mean(axis=0) if eps.ndim == 3 else ll)
    kl = 0.5 * np.sum(mu**2 + np.exp(logvar) - 1.0 - logvar, axis=-1)
    dll = _dlog_px(out, x, spec)
    k = eps.shape[0] if eps.ndim == 3 else 1
    dz = _backward(params, "decoder", dec_in, -dll / k, spec, {})
    lead = (0,) if eps.ndim == 3 else ()
    g_mu = dz.sum(axis=lead) + mu
    g_logvar = (dz * eps * 0.5 * std).sum(axis=lead) + 0.5 * (np.exp(logvar) - 1.0)
    return Terms(recon=recon, kl=kl), g_mu, g_logvar


# -- optimizers ---------------------------------------------------------------------------


def init_state(params: Mapping[str, np.ndarray], optim: OptimSpec) -> dict[str, np.ndarray]:
    """Canonical optimizer state. Adam: `adam.step` (0-d int64, 0), `adam.m.<p>`, `adam.v.<p>`
    (zeros). SGD with momentum > 0: `sgd.momentum.<p>` (zeros; the torch/optax trace b). Plain
    SGD: no state."""
    if optim.name == "adam":
        state = {"adam.step": np.array(0, dtype=np.int64)}
        state.update({f"adam.m.{k}": np.zeros_like(v) for k, v in params.items()})
        state.update({f"adam.v.{k}": np.zeros_like(v) for k, v in params.items()})
        return state
    if optim.momentum > 0:
        return {f"sgd.momentum.{k}": np.zeros_like(v) for k, v in params.items()}
    return {}


def optimizer_step(
    params: Mapping[str, np.ndarray],
    state: Mapping[str, np.ndarray],
    grads: Mapping[str, np.ndarray],
    optim: OptimSpec,
    convention: str = "standard",
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One optimizer step; returns (new_params, new_state), inputs untouched.

    Adam, with t = step + 1, bc1 = 1 - b1^t, bc2 = 1 - b2^t, m = b1*m + (1-b1)*g,
    v = b2*v + (1-b2)*g^2:
      "standard" (torch.optim.Adam, optax.adam): p -= (lr/bc1) * m / (sqrt(v)/sqrt(bc2) + eps)
      "keras" (keras.optimizers.Adam, eps on the uncorrected sqrt(v)):
                                                 p -= m * (lr*sqrt(bc2)/bc1) / (sqrt(v) + eps)
    SGD: p -= lr*g; with momentum mu the trace b = mu*b + g, p -= lr*b (torch, optax). Keras keeps
    b' = mu*b' - lr*g, p += b' instead, which is -lr*b for a constant lr; `convention` only
    changes Adam.
    """
    if convention not in ("standard", "keras"):
        raise ValueError(f"unknown convention {convention!r}")
    new_p: dict[str, np.ndarray] = {}
    new_s: dict[str, np.ndarray] = {}
    lr = optim.lr
    if optim.name == "adam":
        b1, b2 = optim.beta1, optim.beta2
        t = int(state["adam.step"]) + 1
        bc1, bc2 = 1.0 - b1**t, 1.0 - b2**t
        new_s["adam.step"] = np.array(t, dtype=np.int64)
        for k, p in params.items():
            m = b1 * state[f"adam.m.{k}"] + (1.0 - b1) * grads[k]
            v = b2 * state[f"adam.v.{k}"] + (1.0 - b2) * grads[k] ** 2
            if convention == "keras":
                new_p[k] = p - m * (lr * np.sqrt(bc2) / bc1) / (np.sqrt(v) + optim.eps)
            else:
                new_p[k] = p - (lr / bc1) * (m / (np.sqrt(v) / np.sqrt(bc2) + optim.eps))
            new_s[f"adam.m.{k}"], new_s[f"adam.v.{k}"] = m, v
    elif optim.name == "sgd":
        for k, p in params.items():
            step = grads[k]
            if optim.momentum > 0:
                step = new_s[f"sgd.momentum.{k}"] = optim.momentum * state[f"sgd.momentum.{k}"] + grads[k]
            new_p[k] = p - lr * step
    else:
        raise ValueError(f"unknown optimizer {optim.name!r}")
    return new_p, new_s

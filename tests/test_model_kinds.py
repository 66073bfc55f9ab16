"""Every model kind in every framework: the layers written once over each framework's ops give
the NumPy oracle's numbers (loss parts, every gradient, the encoder, the IWAE and local
gradients, per example too) from the same canonical weights, in float64; parameters, gradients
and optimizer moments cross the interface in the canonical layout whatever the framework holds
inside (torch: NCHW images, OIHW kernels); the initial weights' fans are the kind's.

Iterates the registries (`harness.models.MODELS`, the frameworks): a new kind or framework is
covered by its `example()`, with no edit here.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from harness import reference
from harness.api import TERMS, load_backend
from harness.initializers import init_params
from harness.models import MODELS
from tests.conftest import FRAMEWORKS

B, K = 4, 3
CASES = [(kind, fw) for kind in MODELS for fw in FRAMEWORKS]


def problem(kind: str, seed: int = 0) -> tuple[Any, dict[str, np.ndarray], np.ndarray, np.ndarray]:
    spec = MODELS[kind].example()
    rng = np.random.default_rng(seed)
    params = {k: v + 0.1 * rng.standard_normal(v.shape) for k, v in init_params(spec, seed).items()}  # biases non-zero
    if spec.likelihood == "bernoulli":
        x = (rng.random((B, *spec.input_shape)) < 0.5).astype(float)
    else:
        x = rng.standard_normal((B, *spec.input_shape))
    return spec, params, x, rng.standard_normal((K, B, spec.latent))


def close(a: np.ndarray, b: np.ndarray, rtol: float = 1e-10) -> bool:
    scale = max(float(np.max(np.abs(b))), 1e-30)
    return float(np.max(np.abs(np.asarray(a) - b))) <= rtol * scale


@pytest.fixture(scope="module")
def backends() -> dict[tuple[str, str], Any]:
    return {}


def backend(backends: dict[tuple[str, str], Any], kind: str, fw: str) -> Any:
    if (kind, fw) not in backends:
        spec, params, _, _ = problem(kind)
        backends[(kind, fw)] = load_backend(fw, spec, dtype="float64", params=params)
    b = backends[(kind, fw)]
    b.set_params(problem(kind)[1])
    return b


@pytest.mark.slow  # JAX's eager gradients compile each primitive on first use: ~10-25 s per kind
@pytest.mark.parametrize("kind,fw", CASES)
def test_every_framework_computes_the_oracles_numbers(backends: dict[tuple[str, str], Any], kind: str, fw: str) -> None:
    spec, params, x, eps = problem(kind)
    b = backend(backends, kind, fw)
    got = b.get_params()
    assert list(got) == list(spec.param_shapes()) and all(np.array_equal(got[k], params[k]) for k in params)
    mu, logvar = b.encode(x)
    ref_mu, ref_logvar = reference.encode(params, x, spec)
    assert close(mu, ref_mu) and close(logvar, ref_logvar)
    for noise in (eps[0], eps):  # one sample, and K samples per example
        t, ref = b.terms(x, noise), reference.terms(params, x, noise, spec)
        assert close(t.recon, ref.recon) and close(t.kl, ref.kl)
        for term in TERMS:
            g, rg = b.grads(x, noise, term), reference.grads(params, x, noise, spec, term)
            assert set(g) == set(rg)
            for k in g:
                assert g[k].shape == rg[k].shape and close(g[k], rg[k], 1e-9), (term, k)
    for per_example in (False, True):
        g, rg = b.iwae_grads(x, eps, per_example), reference.iwae_grads(params, x, eps, spec, per_example)
        assert all(g[k].shape == rg[k].shape and close(g[k], rg[k], 1e-9) for k in g), per_example
    lmu, llv = ref_mu + 0.1, ref_logvar - 0.2
    t, g_mu, g_lv = b.local_grads(x, lmu, llv, eps)
    rt, rg_mu, rg_lv = reference.local_grads(params, x, lmu, llv, eps, spec)
    assert close(t.loss, rt.loss) and close(g_mu, rg_mu, 1e-9) and close(g_lv, rg_lv, 1e-9)
    # the IWAE bound from the framework's own noise: per example, finite, the same for the same seed
    ll = b.log_likelihood(x, 7, seed=3)
    assert ll.shape == (B,) and np.all(np.isfinite(ll)) and np.array_equal(ll, b.log_likelihood(x, 7, seed=3))


@pytest.mark.parametrize("kind,fw", CASES)
def test_a_step_and_its_state_in_the_canonical_layout(backends: dict[tuple[str, str], Any], kind: str, fw: str) -> None:
    """One Adam step from given noise equals the NumPy step; the optimizer state comes back in
    the canonical layout and loading it continues bit for bit."""
    from harness.api import OptimSpec

    spec, params, x, eps = problem(kind)
    b = load_backend(fw, spec, OptimSpec(lr=1e-2), dtype="float64", params=params)
    b.train_step(x, eps[0])
    state = reference.init_state(params, OptimSpec(lr=1e-2))
    g = reference.grads(params, x, eps[0], spec, "loss")
    convention = "keras" if fw == "tensorflow" else "standard"
    want, want_state = reference.optimizer_step(params, state, g, OptimSpec(lr=1e-2), convention=convention)
    got = b.get_params()
    assert list(got) == list(spec.param_shapes())  # canonical order after a step too (JAX's pytrees sort keys)
    assert all(close(got[k], want[k], 1e-9) for k in got)
    st = b.get_state()
    assert all(close(st[k], want_state[k], 1e-9) for k in st if k != "adam.step") and int(st["adam.step"]) == 1
    b2 = load_backend(fw, spec, OptimSpec(lr=1e-2), dtype="float64", params=got)
    b2.set_state(st)
    b.train_step(x, eps[1])
    b2.train_step(x, eps[1])
    assert all(np.array_equal(v, b2.get_params()[k]) for k, v in b.get_params().items())


@pytest.mark.parametrize("kind", list(MODELS))
def test_initial_weights_follow_the_kinds_fans(kind: str) -> None:
    spec = MODELS[kind].example()
    w = init_params(spec, 0)
    for name, p in spec.params().items():
        assert w[name].shape == p.shape
        if p.fans is None:
            assert np.all(w[name] == 0), name
        else:
            limit = math.sqrt(6.0 / sum(p.fans))
            assert np.all(np.abs(w[name]) <= limit) and np.abs(w[name]).max() > 0.5 * limit, name
        if p.layout in ("conv", "conv_t"):  # a kernel's fans count its positions: (kh kw in, kh kw out)
            kh, kw, ci, co = p.shape
            assert p.fans == (kh * kw * ci, kh * kw * co)


@pytest.mark.parametrize("kind", list(MODELS))
def test_the_oracle_computes_in_the_dtype_it_is_given(kind: str) -> None:
    """NumPy in float32 is the conformance measure's rounding floor: the oracle must not promote
    (a float64 buffer inside a layer would make that floor 0 and the tolerance blind)."""
    spec = MODELS[kind].example()
    p = {k: v.astype(np.float32) for k, v in init_params(spec, 0).items()}
    rng = np.random.default_rng(0)
    x = (rng.random((3, *spec.input_shape)) > 0.5).astype(np.float32)
    eps = rng.standard_normal((3, spec.latent)).astype(np.float32)
    t = reference.terms(p, x, eps, spec)
    assert t.recon.dtype == t.kl.dtype == np.float32
    assert {str(g.dtype) for g in reference.grads(p, x, eps, spec, "loss").values()} == {"float32"}


def _counted_terms(layer: Any, w: np.ndarray) -> tuple[int, int]:
    """(weight, bias) terms per example, counted by the NumPy oracle's own layer: with an all-ones
    input and upstream gradient, a bias gradient counts the positions it sums, and the weight
    gradient's largest entry (a tap that never lands in padding) counts the positions its sum runs
    over."""
    from harness.models import base, conv

    x = np.ones((1, *layer.in_shape))
    b = np.zeros(w.shape[-1])
    if layer.op == "dense":
        _, dw, db = base.np_dense_backward(x, w, np.ones((1, w.shape[1])), per_example=False)
        return int(dw.max()), int(db.max())
    fwd, bwd = (conv.np_conv, conv.np_conv_backward) if layer.op == "conv2d" else (conv.np_conv_t, conv.np_conv_t_backward)
    y, cache = fwd(x, w, b, layer.stride)
    _, dw, db = bwd(w, cache, np.ones_like(y), layer.stride)
    return int(dw.max()), int(db.max())


@pytest.mark.parametrize("kind", list(MODELS))
def test_reduction_terms_count_what_each_gradient_sums(kind: str) -> None:
    """`reduction_terms` (the conformance floor's sum lengths) against the oracle's own count."""
    from harness.models.base import reduction_terms

    spec = MODELS[kind].example()
    params = init_params(spec, 0)
    layers = spec.module.layers(spec)
    terms = reduction_terms(layers)
    assert set(terms) == set(params)  # every parameter, from its layer
    for layer in layers:
        assert (terms[layer.weight], terms[layer.bias]) == _counted_terms(layer, params[layer.weight]), layer.name
    if kind == "conv":  # 8 x 4 images: the first conv's 4 x 2 outputs; the last conv_t's 8 x 4 outputs
        assert terms["encoder.0.bias"] == 8 and terms["decoder.3.bias"] == 32

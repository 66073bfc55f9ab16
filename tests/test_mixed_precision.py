"""Mixed precision (framework.precision=bfloat16|float16): the policy each backend runs, checked
against the float64 NumPy oracle (`harness.reference`) and against the low type's unit roundoff,
and float16's dynamic loss scaling (a skipped step, the scale rule)."""

from __future__ import annotations

import numpy as np
import pytest

from harness import init_params, load_backend, reference
from harness.api import MlpSpec
from harness.spec import LOSS_SCALE_GROWTH_STEPS, LOSS_SCALE_INIT, MIXED, Policy, param_dtype
from tests.conftest import FRAMEWORKS

SPEC = MlpSpec(x_dim=12, hidden=(10, 7), latent=3, activation="tanh")
RNG = np.random.default_rng(123)
X = (RNG.uniform(size=(6, 12)) > 0.5).astype(np.float64)
EPS = RNG.standard_normal((6, 3))
LOW = tuple(MIXED)


def test_the_policy_of_each_precision() -> None:
    assert MIXED == {"bfloat16": 2.0**-8, "float16": 2.0**-11}  # 7 and 10 stored mantissa bits
    assert Policy.of("bfloat16") == Policy("bfloat16", "float32", "float32", loss_scaling=False)
    assert Policy.of("float16") == Policy("float16", "float32", "float32", loss_scaling=True)
    assert Policy.of("float64") == Policy("float64", "float64", "float64") and not Policy.of("float32").mixed
    assert [param_dtype(d) for d in ("float32", "float64", "bfloat16", "float16")] == ["float32", "float64", "float32", "float32"]


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_layers_compute_in_the_low_type_within_its_roundoff(framework: str, dtype: str) -> None:
    """Loss parts and gradients against the float64 oracle: within 20 unit roundoffs of the low
    type (measured: at most 3.4 u in every framework, both types), and at least 0.1 u away (the
    layers do compute in the low type: float32 layers are ~1e-6 away, below 0.1 u of either).
    Parameters, gradients and optimizer state stay float32; the record names the policy."""
    params = init_params(SPEC, 7)
    b = load_backend(framework, SPEC, dtype=dtype, params=params)
    u = MIXED[dtype]
    got, want = b.terms(X, EPS), reference.terms(params, X, EPS, SPEC)
    rel = max(float(np.max(np.abs(getattr(got, t) - getattr(want, t)) / np.abs(getattr(want, t)))) for t in ("recon", "kl", "loss"))
    assert 0.1 * u < rel < 20 * u, (rel, u)
    g, gw = b.grads(X, EPS, "loss"), reference.grads(params, X, EPS, SPEC, "loss")
    grel = max(float(np.linalg.norm(g[k] - gw[k]) / np.linalg.norm(gw[k])) for k in g)
    assert 0.1 * u < grel < 20 * u, (grel, u)
    assert all(a.dtype == np.float32 for a in (*g.values(), *b.get_params().values(), got.loss))
    b.train_step(X, EPS)
    assert all(a.dtype == np.float32 for k, a in b.get_state().items() if not k.endswith(".step"))
    v = b.version()
    assert v["dtype"] == dtype and v["policy"] == {"compute": dtype, "param": "float32", "accumulate": "float32",
                                                   "loss_scaling": dtype == "float16"}
    if dtype == "float16":
        assert (v["loss_scale"], v["skipped_steps"]) == (LOSS_SCALE_INIT, 0)
    else:
        assert "loss_scale" not in v


@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_float16_overflow_skips_the_step_and_halves_the_scale(framework: str, mode: str) -> None:
    """Encoder weights x 1e6 overflow float16's range (65504) when cast to it: the gradient
    is not finite, the step is skipped (parameters and optimizer state unchanged), the scale
    halves and the record counts one skipped step. A finite step after it moves the weights."""
    params = init_params(SPEC, 7)
    big = {k: v * (1e6 if k.startswith("encoder.0.") else 1.0) for k, v in params.items()}
    b = load_backend(framework, SPEC, dtype="float16", mode=mode, params=big)
    before, state = b.get_params(), b.get_state()
    b.train_step(X, EPS)
    after = b.get_params()
    assert all(np.array_equal(before[k], after[k]) for k in before), "a non-finite float16 step was applied"
    assert all(np.array_equal(state[k], b.get_state()[k]) for k in state)
    v = b.version()
    assert (v["loss_scale"], v["skipped_steps"]) == (LOSS_SCALE_INIT / 2, 1)
    b.set_params(params)
    b.train_step(X, EPS)
    assert not np.array_equal(b.get_params()["encoder.0.weight"], params["encoder.0.weight"].astype(np.float32))
    assert b.version()["skipped_steps"] == 1


def test_the_jax_loss_scale_follows_the_shared_rule() -> None:
    """JAX's loss scale (written here: JAX has none) against the rule of torch's GradScaler and
    Keras' LossScaleOptimizer: halve and reset on a non-finite step; double after
    LOSS_SCALE_GROWTH_STEPS finite steps in a row."""
    pytest.importorskip("jax")
    import jax.numpy as jnp

    from impls.jax.backend import LossScale

    s = LossScale.initial()
    assert float(s.scale) == LOSS_SCALE_INIT and int(s.good) == 0
    s = s.next(jnp.bool_(True))
    assert (float(s.scale), int(s.good), int(s.skipped)) == (LOSS_SCALE_INIT, 1, 0)
    s = s.next(jnp.bool_(False))
    assert (float(s.scale), int(s.good), int(s.skipped)) == (LOSS_SCALE_INIT / 2, 0, 1)
    s = LossScale(s.scale, jnp.int32(LOSS_SCALE_GROWTH_STEPS - 1), s.skipped).next(jnp.bool_(True))
    assert (float(s.scale), int(s.good), int(s.skipped)) == (LOSS_SCALE_INIT, 0, 1)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_bias_gradient_summed_over_pixels_is_accumulated_in_float32(framework: str) -> None:
    """The conv VAE's output bias: its gradient sums batch x 784 pixel terms. Biases stay float32
    and are added in float32 (`harness.vae`, `impls.base.formulation`): within a few u of NumPy in
    bfloat16 (measured 1e-4 relative), where a bias added in bfloat16 had JAX's CPU backend sum its
    gradient in bfloat16, 97% off."""
    from harness.models.conv import ConvSpec

    spec = ConvSpec(image=(28, 28, 1), filters=(4, 8), dense=8, latent=4)
    params = init_params(spec, 0)
    x = (np.random.default_rng(0).uniform(size=(32, 28, 28, 1)) > 0.7).astype(np.float64)
    eps = np.random.default_rng(1).standard_normal((32, 4))
    want = reference.grads(params, x, eps, spec, "loss")
    got = load_backend(framework, spec, dtype="bfloat16", params=params).grads(x, eps, "loss")
    out_bias = [k for k in params if k.startswith("decoder.") and k.endswith(".bias")][-1]
    rel = float(np.linalg.norm(got[out_bias] - want[out_bias]) / np.linalg.norm(want[out_bias]))
    assert rel < 4 * MIXED["bfloat16"], (out_bias, rel)

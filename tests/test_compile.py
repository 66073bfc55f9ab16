"""Compiled modes: no retracing or recompiling after warm-up, and the same numbers as eager."""

from __future__ import annotations

import numpy as np
import pytest

from harness import OptimSpec, load_backend
from harness.api import COMPILED_ALIAS, MlpSpec
from tests.conftest import FRAMEWORKS, adam_convention, framework_modes

#: every compiled mode of every framework
COMPILED_MODES = framework_modes(eager=False)
#: each framework's compiled mode (what "compiled" means there)
COMPILED = [(f, COMPILED_ALIAS[f]) for f in FRAMEWORKS]

SPEC = MlpSpec(x_dim=16, hidden=(12,), latent=3)
RNG = np.random.default_rng(0)
XS = [(RNG.uniform(size=(8, 16)) > 0.5).astype(float) for _ in range(6)]
EPS = [RNG.standard_normal((8, 3)) for _ in range(6)]


@pytest.mark.slow
@pytest.mark.parametrize("framework,mode", COMPILED_MODES)
def test_no_retrace_after_warmup(framework: str, mode: str) -> None:
    b = load_backend(framework, SPEC, OptimSpec(lr=0.01), mode=mode)
    eager = load_backend(framework, SPEC, OptimSpec(lr=0.01), mode="eager")
    assert b.compile_count() == 0
    first = float(b.train_step(XS[0], EPS[0]))  # warm up the given-noise path
    assert b.compile_count() >= 1  # the counter sees a trace
    float(b.train_step(XS[0]))  # and the device-RNG path
    float(eager.train_step(XS[0], EPS[0]))
    float(eager.train_step(XS[0]))
    warm = b.compile_count()
    ctx = None
    if framework == "torch":
        import torch._dynamo

        ctx = torch._dynamo.config.patch(error_on_recompile=True)
        ctx.__enter__()
    try:
        for x, e in zip(XS[1:], EPS[1:]):
            got = float(b.train_step(b.put(x), e))
            want = float(eager.train_step(x, e))
            assert got == pytest.approx(want, rel=1e-5)
            float(b.train_step(b.put(x)))
            float(eager.train_step(x))
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
    assert b.compile_count() == warm, f"{framework}/{mode} retraced after warm-up"
    assert np.isfinite(first)


@pytest.mark.parametrize("framework,mode", [pytest.param(f, m, marks=pytest.mark.slow) if f != "jax" else (f, m)
                                            for f, m in COMPILED])  # tensorflow ~10 s of XLA compiles, torch ~40 s of inductor
def test_counter_sees_a_shape_change(framework: str, mode: str) -> None:
    """Negative control: a new batch size must show up as a new trace."""
    b = load_backend(framework, SPEC, mode=mode)
    b.train_step(XS[0], EPS[0])
    n = b.compile_count()
    b.train_step(XS[0][:4], EPS[0][:4])
    assert b.compile_count() > n


@pytest.mark.slow
@pytest.mark.parametrize("framework,mode", COMPILED)
def test_compiled_adam_first_step_matches_closed_form_float64(framework: str, mode: str) -> None:
    """Compiled optimizers keep float64 exact (torch.compile'd Adam used to compute its bias
    corrections in float32: 6.6e-6 relative error on the first step)."""
    o = OptimSpec(name="adam", lr=0.01, eps=1e-8)
    b = load_backend(framework, SPEC, o, mode=mode, dtype="float64", seed=3)
    p = b.get_params()
    g = b.grads(XS[0], EPS[0], "loss")
    b.train_step(XS[0], EPS[0])
    new = b.get_params()
    eps_hat = o.eps / np.sqrt(1 - o.beta2) if adam_convention(framework) == "keras" else o.eps
    for k in p:
        np.testing.assert_allclose(new[k], p[k] - o.lr * g[k] / (np.abs(g[k]) + eps_hat), rtol=1e-9, atol=1e-13, err_msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("framework,mode", COMPILED_MODES)
def test_log_likelihood_compiled_matches_eager(framework: str, mode: str) -> None:
    """The per-chunk IWAE log-weights are compiled in every compiled mode: the same numbers
    as eager (same noise: the framework's RNG draws outside the compiled function), compiled
    once per chunk shape, not again on a second call, and not counted as step compiles."""
    x = np.concatenate(XS[:2])
    b = load_backend(framework, SPEC, mode=mode, dtype="float64", seed=2)
    eager = load_backend(framework, SPEC, mode="eager", dtype="float64", seed=2)
    assert b.compiles_per_function() == {"step": 0, "log_likelihood": 0}  # type: ignore[attr-defined]
    want = eager.log_likelihood(x, k=150, seed=5)  # chunks of 100 and 50
    got = b.log_likelihood(x, k=150, seed=5)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=0)
    n = b.compiles_per_function()["log_likelihood"]  # type: ignore[attr-defined]
    assert 1 <= n <= 2  # one per chunk shape
    np.testing.assert_array_equal(b.log_likelihood(x, k=150, seed=5), got)
    assert b.compiles_per_function() == {"step": 0, "log_likelihood": n}  # type: ignore[attr-defined]
    assert eager.compiles_per_function() == {"step": 0, "log_likelihood": 0}  # type: ignore[attr-defined]


@pytest.mark.parametrize("allow_tf32,want", [(False, "HIGHEST"), (True, "DEFAULT")])
def test_jax_matmul_precision_is_baked_into_the_trace(allow_tf32: bool, want: str) -> None:
    """The jitted step runs without a per-call context: its precision comes from inside the
    traced function, so every dot of the lowered step (forward and backward) carries it."""
    b = load_backend("jax", SPEC, mode="jit", allow_tf32=allow_tf32)
    for f, args in zip(b._jitted["step"], [(b.put(XS[0]), b._stage(EPS[0])), (b.key, b.put(XS[0]))]):  # type: ignore[attr-defined]
        state = (b.params, b.opt_state, b.loss_scale)  # type: ignore[attr-defined]  (loss_scale: None unless float16)
        text = f.lower(*state, *args).as_text()
        dots = text.count("stablehlo.dot_general")
        assert dots >= 6 and text.count(f"precision = [{want}, {want}]") == dots


def test_torch_leaves_the_tf32_switches_alone_on_the_cpu() -> None:
    """TF32 only matters on CUDA, where the backend scopes the switches per call; on the
    CPU it does not touch torch's process-wide flags at all."""
    import torch

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    b = load_backend("torch", SPEC, allow_tf32=not before[0])
    b.train_step(XS[0])
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    assert b.version()["allow_tf32"] is (not before[0])

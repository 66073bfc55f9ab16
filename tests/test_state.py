"""The canonical optimizer state (`get_state` / `set_state`): names, shapes and dtypes, exact
round trips, bit-identical resumes, agreement across frameworks, the closed-form effect of a
loaded state on the next step, validation, and no recompiles."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from harness import OptimSpec, init_params, load_backend
from harness.api import Backend, MlpSpec
from tests.conftest import FRAMEWORKS, adam_convention, framework_modes

#: every framework's modes, less torch's compiled one (~15 s to compile: it has its own test
#: below) and tensorflow's function (its xla mode covers the traced step)
MODES = framework_modes(skip=[("torch", "compiled"), ("tensorflow", "function")])
DTYPES = ["float64", "float32"]
SPEC = MlpSpec(x_dim=12, hidden=(10, 7), latent=3, activation="tanh")
RNG = np.random.default_rng(321)
XS = [(RNG.uniform(size=(6, 12)) > 0.5).astype(np.float64) for _ in range(5)]
EPS = [RNG.standard_normal((6, 3)) for _ in range(5)]

OPTIMS = {
    "adam": OptimSpec(name="adam", lr=0.01, eps=1e-8),
    "sgd_momentum": OptimSpec(name="sgd", lr=0.01, momentum=0.9),
    # a power-of-two learning rate: Keras' velocity u = -lr*b then converts exactly
    "sgd_momentum_pow2": OptimSpec(name="sgd", lr=2.0**-6, momentum=0.9),
    "sgd": OptimSpec(name="sgd", lr=0.01, momentum=0.0),
}


def _params(seed: int = 7) -> dict[str, np.ndarray]:
    p = init_params(SPEC, seed)
    return {k: v + (0.1 * np.random.default_rng(len(k)).standard_normal(v.shape) if "bias" in k else 0) for k, v in p.items()}


def _load(framework: str, optim: str, dtype: str = "float64", mode: str = "eager", **kw: object) -> Backend:
    return load_backend(framework, SPEC, OPTIMS[optim], dtype=dtype, mode=mode, params=_params(), **kw)  # type: ignore[arg-type]


def _expected(optim: str) -> dict[str, tuple[int, ...]]:
    ps = SPEC.param_shapes()
    o = OPTIMS[optim]
    if o.name == "adam":
        return {"adam.step": (), **{f"adam.m.{k}": s for k, s in ps.items()}, **{f"adam.v.{k}": s for k, s in ps.items()}}
    if o.momentum > 0:
        return {f"sgd.momentum.{k}": s for k, s in ps.items()}
    return {}


def _bits_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return list(a) == list(b) and all(a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a)


def _exact(framework: str, optim: str) -> bool:
    """Keras keeps SGD's velocity u = -lr*b, not the trace b: converting rounds unless lr is a
    power of two, so a TensorFlow SGD-momentum resume is then only within an ulp of u."""
    return not (framework == "tensorflow" and optim == "sgd_momentum")


def _random_state(optim: str, dtype: str, step: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for k, s in _expected(optim).items():
        if k == "adam.step":
            out[k] = np.array(step, dtype=np.int64)
        elif k.startswith("adam.v."):
            out[k] = rng.uniform(1e-5, 1e-3, size=s).astype(dtype)
        else:
            out[k] = (1e-2 * rng.standard_normal(s)).astype(dtype)
    return out


# -- names, shapes, dtypes, zero state -------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("optim", ["adam", "sgd_momentum", "sgd"])
@pytest.mark.parametrize("framework,mode", MODES)
def test_state_layout_and_zero_start(framework: str, mode: str, optim: str, dtype: str) -> None:
    b = _load(framework, optim, dtype, mode)
    expected = _expected(optim)

    def check_zero(state: dict[str, np.ndarray]) -> None:
        assert list(state) == list(expected)
        for k, shape in expected.items():
            assert state[k].shape == shape, k
            assert state[k].dtype == (np.int64 if k == "adam.step" else np.dtype(dtype)), k
            assert not np.any(state[k]) and not np.any(np.signbit(state[k])), k  # +0 everywhere

    check_zero(b.get_state())
    b.train_step(XS[0], EPS[0])
    state = b.get_state()
    assert list(state) == list(expected)
    if optim == "adam":
        assert int(state["adam.step"]) == 1
    if expected:
        assert all(np.any(v) for k, v in state.items() if k != "adam.step")
    b.set_params(_params())  # resets the optimizer
    check_zero(b.get_state())
    b.set_state(state)  # a nonzero state is loaded after set_params ...
    assert _bits_equal(b.get_state(), state)
    b.set_state({k: np.zeros_like(v) for k, v in state.items()})  # ... and a zero one too
    check_zero(b.get_state())


# -- exactness --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("optim", ["adam", "sgd_momentum", "sgd_momentum_pow2"])
@pytest.mark.parametrize("framework,mode", MODES)
def test_round_trip_is_exact(framework: str, mode: str, optim: str, dtype: str) -> None:
    b = _load(framework, optim, dtype, mode)
    for x, e in zip(XS[:2], EPS[:2]):
        b.train_step(x, e)
    state = b.get_state()
    b.set_state(state)
    assert _bits_equal(b.get_state(), state)
    fresh = _load(framework, optim, dtype, mode)
    fresh.set_state(state)
    assert _bits_equal(fresh.get_state(), state)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("optim", ["adam", "sgd_momentum", "sgd_momentum_pow2"])
@pytest.mark.parametrize("framework,mode", MODES)
def test_resume_is_bit_identical(framework: str, mode: str, optim: str, dtype: str) -> None:
    """k steps, then get_params/get_state into a fresh backend that takes the next steps:
    the same losses and parameters, bit for bit, as the uninterrupted run."""
    a = _load(framework, optim, dtype, mode)
    for x, e in zip(XS[:2], EPS[:2]):
        a.train_step(x, e)
    params, state = a.get_params(), a.get_state()
    want = [float(a.train_step(x, e)) for x, e in zip(XS[2:], EPS[2:])]
    want_params, want_state = a.get_params(), a.get_state()

    b = _load(framework, optim, dtype, mode, seed=99)  # other seed: nothing hinges on it
    b.set_params(params)
    b.set_state(state)
    got = [float(b.train_step(x, e)) for x, e in zip(XS[2:], EPS[2:])]
    if _exact(framework, optim):
        assert got == want
        assert _bits_equal(b.get_params(), want_params)
        assert _bits_equal(b.get_state(), want_state)
    else:
        rtol = 1e-13 if dtype == "float64" else 1e-5
        np.testing.assert_allclose(got, want, rtol=rtol)
        for k, v in b.get_params().items():
            np.testing.assert_allclose(v, want_params[k], rtol=rtol, atol=rtol * 1e-2, err_msg=k)


def test_resume_torch_compiled_and_no_recompile() -> None:
    """torch.compile'd opt.step: a fresh compiled backend resumes bit-identically, and a later
    set_state writes the existing state tensors in place: no recompile."""
    import torch._dynamo

    a = _load("torch", "adam", "float64", "compiled")
    for x, e in zip(XS[:2], EPS[:2]):
        a.train_step(x, e)
    params, state = a.get_params(), a.get_state()
    want = [float(a.train_step(x, e)) for x, e in zip(XS[2:], EPS[2:])]
    want_params = a.get_params()

    b = _load("torch", "adam", "float64", "compiled")
    b.set_params(params)
    b.set_state(state)
    got = [float(b.train_step(x, e)) for x, e in zip(XS[2:], EPS[2:])]
    assert got == want
    assert _bits_equal(b.get_params(), want_params)

    n = b.compile_count()
    with torch._dynamo.config.patch(error_on_recompile=True):
        b.set_state(_random_state("adam", "float64", step=10**9))
        float(b.train_step(XS[0], EPS[0]))
        b.set_state(state)
        assert _bits_equal(b.get_state(), state)
        float(b.train_step(XS[1], EPS[1]))
    assert b.compile_count() == n


# -- meaning ----------------------------------------------------------------------------------
@pytest.mark.parametrize("eps,frameworks", [(1e-8, [f for f in FRAMEWORKS if adam_convention(f) == "standard"]),
                                            (1e-20, list(FRAMEWORKS))])
def test_adam_state_agrees_across_frameworks(eps: float, frameworks: list[str]) -> None:
    """Three Adam steps from the same parameters, batches and noise: the same m, v and step.
    Keras adds eps to the uncorrected sqrt(v), so its trajectory drifts from torch's and
    optax's by ~eps/|g|; with a negligible eps all of them agree."""
    o = OptimSpec(name="adam", lr=0.01, eps=eps)
    states = {}
    for fw in frameworks:
        b = load_backend(fw, SPEC, o, dtype="float64", params=_params())
        for x, e in zip(XS[:3], EPS[:3]):
            b.train_step(x, e)
        states[fw] = b.get_state()
    ref = states[frameworks[0]]
    assert int(ref["adam.step"]) == 3
    for fw, st in states.items():
        assert list(st) == list(ref)
        assert int(st["adam.step"]) == 3
        for k in ref:
            np.testing.assert_allclose(st[k], ref[k], rtol=1e-12, atol=0, err_msg=f"{fw} {k}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("framework,mode", MODES)
def test_loaded_adam_state_drives_next_step(framework: str, mode: str, dtype: str) -> None:
    """With step = 1e9 both bias corrections are exactly 1 (and Keras' eps convention is then
    the same formula): the next step is p - lr*m_new/(sqrt(v_new)+eps), m and v uncorrected."""
    o = OPTIMS["adam"]
    b = _load(framework, "adam", dtype, mode)
    p = b.get_params()
    state = _random_state("adam", dtype, step=10**9)
    b.set_state(state)
    loaded = b.get_state()
    assert int(loaded["adam.step"]) == 10**9  # fits optax's int32 and float32 exactly
    g = b.grads(XS[0], EPS[0], "loss")
    b.train_step(XS[0], EPS[0])
    new, after = b.get_params(), b.get_state()
    # torch keeps the count as a float32 tensor for float32 parameters: 1e9 + 1 rounds to 1e9
    assert int(after["adam.step"]) == (10**9 if (framework, dtype) == ("torch", "float32") else 10**9 + 1)
    # float32: a few ulps of each quantity's scale (sums cancel: no pure relative bound)
    f32 = dtype == "float32"
    rtol = 1e-4 if f32 else 1e-10
    for k in p:
        m0, v0 = state[f"adam.m.{k}"].astype(np.float64), state[f"adam.v.{k}"].astype(np.float64)
        m = o.beta1 * m0 + (1 - o.beta1) * g[k]
        v = o.beta2 * v0 + (1 - o.beta2) * g[k] ** 2
        np.testing.assert_allclose(after[f"adam.m.{k}"], m, rtol=rtol, atol=1e-6 * f32 * np.abs(m).max(), err_msg=k)
        np.testing.assert_allclose(after[f"adam.v.{k}"], v, rtol=rtol, atol=1e-6 * f32 * np.abs(v).max(), err_msg=k)
        want = p[k] - o.lr * m / (np.sqrt(v) + o.eps)
        np.testing.assert_allclose(new[k] - p[k], want - p[k], rtol=rtol, atol=2e-7 * f32, err_msg=k)


@pytest.mark.parametrize("framework,mode", MODES)
def test_loaded_sgd_momentum_drives_next_step(framework: str, mode: str) -> None:
    """b_new = momentum*b + g and p_new = p - lr*b_new, with b the loaded trace."""
    o = OPTIMS["sgd_momentum"]
    b = _load(framework, "sgd_momentum", "float64", mode)
    p = b.get_params()
    state = _random_state("sgd_momentum", "float64", step=0)
    b.set_state(state)
    g = b.grads(XS[0], EPS[0], "loss")
    b.train_step(XS[0], EPS[0])
    new, after = b.get_params(), b.get_state()
    for k in p:
        trace = o.momentum * state[f"sgd.momentum.{k}"] + g[k]
        np.testing.assert_allclose(after[f"sgd.momentum.{k}"], trace, rtol=1e-12, err_msg=k)
        np.testing.assert_allclose(new[k] - p[k], -o.lr * trace, rtol=1e-10, err_msg=k)


# -- validation and compilation --------------------------------------------------------------
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_bad_state_raises(framework: str) -> None:
    b = _load(framework, "adam", "float64")
    b.train_step(XS[0], EPS[0])
    good = b.get_state()

    def raises(state: dict[str, np.ndarray], key: str) -> Any:
        with pytest.raises(ValueError, match=key.replace(".", r"\.")) as info:
            b.set_state(state)
        assert _bits_equal(b.get_state(), good), "a rejected state must change nothing"
        return info

    info = raises({**good, "adam.m.encoder.9.weight": np.zeros(3)}, "adam.m.encoder.9.weight")
    assert "adam.v.decoder.2.bias" in str(info.value)  # the message lists what is expected
    raises({k: v for k, v in good.items() if k != "adam.v.decoder.1.bias"}, "adam.v.decoder.1.bias")
    raises({**good, "adam.m.encoder.0.weight": good["adam.m.encoder.0.weight"].T}, "adam.m.encoder.0.weight")
    raises({**good, "adam.step": np.array([3])}, "adam.step")
    raises({**good, "adam.step": np.array(-1)}, "adam.step")
    raises({**good, "adam.step": np.array(2.5)}, "adam.step")
    if framework == "jax":
        raises({**good, "adam.step": np.array(2**31)}, "adam.step")  # optax's count is int32
    b.set_state({**good, "adam.step": np.array(5.0)})  # an integral float is fine
    assert int(b.get_state()["adam.step"]) == 5

    plain = _load(framework, "sgd", "float64")
    plain.set_state({})
    with pytest.raises(ValueError, match=r"adam\.step"):
        plain.set_state(good)
    sgd = _load(framework, "sgd_momentum", "float64")
    with pytest.raises(ValueError, match=r"sgd\.momentum\.encoder\.0\.weight"):
        sgd.set_state({})


@pytest.mark.parametrize("optim", ["adam", "sgd_momentum"])
@pytest.mark.parametrize("framework,mode", [("tensorflow", "function"), ("tensorflow", "xla"), ("jax", "jit")])
def test_set_state_does_not_recompile(framework: str, mode: str, optim: str) -> None:
    b = _load(framework, optim, "float32", mode)
    float(b.train_step(XS[0], EPS[0]))
    float(b.train_step(XS[1]))  # both step paths (given noise, device noise) warmed up
    n = b.compile_count()
    assert n >= 1
    for i, state in enumerate([_random_state(optim, "float32", step=10**9), b.get_state()]):
        b.set_state(state)
        float(b.train_step(XS[2 + i], EPS[2 + i]))
        float(b.train_step(XS[2 + i]))
    b.set_params(_params())
    b.set_state(_random_state(optim, "float32", step=7))
    float(b.train_step(XS[4], EPS[4]))
    assert b.compile_count() == n

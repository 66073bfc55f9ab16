"""GPU paths that can be checked without a GPU: a requested GPU that is absent is a clear
error (an `unavailable` record inside a run), and torch.compile's mode reaches inductor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from harness import OptimSpec, load_backend
from harness.api import DeviceUnavailable, MlpSpec
from harness.records import write_record
from harness.worker import Job, run_in_process
from tests.conftest import FRAMEWORKS, make_config

SPEC = MlpSpec(x_dim=12, hidden=(10,), latent=3)


def _has_gpu(framework: str) -> bool:
    """Whether `framework` sees a GPU: device=auto takes one when there is one."""
    return bool(load_backend(framework, SPEC, device="auto").version()["device_kind"] != "cpu")


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_absent_gpu_is_a_clear_error(framework: str) -> None:
    if _has_gpu(framework):
        pytest.skip("this machine has a GPU")
    with pytest.raises(DeviceUnavailable, match="device=gpu asked for"):
        load_backend(framework, SPEC, device="gpu")
    b = load_backend(framework, SPEC, device="auto")  # auto falls back to the CPU
    assert b.version()["device_kind"] == "cpu"


def test_absent_gpu_gives_an_unavailable_record(tmp_path: Path) -> None:
    if _has_gpu("torch"):
        pytest.skip("this machine has a GPU")
    c = make_config(framework={"name": "torch", "device": "gpu"}, measure={"names": ["identity"]})
    resolved = OmegaConf.to_container(OmegaConf.structured(c))
    path = tmp_path / "identity-torch.json"
    rec = run_in_process(Job("t", "identity", "torch", "eager", resolved, str(path)))  # type: ignore[arg-type]
    write_record(path, rec)
    assert rec["status"] == "unavailable" and "no CUDA device" in rec["error"]


@pytest.mark.slow
def test_torch_compile_mode_reaches_inductor(monkeypatch: pytest.MonkeyPatch) -> None:
    """framework.compile_mode=reduce-overhead hands inductor the mode's options (CUDA graphs;
    on a CPU inductor has no graphs to capture and the step is the same)."""
    import torch._inductor.compile_fx as cfx

    seen: list[object] = []
    real = cfx.compile_fx

    def spy(gm, inputs, config_patches=None, **kw):  # type: ignore[no-untyped-def]
        seen.append(config_patches)
        return real(gm, inputs, config_patches=config_patches, **kw)

    monkeypatch.setattr(cfx, "compile_fx", spy)
    x = (np.random.default_rng(0).uniform(size=(8, 12)) > 0.5).astype(float)
    eps = np.random.default_rng(1).standard_normal((8, 3))
    b = load_backend("torch", SPEC, OptimSpec(lr=0.01), mode="compiled", compile_mode="reduce-overhead")
    eager = load_backend("torch", SPEC, OptimSpec(lr=0.01), mode="eager")
    assert float(b.train_step(x, eps)) == pytest.approx(float(eager.train_step(x, eps)), rel=1e-6)
    # each graph the backend hands inductor carries the options (inductor recurses without them)
    assert seen.count({"triton.cudagraphs": True}) == b.compile_count() >= 1
    assert b.version()["compile_mode"] == "reduce-overhead"


def test_one_device_rule() -> None:
    """`wants_gpu` is the rule every backend and plain loop takes: cpu never, gpu always (or
    DeviceUnavailable naming the framework), auto when one is seen."""
    from harness.spec import wants_gpu

    assert [wants_gpu("fw", d, n) for d in ("cpu", "auto", "gpu") for n in (1, 2)] == [False, False, True, True, True, True]
    assert [wants_gpu("fw", d, 0) for d in ("cpu", "auto")] == [False, False]
    with pytest.raises(DeviceUnavailable, match="device=gpu asked for, but fw sees no GPU \\(a hint\\)"):
        wants_gpu("fw", "gpu", 0, "a hint")


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_plain_loops_take_the_backends_device_rule(framework: str) -> None:
    """The plain loop of a framework raises the same DeviceUnavailable as its backend."""
    import importlib

    if _has_gpu(framework):
        pytest.skip("this machine has a GPU")
    plain = importlib.import_module(f"impls.{framework}.plain")
    with pytest.raises(DeviceUnavailable) as from_plain:
        plain.resolve_device("gpu")
    with pytest.raises(DeviceUnavailable) as from_backend:
        load_backend(framework, SPEC, device="gpu")
    assert str(from_plain.value) == str(from_backend.value)


def test_load_backend_takes_a_runtime_spec_whole() -> None:
    from harness.api import RuntimeSpec

    b = load_backend("torch", SPEC, None, RuntimeSpec(dtype="float64", seed=3))
    assert b.runtime.dtype == "float64" and b.runtime.seed == 3
    same = load_backend("torch", SPEC, dtype="float64", seed=3)
    assert all(np.array_equal(v, same.get_params()[k]) for k, v in b.get_params().items())
    with pytest.raises(ValueError, match="pass a RuntimeSpec or its fields, not both"):
        load_backend("torch", SPEC, None, RuntimeSpec(), dtype="float64")
    with pytest.raises(ValueError, match="unknown keyword 'dtpye'"):
        load_backend("torch", SPEC, dtpye="float64")

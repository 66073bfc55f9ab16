"""Gradient-flow verdicts on a healthy model and on both negative controls, in all frameworks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from harness import data as data_mod
from harness.api import Backend
from harness.config import AppConfig, ConfigError, validate
from harness.initializers import init_params
from harness.measures import gradflow as gf
from harness.measures.common import backend, dataset, model_spec
from harness.records import read_records
from harness.worker import Job
from tests.conftest import FRAMEWORKS, make_config


def test_block_stats_against_numpy() -> None:
    g = {"encoder.0.weight": np.array([[3.0, 0.0]]), "encoder.0.bias": np.zeros(2), "decoder.0.weight": np.array([[-1.0, 2.0]]), "decoder.0.bias": np.array([2.0])}
    s = gf.block_stats(g)
    assert s["encoder"] == {"norm": 3.0, "nonzero_fraction": 0.5, "max_abs": 3.0}
    assert s["decoder"] == {"norm": 3.0, "nonzero_fraction": 1.0, "max_abs": 2.0}


def _config(**model: object) -> AppConfig:
    return make_config(model={"hidden": [32], **model},
                       measure={"gradflow": {"train_steps": 20, "log_every": 10, "fd_directions": 2}})


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize(
    "model,matches,decoder,recon_enc",
    [({}, True, True, True), ({"stop_gradient_z": True}, False, True, False), ({"freeze": "decoder"}, False, False, True)],
    ids=["healthy", "stop_gradient_z", "freeze_decoder"],
)
@pytest.mark.slow
def test_verdict(framework: str, model: dict, matches: bool, decoder: bool, recon_enc: bool, tmp_path: Path) -> None:  # type: ignore[type-arg]
    res = gf.run(_config(**model), Job("r", "gradflow", framework, "eager", {}, str(tmp_path / "r.json")))
    m = res.metrics
    v = m["verdict"]
    assert v["matches_theory"] is matches
    assert v["elbo_trains_decoder"] is decoder and v["elbo_trains_encoder"] is True
    assert (m["matrix"]["recon"]["encoder"]["norm"] > 0) is recon_enc
    assert m["matrix"]["kl"]["decoder"]["norm"] == 0.0  # exactly zero, always
    if matches:
        assert v["fd_ok"] and v["fd_worst_ratio"] < 0.5 and v["fd_unresolved"] == 0 and v["fd_kinked"] == 0
    assert all(r["step"] > 0 and r["tol"] > 0 for r in m["finite_differences"])  # recorded per check
    assert m["fd_settings"]["step"] == "derived" and m["fd_settings"]["tol"] == "derived"
    assert len(m["history"]) == 3 and all(h["loss/decoder"] >= 0 for h in m["history"])
    rec = {"framework": framework, "mode": "eager", "status": "ok", "error": None, "metrics": m}
    s = gf.summarize([rec])
    assert s.ok is matches
    assert f"the ELBO trains the decoder: {'yes' if decoder else 'no'}" in s.notes[0]


@pytest.mark.slow
def test_cli_negative_control_exits_nonzero(cli) -> None:  # type: ignore[no-untyped-def]
    r = cli("measure=gradflow", "framework=torch", "model.stop_gradient_z=true", "measure.gradflow.train_steps=10")
    assert r.returncode == 1
    assert "pattern matches theory: no" in r.stdout and "reconstruction reaches it: no" in r.stdout
    assert (next(cli.out_dir.glob("*/")) / "gradflow.png").exists()


@pytest.mark.slow
@pytest.mark.parametrize("control,says", [("model.stop_gradient_z=true", "reconstruction reaches it: no"),
                                          ("model.freeze=decoder", "the ELBO trains the decoder: no")])
def test_conv_negative_controls_fail_in_every_framework(cli, control: str, says: str) -> None:  # type: ignore[no-untyped-def]
    """model=conv data=mnist5k: each negative control breaks the pattern in all three frameworks
    and vaebench exits 1 (a small conv VAE: 4 and 8 filters)."""
    r = cli("measure=gradflow", "framework=all", "model=conv", "data=mnist5k", "model.filters=[4,8]", "model.dense=8",
            control, "measure.gradflow.train_steps=4", "measure.gradflow.log_every=2")
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    recs = read_records(cli.out_dir)
    assert {x["framework"] for x in recs} == set(FRAMEWORKS) and all(x["status"] == "ok" for x in recs)
    assert all(x["metrics"]["verdict"]["matches_theory"] is False for x in recs)
    assert all(x["metrics"]["matrix"]["kl"]["decoder"]["norm"] == 0.0 for x in recs)
    assert "pattern matches theory: no" in r.stdout and says in r.stdout


# --- the finite-difference check at any input width --------------------------------------


def _mnist_config(tmp_path: Path) -> AppConfig:
    """The MNIST experiment's model on random binary 28x28 pixels written as an .npz file."""
    rng = np.random.default_rng(0)
    path = tmp_path / "mnist.npz"
    np.savez(path, x_train=rng.integers(0, 256, (64, 28, 28), dtype=np.uint8), x_test=rng.integers(0, 256, (8, 28, 28), dtype=np.uint8))
    return make_config(model={"hidden": [512, 256], "latent": 32}, data={"source": "mnist", "path": str(path)})


class _Planted:
    """A float64 backend whose analytic gradient is wrong: every entry scaled by 1 + rel, or
    only the tensor `name`."""

    def __init__(self, b: Backend, rel: float, name: str | None = None) -> None:
        self.b, self.rel, self.name, self.spec = b, rel, name, b.spec

    def grads(self, x: np.ndarray, eps: np.ndarray, part: str) -> dict[str, np.ndarray]:
        g = self.b.grads(x, eps, part)  # type: ignore[arg-type]
        return {k: v * (1 + self.rel) if self.name in (None, k) else v for k, v in g.items()}

    def __getattr__(self, attr: str) -> object:
        return getattr(self.b, attr)


def _fd_setup(c: AppConfig, framework: str = "torch") -> tuple[Backend, dict[str, np.ndarray], np.ndarray, np.ndarray]:
    ds = dataset(c)
    spec = model_spec(c, ds)
    params = init_params(spec, c.seed)
    x = ds.x_train[: gf.MONITOR_BATCH]
    eps = data_mod.noise((len(x), spec.latent), c.seed, 0)
    return backend(c, framework, spec=spec, dtype="float64", params=params), params, x, eps


@pytest.mark.parametrize("width", [64, 784])
def test_fd_check_passes_healthy_and_flags_a_planted_error(width: int, tmp_path: Path) -> None:
    """A fixed 1e-6 tolerance failed a healthy model at 784 pixels; the derived tolerance must
    pass it and still flag a gradient wrong by 1e-4 relative, or one tensor's by 1e-3."""
    c = _config() if width == 64 else _mnist_config(tmp_path)
    b, params, x, eps = _fd_setup(c)
    assert x.shape[1] == width
    rows = gf.finite_difference_check(b, params, x, eps, 2, c.seed)
    v = gf.fd_verdict(rows)
    assert v["fd_ok"], [r for r in rows if not r["ok"]]
    assert v["fd_worst_ratio"] < 0.5 and v["fd_max_resolution"] <= gf.FD_RESOLUTION
    for r in rows:  # step and tolerance recorded per check, derived from float64 and the scale
        assert 0 < r["step"] <= gf.derived_step(float(np.finfo(np.float64).eps)) and r["smooth"]
        assert r["tol"] == pytest.approx(gf.FD_SAFETY * (r["rounding_bound"] + r["truncation_est"]))
    planted = {"all 1e-4": _Planted(b, 1e-4), "decoder.0.weight x1.001": _Planted(b, 1e-3, "decoder.0.weight")}
    for label, pb in planted.items():
        bad = gf.finite_difference_check(pb, params, x, eps, 1, c.seed)
        pv = gf.fd_verdict(bad)
        assert not pv["fd_ok"] and pv["fd_worst_ratio"] > 10, label
        # every part the planted tensor reaches is flagged in that tensor's block
        flagged = {(r["block"], r["part"]) for r in bad if not r["ok"]}
        assert flagged >= ({("decoder", "loss"), ("decoder", "recon")} | ({("encoder", p) for p in ("loss", "recon", "kl")} if pb.name is None else set())), label


def test_fd_tolerance_scales_with_the_loss_not_fixed() -> None:
    """The rounding bound grows with the loss's magnitude and shrinks with the step; a row is
    unresolved when its tolerance could not see an error of FD_RESOLUTION."""
    e = float(np.finfo(np.float64).eps)
    assert gf.derived_step(e) == pytest.approx((3 * e) ** (1 / 3)) and 8e-6 < gf.derived_step(e) < 9e-6
    small = gf.fd_row(1.0, 1.0 + 1e-9, 1.0 + 1e-9, 1e-5, e, 50.0, typical=1.0)
    big = gf.fd_row(1.0, 1.0 + 1e-9, 1.0 + 1e-9, 1e-5, e, 5000.0, typical=1.0)
    assert big["tol"] == pytest.approx(100 * small["tol"]) and small["ok"] and big["ok"]
    assert small["rounding_bound"] == pytest.approx(gf.FD_ROUNDING_C * e * 50.0 / 1e-5)
    wrong = gf.fd_row(1.0, 1.0 + 1e-4, 1.0 + 1e-4, 1e-5, e, 5000.0, typical=1.0)
    assert not wrong["ok"] and wrong["resolved"]
    trunc = gf.fd_row(1.0, 1.0 + 1e-7, 1.0 + 2.5e-8, 1e-5, e, 50.0, typical=1.0)  # Richardson: T = 4/3 * 7.5e-8
    assert trunc["truncation_est"] == pytest.approx(1e-7, rel=1e-6) and trunc["ok"]
    blind = gf.fd_row(1.0, 1.0, 1.0 + 1e-9, 1e-12, e, 5000.0, typical=1.0)  # step far too small
    assert not blind["resolved"] and not blind["ok"]
    orthogonal = gf.fd_row(1e-3, 1e-3 + 1e-11, 1e-3, 1e-5, e, 500.0, typical=1.0)  # small |a| by chance
    assert orthogonal["tol"] > gf.FD_RESOLUTION and orthogonal["resolved"] and orthogonal["ok"]
    exact = gf.fd_row(0.0, 0.0, 0.0, 1e-5, e, 50.0, typical=0.0)  # kl -> decoder
    assert exact["ok"] and exact["rel_err"] == 0.0


def test_fd_fixed_step_and_tolerance_escape_hatch() -> None:
    c = _config()
    b, params, x, eps = _fd_setup(c)
    rows = gf.finite_difference_check(b, params, x, eps, 1, c.seed, step=1e-6, tol=1e-6)
    assert all(r["tol"] == 1e-6 and r["step"] <= 1e-6 for r in rows) and gf.fd_verdict(rows)["fd_ok"]
    with pytest.raises(ConfigError, match="measure.gradflow.fd_tol"):
        validate(make_config(measure={"names": ["gradflow"], "gradflow": {"fd_tol": -1.0}}))


def test_smooth_step_has_no_kink_in_the_interval() -> None:
    c = _config()
    _, params, x, eps = _fd_setup(c)
    spec = model_spec(c, x.shape[1])
    names = [k for k in params if k.startswith("encoder")]
    d = gf.direction(params, names, np.random.default_rng(0))
    norm = np.sqrt(sum(np.sum(params[k] ** 2) for k in names))
    assert np.sqrt(sum(np.sum(v**2) for v in d.values())) == pytest.approx(norm)
    h, smooth = gf.smooth_step(params, d, x, eps, spec, 0.1)
    assert smooth and h < 0.1
    from harness import reference

    base = reference.activation_pattern(params, x, eps, spec)
    for t in np.linspace(-h, h, 9):
        assert np.array_equal(reference.activation_pattern({k: v + t * d[k] if k in d else v for k, v in params.items()}, x, eps, spec), base)


def test_fd_point_keeps_blank_image_patches_off_the_kink() -> None:
    """A convolution over a blank patch with the initial zero biases is exactly 0, on its ReLU's
    kink: no kink-free step exists there and the check fails; at `fd_point` (random biases) it
    passes, with the backend's own gradient."""
    from harness.api import load_backend
    from harness.models import MODELS

    spec = MODELS["conv"].example()
    params = init_params(spec, 0)
    x = np.zeros((2, *spec.input_shape))
    x[:, : spec.input_shape[0] // 2] = 1.0  # the lower half blank
    eps = data_mod.noise((2, spec.latent), 0, 0)
    b = load_backend("torch", spec, dtype="float64", params=params)
    at_init = gf.fd_verdict(gf.finite_difference_check(b, params, x, eps, 1, 0))
    assert not at_init["fd_ok"] and at_init["fd_kinked"] > 0
    at = gf.fd_point(params, 0)
    assert all(np.all(at[k] != 0) for k in at if k.endswith(".bias")) and all(
        np.array_equal(at[k], params[k]) for k in at if not k.endswith(".bias"))
    b.set_params(at)
    v = gf.fd_verdict(gf.finite_difference_check(b, at, x, eps, 1, 0))
    assert v["fd_ok"] and v["fd_kinked"] == 0, v

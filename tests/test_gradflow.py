"""Gradient-flow verdicts on a healthy model and on both negative controls, in all frameworks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from harness.config import AppConfig, to_app_config
from harness.measures import gradflow as gf
from harness.worker import Job


def test_block_stats_against_numpy() -> None:
    g = {"encoder.0.weight": np.array([[3.0, 0.0]]), "encoder.0.bias": np.zeros(2), "decoder.0.weight": np.array([[-1.0, 2.0]]), "decoder.0.bias": np.array([2.0])}
    s = gf.block_stats(g)
    assert s["encoder"] == {"norm": 3.0, "nonzero_fraction": 0.5, "max_abs": 3.0}
    assert s["decoder"] == {"norm": 3.0, "nonzero_fraction": 1.0, "max_abs": 2.0}


def _config(**model: object) -> AppConfig:
    return to_app_config(
        OmegaConf.merge(
            OmegaConf.structured(AppConfig),
            {"model": {"hidden": [32], **model}, "measure": {"gradflow": {"train_steps": 20, "log_every": 10, "fd_directions": 2}}, "progress": False},
        )
    )


@pytest.mark.parametrize("framework", ["torch", "tensorflow", "jax"])
@pytest.mark.parametrize(
    "model,matches,decoder,recon_enc",
    [({}, True, True, True), ({"stop_gradient_z": True}, False, True, False), ({"freeze": "decoder"}, False, False, True)],
    ids=["healthy", "stop_gradient_z", "freeze_decoder"],
)
def test_verdict(framework: str, model: dict, matches: bool, decoder: bool, recon_enc: bool, tmp_path: Path) -> None:  # type: ignore[type-arg]
    res = gf.run(_config(**model), Job("r", "gradflow", framework, "eager", {}, str(tmp_path / "r.json")))
    m = res.metrics
    v = m["verdict"]
    assert v["matches_theory"] is matches
    assert v["elbo_trains_decoder"] is decoder and v["elbo_trains_encoder"] is True
    assert (m["matrix"]["recon"]["encoder"]["norm"] > 0) is recon_enc
    assert m["matrix"]["kl"]["decoder"]["norm"] == 0.0  # exactly zero, always
    if matches:
        assert v["fd_ok"] and v["fd_max_rel_err"] <= 1e-6
    assert len(m["history"]) == 3 and all(h["loss/decoder"] >= 0 for h in m["history"])
    rec = {"framework": framework, "mode": "eager", "status": "ok", "error": None, "metrics": m}
    s = gf.summarize([rec])
    assert s.ok is matches
    assert f"the ELBO trains the decoder: {'yes' if decoder else 'no'}" in s.notes[0]


def test_cli_negative_control_exits_nonzero(cli) -> None:  # type: ignore[no-untyped-def]
    r = cli("measure=gradflow", "framework=torch", "model.stop_gradient_z=true", "measure.gradflow.train_steps=10")
    assert r.returncode == 1
    assert "pattern matches theory: no" in r.stdout and "reconstruction reaches it: no" in r.stdout
    assert (next(cli.out_dir.glob("*/")) / "gradflow.png").exists()

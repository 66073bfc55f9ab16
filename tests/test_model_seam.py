"""The model seam is real: a new model kind is one module in harness/models/ and one YAML in
conf/model/, nothing else changed, and it runs conformance and gradflow through the CLI in every
framework (its layers written once over the frameworks' ops, its NumPy oracle the reference)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FRAMEWORKS

ROOT = Path(__file__).resolve().parent.parent

#: a toy kind: one hidden layer of `width` tanh units each way, and a skip connection from z
#: straight to the output in the decoder (a layer the MLP kind does not have)
TOY = '''"""model=toy: one tanh layer each way, and a dense skip from z to the decoder's output."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from harness.models.base import (Layer, LayerFlops, ModelSpec, Param, bias_param, dense_layers, dense_param,
                                 np_activation, np_activation_backward, np_dense_backward, np_dense_forward)
from harness.schema import setting

KIND = "toy"


@dataclass(frozen=True)
class ToySpec(ModelSpec):
    kind: str = setting(KIND, choices=(KIND,))
    width: int = setting(16, gt=0)
    activation: str = setting("tanh", choices=("tanh",))


Spec = ToySpec


def params(s: Any) -> dict[str, Param]:
    return {"encoder.0.weight": dense_param(s.x_dim, s.width), "encoder.0.bias": bias_param(s.width),
            "encoder.1.weight": dense_param(s.width, 2 * s.latent), "encoder.1.bias": bias_param(2 * s.latent),
            "decoder.0.weight": dense_param(s.latent, s.width), "decoder.0.bias": bias_param(s.width),
            "decoder.1.weight": dense_param(s.width, s.x_dim), "decoder.1.bias": bias_param(s.x_dim),
            "decoder.2.weight": dense_param(s.latent, s.x_dim), "decoder.2.bias": bias_param(s.x_dim)}


def layers(s: Any) -> list[Layer]:
    return dense_layers(params(s))


def layer_flops(s: Any) -> list[LayerFlops]:
    return [LayerFlops("encoder", 0, 2 * s.x_dim * s.width), LayerFlops("encoder", 1, 4 * s.width * s.latent),
            LayerFlops("decoder", 0, 2 * s.latent * s.width), LayerFlops("decoder", 1, 2 * s.width * s.x_dim),
            LayerFlops("decoder", 2, 2 * s.latent * s.x_dim)]


def describe(s: Any) -> str:
    return f"toy width {s.width}, latent {s.latent}"


def encode(ops: Any, p: Any, x: Any, s: Any) -> Any:
    return ops.dense(ops.tanh(ops.dense(x, p["encoder.0.weight"], p["encoder.0.bias"])), p["encoder.1.weight"], p["encoder.1.bias"])


def decode(ops: Any, p: Any, z: Any, s: Any) -> Any:
    h = ops.tanh(ops.dense(z, p["decoder.0.weight"], p["decoder.0.bias"]))
    return ops.dense(h, p["decoder.1.weight"], p["decoder.1.bias"]) + ops.dense(z, p["decoder.2.weight"], p["decoder.2.bias"])


def np_forward(p: Any, block: str, h: np.ndarray, s: Any) -> tuple[np.ndarray, Any]:
    a = np_activation("tanh", np_dense_forward(h, p[f"{block}.0.weight"], p[f"{block}.0.bias"]))
    out = np_dense_forward(a, p[f"{block}.1.weight"], p[f"{block}.1.bias"])
    if block == "decoder":
        out = out + np_dense_forward(h, p["decoder.2.weight"], p["decoder.2.bias"])
    return out, (h, a)


def np_backward(p: Any, block: str, cache: Any, d: np.ndarray, s: Any, grads: dict[str, np.ndarray],
                per_example: bool = False) -> np.ndarray:
    h, a = cache
    da, grads[f"{block}.1.weight"], grads[f"{block}.1.bias"] = np_dense_backward(a, p[f"{block}.1.weight"], d, per_example)
    dh, grads[f"{block}.0.weight"], grads[f"{block}.0.bias"] = np_dense_backward(
        h, p[f"{block}.0.weight"], np_activation_backward("tanh", a, da), per_example)
    if block == "decoder":
        dz, grads["decoder.2.weight"], grads["decoder.2.bias"] = np_dense_backward(h, p["decoder.2.weight"], d, per_example)
        dh = dh + dz
    return dh


def np_pre_activations(cache: Any) -> list[np.ndarray]:
    return [cache[1]]


def example(**fields: Any) -> ToySpec:
    return ToySpec(**{"x_dim": 6, "width": 5, "latent": 2, **fields})
'''

TOY_YAML = "kind: toy\nwidth: 16\nlatent: 4\nlikelihood: bernoulli\n"


@pytest.mark.slow
def test_a_new_model_kind_is_one_module_and_one_yaml(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for d in ("harness", "impls", "conf"):
        shutil.copytree(ROOT / d, tree / d, ignore=shutil.ignore_patterns("__pycache__"))
    before = {p: p.read_bytes() for p in tree.rglob("*") if p.is_file()}
    (tree / "harness/models/toy.py").write_text(TOY)
    (tree / "conf/model/toy.yaml").write_text(TOY_YAML)
    changed = {p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.is_file() and before.get(p) != p.read_bytes()}
    assert changed == {"harness/models/toy.py", "conf/model/toy.yaml"}

    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONUNBUFFERED": "1"}
    out = tmp_path / "runs"
    r = subprocess.run([sys.executable, "-m", "harness.cli", "model=toy", "measure.names=[conformance,gradflow]",
                        "measure.conformance.steps=3", "measure.gradflow.train_steps=2", "measure.gradflow.fd_directions=1",
                        f"out_dir={out}", "progress=false"], cwd=tree, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "### Conformance across frameworks (same weights, batch and noise): PASS" in r.stdout
    assert "### Gradient flow" in r.stdout and ": FAIL" not in r.stdout
    recs = [json.loads(p.read_text()) for p in next(out.glob("*/")).glob("*.json")]
    assert sorted((x["measure"], x["framework"]) for x in recs) == sorted(
        (m, fw) for m in ("conformance", "gradflow") for fw in FRAMEWORKS)
    assert all(x["status"] == "ok" and x["config"]["model"]["kind"] == "toy" for x in recs)
    # its config is validated like any other kind's: a bad value is a one-line config error
    bad = subprocess.run([sys.executable, "-m", "harness.cli", "model=toy", "model.width=0", f"out_dir={out}"],
                         cwd=tree, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "model.width: must be > 0" in bad.stderr, bad.stderr


#: a new model key for the mlp kind, end to end: the field with its rule, its use in the layers
#: written once over ops, and in the NumPy oracle (all in harness/models/mlp.py), and its line in
#: conf/model/mlp.yaml. Nothing else: config, validation, record and backends follow.
KEY_EDITS = [
    ('    activation: Activation = setting("relu", choices=choices(Activation))\n',
     '    activation: Activation = setting("relu", choices=choices(Activation))\n'
     '    out_scale: float = setting(1.0, gt=0)\n'),
    ('    return _stack(ops, p, "decoder", z, spec)\n', '    return _stack(ops, p, "decoder", z, spec) * spec.out_scale\n'),
    ('            h = np_activation(act, h)\n    return h, inputs\n',
     '            h = np_activation(act, h)\n    return (h * spec.out_scale if block == "decoder" else h), inputs\n'),
    ('    act = getattr(spec, "activation", "relu")\n    for i in reversed(range(len(cache))):\n',
     '    act = getattr(spec, "activation", "relu")\n    d = d * spec.out_scale if block == "decoder" else d\n'
     '    for i in reversed(range(len(cache))):\n'),
]


@pytest.mark.slow
def test_a_new_model_key_is_two_files(tmp_path: Path) -> None:
    """`model.out_scale` (the decoder's output multiplied by it) added to the mlp kind in its
    module and its YAML: the CLI validates it, the backends and the oracle use it (conformance
    passes, gradients change with it), and the record keeps it."""
    tree = tmp_path / "tree"
    for d in ("harness", "impls", "conf"):
        shutil.copytree(ROOT / d, tree / d, ignore=shutil.ignore_patterns("__pycache__"))
    before = {p: p.read_bytes() for p in tree.rglob("*") if p.is_file()}
    mlp = tree / "harness/models/mlp.py"
    text = mlp.read_text()
    for old, new in KEY_EDITS:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    mlp.write_text(text)
    yaml = tree / "conf/model/mlp.yaml"
    yaml.write_text(yaml.read_text() + "out_scale: 1.0\n")
    changed = {p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.is_file() and before.get(p) != p.read_bytes()}
    assert changed == {"harness/models/mlp.py", "conf/model/mlp.yaml"}

    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONUNBUFFERED": "1"}
    norms = {}
    for scale in (1.0, 0.25):
        out = tmp_path / f"runs{scale}"
        r = subprocess.run([sys.executable, "-m", "harness.cli", "framework=torch", f"model.out_scale={scale}",
                            "measure.names=[conformance,gradflow]", "measure.conformance.steps=2",
                            "measure.conformance.dtypes=[float64]", "measure.gradflow.train_steps=2",
                            "measure.gradflow.fd_directions=1", f"out_dir={out}", "progress=false"],
                           cwd=tree, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "### Conformance across frameworks (same weights, batch and noise): PASS" in r.stdout
        recs = {x["measure"]: x for x in (json.loads(p.read_text()) for p in next(out.glob("*/")).glob("*.json"))}
        assert all(x["config"]["model"]["out_scale"] == scale for x in recs.values())
        norms[scale] = recs["gradflow"]["metrics"]["matrix"]["recon"]["decoder"]["norm"]
    assert norms[0.25] != pytest.approx(norms[1.0], rel=1e-3)  # the key reached the backend's layers
    bad = subprocess.run([sys.executable, "-m", "harness.cli", "model.out_scale=-1", f"out_dir={tmp_path}"],
                         cwd=tree, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "model.out_scale: must be > 0" in bad.stderr, bad.stderr

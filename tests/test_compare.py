"""`vaebench compare BASELINE CURRENT`: exit 1 on a regression, 0 otherwise, 2 on bad input or
mismatched throughput environments."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harness import compare
from harness.measures.common import Quantity
from harness.records import read_records, write_record
from tests.conftest import ROOT

REF = ROOT / "results" / "reference" / "cpu-2core"


def _copy(tmp_path: Path, name: str) -> Path:
    out = tmp_path / name
    shutil.copytree(REF, out, ignore=shutil.ignore_patterns("*.md", "*.html", "*.csv", "*.tex", "*.png", "jobs", "cli.log"))
    return out


def _edit(run: Path, measure: str, fn: Any, framework: str | None = None) -> None:
    for r in read_records(run):
        if r["measure"] == measure and framework in (None, r["framework"]):
            rec = copy.deepcopy(r)
            fn(rec)
            write_record(Path(r["_file"]), rec)


def _cmp(base: Path, cur: Path, *extra: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`vaebench compare BASE CUR` run in `cwd` (default: the folder that holds CUR, a test's own)."""
    return subprocess.run([sys.executable, "-m", "harness.cli", "compare", str(base), str(cur), *extra],
                          cwd=cwd or cur.parent, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_a_run_against_itself_passes(tmp_path: Path) -> None:
    cur = _copy(tmp_path, "cur")
    r = _cmp(REF, cur)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 regression(s)" in r.stdout and "table: compare.md" in r.stdout
    changes, _ = compare.compare(read_records(REF), read_records(cur))
    assert {c.measure for c in changes} >= {"identity", "gradflow", "conformance", "convergence", "throughput"}
    assert all(c.verdict == "ok" for c in changes)


def test_compare_never_writes_into_its_inputs(tmp_path: Path) -> None:
    """The table goes to ./compare.md, or where -o says; BASELINE and CURRENT (say a committed
    reference) stay as they were; run from inside an input, it asks for -o."""
    base, cur, here = _copy(tmp_path, "base"), _copy(tmp_path, "cur"), tmp_path / "here"
    here.mkdir()
    before = {p: p.stat().st_mtime_ns for p in (*base.rglob("*"), *cur.rglob("*"))}
    r = _cmp(base, cur, cwd=here)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert (here / "compare.md").read_text().startswith(f"# compare {base} -> {cur}: ")
    r = _cmp(base, cur, "-o", str(tmp_path / "elsewhere" / "table.md"), cwd=here)
    assert r.returncode == 0 and (tmp_path / "elsewhere" / "table.md").exists()
    after = {p: p.stat().st_mtime_ns for p in (*base.rglob("*"), *cur.rglob("*"))}
    assert after == before  # nothing added to or changed in the inputs
    r = _cmp(base, cur, cwd=cur)
    assert r.returncode == 2 and "give -o PATH" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (cur / "compare.md").exists()
    help_text = _cmp(base, cur, "--help", cwd=here).stdout
    assert "./compare.md" in " ".join(help_text.split())


def _slower(factor: float) -> Any:
    def edit(rec: dict[str, Any]) -> None:
        for b in rec["metrics"]["batches"]:
            b["step_s_samples"] = [s * factor for s in b["step_s_samples"]]
            b["step_s_median"] *= factor
    return edit


def test_a_planted_20_percent_throughput_drop_fails(tmp_path: Path) -> None:
    cur = _copy(tmp_path, "cur")
    _edit(cur, "throughput", _slower(1 / 0.8), framework="jax")  # 20% fewer samples/s = 25% longer steps
    r = _cmp(REF, cur)
    assert r.returncode == 1, r.stdout[-3000:]
    bad = [ln for ln in r.stdout.splitlines() if "SLOWER" in ln]
    assert bad and all("throughput" in ln and "jax/" in ln for ln in bad)
    # a 5% change is below the minimum effect (10%): not a regression, even if significant
    small = _copy(tmp_path, "small")
    _edit(small, "throughput", _slower(1.05), framework="jax")
    assert _cmp(REF, small).returncode == 0


def test_several_processes_of_one_throughput_job_pool_their_repeats() -> None:
    """The same job run in three processes: its quantity holds every repeat of all three and
    their median (not the last record's alone), so one process's offset weighs as one of three."""
    from harness.measures import throughput

    (rec,) = [r for r in read_records(REF) if r["measure"] == "throughput" and r["framework"] == "jax"][:1]
    runs = []
    for offset in (1.0, 1.3, 1.1):  # three processes, one 30% slow
        r = copy.deepcopy(rec)
        for b in r["metrics"]["batches"]:
            b["step_s_samples"] = [s * offset for s in b["step_s_samples"]]
        runs.append(r)
    name, alone = next(iter(throughput.compared([rec]).items()))
    pooled = throughput.compared(runs)[name]
    assert pooled.samples is not None and alone.samples is not None
    assert len(pooled.samples) == 3 * len(alone.samples)
    assert sorted(pooled.samples) == sorted(s * o for o in (1.0, 1.3, 1.1) for s in alone.samples)
    assert pooled.value == pytest.approx(float(np.median(pooled.samples)))
    assert alone.value == pytest.approx(float(np.median(alone.samples)))


def test_mann_whitney_against_its_closed_form() -> None:
    """Fully separated samples of 10 and 10: P(U >= 100) = 1 / C(20, 10) under the null."""
    base = list(np.linspace(1.0, 1.1, 10))
    assert compare.mann_whitney_slower(base, [x + 1 for x in base]) == pytest.approx(1 / math.comb(20, 10), rel=1e-9)
    assert compare.mann_whitney_slower([x + 1 for x in base], base) == pytest.approx(1.0)


def test_throughput_refuses_a_different_machine(tmp_path: Path) -> None:
    cur = _copy(tmp_path, "cur")

    def other_cpu(rec: dict[str, Any]) -> None:
        rec["env"]["cpu_model"] = "Another CPU"
    _edit(cur, "throughput", other_cpu, framework="torch")
    r = _cmp(REF, cur)
    assert r.returncode == 2 and "cpu_model" in r.stderr and "--allow-env-mismatch" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert _cmp(REF, cur, "--allow-env-mismatch").returncode == 0


def test_a_release_change_is_named_and_judged(tmp_path: Path) -> None:
    """Records that differ only in a framework's version (another environment): compare needs no
    flag, names the change in its heading, and still judges every quantity, so a planted change
    in that release is caught (CHANGED, SLOWER)."""
    cur = _copy(tmp_path, "cur")
    old = read_records(REF)[0]["env"]

    def release(rec: dict[str, Any]) -> None:
        rec["env"]["framework_version"] = "9.9.9"
        rec["env"]["packages"] = {**rec["env"].get("packages", {}), "optax": "0.0.1"}
    for measure in ("identity", "gradflow", "conformance", "convergence", "throughput"):
        _edit(cur, measure, release, framework="jax")
    r = _cmp(REF, cur)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    jax_version = next(rec["env"]["framework_version"] for rec in read_records(REF) if rec["framework"] == "jax")
    head = r.stdout.strip().splitlines()[-2]
    assert f"(jax {jax_version} → 9.9.9" in head and "0 regression(s)" in head, head
    assert "torch" not in head.split(":")[0] and old["python"] not in head  # what did not change is not named
    changes, _ = compare.compare(read_records(REF), read_records(cur))
    assert {c.measure for c in changes} >= {"identity", "gradflow", "conformance", "convergence", "throughput"}
    # the same release with a planted numerical change and a 25% longer step: both caught
    _edit(cur, "identity", lambda rec: rec["metrics"].__setitem__("elbo_mean", rec["metrics"]["elbo_mean"] * 1.01),
          framework="jax")
    _edit(cur, "throughput", _slower(1.25), framework="jax")
    r = _cmp(REF, cur)
    assert r.returncode == 1
    bad = {ln.split("|")[1].strip() for ln in r.stdout.splitlines() if "CHANGED" in ln or "SLOWER" in ln}
    assert bad == {"identity", "throughput"}, r.stdout[-3000:]
    assert "jax 9.9.9" not in r.stdout and f"jax {jax_version} → 9.9.9" in r.stdout


def test_release_changes_against_hand_written_environments() -> None:
    def rec(fw: str, **env: Any) -> dict[str, Any]:
        return {"framework": fw, "env": {"framework": fw, **env}}
    base = [rec("jax", framework_version="0.10.1", jaxlib_version="0.10.1", numpy="2.0", python="3.11.7"),
            rec("torch", framework_version="2.13.0", numpy="2.0", python="3.11.7")]
    cur = [rec("jax", framework_version="0.10.2", jaxlib_version="0.10.2", numpy="2.0", python="3.11.7"),
           rec("torch", framework_version="2.13.0", numpy="2.0", python="3.11.7", packages={"optax": "1"})]
    assert compare.release_changes(base, cur) == ["jax 0.10.1 → 0.10.2", "jaxlib 0.10.1 → 0.10.2"]
    assert compare.release_changes(base, base) == []
    # a machine difference is not a release
    assert compare.env_differences(base, cur) == []
    moved = [rec("jax", framework_version="0.10.1", cpu_model="B"), rec("torch", framework_version="2.13.0")]
    assert compare.env_differences([rec("jax", framework_version="0.10.1", cpu_model="A")], moved) == ["jax cpu_model: A -> B"]


@pytest.mark.parametrize(
    ("measure", "edit", "regression"),
    [
        # float64 closed forms: a rounding-level change (another CPU vendor) passes, a real one fails
        ("identity", lambda r: r["metrics"].__setitem__("elbo_mean", r["metrics"]["elbo_mean"] * (1 + 1e-13)), False),
        ("identity", lambda r: r["metrics"].__setitem__("elbo_mean", r["metrics"]["elbo_mean"] * (1 + 1e-6)), True),
        ("identity", lambda r: r["metrics"].__setitem__("residual_max", 1.0), True),
        ("gradflow", lambda r: r["metrics"]["matrix"]["loss"]["encoder"].__setitem__(
            "norm", r["metrics"]["matrix"]["loss"]["encoder"]["norm"] * (1 + 1e-12)), False),
        ("gradflow", lambda r: r["metrics"]["matrix"]["kl"]["decoder"].__setitem__("nonzero_fraction", 0.5), True),
        # the verdict is recomputed from the numbers: half the encoder's tensors without a gradient of the ELBO
        ("gradflow", lambda r: r["metrics"]["matrix"]["loss"]["encoder"].__setitem__("nonzero_fraction", 0.5), True),
        ("convergence", lambda r: r["metrics"]["runs"].__setitem__(slice(1, None), []), True),  # seeds lost
        ("convergence", lambda r: r.update(status="failed", metrics={**r["metrics"], "runs": []}), True),
    ],
    ids=["identity-ulp", "identity-1e-6", "identity-residual", "gradflow-ulp", "gradflow-pattern", "gradflow-verdict",
         "convergence-seeds", "convergence-failed"],
)
def test_numeric_tolerances(tmp_path: Path, measure: str, edit: Any, regression: bool) -> None:
    cur = _copy(tmp_path, "cur")
    _edit(cur, measure, edit, framework="tensorflow")
    changes, _ = compare.compare(read_records(REF), read_records(cur))
    bad = [c for c in changes if c.regression]
    assert bool(bad) is regression, [c.__dict__ for c in bad]
    assert all(c.measure == measure and c.name.startswith("tensorflow") for c in bad)


def test_convergence_band_comes_from_the_seed_spread() -> None:
    spread = 0.2
    base = Quantity(-22.0, "band", 0.05, spread=spread)
    inside = Quantity(-22.0 + 0.9 * compare.BAND_K * spread, "band", 0.05, spread=0.01)
    outside = Quantity(-22.0 - 1.1 * compare.BAND_K * spread, "band", 0.05, spread=0.01)
    assert compare.judge("x", base, inside, 0.1, 0.01)[0] == "ok"
    assert compare.judge("x", base, outside, 0.1, 0.01)[0] == "CHANGED"
    # with one seed (no spread) the floor still allows rounding-level changes only
    one = Quantity(-22.0, "band", 0.05)
    assert compare.judge("x", one, Quantity(-22.04, "band", 0.05), 0.1, 0.01)[0] == "ok"
    assert compare.judge("x", one, Quantity(-22.2, "band", 0.05), 0.1, 0.01)[0] == "CHANGED"


def test_conformance_check_that_now_fails_is_a_regression(tmp_path: Path) -> None:
    cur = _copy(tmp_path, "cur")
    rec = next(r for r in read_records(cur) if r["measure"] == "conformance" and r["framework"] == "jax")
    arrays = Path(rec["_file"]).parent / rec["metrics"]["arrays"]
    with np.load(arrays) as f:
        data = {k: f[k] for k in f.files}
    key = next(k for k in data if k.startswith("float64/terms/"))
    data[key] = data[key] * (1 + 1e-6)  # a real disagreement in the float64 terms
    np.savez(arrays, **data)
    changes, _ = compare.compare(read_records(REF), read_records(cur))
    bad = {c.name for c in changes if c.regression}
    assert bad and all("float64" in n and n.startswith("terms") for n in bad), bad


@pytest.mark.slow
def test_a_changed_learning_rate_fails_on_the_elbo(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Real runs: the same config twice passes; a changed learning rate fails on the ELBO."""
    common = ("framework=torch", "measure=convergence", "measure.convergence.epochs=3", "measure.convergence.iwae_k=50",
              "measure.convergence.seeds=[0,1,2]")
    runs = {}
    for name, extra in (("base", ()), ("again", ()), ("lr", ("optim.lr=0.003",))):
        r = cli(*common, *extra, f"hydra.run.dir={tmp_path / name}")
        assert r.returncode == 0, r.stderr[-2000:]
        runs[name] = tmp_path / name
    assert _cmp(runs["base"], runs["again"]).returncode == 0
    r = _cmp(runs["base"], runs["lr"])
    assert r.returncode == 1, r.stdout
    assert "optim.lr: 0.001 -> 0.003" in r.stdout
    assert any("CHANGED" in ln and "test ELBO" in ln for ln in r.stdout.splitlines())


def test_a_key_the_measure_does_not_read_is_no_config_difference(tmp_path: Path) -> None:
    """identity builds its own model from `measure.identity`: a baseline whose model.hidden,
    data.source and optim.lr differ is no config difference (its records, written before
    measures declared their READS, hold the whole config); its own section is one."""
    cur = _copy(tmp_path, "cur")

    def unread(rec: dict[str, Any]) -> None:
        rec["config"]["model"]["hidden"], rec["config"]["data"]["source"], rec["config"]["optim"]["lr"] = [7], "synthetic", 0.5
    _edit(cur, "identity", unread)
    changes, notes = compare.compare(read_records(REF), read_records(cur))
    assert not [n for n in notes if "config differs" in n], notes
    assert all(c.verdict == "ok" for c in changes if c.measure == "identity")

    def read(rec: dict[str, Any]) -> None:
        rec["config"]["measure"]["identity"]["mc_samples"] = 10
    _edit(cur, "identity", read)
    _, notes = compare.compare(read_records(REF), read_records(cur))
    assert [n for n in notes if "config differs" in n] == ["identity [-]: config differs: measure.identity.mc_samples: 2000 -> 10"]


def test_records_of_different_measure_versions_are_not_compared(tmp_path: Path) -> None:
    """A measure whose current records come from version 2 of it, its baseline from version 1
    (records from before versions: no `measure_version`): one line naming the measure and both
    versions, the measure not compared, the others are, exit code 2."""
    cur = _copy(tmp_path, "cur")
    _edit(cur, "identity", lambda rec: rec.update(measure_version=2))
    changes, _ = compare.compare(read_records(REF), read_records(cur))
    identity = [c for c in changes if c.measure == "identity"]
    assert len(identity) == 1 and identity[0].verdict == compare.INCOMPARABLE
    assert (identity[0].baseline, identity[0].current) == ("1", "2") and not identity[0].regression
    assert {c.measure for c in changes} > {"identity", "gradflow"}
    assert all(c.verdict == "ok" for c in changes if c.measure != "identity")
    r = _cmp(REF, cur)
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot compare identity" in lines[0], r.stderr
    assert "measure version 1" in lines[0] and "version 2" in lines[0]
    assert "1 measure(s) not compared" in r.stdout and "NOT COMPARED" in r.stdout
    assert lines[0].removeprefix("vaebench compare: ") in (cur.parent / "compare.md").read_text()
    # a regression elsewhere is still reported, and the exit code stays 2 (the comparison is incomplete)
    _edit(cur, "gradflow", lambda r: r["metrics"]["matrix"]["kl"]["decoder"].__setitem__("nonzero_fraction", 0.5))
    r = _cmp(REF, cur)
    assert r.returncode == 2 and "CHANGED" in r.stdout and " 0 regression(s)" not in r.stdout
    # the same version on both sides (2 and 2) compares as before
    base = _copy(tmp_path, "base")
    _edit(base, "identity", lambda rec: rec.update(measure_version=2))
    _edit(cur, "gradflow", lambda r: r["metrics"]["matrix"]["kl"]["decoder"].__setitem__("nonzero_fraction", 0.0))
    assert _cmp(base, cur).returncode == 0


def test_bad_input(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    r = _cmp(REF, tmp_path / "nope")
    assert r.returncode == 2 and "no such folder" in r.stderr
    r = _cmp(REF, tmp_path / "empty")
    assert r.returncode == 2 and "no records" in r.stderr
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.json").write_text(json.dumps({"hello": 1}))
    r = _cmp(REF, tmp_path / "junk")
    assert r.returncode == 2 and "x.json" in r.stderr

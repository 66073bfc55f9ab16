"""`vaebench report`: tables, tidy CSV, report.md/html from records alone; combined runs, seeds,
failed and malformed records."""

from __future__ import annotations

import base64
import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from harness import report
from harness.measures import MEASURES
from harness.records import config_hash, read_records, write_record
from tests.conftest import ROOT

REF = ROOT / "results" / "reference" / "cpu-2core"
OUTPUTS = ("report.md", "report.html")


def _copy_ref(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(REF, run, ignore=shutil.ignore_patterns("*.md", "*.html", "*.csv", "*.tex", "*.png", "jobs"))
    return run


def _outputs(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run.iterdir() if p.suffix in (".md", ".csv", ".tex", ".html")}


def test_reference_holds_every_suite_measure() -> None:
    measures = {r["measure"] for r in read_records(REF)}
    assert {"conformance", "gradflow", "identity", "throughput", "convergence"} <= measures


def test_rebuilt_report_is_the_same(tmp_path: Path) -> None:
    """Delete a run's report and rebuild it from the records: the same tables come out."""
    run = _copy_ref(tmp_path)
    report.build(run)
    first = _outputs(run)
    assert {f"{m}.{ext}" for m in ("identity", "gradflow", "conformance", "convergence", "throughput")
            for ext in ("md", "csv", "tex")} | set(OUTPUTS) <= set(first)
    for name in first:
        (run / name).unlink()
    report.build(run)
    assert _outputs(run) == first


def test_tidy_csv_holds_raw_numbers(tmp_path: Path) -> None:
    run = _copy_ref(tmp_path)
    report.build(run)
    recs = {r["framework"]: r for r in read_records(run) if r["measure"] == "identity"}
    ident = pd.read_csv(run / "identity.csv")
    torch_row = ident[ident["framework"] == "torch"].iloc[0]
    assert torch_row["ELBO"] == recs["torch"]["metrics"]["elbo_mean"]  # exact: not the 4-digit text
    conv = pd.read_csv(run / "convergence.csv")
    crec = next(r for r in read_records(run) if r["measure"] == "convergence" and r["framework"] == "jax")
    elbos = [x["evals"][-1]["test_elbo"] for x in crec["metrics"]["runs"]]
    row = conv[conv["framework"] == "jax"].iloc[0]
    assert row["test ELBO"] == pytest.approx(np.mean(elbos), rel=1e-12)
    if len(elbos) > 1:
        assert row["test ELBO std"] == pytest.approx(np.std(elbos, ddof=1), rel=1e-12)
    thr = pd.read_csv(run / "throughput.csv")
    assert thr["samples/s"].dtype.kind == "f" and (thr["samples/s"] > 0).all()
    for m in MEASURES:
        if (run / f"{m}.csv").exists():
            assert len(pd.read_csv(run / f"{m}.csv")) > 0


def _fail(rec: dict[str, Any], partial: bool) -> dict[str, Any]:
    bad = copy.deepcopy(rec)
    bad["status"], bad["error"] = "failed", "worker died of SIGKILL"
    for key in ("framework_version", "device_name", "device"):  # the parent writes it: no framework facts
        bad["env"].pop(key, None)
    if not partial:
        bad["metrics"] = {}
    else:  # a killed job keeps what it reached: drop the finished parts, keep some keys
        bad["metrics"] = {k: v for i, (k, v) in enumerate(bad["metrics"].items()) if i % 2 == 0}
    return bad


@pytest.mark.parametrize("partial", [False, True], ids=["no metrics", "partial metrics"])
def test_one_failed_job_in_every_measure_renders(tmp_path: Path, partial: bool) -> None:
    """A run where one job of every measure failed: a report with empty cells, never a crash."""
    run = _copy_ref(tmp_path)
    victims = {}
    for r in read_records(run):
        if r["framework"] == "tensorflow":
            victims[r["measure"]] = r
            write_record(Path(r["_file"]), _fail(r, partial))
    text, ok, _ = report.build(run)
    assert not ok
    assert "could not summarize" not in text  # the measures handle it themselves
    for m in victims:
        assert (run / f"{m}.md").exists()
        tidy = pd.read_csv(run / f"{m}.csv")
        assert len(tidy) > 0
    ident = pd.read_csv(run / "identity.csv")
    assert "version" not in ident.columns and "device" not in ident.columns  # no spurious variant columns
    assert np.isnan(ident[ident["framework"] == "tensorflow"].iloc[0].get("ELBO", np.nan))
    assert "tensorflow" in (run / "report.html").read_text()


def test_malformed_records_are_skipped_by_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _copy_ref(tmp_path)
    good = len(read_records(run))
    capsys.readouterr()
    rec = json.loads(next(run.glob("identity-torch-*.json")).read_text())
    (run / "truncated.json").write_text(json.dumps(rec)[:200])
    (run / "a-list.json").write_text("[1, 2]")
    (run / "future.json").write_text(json.dumps({**rec, "schema_version": 99}))
    (run / "bad-status.json").write_text(json.dumps({**rec, "status": "great"}))
    (run / "bad-type.json").write_text(json.dumps({**rec, "metrics": "pickle:..."}))
    assert len(read_records(run)) == good
    err = capsys.readouterr().err
    for name in ("truncated.json", "a-list.json", "future.json", "bad-status.json", "bad-type.json"):
        assert re.search(rf"warning: skipped .*{name}", err), name
    assert report.main([str(run)]) == 0


def _variant(rec: dict[str, Any], latent: int, seed: int, shift: float) -> dict[str, Any]:
    r = copy.deepcopy(rec)
    r["config"]["measure"]["identity"]["latent"] = latent  # identity's own model: the latent size it reads
    r["config"]["seed"] = seed
    r["metrics"]["elbo_mean"] += shift
    r["run_id"] = f"sweep-{latent}-{seed}"
    return r


def test_combined_runs_carry_differing_keys_and_aggregate_seeds(tmp_path: Path) -> None:
    """Records from a sweep over measure.identity.latent x seed: rows name the latent size; seeds
    aggregate to mean ± std (checked against NumPy)."""
    base = {r["framework"]: r for r in read_records(REF) if r["measure"] == "identity"}
    shifts = {(2, 0): 0.0, (2, 1): 0.5, (2, 2): 1.5, (8, 0): -1.0, (8, 1): -3.0, (8, 2): -2.0}
    for (latent, seed), shift in shifts.items():
        for fw, rec in base.items():
            write_record(tmp_path / f"run-{latent}-{seed}" / f"identity-{fw}.json", _variant(rec, latent, seed, shift))
    out = tmp_path / "combined"
    assert report.main([str(p) for p in sorted(tmp_path.glob("run-*"))] + ["-o", str(out)]) == 0
    tidy = pd.read_csv(out / "identity.csv")
    assert len(tidy) == 2 * len(base)
    key = "measure.identity.latent"
    assert set(tidy[key]) == {2, 8} and (tidy["seeds"] == 3).all()
    for latent in (2, 8):
        vals = [base["torch"]["metrics"]["elbo_mean"] + shifts[(latent, s)] for s in range(3)]
        row = tidy[(tidy[key] == latent) & (tidy["framework"] == "torch")].iloc[0]
        assert row["ELBO"] == pytest.approx(np.mean(vals), rel=1e-12)
        assert row["ELBO std"] == pytest.approx(np.std(vals, ddof=1), rel=1e-12)
    md = (out / "identity.md").read_text()
    assert key in md and "±" in md and md.count("| torch") == 2


def test_a_key_the_measure_does_not_read_makes_no_variant(tmp_path: Path) -> None:
    """identity builds its own model from `measure.identity`: records whose model.*, data.* or
    optim.* differ (and which were written before measures declared their READS, with the whole
    config) are one variant, not several; a key it reads (its own section) still is a column."""
    base = {r["framework"]: r for r in read_records(REF) if r["measure"] == "identity"}
    for i, (hidden, source, lr) in enumerate(((["128"], "digits", 1e-3), (["32", "16"], "synthetic", 0.1))):
        for fw, rec in base.items():
            r = copy.deepcopy(rec)
            r["config"]["model"]["hidden"], r["config"]["data"]["source"], r["config"]["optim"]["lr"] = hidden, source, lr
            r["config"]["framework"]["precision"] = ["float32", "float64"][i]  # identity computes in float64 anyway
            r["run_id"] = f"run-{i}"
            write_record(tmp_path / f"run-{i}" / f"identity-{fw}.json", r)
    recs = report.load([tmp_path / "run-0", tmp_path / "run-1"])
    assert report.variant_keys(recs) == []
    assert len({config_hash(r) for r in recs}) == len(base)  # one config per framework: the newer run's is kept
    out = tmp_path / "combined"
    assert report.main([str(tmp_path / "run-0"), str(tmp_path / "run-1"), "-o", str(out)]) == 0
    tidy = pd.read_csv(out / "identity.csv")
    assert len(tidy) == len(base) and not [c for c in tidy.columns if c.startswith(("model.", "data.", "optim.", "framework."))]
    # and a key it reads is a variant
    r = copy.deepcopy(recs[0])
    r["config"]["measure"]["identity"]["obs_sigma"] = 0.25
    assert report.variant_keys([recs[0], r]) == ["measure.identity.obs_sigma"]


def test_records_of_two_measure_versions_are_told_apart(tmp_path: Path) -> None:
    """A record from before measure versions (no `measure_version`: version 1) and one of version
    2 of the same config: both kept (different config hashes), a `measure_version` column."""
    base = {r["framework"]: r for r in read_records(REF) if r["measure"] == "identity"}
    for fw, rec in base.items():
        assert "measure_version" not in rec  # written before versions
        write_record(tmp_path / "v1" / f"identity-{fw}.json", rec)
        write_record(tmp_path / "v2" / f"identity-{fw}.json", {**rec, "measure_version": 2, "run_id": "v2"})
    recs = report.load([tmp_path / "v1", tmp_path / "v2"])
    kept, dropped = report.newest_per_config(recs)
    assert len(kept) == 2 * len(base) and not dropped
    assert report.variant_keys(recs) == ["measure_version"]
    out = tmp_path / "combined"
    assert report.main([str(tmp_path / "v1"), str(tmp_path / "v2"), "-o", str(out)]) == 0
    tidy = pd.read_csv(out / "identity.csv")
    assert sorted(tidy["measure_version"]) == [1] * len(base) + [2] * len(base)


def _rerun(rec: dict[str, Any], run_id: str, created_at: str, status: str = "ok", shift: float = 0.0) -> dict[str, Any]:
    r = copy.deepcopy(rec)
    r.update(run_id=run_id, created_at=created_at, status=status, error=None if status == "ok" else "worker died of SIGKILL")
    r["metrics"]["elbo_mean"] += shift
    return r


def test_combined_runs_keep_the_newest_record_of_each_config(tmp_path: Path) -> None:
    """A killed run and its resumed run, reported together: one row per framework, from the
    newest `ok` record of its config (the newest record where none is ok); the files dropped
    are named in the report and on the terminal. `--all-runs` keeps every record, and a `run`
    column tells the runs apart."""
    base = {r["framework"]: r for r in read_records(REF) if r["measure"] == "identity"}
    old, new = tmp_path / "killed", tmp_path / "resumed"
    t0, t1 = "2026-01-01T00:00:00+00:00", "2026-01-02T00:00:00+00:00"
    runs = {  # framework: (status, elbo shift) in the killed run, then in the resumed run
        "torch": (("ok", 0.0), ("ok", 1.0)),  # both ok: the newer one
        "tensorflow": (("ok", 2.0), ("failed", 0.0)),  # the newer one failed: the older ok one
        "jax": (("failed", 0.0), ("failed", 3.0)),  # none ok: the newer one
    }
    for fw, ((s0, d0), (s1, d1)) in runs.items():
        write_record(old / f"identity-{fw}.json", _rerun(base[fw], "killed", t0, s0, d0))
        write_record(new / f"identity-{fw}.json", _rerun(base[fw], "resumed", t1, s1, d1))
    out = tmp_path / "combined"
    r = subprocess.run([sys.executable, "-m", "harness.cli", "report", str(old), str(new), "-o", str(out)], cwd=ROOT,
                       capture_output=True, text=True)
    tidy = pd.read_csv(out / "identity.csv").set_index("framework")
    assert sorted(tidy.index) == ["jax", "tensorflow", "torch"] and "run" not in tidy.columns
    assert tidy.loc["torch", "ELBO"] == pytest.approx(base["torch"]["metrics"]["elbo_mean"] + 1.0, rel=1e-12)
    assert tidy.loc["tensorflow", "ELBO"] == pytest.approx(base["tensorflow"]["metrics"]["elbo_mean"] + 2.0, rel=1e-12)
    assert list(tidy["status"].fillna("ok")) == ["ok" if fw != "jax" else "failed" for fw in tidy.index]
    dropped = [str(old / "identity-torch.json"), str(new / "identity-tensorflow.json"), str(old / "identity-jax.json")]
    note = next(ln for ln in r.stdout.splitlines() if ln.startswith("note: dropped 3 record(s)"))
    assert all(f in note for f in dropped) and str(new / "identity-torch.json") not in note, note
    assert note.removeprefix("note: ") in (out / "report.md").read_text()
    everything = tmp_path / "everything"
    assert report.main([str(old), str(new), "-o", str(everything), "--all-runs"]) == 1  # the failed jax records
    tidy = pd.read_csv(everything / "identity.csv")
    assert len(tidy) == 6 and sorted(set(tidy["run"])) == ["killed", "resumed"]
    assert "dropped" not in (everything / "report.md").read_text()


def test_newest_per_config_keeps_seeds_apart() -> None:
    """Records that differ only in their seed have different config hashes: all are kept (the
    report aggregates them, test_combined_runs_carry_differing_keys_and_aggregate_seeds)."""
    rec = next(r for r in read_records(REF) if r["measure"] == "identity")
    seeds = [_variant(rec, 2, seed, 0.0) for seed in range(3)]
    again = {**copy.deepcopy(seeds[0]), "created_at": "2999-01-01T00:00:00+00:00"}
    kept, dropped = report.newest_per_config([*seeds, again])
    assert [r["config"]["seed"] for r in kept] == [1, 2, 0] and dropped == [seeds[0]]


def test_report_html_is_self_contained(tmp_path: Path) -> None:
    run = _copy_ref(tmp_path)
    report.build(run)
    page = (run / "report.html").read_text()
    assert "<script" not in page and not re.search(r"""(src|href)=["']?(https?:|//|file:)""", page)
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == len(list(run.glob("*.png"))) > 0
    assert all(base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n" for b in images)
    env = read_records(run)[0]["env"]
    for fact in (env["framework_version"], env["cpu_model"], env["git_commit"][:10]):
        assert fact in page


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PROBE = """<pre id="vaebench-probe"></pre><script>
const errors = [];
window.addEventListener('error', e => errors.push(String(e.message || e.target.src || 'error')), true);
window.addEventListener('load', () => {
  const imgs = [...document.images].map(i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0);
  document.getElementById('vaebench-probe').textContent = JSON.stringify({
    errors, imgs, tables: document.querySelectorAll('table').length,
    rows: document.querySelectorAll('tr').length, title: document.title});
});
</script>"""


def _browse(page: Path) -> dict[str, Any]:
    assert CHROMIUM is not None
    probe = page.with_name("probe.html")
    probe.write_text(page.read_text().replace("<body>", "<body>" + PROBE, 1))
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", "--virtual-time-budget=10000",
                        probe.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="vaebench-probe">(.*?)</pre>', r.stdout, re.S)
    assert found and found.group(1), r.stderr[-2000:]
    return json.loads(found.group(1).replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (.ci/run installs Debian's chromium)")
def test_report_html_in_a_real_browser(tmp_path: Path) -> None:
    """Headless Chromium loads report.html without errors, every image decodes, the tables are
    there; a broken image is caught (negative control)."""
    run = _copy_ref(tmp_path)
    report.build(run)
    seen = _browse(run / "report.html")
    assert seen["errors"] == [] and seen["title"] == "vaebench report"
    assert len(seen["imgs"]) == len(list(run.glob("*.png"))) > 0 and all(seen["imgs"])
    n_tables = len(report.tables(read_records(run))) + 1  # + environments
    assert seen["tables"] == n_tables and seen["rows"] > 3 * n_tables
    broken = run / "broken.html"
    broken.write_text((run / "report.html").read_text().replace("data:image/png;base64,iVBOR", "data:image/png;base64,AAAA", 1))
    assert not all(_browse(broken)["imgs"])


def test_report_subcommand_and_errors(tmp_path: Path) -> None:
    run = _copy_ref(tmp_path)
    r = subprocess.run([sys.executable, "-m", "harness.cli", "report", str(run)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (run / "report.html").exists() and "report:" in r.stdout
    # the terminal gets `plot: path` lines, report.md its image tags
    shown = [Path(ln.removeprefix("plot: ")) for ln in r.stdout.splitlines() if ln.startswith("plot: ")]
    assert "![" not in r.stdout and shown and all(p.exists() for p in shown)
    assert (run / "report.md").read_text().count("![") == len(shown)
    for args, msg in (([str(tmp_path / "nope")], "no such folder"), ([str(tmp_path / "empty")], "no records")):
        (tmp_path / "empty").mkdir(exist_ok=True)
        r = subprocess.run([sys.executable, "-m", "harness.cli", "report", *args], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("measure", list(MEASURES))
def test_every_measure_summarizes_a_job_that_left_no_metrics(measure: str) -> None:
    """A record of a job that died before it measured anything: a failed summary that says why,
    never an exception (every measure, including ones added later)."""
    rec = {"framework": "torch", "mode": "eager", "status": "failed", "error": "worker died of SIGKILL",
           "metrics": {}, "config": {}, "env": {}, "measure": measure}
    s = MEASURES[measure].summarize([rec])
    assert not s.ok
    assert any("SIGKILL" in n for n in s.notes)

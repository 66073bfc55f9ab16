"""`vaebench history`: points from records (and their committed versions), step detection,
history.csv and a self-contained history.html; bad input refused in one line."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harness import history
from harness.measures import MEASURES
from harness.records import read_records, write_record
from tests.conftest import ROOT

REF = ROOT / "results" / "reference" / "cpu-2core"
TEMPLATE = REF / "throughput-torch-eager-float32.json"
QUANTITY = "batch 64 step time (s)"


def _record(i: int, value: float, commit: str | None = None) -> dict[str, Any]:
    """The committed throughput record as the i-th measurement of a synthetic history: its own
    run, day and commit, with `value` as the batch-64 median step time."""
    rec = json.loads(TEMPLATE.read_text())
    rec["run_id"] = f"synthetic-{i:03d}"
    rec["created_at"] = f"2026-01-{1 + i:02d}T12:00:00+00:00"
    rec["env"]["git_commit"] = commit or f"{i:040x}"
    rec["env"]["git_dirty"] = False
    for b in rec["metrics"]["batches"]:
        if b["batch"] == 64:
            b["step_s_median"] = value
            b["step_s_samples"] = [value] * len(b["step_s_samples"])
    return rec


def _history(folder: Path, values: list[float]) -> Path:
    for i, v in enumerate(values):
        write_record(folder / f"run{i:03d}" / "throughput-torch-eager-float32.json", _record(i, v))
    return folder


def _steps_of(out: Path) -> list[dict[str, str]]:
    """The steps of the batch-64 series, read back from the page's step table."""
    page = (out / "history.html").read_text()
    table = re.search(r"<h2>Detected steps</h2>.*?(<table>.*?</table>|<p>\(none\)</p>)", page, re.S)
    assert table, "no step table"
    if "<table>" not in table.group(1):
        return []
    head = re.findall(r"<th>(.*?)</th>", table.group(1))
    rows = [dict(zip(head, re.findall(r"<td>(.*?)</td>", tr))) for tr in re.findall(r"<tr><td>.*?</tr>", table.group(1))]
    return [r for r in rows if r["quantity"] == QUANTITY]


def test_a_planted_step_is_found_at_its_commit(tmp_path: Path) -> None:
    """12 points around 100 (sd 1), then 8 at +20%: one step, at the 13th point's commit, +20% (± 3%)."""
    rng = np.random.default_rng(0)
    values = [*(rng.normal(100, 1, 12)), *(rng.normal(120, 1, 8))]
    _history(tmp_path / "in", [v / 1000 for v in values])
    found = history.build([tmp_path / "in"], tmp_path / "out", use_git=False)
    steps = [s for s in found["steps"] if s["quantity"] == QUANTITY]
    assert len(steps) == 1, steps
    s = steps[0]
    assert s["at commit"] == f"{12:040x}"[:8] and s["at date"].startswith("2026-01-13")
    assert abs(s["relative"] - 0.20) < 0.03 and s["change"] > 0
    assert s["release"] == json.loads(TEMPLATE.read_text())["env"]["framework_version"]
    shown = _steps_of(tmp_path / "out")
    assert len(shown) == 1 and shown[0]["at commit"] == s["at commit"] and shown[0]["relative"].startswith("+")
    # the same through the detector alone, and a step down
    assert [(x.index, round(x.relative, 1)) for x in history.detect_steps(values) or []] == [(12, 0.2)]
    down = history.detect_steps([*values[:12], *(v * 0.7 for v in values[12:])])
    assert down is not None and len(down) == 1 and down[0].index == 12 and down[0].size < 0


@pytest.mark.parametrize("seed", range(6))
def test_a_flat_noisy_history_has_no_step(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    assert history.detect_steps(list(rng.normal(100, 1, 20))) == []


def test_a_constant_history_and_one_changed_digit_have_no_step() -> None:
    """A deterministic number: constant, or its last digits moving, is no step; a real change is."""
    assert history.detect_steps([-22.7] * 10) == []
    assert history.detect_steps([-22.7] * 5 + [-22.7 * (1 + 1e-9)] * 5) == []
    assert [s.index for s in history.detect_steps([-22.7] * 5 + [-23.5] * 5) or []] == [5]


def test_each_environment_is_its_own_series(tmp_path: Path) -> None:
    """Records of a named environment (`env.env_name`) are another line than the default one's."""
    _history(tmp_path / "in", [0.1] * 6)
    for i in range(3):
        rec = _record(10 + i, 0.2)
        rec["env"]["env_name"] = "torch-next"
        write_record(tmp_path / "in" / f"next{i}" / TEMPLATE.name, rec)
    history.build([tmp_path / "in"], tmp_path / "out", use_git=False)
    with (tmp_path / "out" / "history.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["quantity"] == QUANTITY]
    assert sorted((r["env"], float(r["value"])) for r in rows) == [("default", 0.1)] * 6 + [("torch-next", 0.2)] * 3
    assert len({r["variant"] for r in rows}) == 1


def test_a_too_short_history_gets_no_step_detection(tmp_path: Path) -> None:
    assert history.detect_steps([100.0, 100.0, 150.0]) is None
    assert history.detect_steps([100.0, 150.0, float("nan"), float("inf")]) is None  # finite points count
    _history(tmp_path / "in", [0.1, 0.1, 0.2])
    found = history.build([tmp_path / "in"], tmp_path / "out", use_git=False)
    assert found["steps"] == [] and found["short"] == found["series"] > 0
    assert f"Series with fewer than {history.MIN_POINTS} points ({found['short']}) get no step detection" in \
        (tmp_path / "out" / "history.html").read_text()


def test_csv_rows_are_the_points(tmp_path: Path) -> None:
    """history.csv against a recomputation from the records' JSON: the identity and throughput
    numbers by hand, and the number of rows by the measures' numeric `compared` quantities."""
    out = tmp_path / "out"
    found = history.build([REF], out, use_git=False)
    with (out / "history.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == history.COLUMNS and len(rows) == found["points"]
    expected: set[tuple[str, str, str, str, str, float]] = set()
    count = 0
    for path in sorted(REF.glob("*.json")):
        rec = json.loads(path.read_text())
        if rec["status"] != "ok":
            continue
        fw, commit, m = rec["framework"], rec["env"]["git_commit"], rec["metrics"]
        if rec["measure"] == "identity":
            for key in ("log_px_mean", "elbo_mean", "gap_mean", "mc_elbo_mean", "residual_max"):
                expected.add(("identity", key, fw, rec["mode"], commit, m[key]))
        if rec["measure"] == "throughput":
            for b in m["batches"]:
                expected.add(("throughput", f"batch {b['batch']} step time (s)", fw, rec["mode"], commit, b["step_s_median"]))
        qs = MEASURES[rec["measure"]].compared([{**rec, "_file": str(path)}]) or {}
        count += sum(isinstance(q.value, int | float) and not isinstance(q.value, bool) for q in qs.values())
    got = {(r["measure"], r["quantity"], r["framework"], r["mode"], r["commit"], float(r["value"])) for r in rows
           if r["measure"] in ("identity", "throughput")}
    assert got == expected and len(rows) == count
    assert all(r["env"] == "default" and r["framework_version"] and r["source"].startswith(str(REF)) for r in rows)


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harness.cli", "history", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.json").write_text('{"not": "a record"}')
    for args, msg in (([str(tmp_path / "nope")], "no such folder"), ([str(empty)], "no records under"),
                      ([str(empty), str(tmp_path / "nope")], "no such folder"),
                      ([str(REF), "-o", str(REF / "history")], "inside the input")):
        out = args[-1] if "-o" in args else str(tmp_path / "out")
        r = _run(*args, *([] if "-o" in args else ["-o", out]))
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not Path(out).exists()


def test_the_cli_builds_the_page_from_a_reference_and_a_modified_copy(tmp_path: Path) -> None:
    """`vaebench history results/reference/cpu-2core NEW`: NEW's record, a later measurement of
    the same benchmark, is a second point of the reference's series (with the reference's git history)."""
    new = tmp_path / "new"
    rec = json.loads(TEMPLATE.read_text())
    rec["run_id"], rec["created_at"] = "modified", "2099-01-01T00:00:00+00:00"
    rec["env"]["git_commit"] = "f" * 40
    for b in rec["metrics"]["batches"]:
        b["step_s_median"] *= 2
    write_record(new / TEMPLATE.name, rec)
    r = _run(str(REF.relative_to(ROOT)), str(new), "-o", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "history:" in r.stdout and "points" in r.stdout
    with (tmp_path / "out" / "history.csv").open() as f:
        rows = [x for x in csv.DictReader(f) if x["measure"] == "throughput" and x["framework"] == "torch"
                and x["mode"] == "eager" and x["quantity"] == QUANTITY]
    mine = [x for x in rows if x["commit"] == "f" * 40]
    assert len(mine) == 1 and mine[0]["date"].startswith("2099") and mine[0]["source"] == str(new / TEMPLATE.name)
    assert len({(x["variant"], x["env"]) for x in rows}) >= 1 and any(
        x["variant"] == mine[0]["variant"] and x["commit"] != "f" * 40 for x in rows)
    page = (tmp_path / "out" / "history.html").read_text()
    assert page.count("data:image/png;base64,") >= 1 and "<script" not in page and "http" not in page


def _git(repo: Path, *args: str, date: str | None = None) -> str:
    env = {**os.environ, "GIT_AUTHOR_DATE": date or "", "GIT_COMMITTER_DATE": date or "",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    if not date:
        env = {k: v for k, v in env.items() if not k.endswith("_DATE")}
    return subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True, text=True, check=True).stdout.strip()


def test_git_history_gives_one_point_per_committed_version(tmp_path: Path) -> None:
    """A record committed twice with different values: two points, in commit order, each dated by
    the commit it was measured at (its env.git_commit, found in this repository)."""
    repo = tmp_path / "repo"
    (repo / "results").mkdir(parents=True)
    _git(repo, "init", "-q")
    (repo / "code.txt").write_text("1")
    _git(repo, "add", "code.txt")
    _git(repo, "commit", "-qm", "code 1", date="2026-03-01T10:00:00+00:00")
    measured = [_git(repo, "rev-parse", "HEAD")]
    target = repo / "results" / "throughput-torch-eager-float32.json"
    write_record(target, _record(0, 0.010, measured[0]))
    (repo / "code.txt").write_text("2")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "record 1, code 2", date="2026-03-02T10:00:00+00:00")
    measured.append(_git(repo, "rev-parse", "HEAD"))
    later = _record(1, 0.013, measured[1])
    later["created_at"] = "2026-01-01T00:00:00+00:00"  # a wrong clock: the commit date decides
    write_record(target, later)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "record 2", date="2026-03-03T10:00:00+00:00")
    found = history.build([repo / "results"], tmp_path / "out")  # git: on by default inside a work tree
    with (tmp_path / "out" / "history.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["quantity"] == QUANTITY]
    assert [(r["commit"], float(r["value"])) for r in rows] == [(measured[0], 0.010), (measured[1], 0.013)]
    assert [r["date"][:10] for r in rows] == ["2026-03-01", "2026-03-02"]
    assert rows[0]["source"].endswith(":results/throughput-torch-eager-float32.json") and rows[1]["source"] == str(target)
    assert any("1 measurement(s) found only in git history" in n for n in found["notes"])
    # without git only the working tree's version
    history.build([repo / "results"], tmp_path / "out2", use_git=False)
    assert sum(r["quantity"] == QUANTITY for r in csv.DictReader((tmp_path / "out2" / "history.csv").open())) == 1


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
def test_history_html_in_a_real_browser(tmp_path: Path) -> None:
    """Headless Chromium loads history.html without errors, every plot decodes, the step table and
    the single-point table are there; a broken image is caught (negative control)."""
    rng = np.random.default_rng(1)
    _history(tmp_path / "in", [v / 1000 for v in [*rng.normal(100, 1, 8), *rng.normal(130, 1, 6)]])
    found = history.build([tmp_path / "in"], tmp_path / "out", use_git=False)
    page = tmp_path / "out" / "history.html"
    seen = _browse(page)
    assert seen["errors"] == [] and seen["title"] == "vaebench history"
    assert len(seen["imgs"]) == page.read_text().count("data:image/png;base64,") > 0 and all(seen["imgs"])
    assert found["steps"] and seen["tables"] == page.read_text().count("<table>") >= 1 and seen["rows"] >= 2
    broken = page.with_name("broken.html")
    broken.write_text(page.read_text().replace("data:image/png;base64,iVBOR", "data:image/png;base64,AAAA", 1))
    assert not all(_browse(broken)["imgs"])


def test_points_skip_verdicts_and_keep_only_numbers() -> None:
    """Only numbers become points: the verdicts and patterns of `compared` (booleans, strings, lists) do not."""
    recs = read_records(REF)
    rows, notes = history.points(recs)
    assert rows and notes == []
    assert all(isinstance(r["value"], float) and not r["quantity"].startswith(f"{r['framework']}/") for r in rows)
    snr_like = [q for r in recs for q in (MEASURES[r["measure"]].compared([r]) or {}).values()
                if isinstance(q.value, bool | str | list)]
    assert snr_like  # the records have verdicts, and none of them is a point
    assert not any(math.isnan(r["value"]) for r in rows if r["measure"] == "identity")

"""The suite reports its own drift: a test not marked slow that takes over `DRIFT_S` seconds is
named at the end of every run; tests are marked slow by their measured durations (`SLOW_S`)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tests import conftest


class Terminal:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def section(self, title: str) -> None:
        self.lines.append(f"== {title}")

    def write_line(self, line: str) -> None:
        self.lines.append(line)


def _phases(nodeid: str, setup: float, call: float, slow: bool) -> None:
    """A test's three reports, as pytest sends them."""
    for when, d in (("setup", setup), ("call", call), ("teardown", 0.1)):
        conftest.pytest_runtest_logreport(
            SimpleNamespace(nodeid=nodeid, duration=d, when=when, keywords={"slow": 1} if slow else {}))  # type: ignore[arg-type]


def test_unmarked_slow_tests_are_named(monkeypatch: Any) -> None:
    monkeypatch.setattr(conftest, "_UNMARKED", [])
    monkeypatch.setattr(conftest, "_MEASURED", {})
    _phases("t::fast", 0.1, 0.5, False)
    _phases("t::drifted", 0.0, 12.0, False)
    _phases("t::marked", 0.0, 60.0, True)
    _phases("t::setup", 30.0, 0.0, False)  # a fixture's time counts: the test waits for it
    _phases("t::worse", 0.0, 25.0, False)
    term = Terminal()
    conftest.pytest_terminal_summary(term)
    assert term.lines == ["== tests over 10 s not marked slow", "   30.1 s  t::setup", "   25.1 s  t::worse",
                          "   12.1 s  t::drifted"]
    quiet = Terminal()
    monkeypatch.setattr(conftest, "_UNMARKED", [])
    conftest.pytest_terminal_summary(quiet)
    assert quiet.lines == []


def test_tests_measured_over_the_limit_are_marked_slow(monkeypatch: Any, tmp_path: Path) -> None:
    """Marks come from tests/durations.json (`make durations`), not from file names."""
    f = tmp_path / "durations.json"
    f.write_text(json.dumps({"t.py::slow": conftest.SLOW_S + 0.01, "t.py::fast": conftest.SLOW_S}))
    monkeypatch.setattr(conftest, "DURATIONS", f)
    items = [SimpleNamespace(nodeid=n, marks=[]) for n in ("t.py::slow", "t.py::fast", "t.py::new")]
    for it in items:
        it.add_marker = it.marks.append  # type: ignore[attr-defined]
    conftest.pytest_collection_modifyitems(items)  # type: ignore[arg-type]
    assert [[m.name for m in it.marks] for it in items] == [["slow"], [], []]


def test_stored_durations_update_the_tests_that_ran(monkeypatch: Any, tmp_path: Path) -> None:
    f = tmp_path / "durations.json"
    f.write_text(json.dumps({"a::old": 3.0, "b::kept": 1.0}))
    monkeypatch.setattr(conftest, "DURATIONS", f)
    monkeypatch.setattr(conftest, "_MEASURED", {"a::old": 12.345, "c::new": 0.5})
    session = SimpleNamespace(config=SimpleNamespace(getoption=lambda name, default=None: True))
    conftest.pytest_sessionfinish(session)  # type: ignore[arg-type]
    assert json.loads(f.read_text()) == {"a::old": 12.35, "b::kept": 1.0, "c::new": 0.5}


def test_the_committed_durations_name_only_tests_that_exist() -> None:
    """A stale entry (a renamed or deleted test) marks nothing: each names a test function that
    is still in its file (`make durations` re-measures)."""
    times = conftest.measured_durations()
    assert times, "tests/durations.json is missing: run make durations"
    stale = []
    for nodeid in times:
        path, _, name = nodeid.partition("::")
        f = conftest.ROOT / path
        func = name.split("[")[0].split("::")[-1]
        if not f.exists() or f"def {func}(" not in f.read_text():
            stale.append(nodeid)
    assert not stale, stale[:10]

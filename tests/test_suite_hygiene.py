"""The suite reports its own drift: a test not marked slow that takes over `SLOW_S` seconds is
named at the end of every run."""

from __future__ import annotations

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


def _report(nodeid: str, duration: float, slow: bool, when: str = "call") -> Any:
    return SimpleNamespace(nodeid=nodeid, duration=duration, when=when, keywords={"slow": 1} if slow else {})


def test_unmarked_slow_tests_are_named(monkeypatch: Any) -> None:
    monkeypatch.setattr(conftest, "_UNMARKED", [])
    for r in (_report("t::fast", 0.5, False), _report("t::drifted", 12.0, False), _report("t::marked", 60.0, True),
              _report("t::setup", 30.0, False, when="setup"), _report("t::worse", 25.0, False)):
        conftest.pytest_runtest_logreport(r)
    term = Terminal()
    conftest.pytest_terminal_summary(term)
    assert term.lines == ["== tests over 10 s not marked slow", "   25.0 s  t::worse", "   12.0 s  t::drifted"]
    quiet = Terminal()
    monkeypatch.setattr(conftest, "_UNMARKED", [])
    conftest.pytest_terminal_summary(quiet)
    assert quiet.lines == []

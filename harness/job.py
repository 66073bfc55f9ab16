"""A job and what a measure's `run` returns: the leaf that measures, worker and CLI share."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Job:
    run_id: str
    measure: str
    framework: str
    mode: str
    config: dict[str, Any]  # resolved AppConfig as a plain dict
    record_path: str

    @property
    def name(self) -> str:
        return Path(self.record_path).stem


@dataclass
class Result:
    """What a measure's `run` returns."""

    metrics: dict[str, Any]
    status: str = "ok"
    error: str | None = None
    backend_env: dict[str, Any] = field(default_factory=dict)

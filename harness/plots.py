"""What every measure's plots share: matplotlib without a display, and an atomic PNG write."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from harness.frameworks import registry
from harness.records import write_atomic

#: each framework's colour (`FrameworkFacts.color`); `.get` gives None (matplotlib's cycle) for others
COLORS: dict[str, str] = {n: f.color for n, f in registry().items() if f.color}


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (imported on first use: `harness` stays light)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: Path, *, tight: bool = True, **savefig: Any) -> Path:
    """Lay out, render to PNG in memory, close the figure, write `path` atomically."""
    plt = pyplot()
    buf = io.BytesIO()
    if tight:
        fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110, **savefig)
    plt.close(fig)
    write_atomic(path, buf.getvalue())
    return path

"""vaebench: the same VAE in several frameworks, measured behind one interface.

This package is framework-neutral: importing it loads no framework (they are named once, in the
registry `harness.frameworks` and conf/framework/). Notebook use, with any registered name::

    from harness import load_backend, MlpSpec, init_params, data
    ds = data.load("digits").flat()
    b = load_backend(name, MlpSpec(x_dim=ds.x_dim), dtype="float64")
    b.terms(ds.x_train[:32], np.random.default_rng(0).standard_normal((32, 8)))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harness.api import (
        Backend,
        ConvSpec,
        FrameworkUnavailable,
        LinearSpec,
        MlpSpec,
        ModelSpec,
        OptimSpec,
        RuntimeSpec,
        Terms,
        load_backend,
    )
    from harness.initializers import init_params

#: the public names, imported on first use: `import impls.<name>` (a framework's declaration,
#: which imports `harness.frameworks`) must not build the framework registry while it runs
_LAZY = {
    **dict.fromkeys(("Backend", "FrameworkUnavailable", "ModelSpec", "MlpSpec", "LinearSpec", "ConvSpec", "OptimSpec",
                     "RuntimeSpec", "Terms", "load_backend"), "harness.api"),
    "init_params": "harness.initializers",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'harness' has no attribute {name!r}")


__all__ = [
    "Backend",
    "ConvSpec",
    "FrameworkUnavailable",
    "LinearSpec",
    "MlpSpec",
    "ModelSpec",
    "OptimSpec",
    "RuntimeSpec",
    "Terms",
    "init_params",
    "load_backend",
]
__version__ = "0.1.0"

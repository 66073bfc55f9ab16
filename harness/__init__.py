"""vaebench: the same VAE in PyTorch, TensorFlow and JAX, measured behind one interface.

This package is framework-neutral: importing it loads none of torch, tensorflow, jax.
Notebook use::

    from harness import load_backend, ModelSpec, init_params, data
    ds = data.load("digits")
    b = load_backend("torch", ModelSpec(x_dim=ds.x_dim), dtype="float64")
    b.terms(ds.x_train[:32], np.random.default_rng(0).standard_normal((32, 8)))
"""

from harness.api import (
    Backend,
    FrameworkUnavailable,
    ModelSpec,
    OptimSpec,
    RuntimeSpec,
    Terms,
    load_backend,
)
from harness.init import init_params

__all__ = [
    "Backend",
    "FrameworkUnavailable",
    "ModelSpec",
    "OptimSpec",
    "RuntimeSpec",
    "Terms",
    "init_params",
    "load_backend",
]
__version__ = "0.1.0"

"""JAX (optax optimizers). `FACTS`: what the harness needs to know about it
(`harness.frameworks`). Imports no framework: the ISA probe imports jax when it is called (in
the job's process).

What decides its float32 results on a CPU: XLA CPU compiles with LLVM for the host's features
(capped by XLA_FLAGS=--xla_cpu_max_isa, recorded when set).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from harness.frameworks import FrameworkFacts, JobSettings


def env_before_import(s: JobSettings) -> Mapping[str, str]:
    env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}  # GPU memory as needed
    if s.float64:
        env["JAX_ENABLE_X64"] = "1"  # JAX refuses float64 arrays without it
    if s.device == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
    return env


def isa_probe() -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from harness.fingerprint import kernel_fingerprint, probe_inputs, safe

    cpu = jax.devices("cpu")[0]
    m = re.search(r"--xla_cpu_max_isa=(\S+)", os.environ.get("XLA_FLAGS", ""))
    out: dict[str, Any] = {"xla_cpu_max_isa": m.group(1) if m else None}

    def fingerprint() -> dict[str, str]:
        t = {k: jax.device_put(v, cpu) for k, v in probe_inputs().items()}
        fma = jax.jit(lambda x, y: x * x + y)(t["a"], t["c"])
        return kernel_fingerprint(fma, jnp.sum(t["v"]), jnp.dot(t["A"], t["B"]), jnp.exp(t["v"] / 4),
                                  jnp.tanh(t["v"]), jnp.log1p(jnp.abs(t["v"])))

    out["fingerprint"] = safe(fingerprint)  # fma: under jit (XLA CPU)
    return out


FACTS = FrameworkFacts(
    name="jax",
    module="jax",
    extra="jax",
    modes=("eager", "jit"),
    compiled="jit",
    order=2,
    color="tab:blue",
    adam_convention="standard",
    env_before_import=env_before_import,
    isa_probe=isa_probe,
)

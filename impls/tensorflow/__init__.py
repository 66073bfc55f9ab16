"""TensorFlow (Keras optimizers). `FACTS`: what the harness needs to know about it
(`harness.frameworks`). Imports no framework: the ISA probe imports tensorflow when it is called
(in the job's process).

What decides its float32 results on a CPU: matmuls go to oneDNN when TF_ENABLE_ONEDNN_OPTS is on
(IsMklEnabled); oneDNN JIT-compiles for the best ISA the CPU has, capped by ONEDNN_MAX_CPU_ISA:
derived here from the CPU flags by oneDNN's documented order (`harness.fingerprint.onednn_isa`;
the observed one needs ONEDNN_VERBOSE=1 set before the first primitive, which then logs every
call). Other ops run Eigen code compiled for the wheel's baseline ISA; tf.function(jit_compile=True)
runs XLA, as JAX does.

Keras adds Adam's eps to the uncorrected sqrt(v) (`adam_convention="keras"`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from harness.frameworks import FrameworkFacts, JobSettings


def env_before_import(s: JobSettings) -> Mapping[str, str]:
    return {
        "TF_CPP_MIN_LOG_LEVEL": s.inherited.get("TF_CPP_MIN_LOG_LEVEL", "2"),  # quiet, unless the user says otherwise
        "TF_FORCE_GPU_ALLOW_GROWTH": "true",  # GPU memory as needed
    }


def isa_probe() -> dict[str, Any]:
    import tensorflow as tf

    from harness.fingerprint import cpu_features, fma_kind, kernel_fingerprint, onednn_isa, probe_inputs, safe

    out: dict[str, Any] = {}
    try:
        from tensorflow.python.util import _pywrap_util_port

        out["onednn_enabled"] = bool(_pywrap_util_port.IsMklEnabled())
    except Exception:
        out["onednn_enabled"] = None
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    if out["onednn_enabled"] is not False:
        out["onednn_isa_expected"] = onednn_isa(cpu_features(), cap)

    def fingerprint() -> dict[str, str]:
        with tf.device("/CPU:0"):
            t = {k: tf.constant(v) for k, v in probe_inputs().items()}
            fp = kernel_fingerprint(t["a"] * t["a"] + t["c"], tf.reduce_sum(t["v"]), tf.matmul(t["A"], t["B"]),
                                    tf.exp(t["v"] / 4), tf.tanh(t["v"]), tf.math.log1p(tf.abs(t["v"])))
            xla = tf.function(lambda x, y: x * x + y, jit_compile=True)
            fp["xla_fma"] = fma_kind(xla(t["a"], t["c"]).numpy())
        return fp

    out["fingerprint"] = safe(fingerprint)  # fma: eager (Eigen); xla_fma: jit_compile=True
    return out


FACTS = FrameworkFacts(
    name="tensorflow",
    module="tensorflow",
    extra="tensorflow",
    modes=("eager", "function", "xla"),
    compiled="xla",
    order=1,
    color="tab:orange",
    adam_convention="keras",
    env_before_import=env_before_import,
    isa_probe=isa_probe,
)

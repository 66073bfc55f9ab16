"""What decides a framework's float32 results on this CPU: the ISA its kernels dispatch to, as far
as it can be read cheaply, and a numerical fingerprint of those kernels. Imports the framework
inside the probe (the worker calls it, where the framework is loaded anyway)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from harness.records import _read_cpuinfo, cpu_vector_features

# --- the ISA each framework's CPU kernels use (call from the worker, framework loaded) -----
#
# What decides float32 results on a CPU, per framework, and what can be read cheaply:
# - torch: ATen's elementwise/reduction kernels are compiled per ISA and dispatched at run time
#   (torch.backends.cpu.get_cpu_capability(): DEFAULT | AVX2 | AVX512, capped by
#   ATEN_CPU_CAPABILITY); float32 matmuls go to MKL (x86 wheels; its code path shows with
#   MKL_VERBOSE=1, and MKL_CBWR pins it).
# - tensorflow: matmuls go to oneDNN when TF_ENABLE_ONEDNN_OPTS is on (IsMklEnabled); oneDNN
#   JIT-compiles for the best ISA the CPU has, capped by ONEDNN_MAX_CPU_ISA: derived here from
#   the CPU flags by oneDNN's documented order (the observed one needs ONEDNN_VERBOSE=1 set
#   before the first primitive, which then logs every call). Other ops run Eigen code compiled
#   for the wheel's baseline ISA; tf.function(jit_compile=True) runs XLA, as JAX does.
# - jax: XLA CPU compiles with LLVM for the host's features (capped by
#   XLA_FLAGS=--xla_cpu_max_isa, recorded when set).
# Every framework also gets a numerical fingerprint of its CPU kernels in float32, the same
# inputs everywhere: whether a*b+c is fused into one FMA (a = b = 1 + 2^-12, c = -1 gives
# 2^-11 unfused, 2^-11 + 2^-24 fused), the exact value of one sum, and digests of a matmul,
# exp, tanh and log1p. Equal fingerprints on two machines: those kernels gave the same bits.

#: oneDNN's CPU ISAs, best first, with the CPU flags each needs (cumulative); the order is
#: oneDNN's (dev_guide_cpu_dispatcher_control): AVX2 < AVX2_VNNI < AVX2_VNNI_2 and
#: AVX2 < AVX512_CORE < ..._VNNI < ..._BF16 < AVX10_1_512 < ..._AMX < ..._AMX_FP16
_AVX512_CORE = {"avx512f", "avx512bw", "avx512vl", "avx512dq"}
ONEDNN_ISAS: tuple[tuple[str, frozenset[str]], ...] = tuple((n, frozenset(f)) for n, f in (
    ("avx10_1_512_amx_fp16", _AVX512_CORE | {"avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "amx_fp16"}),
    ("avx10_1_512_amx", _AVX512_CORE | {"avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16"}),
    ("avx10_1_512", _AVX512_CORE | {"avx512_vnni", "avx512_bf16", "avx512_fp16"}),
    ("avx512_core_bf16", _AVX512_CORE | {"avx512_vnni", "avx512_bf16"}),
    ("avx512_core_vnni", _AVX512_CORE | {"avx512_vnni"}),
    ("avx512_core", _AVX512_CORE),
    ("avx2_vnni_2", {"avx2", "avx_vnni", "avx_vnni_int8", "avx_ne_convert"}),
    ("avx2_vnni", {"avx2", "avx_vnni"}),
    ("avx2", {"avx2"}),
    ("avx", {"avx"}),
    ("sse41", {"sse4_1"}),
))
_ONEDNN_ALIASES = {"avx512_core_fp16": "avx10_1_512", "avx512_core_amx": "avx10_1_512_amx", "avx512_core_amx_fp16": "avx10_1_512_amx_fp16"}
_ONEDNN_BELOW = {  # the ISAs each cap allows, by the partial order above
    "sse41": {"sse41"}, "avx": {"sse41", "avx"}, "avx2": {"sse41", "avx", "avx2"},
    "avx2_vnni": {"sse41", "avx", "avx2", "avx2_vnni"}, "avx2_vnni_2": {"sse41", "avx", "avx2", "avx2_vnni", "avx2_vnni_2"},
    "avx512_core": {"sse41", "avx", "avx2", "avx512_core"},
    "avx512_core_vnni": {"sse41", "avx", "avx2", "avx512_core", "avx512_core_vnni"},
    "avx512_core_bf16": {"sse41", "avx", "avx2", "avx512_core", "avx512_core_vnni", "avx512_core_bf16"},
}
_ONEDNN_BELOW["avx10_1_512"] = _ONEDNN_BELOW["avx512_core_bf16"] | {"avx2_vnni", "avx10_1_512"}
_ONEDNN_BELOW["avx10_1_512_amx"] = _ONEDNN_BELOW["avx10_1_512"] | {"avx10_1_512_amx"}
_ONEDNN_BELOW["avx10_1_512_amx_fp16"] = _ONEDNN_BELOW["avx10_1_512_amx"] | {"avx10_1_512_amx_fp16"}


def onednn_isa(features: list[str] | set[str], cap: str | None = None) -> str:
    """The ISA oneDNN dispatches to on a CPU with these VECTOR_FEATURES: the best one the CPU
    has, no higher than `cap` (ONEDNN_MAX_CPU_ISA; None, DEFAULT or ALL: no cap)."""
    have = set(features)
    allowed = None
    if cap and cap.strip().lower() not in ("default", "all"):
        c = cap.strip().lower()
        allowed = _ONEDNN_BELOW.get(_ONEDNN_ALIASES.get(c, c))
        if allowed is None:
            return f"unknown cap {cap!r}"
    for name, needs in ONEDNN_ISAS:
        if needs <= have and (allowed is None or name in allowed):
            return name
    return "default (no JIT ISA)"


def _digest(a: Any) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(np.asarray(a, dtype=np.float32)).tobytes()).hexdigest()[:16]


def _fma_kind(out: Any) -> str:
    """'fused' if every a*b+c of the probe rounded once (an FMA), 'unfused' if twice."""
    v = np.asarray(out, dtype=np.float32).ravel()
    fused, unfused = np.float32(2.0**-11 + 2.0**-24), np.float32(2.0**-11)
    if np.all(v == fused):
        return "fused"
    if np.all(v == unfused):
        return "unfused"
    return "mixed" if set(np.unique(v).tolist()) <= {float(fused), float(unfused)} else "unexpected"


def _probe_inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20240605)
    return {
        "a": np.full(64, 1.0 + 2.0**-12, np.float32),  # a * a + c: 2^-11 (+ 2^-24 if fused)
        "c": np.full(64, -1.0, np.float32),
        "v": rng.standard_normal(4099).astype(np.float32),  # odd length: vector body and tail
        "A": rng.standard_normal((16, 128)).astype(np.float32),
        "B": rng.standard_normal((128, 16)).astype(np.float32),
    }


def _fingerprint(fma: Any, total: Any, mm: Any, exp: Any, tanh: Any, log1p: Any) -> dict[str, str]:
    return {"fma": _fma_kind(fma), "sum": float(np.float32(np.asarray(total))).hex(), "matmul": _digest(mm),
            "exp": _digest(exp), "tanh": _digest(tanh), "log1p": _digest(log1p)}


def _safe(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception as exc:  # a probe must never fail the job
        return {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}


def _torch_isa() -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {"aten_cpu_capability": torch.backends.cpu.get_cpu_capability()}
    config = torch.__config__.show()
    for line in config.splitlines():
        if "MKL-DNN" in line or "oneDNN" in line:
            out["onednn"] = line.strip(" -")  # used for bf16/conv, not for float32 matmuls
    out["mkl"] = torch.backends.mkl.is_available()  # float32 matmuls on x86 wheels

    def fingerprint() -> dict[str, str]:
        t = {k: torch.from_numpy(v) for k, v in _probe_inputs().items()}
        with torch.no_grad():
            return _fingerprint(torch.addcmul(t["c"], t["a"], t["a"]), t["v"].sum(), t["A"] @ t["B"],
                                torch.exp(t["v"] / 4), torch.tanh(t["v"]), torch.log1p(t["v"].abs()))

    out["fingerprint"] = _safe(fingerprint)  # fma: torch.addcmul (ATen's vectorized fmadd)
    return out


def _tensorflow_isa() -> dict[str, Any]:
    import tensorflow as tf

    out: dict[str, Any] = {}
    try:
        from tensorflow.python.util import _pywrap_util_port

        out["onednn_enabled"] = bool(_pywrap_util_port.IsMklEnabled())
    except Exception:
        out["onednn_enabled"] = None
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    if out["onednn_enabled"] is not False:
        out["onednn_isa_expected"] = onednn_isa(cpu_vector_features(_read_cpuinfo()), cap)

    def fingerprint() -> dict[str, str]:
        with tf.device("/CPU:0"):
            t = {k: tf.constant(v) for k, v in _probe_inputs().items()}
            fp = _fingerprint(t["a"] * t["a"] + t["c"], tf.reduce_sum(t["v"]), tf.matmul(t["A"], t["B"]),
                              tf.exp(t["v"] / 4), tf.tanh(t["v"]), tf.math.log1p(tf.abs(t["v"])))
            xla = tf.function(lambda x, y: x * x + y, jit_compile=True)
            fp["xla_fma"] = _fma_kind(xla(t["a"], t["c"]).numpy())
        return fp

    out["fingerprint"] = _safe(fingerprint)  # fma: eager (Eigen); xla_fma: jit_compile=True
    return out


def _jax_isa() -> dict[str, Any]:
    import re

    import jax
    import jax.numpy as jnp

    cpu = jax.devices("cpu")[0]
    flags = os.environ.get("XLA_FLAGS", "")
    m = re.search(r"--xla_cpu_max_isa=(\S+)", flags)
    out: dict[str, Any] = {"xla_cpu_max_isa": m.group(1) if m else None}

    def fingerprint() -> dict[str, str]:
        t = {k: jax.device_put(v, cpu) for k, v in _probe_inputs().items()}
        fma = jax.jit(lambda x, y: x * x + y)(t["a"], t["c"])
        return _fingerprint(fma, jnp.sum(t["v"]), jnp.dot(t["A"], t["B"]), jnp.exp(t["v"] / 4), jnp.tanh(t["v"]),
                            jnp.log1p(jnp.abs(t["v"])))

    out["fingerprint"] = _safe(fingerprint)  # fma: under jit (XLA CPU)
    return out


def framework_isa(framework: str) -> dict[str, Any]:
    """What decides `framework`'s float32 results on this CPU (see the notes above): the ISA
    its kernels dispatch to, as far as it can be read cheaply, and a numerical fingerprint of
    those kernels. Imports the framework (call it in the worker, where it is loaded anyway);
    never raises for a framework that is installed: a failed probe is recorded as {"error": ...}."""
    probes = {"torch": _torch_isa, "tensorflow": _tensorflow_isa, "jax": _jax_isa}
    if framework not in probes:
        raise ValueError(f"unknown framework {framework!r}; choose from {', '.join(probes)}")
    return {"framework": framework, **_safe_dict(probes[framework])}


def _safe_dict(fn: Any) -> dict[str, Any]:
    out = _safe(fn)
    return out if isinstance(out, dict) else {"error": repr(out)}

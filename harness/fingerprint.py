"""What decides a framework's float32 results on this CPU: the ISA its kernels dispatch to, as far
as it can be read cheaply, and a numerical fingerprint of those kernels. Each framework declares
its own probe (`FrameworkFacts.isa_probe`, in `impls/<name>/__init__.py`, importing the framework
when called: the worker calls it, where the framework is loaded anyway) from the helpers here; a
framework without one, or whose probe fails, is recorded as "unknown". Also which low-precision
types (bfloat16, float16) the CPU computes in natively, from its flags (`cpu_low_precision`): the
throughput measure records it, and its table says "emulated" where the CPU has none."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from harness import frameworks
from harness.records import _read_cpuinfo, cpu_vector_features, cpuinfo_fields

# --- the ISA a framework's CPU kernels use (call from the worker, framework loaded) ------
#
# What each framework's float32 results depend on, and what can be read cheaply, is written
# beside its probe (impls/<name>/__init__.py). Every framework also gets a numerical fingerprint
# of its CPU kernels in float32, the same inputs everywhere (`probe_inputs`, `kernel_fingerprint`):
# whether a*b+c is fused into one FMA (a = b = 1 + 2^-12, c = -1 gives 2^-11 unfused,
# 2^-11 + 2^-24 fused), the exact value of one sum, and digests of a matmul, exp, tanh and
# log1p. Equal fingerprints on two machines: those kernels gave the same bits.

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


def digest(a: Any) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(np.asarray(a, dtype=np.float32)).tobytes()).hexdigest()[:16]


def fma_kind(out: Any) -> str:
    """'fused' if every a*b+c of the probe rounded once (an FMA), 'unfused' if twice."""
    v = np.asarray(out, dtype=np.float32).ravel()
    fused, unfused = np.float32(2.0**-11 + 2.0**-24), np.float32(2.0**-11)
    if np.all(v == fused):
        return "fused"
    if np.all(v == unfused):
        return "unfused"
    return "mixed" if set(np.unique(v).tolist()) <= {float(fused), float(unfused)} else "unexpected"


def probe_inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20240605)
    return {
        "a": np.full(64, 1.0 + 2.0**-12, np.float32),  # a * a + c: 2^-11 (+ 2^-24 if fused)
        "c": np.full(64, -1.0, np.float32),
        "v": rng.standard_normal(4099).astype(np.float32),  # odd length: vector body and tail
        "A": rng.standard_normal((16, 128)).astype(np.float32),
        "B": rng.standard_normal((128, 16)).astype(np.float32),
    }


def kernel_fingerprint(fma: Any, total: Any, mm: Any, exp: Any, tanh: Any, log1p: Any) -> dict[str, str]:
    return {"fma": fma_kind(fma), "sum": float(np.float32(np.asarray(total))).hex(), "matmul": digest(mm),
            "exp": digest(exp), "tanh": digest(tanh), "log1p": digest(log1p)}


def safe(fn: Any, *args: Any) -> Any:
    """`fn(*args)`, or {"error": "<what it raised>"}: a probe must never fail the job."""
    try:
        return fn(*args)
    except Exception as exc:
        return {"error": _error(exc)}


def cpu_features() -> list[str]:
    """This CPU's vector features (as `records.host_env` records them)."""
    return cpu_vector_features(_read_cpuinfo())


# --- low-precision arithmetic the CPU has natively -----------------------------------------
#
# Mixed precision (framework.precision=bfloat16|float16) computes the layers in a 16-bit type.
# A CPU with these flags multiplies in it natively (x86: AVX-512 dot products and AMX tiles;
# ARM: the BF16 and half-precision vector extensions); without them a framework converts to
# float32 and back around float32 arithmetic (emulation), and a slow mixed-precision step is the
# CPU's, not the framework's. Whether a framework's kernels do use the instructions is its own
# choice (its `framework_isa`).

#: per low type, the CPU flags (/proc/cpuinfo "flags" on x86, "Features" on ARM) that give native
#: arithmetic in it, in `records.VECTOR_FEATURES` order (every record's env keeps them)
LOW_PRECISION_FLAGS: dict[str, tuple[str, ...]] = {
    "bfloat16": ("avx512_bf16", "amx_bf16", "bf16"),
    "float16": ("avx512_fp16", "amx_fp16", "asimdhp", "fphp"),
}
#: what `native_support` says for a low type the CPU has no flag for
EMULATED = "emulated"


def low_precision_support(features: Iterable[str]) -> dict[str, list[str]]:
    """Per low type (`LOW_PRECISION_FLAGS`), the flags of it among `features` (a CPU's flags):
    an empty list where the CPU has none, and the frameworks emulate that type."""
    have = set(features)
    return {dtype: [f for f in flags if f in have] for dtype, flags in LOW_PRECISION_FLAGS.items()}


def cpu_low_precision(text: str | None = None) -> dict[str, list[str]]:
    """`low_precision_support` of the CPU a /proc/cpuinfo text describes (this one's by default),
    read from its whole flags line (not only the vector features `records` keeps)."""
    fields = cpuinfo_fields(_read_cpuinfo() if text is None else text)
    return low_precision_support((fields.get("flags", "") + " " + fields.get("Features", "")).split())


def native_support(dtype: str, support: Mapping[str, Sequence[str]] | None) -> str:
    """A table cell: the CPU flags giving native `dtype` arithmetic ("avx512_bf16, amx_bf16"),
    "emulated" where there are none, "-" for a type that is not a low one (float32, float64) and
    "unknown" without the CPU's flags (`support`: `low_precision_support`'s mapping)."""
    if dtype not in LOW_PRECISION_FLAGS:
        return "-"
    if support is None or dtype not in support:
        return "unknown"
    return ", ".join(support[dtype]) or EMULATED


#: what `framework_isa` records for a framework it cannot probe
UNKNOWN = "unknown"


def framework_isa(framework: str) -> dict[str, Any]:
    """What decides `framework`'s float32 results on this CPU: its declared probe
    (`FrameworkFacts.isa_probe`; imports the framework: call it in the worker, where it is loaded
    anyway). Never raises: a framework that is not registered or declares no probe gives
    {"framework": ..., "isa": "unknown"}, and a probe that fails the same with its "error"."""
    try:
        facts = frameworks.get(framework)
        probe = facts.isa_probe if facts is not None else None
    except Exception as exc:  # a broken registry must not fail the job either
        return {"framework": framework, "isa": UNKNOWN, "error": _error(exc)}
    if probe is None:
        return {"framework": framework, "isa": UNKNOWN}
    try:
        out = probe()
    except Exception as exc:  # a probe must never fail the job
        return {"framework": framework, "isa": UNKNOWN, "error": _error(exc)}
    if not isinstance(out, Mapping):
        return {"framework": framework, "isa": UNKNOWN, "error": f"the probe returned {type(out).__name__}, not a mapping"}
    return {"framework": framework, **out}


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]

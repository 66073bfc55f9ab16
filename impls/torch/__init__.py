"""PyTorch. `FACTS`: what the harness needs to know about it (`harness.frameworks`). Imports no
framework: the ISA probe imports torch when it is called (in the job's process).

What decides its float32 results on a CPU: ATen's elementwise/reduction kernels are compiled
per ISA and dispatched at run time (torch.backends.cpu.get_cpu_capability(): DEFAULT | AVX2 |
AVX512, capped by ATEN_CPU_CAPABILITY); float32 matmuls go to MKL (x86 wheels; its code path
shows with MKL_VERBOSE=1, and MKL_CBWR pins it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from harness.frameworks import FrameworkFacts, JobSettings


def env_before_import(s: JobSettings) -> Mapping[str, str]:
    """torch.compile keeps an on-disk cache across processes by default: each job gets its own
    empty one, so compile times are cold, not a leftover of an earlier run."""
    if s.cache_dir is None:
        return {}
    return {"TORCHINDUCTOR_CACHE_DIR": s.cache_dir, "TRITON_CACHE_DIR": os.path.join(s.cache_dir, "triton")}


def isa_probe() -> dict[str, Any]:
    import torch

    from harness.fingerprint import kernel_fingerprint, probe_inputs, safe

    out: dict[str, Any] = {"aten_cpu_capability": torch.backends.cpu.get_cpu_capability()}
    for line in torch.__config__.show().splitlines():
        if "MKL-DNN" in line or "oneDNN" in line:
            out["onednn"] = line.strip(" -")  # used for bf16/conv, not for float32 matmuls
    out["mkl"] = torch.backends.mkl.is_available()  # float32 matmuls on x86 wheels

    def fingerprint() -> dict[str, str]:
        t = {k: torch.from_numpy(v) for k, v in probe_inputs().items()}
        with torch.no_grad():
            return kernel_fingerprint(torch.addcmul(t["c"], t["a"], t["a"]), t["v"].sum(), t["A"] @ t["B"],
                                      torch.exp(t["v"] / 4), torch.tanh(t["v"]), torch.log1p(t["v"].abs()))

    out["fingerprint"] = safe(fingerprint)  # fma: torch.addcmul (ATen's vectorized fmadd)
    return out


FACTS = FrameworkFacts(
    name="torch",
    module="torch",
    extra="torch",
    modes=("eager", "compiled"),
    compiled="compiled",
    order=0,
    color="tab:red",
    adam_convention="standard",
    env_before_import=env_before_import,
    isa_probe=isa_probe,
    compile_cache_note="torch.compile reuses its in-process cache for later seeds, so only torch's first seed pays it",
)

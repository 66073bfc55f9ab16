"""A plain, hand-written PyTorch training loop of the same step as TorchBackend, and the
device-level probes the throughput measure needs (matmul rate, peak memory).

`PlainStep` is what a PyTorch user would write: the same canonical initial weights and the
same model functions (`harness.vae.loss_terms` over `impls.torch.ops`), torch.optim's Adam with its defaults
for everything the config does not set (foreach: torch's choice), noise from torch.randn,
and in compiled mode `torch.compile` of the loss function and of `opt.step` with default
options. The throughput measure times it beside the harness step to measure the harness's
overhead.

Mixed precision (`framework.precision=bfloat16|float16`) follows the backend's policy
(`harness.spec.Policy`): parameters, Adam's state and the noise in float32, the layers in the low
type (the model functions cast to it: `impls.base.formulation`), the loss parts and their mean in
float32. float16 adds torch's dynamic loss scaling as its documentation writes it:
`scaler.scale(loss).backward(); scaler.step(opt); scaler.update()` with a `torch.amp.GradScaler`
of the backend's scale rule (in compiled mode `opt.step` is the compiled one, so GradScaler's
step calls it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import numpy as np
import torch

from harness import vae
from harness.api import ModelSpec, OptimSpec, RuntimeSpec
from harness.spec import LOSS_SCALE_GROWTH_STEPS, LOSS_SCALE_INIT, Dtype, Policy, param_dtype
from harness.timing import CPU_PEAK, cotangent, time_steps
from impls.base import formulation
from impls.torch import ops
from impls.torch.backend import pick_device

#: every type a step computes in (`framework.precision`), mixed precision's low types included
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """"cpu" | "gpu" | "auto" -> the device, by the backend's own rule (`pick_device`)."""
    return pick_device(device)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class PlainStep:
    """One Adam (or SGD) step on the batch mean of -ELBO, written the plain way."""

    def __init__(
        self,
        spec: ModelSpec,
        optim: OptimSpec,
        params: Mapping[str, np.ndarray],
        runtime: RuntimeSpec = RuntimeSpec(),  # noqa: B008  (frozen: one shared default is safe)
    ) -> None:
        mode, device, seed = runtime.mode, runtime.device, runtime.seed
        allow_tf32, compile_mode = runtime.allow_tf32, runtime.compile_mode
        if mode not in ("eager", "compiled"):
            raise ValueError(f"torch has no mode {mode!r}")
        self.spec, self.mode = spec, mode
        # the transposed convolution as the harness's step has it, and mixed precision's compute type
        self.ops = formulation(ops, runtime)
        self.device = resolve_device(device)
        self.policy = Policy.of(runtime.dtype)
        self.dtype = DTYPES[self.policy.param]  # parameters, optimizer state, inputs and noise
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        torch.backends.cudnn.allow_tf32 = allow_tf32
        self.params = {
            k: torch.tensor(np.ascontiguousarray(ops.to_native(spec.params()[k], np.asarray(v))), dtype=self.dtype,
                            device=self.device, requires_grad=True)
            for k, v in params.items()
        }
        ps = list(self.params.values())
        if optim.name == "adam":
            self.opt: torch.optim.Optimizer = torch.optim.Adam(ps, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps)
        else:
            self.opt = torch.optim.SGD(ps, lr=optim.lr, momentum=optim.momentum)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self.scaler = torch.amp.GradScaler(self.device.type, init_scale=LOSS_SCALE_INIT,
                                           growth_interval=LOSS_SCALE_GROWTH_STEPS) if self.policy.loss_scaling else None

        def loss_fn(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
            recon, kl = vae.loss_terms(self.ops, self.params, x, eps, spec)
            return (recon + kl).mean()

        if mode == "compiled":
            self._loss = torch.compile(loss_fn, mode=compile_mode)
            self._opt_step = torch.compile(self.opt.step, mode=compile_mode)
            if self.scaler is not None:  # GradScaler.step(opt) calls opt.step: the compiled one
                self.opt.step = self._opt_step  # type: ignore[method-assign]
        else:
            self._loss, self._opt_step = loss_fn, self.opt.step

    def put(self, x: Any) -> torch.Tensor:
        return torch.as_tensor(ops.input_to_native(np.asarray(x), self.spec.input_shape), dtype=self.dtype, device=self.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        eps = torch.randn((x.shape[0], self.spec.latent), generator=self.generator, dtype=self.dtype, device=self.device)
        self.opt.zero_grad(set_to_none=True)
        loss = self._loss(x, eps)
        if self.scaler is not None:  # float16: skips the step on a non-finite gradient
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
            return loss.detach()
        loss.backward()
        self._opt_step()
        return loss.detach()

    def loss_scale(self) -> float | None:
        """float16: GradScaler's dynamic loss scale now (None in other precisions)."""
        return None if self.scaler is None else float(self.scaler.get_scale())

    def sync(self) -> None:
        _sync(self.device)

    def compile_count(self) -> int:
        """Graphs torch.compile has built in this process (dynamo's own counter; process-wide,
        so it also moves when another compiled function in the process recompiles)."""
        if self.mode == "eager":
            return 0
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])


def matmul_rate(dtype: str, device: str, n: int, *, repeats: int = 10, warmup: int = 2, allow_tf32: bool = False) -> float:
    """FLOP/s of a dense n x n @ n x n matmul (2 n^3 FLOP) in `dtype` (the type the step computes
    in: bfloat16 or float16 under mixed precision), median over `repeats` single matmuls timed
    with the shared timing core (sync before every clock read)."""
    dev = resolve_device(device)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    try:
        g = torch.Generator(device=dev)
        g.manual_seed(0)
        a = torch.randn((n, n), generator=g, dtype=DTYPES[dtype], device=dev)
        b = torch.randn((n, n), generator=g, dtype=DTYPES[dtype], device=dev)
        out = torch.empty((n, n), dtype=DTYPES[dtype], device=dev)
        res = time_steps(lambda: torch.matmul(a, b, out=out), lambda: _sync(dev), repeats, 1, warmup)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return 2.0 * n**3 / res.median


def reset_peak_memory(device: str) -> None:
    """Start a peak-memory window: GPU: torch's allocator peak; CPU: the process's RSS peak."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        CPU_PEAK.reset()


def peak_memory_bytes(device: str) -> int | None:
    """GPU: torch.cuda.max_memory_allocated since the reset (tensors held by torch's caching
    allocator, parameters and optimizer state included). CPU: harness.timing.CPU_PEAK (the
    process's RSS peak above its level at the reset)."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        return int(torch.cuda.max_memory_allocated(dev))
    return CPU_PEAK.peak_bytes()


def peak_memory_method(device: str) -> str:
    if resolve_device(device).type == "cuda":
        return "torch.cuda.max_memory_allocated"
    return f"cpu-rss-{CPU_PEAK.method}"


def reset_compile_state() -> None:
    """Forget every compiled graph in this process (dynamo's caches and counters), so that
    the next torch.compile'd call traces and compiles as in a fresh process. Inductor's
    on-disk cache is not touched (the worker gives every job an empty one)."""
    import torch._dynamo

    torch._dynamo.reset()


def _layer_op(op: str, dtype: str) -> Any:
    """`ops.<op>` as the step runs it in `dtype`: under mixed precision the matmul or convolution
    in the low type with the float32 bias added in float32 (`impls.base.formulation`); else the op."""
    dilated = op == "conv2d_transpose_dilated"
    runtime = RuntimeSpec(dtype=cast(Dtype, dtype), conv_transpose="dilated" if dilated else "native")
    return getattr(formulation(ops, runtime), "conv2d_transpose" if dilated else op)


def layer_steps(op: str, stride: int, x: np.ndarray, w: np.ndarray, b: np.ndarray, *, dtype: str, device: str,
                mode: str) -> tuple[Any, Any, Any]:
    """(forward, forward + backward, sync) of one layer (`ops.<op>`) on a batch, in torch's
    layout (x, w, b given native). Eager in every mode: torch.compile of the whole step calls
    the same aten convolution and matmul kernels, and compiling each layer alone would cost
    seconds apiece. The backward computes every input's gradient (x, w, b). `dtype` is the type
    the layers compute in: under mixed precision the low one, with the float32 bias added in
    float32, as the step does (`_layer_op`)."""
    dev, dt = resolve_device(device), DTYPES[dtype]
    xt, wt, bt = (torch.tensor(np.ascontiguousarray(a), dtype=t, device=dev, requires_grad=True)
                  for a, t in ((x, dt), (w, dt), (b, DTYPES[param_dtype(dtype)])))  # mixed: a float32 bias
    fn = _layer_op(op, dtype)

    def run() -> torch.Tensor:
        return fn(xt, wt, bt) if op == "dense" else fn(xt, wt, bt, stride)

    with torch.no_grad():  # a random cotangent, as the other frameworks take (`timing.cotangent`)
        g = torch.tensor(cotangent(tuple(run().shape), param_dtype(dtype)), dtype=dt, device=dev)  # NumPy has no bfloat16

    def forward() -> Any:
        with torch.no_grad():
            return run()

    def forward_backward() -> Any:
        return torch.autograd.grad(run(), (xt, wt, bt), grad_outputs=g)

    return forward, forward_backward, lambda: _sync(dev)

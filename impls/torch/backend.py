"""TorchBackend: the Backend protocol in PyTorch (eager, or torch.compile'd training step)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from torch.optim.optimizer import _get_scalar_dtype

from harness.api import ModelSpec, OptimSpec, RuntimeSpec, Term, Terms
from impls.torch import model

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class TorchBackend:
    name: ClassVar[str] = "torch"

    def __init__(self, spec: ModelSpec, optim: OptimSpec, runtime: RuntimeSpec) -> None:
        self.spec, self.optim, self.runtime = spec, optim, runtime
        if runtime.threads > 0:
            torch.set_num_threads(runtime.threads)
        want_gpu = runtime.device == "gpu" or (runtime.device == "auto" and torch.cuda.is_available())
        if want_gpu and not torch.cuda.is_available():
            raise RuntimeError("device=gpu asked for, but torch sees no CUDA device")
        self.device = torch.device("cuda" if want_gpu else "cpu")
        torch.backends.cuda.matmul.allow_tf32 = runtime.allow_tf32
        torch.backends.cudnn.allow_tf32 = runtime.allow_tf32
        self.dtype = DTYPES[runtime.dtype]
        self.params: dict[str, torch.Tensor] = {
            k: torch.zeros(s, dtype=self.dtype, device=self.device, requires_grad=True)
            for k, s in spec.param_shapes().items()
        }
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(runtime.seed)
        self._make_optimizer()
        self._compiles = 0
        self._step_fn = self._build_step()

    # -- parameters ------------------------------------------------------------------
    def _make_optimizer(self) -> None:
        o, ps = self.optim, list(self.params.values())
        if o.name == "adam":
            self.opt: torch.optim.Optimizer = torch.optim.Adam(
                ps, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=0.0, foreach=False
            )
        else:
            self.opt = torch.optim.SGD(ps, lr=o.lr, momentum=o.momentum, weight_decay=0.0, foreach=False)

    def set_params(self, params: Mapping[str, np.ndarray]) -> None:
        """Load canonical weights; the optimizer state is reset."""
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(torch.as_tensor(np.asarray(params[k]), dtype=self.dtype))
            # zeroed in place rather than cleared: a compiled step keeps seeing the same state
            # tensors (a cleared state made torch.compile recompile on every load)
            for st in self.opt.state.values():
                for t in st.values():
                    t.zero_()

    def get_params(self) -> dict[str, np.ndarray]:
        return {k: p.detach().cpu().numpy().copy() for k, p in self.params.items()}

    # -- optimizer state -----------------------------------------------------------------
    # torch.optim keeps a per-parameter dict (created lazily at the first step): Adam's
    # {"step": 0-d float tensor on the CPU, "exp_avg": m, "exp_avg_sq": v} (uncorrected
    # moments), SGD's {"momentum_buffer": b} (b = momentum*b + g). The canonical "adam.step"
    # is that per-parameter step (the same for every parameter that gets gradients).
    def get_state(self) -> dict[str, np.ndarray]:
        """The optimizer state under canonical names (see `harness.api.Backend.get_state`)."""
        shapes = self.spec.param_shapes()
        zeros = {k: np.zeros(shapes[k], dtype=self.runtime.dtype) for k in self.params}

        def read(k: str, key: str) -> np.ndarray:
            t = self.opt.state.get(self.params[k], {}).get(key)
            return zeros[k].copy() if t is None else t.detach().cpu().numpy().copy()

        if self.optim.name == "adam":
            steps = [int(st["step"].item()) for st in self.opt.state.values() if "step" in st]
            out: dict[str, np.ndarray] = {"adam.step": np.array(max(steps, default=0), dtype=np.int64)}
            out.update({f"adam.m.{k}": read(k, "exp_avg") for k in self.params})
            out.update({f"adam.v.{k}": read(k, "exp_avg_sq") for k in self.params})
            return out
        if self.optim.momentum > 0:
            return {f"sgd.momentum.{k}": read(k, "momentum_buffer") for k in self.params}
        return {}

    def set_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Load a canonical optimizer state (see `harness.api.Backend.set_state`). Existing
        state tensors are written in place (a compiled step sees the same tensors: no
        recompile); missing ones are created as torch's lazy initialisation would."""
        arrays = _check_state(state, state_shapes(self.spec, self.optim), self.runtime.dtype)
        with torch.no_grad():
            if self.optim.name == "adam":
                step = float(arrays["adam.step"])
                for k, p in self.params.items():
                    st = self.opt.state[p]
                    if not st:
                        # as Adam._init_group (capturable=False, fused=False): the step count is
                        # a CPU scalar of the default dtype, which is ours while the step runs
                        with _default_dtype(self.dtype):
                            st["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype(), device="cpu")
                        st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                        st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["step"].fill_(step)
                    st["exp_avg"].copy_(torch.from_numpy(arrays[f"adam.m.{k}"]))
                    st["exp_avg_sq"].copy_(torch.from_numpy(arrays[f"adam.v.{k}"]))
            elif self.optim.momentum > 0:
                for k, p in self.params.items():
                    value = torch.from_numpy(arrays[f"sgd.momentum.{k}"])
                    st = self.opt.state[p]
                    buf = st.get("momentum_buffer")
                    if buf is not None:
                        buf.copy_(value)
                    elif torch.any(value != 0) or torch.any(torch.signbit(value)):
                        # a zero state is left absent: torch then starts from b = g, as fresh
                        st["momentum_buffer"] = value.to(device=self.device, copy=True)

    # -- data --------------------------------------------------------------------------
    def put(self, x: Any) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            return x
        return torch.as_tensor(np.asarray(x), dtype=self.dtype, device=self.device)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- measurement -------------------------------------------------------------------
    def terms(self, x: Any, eps: np.ndarray) -> Terms:
        with torch.no_grad():
            recon, kl = model.loss_terms(self.params, self.put(x), self.put(eps), self.spec)
        return Terms(recon=recon.cpu().numpy(), kl=kl.cpu().numpy())

    def grads(self, x: Any, eps: np.ndarray, term: Term) -> dict[str, np.ndarray]:
        recon, kl = model.loss_terms(self.params, self.put(x), self.put(eps), self.spec)
        value = {"recon": recon, "kl": kl, "loss": recon + kl}[term].mean()
        names = list(self.params)
        gs = torch.autograd.grad(value, [self.params[k] for k in names], allow_unused=True)
        return {
            k: (np.zeros(self.spec.param_shapes()[k], dtype=self.runtime.dtype) if g is None else g.cpu().numpy())
            for k, g in zip(names, gs)
        }

    def log_likelihood(self, x: Any, k: int, seed: int) -> np.ndarray:
        xd = self.put(x)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        chunks = []
        with torch.no_grad():
            for start in range(0, k, 100):
                kk = min(100, k - start)
                eps = torch.randn((kk, xd.shape[0], self.spec.latent), generator=gen, dtype=self.dtype, device=self.device)
                chunks.append(model.iwae_log_weights(self.params, xd, eps, self.spec))
            log_w = torch.cat(chunks, dim=0)
            out = torch.logsumexp(log_w, dim=0) - math.log(k)
        return out.cpu().numpy()

    # -- training ----------------------------------------------------------------------
    def _loss(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        recon, kl = model.loss_terms(self.params, x, eps, self.spec)
        return (recon + kl).mean()

    def _build_step(self) -> Any:
        if self.runtime.mode == "eager":
            loss_fn, opt_step = self._loss, self.opt.step
        else:
            backend = self

            def counting_backend(gm: Any, example_inputs: Any) -> Any:
                backend._compiles += 1
                from torch._inductor.compile_fx import compile_fx

                return compile_fx(gm, example_inputs)

            loss_fn = torch.compile(self._loss, backend=counting_backend, dynamic=False)
            opt_step = torch.compile(self.opt.step, backend=counting_backend, dynamic=False)

        def step(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
            self.opt.zero_grad(set_to_none=True)
            loss = loss_fn(x, eps)
            loss.backward()
            # torch.optim keeps Adam's step count as a tensor of the *default* dtype; compiled,
            # the bias corrections 1 - beta**step are then computed in float32 even for float64
            # parameters (6.6e-6 relative error at step 1). Run the update with the default
            # dtype equal to the parameters' dtype, as eager mode effectively does.
            with _default_dtype(self.dtype):
                opt_step()
            return loss.detach()

        return step

    def train_step(self, x: Any, eps: np.ndarray | None = None) -> torch.Tensor:
        xd = self.put(x)
        if eps is None:
            e = torch.randn((xd.shape[0], self.spec.latent), generator=self.generator, dtype=self.dtype, device=self.device)
        else:
            e = self.put(eps)
        return self._step_fn(xd, e)

    def compile_count(self) -> int:
        return self._compiles

    def version(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "framework": "torch",
            "framework_version": torch.__version__,
            "device": str(self.device),
            "threads": torch.get_num_threads(),
            "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
        }
        if self.device.type == "cuda":
            info.update(
                device_name=torch.cuda.get_device_name(self.device),
                device_count=torch.cuda.device_count(),
                cuda=torch.version.cuda,
            )
        return info


def state_shapes(spec: ModelSpec, optim: OptimSpec) -> dict[str, tuple[int, ...]]:
    """Canonical optimizer-state names and shapes, in order."""
    ps = spec.param_shapes()
    if optim.name == "adam":
        return {
            "adam.step": (),
            **{f"adam.m.{k}": s for k, s in ps.items()},
            **{f"adam.v.{k}": s for k, s in ps.items()},
        }
    if optim.momentum > 0:
        return {f"sgd.momentum.{k}": s for k, s in ps.items()}
    return {}


def _check_state(state: Mapping[str, Any], expected: dict[str, tuple[int, ...]], dtype: str) -> dict[str, np.ndarray]:
    """Validate a canonical state against `expected` names and shapes; return host copies
    (moments in `dtype`, the step as int64). Raises ValueError naming the offending key."""
    listing = ", ".join(f"{k} {s}" for k, s in expected.items()) or "none (this optimizer keeps no state)"
    unknown = [k for k in state if k not in expected]
    if unknown:
        raise ValueError(f"unknown optimizer-state key(s) {unknown}; expected: {listing}")
    missing = [k for k in expected if k not in state]
    if missing:
        raise ValueError(f"missing optimizer-state key(s) {missing}; expected: {listing}")
    out: dict[str, np.ndarray] = {}
    for k, shape in expected.items():
        a = np.asarray(state[k])
        if a.shape != shape:
            raise ValueError(f"optimizer-state key {k!r} has shape {a.shape}, expected {shape}; expected: {listing}")
        if k.endswith(".step"):
            integral = np.issubdtype(a.dtype, np.integer) or (
                np.issubdtype(a.dtype, np.floating) and float(a).is_integer()
            )
            if not integral or not 0 <= float(a) < 2.0**63:
                raise ValueError(f"optimizer-state key {k!r} must be a non-negative integer, got {a!r}")
            out[k] = np.array(int(a), dtype=np.int64)
        else:
            out[k] = np.array(a, dtype=dtype, copy=True)
    return out


BACKEND = TorchBackend

"""TorchBackend: the VAE's primitives in PyTorch (eager, or torch.compile'd) under
`impls.base.BackendBase`, which implements the `Backend` protocol on top of them."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import numpy as np
import torch
from torch.optim.optimizer import _get_scalar_dtype

from harness import vae
from harness.api import Backend, Term
from harness.spec import LOSS_SCALE_GROWTH_STEPS, LOSS_SCALE_INIT, wants_gpu
from impls.base import BackendBase, F, StepDrawn, StepGiven, VersionCommon, pick_term
from impls.torch import ops


def pick_device(device: str) -> torch.device:
    """"cpu" | "gpu" | "auto" -> the torch device, by the one rule (`harness.spec.wants_gpu`)."""
    seen = int(torch.cuda.is_available())  # the rule asks only whether there is one
    return torch.device("cuda" if wants_gpu("torch", device, seen, "no CUDA device") else "cpu")


DTYPES = {"float32": torch.float32, "float64": torch.float64}


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    if old == dtype:  # float32 and mixed precision's float32 parameters: nothing to scope
        yield
        return
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class TorchBackend(BackendBase):
    """The VAE in PyTorch. Modes: "eager", "compiled" (torch.compile of the loss, of
    `opt.step` and of the IWAE log-weights; dynamic=False, inductor).

    Process-wide side effects: `torch.set_num_threads(threads)` when `threads > 0` (the
    intra-op pool of the whole process; torch.compile also guards on it). On CUDA the TF32
    switches (`torch.backends.cuda.matmul.allow_tf32`, `torch.backends.cudnn.allow_tf32`)
    are scoped: set to `allow_tf32` around each call of this backend and restored after, so
    other code in the process keeps its own; on the CPU they are not touched (they have no
    effect there). The default dtype is scoped likewise (set around the optimizer update).
    """

    name: ClassVar[str] = "torch"
    ops_module: ClassVar[Any] = ops
    device: torch.device
    dtype: torch.dtype
    params: dict[str, torch.Tensor]
    generator: torch.Generator
    opt: torch.optim.Optimizer

    # -- setup -----------------------------------------------------------------------------------
    def _setup(self) -> None:
        runtime = self.runtime
        if runtime.threads > 0:
            torch.set_num_threads(runtime.threads)
        self.device = pick_device(runtime.device)
        self._cuda = self.device.type == "cuda"
        self.dtype = DTYPES[self.policy.param]
        self.params = {
            k: torch.zeros(s, dtype=self.dtype, device=self.device, requires_grad=True)
            for k, s in self._native_shapes.items()
        }
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(runtime.seed)
        o, ps = self.optim, list(self.params.values())
        # foreach: the per-parameter loop on the CPU (the fast path there for small tensors),
        # torch's default (None: the multi-tensor kernels) on CUDA
        self._foreach = None if self._cuda else False
        if o.name == "adam":
            self.opt = torch.optim.Adam(
                ps, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=0.0, foreach=self._foreach
            )
        else:
            self.opt = torch.optim.SGD(ps, lr=o.lr, momentum=o.momentum, weight_decay=0.0, foreach=self._foreach)
        # float16: torch's own dynamic loss scaling, with the scale rules every framework uses
        self.scaler = torch.amp.GradScaler(self.device.type, init_scale=LOSS_SCALE_INIT,
                                           growth_interval=LOSS_SCALE_GROWTH_STEPS) if self.policy.loss_scaling else None
        self.skipped: Any = 0  # float16 steps skipped for a non-finite gradient (a CPU tensor once counted)

    @contextlib.contextmanager
    def _scope(self) -> Iterator[None]:
        """On CUDA: the TF32 switches set to `allow_tf32` for the duration, then restored."""
        if not self._cuda:
            yield
            return
        matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
        old = (matmul.allow_tf32, cudnn.allow_tf32)
        matmul.allow_tf32 = cudnn.allow_tf32 = self.runtime.allow_tf32
        try:
            yield
        finally:
            matmul.allow_tf32, cudnn.allow_tf32 = old

    # -- data ------------------------------------------------------------------------------------
    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(a, device=self.device)

    def _tensor_dtype(self, x: Any) -> torch.dtype | None:
        return x.dtype if isinstance(x, torch.Tensor) else None

    def _from_device(self, t: torch.Tensor) -> np.ndarray:
        return t.detach().cpu().numpy().copy()

    def sync(self) -> None:
        """Block until every queued device computation of this backend has finished."""
        if self._cuda:
            torch.cuda.synchronize(self.device)

    # -- parameters ------------------------------------------------------------------------------
    def _set_params(self, params: dict[str, np.ndarray]) -> None:
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(torch.from_numpy(params[k]))
            # zeroed in place rather than cleared: a compiled step keeps seeing the same state
            # tensors (a cleared state made torch.compile recompile on every load)
            for st in self.opt.state.values():
                for t in st.values():
                    t.zero_()

    def _get_params(self) -> dict[str, np.ndarray]:
        return {k: self._from_device(p) for k, p in self.params.items()}

    # -- optimizer state -------------------------------------------------------------------------
    # torch.optim keeps a per-parameter dict (created lazily at the first step): Adam's
    # {"step": 0-d float tensor on the CPU, "exp_avg": m, "exp_avg_sq": v} (uncorrected
    # moments), SGD's {"momentum_buffer": b} (b = momentum*b + g). The canonical "adam.step"
    # is that per-parameter step (the same for every parameter that gets gradients).
    def _get_state(self) -> dict[str, np.ndarray]:
        def read(k: str, key: str) -> np.ndarray:
            t = self.opt.state.get(self.params[k], {}).get(key)
            return np.zeros(self._native_shapes[k], dtype=self.np_dtype) if t is None else self._from_device(t)

        if self.optim.name == "adam":
            steps = [int(st["step"].item()) for st in self.opt.state.values() if "step" in st]
            out: dict[str, np.ndarray] = {"adam.step": np.array(max(steps, default=0), dtype=np.int64)}
            out.update({f"adam.m.{k}": read(k, "exp_avg") for k in self.params})
            out.update({f"adam.v.{k}": read(k, "exp_avg_sq") for k in self.params})
            return out
        if self.optim.momentum > 0:
            return {f"sgd.momentum.{k}": read(k, "momentum_buffer") for k in self.params}
        return {}

    def _set_state(self, state: dict[str, np.ndarray]) -> None:
        # Existing state tensors are written in place (a compiled step sees the same tensors:
        # no recompile); missing ones are created as torch's lazy initialisation would.
        with torch.no_grad():
            if self.optim.name == "adam":
                step = float(state["adam.step"])
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
                    st["exp_avg"].copy_(torch.from_numpy(state[f"adam.m.{k}"]))
                    st["exp_avg_sq"].copy_(torch.from_numpy(state[f"adam.v.{k}"]))
            elif self.optim.momentum > 0:
                for k, p in self.params.items():
                    value = torch.from_numpy(state[f"sgd.momentum.{k}"])
                    st = self.opt.state[p]
                    buf = st.get("momentum_buffer")
                    if buf is not None:
                        buf.copy_(value)
                    elif torch.any(value != 0) or torch.any(torch.signbit(value)):
                        # a zero state is left absent: torch then starts from b = g, as fresh
                        st["momentum_buffer"] = value.to(device=self.device, copy=True)

    # -- measurement -----------------------------------------------------------------------------
    def _loss_terms(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            recon, kl = vae.loss_terms(self.ops, self.params, x, eps, self.spec)
        return self._from_device(recon), self._from_device(kl)

    def _encode(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            mu, logvar = vae.encode(self.ops, self.params, x, self.spec)
        return self._from_device(mu), self._from_device(logvar)

    def _grads(self, x: torch.Tensor, eps: torch.Tensor, term: Term) -> dict[str, np.ndarray | None]:
        recon, kl = vae.loss_terms(self.ops, self.params, x, eps, self.spec)
        value = self._scaled(pick_term(term, recon, kl).mean())
        names = list(self.params)
        gs = torch.autograd.grad(value, [self.params[k] for k in names], allow_unused=True)
        return {k: (None if g is None else self._from_device(g)) for k, g in zip(names, gs)}

    def _iwae_grads(self, x: torch.Tensor, eps: torch.Tensor, per_example: bool) -> dict[str, np.ndarray | None]:
        names, spec = list(self.params), self.spec
        if not per_example:
            value = -vae.iwae_bound(self.ops, self.params, x, eps, spec).mean()
            gs = torch.autograd.grad(value, [self.params[k] for k in names], allow_unused=True)
            return {k: (None if g is None else self._from_device(g)) for k, g in zip(names, gs)}

        per = getattr(self, "_iwae_per_example", None)
        if per is None:

            def one(params: dict[str, torch.Tensor], xb: torch.Tensor, eb: torch.Tensor) -> torch.Tensor:
                return -vae.iwae_bound(self.ops, params, xb, eb, spec)  # xb (D,), eb (K, L): a scalar

            # torch.func: the gradient of one example's bound, vectorised over the batch;
            # torch.compile'd in compiled mode (not counted by compiles_per_function)
            per = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 1))
            if self.compiled:
                per = torch.compile(per, dynamic=False)
            self._iwae_per_example = per
        gd = per({k: p.detach() for k, p in self.params.items()}, x, eps)
        return {k: self._from_device(gd[k]) for k in names}

    def _local_grads(self, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> tuple[np.ndarray, ...]:
        mu, logvar = mu.detach().requires_grad_(True), logvar.detach().requires_grad_(True)
        params = {k: p.detach() for k, p in self.params.items()}
        recon, kl = vae.terms_at(self.ops, params, x, mu, logvar, eps, self.spec)
        g_mu, g_logvar = torch.autograd.grad((recon + kl).sum(), [mu, logvar])
        return tuple(self._from_device(t) for t in (recon, kl, g_mu, g_logvar))

    def _iwae_rng(self, seed: int) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        return gen

    def _iwae_log_weights(self, x: torch.Tensor, kk: int, rng: torch.Generator) -> tuple[np.ndarray, torch.Generator]:
        eps = torch.randn((kk, x.shape[0], self.spec.latent), generator=rng, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            return self._from_device(self._log_weights(x, eps)), rng

    # -- compiled functions ----------------------------------------------------------------------
    def _compile(self, fn: F, what: str) -> F:
        if not self.compiled:
            return fn
        counts = self._compiles

        def counting_backend(gm: Any, example_inputs: Any) -> Any:
            counts[what] += 1  # once per graph handed to inductor: a (re)compilation
            from torch._inductor import list_mode_options
            from torch._inductor.compile_fx import compile_fx

            # the mode's inductor options (reduce-overhead: CUDA graphs), as torch.compile(mode=) would set
            return compile_fx(gm, example_inputs, config_patches=list_mode_options(self.runtime.compile_mode))

        return torch.compile(fn, backend=counting_backend, dynamic=False)  # type: ignore[return-value]

    def _loss(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        recon, kl = vae.loss_terms(self.ops, self.params, x, eps, self.spec)
        return pick_term("loss", recon, kl).mean()

    def _iwae(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return vae.iwae_log_weights(self.ops, self.params, x, eps, self.spec)

    def _build_step(self) -> tuple[StepDrawn, StepGiven]:
        loss_fn = self._compile(self._loss, "step")
        opt_step: Callable[[], Any] = self._compile(self.opt.step, "step")  # type: ignore[arg-type]
        opt, dtype, latent, device, generator = self.opt, self.dtype, self.spec.latent, self.device, self.generator

        scaler = self.scaler
        if scaler is not None and self.compiled:
            opt.step = opt_step  # type: ignore[method-assign,assignment]  # what GradScaler.step calls

        def update(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(x, eps)
            if scaler is not None:
                # GradScaler as torch documents it: backward of the scaled loss; `step` unscales
                # (one fused kernel), skips the step when a gradient is not finite (its one host
                # sync) and otherwise calls opt.step, the compiled one in compiled mode (below);
                # the skip is counted on the device from GradScaler's own found-inf flags
                scaler.scale(loss).backward()
                with _default_dtype(dtype):
                    scaler.step(opt)
                found = scaler._per_optimizer_states[id(opt)]["found_inf_per_device"]
                self.skipped = self.skipped + sum(found.values())  # on the device: no sync (read at record time)
                scaler.update()
                return loss.detach()
            loss.backward()
            # torch.optim keeps Adam's step count as a tensor of the *default* dtype; compiled,
            # the bias corrections 1 - beta**step are then computed in float32 even for float64
            # parameters (6.6e-6 relative error at step 1). Run the update with the default
            # dtype equal to the parameters' dtype, as eager mode effectively does.
            with _default_dtype(dtype):
                opt_step()
            return loss.detach()

        given = update  # its two halves are compiled (above): the backward runs between them

        # noise from the backend's generator, drawn outside the compiled graphs (dynamo would
        # graph-break on the generator)
        def drawn(x: torch.Tensor) -> torch.Tensor:
            return given(x, torch.randn((x.shape[0], latent), generator=generator, dtype=dtype, device=device))

        if not self._cuda:
            return drawn, given
        scope = self._scope  # on CUDA: the TF32 switches scoped around each call

        def step_drawn(x: torch.Tensor) -> torch.Tensor:
            with scope():
                return drawn(x)

        def step_given(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
            with scope():
                return given(x, eps)

        return step_drawn, step_given

    def _build_log_weights(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return self._compile(self._iwae, "log_likelihood")

    # -- record ----------------------------------------------------------------------------------
    def _version_common(self) -> VersionCommon:
        with self._scope():
            precision = torch.get_float32_matmul_precision()
            allow_tf32 = bool(torch.backends.cuda.matmul.allow_tf32) if self._cuda else self.runtime.allow_tf32
        return VersionCommon(
            framework_version=torch.__version__,
            device=str(self.device),
            device_name=torch.cuda.get_device_name(self.device) if self._cuda else "cpu",
            device_count=torch.cuda.device_count() if self._cuda else 1,
            device_kind="gpu" if self._cuda else "cpu",
            threads=torch.get_num_threads(),
            matmul_precision=precision,
            allow_tf32=allow_tf32,
        )

    def _loss_scale(self) -> tuple[float, int]:
        assert self.scaler is not None
        return float(self.scaler.get_scale()), int(self.skipped)

    def _version_extra(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "optimizer_foreach": self._foreach,
            "compile_mode": self.runtime.compile_mode,
            "interop_threads": torch.get_num_interop_threads(),
        }
        if self._cuda:
            info.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
        return info


BACKEND: type[Backend] = TorchBackend

"""PyTorch adapter: module, loss and optimizer hooks that feed the capture core.

Step semantics
--------------
* With an optimizer attached (:meth:`Hook.attach_optimizer`), a training step
  ends when ``optimizer.step()`` returns: every forward, loss and backward
  since the previous ``optimizer.step()`` belongs to it (gradient
  accumulation, several forwards per step).
* Without one, and in every other mode (eval, predict), a step is one
  top-level forward of a registered module.
* A step's end is recorded when the next step starts (its first forward or
  ``optimizer.step()``, :meth:`Hook.set_mode`, :meth:`Hook.close`), so the
  loss and backward after a forward and ``save_scalar`` calls made after the
  step's boundary still land in it.
* The mode is the one given to :meth:`Hook.set_mode`, or, until that is
  called, ``TRAIN``/``EVAL`` from the registered module's ``training`` flag.

Values
------
Weights and biases are read when the step ends (after ``optimizer.step()``:
the parameters that step produced). Gradients are ``p.grad`` as
``optimizer.step()`` sees it (after accumulation; under DDP, averaged);
without an optimizer, the last gradient accumulated into each parameter
during the step. Reductions are computed on the tensor's device and copied to
the host in one transfer.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

try:
    import torch
    from torch import nn
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise ImportError('tensortap.torch needs PyTorch: pip install "tensortap[torch]"') from exc

from .. import reductions as red
from ..exceptions import StopTrainingRequested
from ..modes import Mode
from . import core

__all__ = ["Hook", "TorchOps", "capture"]

# float types NumPy lacks: stored as float32, the original dtype recorded
_WIDEN: dict[torch.dtype, torch.dtype] = {torch.bfloat16: torch.float32, torch.complex32: torch.complex64}
for _name in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu"):
    if hasattr(torch, _name):
        _WIDEN[getattr(torch, _name)] = torch.float32


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class TorchOps(core.TensorOps):
    """Reductions on the tensor's device (one host transfer); raw values as host arrays."""

    def prepare(
        self, value: Any, keys: Sequence[str], raw: bool
    ) -> tuple[np.ndarray | None, dict[str, float], str | None]:
        if not isinstance(value, torch.Tensor):
            return super().prepare(value, keys, raw)
        t = value.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        orig = None
        if t.dtype in _WIDEN:
            orig = _dtype_name(t.dtype)
            t = t.to(_WIDEN[t.dtype])
        on_host = t.is_complex() or t.numel() == 0  # reduced with NumPy from the host copy
        host = self._to_host(t) if raw or on_host else None
        values = self._reduce(t, keys) if keys and not on_host else {}
        if host is not None and t.is_cuda and (on_host or not keys):
            torch.cuda.current_stream(t.device).synchronize()  # else the reductions' transfer waited for it
        array = host.numpy() if host is not None else None
        if on_host and keys and array is not None:
            values = red.compute_many(array, list(keys))
        return (array if raw else None), values, orig

    @staticmethod
    def _to_host(t: torch.Tensor) -> torch.Tensor:
        """``t`` on the host: a view of a CPU tensor (the core copies it before ``offer`` returns),
        a pinned buffer filled without blocking from CUDA."""
        if t.device.type == "cpu":
            return t.contiguous()
        if t.is_cuda:
            try:
                out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            except RuntimeError:
                return t.cpu()
            # completed by the blocking transfer of the reductions, or the stream synchronize in prepare
            return out.copy_(t, non_blocking=True)
        return t.cpu()

    @staticmethod
    def _reduce(t: torch.Tensor, keys: Sequence[str]) -> dict[str, float]:
        """Compute ``keys`` with the formulas of :mod:`tensortap.reductions`, stacked into one transfer."""
        wide = torch.float32 if t.device.type == "mps" else torch.float64
        x = t.to(wide)
        ax = x.abs() if any(red.split_key(k)[1] or k == "l1" for k in keys) else x
        out: list[torch.Tensor] = []
        for key in keys:
            name, absolute = red.split_key(key)
            if name in red.HEALTH_COUNTS:
                if name == "zero_count":
                    out.append(torch.count_nonzero(t == 0))
                elif not t.is_floating_point():
                    out.append(torch.zeros((), device=t.device))
                else:
                    out.append(torch.count_nonzero(torch.isnan(t) if name == "nan_count" else torch.isinf(t)))
                continue
            v = ax if absolute else x
            if name == "min":
                out.append(v.min())
            elif name == "max":
                out.append(v.max())
            elif name == "mean":
                out.append(v.mean())
            elif name == "std":
                out.append(v.std(correction=0))
            elif name == "variance":
                out.append(v.var(correction=0))
            elif name == "sum":
                out.append(v.sum())
            elif name == "prod":
                out.append(v.prod())
            elif name == "l1":
                out.append(ax.sum())
            elif name == "l2":
                out.append(torch.sqrt((v * v).sum()))
            else:
                raise ValueError(f"reduction: {key!r} is not a reduction; valid: {', '.join(red.ALL_REDUCTIONS)}")
        stacked = torch.stack([o.to(wide) for o in out]).cpu().tolist()
        return dict(zip(keys, (float(v) for v in stacked), strict=True))


def _unwrap(module: nn.Module) -> nn.Module:
    """The user's module inside torch.compile / DistributedDataParallel / DataParallel wrappers."""
    while True:
        inner = getattr(module, "_orig_mod", None)  # torch.compile's OptimizedModule
        if isinstance(inner, nn.Module):
            module = inner
        elif isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            module = module.module
        else:
            return module


def _is_compiled(module: nn.Module) -> bool:
    return any(isinstance(getattr(m, "_orig_mod", None), nn.Module) for m in module.modules())


def _flatten(prefix: str, value: Any) -> Iterable[tuple[str, torch.Tensor]]:
    """Tensors in a (nested) module input or output: ``prefix`` alone, or ``prefix/<index or key>``."""
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, (list, tuple)):
        if len(value) == 1:
            yield from _flatten(prefix, value[0])
        else:
            for i, v in enumerate(value):
                yield from _flatten(f"{prefix}/{i}", v)
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _flatten(f"{prefix}/{k}", v)


def _param_collection(name: str) -> str:
    return "biases" if "bias" in name.rsplit(".", 1)[-1] else "weights"


def _distributed_rank() -> int | None:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    return None


class Hook(core.Hook):
    """Capture a PyTorch training: module, loss and optimizer hooks.

    Parameters
    ----------
    out_dir
        Local directory or fsspec URL of the trial.
    weights_rank0_only
        Under ``torch.distributed``, save weights and biases (identical on every
        DDP rank) from rank 0 only; other ranks still save gradients, losses, outputs.
    raise_on_stop
        Raise :class:`tensortap.StopTrainingRequested` from ``optimizer.step()``
        once a stop request is found in the trial (the step completes and the
        hook is closed first). Under ``torch.distributed`` every rank raises at
        the same step: they agree every :attr:`stop_sync_steps` training steps
        with one all-reduce. Otherwise poll :attr:`should_stop` yourself.
    **kwargs
        Everything :class:`tensortap.capture.Hook` takes (``save_config``,
        ``include_collections``, ``reduction_config``, ``include_workers``, ``strict``, ...).
        ``rank`` defaults to ``torch.distributed.get_rank()`` when a process group exists.
    """

    framework = "pytorch"
    ops = TorchOps()
    # under torch.distributed, ranks agree on a stop request every this many training steps
    stop_sync_steps: int = 10

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        weights_rank0_only: bool = False,
        raise_on_stop: bool = False,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("rank") is None:
            kwargs["rank"] = _distributed_rank()
        super().__init__(out_dir, **kwargs)
        self.weights_rank0_only = bool(weights_rank0_only)
        self.raise_on_stop = bool(raise_on_stop)
        self._explicit_mode: Mode | None = None
        self._roots: list[nn.Module] = []
        self._params: dict[str, torch.Tensor] = {}
        self._param_names: dict[int, str] = {}
        self._handles: list[Any] = []
        self._grad_handles: list[Any] = []  # only while no optimizer is attached
        self._optimizer: torch.optim.Optimizer | None = None
        self._depth = 0
        self._warned_compile = False
        self._open = False
        self._pending = False  # the open step has ended; it is finished when the next one starts
        self._ended_by_optimizer = False
        self._closed = False
        self._calls: dict[str, int] = {}
        # first call of each module in a saved step, held (cloned on device) until a second call
        # names it "<name>:0" or the step ends and names it "<name>"
        self._held: dict[str, tuple[list[tuple[str, torch.Tensor]], tuple[str, ...]]] = {}
        self._grad_stash: dict[str, torch.Tensor] = {}
        # per-step switches, each one boolean test in the hooks
        self._io = False
        self._losses = False
        self._stash_grads = False

    @classmethod
    def _kwargs_from_json(cls, data: Any) -> dict[str, Any]:
        own = ("weights_rank0_only", "raise_on_stop")
        if not isinstance(data, dict):
            return super()._kwargs_from_json(data)
        kwargs = super()._kwargs_from_json({k: v for k, v in data.items() if k not in own})
        return kwargs | {k: data[k] for k in own if k in data}

    # ----------------------------------------------------------- registration
    def register_module(self, module: nn.Module) -> None:
        """Capture ``module``: parameters, gradients, and outputs/inputs when those collections are saved.

        A compiled (``torch.compile``), DDP or DataParallel module is unwrapped for naming;
        names are those of ``named_parameters()`` / ``named_modules()`` of the inner module.
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"register_module: expected a torch.nn.Module, got {type(module).__name__}")
        inner = _unwrap(module)
        if _is_compiled(module) and self._wants_any(("outputs", "inputs")):
            warnings.warn(
                f"tensortap: {type(inner).__name__} is compiled with torch.compile; outputs and inputs of its "
                "submodules are not captured inside compiled code (weights, gradients, losses and the model's "
                "own outputs are)",
                UserWarning,
                stacklevel=2,
            )
        self._roots.append(inner)
        for name, p in inner.named_parameters():
            if id(p) in self._param_names:
                continue
            self._params[name] = p
            self._param_names[id(p)] = name
            if p.requires_grad and self._optimizer is None and self._wants_any(("gradients",)):
                self._grad_handles.append(p.register_post_accumulate_grad_hook(self._grad_hook(name)))
        self._handles.append(module.register_forward_pre_hook(self._root_pre_hook(inner)))
        self._handles.append(module.register_forward_hook(self._root_post_hook(inner), always_call=True))
        if self._wants_any(("outputs", "inputs")):  # no hook at all otherwise: PyTorch's dispatch costs too
            for name, sub in inner.named_modules():
                if name:
                    self._handles.append(sub.register_forward_hook(self._io_hook(name)))

    def register_loss(self, loss_module: nn.Module, name: str | None = None) -> None:
        """Save the output of ``loss_module`` as ``losses/<name>`` (default: its class name).

        Called several times in one step, it saves ``losses/<name>:0``, ``:1``, ...
        """
        if not isinstance(loss_module, nn.Module):
            raise TypeError(f"register_loss: expected a torch.nn.Module, got {type(loss_module).__name__}")
        full = f"losses/{name or type(loss_module).__name__}"

        def on_loss(module: nn.Module, args: Any, output: Any) -> None:
            if self._losses:
                self._guarded(self._offer_call, full, output, ("losses",))

        self._handles.append(loss_module.register_forward_hook(on_loss))

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Make ``optimizer.step()`` end each training step; save its state as ``optimizer/<param>/<key>``."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"attach_optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if self._optimizer is not None:
            raise ValueError("attach_optimizer: an optimizer is already attached; its step() defines the step")
        self._optimizer = optimizer
        for handle in self._grad_handles:  # gradients are read from p.grad at optimizer.step() from now on
            handle.remove()
        self._grad_handles.clear()
        self._handles.append(optimizer.register_step_pre_hook(self._before_optimizer_step))
        self._handles.append(optimizer.register_step_post_hook(self._after_optimizer_step))

    # ----------------------------------------------------------------- modes
    def set_mode(self, mode: Mode | str) -> None:
        """Set the mode of the steps that follow; ``model.train()``/``eval()`` are no longer followed."""
        self._explicit_mode = Mode.parse(mode)
        if self._open and self._pending:
            self._finish_step()
        super().set_mode(self._explicit_mode)

    def _detect_mode(self, module: nn.Module | None) -> Mode:
        if self._explicit_mode is not None:
            return self._explicit_mode
        if module is None:
            module = self._roots[0] if self._roots else None
        if module is None:
            return self.mode
        return Mode.TRAIN if module.training else Mode.EVAL

    def _ends_at_optimizer(self, mode: Mode) -> bool:
        return self._optimizer is not None and mode == Mode.TRAIN

    # ----------------------------------------------------------------- steps
    def _wants_any(self, collections: Sequence[str]) -> bool:
        if self.save_all or self._regex_collections:
            return True
        return any(c in self.included for c in collections)

    def _saving_any(self, collections: Sequence[str]) -> bool:
        if not self._saving:
            return False
        return any(self.is_saving(c) for c in collections) or any(
            self.is_saving(c.name) for c in self._regex_collections
        )

    def _start_step(self, mode: Mode) -> None:
        if self._open:
            self._finish_step()
        if self._closed:
            return
        self.begin_step(mode)
        self._open = True
        self._pending = self._ended_by_optimizer = False
        self._io = self._saving_any(("outputs", "inputs"))
        self._losses = self._saving_any(("losses",))
        self._stash_grads = self._saving_any(("gradients",)) and not self._ends_at_optimizer(mode)

    def _ensure_open(self) -> None:
        if not self._open:
            self._start_step(self._detect_mode(None))

    def _finish_step(self) -> None:
        """Save what the step's end sees (parameters, optimizer state, stashed gradients), end it."""
        self._open = self._pending = self._ended_by_optimizer = False
        self._io = self._losses = self._stash_grads = False
        if self._saving:
            self._guarded(self._save_step_end)
        self._calls.clear()
        self._held.clear()
        self._grad_stash.clear()
        self.end_step()

    def _save_step_end(self) -> None:
        if not (self.weights_rank0_only and self.rank != 0) and self._saving_any(("weights", "biases")):
            for name, p in self._params.items():
                self.offer(name, p, (_param_collection(name),))
        for name, g in self._grad_stash.items():
            self.offer(f"gradients/{name}", g, ("gradients",))
        if self._optimizer is not None and self._saving_any(("optimizer_variables",)):
            for p, state in self._optimizer.state.items():
                pname = self._param_names.get(id(p))
                if pname is None:
                    continue
                for key, v in state.items():
                    if isinstance(v, torch.Tensor):
                        self.offer(f"optimizer/{pname}/{key}", v, ("optimizer_variables",))
        for base, (tensors, collections) in self._held.items():
            self._offer_tensors(base, tensors, collections)

    def _offer_call(self, base: str, value: Any, collections: tuple[str, ...]) -> None:
        """Offer one call's tensors as ``base`` (one call in the step) or ``base:<i>`` (several)."""
        if self._plan(base, collections, False) is None:
            return
        n = self._calls.get(base, 0)
        self._calls[base] = n + 1
        tensors = list(_flatten("", value))
        if n == 0:
            self._held[base] = ([(sub, t.detach().clone()) for sub, t in tensors], collections)
            return
        if n == 1:
            self._offer_tensors(f"{base}:0", *self._held.pop(base))
        self._offer_tensors(f"{base}:{n}", tensors, collections)

    def _offer_tensors(self, name: str, tensors: list[tuple[str, torch.Tensor]], collections: tuple[str, ...]) -> None:
        for sub, t in tensors:
            self.offer(name + sub, t, collections)

    def _guarded(self, fn: Callable[..., None], *args: Any) -> None:
        """Run capture work; an error disables capture (or raises with ``strict=True``), never training."""
        try:
            fn(*args)
        except Exception as exc:
            self._fail(exc, f"capture failed at step {self.step}")

    # ------------------------------------------------------------ hook bodies
    def _root_pre_hook(self, inner: nn.Module) -> Callable[[nn.Module, Any], None]:
        def pre(module: nn.Module, args: Any) -> None:
            if torch.compiler.is_compiling():  # compiled after registration: these hooks are traced once
                self._warn_compiled_after_registration(inner)
                return
            self._depth += 1
            if self._depth > 1 or self._closed:
                return
            mode = self._detect_mode(inner)
            if not self._open or self._pending or (mode != self.mode and not self._ends_at_optimizer(self.mode)):
                self._start_step(mode)

        return pre

    def _root_post_hook(self, inner: nn.Module) -> Callable[[nn.Module, Any, Any], None]:
        root_name = type(inner).__name__

        def post(module: nn.Module, args: Any, output: Any) -> None:
            if torch.compiler.is_compiling():
                return
            self._depth = max(self._depth - 1, 0)
            if self._depth or not self._open:
                return
            if self._io and output is not None:
                self._guarded(self._capture_io, root_name, args, output)
            if not self._ends_at_optimizer(self.mode):
                self._pending = True

        return post

    def _warn_compiled_after_registration(self, inner: nn.Module) -> None:
        if not self._warned_compile:
            self._warned_compile = True
            warnings.warn(
                f"tensortap: {type(inner).__name__} was compiled with torch.compile after register_module(); "
                "its forwards are no longer seen (no outputs; steps end only at optimizer.step()). "
                "Register the compiled module instead: hook.register_module(torch.compile(model))",
                UserWarning,
                stacklevel=2,
            )

    def _io_hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def on_forward(module: nn.Module, args: Any, output: Any) -> None:
            if self._io and not torch.compiler.is_compiling():
                self._guarded(self._capture_io, name, args, output)

        return on_forward

    def _capture_io(self, name: str, args: Any, output: Any) -> None:
        self._offer_call(f"outputs/{name}", output, ("outputs",))
        self._offer_call(f"inputs/{name}", args, ("inputs",))

    def _grad_hook(self, name: str) -> Callable[[torch.Tensor], None]:
        def on_grad(p: torch.Tensor) -> None:
            if self._stash_grads and p.grad is not None:
                self._grad_stash[name] = p.grad.detach().clone()

        return on_grad

    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._closed:
            return
        if not self._open or self._ended_by_optimizer:
            self._start_step(self._detect_mode(None))
        if self._saving_any(("gradients",)):
            self._grad_stash.clear()
            self._guarded(self._offer_gradients)

    def _offer_gradients(self) -> None:
        for name, p in self._params.items():
            if p.requires_grad and p.grad is not None:
                self.offer(f"gradients/{name}", p.grad, ("gradients",))

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._closed:
            return
        if self._open:
            self._pending = self._ended_by_optimizer = True
        if self.raise_on_stop and self._stop_agreed():
            reason = self.stop_reason or "requested on another rank"
            self.close()
            raise StopTrainingRequested(f"tensortap: a stop was requested for {self.out_dir}: {reason}")

    def _stop_agreed(self) -> bool:
        """:attr:`should_stop`; across a process group, agreed by every rank every ``stop_sync_steps`` steps.

        Ranks may see the request at different times; one rank leaving a DDP training alone
        would leave the others waiting in the next all-reduce.
        """
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self.should_stop
        if self.mode_step % self.stop_sync_steps:
            return False
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        flag = torch.tensor([1 if self.should_stop else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    # ------------------------------------------------------- user-facing saves
    def save_tensor(self, name: str, value: Any, collections: Sequence[str] = ("custom",)) -> None:
        """Save ``value`` as ``name`` on the current step if it is saved (any collections)."""
        self._ensure_open()
        if self._saving:
            super().save_tensor(name, value, collections)

    def save_scalar(self, name: str, value: Any, collections: Sequence[str] = ("metrics",)) -> None:
        """Save a scalar as ``<first collection>/<name>`` (``metrics/lr``) on the current step if it is saved."""
        self._ensure_open()
        if not self._saving:
            return
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        super().save_scalar(name, value, collections)

    # ---------------------------------------------------------------- closing
    def close(self, reason: str = "closed") -> None:
        """End the step in progress, remove every hook, publish, mark this worker ended. Idempotent."""
        if self._open and not self._closed:
            self._finish_step()
        self._closed = True
        for handle in self._handles + self._grad_handles:
            handle.remove()
        self._handles.clear()
        self._grad_handles.clear()
        super().close(reason)

    def close_for_exit(self, reason: str) -> None:
        """At interpreter exit or SIGTERM: keep a step that has ended but is not yet recorded."""
        if self._open and self._pending and not self._depth and not self._closed:
            self._guarded(self._finish_step)
        self._closed = True
        super().close_for_exit(reason)

    def __enter__(self) -> Hook:
        return self


def capture(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    optimizer: torch.optim.Optimizer | None = None,
    loss: nn.Module | None = None,
    **kwargs: Any,
) -> Hook:
    """One line: a :class:`Hook` registered on ``model``, ``loss`` and ``optimizer``.

    ``kwargs`` go to :class:`Hook` (``save_config``, ``include_collections``, ...).
    """
    hook = Hook(out_dir, **kwargs)
    hook.register_module(model)
    if loss is not None:
        hook.register_loss(loss)
    if optimizer is not None:
        hook.attach_optimizer(optimizer)
    return hook

"""The PyTorch hook: module, loss, backward and optimizer events turned into session calls.

What a step is
--------------
* **Training with optimizers attached** (:meth:`Hook.attach_optimizer`): a
  TRAIN step ends when every attached optimizer has stepped in it (one
  optimizer: its ``step()``; a GAN: the generator's and the discriminator's,
  in any order; a critic stepped five times per generator step: once per
  generator step). Everything between the end of one step and the end of the
  next belongs to it: forwards, losses, backwards, gradient accumulation,
  values given to :meth:`Hook.save_scalar`, :meth:`Hook.save_tensor` and
  :meth:`Hook.record_loss` (a value given after ``optimizer.step()`` is in the
  next step). A ``GradScaler`` step that skips the update is still a step.
  A forward whose outputs no backward used before a later forward's were (a
  batch skipped with ``continue``) is not saved in it, nor the values given after
  it (:meth:`Hook._forget_unused`);
  a forward or backward that raised drops its step (:meth:`Hook._drop`).
* **Explicit steps** (``explicit_steps=True``): :meth:`Hook.finish_step` alone ends TRAIN steps.
* **Without optimizers, and in EVAL and PREDICT**: a step is one top-level
  forward of a registered module, with the loss, backward and values given
  after it (until the next forward, or a value given in another mode).
  A backward through the outputs of a TRAIN forward recorded as an earlier step (a model called
  once per character before one backward) is warned about, once (:meth:`Hook._on_own_step_used`).
* The mode is the one given to :meth:`Hook.set_mode`; until then EVAL when
  the module is in ``eval()`` or gradients are disabled (``no_grad``,
  ``inference_mode``), TRAIN otherwise (an optimizer stepping in such an
  EVAL step is warned about, once: frozen BatchNorm needs ``set_mode``). A
  TRAIN step that saw a forward but nothing that trains (a backward, an
  optimizer step, a ``torch.autograd.grad`` that returned the gradient of a
  registered parameter: :meth:`Hook.on_grad`, a loss given to
  :meth:`Hook.record_loss` after the forward) is a prediction after
  training: it is recorded as PREDICT. A step opened by a
  value alone (``save_scalar`` before any forward) takes the mode of the
  forward that follows; so does one opened, with optimizers attached, by a
  forward not in TRAIN mode of a module none of them trains (a frozen
  teacher: :meth:`Hook._waits`), unless that module's next forward comes first.
* A submodule called outside a forward of a registered module (``model.decode(z)``)
  is captured only between the step's first forward and its end; otherwise it is
  skipped, with one warning per submodule (it is no step's).
* A forward run during a backward pass is activation checkpointing's recomputation
  (``torch.utils.checkpoint``, ``gradient_checkpointing_enable()``) of a call already
  captured: it is not captured again (it made ``outputs/b`` ``outputs/b:0`` and ``:1``).
  A reentrant checkpoint of the whole model runs its first forward under ``no_grad``: a TRAIN forward.
* Forwards run for a tracer (``torch.compile``, ``torch.jit.trace`` and its check, ``torch.export``) or
  inside a ``torch.func`` transform (its tensors are wrappers living in it) are no training calls: they
  open no step and are not captured (one warning each way).
* Parameters of the attached optimizers that change between two backwards of a TRAIN step in which
  none of them stepped are updated by an optimizer not attached (one that replaced the attached one):
  one warning (:meth:`Hook._check_unattached_update`); :meth:`Hook.detach_optimizer` lets go of the old.
* A step is recorded when the next one begins, or at :meth:`Hook.close`.

Values
------
Parameters and submodules are named as :meth:`Hook._follow_modules` finds them in the
registered modules when a saved step opens (a head replaced, a parametrization or a
parameter group added after registration or attach_optimizer is followed).
Weights and biases are read when the step is recorded (after the update).
Gradients are each optimizer's parameters' ``p.grad`` as its ``step()``
sees them (after accumulation, clipping, unscaling; under DDP, averaged);
with a closure (LBFGS), after the first evaluation of the closure in its
``step()`` (the gradients the step starts from), for each optimizer;
without an optimizer, each parameter's ``p.grad`` after the step's last
backward, read when the step is recorded (after clipping; as that backward
left it if it was zeroed in place since: :class:`_Gradient`), or the gradient
the step's last ``torch.autograd.grad`` returned for it. The loss is
the scalar tensor ``backward()`` is called on (``losses/loss``; with several
optimizers ``losses/<optimizer name>``), or ``torch.autograd.grad`` differentiates
in a step it trains, unless it was named by a registered
loss module or :meth:`Hook.record_loss`; each scalar of several given to one
``backward`` (``torch.autograd.backward([loss_a, loss_b])``). A loss whose graph
reaches our parameters only through reentrant checkpoints is recognized when
the checkpoint's own backward reaches them (:meth:`Hook._on_inner_backward`).
"""

from __future__ import annotations

import inspect
import os
import sys
import threading
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Container, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import CodeType, FrameType
from typing import Any

import numpy as np
import torch
import torch.utils.checkpoint
from torch import nn
from torch.utils.hooks import RemovableHandle

from ...exceptions import StopTrainingRequested
from ...modes import Mode
from .. import core
from ..session import MAX_CALLS, Session, leaves
from ..stop import agreed
from ..writer import logger, registered_for_exit
from . import patches
from .ops import TorchOps

__all__ = ["Hook", "capture"]


def _in_backward() -> bool:
    """Whether autograd is running a backward pass on this thread (as ``torch.utils.checkpoint``, which
    recomputes forwards in it, asks)."""
    return bool(torch._C._current_graph_task_id() != -1)


_REENTRANT_NODE = torch.utils.checkpoint.CheckpointFunction._backward_cls
"""The autograd node of a reentrant ``checkpoint(fn, x, use_reentrant=True)``: it links to ``x`` only, not to the
parameters ``fn`` runs with (its backward recomputes ``fn`` and runs a backward of its own through them)."""
_CHECKPOINT_CODE = torch.utils.checkpoint.CheckpointFunction.forward.__code__
_SEQUENTIAL_CODE = torch.utils.checkpoint.checkpoint_sequential.__code__
# the deepest a submodule's outputs/inputs hook calls below torch's frames (Hook._on_io down to the session)
_HOOK_FRAMES = 16
# torch.jit.trace's check_trace, which runs the module itself (under no_grad) to compare with the trace
_CHECK_TRACE_CODE = inspect.unwrap(torch.jit._trace._check_trace).__code__
# torch.func.functional_call's (and torch.nn.utils.stateless's) call of the module with other tensors put in it
_FUNCTIONAL_CALL_CODE = torch.nn.utils.stateless._functional_call.__code__


def _called_from(code: CodeType, depth: int = 40) -> bool:
    """Whether a function of code ``code`` is among the ``depth`` callers of the caller (a frame walk: call it
    only off the common path)."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and depth:
        if frame.f_code is code:
            return True
        frame, depth = frame.f_back, depth - 1
    return False


def _is_wrapped(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``torch.func`` transform's wrapper tensor (``BatchedTensor``, ``GradTrackingTensor``)."""
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))


def _in_transform() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``, ...) is running: its tensors are wrappers that
    live only in it."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def _unseen() -> bool:
    """Whether a forward runs for ``torch.compile``, ``torch.export`` or ``torch.jit.trace``, not for training."""
    return bool(torch.compiler.is_compiling() or torch.jit.is_tracing())


def _differentiated(tensors: Any) -> list[torch.Tensor]:
    """The tensors ``torch.autograd.backward(tensors)`` differentiates: one tensor, or each of a sequence."""
    given = tensors if isinstance(tensors, (tuple, list)) else (tensors,)
    return [t for t in given if isinstance(t, torch.Tensor) and t.grad_fn is not None]


def unwrap(module: nn.Module) -> nn.Module:
    """The user's module inside torch.compile / DistributedDataParallel / DataParallel / Lightning Fabric wrappers."""
    while True:
        # torch.compile's OptimizedModule; Fabric's _FabricModule (fabric.setup), whose _forward_module may
        # be the module inside a strategy's wrapper (DDP)
        inner = module._orig_mod if _compiled(module) else getattr(module, "_original_module", None)
        if isinstance(inner, nn.Module):
            module = inner
        elif isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            module = module.module
        else:
            return module


def _called(module: nn.Module) -> nn.Module:
    """The module of ``module`` that every forward through it calls: ``module``, or the ``_forward_module`` of
    Lightning Fabric's ``_FabricModule`` (the model, or the strategy's wrapper of it: DDP, ``torch.compile``).
    Fabric runs ``training_step``-like methods (``mark_forward_method``, a LightningModule's steps) through the
    wrapper's ``forward()`` without calling the wrapper, so hooks on the wrapper would miss them."""
    inner = getattr(module, "_forward_module", None)
    if isinstance(inner, nn.Module) and isinstance(getattr(module, "_original_module", None), nn.Module):
        return inner
    return module


def _state(optimizer: torch.optim.Optimizer) -> Mapping[Any, Mapping[str, Any]]:
    """The per-parameter state of ``optimizer``: its ``state``, or that of the optimizer of this rank's partition
    for a ``ZeroRedundancyOptimizer`` (``.optim``), whose own ``state`` stays empty."""
    inner = getattr(optimizer, "optim", None)
    return inner.state if isinstance(inner, torch.optim.Optimizer) and not optimizer.state else optimizer.state


def _compiled(module: nn.Module) -> bool:
    """Whether ``module`` is the wrapper ``torch.compile`` made (``OptimizedModule``; its module is imported
    once anything was compiled)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return eval_frame is not None and isinstance(module, eval_frame.OptimizedModule)


def compiled_paths(module: nn.Module) -> frozenset[str]:
    """The ``named_modules()`` names of the submodules of ``module`` that ``torch.compile`` wrapped (``""``:
    ``module`` itself)."""
    return frozenset(name for name, sub in module.named_modules() if _compiled(sub))


def saved_name(name: str, compiled: Container[str]) -> str:
    """A ``named_parameters()`` or ``named_modules()`` name as tensortap saves it: without the ``_orig_mod``
    part under each submodule compiled with ``torch.compile`` (its name in ``compiled``,
    :func:`compiled_paths`), so that a model compiled part by part has the names of the model uncompiled, as
    one compiled whole has (:func:`unwrap`): ``net._orig_mod.weight`` of ``model.net = torch.compile(model.net)``
    is ``net.weight``. An ``_orig_mod`` of a module that was not compiled stays.
    """
    if "_orig_mod" not in name:
        return name
    parts = name.split(".")
    return ".".join(p for i, p in enumerate(parts) if p != "_orig_mod" or ".".join(parts[:i]) not in compiled)


def saved_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``module.named_parameters()``, each under its :func:`saved_name`."""
    compiled = compiled_paths(module)
    return [(saved_name(name, compiled), p) for name, p in module.named_parameters()]


def optimized_parameters(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    """The parameters ``optimizer`` updates, group by group."""
    return (p for group in optimizer.param_groups for p in group["params"])


def _inner_optimizer(optimizer: Any, where: str) -> torch.optim.Optimizer:
    """The torch optimizer that runs step hooks, inside the wrappers training frameworks hand out.

    accelerate's ``AcceleratedOptimizer`` (``accelerator.prepare``, the Hugging Face Trainer's
    callbacks), Lightning's ``LightningOptimizer`` and Fabric's optimizer pass an
    ``isinstance(torch.optim.Optimizer)`` check but are not the object ``step()`` runs the hooks
    of; each exposes the optimizer it wraps as ``.optimizer``. A sharpness-aware optimizer (SAM,
    ASAM as github.com/davda54/sam writes them) holds the optimizer that updates the parameters as
    ``.base_optimizer``, over the same parameter groups, and steps it from ``second_step()`` (the
    training loop never calls its own ``step()``, whose hooks would never run): it is unwrapped too.

    Raises
    ------
    TypeError
        ``optimizer`` is not a torch optimizer, or one without torch's step hooks (a subclass
        whose ``__init__`` skips ``Optimizer.__init__``) that wraps none under ``.optimizer``.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{where}: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    given = optimizer
    while True:
        inner = getattr(optimizer, "optimizer", None)
        base = getattr(optimizer, "base_optimizer", None)
        if isinstance(base, torch.optim.Optimizer) and base.param_groups is optimizer.param_groups:
            inner = base
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            break
        optimizer = inner
    hooks = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks")
    if not all(isinstance(getattr(optimizer, h, None), dict) for h in hooks):
        raise TypeError(
            f"{where}: {type(given).__name__} is a torch.optim.Optimizer without torch's step hooks (its __init__ "
            "does not call Optimizer.__init__) and wraps no optimizer as .optimizer; pass the optimizer it wraps"
        )
    return optimizer


def _edge_parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The first and the last trainable parameter ``optimizer`` updates (a scan from each end, which stops at
    the first found)."""
    groups = optimizer.param_groups
    first = next((p for g in groups for p in g["params"] if p.requires_grad), None)
    last = next((p for g in reversed(groups) for p in reversed(g["params"]) if p.requires_grad), None)
    return [p for p in (first, last) if p is not None]


def _is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` or one of its submodules was compiled with ``torch.compile`` or in place
    (``module.compile()``)."""
    return any(_compiled(m) or getattr(m, "_compiled_call_impl", None) is not None for m in module.modules())


def _is_sharded(module: nn.Module) -> bool:
    """Whether FSDP shards ``module`` or a part of it (``fully_shard``, ``FullyShardedDataParallel``): it
    puts unsharded parameters in the modules for each forward and frees them after it."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing is sharded (importing it takes seconds)
    if fsdp is None:
        return False
    return any(isinstance(m, (fsdp.FSDPModule, fsdp.FullyShardedDataParallel)) for m in module.modules())


def parameter_collection(name: str) -> str:
    """``biases`` for a parameter whose last name part contains ``bias``, ``weights`` otherwise.

    A parametrized tensor's parameters (``fc.parametrizations.bias.original``, ``original0``, ...)
    go where the tensor they make would go.
    """
    parts = name.split(".")
    last = parts[-2] if len(parts) > 2 and parts[-3] == "parametrizations" else parts[-1]
    return "biases" if "bias" in last else "weights"


def _holder(names: Sequence[str]) -> str:
    """The deepest module holding every one of the parameters ``names`` (``actor`` for ``actor.0.weight``
    and ``actor.2.bias``; "" for the module they are named in)."""
    common: list[str] = []
    for level in zip(*(name.split(".")[:-1] for name in names), strict=False):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common)


def _distributed_rank() -> int | None:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    return None


def all_reduce_max() -> Callable[[int], int] | None:
    """torch.distributed's all-reduce (max of one integer), or None outside a process group of 2+."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None

    def all_reduce_max(flag: int) -> int:
        t = torch.tensor([flag], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    return all_reduce_max


def _snapshot(t: Any) -> Any:
    """A copy of a tensor (or of a NumPy array given to ``save_tensor``) that later in-place changes miss."""
    if isinstance(t, np.ndarray):
        return t.copy()
    return t.detach().clone() if isinstance(t, torch.Tensor) else t


def _storage(t: torch.Tensor) -> Any:
    """The storage of ``t`` (one Python object per storage, shared by its views), or None where it has none
    that Python can hold (a sparse tensor, a tensor subclass without storage)."""
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def _reaches(loss: torch.Tensor, params: Container[int]) -> bool | None:
    """Whether the autograd graph of ``loss`` leads to one of ``params``: the ids of leaf tensors, and of
    the nodes that made tensors that are not leaves (weights computed by another network and put in the
    model by ``torch.func.functional_call``).

    Breadth first: the last layer's parameters, next to the loss, end the search early.

    Returns
    -------
    bool or None
        None where the graph leads to none of ``params`` but goes through a reentrant checkpoint
        (``_REENTRANT_NODE``), which hides the parameters it runs with: its own backward tells.
    """
    seen: set[Any] = set()
    todo = deque([loss.grad_fn])
    hidden = False
    while todo:
        node = todo.popleft()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf
        if id(node) in params or (variable is not None and id(variable) in params):
            return True
        hidden = hidden or isinstance(node, _REENTRANT_NODE)
        todo.extend(n for n, _ in node.next_functions)
    return None if hidden else False


def _prehook_outputs(output: Any, prehook: Callable[[Any], None]) -> bool:
    """Register ``prehook`` on the autograd nodes that made the tensors of ``output`` (each node once), to learn
    when a backward uses them; whether there was any (none under ``no_grad``)."""
    nodes = {t.grad_fn for t in leaves(output, torch.is_tensor) if t.grad_fn is not None}
    for node in nodes:
        node.register_prehook(prehook)
    return bool(nodes)


@dataclass
class _Forward:
    """A top-level forward of a registered module in a saved TRAIN step that goes on after it.

    A pre-hook on the autograd nodes that made its outputs (this object) says when a backward uses
    them; the nodes are not held here (they hold the forward's graph, activations included).
    """

    root: str
    start: int  # the session's mark when it began: its calls, and its loss's, come after
    followed: bool = False  # its outputs came out of autograd nodes (else, under no_grad, no backward can use them)
    used: bool = False  # a backward went through them

    def __call__(self, grad_outputs: Any) -> None:
        self.used = True


@dataclass
class _OwnStep:
    """A top-level TRAIN forward with gradients in a step that ends with it (no optimizer attached, no
    explicit steps). A pre-hook on the autograd nodes that made its outputs (this object) tells the hook when a
    backward uses them (:meth:`Hook._on_own_step_used`): in a later step, the model ran several times before one
    backward. The hook is held weakly, the nodes not at all (they hold the forward's graph)."""

    hook: weakref.ref[Hook]
    root: str
    step: int  # the step it was recorded as

    def __call__(self, grad_outputs: Any) -> None:
        hook = self.hook()
        if hook is not None:
            hook._on_own_step_used(self)


@dataclass
class _Root:
    module: nn.Module  # the inner module (unwrapped)
    name: str  # outputs/<name> for its own outputs
    prefix: str  # "" or "<name>." before parameter and submodule names
    sharded: bool  # by FSDP (_is_sharded)
    # its submodules now, by their name now (a replaced head is no longer here)
    names: weakref.WeakKeyDictionary[nn.Module, str] = field(default_factory=weakref.WeakKeyDictionary)
    frames: int = 1  # the frames its hooks add to its forward (patches.lend_frames): one a hooked nesting level
    trained: bool = False  # an attached optimizer updates one of its parameters (as last followed)
    post: RemovableHandle | None = None  # the handle of its outputs hook, on the module registered (wrapper too)
    lent: list[int] = field(default_factory=list)  # frames lent by each of its forwards in progress, innermost last
    # its hooks were traced into code torch.compile compiled (Hook.on_tap_traced): "tap", or "untraced" for
    # patches.Untraced ones (it was compiled in place before registration); "" if not
    traced: str = ""


@dataclass(frozen=True)
class _Call:
    """A call the hook was told began (a forward of a registered module, an optimizer's ``step()``) and is
    told ended by a hook torch runs after it, but for a ``KeyboardInterrupt`` (Ctrl-C, a notebook's
    "interrupt") in a forward, or any exception in a ``step()``: torch runs no hook then. The frame
    that runs the call, held for the while, tells whether it is still on its thread's stack."""

    frame: FrameType
    thread: int

    @classmethod
    def of_caller(cls) -> _Call:
        """The call that runs the hook method calling this (through a :class:`patches.Tap`: its caller's caller)."""
        return cls(sys._getframe(3), threading.get_ident())

    def runs_caller(self) -> bool:
        """Whether this is the call that runs the hook method calling this (as :meth:`of_caller` takes it)."""
        return sys._getframe(3) is self.frame

    def left(self) -> bool:
        """Whether the call is over though no hook said so: its thread is this one and its frame is no
        longer on the stack (one of another thread is taken as running, as before)."""
        if self.thread != threading.get_ident():
            return False
        frame: FrameType | None = sys._getframe(1)
        while frame is not None:
            if frame is self.frame:
                return False
            frame = frame.f_back
        return True


class Unfinished(Exception):
    """Why a step is dropped that a forward or an optimizer ``step()`` left without the hooks torch runs
    after it (a ``KeyboardInterrupt``): found at the next forward."""


@dataclass
class _Optimizer:
    optimizer: torch.optim.Optimizer
    name: str
    handles: list[Any] = field(default_factory=list)  # its step hooks
    held: int | None = None  # its parameter count when each was found held (Hook._warn_unheld), until a change
    warned_unsaved: bool = False  # state it holds that is not saved was named (Hook._save_optimizer_state)


@dataclass
class _Gradient:
    """A parameter's gradient at its last accumulation in a step without an optimizer.

    An update of the user's own reads ``p.grad`` after changes in place that follow the
    backward (``clip_grad_norm_``, an all-reduce), then usually sets it to ``None``
    (``model.zero_grad()``): the tensor is held to be read when the step ends, as the update
    applied it. A tensor zeroed in place since (``p.grad.zero_()``,
    ``zero_grad(set_to_none=False)``) no longer holds that: then the copy taken at the
    accumulation is saved (as the backward left it).
    """

    grad: torch.Tensor  # the tensor p.grad was
    version: int  # its version counter then
    accumulated: torch.Tensor  # a copy of its value then

    def applied(self) -> torch.Tensor:
        """The gradient as the step's update read it, as far as it can still be told."""
        if self.grad._version == self.version or bool(self.grad.any()):
            return self.grad
        return self.accumulated


class Hook(core.Hook):
    """Capture a PyTorch training: module, loss, backward and optimizer events.

    Parameters
    ----------
    out_dir
        Local directory or fsspec URL of the trial.
    weights_rank0_only
        Under ``torch.distributed``, save weights and biases (identical on every
        DDP rank) from rank 0 only; other ranks still save gradients, losses, outputs.
    raise_on_stop
        Raise :class:`tensortap.StopTrainingRequested` when a training step ends
        once a stop request is found in the trial (the hook is closed first).
        Under ``torch.distributed`` every rank raises at the same step: they
        agree every :attr:`stop_sync_steps` training steps with one all-reduce.
        Otherwise poll :attr:`should_stop` yourself.
    explicit_steps
        Only :meth:`finish_step` ends TRAIN steps (not forwards, not optimizer steps).
    max_calls
        Calls of one module per step saved in full (``outputs/<name>:<i>``); of
        later calls, only the last one (see :mod:`tensortap.capture.session`).
    **kwargs
        Everything :class:`tensortap.capture.Hook` takes (``save_config``,
        ``include_collections``, ``reduction_config``, ``include_workers``, ``strict``, ...).
        ``rank`` defaults to ``torch.distributed.get_rank()`` when a process group exists. Give
        ``world_size=torch.distributed.get_world_size()`` when every rank makes a hook, so that a live
        reader waits for a rank that starts capturing late (not by default: see the core hook).
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
        explicit_steps: bool = False,
        max_calls: int = MAX_CALLS,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("rank") is None:
            kwargs["rank"] = _distributed_rank()
        super().__init__(out_dir, **kwargs)
        self.session = Session(self, torch.is_tensor, snapshot=_snapshot, max_calls=max_calls)
        self.session.at_finish(self._save_step_end)
        self.weights_rank0_only = bool(weights_rank0_only)
        self.raise_on_stop = bool(raise_on_stop)
        self._explicit_mode: Mode | None = None
        self._explicit_steps = bool(explicit_steps)
        self._roots: list[_Root] = []
        self._params: dict[str, torch.Tensor] = {}
        self._param_ids: dict[int, str] = {}
        # what a loss's graph leads to when it trains them: ids of leaf parameters, and of the nodes (held
        # here) that made the others
        self._graph_ids: dict[int, Any] = {}
        self._optimizers: list[_Optimizer] = []
        self._handles: list[Any] = []
        # only while no optimizer is attached: id(parameter) -> (its tensor's _cdata when hooked, its hook's
        # handle); no reference to the parameter, not even a weak one: swap_tensors refuses a tensor that has one
        self._grad_handles: dict[int, tuple[int, RemovableHandle]] = {}
        self._loss_name = "loss"
        # registered loss modules, by the prefix of their parameters' names ("<name>."): theirs are saved too
        self._loss_modules: dict[str, nn.Module] = {}
        self._warned_unheld = False
        self._depth = 0
        self._forward_call: _Call | None = None  # the outermost forward of a registered module in progress
        self._forward_root: _Root | None = None  # the module of that forward
        # submodules with an outputs/inputs hook (one each, whatever the registered modules holding it), by the
        # name they had when hooked
        self._hooked: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()
        self._forward_count = 0  # outermost forwards of registered modules begun
        self._warned_unseen: set[str] = set()  # the ways (torch.compile, jit.trace, export) warned about
        # calls traced where the graph may not break, whose values are lost (on_tap_traced, on_grad_traced):
        # "losses/<name>" of a registered loss module, "torch.autograd.grad"; each warned about once
        self._traced_calls: set[str] = set()
        self._warned_traced: set[str] = set()
        self._warned_transform = False
        self._checking = 0  # depth of the forwards of registered modules torch.jit.trace's check runs
        self._warned_sequential = False
        self._warned_grad_unread = False
        self._warned_copied = False
        self._closed = False
        # the open step
        self._ended_by_optimizer = False  # pending because its optimizers (or hook.finish_step()) ended it
        self._tentative = False  # opened by a value alone: takes the mode of the next forward
        # forwards in it, before its mode was decided, of modules no attached optimizer trains: id(root) -> their mode
        self._waiting: dict[int, Mode] = {}
        self._follow_again = False  # its parameters were read outside a forward or in a functional_call
        self._untrained: list[str] = []  # names followed in a functional_call as tensors no attached optimizer updates
        self._warned_untrained = False
        self._given_unsaved = False  # a value given in it while it was not saved (a tentative step's)
        self._warned_relabel = False
        self._warned_eval_training = False
        self._warned_outside: set[str] = set()  # submodules called outside a forward of their root
        self._warned_foreign: set[str] = set()  # registered loss modules called on another model's outputs
        self._ever_forwarded = False  # a registered module's forward has run (else calls of its parts are no step's)
        self._forwarded = self._trained = False
        self._stepped: dict[int, int] = {}  # optimizers (by id) that stepped in it: how many times
        self._stepping = False  # an attached optimizer's step() is running (LBFGS's closure backwards)
        self._step_call: _Call | None = None  # that step() call
        # at its last backward: attached optimizer steps in it, versions of some of their parameters
        self._versions: tuple[int, tuple[int, ...]] | None = None
        self._warned_unattached = False
        self._warned_unscaled = False  # a step the GradScaler skipped was named
        self._changes = 0  # of those versions between backwards with no attached optimizer step between them
        # losses of the backward in progress that reach our parameters only through reentrant checkpoints
        self._hidden: list[torch.Tensor] = []
        # losses backward() was called on (or autograd.grad), not yet named: (the tensor, weakly; its value)
        self._backward: list[tuple[weakref.ref[torch.Tensor], torch.Tensor]] = []
        self._named: dict[int, torch.Tensor] = {}  # tensors the user named (registered loss, record_loss)
        self._scaled: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # scaled loss -> (it, the loss)
        self._grad_stash: dict[str, _Gradient] = {}
        # its forwards, while it goes on after them and saves calls (a batch skipped between them is told apart)
        self._forwards: list[_Forward] = []
        self._forward_start: int | None = None  # the session's mark at the forward in progress
        # while it saves losses: the storages of its forwards' outputs, weakly, by id (their views share them)
        self._output_storages: dict[int, weakref.ref[Any]] = {}
        self._loss_calls: dict[int, int] = {}  # id(loss module) -> _forward_count at its last call saved in it
        self._warned_unused: set[str] = set()  # roots with a forward nothing trained on, warned about
        self._warned_split = False  # a backward went through a forward recorded as an earlier step of its own
        # per-step switches, each one boolean test in the hooks
        self._io = self._losses = self._stash_grads = False
        patches.attach(self)

    @classmethod
    def _kwargs_from_json(cls, data: Any) -> dict[str, Any]:
        own = ("weights_rank0_only", "raise_on_stop", "explicit_steps", "max_calls")
        if not isinstance(data, dict):
            return super()._kwargs_from_json(data)
        kwargs = super()._kwargs_from_json({k: v for k, v in data.items() if k not in own})
        return kwargs | {k: data[k] for k in own if k in data}

    # ----------------------------------------------------------- registration
    def captures(self, module: nn.Module) -> bool:
        """Whether ``module`` (unwrapped) is registered with this hook."""
        return any(r.module is module for r in self._roots)

    def register_module(self, module: nn.Module, name: str | None = None) -> None:
        """Capture ``module``: parameters, gradients, and outputs/inputs when those collections are saved.

        A compiled (``torch.compile``), DDP, DataParallel or Lightning Fabric module is unwrapped for naming
        (Fabric's: also for its forwards, :func:`_called`);
        names are those of ``named_parameters()`` / ``named_modules()`` of the inner module.
        The first module registered without ``name`` keeps these names; a module given a
        ``name``, and every later module, has them prefixed with ``<name>.`` (default: its
        class name), so that two networks (a GAN) never share a name.
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"register_module: expected a torch.nn.Module, got {type(module).__name__}")
        inner = unwrap(module)
        if self.captures(inner):
            raise ValueError(f"register_module: {type(inner).__name__} is already registered")
        root_name = name or type(inner).__name__
        prefix = f"{root_name}." if name or self._roots else ""
        if any(r.prefix == prefix for r in self._roots) or prefix in self._loss_modules:
            raise ValueError(f"register_module: the name {root_name!r} is taken; give another with name=")
        if _is_compiled(module) and self.session.may_save("outputs", "inputs"):
            warnings.warn(
                f"tensortap: {type(inner).__name__} is compiled with torch.compile; outputs and inputs of its "
                "submodules are not captured inside compiled code (weights, gradients, losses and the model's "
                "own outputs are)",
                UserWarning,
                stacklevel=2,
            )
        if next(inner.parameters(), None) is None and next(inner.children(), None) is None:
            logger.warning(
                "tensortap: register_module: %s has no parameters and no submodules, so no weights or gradients "
                "of it are captured, only its own forward's outputs and inputs (networks held in a Python list "
                "or dict are not submodules: hold them in nn.ModuleList or nn.ModuleDict, or register each)",
                root_name,
            )
        for other in registered_for_exit():  # every hook of this process
            if isinstance(other, Hook) and other is not self and not other._closed and other.captures(inner):
                logger.warning(
                    "tensortap: %s is captured already by an open hook, which writes %s (a cell run again?): both "
                    "record its steps from now on; close that hook first (hook.close())",
                    root_name,
                    other.out_dir,
                )
        root = _Root(inner, root_name, prefix, _is_sharded(inner))
        if root.sharded:
            logger.warning(
                "tensortap: %s is sharded by FSDP, which tensortap does not support: its parameters and gradients "
                "(DTensors) are skipped and its losses are not recognized; outputs and values you give are captured",
                root.name,
            )
        self._roots.append(root)
        called = _called(module)
        self._handles.append(patches.on_forward(called, patches.Tap(self, Hook._on_root_pre, root), pre=True))
        root.post = patches.on_forward(
            called, patches.Tap(self, Hook._on_root_post, root), with_kwargs=True, always_call=True
        )
        self._handles.append(root.post)
        self._follow_modules()

    def _follow_modules(self) -> None:
        """Take the registered modules' parameters and submodules as they are now.

        Run at registration, when an optimizer is attached and when a saved step opens (or has its
        first forward, which ``torch.func.functional_call`` may run with other tensors: then again at
        the step's next forward, :meth:`_follows`): a submodule replaced after registration
        (``model.fc = nn.Linear(...)`` to fine-tune), a parametrization (``weight_norm``, ``prune``)
        or a parameter added later is captured under its name from then on, and a parameter no
        longer in the model is no longer saved. A parameter shared by two places (tied embeddings)
        is saved once, under its first name; so are a registered loss module's own trainable parameters,
        under ``<its name>.``. A submodule of several registered modules gets one outputs hook (its calls
        are named by :meth:`_on_io`). Not in a forward of a module FSDP shards: the
        parameters it holds then are freed after it.
        """
        if self._depth and any(r.sharded for r in self._roots):
            return
        substituted = bool(self._depth) and _called_from(_FUNCTIONAL_CALL_CODE)
        self._follow_again = not self._forwarded and (substituted or not self._depth)
        updated = {id(p) for att in self._optimizers for p in optimized_parameters(att.optimizer)}
        before = dict(self._params)
        self._params.clear()
        self._param_ids.clear()
        self._graph_ids.clear()
        self._untrained = []
        for root in self._roots:
            compiled = compiled_paths(root.module)
            root.trained = False
            for pname, found in saved_parameters(root.module):
                name = root.prefix + pname
                p = self._follows(name, found, before, updated, substituted)
                if p is not None and id(p) not in self._param_ids:  # else shared with a module registered before
                    self._params[name] = p
                    self._param_ids[id(p)] = name
                    node = p if p.grad_fn is None else p.grad_fn
                    self._graph_ids[id(node)] = node
                    root.trained = root.trained or id(p) in updated
            if self.session.may_save("outputs", "inputs"):  # no hook at all otherwise: PyTorch's dispatch costs too
                root.names.clear()
                for raw, sub in root.module.named_modules():
                    # the root: its outputs are taken by _on_root_post; a compiled submodule's own module: by the
                    # compiled wrapper's hooks, under the same name
                    parent, _, last = raw.rpartition(".")
                    if not raw or (last == "_orig_mod" and parent in compiled):
                        continue
                    root.names[sub] = root.prefix + saved_name(raw, compiled)
                    # a frame for the root, one a level down to this one, and the hook's own at the last
                    root.frames = max(root.frames, 1 + raw.count(".") + 1 + _HOOK_FRAMES)
                    if sub not in self._hooked:
                        self._hooked[sub] = root.names[sub]
                        tap = patches.Tap(self, Hook._on_io)
                        self._handles.append(patches.on_forward(sub, tap, with_kwargs=True))
        # a loss module's parameters an attached optimizer trains (uncertainty weighting's log variances), not a
        # feature network's (LPIPS, a perceptual loss): requires_grad alone does not tell them, such a network is
        # often never frozen
        for prefix, loss in self._loss_modules.items():
            for pname, p in saved_parameters(loss):
                if id(p) in updated and id(p) not in self._param_ids:  # else a registered module holds it too
                    self._params[prefix + pname] = p
                    self._param_ids[id(p)] = prefix + pname
        if self._param_ids.keys() != {id(p) for p in before.values()}:
            for att in self._optimizers:
                att.held = None
        if not self._optimizers and self.session.may_save("gradients"):
            self._hook_gradients()

    def _follows(
        self,
        name: str,
        found: torch.Tensor,
        before: dict[str, torch.Tensor],
        updated: Container[int],
        substituted: bool,
    ) -> torch.Tensor | None:
        """The tensor saved under the parameter name ``name``: ``found`` in the module now, or ``known``, the one
        followed under that name before (in ``before``); ``updated``: ids of the attached optimizers' parameters.

        In a ``torch.func`` transform, ``found`` is a wrapper living in it: ``known``. In a forward run by
        ``functional_call`` with other tensors (``substituted``), ``known`` (the module's own parameter) where an
        attached optimizer updates it or ``found`` is computed from it (MAML's fast weights, a clone), as the
        loss trains it through them; ``found`` otherwise (the trained ``params`` of a functional training,
        weights a hypernetwork computes). A leaf ``found`` that no attached optimizer updates, taken for a
        trainable ``known`` (EMA weights), is listed in :attr:`_untrained` (warned about when the step ends).
        """
        known = before.get(name)
        if _is_wrapped(found):
            return known
        if not substituted or known is None or known is found:
            return found
        if id(known) in updated or (id(found) not in updated and _reaches(found, (id(known),))):
            return known
        if self._optimizers and found.grad_fn is None and id(found) not in updated and known.requires_grad:
            self._untrained.append(name)
        return found

    def _hook_gradients(self) -> None:
        """Without an optimizer: a gradient hook on each trainable leaf parameter that has none yet (a lazy
        parameter once its first forward gave it a shape, which may be after the step opened), or whose tensor
        ``torch.utils.swap_tensors`` replaced since (``model.to(torch.float64)`` under
        ``torch.__future__.set_swap_module_params_on_conversion(True)``: :func:`patches.rearm_after_accumulation`)."""
        for param in self._params.values():
            if not (param.requires_grad and param.is_leaf and not nn.parameter.is_lazy(param)):
                continue
            held = self._grad_handles.get(id(param))
            if held is None or not patches.hooks_after_accumulation(held[1], param):
                handle = patches.after_accumulation(param, patches.Tap(self, Hook._on_grad))
            elif held[0] != param._cdata:
                patches.rearm_after_accumulation(param)
                handle = held[1]
            else:
                continue
            self._grad_handles[id(param)] = (param._cdata, handle)

    def register_loss(self, loss: nn.Module | Callable[..., Any], name: str | None = None) -> None:
        """Name a loss.

        An ``nn.Module`` loss: its output is saved as ``losses/<name>`` (default: its class
        name; ``losses/<name>:0``, ``:1``, ... when called several times in one step), and its own
        parameters that an attached optimizer trains (the log variances of uncertainty weighting; not those
        of a feature network such as a perceptual loss's, frozen or not) as a registered module's, under
        ``<name>.`` (``UncertaintyLoss.log_var``, its gradient ``gradients/UncertaintyLoss.log_var``).
        Without an attached optimizer, none of its parameters is saved.
        A function (``F.nll_loss``): the loss ``backward()`` is called on is saved as
        ``losses/<name>`` (default: the function's name) instead of ``losses/loss``.

        Raises
        ------
        ValueError
            ``loss`` has parameters and a registered module's names begin with ``<name>.``.
        """
        if isinstance(loss, nn.Module):
            loss_name = name or type(loss).__name__
            prefix = f"{loss_name}."
            trained = next(loss.parameters(), None) is not None
            if trained and any(r.prefix == prefix for r in self._roots):
                raise ValueError(f"register_loss: the name {loss_name!r} is taken; give another with name=")
            self._handles.append(
                patches.on_forward(loss, patches.Tap(self, Hook._on_loss_module, f"losses/{loss_name}"))
            )
            if trained:
                self._loss_modules[prefix] = loss
                self._follow_modules()
        elif callable(loss):
            self._loss_name = name or getattr(loss, "__name__", None) or "loss"
        else:
            raise TypeError(f"register_loss: expected a torch.nn.Module or a function, got {type(loss).__name__}")

    def attach_optimizer(self, optimizer: torch.optim.Optimizer, name: str | None = None) -> None:
        """Let ``optimizer.step()`` end training steps; save its state as ``optimizer/<param>/<key>``
        (``torch.optim.LBFGS``'s, the whole optimizer's: ``optimizer/<name>/<key>``).

        Several optimizers (a GAN): a training step ends when each has stepped.
        ``name`` names the losses differentiated before its step when there are several
        (``losses/<name>``); default: the registered module its parameters belong to, or, when it
        updates part of that module's trainable parameters, the submodule holding them (an actor-critic
        module's ``actor`` and ``critic`` optimizers).
        A wrapper that training frameworks hand out (accelerate's ``AcceleratedOptimizer``,
        Lightning's ``LightningOptimizer``) is unwrapped to the optimizer it wraps, a SAM optimizer to its
        ``base_optimizer`` (:func:`_inner_optimizer`). Two optimizers with one default name (one replacing
        the other) are told apart by the later one's class name (``Linear_SGD``). If attaching
        fails (``TypeError``, ``ValueError``), the hook is left as it was.
        """
        optimizer = _inner_optimizer(optimizer, "attach_optimizer")
        if any(o.optimizer is optimizer for o in self._optimizers):
            raise ValueError("attach_optimizer: this optimizer is already attached")
        att = _Optimizer(optimizer, name or self._default_name(optimizer))
        # nothing above changed the hook; nothing below fails (_inner_optimizer checked the hooks)
        att.handles = [
            optimizer.register_step_pre_hook(patches.Tap(self, Hook._on_optimizer_pre, att)),
            optimizer.register_step_post_hook(patches.Tap(self, Hook._on_optimizer_post, att)),
        ]
        self._handles += att.handles
        self._optimizers.append(att)
        for _, handle in self._grad_handles.values():  # gradients are read from p.grad at optimizer.step() now
            handle.remove()
        self._grad_handles.clear()
        self._follow_modules()  # the model may have changed since registration (a new head to fine-tune)
        self._warn_shared_parameters(att)

    def detach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Stop following ``optimizer``, attached before: its steps no longer end training steps.

        For an optimizer replaced mid-training (Adam, then SGD): ``hook.detach_optimizer(adam)``, then
        ``hook.attach_optimizer(sgd)``; otherwise the steps wait for the replaced one, which never steps
        again. With no optimizer attached any more, a training step is one forward of the model.

        Raises
        ------
        ValueError
            ``optimizer`` is not attached.
        """
        inner = _inner_optimizer(optimizer, "detach_optimizer")
        att = next((o for o in self._optimizers if o.optimizer is inner), None)
        if att is None:
            raise ValueError("detach_optimizer: this optimizer is not attached")
        for handle in att.handles:
            handle.remove()
            self._handles.remove(handle)
        self._optimizers.remove(att)
        self._stepped.pop(id(att), None)
        self._versions = None
        self._follow_modules()  # without optimizers: gradients by their hooks again

    def _default_name(self, optimizer: torch.optim.Optimizer) -> str:
        """:meth:`_owner_name`, or, when an attached optimizer has it (the one ``optimizer`` replaces), that
        with ``optimizer``'s class name added (``Linear_SGD``)."""
        name = self._owner_name(optimizer)
        taken = {att.name for att in self._optimizers}
        if name in taken:
            name = f"{name}_{type(optimizer).__name__}"
        unique, n = name, 1
        while unique in taken:
            n += 1
            unique = f"{name}{n}"
        return unique

    def _updated(self, att: _Optimizer) -> dict[str, torch.Tensor]:
        """The registered parameters ``att`` updates, by name."""
        named = ((self._param_ids.get(id(p)), p) for p in optimized_parameters(att.optimizer))
        return {name: p for name, p in named if name is not None}

    def _warn_unheld(self, att: _Optimizer, count: int) -> None:
        """Once: ``att`` trains parameters that no registered module (nor registered loss module) holds (a
        learnable temperature made as a loose ``nn.Parameter``): they are not saved. Looked at as gradients are
        offered, after the step's first forward has followed what a ``functional_call`` puts in the model.
        ``count``: how many parameters ``att`` updates; with none unheld, not looked at again until that or the
        parameters followed change (:attr:`_Optimizer.held`)."""
        unheld = [p for p in optimized_parameters(att.optimizer) if p.requires_grad and id(p) not in self._param_ids]
        if not unheld:
            att.held = count
            return
        self._warned_unheld = True
        shapes = ", ".join(str(list(p.shape)) for p in unheld[:5]) + (", ..." if len(unheld) > 5 else "")
        logger.warning(
            "tensortap: optimizer %s trains %d parameter(s) that no registered module holds (shapes %s): their "
            "weights and gradients are not saved. Hold them in a module and register it: "
            "hook.register_module(module, name=...) (a loss module's: hook.register_loss(module))",
            att.name,
            len(unheld),
            shapes,
        )

    def _warn_shared_parameters(self, att: _Optimizer) -> None:
        """Warn if ``att`` updates parameters an attached optimizer updates too: a step ends when each has
        stepped, so one that never steps (a second optimizer made for the same model) merges every step."""
        updated = self._updated(att)
        for other in self._optimizers:
            if other is att:
                continue
            theirs = self._updated(other)
            shared = [name for name in updated if name in theirs]
            if shared:
                logger.warning(
                    "tensortap: optimizer %s updates parameters that the attached optimizer %s updates too (%s); "
                    "a training step ends when each attached optimizer has stepped, so if one of them never "
                    "steps, all steps merge into one: attach only the optimizer that steps",
                    att.name,
                    other.name,
                    ", ".join(shared[:3]) + (", ..." if len(shared) > 3 else ""),
                )
                return

    def _owner_name(self, optimizer: torch.optim.Optimizer) -> str:
        """The registered module whose parameters ``optimizer`` updates; if it updates part of its trainable
        ones, the deepest submodule holding them all (``actor``; ``D.actor`` in a module registered as ``D``)."""
        ids = {id(p) for p in optimized_parameters(optimizer)}
        for root in self._roots:
            trainable = [(name, id(p) in ids) for name, p in saved_parameters(root.module) if p.requires_grad]
            updated = [name for name, mine in trainable if mine]
            if not updated:
                continue
            holder = _holder(updated) if len(updated) < len(trainable) else ""
            return root.prefix + holder if holder else root.name
        return f"optimizer{len(self._optimizers)}"

    # ----------------------------------------------------------------- modes
    def set_mode(self, mode: Mode | str) -> None:
        """Set the mode of the steps that follow; ``model.train()``/``eval()`` are no longer followed.

        A step opened by a value alone takes this mode; any other open step ends here.
        """
        self._explicit_mode = Mode.parse(mode)
        if self.session.is_open and self._tentative:
            self._relabel(self._explicit_mode)
        elif self.session.is_open:
            self._finish()
        super().set_mode(self._explicit_mode)

    def _detect_mode(self, module: nn.Module | None = None) -> Mode:
        if self._explicit_mode is not None:
            return self._explicit_mode
        if module is None and self._roots:
            module = self._roots[0].module
        if module is not None and not module.training:
            return Mode.EVAL
        # a reentrant checkpoint of the model (checkpoint(model, x, use_reentrant=True)) runs it under no_grad
        return Mode.TRAIN if torch.is_grad_enabled() or _called_from(_CHECKPOINT_CODE) else Mode.EVAL

    def _spans_forwards(self) -> bool:
        """Whether the open step goes on after a forward: a TRAIN step that optimizers or hook.finish_step() end."""
        return self.mode == Mode.TRAIN and (bool(self._optimizers) or self._explicit_steps)

    # ----------------------------------------------------------------- steps
    def finish_step(self) -> None:
        """End the current training step (custom loops, several optimizers).

        Pass ``explicit_steps=True`` to the hook so that only this ends TRAIN steps from
        the first step on; without it, from its first call on (with a warning: the steps
        before were ended by forwards or optimizer steps). ``hook.step`` is the number of
        the current step.
        """
        if not self._explicit_steps:
            self._explicit_steps = True
            logger.warning(
                "tensortap: finish_step() called on a hook made without explicit_steps=True: steps %s were "
                "ended by forwards or optimizer steps, the next ones end at finish_step() only",
                f"0..{self.step}",
            )
        if self.session.is_open:
            self._end()
            self._ended_by_optimizer = True
            self._step_ended()

    def _end(self) -> None:
        """The open step is over: it is recorded when the next one opens, at :meth:`close`, or at interpreter
        exit, on SIGTERM or after an exception (:attr:`end_at_exit`, which :meth:`close_for_exit` calls)."""
        self.session.end()
        self.end_at_exit = self._end_at_exit

    def _end_at_exit(self) -> None:
        """Record the step that ended, unless a forward of a registered module is in progress."""
        if not self._depth:
            self._finish()

    def _open(self, mode: Mode, tentative: bool = False) -> None:
        self._finish()
        if self._closed:
            return
        saved = self.session.open(mode)
        self._ended_by_optimizer = self._forwarded = self._trained = False
        self._tentative = tentative
        self._given_unsaved = False
        self._stepped.clear()
        self._versions = None
        if saved:
            self.session.guard(self._follow_modules)  # at a forward: a failure must not stop the training
            self._read_switches()
            if self._io:
                self.session.guard(self._run_taps_last)

    def _run_taps_last(self) -> None:
        """Put the outputs hooks after the forward hooks registered since on the same modules: a hook of the
        user's that returns a new value replaces the call's output, and ``outputs/<module>`` is the value
        the call returned (what the next module receives), whichever hook was registered first."""
        for root in self._roots:
            if root.post is not None:  # set as it is registered
                patches.run_last(root.post.hooks_dict_ref(), self)
        for sub in list(self._hooked):
            patches.run_last(sub._forward_hooks, self)

    def _read_switches(self) -> None:
        """The per-step switches of what the open step saves."""
        s = self.session
        self._io = s.saving("outputs", "inputs")
        self._losses = s.saving("losses")
        self._stash_grads = s.saving("gradients") and not self._optimizers

    def _relabel(self, mode: Mode) -> None:
        """The open tentative step takes ``mode`` (its first forward's, or ``set_mode``'s), and what that
        mode saves at it; warns (once) if values given in it before were lost to that."""
        before = self.mode
        self.relabel_step(mode)
        self._read_switches()
        if self._given_unsaved and self.is_saving() and not self._warned_relabel:
            self._warned_relabel = True
            logger.warning(
                "tensortap: values given with save_scalar/save_tensor/record_loss at step %d before its forward "
                "were not saved: they were given when it would be an unsaved %s step, and it became %s step %d, "
                "which is saved; call hook.set_mode() before giving them to save them",
                self.step,
                before.name,
                self.mode.name,
                self.mode_step,
            )

    def _ensure_open(self, tentative: bool = True) -> None:
        """A step for a value given now: the open one, unless its optimizers or hook.finish_step() ended it
        or it ended in another mode than the current one."""
        s = self.session
        if not s.is_open or self._ended_by_optimizer or s.pending:  # else the open step takes it, whatever the mode
            mode = self._detect_mode()
            if not s.is_open or self._ended_by_optimizer or mode != self.mode:
                self._open(mode, tentative=tentative)
        if self._tentative and not self.is_saving():
            self._given_unsaved = True

    def _decide_mode(self) -> None:
        """A backward or an optimizer step trains the open step: one that a value given opened, whose mode no
        forward decided yet (none came, or none was seen: a model not registered, its ``forward()`` called
        directly), takes the mode of that training, as it would take its first forward's."""
        if self._tentative and not self._waiting and (mode := self._detect_mode()) != self.mode:
            self._relabel(mode)
        self._tentative = False

    def _finish(self) -> None:
        """Record the open step (if any)."""
        if not self.session.is_open:
            return
        if self._tentative and self._waiting:  # no forward of a trained module came: they ran alone
            self._relabel(next(iter(self._waiting.values())))
        if (
            self.mode == Mode.TRAIN
            and self._explicit_mode is None
            and self._forwarded
            and not (self._trained or self._backward)
        ):
            self.relabel_step(Mode.PREDICT)  # a forward in train mode that nothing trained on
        self._io = self._losses = self._stash_grads = False
        if self._forwards:  # none where the step was not saved
            self.session.guard(self._forget_unused)
        self.session.finish()
        self._clear_step()

    def _drop(self, why: BaseException) -> None:
        """Drop the open step, which ``why`` interrupted (a forward or a backward that raised).

        A loop that catches the error and goes on (an out-of-memory batch skipped) would
        otherwise keep that batch's outputs in the step of the next one, as a second call
        (``outputs/fc:0`` beside ``outputs/fc:1``). The step's number is not reused: the next
        forward opens the step after it. One warning names the step (when it was saved).
        """
        if not self.session.is_open:
            return
        self._io = self._losses = self._stash_grads = False
        self.session.drop(why)
        self._clear_step()

    def _clear_step(self) -> None:
        """Forget what the step just recorded or dropped gathered."""
        self.end_at_exit = None
        self._backward.clear()
        self._hidden = []
        self._named.clear()
        self._scaled.clear()
        self._grad_stash.clear()
        self._forwards.clear()
        self._forward_start = None
        self._waiting.clear()
        self._output_storages.clear()
        self._loss_calls.clear()

    def _forget_unused(self) -> None:
        """Drop what the step holds of forwards that no backward used before a later forward's was.

        A loop that skips a batch after its forward (``if not loss.isfinite(): continue``, a loss
        that raised and was caught) runs the next batch's forward in the same training step: the
        skipped batch's outputs, inputs and named losses would be saved with it as a first call
        (``outputs/fc:0`` beside ``outputs/fc:1``), and the values given after its forward
        (``save_tensor``; held while that forward's fate is open: :meth:`_fate_open`) in the trained
        batch's step. They are not saved, with a warning per module (then at INFO). A forward no
        backward used after the last one used is kept: it is part of the step (a target computed
        with gradients on, then detached).
        """
        used = [i for i, f in enumerate(self._forwards) if f.used]
        if not used:
            return
        for i, f in enumerate(self._forwards[: used[-1]]):
            if f.used or not f.followed or not self.session.forget(f.start, self._forwards[i + 1].start):
                continue
            log = logger.info if f.root in self._warned_unused else logger.warning
            self._warned_unused.add(f.root)
            log(
                "tensortap: step %d: a forward of %s was followed by another before any backward used its "
                "outputs (a batch skipped with `continue`, a loss that raised and was caught, or a sample drawn "
                "with gradients on, as netG(fixed_noise)?); its outputs, "
                "inputs and named losses, and the values given with save_scalar/save_tensor/record_loss after it, "
                "are not saved: the step keeps those of the forward trained on. Run forwards that are not trained "
                "on under torch.no_grad() to save them (later cases: at INFO)",
                self.step,
                f.root,
            )

    def _fate_open(self) -> bool:
        """Whether what is offered now may yet be forgotten (:meth:`_forget_unused`): it comes in or after a
        tracked forward that no backward has used yet."""
        if self._forward_start is not None:
            return True
        return bool(self._forwards) and self._forwards[-1].followed and not self._forwards[-1].used

    def _track_forward(self, root: _Root, output: Any, start: int) -> None:
        """Follow the top-level forward that began at mark ``start`` and just ended: a pre-hook on the
        autograd nodes of its outputs."""
        forward = _Forward(root.name, start)
        forward.followed = _prehook_outputs(output, forward)
        self._forwards.append(forward)

    def _track_own_step(self, root: _Root, output: Any) -> None:
        """Follow the TRAIN forward of ``root`` that just ended its step (it does not span forwards): a pre-hook
        on the autograd nodes of its outputs (:class:`_OwnStep`), until :meth:`_on_own_step_used` warns."""
        _prehook_outputs(output, _OwnStep(weakref.ref(self), root.name, self.step))

    def _on_own_step_used(self, forward: _OwnStep) -> None:
        """A backward (or ``autograd.grad``) went through the outputs of ``forward``: when it was recorded as a
        step before the one in progress, the model ran several times before one backward (an RNN cell called
        once per character), each call a step of its own. Warned once: a step is one forward here."""
        if self._warned_split or self._closed or forward.step >= self.step:
            return
        self._warned_split = True
        logger.warning(
            "tensortap: a backward at step %d went through the outputs of a forward of %s recorded as step %d: the "
            "model was called several times before one backward (an RNN called once per character?), and without "
            "an optimizer attached each call is recorded as a step of its own (%s), with its outputs and losses; "
            "the backward's step holds the last call's only. Attach the optimizer (hook.attach_optimizer(optimizer)) "
            "if there is one, or use ttt.capture(..., explicit_steps=True) and call hook.finish_step() after each "
            "update: one TRAIN step per iteration, with every call's losses",
            self.step,
            forward.root,
            forward.step,
            "a PREDICT step, as nothing trained on it yet" if self._explicit_mode is None else self.mode.name,
        )

    def _save_step_end(self) -> None:
        """At a saved step's end: losses not yet named, parameters, stashed gradients, optimizer state."""
        self._name_backward_losses(self._loss_name)
        if self._untrained and not self._warned_untrained:
            self._warned_untrained = True
            logger.warning(
                "tensortap: step %d: the registered model ran through torch.func.functional_call with tensors that "
                "no attached optimizer updates, in place of trainable parameters (%s): those tensors are saved as "
                "its weights, without gradients; attach the optimizer that trains the model",
                self.step,
                ", ".join(self._untrained[:3]) + (", ..." if len(self._untrained) > 3 else ""),
            )
        s = self.session
        if not (self.weights_rank0_only and self.rank != 0) and s.saving("weights", "biases"):
            s.offer_many((name, p, (parameter_collection(name),)) for name, p in self._params.items())
        s.offer_many((f"gradients/{name}", g.applied(), ("gradients",)) for name, g in self._grad_stash.items())
        if s.saving("optimizer_variables"):
            for att in self._optimizers:
                self._save_optimizer_state(att)

    def _save_optimizer_state(self, att: _Optimizer) -> None:
        """Offer the state of ``att``: a parameter's as ``optimizer/<parameter name>/<key>``, LBFGS's (the whole
        optimizer's) as ``optimizer/<optimizer name>/<key>``. A number (Python's or a NumPy scalar) is saved as a
        tensor of no dimension; a value neither a tensor, a number nor ``None`` (LBFGS's history: lists of tensors;
        an int beyond int64) is named in one warning per optimizer."""
        optimizer = att.optimizer
        state = _state(optimizer)
        if isinstance(optimizer, torch.optim.LBFGS):
            # torch's LBFGS keeps all its state on its first parameter (self.state[self._params[0]]): directions
            # and gradients flat over every parameter it updates, its history and counters; no parameter's own.
            # Told by the type, not by shapes: Adafactor's row and column factors, of other shapes than their
            # parameter's, are that parameter's own
            first = next(optimized_parameters(optimizer), None)
            owned: list[tuple[str | None, Mapping[str, Any]]] = [(att.name, state.get(first, {}))]
        else:
            owned = [(self._param_ids.get(id(p)), values) for p, values in state.items()]
        unsaved = []
        for owner, values in owned:
            if owner is None:  # a parameter no registered module holds
                continue
            for key, v in values.items():
                if isinstance(v, (int, float, np.generic)):  # bool too; NumPy's scalars
                    number = np.asarray(v)  # an int beyond int64 is an object: not saved, named below
                    v = number if number.dtype.kind in "biuf" else v
                if isinstance(v, (torch.Tensor, np.ndarray)):
                    self.session.offer(f"optimizer/{owner}/{key}", v, ("optimizer_variables",))
                elif v is not None:
                    unsaved.append(f"optimizer/{owner}/{key} ({type(v).__name__})")
        if unsaved and not att.warned_unsaved:
            att.warned_unsaved = True
            logger.warning(
                "tensortap: the state of optimizer %s holds values that are neither tensors nor numbers, not saved: %s",
                att.name,
                ", ".join(unsaved[:5]) + (", ..." if len(unsaved) > 5 else ""),
            )

    def _name_backward_losses(self, name: str) -> None:
        """Offer the losses ``backward()`` was called on since the last naming as ``losses/<name>``."""
        losses, self._backward = self._backward, []
        for ref, value in losses:
            tensor = ref()
            if tensor is None or id(tensor) not in self._named:
                self.session.offer_call(f"losses/{name}", value, ("losses",))

    def _step_ended(self) -> None:
        if self.raise_on_stop and agreed(
            self.mode_step, self.stop_sync_steps, self.stop_channel, self.stop_poll_seconds, all_reduce_max()
        ):
            reason = self.stop_reason or "requested on another rank"
            self.close()
            raise StopTrainingRequested(f"tensortap: a stop was requested for {self.out_dir}: {reason}")

    # ------------------------------------------------------------ hook bodies
    def _on_root_pre(self, root: _Root, module: nn.Module, args: Any) -> None:
        if not torch.compiler.is_dynamo_compiling():  # Dynamo cannot trace the lock, nor runs these frames
            root.lent.append(root.frames)
            patches.lend_frames(root.frames)
        if _unseen():  # compiled, traced or exported after registration: these hooks run once, for the tracer
            self._warn_unseen(root.module)
            return
        if self._checking or (not torch.is_grad_enabled() and _called_from(_CHECK_TRACE_CODE)):
            self._checking += 1  # torch.jit.trace's check of its trace: no training call either
            return
        if _in_backward():
            return
        if _in_transform():
            self._warn_transform(root.name)
            return
        self._recover(root)
        self._depth += 1
        if self._depth > 1 or self._closed:
            return
        self._forward_call, self._forward_root = _Call.of_caller(), root
        patches.follow_imports()  # accelerate imported after the hook opened: its backward(loss), before it is called
        mode = self._detect_mode(root.module)
        s = self.session
        waits = self._waits(root, mode)
        if waits and (not s.is_open or s.pending or self._tentative):
            self._wait(root, mode)
        elif not s.is_open or s.pending:
            self._open(mode)
        elif self._tentative and mode != self.mode:
            self._relabel(mode)
        elif mode != self.mode and not self._spans_forwards():
            self._open(mode)
        elif self._follow_again and self.is_saving():
            # read before this forward (when a value given opened the step), or in a first one run by
            # torch.func.functional_call(model, params, x), which puts params in the model for the call only
            self.session.guard(self._follow_modules)
        if not waits:  # its mode decided
            self._tentative = False
            self._waiting.clear()
        self._forwarded = self._ever_forwarded = True
        self._forward_count += 1
        if self.is_saving() and self._spans_forwards():
            # the outputs of a forward before may be no backward's (a batch skipped): this one's calls are held apart
            self._forward_start = self.session.mark(apart=any(f.followed and not f.used for f in self._forwards))
        else:
            self._forward_start = None

    def _on_root_post(self, root: _Root, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if root.lent and not torch.compiler.is_dynamo_compiling():
            patches.return_frames(root.lent.pop())
        if _unseen() or _in_backward() or _in_transform():
            return
        if self._checking:
            self._checking -= 1
            return
        self._depth = max(self._depth - 1, 0)
        if not self._depth or (self._forward_call is not None and self._forward_call.runs_caller()):
            # ended, though a forward of another thread may still run (nested as before)
            self._forward_call = self._forward_root = None
        if self._depth or not self.session.is_open or self._closed:
            return
        error = sys.exc_info()[1]
        if output is None and isinstance(error, Exception):  # the forward raised (torch's always_call)
            self._drop(error)
            return
        if self._io and output is not None:
            self.session.guard(self._capture_io, root.name, args, kwargs, output)
        if self._losses and output is not None:
            self.session.guard(self._keep_output_storages, output)
        if self._forward_start is not None:
            self.session.guard(self._track_forward, root, output, self._forward_start)
            self._forward_start = None
        elif not self._warned_split and self.mode == Mode.TRAIN and torch.is_grad_enabled():
            self.session.guard(self._track_own_step, root, output)
        if not (self._spans_forwards() or self._waiting):
            self._end()

    def _waits(self, root: _Root, mode: Mode) -> bool:
        """Whether a forward of ``root`` in ``mode`` (not TRAIN, as ``model.train()`` and grad mode tell) leaves
        the mode of the step it opens to the next forward of a module an attached optimizer trains: a frozen
        teacher's (``teacher.eval()``, ``no_grad``), or one of ``root``'s run by ``functional_call`` with tensors
        no attached optimizer updates (an EMA teacher)."""
        if mode == Mode.TRAIN or self._explicit_mode is not None or not self._optimizers:
            return False
        if not root.trained:
            return any(r.trained for r in self._roots)
        first = next(root.module.parameters(), None)
        return first is not None and id(first) not in self._param_ids and _called_from(_FUNCTIONAL_CALL_CODE)

    def _wait(self, root: _Root, mode: Mode) -> None:
        """Run a forward that :meth:`_waits` (``root``'s, in ``mode``) in a tentative step: one it opens, or the
        open one, in the mode the trained modules are in (``train()``: TRAIN; else EVAL). The next forward of
        one of them decides its mode (the teacher's outputs are in the training step that used them, the
        validation steps are numbered as the student's forwards); a second forward of ``root`` in it (a model
        evaluated alone) ends it, in ``mode``, and runs in the next."""
        guess = Mode.TRAIN if any(r.module.training for r in self._roots if r.trained) else Mode.EVAL
        if not self.session.is_open or self.session.pending or id(root) in self._waiting:
            self._open(guess, tentative=True)
        elif not self._waiting:  # opened by a value given
            self._relabel(guess)
        self._waiting.setdefault(id(root), mode)

    def _recover(self, root: _Root) -> None:
        """Forget the forward and the optimizer ``step()`` in progress that an exception left without the
        hooks torch runs after them (a ``KeyboardInterrupt`` in a forward: a notebook's "interrupt"), and
        drop the step they were part of: else every later forward would count as nested in the one left
        (no step opened, no output taken) and the next iteration would merge into the step (``:0``/``:1``).
        Called by the forward of a registered module that comes next (``root``'s)."""
        left = []
        if self._depth and self._forward_call is not None and self._forward_call.left():
            left.append("a forward of a registered module")
            self._depth, self._forward_call, self._forward_root = 0, None, None
            current = root.lent.pop()  # lent by this forward; those of the forwards left go back
            for r in self._roots:
                while r.lent:
                    patches.return_frames(r.lent.pop())
            root.lent.append(current)
        if self._stepping and self._step_call is not None and self._step_call.left():
            left.append("an optimizer's step()")
            self._stepping, self._step_call = False, None
        if left and self.session.is_open:
            self._drop(Unfinished(f"{' and '.join(left)} did not return (Ctrl-C?)"))

    def on_tap_traced(self, tap: patches.Tap) -> None:
        """``tap`` was traced into code ``torch.compile`` compiled that may have no graph break (the model called
        in a function compiled with ``fullgraph=True``): the root it is of, or the registered loss module it is on,
        is flagged (Dynamo sets the flag again at each run of the compiled code), and :meth:`_warn_traced` tells of
        it from eager code (a warning or a lock here would fail the compile: the training). An optimizer's step
        hooks never are: its ``step()`` breaks the graph (torch's own ``graph_break()``). ``torch.export``'s strict
        mode keeps no flag (it replays no side effects, and says so): its forwards, run for the tracer, are no
        training calls anyway."""
        if tap.fn is Hook._on_root_pre:
            tap.bound[0].traced = "untraced" if isinstance(tap, patches.Untraced) else "tap"
        elif tap.fn is Hook._on_loss_module:
            self._traced_calls.add(tap.bound[0])

    def on_grad_traced(self) -> None:
        """``torch.autograd.grad`` was traced where the graph may not break: the losses and gradients it returns
        there are not captured, :meth:`_warn_traced` tells of it (as :meth:`on_tap_traced`)."""
        self._traced_calls.add("torch.autograd.grad")

    def _warn_traced(self) -> None:
        """Warn about the roots :meth:`on_tap_traced` flagged (once per way) and the calls it and
        :meth:`on_grad_traced` flagged (once each): called from eager code, at each backward, optimizer step and
        at :meth:`close`."""
        for root in self._roots:
            if root.traced:
                self._warn_unseen(root.module, root.traced)
        for call in sorted(self._traced_calls - self._warned_traced):
            self._warned_traced.add(call)
            if call == "torch.autograd.grad":
                what = "torch.autograd.grad was called in code torch.compile compiled with fullgraph=True"
                lost = (
                    "the losses and gradients it returned there are not captured (nor, without an attached "
                    "optimizer, the steps they trained)"
                )
            else:
                loss = call.removeprefix("losses/")
                what = f"the loss {loss} (register_loss) was called in code torch.compile compiled with fullgraph=True"
                lost = f"its values there are not saved as {call} (one a backward() is called on: as losses/loss)"
            warnings.warn(
                f"tensortap: {what}; {lost}: tensortap's hooks do not run there. To capture them, call it outside "
                "the compiled function",
                UserWarning,
                stacklevel=2,
            )

    def _warn_unseen(self, inner: nn.Module, traced: str = "") -> None:
        """Once per way: the registered ``inner`` is compiled, traced or exported; what that makes runs without
        these hooks. ``traced``: how :meth:`on_tap_traced` found its hooks traced into compiled code (told from
        eager code, after it)."""
        before = (
            "Compile it before registering it: model.compile(), then hook.register_module(model), or "
            "hook.register_module(torch.compile(model))"
        )
        outside = "To capture them, call it outside the compiled function"
        tracer = (
            "The forwards of the tracer are not training calls and are not captured either; train the module itself "
            "to capture its outputs"
        )
        if traced == "untraced":
            how, what = "compiled in place with its compile() method", "its forwards in a compiled function calling it"
            advice = outside
        elif torch.compiler.is_exporting():
            how, what = "exported with torch.export", "the exported program's runs"
            advice = tracer
        elif torch.jit.is_tracing():
            how, what = "traced with torch.jit.trace", "the traced module's forwards"
            advice = tracer
        elif getattr(inner, "_compiled_call_impl", None) is not None:  # model.compile() since: our hooks traced
            how, what = "compiled in place with its compile() method after register_module()", "its forwards"
            advice = before
        else:  # a compiled function calling it (fullgraph=True too), or torch.compile(model) since
            how = "called in code compiled with torch.compile (a compiled function, or torch.compile(model) since)"
            what, advice = "its forwards there", f"{outside}, or compile the model itself. {before}"
        if how in self._warned_unseen:
            return
        self._warned_unseen.add(how)
        warnings.warn(
            f"tensortap: {type(inner).__name__} was {how}; {what} are not seen, tensortap's hooks do not run in "
            f"compiled or traced code (no outputs or inputs; without an attached optimizer, no steps). {advice}",
            UserWarning,
            stacklevel=2,
        )

    def _on_io(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        """A call of a submodule: saved once, under its name in the registered module whose forward runs
        (``A.enc`` of an encoder two registered models share, called in A's), else, called outside such a
        forward (by the loop, or in the forward of a registered module not holding it), under its first name."""
        if not self._io or _unseen() or _in_backward() or self._checking:
            return
        running = self._forward_root
        if running is not None and module is running.module:
            return  # a registered module held by another, called by the loop: its _on_root_post takes the call
        name = running.names.get(module) if running is not None else None
        if name is None:  # called outside a forward of a registered module holding it: its first name
            name = next((r.names[module] for r in self._roots if module in r.names), None)
        if _in_transform():
            self._warn_transform(name or self._hooked[module])
        elif name is None:
            self._warn_removed(self._hooked[module], module)
        elif not self._depth and (self.session.pending or not self._forwarded):
            self._warn_outside_forward(name)
        else:
            self.session.guard(self._capture_io, name, args, kwargs, output)

    def _warn_removed(self, name: str, module: nn.Module) -> None:
        """Once per submodule: one no longer in its registered module (a head replaced to fine-tune, still
        called as a teacher) is not captured: under its old name it would merge with its replacement's calls."""
        if name in self._warned_outside or any(r.module is module for r in self._roots):
            return  # a module registered itself is captured as such
        self._warned_outside.add(name)
        logger.warning(
            "tensortap: submodule %s was called at step %d after it was replaced or removed from the registered "
            "module; its calls are not captured (they would merge with the outputs of what is %s now). "
            "To capture them, register it: hook.register_module(module, name=...)",
            name,
            self.step,
            name,
        )

    def on_tap_error(self, error: Exception) -> None:
        """One of this hook's taps raised ``error``: capture is disabled and the training goes on, unless it is
        the stop that ``raise_on_stop`` asked for, or ``strict=True``."""
        if isinstance(error, StopTrainingRequested) or self.strict:
            raise error
        self.fail(error, f"capture failed at step {self.step}")

    def on_tap_copied(self, tap: patches.Tap, target: Any) -> None:
        """``tap``, a forward hook of this hook's, was copied onto the module ``target``, which replaced the one
        it is on (``torch.ao.quantization``'s ``fuse_modules``, ``prepare_qat``): the copy does nothing, as
        ``target`` has, or gets when the next saved step opens, a hook of its own (the copy would capture its
        calls twice, or under the name of the module replaced). A module whose hooks were moved (cleared:
        the last of the modules fused, now inside the fused one) is hooked again then. One warning."""
        if self._closed:
            return
        on = tap.on() if tap.on is not None else None
        if on is not None and tap not in on._forward_hooks.values():
            self._hooked.pop(on, None)
        if not self._warned_copied:
            self._warned_copied = True
            name = next((r.names[target] for r in self._roots if target in r.names), "a module")
            logger.warning(
                "tensortap: %s (a %s) carries a copy of a forward hook that tensortap put on the module it replaced "
                "(torch.ao.quantization's fuse_modules and prepare_qat copy them so); the copy is ignored: outputs "
                "and inputs are those of the modules in the model, each under its name in it (a fused module's "
                "under the name of the first module fused), from the next saved step on",
                name,
                type(target).__name__,
            )

    def _warn_outside_forward(self, name: str) -> None:
        """Once per submodule: a call outside a forward of a registered module is skipped unless the step in
        progress has had a forward and has not ended (recorded in an ended step, it renamed its outputs)."""
        if _called_from(_SEQUENTIAL_CODE):
            if not self._warned_sequential:
                self._warned_sequential = True
                logger.warning(
                    "tensortap: torch.utils.checkpoint.checkpoint_sequential called %s, a part of a registered "
                    "module, without that module's forward: outputs and inputs of submodules are captured only in "
                    "a forward of a registered module, so none is (weights, gradients and losses are). To capture "
                    "them, register a module whose forward calls checkpoint_sequential(model, ...) instead",
                    name,
                )
            return
        if not self._ever_forwarded:  # parts of a container called directly (gan.G(z)): one warning for all
            if not self._warned_outside:
                self._warned_outside.add(name)
                direct = self._forward_called_directly()
                if direct is not None:
                    logger.warning(
                        "tensortap: submodule %s was called in %s.forward(...), called directly: PyTorch runs a "
                        "module's hooks only when it is called as %s(...), so no forward of a registered module has "
                        "run, and outputs and inputs of its submodules (and of any other module called so) are not "
                        "captured (weights, gradients and losses are). Call the module, not its forward",
                        name,
                        direct,
                        direct,
                    )
                    return
                logger.warning(
                    "tensortap: submodule %s was called, but no forward of a registered module has run (a "
                    "container of networks, called as model.G(z)?); outputs and inputs of submodules are captured "
                    "only in a forward of a registered module, so none is. Register each network the loop calls "
                    'instead: hook.register_module(model.G, name="G")',
                    name,
                )
            return
        if name in self._warned_outside:
            return
        self._warned_outside.add(name)
        when = "after step %d ended" if self.session.pending else "in step %d before any forward of it"
        logger.warning(
            "tensortap: submodule %s was called outside a forward of the registered module, " + when + " "
            "(sampling with model.decode(z)?); such calls are not captured, in no step. To capture them, call "
            "them inside the module's forward, or between its forward and the end of the step (optimizer.step())",
            name,
            self.step,
        )

    def _forward_called_directly(self) -> str | None:
        """The name of the registered module whose ``forward`` is among the callers, or None (a frame walk: only
        on the way to a warning)."""
        roots = {id(root.module): root.name for root in self._roots}
        frame: FrameType | None = sys._getframe(1)
        for _ in range(40):
            if frame is None:
                break
            if frame.f_code.co_name == "forward" and id(frame.f_locals.get("self")) in roots:
                return roots[id(frame.f_locals["self"])]
            frame = frame.f_back
        return None

    def _capture_io(self, name: str, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        """Outputs and inputs of one call: positional inputs ``inputs/<name>``, keyword ones ``inputs/<name>/<key>``."""
        if self.session.saving("outputs"):
            self.session.offer_call(f"outputs/{name}", output, ("outputs",))
        if self.session.saving("inputs"):
            self.session.offer_call(f"inputs/{name}", args, ("inputs",), keywords=kwargs)

    def _warn_transform(self, name: str) -> None:
        """Once: calls in a ``torch.func`` transform are not captured (its tensors are wrappers that die with it,
        and recording a step in it would read the weights through it)."""
        if not self._warned_transform:
            self._warned_transform = True
            logger.warning(
                "tensortap: %s was called inside a torch.func transform (vmap, grad, jacrev, ...), whose tensors "
                "live only in it: calls of registered modules and their parts inside torch.func transforms are "
                "not captured (no outputs, inputs or registered losses; they open and end no step). Steps end at "
                "optimizer.step(), which saves the weights and the gradients it applies",
                name,
            )

    def _on_loss_module(self, name: str, module: nn.Module, args: Any, output: Any) -> None:
        if self._closed or _in_transform():
            return
        self._ensure_open(tentative=False)
        if self._losses and isinstance(output, torch.Tensor):
            if not self._loss_of_step(module, args, output):
                self._warn_foreign_loss(name)
                return
            self._loss_calls[id(module)] = self._forward_count
            self._named[id(output)] = output
            self.session.guard(self.session.offer_call, name, output, ("losses",))

    def _keep_output_storages(self, output: Any) -> None:
        """Hold (weakly) the storages of the outputs of a forward of a registered module, which ended in the
        open step: a loss module called on them, or on views of them, is a loss of the step."""
        for t in leaves(output, torch.is_tensor):
            storage = _storage(t)
            if storage is not None:
                self._output_storages[id(storage)] = weakref.ref(storage)

    def _loss_of_step(self, module: nn.Module, args: Any, output: torch.Tensor) -> bool:
        """Whether a call of the registered loss ``module`` (``args``, returning ``output``) is a loss of the open
        step: called in a forward of a registered module, in a step without such a forward, after such a forward
        that began since its previous call in the step (forward, then loss), on an output of one of the step's
        forwards or a view of one (losses per time step, per head), or on a loss whose graph leads to a
        registered parameter. Else it is the loss of a model the hook does not capture (a copy made by
        ``torch.load`` or ``copy.deepcopy``, evaluated after the training): saved, it would be another call
        of the step's loss and rename the step's own. The usual calls are told by the first, cheap, tests."""
        if self._depth or not self._forwarded or self._loss_calls.get(id(module), -1) < self._forward_count:
            return True
        for t in leaves(args, torch.is_tensor):
            storage = _storage(t)
            held = self._output_storages.get(id(storage)) if storage is not None else None
            if held is not None and held() is storage:
                return True
        return output.grad_fn is not None and _reaches(output, self._graph_ids) is not False

    def _warn_foreign_loss(self, name: str) -> None:
        """Once per loss: a call :meth:`_loss_of_step` took for another model's loss is not saved."""
        if name in self._warned_foreign:
            return
        self._warned_foreign.add(name)
        logger.warning(
            "tensortap: step %d: the registered loss module saved as %s was called again with no forward of a "
            "registered model since its last call, on tensors that are neither outputs of the step's forwards "
            "(or views of them) nor lead to a registered parameter: the loss of a model tensortap does not "
            "capture (a copy made by torch.load or copy.deepcopy, evaluated after the training?) or of values "
            "computed from several batches' outputs. It is not saved, nor are later such calls (saved, it would "
            "be another call of the step's loss and rename the step's own %s:0). Register that model "
            "(hook.register_module(model, name=...)), give the value with hook.save_scalar, or, for a second use "
            "of the loss on the same outputs under no_grad, register a loss module of its own "
            "(hook.register_loss(module, name=...))",
            self.step,
            name,
            name,
        )

    def _on_grad(self, p: torch.Tensor) -> None:
        if self._stash_grads and (name := self._param_ids.get(id(p))) is not None:
            if p.grad is None:
                self._warn_grad_unread(name)
            else:
                self._stash_gradient(name, p.grad)

    def _warn_grad_unread(self, name: str) -> None:
        """Once: a backward accumulated the gradient of parameter ``name``, and a hook that ran before this
        hook's (:func:`patches.after_accumulation`) set ``p.grad`` to ``None`` (an optimizer stepped in it)."""
        if not self._warned_grad_unread:
            self._warned_grad_unread = True
            logger.warning(
                "tensortap: the gradient of %s was accumulated at step %d, but another hook that runs after "
                "accumulation (p.register_post_accumulate_grad_hook) set p.grad to None before tensortap's could "
                "read it: the step has no gradients/%s (later such gradients are not named). Attach the "
                "optimizers that hook steps (hook.attach_optimizer) to save the gradients they apply",
                name,
                self.step,
                name,
            )

    def _stash_gradient(self, name: str, grad: torch.Tensor) -> None:
        """Hold ``grad``, the gradient of parameter ``name`` that a backward accumulated or ``autograd.grad``
        returned, as the step's (read when the step is recorded: :class:`_Gradient`)."""
        grad = grad.detach()
        self._grad_stash[name] = _Gradient(grad, grad._version, grad.clone())

    # ------------------------------------------------- backward and GradScaler
    def on_backward(self, tensors: Any) -> None:
        """``backward()`` is about to run on ``tensors`` (one tensor or several): each scalar reaching our
        parameters is a loss of the step."""
        self._warn_traced()
        if self._closed or not self._params:
            return
        if _in_backward():  # a reentrant checkpoint's backward through what it recomputed
            self._on_inner_backward(tensors)
            return
        self._hidden = []
        if self._optimizers and not self._warned_unattached:
            self._check_unattached_update()
        if self._stash_grads:
            self.session.guard(self._hook_gradients)
        if not self._losses and self._forwarded and self.session.is_open and not self._ended_by_optimizer:
            self._trained = True  # an unsaved step after our forward: no graph walk
            return
        reached = [(loss, _reaches(loss, self._graph_ids)) for loss in self._losses_of(tensors)]
        self._hidden = [loss for loss, reaches in reached if reaches is None]
        ours = [loss for loss, reaches in reached if reaches]
        if ours:  # else another model's backward, or one through reentrant checkpoints only
            self._train_on(ours)

    def _losses_of(self, tensors: Any) -> list[torch.Tensor]:
        """The losses behind the tensors differentiated: ``scaler.scale(loss)``'s, accelerate's, is ``loss``."""
        return [self._scaled.get(id(t), (t, t))[1] for t in _differentiated(tensors)]

    def on_grad(self, outputs: Any, inputs: Any, grads: Any) -> None:
        """``torch.autograd.grad(outputs, inputs)`` returned ``grads``, which are not differentiated again: a
        call in a TRAIN step, after its forward and before its end, that returns the gradient of a registered
        parameter trains the step, as a ``backward()`` does (a loop that updates the parameters with them:
        ``p -= lr * g``, or ``p.grad = g; optimizer.step()``). Each scalar of ``outputs`` is then a loss of
        the step and, without an optimizer, the gradients returned are the step's, as a backward's are.

        A gradient penalty's call (WGAN-GP: its gradients are differentiated again by the backward that
        trains, ``create_graph=True``) is not told here; an input gradient (adversarial examples, saliency)
        returns none of a parameter; a call in ``eval()``, under ``no_grad`` or after ``set_mode("eval")``
        is in no TRAIN step. The inputs are looked at up to the first registered parameter, each of them
        only in a saved step that holds gradients without an optimizer.
        """
        if (
            self._closed
            or not self._forwarded
            or self.mode != Mode.TRAIN
            or not self.session.is_open
            or self._ended_by_optimizer
        ):
            return
        returned = (
            (name, grad)
            for t, grad in patches.grad_pairs(inputs, grads)
            if grad is not None and (name := self._param_ids.get(id(t))) is not None
        )
        if self._stash_grads:
            found = list(returned)
            for name, grad in found:
                self.session.guard(self._stash_gradient, name, grad)
            trains = bool(found)
        else:  # the first parameter found tells
            trains = next(returned, None) is not None
        if trains:
            self._train_on(self._losses_of(outputs) if self._losses else [])

    def _on_inner_backward(self, tensors: Any) -> None:
        """A backward run inside one (a reentrant checkpoint's, through the forward it recomputed): when it
        reaches our parameters, the losses of the backward around it that reached them through that checkpoint
        only (:attr:`_hidden`) are the step's. Its own tensors are the checkpointed function's outputs, no loss."""
        if any(_reaches(t, self._graph_ids) for t in _differentiated(tensors)):
            hidden, self._hidden = self._hidden, []
            self._train_on(hidden)

    def _train_on(self, losses: list[torch.Tensor]) -> None:
        """A backward (or ``autograd.grad``) of ``losses`` trains our parameters: the step in progress (or a new
        one) is trained, and each scalar of ``losses`` is a loss of it when it saves losses, once (a loss
        whose gradient norm ``autograd.grad(loss, params, retain_graph=True)`` took before its backward)."""
        if not self.session.is_open or self._ended_by_optimizer:
            self._open(self._detect_mode())
        self._trained = True
        self._decide_mode()
        if self._losses:
            known = [ref() for ref, _ in self._backward]
            self._backward += [
                (weakref.ref(loss), loss.detach())
                for loss in losses
                if loss.numel() == 1 and not any(loss is k for k in known)
            ]

    def _check_unattached_update(self) -> None:
        """Warn once when our parameters changed between two backwards of one TRAIN step while no attached
        optimizer stepped: an optimizer that is not attached updates them (one that replaced the attached
        one, a wrapper stepping an optimizer of its own), so the step never ends and every iteration merges
        into it. A parameter's version counter moves at each in-place update (an optimizer's, not one through
        ``.data``); the first and last trainable parameter of each attached optimizer are looked at. Warned
        at the second change: a single one may be part of an update (SAM's ``first_step()`` moves the weights
        before the backward its base optimizer steps on)."""
        if (
            self._explicit_steps
            or self._stepping
            or not self.session.is_open
            or self._ended_by_optimizer
            or self.mode != Mode.TRAIN
        ):
            return
        edges = (p for att in self._optimizers for p in _edge_parameters(att.optimizer))
        seen = (sum(self._stepped.values()), tuple(p._version for p in edges))
        before, self._versions = self._versions, seen
        if before is None or before[0] != seen[0]:
            self._changes = 0
            return
        self._changes += before[1] != seen[1]
        if self._changes < 2:  # once is a change of the weights inside an update (SAM's first_step())
            return
        self._warned_unattached = True
        logger.warning(
            "tensortap: the parameters of optimizer %s changed again and again between the backwards of TRAIN "
            "step %d, but no attached optimizer stepped: an optimizer that is not attached updates them (one "
            "made to replace the attached one, or a wrapper whose step() is not called). A step ends when every "
            "attached optimizer has stepped, so every iteration from now on merges into step %d. Attach the "
            "optimizer that steps, and detach the one it replaces: hook.detach_optimizer(old); "
            "hook.attach_optimizer(new)",
            ", ".join(att.name for att in self._optimizers),
            self.mode_step,
            self.mode_step,
        )

    def on_backward_failed(self, tensors: Any, error: BaseException) -> None:
        """``backward()`` (or ``autograd.grad``) on ``tensors`` raised ``error`` (out of memory, in a loop that
        skips the batch): the step it was to train is dropped, unless the losses were another model's."""
        if self._closed or not self.session.is_open:
            return
        losses = _differentiated(tensors)
        if losses and all(_reaches(loss, self._graph_ids) is False for loss in losses):
            return
        self._drop(error)

    def on_scaled(self, scaled: Any, loss: Any) -> None:
        """``GradScaler.scale(loss)``, or ``Accelerator.backward(loss)``: remember the loss behind the scaled
        tensor backward() will see."""
        if self._losses and isinstance(scaled, torch.Tensor) and isinstance(loss, torch.Tensor):
            self._scaled[id(scaled)] = (scaled, loss)

    def on_scaler_step(self, optimizer: torch.optim.Optimizer, stepped: bool) -> None:
        """``GradScaler.step``: a step it skipped (non-finite gradients) is a step all the same, without
        gradients: it applied none (as a Keras ``LossScaleOptimizer``'s); the first such step is named."""
        if stepped or self._closed:
            return
        for att in self._optimizers:
            if att.optimizer is optimizer:
                self._on_optimizer_pre(att, optimizer, (), {}, offer=False)
                if self.is_saving() and self.session.saving("gradients") and not self._warned_unscaled:
                    self._warned_unscaled = True
                    logger.warning(
                        "tensortap: step %d has no gradients: the GradScaler skipped its optimizer step (the "
                        "gradients were not finite; it lowers its scale and goes on); later such steps are not named",
                        self.step,
                    )
                self._on_optimizer_post(att, optimizer, (), {})

    # ------------------------------------------------------------- optimizers
    def _on_optimizer_pre(
        self, att: _Optimizer, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any, offer: bool = True
    ) -> Any:
        self._warn_traced()
        if self._closed:
            return None
        if not self.session.is_open or self._ended_by_optimizer:
            self._open(self._detect_mode())
        self._decide_mode()
        self._stepping = True
        self._step_call = _Call.of_caller()
        if not (offer and self.is_saving() and self.session.saving("gradients")):  # offer=False: none applied
            return None
        # args: (optimizer, closure?) as step() was called
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if callable(closure):
            wrapped = self._wrap_closure(att, closure)
            if "closure" in kwargs:
                return args, {**kwargs, "closure": wrapped}
            return (args[0], wrapped, *args[2:]), kwargs
        self.session.guard(self._offer_gradients, att)
        return None

    def _wrap_closure(self, att: _Optimizer, closure: Callable[[], Any]) -> Callable[[], Any]:
        """The closure of one ``step()`` call of ``att``, which offers its gradients after its first evaluation.

        Per call, not per step: with several optimizers each stepping with a closure (Lightning's manual
        optimization always passes one), each offers its own parameters' gradients.
        """
        seen = False

        def evaluate() -> Any:
            nonlocal seen
            result = closure()
            if not seen:
                seen = True
                self.session.guard(self._offer_gradients, att)
            return result

        return evaluate

    def _offer_gradients(self, att: _Optimizer) -> None:
        count = sum(len(group["params"]) for group in att.optimizer.param_groups)
        if not self._warned_unheld and att.held != count:
            self._warn_unheld(att, count)
        self.session.offer_many(
            (f"gradients/{name}", p.grad, ("gradients",))
            for name, p in self._updated(att).items()
            if p.requires_grad and p.grad is not None
        )

    def _on_optimizer_post(self, att: _Optimizer, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._stepping, self._step_call = False, None
        if self._closed or not self.session.is_open:
            return
        self._trained = True
        self._stepped[id(att)] = self._stepped.get(id(att), 0) + 1
        if self._losses:
            self._name_backward_losses(att.name if len(self._optimizers) > 1 else self._loss_name)
        if self.mode != Mode.TRAIN:
            self._warn_optimizer_in_eval(att)
        if not self._explicit_steps and len(self._stepped) == len(self._optimizers):
            # an EVAL step too (frozen BatchNorm): else, with no forward seen to end it, all later ones merge in it
            self._end()
            self._ended_by_optimizer = True
            if self.mode == Mode.TRAIN:
                self._step_ended()

    def _warn_optimizer_in_eval(self, att: _Optimizer) -> None:
        """Once: an optimizer stepped in a step recorded as EVAL because the model was in ``eval()`` (or
        gradients were off) and no mode was set: training with frozen BatchNorm makes no TRAIN steps."""
        if self._warned_eval_training or self._explicit_mode is not None or self.mode != Mode.EVAL:
            return
        self._warned_eval_training = True
        logger.warning(
            "tensortap: optimizer %s stepped in step %d, which is recorded as EVAL step %d because the model was "
            "in eval() or gradients were off at its forward (training with frozen BatchNorm?); such steps are "
            'EVAL steps, not TRAIN steps: call hook.set_mode("train") before training to record TRAIN steps',
            att.name,
            self.step,
            self.mode_step,
        )

    # ------------------------------------------------------- user-facing saves
    def save_tensor(self, name: str, value: Any, collections: str | Sequence[str] = ("custom",)) -> None:
        """Save ``value`` as ``name`` on the current step if it is saved (any collections: a name, or a list)."""
        colls = core.collection_names(collections)
        if self._closed:
            return
        self._ensure_open()
        self.note_given(name)
        self.session.give(name, value, colls, held=self._fate_open())

    def save_scalar(self, name: str, value: Any, collections: str | Sequence[str] = ("metrics",)) -> None:
        """Save a scalar as ``<first collection>/<name>`` (``metrics/lr``) on the current step if it is saved."""
        if self._closed:
            return
        self._ensure_open()
        colls = core.collection_names(collections) or ("metrics",)
        if not self.is_saving():
            self.note_given(f"{colls[0]}/{name}")
            return
        if isinstance(value, torch.Tensor):  # as save_tensor takes it: bfloat16, float8 widened, not .numpy()'d
            self.save_tensor(f"{colls[0]}/{name}", value.detach(), colls)
            return
        super().save_scalar(name, value, collections)

    def record_loss(self, value: Any, name: str = "loss") -> None:
        """Save ``value`` (a scalar tensor or number) as ``losses/<name>`` on the current step.

        Several calls with one name in a step give ``losses/<name>:0``, ``:1``, ...
        A tensor recorded here is not saved again as ``losses/loss`` when ``backward()``
        is called on it. A loss recorded after a forward of a TRAIN step makes that step a
        training step, also one with no backward and no optimizer step (not a prediction).
        """
        if self._closed:
            return
        self._ensure_open()
        if self._forwarded and self.mode == Mode.TRAIN:
            self._trained = True  # the loss of a forward of a TRAIN step: it trains (an update of one's own)
        if not self._losses:
            return
        if isinstance(value, torch.Tensor):
            self._named[id(value)] = value
        else:
            value = torch.as_tensor(value)
        self.session.guard(self.session.offer_call, f"losses/{name}", value, ("losses",))

    # ---------------------------------------------------------------- closing
    def _warn_unended(self, recorded: bool) -> None:
        """At close or exit: the open TRAIN step, in which optimizers stepped, did not end because another
        attached optimizer never stepped in it. Optimizers that take turns (pytorch/examples'
        mnist_forward_forward trains each layer with its own optimizer, one layer after the other) have
        their steps merged into a few, which would otherwise go unsaid."""
        if self._explicit_steps or not self._stepped or self.mode != Mode.TRAIN:
            return
        idle = [att.name for att in self._optimizers if id(att) not in self._stepped]
        if not idle:
            return
        stepped = [f"{att.name} ({self._stepped[id(att)]}x)" for att in self._optimizers if id(att) in self._stepped]
        logger.warning(
            "tensortap: TRAIN step %d did not end, and is %s: optimizer %s stepped in it and %s never did; a step "
            "ends when every attached optimizer has stepped, so optimizers that take turns rather than each "
            "stepping in every iteration (one network trained after another) have their steps merged into one "
            "(saved with the gradients of each one's last step). Use ttt.Hook(..., explicit_steps=True) and "
            "hook.finish_step() after each update, or one hook per network; an optimizer replaced by another "
            "one: hook.detach_optimizer(old)",
            self.mode_step,
            "recorded at close()" if recorded else "not recorded at exit",
            ", ".join(stepped),
            ", ".join(idle),
        )

    def close(self, reason: str = "closed") -> None:
        """End the step in progress, remove every hook, publish, mark this worker ended. Idempotent."""
        if not self._closed:
            if self.session.is_open:
                self._warn_unended(recorded=True)
            self._finish()
        self._closed = True
        for handle in self._handles + [h for _, h in self._grad_handles.values()]:
            handle.remove()
        self._handles.clear()
        self._grad_handles.clear()
        for root in self._roots:  # closed in a forward: the post-hook that would take its frames back is gone
            while root.lent:
                patches.return_frames(root.lent.pop())
        patches.detach(self)
        super().close(reason)
        self._warn_traced()  # last: a warning made an error (-W error) leaves the hook closed

    def close_for_exit(self, reason: str, error: str | None = None) -> None:
        """At interpreter exit, on SIGTERM or after an exception: a step that has ended but is not yet recorded
        is recorded (:attr:`end_at_exit`), a step in progress dropped."""
        if self.session.is_open and not self.session.pending and reason == "exit" and not self._closed:
            self._warn_unended(recorded=False)
        self._closed = True
        patches.detach(self)
        super().close_for_exit(reason, error)

    def __enter__(self) -> Hook:
        return self


def capture(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
    loss: nn.Module | Callable[..., Any] | None = None,
    **kwargs: Any,
) -> Hook:
    """One line: a :class:`Hook` registered on ``model``, ``loss`` and ``optimizer`` (or several).

    ``kwargs`` go to :class:`Hook` (``save_config``, ``include_collections``, ...).
    Arguments are checked before anything is attached; if attaching fails, what was
    attached is removed again and the model is left as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"capture: model: expected a torch.nn.Module, got {type(model).__name__}")
    optimizers = [] if optimizer is None else list(optimizer) if isinstance(optimizer, Sequence) else [optimizer]
    optimizers = [_inner_optimizer(opt, "capture: optimizer") for opt in optimizers]
    if loss is not None and not callable(loss):
        raise TypeError(f"capture: loss: expected a torch.nn.Module or a function, got {type(loss).__name__}")
    hook = Hook(out_dir, **kwargs)
    try:
        hook.register_module(model)
        if loss is not None:
            hook.register_loss(loss)
        for opt in optimizers:
            hook.attach_optimizer(opt)
    except BaseException:
        hook.close()
        raise
    return hook

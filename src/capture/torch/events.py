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
* The mode is the one given to :meth:`Hook.set_mode`; until then EVAL when
  the module is in ``eval()`` or gradients are disabled (``no_grad``,
  ``inference_mode``), TRAIN otherwise (an optimizer stepping in such an
  EVAL step is warned about, once: frozen BatchNorm needs ``set_mode``). A
  TRAIN step that saw a forward but no backward and no optimizer step (a
  prediction after training) is recorded as PREDICT. A step opened by a
  value alone (``save_scalar`` before any forward) takes the mode of the
  forward that follows.
* A submodule called outside a forward of a registered module (``model.decode(z)``)
  is captured only between the step's first forward and its end; otherwise it is
  skipped, with one warning per submodule (it is no step's).
* A forward run during a backward pass is activation checkpointing's recomputation
  (``torch.utils.checkpoint``, ``gradient_checkpointing_enable()``) of a call already
  captured: it is not captured again (it made ``outputs/b`` ``outputs/b:0`` and ``:1``).
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
left it if it was zeroed in place since: :class:`_Gradient`). The loss is
the scalar tensor ``backward()`` is called on (``losses/loss``; with several
optimizers ``losses/<optimizer name>``), unless it was named by a registered
loss module or :meth:`Hook.record_loss`.
"""

from __future__ import annotations

import os
import sys
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ...exceptions import StopTrainingRequested
from ...modes import Mode
from .. import core
from ..session import MAX_CALLS, Session, leaves
from ..stop import agreed
from ..writer import logger
from . import patches
from .ops import TorchOps

__all__ = ["Hook", "capture"]


def _in_backward() -> bool:
    """Whether autograd is running a backward pass on this thread (as ``torch.utils.checkpoint``, which
    recomputes forwards in it, asks)."""
    return bool(torch._C._current_graph_task_id() != -1)


def unwrap(module: nn.Module) -> nn.Module:
    """The user's module inside torch.compile / DistributedDataParallel / DataParallel / Lightning Fabric wrappers."""
    while True:
        # torch.compile's OptimizedModule; Fabric's _FabricModule (fabric.setup), whose _forward_module may
        # be the module inside a strategy's wrapper (DDP)
        inner = getattr(module, "_orig_mod", getattr(module, "_original_module", None))
        if isinstance(inner, nn.Module):
            module = inner
        elif isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            module = module.module
        else:
            return module


def _inner_optimizer(optimizer: Any, where: str) -> torch.optim.Optimizer:
    """The torch optimizer that runs step hooks, inside the wrappers training frameworks hand out.

    accelerate's ``AcceleratedOptimizer`` (``accelerator.prepare``, the Hugging Face Trainer's
    callbacks), Lightning's ``LightningOptimizer`` and Fabric's optimizer pass an
    ``isinstance(torch.optim.Optimizer)`` check but are not the object ``step()`` runs the hooks
    of; each exposes the optimizer it wraps as ``.optimizer``.

    Raises
    ------
    TypeError
        ``optimizer`` is not a torch optimizer, or one without torch's step hooks (a subclass
        whose ``__init__`` skips ``Optimizer.__init__``) that wraps none under ``.optimizer``.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{where}: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    given = optimizer
    while isinstance(inner := getattr(optimizer, "optimizer", None), torch.optim.Optimizer) and inner is not optimizer:
        optimizer = inner
    hooks = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks")
    if not all(isinstance(getattr(optimizer, h, None), dict) for h in hooks):
        raise TypeError(
            f"{where}: {type(given).__name__} is a torch.optim.Optimizer without torch's step hooks (its __init__ "
            "does not call Optimizer.__init__) and wraps no optimizer as .optimizer; pass the optimizer it wraps"
        )
    return optimizer


def _is_compiled(module: nn.Module) -> bool:
    return any(isinstance(getattr(m, "_orig_mod", None), nn.Module) for m in module.modules())


def _is_sharded(module: nn.Module) -> bool:
    """Whether FSDP shards ``module`` or a part of it (``fully_shard``, ``FullyShardedDataParallel``): it
    puts unsharded parameters in the modules for each forward and frees them after it."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in module.modules())


def _param_collection(name: str) -> str:
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


def _reaches(loss: torch.Tensor, params: Container[int]) -> bool:
    """Whether the autograd graph of ``loss`` leads to one of ``params``: the ids of leaf tensors, and of
    the nodes that made tensors that are not leaves (weights computed by another network and put in the
    model by ``torch.func.functional_call``).

    Breadth first: the last layer's parameters, next to the loss, end the search early.
    """
    seen: set[Any] = set()
    todo = deque([loss.grad_fn])
    while todo:
        node = todo.popleft()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf
        if id(node) in params or (variable is not None and id(variable) in params):
            return True
        todo.extend(n for n, _ in node.next_functions)
    return False


@dataclass
class _Forward:
    """A top-level forward of a registered module in a saved TRAIN step that goes on after it.

    A pre-hook on the autograd nodes that made its outputs (this object) says when a backward uses
    them; the nodes are not held here (they hold the forward's graph, activations included).
    """

    root: str
    start: int  # the session's mark when it began: its calls, and its loss's, come after
    followed: bool  # its outputs came out of autograd nodes (else, under no_grad, no backward can use them)
    used: bool = False  # a backward went through them

    def __call__(self, grad_outputs: Any) -> None:
        self.used = True


@dataclass
class _Root:
    module: nn.Module  # the inner module (unwrapped)
    name: str  # outputs/<name> for its own outputs
    prefix: str  # "" or "<name>." before parameter and submodule names
    sharded: bool  # by FSDP (_is_sharded)
    # submodules with an outputs/inputs hook, by the name they had when hooked
    hooked: weakref.WeakKeyDictionary[nn.Module, str] = field(default_factory=weakref.WeakKeyDictionary)
    # those still in the module, by their name now (a replaced head is no longer here)
    names: weakref.WeakKeyDictionary[nn.Module, str] = field(default_factory=weakref.WeakKeyDictionary)


@dataclass
class _Optimizer:
    optimizer: torch.optim.Optimizer
    name: str


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
        # only while no optimizer is attached: id(parameter) -> (the parameter, weakly; its hook's handle)
        self._grad_handles: dict[int, tuple[weakref.ref[torch.Tensor], Any]] = {}
        self._loss_name = "loss"
        self._depth = 0
        self._warned_compile = False
        self._closed = False
        # the open step
        self._ended_by_optimizer = False  # pending because its optimizers (or hook.finish_step()) ended it
        self._tentative = False  # opened by a value alone: takes the mode of the next forward
        self._given_unsaved = False  # a value given in it while it was not saved (a tentative step's)
        self._warned_relabel = False
        self._warned_eval_training = False
        self._warned_outside: set[str] = set()  # submodules called outside a forward of their root
        self._ever_forwarded = False  # a registered module's forward has run (else calls of its parts are no step's)
        self._forwarded = self._trained = False
        self._stepped: dict[int, int] = {}  # optimizers (by id) that stepped in it: how many times
        # losses backward() was called on, not yet named: (the tensor, weakly; its value)
        self._backward: list[tuple[weakref.ref[torch.Tensor], torch.Tensor]] = []
        self._named: dict[int, torch.Tensor] = {}  # tensors the user named (registered loss, record_loss)
        self._scaled: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # scaled loss -> (it, the loss)
        self._grad_stash: dict[str, _Gradient] = {}
        # its forwards, while it goes on after them and saves calls (a batch skipped between them is told apart)
        self._forwards: list[_Forward] = []
        self._forward_start: int | None = None  # the session's mark at the forward in progress
        self._warned_unused: set[str] = set()  # roots with a forward nothing trained on, warned about
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
    def register_module(self, module: nn.Module, name: str | None = None) -> None:
        """Capture ``module``: parameters, gradients, and outputs/inputs when those collections are saved.

        A compiled (``torch.compile``), DDP or DataParallel module is unwrapped for naming;
        names are those of ``named_parameters()`` / ``named_modules()`` of the inner module.
        The first module registered without ``name`` keeps these names; a module given a
        ``name``, and every later module, has them prefixed with ``<name>.`` (default: its
        class name), so that two networks (a GAN) never share a name.
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"register_module: expected a torch.nn.Module, got {type(module).__name__}")
        inner = unwrap(module)
        if any(r.module is inner for r in self._roots):
            raise ValueError(f"register_module: {type(inner).__name__} is already registered")
        root_name = name or type(inner).__name__
        prefix = f"{root_name}." if name or self._roots else ""
        if any(r.prefix == prefix for r in self._roots):
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
        root = _Root(inner, root_name, prefix, _is_sharded(inner))
        if root.sharded:
            logger.warning(
                "tensortap: %s is sharded by FSDP, which tensortap does not support: its parameters and gradients "
                "(DTensors) are skipped and its losses are not recognized; outputs and values you give are captured",
                root.name,
            )
        self._roots.append(root)
        self._handles.append(patches.on_forward(module, patches.Tap(self, Hook._on_root_pre, root), pre=True))
        self._handles.append(
            patches.on_forward(module, patches.Tap(self, Hook._on_root_post, root), with_kwargs=True, always_call=True)
        )
        self._follow_modules()

    def _follow_modules(self) -> None:
        """Take the registered modules' parameters and submodules as they are now.

        Run at registration, when an optimizer is attached and when a saved step opens (or has its
        first forward, which ``torch.func.functional_call`` may run with other parameters): a
        submodule replaced after registration (``model.fc = nn.Linear(...)`` to fine-tune), a
        parametrization (``weight_norm``, ``prune``) or a parameter added later is captured
        under its name from then on, and a parameter no longer in the model is no longer saved.
        A parameter shared by two places (tied embeddings) is saved once, under its first name.
        Not in a forward of a module FSDP shards: the parameters it holds then are freed after it.
        """
        if self._depth and any(r.sharded for r in self._roots):
            return
        self._params.clear()
        self._param_ids.clear()
        self._graph_ids.clear()
        for root in self._roots:
            for pname, p in root.module.named_parameters():
                if id(p) not in self._param_ids:  # else shared with a module registered before
                    self._params[root.prefix + pname] = p
                    self._param_ids[id(p)] = root.prefix + pname
                    node = p if p.grad_fn is None else p.grad_fn
                    self._graph_ids[id(node)] = node
            if self.session.may_save("outputs", "inputs"):  # no hook at all otherwise: PyTorch's dispatch costs too
                root.names.clear()
                for sub_name, sub in root.module.named_modules():
                    if not sub_name:  # the root: its outputs are taken by _on_root_post
                        continue
                    root.names[sub] = root.prefix + sub_name
                    if sub not in root.hooked:
                        root.hooked[sub] = root.prefix + sub_name
                        tap = patches.Tap(self, Hook._on_io, root)
                        self._handles.append(patches.on_forward(sub, tap, with_kwargs=True))
        if not self._optimizers and self.session.may_save("gradients"):
            self._hook_gradients()

    def _hook_gradients(self) -> None:
        """Without an optimizer: a gradient hook on each trainable leaf parameter that has none yet (a lazy
        parameter once its first forward gave it a shape, which may be after the step opened)."""
        for param in self._params.values():
            held = self._grad_handles.get(id(param))
            hookable = param.requires_grad and param.is_leaf and not nn.parameter.is_lazy(param)
            if hookable and (held is None or held[0]() is not param):
                handle = param.register_post_accumulate_grad_hook(patches.Tap(self, Hook._on_grad))
                self._grad_handles[id(param)] = (weakref.ref(param), handle)

    def register_loss(self, loss: nn.Module | Callable[..., Any], name: str | None = None) -> None:
        """Name a loss.

        An ``nn.Module`` loss: its output is saved as ``losses/<name>`` (default: its class
        name; ``losses/<name>:0``, ``:1``, ... when called several times in one step).
        A function (``F.nll_loss``): the loss ``backward()`` is called on is saved as
        ``losses/<name>`` (default: the function's name) instead of ``losses/loss``.
        """
        if isinstance(loss, nn.Module):
            full = f"losses/{name or type(loss).__name__}"
            self._handles.append(patches.on_forward(loss, patches.Tap(self, Hook._on_loss_module, full)))
        elif callable(loss):
            self._loss_name = name or getattr(loss, "__name__", None) or "loss"
        else:
            raise TypeError(f"register_loss: expected a torch.nn.Module or a function, got {type(loss).__name__}")

    def attach_optimizer(self, optimizer: torch.optim.Optimizer, name: str | None = None) -> None:
        """Let ``optimizer.step()`` end training steps; save its state as ``optimizer/<param>/<key>``.

        Several optimizers (a GAN): a training step ends when each has stepped.
        ``name`` names the losses differentiated before its step when there are several
        (``losses/<name>``); default: the registered module its parameters belong to, or, when it
        updates part of that module's trainable parameters, the submodule holding them (an actor-critic
        module's ``actor`` and ``critic`` optimizers).
        A wrapper that training frameworks hand out (accelerate's ``AcceleratedOptimizer``,
        Lightning's ``LightningOptimizer``) is unwrapped to the optimizer it wraps. If attaching
        fails (``TypeError``, ``ValueError``), the hook is left as it was.
        """
        optimizer = _inner_optimizer(optimizer, "attach_optimizer")
        if any(o.optimizer is optimizer for o in self._optimizers):
            raise ValueError("attach_optimizer: this optimizer is already attached")
        self._follow_modules()  # the model may have changed since registration (a new head to fine-tune)
        att = _Optimizer(optimizer, name or self._owner_name(optimizer))
        self._warn_shared_parameters(att)
        # nothing above changed the hook but its tables; nothing below fails (_inner_optimizer checked the hooks)
        self._handles.append(optimizer.register_step_pre_hook(patches.Tap(self, Hook._on_optimizer_pre, att)))
        self._handles.append(optimizer.register_step_post_hook(patches.Tap(self, Hook._on_optimizer_post, att)))
        self._optimizers.append(att)
        for _, handle in self._grad_handles.values():  # gradients are read from p.grad at optimizer.step() now
            handle.remove()
        self._grad_handles.clear()

    def _updated(self, att: _Optimizer) -> dict[str, torch.Tensor]:
        """The registered parameters ``att`` updates, by name."""
        named = ((self._param_ids.get(id(p)), p) for g in att.optimizer.param_groups for p in g["params"])
        return {name: p for name, p in named if name is not None}

    def _warn_shared_parameters(self, att: _Optimizer) -> None:
        """Warn if ``att`` updates parameters an attached optimizer updates too: a step ends when each has
        stepped, so one that never steps (a second optimizer made for the same model) merges every step."""
        updated = self._updated(att)
        for other in self._optimizers:
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
        ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
        for root in self._roots:
            trainable = [(name, id(p) in ids) for name, p in root.module.named_parameters() if p.requires_grad]
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
        return Mode.TRAIN if torch.is_grad_enabled() else Mode.EVAL

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
        if saved:
            self.session.guard(self._follow_modules)  # at a forward: a failure must not stop the training
            self._read_switches()

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

    def _finish(self) -> None:
        """Record the open step (if any)."""
        if not self.session.is_open:
            return
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

    def _drop(self, why: Exception) -> None:
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
        self._named.clear()
        self._scaled.clear()
        self._grad_stash.clear()
        self._forwards.clear()
        self._forward_start = None

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
                "outputs (a batch skipped with `continue`, or a loss that raised and was caught?); its outputs, "
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
        nodes = {t.grad_fn for t in leaves(output, torch.is_tensor) if t.grad_fn is not None}
        forward = _Forward(root.name, start, followed=bool(nodes))
        for node in nodes:
            node.register_prehook(forward)
        self._forwards.append(forward)

    def _save_step_end(self) -> None:
        """At a saved step's end: losses not yet named, parameters, stashed gradients, optimizer state."""
        self._name_backward_losses(self._loss_name)
        s = self.session
        if not (self.weights_rank0_only and self.rank != 0) and s.saving("weights", "biases"):
            s.offer_many((name, p, (_param_collection(name),)) for name, p in self._params.items())
        s.offer_many((f"gradients/{name}", g.applied(), ("gradients",)) for name, g in self._grad_stash.items())
        if s.saving("optimizer_variables"):
            for att in self._optimizers:
                for p, state in att.optimizer.state.items():
                    pname = self._param_ids.get(id(p))
                    if pname is None:
                        continue
                    for key, v in state.items():
                        if isinstance(v, torch.Tensor):
                            s.offer(f"optimizer/{pname}/{key}", v, ("optimizer_variables",))

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
        if torch.compiler.is_compiling():  # compiled after registration: these hooks are traced once
            self._warn_compiled_after_registration(root.module)
            return
        if _in_backward():
            return
        self._depth += 1
        if self._depth > 1 or self._closed:
            return
        patches.follow_imports()  # accelerate imported after the hook opened: its backward(loss), before it is called
        mode = self._detect_mode(root.module)
        s = self.session
        if not s.is_open or s.pending:
            self._open(mode)
        elif self._tentative and mode != self.mode:
            self._relabel(mode)
        elif mode != self.mode and not self._spans_forwards():
            self._open(mode)
        elif not self._forwarded and self.is_saving():
            # opened before this forward (by a value given): the parameters it runs with, which
            # torch.func.functional_call(model, params, x) puts in the model for the call only
            self.session.guard(self._follow_modules)
        self._tentative = False
        self._forwarded = self._ever_forwarded = True
        if self.is_saving() and self._spans_forwards():
            # the outputs of a forward before may be no backward's (a batch skipped): this one's calls are held apart
            self._forward_start = self.session.mark(apart=any(f.followed and not f.used for f in self._forwards))
        else:
            self._forward_start = None

    def _on_root_post(self, root: _Root, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if torch.compiler.is_compiling() or _in_backward():
            return
        self._depth = max(self._depth - 1, 0)
        if self._depth or not self.session.is_open or self._closed:
            return
        error = sys.exc_info()[1]
        if output is None and isinstance(error, Exception):  # the forward raised (torch's always_call)
            self._drop(error)
            return
        if self._io and output is not None:
            self.session.guard(self._capture_io, root.name, args, kwargs, output)
        if self._forward_start is not None:
            self.session.guard(self._track_forward, root, output, self._forward_start)
            self._forward_start = None
        if not self._spans_forwards():
            self._end()

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

    def _on_io(self, root: _Root, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if not self._io or torch.compiler.is_compiling() or _in_backward():
            return
        name = root.names.get(module)
        if name is None:
            self._warn_removed(root.hooked[module], module)
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

    def _warn_outside_forward(self, name: str) -> None:
        """Once per submodule: a call outside a forward of a registered module is skipped unless the step in
        progress has had a forward and has not ended (recorded in an ended step, it renamed its outputs)."""
        if not self._ever_forwarded:  # parts of a container called directly (gan.G(z)): one warning for all
            if not self._warned_outside:
                self._warned_outside.add(name)
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

    def _capture_io(self, name: str, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        """Outputs and inputs of one call: positional inputs ``inputs/<name>``, keyword ones ``inputs/<name>/<key>``."""
        if self.session.saving("outputs"):
            self.session.offer_call(f"outputs/{name}", output, ("outputs",))
        if self.session.saving("inputs"):
            self.session.offer_call(f"inputs/{name}", args, ("inputs",), keywords=kwargs)

    def _on_loss_module(self, name: str, module: nn.Module, args: Any, output: Any) -> None:
        if self._closed:
            return
        self._ensure_open(tentative=False)
        if self._losses and isinstance(output, torch.Tensor):
            self._named[id(output)] = output
            self.session.guard(self.session.offer_call, name, output, ("losses",))

    def _on_grad(self, p: torch.Tensor) -> None:
        if self._stash_grads and p.grad is not None and (name := self._param_ids.get(id(p))) is not None:
            grad = p.grad.detach()
            self._grad_stash[name] = _Gradient(grad, grad._version, grad.clone())

    # ------------------------------------------------- backward and GradScaler
    def on_backward(self, tensors: Any) -> None:
        """``backward()`` is about to run on ``tensors``: a scalar reaching our parameters is the step's loss."""
        if self._closed or not self._params:
            return
        if self._stash_grads:
            self.session.guard(self._hook_gradients)
        if not self._losses and self._forwarded and self.session.is_open and not self._ended_by_optimizer:
            self._trained = True  # an unsaved step after our forward: no graph walk
            return
        loss = tensors[0] if isinstance(tensors, (tuple, list)) and len(tensors) == 1 else tensors
        if not isinstance(loss, torch.Tensor) or loss.grad_fn is None:
            return
        loss = self._scaled.get(id(loss), (loss, loss))[1]  # scaler.scale(loss).backward(), accelerator's: the loss
        if not _reaches(loss, self._graph_ids):
            return  # another model's backward
        if not self.session.is_open or self._ended_by_optimizer:
            self._open(self._detect_mode())
        self._trained = True
        self._tentative = False
        if self._losses and loss.numel() == 1:
            self._backward.append((weakref.ref(loss), loss.detach()))

    def on_backward_failed(self, tensors: Any, error: Exception) -> None:
        """``backward()`` on ``tensors`` raised ``error`` (out of memory, in a loop that skips the batch): the
        step it was to train is dropped, unless the loss was another model's."""
        if self._closed or not self.session.is_open:
            return
        loss = tensors[0] if isinstance(tensors, (tuple, list)) and len(tensors) == 1 else tensors
        if isinstance(loss, torch.Tensor) and loss.grad_fn is not None and not _reaches(loss, self._graph_ids):
            return
        self._drop(error)

    def on_scaled(self, scaled: Any, loss: Any) -> None:
        """``GradScaler.scale(loss)``, or ``Accelerator.backward(loss)``: remember the loss behind the scaled
        tensor backward() will see."""
        if self._losses and isinstance(scaled, torch.Tensor) and isinstance(loss, torch.Tensor):
            self._scaled[id(scaled)] = (scaled, loss)

    def on_scaler_step(self, optimizer: torch.optim.Optimizer, stepped: bool) -> None:
        """``GradScaler.step``: a step it skipped (non-finite gradients) is a step all the same."""
        if stepped or self._closed:
            return
        for att in self._optimizers:
            if att.optimizer is optimizer:
                self._on_optimizer_pre(att, optimizer, (), {})
                self._on_optimizer_post(att, optimizer, (), {})

    # ------------------------------------------------------------- optimizers
    def _on_optimizer_pre(self, att: _Optimizer, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> Any:
        if self._closed:
            return None
        if not self.session.is_open or self._ended_by_optimizer:
            self._open(self._detect_mode())
        self._tentative = False
        if not (self.is_saving() and self.session.saving("gradients")):
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
        self.session.offer_many(
            (f"gradients/{name}", p.grad, ("gradients",))
            for name, p in self._updated(att).items()
            if p.requires_grad and p.grad is not None
        )

    def _on_optimizer_post(self, att: _Optimizer, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._closed or not self.session.is_open:
            return
        self._trained = True
        self._stepped[id(att)] = self._stepped.get(id(att), 0) + 1
        if self._losses:
            self._name_backward_losses(att.name if len(self._optimizers) > 1 else self._loss_name)
        if self.mode != Mode.TRAIN:
            self._warn_optimizer_in_eval(att)
        elif not self._explicit_steps and len(self._stepped) == len(self._optimizers):
            self._end()
            self._ended_by_optimizer = True
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
    def save_tensor(self, name: str, value: Any, collections: Sequence[str] = ("custom",)) -> None:
        """Save ``value`` as ``name`` on the current step if it is saved (any collections)."""
        if self._closed:
            return
        self._ensure_open()
        self.session.give(name, value, collections, held=self._fate_open())

    def save_scalar(self, name: str, value: Any, collections: Sequence[str] = ("metrics",)) -> None:
        """Save a scalar as ``<first collection>/<name>`` (``metrics/lr``) on the current step if it is saved."""
        if self._closed:
            return
        self._ensure_open()
        if not self.is_saving():
            return
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        super().save_scalar(name, value, collections)

    def record_loss(self, value: Any, name: str = "loss") -> None:
        """Save ``value`` (a scalar tensor or number) as ``losses/<name>`` on the current step.

        Several calls with one name in a step give ``losses/<name>:0``, ``:1``, ...
        A tensor recorded here is not saved again as ``losses/loss`` when ``backward()``
        is called on it.
        """
        if self._closed:
            return
        self._ensure_open()
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
            "hook.finish_step() after each update, or one hook per network",
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
        patches.detach(self)
        super().close(reason)

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

"""What the PyTorch adapter puts on objects it does not own, and how it takes it away.

Two kinds:

- **Callbacks stored on the user's objects** (module forward hooks, gradient
  hooks, optimizer step hooks) are :class:`Tap` objects. A tap holds its hook
  weakly, never lets an error reach the training, and a module's runs for that
  module only (torch.ao's fusion copies hooks onto the modules it makes). A
  module pickled or copied while a hook is open leaves its taps out (its class's
  ``__getstate__`` is one of the patches below): ``torch.save(model)``
  of a captured model holds nothing of tensortap, so ``torch.load`` reads it
  as it reads the model never captured (``weights_only=True``, its default,
  included), and ``copy.deepcopy(model)`` makes a copy that never records
  into the original's trial. A tap pickled some other way (a module class
  whose ``__getstate__`` returns no dict, or that pickles by ``__reduce__``)
  becomes an :class:`Inert` callable, which needs tensortap importable to load.
- **Functions of torch replaced while a hook is open** (:func:`attach`):
  ``torch.autograd.backward`` (which ``Tensor.backward`` calls) to see the
  loss a training step differentiates, ``torch.autograd.grad`` to see a step
  that trains on the gradients it returns, ``GradScaler.scale``/``step`` to
  see the unscaled loss and the steps a scaler skips,
  the ``__getstate__`` of the classes of the modules tapped (:func:`on_forward`)
  to leave taps out of a pickled or copied module, and accelerate's
  ``Accelerator.backward(loss)`` to see the loss it was given (it
  differentiates ``loss / gradient_accumulation_steps``). They are installed when
  the first hook opens (a class's ``__getstate__`` when a module of it is first
  tapped) and restored when the last one closes; in between,
  they cost one test of an empty list when no hook is saving. A library
  imported after the first hook opened (``import accelerate`` after
  ``capture``, or by the Hugging Face Trainer) is patched by
  :func:`follow_imports`, which the hooks call before each forward of their models.

Why a scoped replacement rather than a hook on the graph: no PyTorch hook
fires for the root of a backward pass (``register_hook`` on the loss would
need the loss before it exists, and a grad_fn hook fires for every node).
The replacement is measured at well under a microsecond per call on an
unsaved step (docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch.autograd.graph import GradientEdge
from torch.utils.hooks import RemovableHandle


class Owner(Protocol):
    """What a hook implements to own :class:`Tap` objects."""

    def on_tap_error(self, error: Exception) -> None:
        """One of its taps raised ``error``: raise what must reach the training, else stop capturing."""

    def on_tap_copied(self, tap: Tap, target: Any) -> None:
        """``tap``, put on one object, was called for ``target``, onto which it was copied."""

    def on_tap_traced(self, tap: Tap) -> None:
        """``tap`` was traced into code that ``torch.compile`` compiled and that may not break its graph, which
        runs without it: do only what Dynamo traces in ``fullgraph`` mode (set a flag, told of from eager code)."""

    def on_grad_traced(self) -> None:
        """``torch.autograd.grad`` was traced as :meth:`on_tap_traced` tells (its gradients not differentiated
        again): do only what Dynamo traces in ``fullgraph`` mode."""


class Listener(Owner, Protocol):
    """What a hook implements to hear about backward passes and GradScaler steps (an error in one of these
    goes to its ``on_tap_error``, as a tap's)."""

    def on_backward(self, tensors: Any) -> None:
        """``torch.autograd.backward(tensors, ...)`` is about to run."""

    def on_backward_failed(self, tensors: Any, error: BaseException) -> None:
        """``torch.autograd.backward(tensors, ...)`` or ``torch.autograd.grad(tensors, ...)`` raised ``error``."""

    def on_grad(self, outputs: Any, inputs: Any, grads: Any) -> None:
        """``torch.autograd.grad(outputs, inputs)`` returned ``grads`` (:func:`grad_pairs`), which are not
        differentiated again (``create_graph``) nor a batch of them (``is_grads_batched``)."""

    def on_scaled(self, scaled: Any, loss: Any) -> None:
        """``scaled``, about to be differentiated, stands for ``loss``: ``GradScaler.scale(loss)`` returned it, or
        a training library's ``backward(loss)`` differentiates it (accelerate's: ``loss`` divided by the
        gradient accumulation steps)."""

    def on_scaler_step(self, optimizer: torch.optim.Optimizer, stepped: bool) -> None:
        """``GradScaler.step(optimizer)`` returned; ``stepped`` is whether ``optimizer.step()`` ran."""


class Inert:
    """What a :class:`Tap` becomes when pickled or copied: a callable that does nothing."""

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return None


class Tap:
    """A callback stored on a user's object that calls ``fn(hook, *args)`` while the hook lives.

    Torch calls it as it calls any hook. An error in ``fn`` never reaches the training: it goes to
    ``hook.on_tap_error``. A tap put on a module by :func:`on_forward` runs only for that module: one
    copied onto another (``torch.ao.quantization``'s ``fuse_modules`` and ``prepare_qat`` copy the hooks of
    the modules they replace onto their replacements, without ``with_kwargs``) tells ``hook.on_tap_copied``
    instead. One that Dynamo traces where the graph may not break (the module called in a function compiled
    with ``fullgraph=True``) tells ``hook.on_tap_traced`` and does nothing else: a graph break, a lock, a
    warning there would fail the compile, the training.

    Parameters
    ----------
    hook
        The owner (held weakly: a model outliving its hook keeps no trial alive).
    fn
        The hook's method to call, unbound.
    bound
        Extra leading arguments for ``fn`` (e.g. which root module or parameter name).
    """

    __slots__ = ("bound", "fn", "hook", "on")

    def __init__(self, hook: Owner, fn: Callable[..., Any], *bound: Any) -> None:
        self.hook = weakref.ref(hook)
        self.fn = fn
        self.bound = bound
        self.on: weakref.ref[Any] | None = None  # the module it is put on (on_forward)

    def __call__(self, *args: Any) -> Any:
        # torch calls every hook a tap stands for with positional arguments only, the object it is on first
        hook = self.hook()
        if hook is None:
            return None
        if torch.compiler.is_dynamo_compiling() and not _may_break_graph():  # a graph break would fail the compile
            hook.on_tap_traced(self)
            return None
        if self.on is not None and args[0] is not self.on():
            hook.on_tap_copied(self, args[0])
            return None
        try:
            return self.fn(hook, *self.bound, *args)
        except Exception as exc:
            hook.on_tap_error(exc)
            return None

    def __reduce__(self) -> tuple[type[Inert], tuple[()]]:
        return Inert, ()

    @property
    def __name__(self) -> str:  # torch.jit.script asks each forward hook for its name
        raise AttributeError(
            "tensortap's hooks are on this module: torch.jit.script cannot compile them. Script a copy, which "
            "leaves them out: torch.jit.script(copy.deepcopy(model)), or script after hook.close()"
        )


class Untraced(Tap):
    """A :class:`Tap` that ``torch.compile`` runs, not traces: put on a module compiled in place
    (``module.compile()``), whose calls, its hooks included, run compiled. A tap traced runs once, for the
    tracer (which keeps nothing of what it does); this one runs at each call, between the compiled graphs: its
    body, Tap's ``__call__`` under ``torch.compiler.disable`` (set by :func:`untraced`, not at import: that
    imports ``torch._dynamo``, which costs seconds), is a graph break. Where the compiled code may have none
    (the module called in a function compiled with ``fullgraph=True``, or exported), the tap is traced as a
    :class:`Tap` is: a disabled call there fails the compile, the training.
    """

    __slots__ = ()

    def __call__(self, *args: Any) -> Any:
        if torch.compiler.is_dynamo_compiling() and not _may_break_graph():
            return super().__call__(*args)
        return self._run(*args)

    _run: Callable[..., Any]


def _may_break_graph() -> bool:
    """Whether the code Dynamo traces now may break its graph: not compiled with ``fullgraph=True``, nor
    exported, nor under ``torch._dynamo.error_on_graph_break(True)`` (private API). A :class:`Tap` that may
    runs as before, its body between the graphs; one that may not does nothing there. A torch whose tracer
    does not say (its private API moved): may not, the safe answer (an error here would fail the compile)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        return not (getattr(tx, "one_graph", True) or getattr(tx, "error_on_graph_break", True))
    except Exception:
        return False


# Dynamo runs it as it traces, each compile anew: torch.compiler.assume_constant_result's mark, set without that
# function, which imports torch._dynamo (seconds)
_may_break_graph._dynamo_marked_constant = True  # type: ignore[attr-defined]


def untraced(tap: Tap) -> Untraced:
    """``tap`` as an :class:`Untraced` tap (called once ``torch.compile`` was: ``torch._dynamo`` is imported)."""
    if "_run" not in vars(Untraced):
        Untraced._run = torch.compiler.disable(Tap.__call__)
    hook = tap.hook()
    assert hook is not None  # a tap is put on a module by its live hook
    return Untraced(hook, tap.fn, *tap.bound)


_LISTENERS: list[Listener] = []  # open hooks, in opening order
_ORIGINALS: dict[tuple[Any, str], Any] = {}
# the losses given to a training library's backward() now running, innermost last
_GIVEN: list[torch.Tensor] = []


def _tell(listener: Listener, fn: Callable[..., None], *args: Any) -> None:
    """``fn(*args)``, a method of ``listener``: an error in it goes to ``listener.on_tap_error``, as a tap's."""
    try:
        fn(*args)
    except Exception as exc:
        listener.on_tap_error(exc)


def _wrap_backward(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def backward(tensors: Any, *args: Any, **kwargs: Any) -> Any:
        for listener in list(_LISTENERS):
            if _GIVEN and isinstance(tensors, torch.Tensor):
                _tell(listener, listener.on_scaled, tensors, _GIVEN[-1])
            _tell(listener, listener.on_backward, tensors)
        try:
            return original(tensors, *args, **kwargs)
        except BaseException as exc:  # a KeyboardInterrupt too (a notebook's "interrupt"): the step is left
            for listener in list(_LISTENERS):
                _tell(listener, listener.on_backward_failed, tensors, exc)
            raise

    return backward


def grad_pairs(inputs: Any, grads: Any) -> Iterator[tuple[Any, Any]]:
    """Each input of a ``torch.autograd.grad`` call with the gradient it returned for it: ``inputs`` is one
    tensor or gradient edge, a sequence of them, or a dict of them (then ``grads`` is a dict too)."""
    if isinstance(inputs, dict):
        return zip(inputs.values(), grads.values(), strict=False)
    return zip((inputs,) if isinstance(inputs, (torch.Tensor, GradientEdge)) else inputs, grads, strict=False)


def _wrap_grad(original: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.autograd.grad``, which tells the listeners what it returned, unless its gradients are to be
    differentiated again (``create_graph``, which may be given by position: the first five parameters are
    torch's) or are a batch of them (``is_grads_batched``), and when it raises (as ``backward()``). Traced where
    the graph may not break, it is torch's alone, as a :class:`Tap` does nothing there: what the listeners do
    would run only for the tracer (and change what it guards: a recompile at each call, then a failed training);
    they are told that it was (``on_grad_traced``)."""

    @functools.wraps(original)
    def grad(
        outputs: Any,
        inputs: Any,
        grad_outputs: Any = None,
        retain_graph: bool | None = None,
        create_graph: bool = False,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        if isinstance(inputs, Iterator):  # model.parameters(): read once, for torch and for the listeners
            inputs = tuple(inputs)
        told = not (create_graph or kwargs.get("is_grads_batched"))
        if torch.compiler.is_dynamo_compiling() and not _may_break_graph():
            if told:
                for listener in list(_LISTENERS):
                    listener.on_grad_traced()
            return original(outputs, inputs, grad_outputs, retain_graph, create_graph, *args, **kwargs)
        try:
            grads = original(outputs, inputs, grad_outputs, retain_graph, create_graph, *args, **kwargs)
        except BaseException as exc:  # as a backward's: the step it was to train is left
            for listener in list(_LISTENERS):
                _tell(listener, listener.on_backward_failed, outputs, exc)
            raise
        if told:
            for listener in list(_LISTENERS):
                _tell(listener, listener.on_grad, outputs, inputs, grads)
        return grads

    return grad


def _wrap_library_backward(original: Callable[..., Any]) -> Callable[..., Any]:
    """A training library's ``backward(loss)`` (accelerate's): the tensors it differentiates stand for ``loss``."""

    @functools.wraps(original)
    def backward(self: Any, loss: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(loss, torch.Tensor):
            return original(self, loss, *args, **kwargs)
        _GIVEN.append(loss)
        try:
            return original(self, loss, *args, **kwargs)
        finally:
            _GIVEN.pop()

    return backward


def _wrap_scale(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def scale(self: Any, outputs: Any) -> Any:
        scaled = original(self, outputs)
        for listener in list(_LISTENERS):
            _tell(listener, listener.on_scaled, scaled, outputs)
        return scaled

    return scale


def _wrap_scaler_step(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def step(self: Any, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        ran: list[bool] = []
        handle = optimizer.register_step_post_hook(lambda *_: ran.append(True))
        try:
            result = original(self, optimizer, *args, **kwargs)
        finally:
            handle.remove()
        for listener in list(_LISTENERS):
            _tell(listener, listener.on_scaler_step, optimizer, bool(ran))
        return result

    return step


# a module's hook dicts that may hold taps, and the dicts of flags keyed like them (torch's Module.__init__)
_HOOK_DICTS = {
    "_forward_pre_hooks": ("_forward_pre_hooks_with_kwargs",),
    "_forward_hooks": ("_forward_hooks_with_kwargs", "_forward_hooks_always_called"),
}


def _without_taps(state: dict[str, Any]) -> dict[str, Any]:
    """A module's pickled ``state`` with the taps taken out of its hook dicts (new dicts: the module keeps
    its own)."""
    for hooks_key, flag_keys in _HOOK_DICTS.items():
        hooks = state.get(hooks_key)
        if not isinstance(hooks, dict):
            continue
        ours = {k for k, v in hooks.items() if isinstance(v, Tap)}
        if not ours:
            continue
        state = {**state, hooks_key: OrderedDict((k, v) for k, v in hooks.items() if k not in ours)}
        for key in flag_keys:
            flags = state.get(key)
            if isinstance(flags, dict):
                state[key] = OrderedDict((k, v) for k, v in flags.items() if k not in ours)
    return state


def _wrap_getstate(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def __getstate__(self: torch.nn.Module) -> Any:
        state = original(self)
        return _without_taps(state) if isinstance(state, dict) else state

    return __getstate__


_Target = tuple[Any, str, Callable[[Callable[..., Any]], Callable[..., Any]]]
# the training library patched once it is imported; whether hooks are open and it is not patched yet
_LIBRARY = "accelerate"
_library_waits = False


def _targets() -> list[_Target]:
    targets: list[_Target] = [(torch.autograd, "backward", _wrap_backward), (torch.autograd, "grad", _wrap_grad)]
    scaler = getattr(getattr(torch, "amp", None), "GradScaler", None)
    if scaler is not None:
        targets += [(scaler, "scale", _wrap_scale), (scaler, "step", _wrap_scaler_step)]
    return targets


def _library_targets() -> list[_Target]:
    # none while accelerate is not imported, or is being imported (its __init__ has not reached Accelerator)
    accelerator = getattr(sys.modules.get(_LIBRARY), "Accelerator", None)
    return [] if accelerator is None else [(accelerator, "backward", _wrap_library_backward)]


def _install(targets: list[_Target]) -> None:
    for owner, name, wrap in targets:
        original = getattr(owner, name)
        setattr(owner, name, wrap(original))
        _ORIGINALS[(owner, name)] = original


def on_forward(module: torch.nn.Module, tap: Tap, pre: bool = False, **kwargs: Any) -> RemovableHandle:
    """``module.register_forward_pre_hook(tap)`` (``pre``), else ``module.register_forward_hook(tap,
    **kwargs)``; ``tap`` runs for ``module`` only (a copy of it on another module does nothing), and, ``module``
    compiled in place, at each of its calls (:class:`Untraced`). While a hook
    is open, the ``__getstate__`` that ``module``'s class uses (``nn.Module``'s, or its own: ``nn.LSTM``'s, a
    user's) leaves the taps out of a pickled or copied module."""
    owner = next((k for k in type(module).__mro__ if "__getstate__" in vars(k)), object)
    if _LISTENERS and owner is not object and (owner, "__getstate__") not in _ORIGINALS:
        with contextlib.suppress(TypeError, AttributeError):  # a class that refuses it: its taps pickle as Inert
            _install([(owner, "__getstate__", _wrap_getstate)])
    if getattr(module, "_compiled_call_impl", None) is not None:  # module.compile(): its hooks run compiled
        tap = untraced(tap)
    tap.on = weakref.ref(module)
    return module.register_forward_pre_hook(tap) if pre else module.register_forward_hook(tap, **kwargs)


def run_last(hooks: Any, owner: Owner) -> None:
    """Move the taps of ``owner`` to the end of ``hooks`` (a module's ``_forward_hooks``, which torch runs in
    their order), after the hooks registered since: a tap then sees the value the call returns, after each
    forward hook that replaced it. One length test where the module has no hook but the tap."""
    if hooks is not None and len(hooks) > 1:
        for key in [k for k, v in hooks.items() if isinstance(v, Tap) and v.hook() is owner]:
            hooks.move_to_end(key)


def after_accumulation(param: torch.Tensor, tap: Tap) -> RemovableHandle:
    """``param.register_post_accumulate_grad_hook(tap)``, run before the hooks registered before it: those
    may step an optimizer and set ``param.grad`` to ``None`` (the optimizer step fused into the backward,
    PyTorch's tutorial). Torch has no ``prepend`` for these hooks, and runs them in the order of the plain
    dict under the ``OrderedDict`` that holds them (``move_to_end`` does not reorder that): the others are
    taken out and put back after the tap, private API. Where the dict is not there, the tap stays last."""
    handle = param.register_post_accumulate_grad_hook(tap)
    hooks = getattr(param, "_post_accumulate_grad_hooks", None)
    if isinstance(hooks, dict):
        others = [(key, fn) for key, fn in hooks.items() if key != handle.id]
        for key, _ in others:
            del hooks[key]
        hooks.update(others)
    return handle


def hooks_after_accumulation(handle: RemovableHandle, param: torch.Tensor) -> bool:
    """Whether ``handle``, which :func:`after_accumulation` returned, is of a hook of ``param``: not of a
    parameter freed since, whose ``id`` ``param`` took (the handle holds the freed one's hooks weakly)."""
    hooks = getattr(param, "_post_accumulate_grad_hooks", None)
    return hooks is not None and handle.hooks_dict_ref() is hooks


def rearm_after_accumulation(param: torch.Tensor) -> None:
    """Make the post-accumulate-grad hooks of ``param`` run for the tensor it holds now.

    ``torch.utils.swap_tensors`` (``model.to()``, ``half()``, ``to_empty()`` under
    ``torch.__future__.set_swap_module_params_on_conversion(True)``) puts another tensor in ``param``
    and leaves its hooks, a dict on the Python object, registered with the tensor it held: none would
    run again, and ``register_post_accumulate_grad_hook`` adds to that dict without registering it.
    Setting the dict again registers it, every hook in it, with the tensor held now (private API).
    """
    hooks = getattr(param, "_post_accumulate_grad_hooks", None)
    if hooks is not None:
        param._post_accumulate_grad_hooks = hooks


_LIMIT_LOCK = threading.Lock()  # the recursion limit is read and set again as one step


def lend_frames(frames: int) -> None:
    """Raise the recursion limit by ``frames``: the Python frames tensortap's module hooks add to a forward.

    A module with a forward hook runs its forward one frame deeper than a module with none (torch's
    ``Module._call_impl`` calls it through a closure then), so a forward hook on every submodule adds a frame
    per nesting level, and a model nested near the recursion limit would raise ``RecursionError`` only
    when captured. The hooks lend those frames for the forward they run in, and :func:`return_frames` takes
    them back after it (by subtraction: a limit the training sets in between is kept, less the loan).
    """
    with _LIMIT_LOCK:
        sys.setrecursionlimit(sys.getrecursionlimit() + frames)


def return_frames(frames: int) -> None:
    """Take back the frames :func:`lend_frames` lent."""
    with _LIMIT_LOCK:
        sys.setrecursionlimit(sys.getrecursionlimit() - frames)


def follow_imports() -> None:
    """Patch the training library if it was imported since the first hook opened (``import accelerate``
    after ``capture``): one test of a flag once patched, one ``sys.modules`` lookup until then.

    The hooks call it before each forward of their models: accelerate is imported, and its
    ``Accelerator`` made, before the forward whose loss ``accelerator.backward`` is given.
    """
    global _library_waits
    if _library_waits and _LIBRARY in sys.modules and (targets := _library_targets()):
        _install(targets)
        _library_waits = False


def attach(listener: Listener) -> None:
    """Start telling ``listener`` about backward passes and scaler steps (installs the patches first)."""
    global _library_waits
    if not _LISTENERS:
        _install(_targets())
        _library_waits = True
        follow_imports()
    _LISTENERS.append(listener)


def detach(listener: Listener) -> None:
    """Stop telling ``listener``; the last one out restores torch's and the library's own functions."""
    global _library_waits
    if listener in _LISTENERS:
        _LISTENERS.remove(listener)
    if not _LISTENERS:
        _library_waits = False
        while _ORIGINALS:
            (owner, name), original = _ORIGINALS.popitem()
            setattr(owner, name, original)

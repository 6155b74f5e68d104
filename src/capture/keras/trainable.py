"""Which layers a model's TensorFlow step functions train: those trainable when Keras traced them.

Keras's TensorFlow step function (a ``tf.function``) is traced at its first run after
``compile`` (or after ``make_<kind>_function(force=True)``) and keeps that trace: it reads
``model.trainable_weights`` and each layer's ``trainable`` (``BatchNormalization``'s
inference mode) only then. A ``layer.trainable = True`` set later without compiling again
does not reach the steps Keras runs (they go on training what they trained); a step
traced anew would apply gradients of variables the optimizer was not built with.

The callback traces the step functions again (with its wrappers; a capturing variant at
the first step that saves from inside it): traced under :func:`traced_state`, applied by
:func:`as_traced`, they train what Keras's own would. When it detaches, it leaves the model
the train function Keras alone would hold then, traced under that state too
(:func:`keras_train_function`). JAX and torch trace (or run) the step with the model's
state of the moment, as Keras alone does: nothing to pin there.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from .ops import graph_mode

TrainableState = dict[Any, bool]
"""Each layer's ``trainable`` (the layer as key), as Keras's own ``Trainer._compiled_trainable_state``."""

# the state of each model's step functions, with the compile they were traced for; held weakly (the
# state has the model among its layers): a model trained with the callback is freed as any other
_traced: weakref.WeakKeyDictionary[Any, tuple[Any, weakref.WeakKeyDictionary[Any, bool]]] = weakref.WeakKeyDictionary()


def trainable_state(model: Any) -> TrainableState:
    """Each layer's ``trainable`` now, ``model`` included."""
    return {layer: layer.trainable for layer in model._flatten_layers()}


def traced_state(model: Any, holds_own: bool) -> TrainableState:
    """The trainable state of the step functions Keras runs for ``model`` in its present compile.

    That of the step functions traced by the callback for this compile (remembered
    across callbacks, for the model's life); else, when ``holds_own`` (the model holds
    step functions of Keras's own, traced without the callback), the state Keras
    recorded at ``compile``; else the state now (Keras traces them now).

    Parameters
    ----------
    model
        The compiled Keras model.
    holds_own
        Whether ``model`` holds a step function that Keras built without the callback.

    Returns
    -------
    TrainableState
        The state to trace the model's step functions under.
    """
    compiled = getattr(model, "_compile_config", None)
    known = _traced.get(model)
    if known is not None and known[0] is compiled:
        return dict(known[1])
    state = getattr(model, "_compiled_trainable_state", None) if holds_own else None
    return retraced(model) if state is None else _remember(model, dict(state))


def retraced(model: Any) -> TrainableState:
    """``model``'s step functions are traced anew (``make_<kind>_function(force=True)``): the state now, remembered."""
    return _remember(model, trainable_state(model))


def _remember(model: Any, state: TrainableState) -> TrainableState:
    _traced[model] = (getattr(model, "_compile_config", None), weakref.WeakKeyDictionary(state))
    return state


def keras_train_function(model: Any, state: TrainableState) -> Callable[..., Any]:
    """Keras's own ``train_function`` of ``model`` (TensorFlow, compiled), its step traced under ``state``.

    What Keras alone holds after a ``fit``: the step function it traced then, which a later
    ``fit`` runs (until ``compile``) whatever ``trainable`` was set since. The callback's
    ``fit`` ran step functions of its own, traced under ``state``; this one, built by
    Keras (``make_train_function``'s ``_make_function``) around the model's own
    ``train_step``, traces it at its first run as Keras's would have been: under ``state``,
    not under the layers' ``trainable`` of that moment. It holds nothing of the callback.

    Parameters
    ----------
    model
        The compiled Keras model, on TensorFlow, not run eagerly.
    state
        The trainable state of the step functions the callback ran (:func:`traced_state`).

    Returns
    -------
    Callable[..., Any]
        The function to set as ``model.train_function``.
    """
    step = model.train_step

    def train_step(*args: Any, **kwargs: Any) -> Any:
        with as_traced(state) if graph_mode() else nullcontext():
            return step(*args, **kwargs)

    function: Callable[..., Any] = model._make_function(train_step)
    return function


_lock = threading.Lock()
_pinned: list[tuple[Any, str, bool]] = []  # what as_traced changed: (layer or variable, attribute, value before)
_depth = 0  # traces in as_traced: a strategy of several replicas traces the step on a thread per replica


@contextmanager
def as_traced(state: TrainableState) -> Iterator[None]:
    """Each layer of ``state`` trainable as in ``state`` inside the block; a layer whose ``trainable`` was set
    since (Keras's setter sets each of its variables' too) with its own trainable variables. A layer left as
    it was keeps its variables' own flags: one frozen alone (``enable_lora``, ``kernel.trainable = False``)
    stays frozen, as in Keras's trace.

    Restored as they were at the end (of the last of the blocks that overlap: the replicas'
    traces of one step, all under the same state).
    """
    global _depth
    with _lock:
        if _depth == 0:
            for layer, trainable in state.items():
                if layer._trainable == trainable:
                    continue
                for obj, attr in [(layer, "_trainable"), *((v, "trainable") for v in layer._trainable_variables)]:
                    if getattr(obj, attr) != trainable:
                        _pinned.append((obj, attr, getattr(obj, attr)))
                        setattr(obj, attr, trainable)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                while _pinned:
                    setattr(*_pinned.pop())

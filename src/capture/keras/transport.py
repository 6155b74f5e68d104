"""How values leave a running step.

- As extra outputs of a compiled step (``fit``, ``evaluate`` and ``predict`` on
  TensorFlow and JAX): :class:`StepVariants` builds the step function twice
  (and once more per other set of saved collections) with Keras's own
  ``make_<kind>_function``: a *plain* variant that taps nothing, run on every
  step that saves nothing from inside the step, and a *capturing* variant
  whose step returns ``(out, {key: tensor})`` (JAX: ``((out, {key: tensor}), state)``),
  run on the steps that do (on TensorFlow also the variables a ``fit`` step saves,
  read after its update); the extras are stripped before Keras sees the output.
- Values computed inside ``jax.value_and_grad`` in a jitted step: their primal, computed
  in the step's own trace (:func:`.ops.at_level`), is returned like the others.
- Values the compiled step cannot return (computed in a TensorFlow ``while``/``cond``
  body graph, or in a JAX ``lax.scan``/``cond`` body): through ``tf.Variable`` taps
  (:class:`TFGraphTaps`) or ``jax.debug.callback``, traced into the capturing
  variant only.
- Steps run eagerly (torch, ``run_eagerly=True``): directly.
- Loops of your own and the steps Keras's variants cannot serve (TensorFlow or JAX
  ``predict`` with ``steps_per_execution > 1`` concatenates outputs; a TensorFlow
  strategy of several replicas reduces them; JAX without ``jit_compile``): the
  taps above under a flag per collection (a ``tf.Variable``, or an array fed with
  each batch into the jitted step, see :class:`FlagIterator`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, Protocol

import numpy as np

from .ops import BACKEND

if BACKEND == "tensorflow":
    import tensorflow as tf
    from tensorflow.python.ops import control_flow_util

logger = logging.getLogger("tensortap")

# collections whose tensors come from inside the step (the others are read after it)
STEP_COLLECTIONS = ("gradients", "outputs", "inputs", "losses", "metrics")
NO_FLAGS = np.zeros(len(STEP_COLLECTIONS), dtype=bool)


class Slot(NamedTuple):
    """Where a captured value goes: a plain ``name``, or one call of a layer (``name`` is then its base name).

    ``call`` is the layer's call index in the step (None for a plain name) and
    ``sub`` the value's place in the call's nested output (``""``, ``"/0"``, ``"/key"``).
    """

    name: str
    call: int | None = None
    sub: str = ""

    def label(self) -> str:
        """A readable name for messages."""
        return self.name + self.sub


class Tagged(NamedTuple):
    """A batch and the step's collection flags, as one (JAX pytree) input of the jitted step."""

    data: Any
    flags: np.ndarray


class _FlagSource(Protocol):
    @property
    def flags_now(self) -> np.ndarray: ...


class FlagIterator:
    """Yields each batch of Keras's JAX data iterator tagged with the callback's current flags."""

    def __init__(self, iterator: Any, source: _FlagSource) -> None:
        self.iterator = iterator
        self.source = source

    def __iter__(self) -> FlagIterator:
        return self

    def __next__(self) -> Tagged:
        return Tagged(next(self.iterator), self.source.flags_now)


class _VariantOwner(Protocol):
    """The callback side of :class:`StepVariants`."""

    #: step collections saved from inside the open step (empty: the plain variant runs)
    wanted_now: frozenset[str]
    #: the variant being run (its wanted collections), None outside a call of a variant
    running: frozenset[str] | None
    #: the extras returned by the variants run in the open step
    extras_out: list[dict[str, Any]]


class StepVariants:
    """``model.<kind>_function`` while the callback is active: the plain step function or a capturing one.

    Parameters
    ----------
    plain
        The step function Keras built with the callback's wrappers tapping nothing.
    build
        Builds a capturing variant (a distinct function object each time, traced
        on its first call, once for each set of wanted collections).
    owner
        Says which collections the open step saves, learns which variant runs
        (read by the step wrapper while tracing) and receives the extras.
    jax_outputs
        The function returns ``(out, state)`` (JAX) rather than ``out``.
    """

    def __init__(
        self,
        plain: Callable[..., Any],
        build: Callable[[], Callable[..., Any]],
        owner: _VariantOwner,
        jax_outputs: bool,
    ) -> None:
        self.plain = plain
        self.build = build
        self.owner = owner
        self.jax_outputs = jax_outputs
        self.capturing: dict[frozenset[str], Callable[..., Any]] = {}
        #: the variant of the last call: its wanted collections, empty for the plain one
        self.last: frozenset[str] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        owner = self.owner
        key = owner.wanted_now
        if key:
            fn = self.capturing.get(key)
            if fn is None:
                fn = self.capturing[key] = self.build()
        else:
            fn = self.plain
        owner.running = key
        try:
            out = fn(*args, **kwargs)
        finally:
            owner.running = None
        self.last = key
        if not key:
            return out
        if self.jax_outputs:
            (first, extras), state = out
            out = (first, state)
        else:
            out, extras = out
        owner.extras_out.append(extras)
        return out


class _TFTap:
    """One captured tensor of a ``tf.function``: a variable holding its value and the step that wrote it."""

    def __init__(self, slot: Slot, collection: str, value: Any, static: bool) -> None:
        self.slot = slot
        self.collection = collection
        shape = value.shape if static else tf.TensorShape(None)
        init = tf.zeros([d or 0 for d in value.shape] if value.shape.rank is not None else [], value.dtype)
        self.var = tf.Variable(init, shape=shape, trainable=False, dtype=value.dtype)
        self.stamp = tf.Variable(tf.constant(-1, tf.int64), trainable=False)


def in_xla_context() -> bool:
    """Whether the graph being traced will be compiled by XLA.

    ``tf.function(jit_compile=True)`` (Keras's ``jit_compile=True`` and a loop's own
    function alike) traces its function inside an ``XLAControlFlowContext`` of the
    function's graph; the ``while``/``cond`` body graphs traced in it see it through
    their outer graphs.
    """
    return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


class TFGraphTaps:
    """Getting tensors out of TensorFlow graphs (``tf.function``, with or without XLA).

    Parameters
    ----------
    xla
        Every graph tapped is compiled by XLA (besides those seen tracing under XLA,
        see :func:`in_xla_context`).
    """

    def __init__(self, xla: bool = False) -> None:
        self.xla = xla
        self.flags = {c: tf.Variable(False, trainable=False) for c in STEP_COLLECTIONS}
        self._assigned = dict.fromkeys(STEP_COLLECTIONS, False)  # what the flag variables hold
        self._wanted = dict.fromkeys(STEP_COLLECTIONS, False)
        self._step = -1
        self.step = tf.Variable(tf.constant(-1, tf.int64), trainable=False)
        self.taps: dict[tuple[Slot, Any], _TFTap] = {}
        self.skipped: set[str] = set()

    def set_flags(self, wanted: dict[str, bool], step: int) -> None:
        """Before a step: which collections it saves.

        The variables are assigned (only what changed) once a traced graph reads them:
        the step variants of ``fit`` usually have no tap here, and then nothing is assigned.
        """
        self._wanted, self._step = dict(wanted), step
        if self.taps:
            self._assign()

    def _assign(self) -> None:
        for c, w in self._wanted.items():
            if w != self._assigned[c]:
                self.flags[c].assign(w)
                self._assigned[c] = w
        if any(self._wanted.values()):
            self.step.assign(self._step)

    def tap(self, collection: str, items: list[tuple[Slot, Any]]) -> None:
        """Inside a trace: store ``items`` when the collection's flag is set at run time."""
        pairs = []
        for slot, value in items:
            value = tf.convert_to_tensor(value)
            static = self.xla or in_xla_context()
            if static and not value.shape.is_fully_defined():
                if slot.label() not in self.skipped:
                    self.skipped.add(slot.label())
                    logger.warning(
                        "tensortap: %s has no static shape %s under XLA; it is not captured", slot.label(), value.shape
                    )
                continue
            key = (slot, tuple(value.shape) if static else value.dtype)
            if key not in self.taps:
                with tf.init_scope():
                    first = not self.taps
                    self.taps[key] = _TFTap(slot, collection, value, static)
                    if first:  # from now on the flags are read: set them for the step being traced
                        self._assign()
            pairs.append((self.taps[key], value))
        if not pairs:
            return

        def save() -> Any:
            for t, v in pairs:
                t.var.assign(v)
                t.stamp.assign(self.step)
            return tf.constant(True)

        tf.cond(self.flags[collection], save, lambda: tf.constant(False))

    def written(self, step: int) -> Iterator[tuple[Slot, str, Any]]:
        """After a saved step: ``(slot, collection, value)`` of the taps that step wrote."""
        for t in self.taps.values():
            if self._wanted[t.collection] and int(t.stamp.numpy()) == step:
                yield t.slot, t.collection, t.var.value()

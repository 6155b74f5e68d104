"""How values leave a running step: directly (eager), through ``tf.Variable`` taps (``tf.function``, XLA),
or through ``jax.debug.callback`` under a flag fed into the jitted step (JAX)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, NamedTuple, Protocol

import numpy as np

from .ops import BACKEND

if BACKEND == "tensorflow":
    import tensorflow as tf

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


class _TFTap:
    """One captured tensor of a ``tf.function``: a variable holding its value and the step that wrote it."""

    def __init__(self, slot: Slot, collection: str, value: Any, static: bool) -> None:
        self.slot = slot
        self.collection = collection
        shape = value.shape if static else tf.TensorShape(None)
        init = tf.zeros([d or 0 for d in value.shape] if value.shape.rank is not None else [], value.dtype)
        self.var = tf.Variable(init, shape=shape, trainable=False, dtype=value.dtype)
        self.stamp = tf.Variable(tf.constant(-1, tf.int64), trainable=False)


class TFGraphTaps:
    """Getting tensors out of TensorFlow graphs (``tf.function``, with or without XLA)."""

    def __init__(self, xla: bool) -> None:
        self.xla = xla
        self.flags = {c: tf.Variable(False, trainable=False) for c in STEP_COLLECTIONS}
        self._wanted = dict.fromkeys(STEP_COLLECTIONS, False)
        self.step = tf.Variable(tf.constant(-1, tf.int64), trainable=False)
        self.taps: dict[tuple[Slot, Any], _TFTap] = {}
        self.skipped: set[str] = set()

    def set_flags(self, wanted: dict[str, bool], step: int) -> None:
        """Before a step: which collections it saves (assigns only what changed)."""
        for c, w in wanted.items():
            if w != self._wanted[c]:
                self.flags[c].assign(w)
                self._wanted[c] = w
        if any(wanted.values()):
            self.step.assign(step)

    def tap(self, collection: str, items: list[tuple[Slot, Any]]) -> None:
        """Inside a trace: store ``items`` when the collection's flag is set at run time."""
        pairs = []
        for slot, value in items:
            value = tf.convert_to_tensor(value)
            static = self.xla
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
                    self.taps[key] = _TFTap(slot, collection, value, static)
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

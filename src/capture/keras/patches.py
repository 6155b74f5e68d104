"""Wrappers set on object instances (and on Keras's ``Mean`` metric class), and how to undo them."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import keras


class Patches:
    """Attributes set on object instances, and how to undo them."""

    def __init__(self) -> None:
        self._saved: list[tuple[Any, str, bool, Any]] = []

    def set(self, obj: Any, attr: str, value: Any) -> None:
        """Set ``obj.attr = value`` on the instance (bypassing Keras's attribute tracking)."""
        had = attr in obj.__dict__
        self._saved.append((obj, attr, had, obj.__dict__.get(attr)))
        object.__setattr__(obj, attr, value)

    def undo(self) -> None:
        """Restore every attribute set, last first."""
        while self._saved:
            obj, attr, had, old = self._saved.pop()
            if had:
                object.__setattr__(obj, attr, old)
            else:
                object.__delattr__(obj, attr)


TrackerListener = Callable[[Any, Any], None]
"""Called with ``(metric, values)`` each time a ``keras.metrics.Mean`` is updated."""

_lock = threading.Lock()
_listeners: list[TrackerListener] = []
_original_update: Any = None


def listen_to_mean_updates(listener: TrackerListener) -> Callable[[], None]:
    """Call ``listener(metric, values)`` on every ``keras.metrics.Mean.update_state``; returns the remover.

    Loss trackers are ``Mean`` metrics (Keras's own ``loss`` and ``<output>_loss``,
    and the ``Mean(name="d_loss")`` of the guides), some created only when the step
    is first traced: so the class is wrapped, while at least one listener is
    registered, and restored when the last one is removed.
    """
    global _original_update
    with _lock:
        if not _listeners:
            _original_update = keras.metrics.Mean.__dict__["update_state"]
            original = _original_update

            def update_state(metric: Any, *args: Any, **kwargs: Any) -> Any:
                values = args[0] if args else kwargs.get("values")
                for fn in list(_listeners):
                    fn(metric, values)
                return original(metric, *args, **kwargs)

            keras.metrics.Mean.update_state = update_state
        _listeners.append(listener)

    def remove() -> None:
        with _lock:
            if listener in _listeners:
                _listeners.remove(listener)
                if not _listeners:
                    keras.metrics.Mean.update_state = _original_update

    return remove

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


TrackerListener = Callable[[Any, Any, bool], None]
"""Called with ``(metric, values, False)`` each time a ``keras.metrics.Mean`` is updated and
with ``(metric, result, True)`` each time its ``result()`` is taken."""

_lock = threading.Lock()
_listeners: list[TrackerListener] = []
_originals: dict[str, Any] = {}


def listen_to_mean_updates(listener: TrackerListener) -> Callable[[], None]:
    """Call ``listener(metric, values, False)`` on every ``keras.metrics.Mean.update_state`` and
    ``listener(metric, result, True)`` on every ``result()``; returns the remover.

    Loss trackers are ``Mean`` metrics (Keras's own ``loss`` and ``<output>_loss``,
    and the ``Mean(name="d_loss")`` of the guides), some created only when the step
    is first traced: so the class is wrapped, while at least one listener is
    registered, and restored when the last one is removed. A step returning
    ``tracker.result()`` returns a running mean, known by that result.
    """
    with _lock:
        if not _listeners:
            _originals.update({a: keras.metrics.Mean.__dict__[a] for a in ("update_state", "result")})
            update, result = _originals["update_state"], _originals["result"]

            def update_state(metric: Any, *args: Any, **kwargs: Any) -> Any:
                values = args[0] if args else kwargs.get("values")
                for fn in list(_listeners):
                    fn(metric, values, False)
                return update(metric, *args, **kwargs)

            def result_of(metric: Any) -> Any:
                out = result(metric)
                for fn in list(_listeners):
                    fn(metric, out, True)
                return out

            keras.metrics.Mean.update_state = update_state
            keras.metrics.Mean.result = result_of
        _listeners.append(listener)

    def remove() -> None:
        with _lock:
            if listener in _listeners:
                _listeners.remove(listener)
                if not _listeners:
                    for attr, original in _originals.items():
                        setattr(keras.metrics.Mean, attr, original)

    return remove

"""Keras 3 adapter: one callback captures a model's tensors from ``fit``, ``evaluate``, ``predict``
and from training loops of your own.

::

    import tensortap.keras as ttk
    model.fit(x, y, validation_data=(xv, yv), epochs=3,
              callbacks=[ttk.Callback(out_dir, include_collections=["weights", "gradients", "losses"])])

Modules: :mod:`.ops` (backend tensors: reductions, host copies, what cannot be
captured), :mod:`.naming` (Keras's logs), :mod:`.patches`
(wrappers on instances and on Keras's ``Mean`` metric, and how to undo them),
:mod:`.transport` (how values leave a compiled step), :mod:`.trainable` (which layers
a TensorFlow step traced anew trains) and :mod:`.events` (the callback: Keras events
to capture calls).
"""

from __future__ import annotations

from ..versions import require

_INSTALL = (
    'pip install "tensortap[keras-tf]" (TensorFlow), "tensortap[keras-jax]" (JAX), or "tensortap[keras]" with torch'
)
try:
    import keras
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"tensortap.keras needs Keras 3 and a backend: {_INSTALL}") from _exc
else:  # Keras 3.15, the oldest the tests pass on: up to 3.14 train_on_batch returns running means (no reset
    # per call) and the torch GRU runs its cell step by step; up to 3.13 a step run eagerly (torch) returns
    # its metrics as Python floats, which were lost
    require(keras, "tensortap.keras", "Keras", (3, 15), _INSTALL)
    if keras.backend.backend() == "jax":
        import jax

        # JAX 0.6.2: under 0.6.0 and 0.6.1 the values of a layer called in a jitted lax.scan (a recurrent
        # layer's cell) are lost without a word
        require(jax, "tensortap.keras", "JAX", (0, 6, 2), 'pip install "tensortap[keras-jax]"')

from .events import Callback  # noqa: E402 (after the version checks)
from .ops import KerasOps  # noqa: E402

__all__ = ["Callback", "KerasOps"]

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

try:
    import keras
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        'tensortap.keras needs Keras 3 and a backend: pip install "tensortap[keras-tf]" (TensorFlow), '
        'or "tensortap[keras]" with jax or torch'
    ) from _exc
if not keras.__version__.startswith("3."):  # pragma: no cover - depends on the environment
    raise ImportError(
        f"tensortap.keras needs Keras 3, found keras {keras.__version__}: "
        'pip install "tensortap[keras-tf]" (TensorFlow), or "tensortap[keras]" with jax or torch'
    )

from .events import Callback
from .ops import KerasOps

__all__ = ["Callback", "KerasOps"]

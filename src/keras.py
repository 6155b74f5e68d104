"""Keras 3 adapter: ``import tensortap.keras as ttk; model.fit(..., callbacks=[ttk.Callback(out_dir)])``.

Importing this module imports Keras (and its backend); see
:mod:`tensortap.capture.keras` for how capture works.
"""

from __future__ import annotations

from .capture.core import module_attribute_error
from .capture.keras import Callback, KerasOps

__all__ = ["Callback", "KerasOps"]
__getattr__ = module_attribute_error(__name__)

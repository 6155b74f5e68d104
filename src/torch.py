"""``import tensortap.torch as ttt``: the PyTorch adapter (see :mod:`tensortap.capture.torch`)."""

from __future__ import annotations

from .capture.core import module_attribute_error
from .capture.torch import Hook, TorchOps, capture

__all__ = ["Hook", "TorchOps", "capture"]
__getattr__ = module_attribute_error(__name__)

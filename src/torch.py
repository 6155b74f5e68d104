"""``import tensortap.torch as ttt``: the PyTorch adapter (see :mod:`tensortap.capture.torch`)."""

from __future__ import annotations

from .capture.torch import Hook, TorchOps, capture

__all__ = ["Hook", "TorchOps", "capture"]

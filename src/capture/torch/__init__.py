"""PyTorch adapter: module, loss, backward and optimizer events that feed a capture session.

``events`` turns PyTorch's events into :class:`tensortap.capture.session.Session`
calls (what a step is: see :mod:`tensortap.capture.torch.events`), ``ops``
reduces tensors on their device, ``patches`` holds what is put on objects
the adapter does not own and how it is taken away.
"""

from __future__ import annotations

from ..versions import require

try:
    import torch
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise ImportError('tensortap.torch needs PyTorch: pip install "tensortap[torch]"') from exc
else:  # torch 2.6: torch.distributed.fsdp.FSDPModule (FSDP2's public home, which events imports at registration);
    # the Lightning and Transformers callbacks reach this check through tensortap.capture.trainers
    require(torch, "tensortap.torch", "PyTorch", (2, 6), 'pip install "tensortap[torch]"')

from .events import Hook, capture
from .ops import TorchOps

__all__ = ["Hook", "TorchOps", "capture"]

"""The write side: the framework-neutral hook core, the capture session, the NumPy writer, shard policy.

Framework adapters live in :mod:`tensortap.torch`, :mod:`tensortap.keras` and
:mod:`tensortap.xgboost`; each imports its framework only when used.
"""

from __future__ import annotations

from .core import Hook, TensorOps, Writer
from .session import Session, flatten
from .writer import ShardPolicy

__all__ = ["Hook", "Session", "ShardPolicy", "TensorOps", "Writer", "flatten"]

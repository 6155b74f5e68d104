"""The write side: the framework-neutral hook core, the NumPy writer, shard policy.

Framework adapters live in :mod:`tensortap.torch`, :mod:`tensortap.keras` and
:mod:`tensortap.xgboost`; each imports its framework only when used.
"""

from __future__ import annotations

from .core import Hook, TensorOps, Writer
from .writer import ShardPolicy

__all__ = ["Hook", "ShardPolicy", "TensorOps", "Writer"]

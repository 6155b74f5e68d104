"""Where records go: the HDF5 shard format and the storage backends."""

from __future__ import annotations

from .registry import ENTRY_POINT_GROUP, get_storage
from .storage import FsspecStorage, LocalStorage, Storage

__all__ = ["ENTRY_POINT_GROUP", "FsspecStorage", "LocalStorage", "Storage", "get_storage"]

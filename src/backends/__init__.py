"""Where records go: the HDF5 shard format and the storage backends."""

from __future__ import annotations

from .layout import UnsafeKey
from .registry import ENTRY_POINT_GROUP, get_storage
from .storage import FsspecStorage, LocalStorage, NotInTrial, Storage

__all__ = ["ENTRY_POINT_GROUP", "FsspecStorage", "LocalStorage", "NotInTrial", "Storage", "UnsafeKey", "get_storage"]

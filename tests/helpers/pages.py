"""Which pages of a file are in the page cache (Linux's ``mincore`` on a mapping of it)."""

from __future__ import annotations

import ctypes
import mmap
import os


def cached_pages(path: str | os.PathLike[str]) -> list[bool]:
    """For each page of the file ``path``, whether it is in the page cache."""
    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        mapped = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        start = ctypes.c_char.from_buffer(mapped)
        pages = (size + page - 1) // page
        vec = (ctypes.c_ubyte * pages)()
        if libc.mincore(ctypes.c_void_p(ctypes.addressof(start)), ctypes.c_size_t(size), vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        del start
        return [bool(v & 1) for v in vec]
    finally:
        mapped.close()

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


def vm_flags(address: int) -> set[str]:
    """The kernel's flags of the mapping of this process that holds ``address`` (``VmFlags`` in
    ``/proc/self/smaps``: ``hg`` where huge pages were asked for with ``madvise``)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and head == "VmFlags:":
                return set(line.split()[1:])
    raise LookupError(f"no mapping holds address {address:#x}")

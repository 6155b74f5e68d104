"""Editing an HDF5 file's bytes as a stranger would: object headers re-checksummed, so HDF5 accepts them."""

from __future__ import annotations

from pathlib import Path

import h5py

_MASK = 0xFFFFFFFF


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _MASK


def lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' lookup3 ``hashlittle``, the checksum of HDF5's version-2 object headers."""
    n = len(data)
    a = b = c = (0xDEADBEEF + n + initval) & _MASK
    i = 0
    while n > 12:
        a = (a + int.from_bytes(data[i : i + 4], "little")) & _MASK
        b = (b + int.from_bytes(data[i + 4 : i + 8], "little")) & _MASK
        c = (c + int.from_bytes(data[i + 8 : i + 12], "little")) & _MASK
        a = (a - c) & _MASK ^ _rot(c, 4)
        c = (c + b) & _MASK
        b = (b - a) & _MASK ^ _rot(a, 6)
        a = (a + c) & _MASK
        c = (c - b) & _MASK ^ _rot(b, 8)
        b = (b + a) & _MASK
        a = (a - c) & _MASK ^ _rot(c, 16)
        c = (c + b) & _MASK
        b = (b - a) & _MASK ^ _rot(a, 19)
        a = (a + c) & _MASK
        c = (c - b) & _MASK ^ _rot(b, 4)
        b = (b + a) & _MASK
        n -= 12
        i += 12
    if n == 0:
        return c
    tail = data[i:] + bytes(12 - n)  # the last block, zero-padded (what the fall-through switch adds)
    a = (a + int.from_bytes(tail[0:4], "little")) & _MASK
    b = (b + int.from_bytes(tail[4:8], "little")) & _MASK
    c = (c + int.from_bytes(tail[8:12], "little")) & _MASK
    c = ((c ^ b) - _rot(b, 14)) & _MASK
    a = ((a ^ c) - _rot(c, 11)) & _MASK
    b = ((b ^ a) - _rot(a, 25)) & _MASK
    c = ((c ^ b) - _rot(b, 16)) & _MASK
    a = ((a ^ c) - _rot(c, 4)) & _MASK
    b = ((b ^ a) - _rot(a, 14)) & _MASK
    c = ((c ^ b) - _rot(b, 24)) & _MASK
    return c


def _chunk_end(data: bytes | bytearray, start: int) -> int:
    """Where the checksum of the version-2 object header at ``start`` (``OHDR``) is."""
    flags = data[start + 5]
    at = start + 6 + (16 if flags & 0x20 else 0) + (4 if flags & 0x10 else 0)
    width = 1 << (flags & 0x03)
    return at + width + int.from_bytes(data[at : at + width], "little")


def header_checksum_ok(data: bytes | bytearray, start: int) -> bool:
    end = _chunk_end(data, start)
    return lookup3(bytes(data[start:end])) == int.from_bytes(data[end : end + 4], "little")


def move_contiguous_data(path: Path, dataset: str, offset: int, size: int | None = None) -> None:
    """Point the contiguous dataset ``dataset`` of the file at ``path`` at ``offset`` (and ``size`` bytes),
    in its layout message, and re-checksum its object header: HDF5 then reads it without complaint."""
    with h5py.File(path, "r") as f:
        ds = f[dataset]
        address, stored = ds.id.get_offset(), ds.id.get_storage_size()
    data = bytearray(path.read_bytes())
    # the layout message (version 3 or 4) of a contiguous dataset: version, class 1, address, size
    pattern = b"\x01" + address.to_bytes(8, "little") + stored.to_bytes(8, "little")
    at = data.find(pattern)
    assert at > 0 and data[at - 1] in (3, 4) and data.find(pattern, at + 1) == -1, "no single layout message"
    start = data.rfind(b"OHDR", 0, at)
    assert header_checksum_ok(data, start)
    data[at + 1 : at + 9] = offset.to_bytes(8, "little")
    if size is not None:
        data[at + 9 : at + 17] = size.to_bytes(8, "little")
    end = _chunk_end(data, start)
    data[end : end + 4] = lookup3(bytes(data[start:end])).to_bytes(4, "little")
    path.write_bytes(bytes(data))

"""CRC-32C (Castagnoli), the checksum of TFRecord framing: the smdebug importer checks it on the event
files it reads, the TensorBoard export writes it."""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["TABLE", "crc32c", "masked_crc32c", "masked_crc32c_rows"]


def _crc32c_table() -> np.ndarray:
    """The byte table of CRC-32C (Castagnoli, reflected polynomial 0x82F63B78)."""
    crc = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        crc = np.where(crc & 1, (crc >> 1) ^ np.uint32(0x82F63B78), crc >> 1)
    return crc


TABLE = _crc32c_table()
"""CRC-32C's byte table: the register after one byte is ``TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)``."""
_TABLE_LIST = TABLE.tolist()  # the same, for the loop over short data
_SHORT = 4096  # below this many bytes, a byte at a time in Python is faster than NumPy's passes


def _moved(columns: np.ndarray, crcs: np.ndarray) -> np.ndarray:
    """``crcs`` mapped by the linear map (over GF(2)) whose image of bit ``i`` is ``columns[i]``."""
    out = np.zeros_like(crcs)
    for bit in range(32):
        out ^= columns[bit] * ((crcs >> bit) & 1)
    return out


@functools.cache
def _zero_bytes(k: int) -> np.ndarray:
    """The linear map (the image of each bit) that ``2**k`` zero bytes make of a CRC register."""
    if k == 0:
        bits = np.uint32(1) << np.arange(32, dtype=np.uint32)
        return TABLE[bits & 0xFF] ^ (bits >> 8)
    half = _zero_bytes(k - 1)
    return _moved(half, half)


def crc32c(data: bytes | memoryview) -> int:
    """CRC-32C (Castagnoli) of ``data``, as TFRecord uses it.

    Long data is cut into lanes of a power-of-two length, about the square root of its size, whose
    CRCs NumPy computes side by side (one pass per byte of a lane), then combined in pairs: a CRC whose
    register starts at zero is linear, so that of ``a + b`` is that of ``a`` carried over ``len(b)`` zero
    bytes (:func:`_zero_bytes`), xor that of ``b``. About 20 times the speed of a byte at a time in Python.
    """
    n = len(data)
    if n < _SHORT:
        crc = 0xFFFFFFFF
        table = _TABLE_LIST
        for byte in bytes(data):
            crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
        return crc ^ 0xFFFFFFFF
    k = ((n - 1).bit_length() + 1) // 2
    lane = 1 << k
    lanes = -(-n // lane)
    padded = np.zeros(lanes * lane, dtype=np.uint8)  # zeros before the data leave a register at zero there
    padded[-n:] = np.frombuffer(data, dtype=np.uint8)
    padded[-n : -n + 4] ^= 0xFF  # the initial register 0xFFFFFFFF is the first four bytes inverted
    crcs = np.zeros(lanes, dtype=np.uint32)
    # the lanes side by side, 8 bytes at a time: a transposed copy byte by byte takes 3 times as long
    for row in padded.view(np.uint64).reshape(lanes, lane // 8).T.copy():
        eight = row.view(np.uint8).reshape(lanes, 8)
        for i in range(8):
            crcs = TABLE[crcs.astype(np.uint8) ^ eight[:, i]] ^ (crcs >> 8)
    crcs = np.concatenate((np.zeros((1 << (lanes - 1).bit_length()) - lanes, dtype=np.uint32), crcs))
    while len(crcs) > 1:
        crcs = _moved(_zero_bytes(k), crcs[0::2]) ^ crcs[1::2]
        k += 1
    return int(crcs[0]) ^ 0xFFFFFFFF


def masked_crc32c(data: bytes | memoryview) -> int:
    """The masked CRC-32C of ``data`` that TFRecord framing stores."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def masked_crc32c_rows(rows: np.ndarray) -> np.ndarray:
    """The masked CRC-32C of each row of ``rows`` (records of one length, as ``uint8``), all at once: one
    NumPy pass per byte of a row, cheaper than :func:`masked_crc32c` of each for many short records."""
    crc = np.full(len(rows), 0xFFFFFFFF, dtype=np.uint32)
    for column in rows.T:
        crc = TABLE[(crc ^ column) & 0xFF] ^ (crc >> 8)
    crc ^= np.uint32(0xFFFFFFFF)
    return ((crc >> 15) | (crc << 17)) + np.uint32(0xA282EAD8)

"""The HDF5 shard format: writing and reading one shard.

A shard holds every tensor a worker saved over a run of consecutive saved
steps. Tensor names map to integer ids; each tensor's values over the shard's
steps are stored together in one dataset, so reading a tensor across many
steps costs one read per shard. ``docs/format.md`` is the normative
description; this module is its only implementation. No framework is imported.
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import json
import logging
import math
import mmap
import os
import re
import stat
import sys
import threading
import time
import zlib
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache, wraps
from itertools import pairwise
from typing import Any, NoReturn, ParamSpec, Protocol, TypeGuard, TypeVar

import h5py
import numpy as np

from ..exceptions import TensortapError
from ..reductions import Histogram, PendingHistogram, resolved
from . import isolated
from .layout import FORMAT_MINOR, FORMAT_VERSION
from .storage import RangedFile, pread_exactly

logger = logging.getLogger("tensortap")

try:
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # not CPython, or a platform without an isal wheel
    _crc32 = zlib.crc32

SHARD_MAGIC = "tensortap-shard"
INDEX_MAGIC = "tensortap-index"
ALL_STEPS = "*"


@dataclass
class TensorRecord:
    """One tensor at one step, as handed to step listeners (in-process rules).

    ``raw`` is a view into the shard buffer: valid while the listener runs;
    copy what you keep.
    """

    name: str
    collections: tuple[str, ...]
    raw: np.ndarray | None = None
    reductions: dict[str, float] = field(default_factory=dict)
    orig_dtype: str | None = None
    #: a :class:`PendingHistogram` only while the step is in progress (listeners get it counted)
    histogram: Histogram | PendingHistogram | None = None


@dataclass
class StepRecord:
    """Everything one worker saved at one step."""

    step: int
    mode: int
    mode_step: int
    tensors: list[TensorRecord] = field(default_factory=list)


PAGE = 4096
"""Bytes of alignment of the values written around the page cache (:func:`page_aligned_empty`): the
file offset, the address in memory and the length of a direct write are multiples of it."""
DIRECT_MIN = 256 << 10
"""Bytes from which a tensor's values are page-aligned in memory and in the shard, and written around
the page cache (``O_DIRECT``) where the file system takes it."""


def page_aligned_empty(shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
    """An uninitialised array; one of :data:`DIRECT_MIN` bytes or more starts on a page (an anonymous
    mapping of its own, given back to the system when the array is freed), so that a shard can write
    it with ``O_DIRECT``. Its ``base`` is the mapping: a view of it keeps a reference to the array
    itself, as :meth:`BufferPool.put` expects."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < DIRECT_MIN:
        return np.empty(shape, dtype=dtype)
    mapping = mmap.mmap(-1, nbytes)
    if hasattr(mmap, "MADV_HUGEPAGE"):  # as NumPy advises for its own large arrays
        mapping.madvise(mmap.MADV_HUGEPAGE)
    return np.ndarray(shape, dtype=dtype, buffer=mapping)


POPULATED_MIN = 32 << 20
"""Bytes from which a read lands in memory mapped for it at once (:func:`read_buffer`): glibc's largest
threshold for mapping an allocation of its own, so memory that ``malloc`` would map afresh for each read
too, never recycled."""


def read_buffer(shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
    """An uninitialised array that a read fills at once; one of :data:`POPULATED_MIN` bytes or more is an
    anonymous mapping of its own whose pages are all made in the one call (``MAP_POPULATE``, Linux).

    NumPy asks the kernel for huge pages for arrays of 4 MiB or more (``MADV_HUGEPAGE``), and where the
    kernel compacts memory to make them (``defrag`` ``madvise``, the default of Debian and Ubuntu) the
    first read of large values in a process waited for it: 1.6 GB of values in blocks of 160 MB read in
    1.0-8.9 s (median 3.3), against 0.85-1.2 s into small pages made at once. Later reads of as much in
    the same process, which find the huge pages the earlier ones freed, took 0.5-1.8 s (median 0.6)
    against 0.8-2.0 (median 1.0). Smaller reads keep NumPy's memory, which ``malloc`` recycles: a
    ``value(step)`` loop over 5 MiB values took 0.25 s (18 page faults) and 0.7 s in mappings of their
    own (384,000) (bench/profiles/read.md, session 28).
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < POPULATED_MIN or not hasattr(mmap, "MAP_POPULATE"):
        return np.empty(shape, dtype=dtype)
    try:
        mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
    except OSError as exc:  # the system refuses the memory: said as NumPy says it, not as a storage error
        raise MemoryError(f"cannot allocate {nbytes} bytes to read values into: {exc.strerror}") from None
    return np.ndarray(shape, dtype=dtype, buffer=mapping)


def _references_in_a_callee(arr: object) -> int:
    """``sys.getrefcount`` of ``arr`` inside a function it was passed to from a variable of its caller."""
    return sys.getrefcount(arr)


def _count_references_in_a_callee() -> int:
    held = object()
    return _references_in_a_callee(held)


#: References to an array :meth:`BufferPool.put` is given when nothing else holds it: the caller's
#: variable, put's own and getrefcount's argument (3), and on Python 3.10 the caller's evaluation stack too.
UNVIEWED_REFERENCES = _count_references_in_a_callee()


class BufferPool:
    """Recycles the stacked arrays of published shards, so that steady-state capture
    copies each value once into memory that is already mapped (no page faults).

    Holds at most ``max_bytes`` (counted in full, touched or not): a full pool drops the
    arrays given back longest ago, which were sized for shards that are no longer written.
    Arrays are filed by dtype, row shape and number of rows, so that taking and giving
    back one costs the same with thousands of tensors of one shape pooled.

    An array given back while a view of it is still referenced (the records of a step in
    progress, when its shard was handed off during that step: full, or due by time) is pooled once
    its views are gone, checked at the next :meth:`get`; such arrays count towards
    ``max_bytes`` too, and the oldest are forgotten past it (a step listener that keeps
    every record).
    """

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = max_bytes
        # (dtype, row shape) -> rows -> the arrays, by id
        self._free: dict[tuple[str, tuple[int, ...]], dict[int, dict[int, np.ndarray]]] = {}
        self._order: dict[int, np.ndarray] = {}  # every pooled array by id, oldest first
        self._bytes = 0
        self._viewed: list[np.ndarray] = []  # given back while viewed, oldest first
        self._viewed_bytes = 0
        self._lock = threading.Lock()

    def get(self, dtype: np.dtype[Any], shape: tuple[int, ...], rows: int) -> np.ndarray:
        """An uninitialised array of at least ``rows`` rows of ``shape``."""
        with self._lock:
            if self._viewed:
                self._reclaim()
            sizes = self._free.get((dtype.str, shape), {})
            fitting = [n for n in sizes if n >= rows]
            if fitting:  # the smallest that fits (a bigger one is left for a longer shard), the last given back
                arr = next(reversed(sizes[min(fitting)].values()))
                self._drop(arr)
                return arr
        return page_aligned_empty((rows, *shape), dtype)

    def put(self, arr: np.ndarray) -> None:
        """Give back ``arr`` (once: the caller keeps no reference to it); one larger than the pool is dropped."""
        if arr.nbytes > self.max_bytes:
            logger.debug("shard array of %d bytes not pooled: too large", arr.nbytes)
            return
        viewed = sys.getrefcount(arr) > UNVIEWED_REFERENCES
        with self._lock:
            if viewed:
                self._viewed.append(arr)
                self._viewed_bytes += arr.nbytes
                self._forget_viewed()
            else:
                self._add(arr)

    def _add(self, arr: np.ndarray) -> None:
        """Pool ``arr``, dropping the arrays given back longest ago to make room (the caller holds the lock)."""
        self._forget_viewed(arr.nbytes)  # those first: they may never come back
        while self._order and self._bytes + self._viewed_bytes + arr.nbytes > self.max_bytes:
            self._drop(next(iter(self._order.values())))
        sizes = self._free.setdefault((arr.dtype.str, arr.shape[1:]), {})
        sizes.setdefault(arr.shape[0], {})[id(arr)] = arr
        self._order[id(arr)] = arr
        self._bytes += arr.nbytes

    def _forget_viewed(self, room: int = 0) -> None:
        """Forget the oldest arrays given back while viewed until ``room`` more bytes fit (the caller
        holds the lock): they are freed with their last view."""
        while self._viewed and self._bytes + self._viewed_bytes + room > self.max_bytes:
            arr = self._viewed.pop(0)
            self._viewed_bytes -= arr.nbytes
            # a step listener keeping a record (a view of its row) makes every shard's arrays new memory
            logger.debug("shard array of %d bytes not pooled: still viewed", arr.nbytes)

    def _reclaim(self) -> None:
        """Pool the arrays given back while viewed whose views are gone (the caller holds the lock)."""
        viewed, self._viewed, self._viewed_bytes = self._viewed, [], 0
        for arr in viewed:
            if sys.getrefcount(arr) > 3:  # references: the list, ``arr`` and getrefcount's argument
                self._viewed.append(arr)
                self._viewed_bytes += arr.nbytes
            else:
                self._add(arr)

    def _drop(self, arr: np.ndarray) -> None:
        """Take ``arr`` out of the pool (the caller holds the lock)."""
        key = (arr.dtype.str, arr.shape[1:])
        sizes = self._free[key]
        same = sizes[arr.shape[0]]
        del same[id(arr)]
        if not same:
            del sizes[arr.shape[0]]
            if not sizes:
                del self._free[key]
        del self._order[id(arr)]
        self._bytes -= arr.nbytes

    def clear(self) -> None:
        """Drop every pooled array."""
        with self._lock:
            self._free.clear()
            self._order.clear()
            self._bytes = 0
            self._viewed.clear()
            self._viewed_bytes = 0


POOL = BufferPool()
_FIRST_RESERVE = 64 << 20  # bytes a tensor's stacked array may reserve up front (untouched pages cost nothing)
# a buffer's arrays reserve at most this many times its bytes: the bench's MLP's first shard reserves
# 3.3 times (a tighter bound made tensors grow there, and the arrays they grew out of stayed pooled)
_RESERVE_SHARDS = 4


class _Column:
    """One tensor's values within the shard being built."""

    __slots__ = ("collections", "data", "hist", "n", "orig_dtype", "ragged", "red", "steps")

    def __init__(self) -> None:
        self.collections: set[str] = set()
        self.steps: list[int] = []  # steps with a raw value
        self.data: np.ndarray | None = None  # stacked rows while every value has one shape and dtype
        self.n = 0
        self.ragged: list[np.ndarray] | None = None
        self.red: list[tuple[int, str, float]] = []
        # a pending one is counted by the counting thread, or when the shard is written at the latest
        self.hist: list[tuple[int, Histogram | PendingHistogram]] = []
        self.orig_dtype: str | None = None

    def add_raw(self, step: int, value: np.ndarray, reserve: Callable[[int], int]) -> np.ndarray:
        """Copy ``value`` in as the row of ``step``; ``reserve(nbytes)`` is how many rows of values
        of ``nbytes`` to reserve at first (asked only when the rows are made)."""
        self.steps.append(step)
        if self.data is not None and self.n == 0 and self.conflicts(value):
            self.release()
        if self.ragged is None and self.data is None:
            self.data = POOL.get(value.dtype, value.shape, reserve(value.nbytes))
        elif self.ragged is None and self.data is not None and self.data.shape[1:] != value.shape:
            self.ragged = [self.data[i].copy() for i in range(self.n)]
            POOL.put(self.data)
            self.data, self.n = None, 0
        if self.ragged is not None:
            self.ragged.append(np.array(value, copy=True))
            return self.ragged[-1]
        assert self.data is not None
        if self.n == self.data.shape[0]:  # outgrown: freed, not pooled (no shard would take it)
            bigger = POOL.get(self.data.dtype, self.data.shape[1:], 2 * self.n)
            bigger[: self.n] = self.data[: self.n]
            self.data = bigger
        self.data[self.n] = value
        self.n += 1
        return self.data[self.n - 1]

    def conflicts(self, value: np.ndarray) -> bool:
        """Whether ``value`` has another dtype than the values stored (one dtype per tensor and shard)."""
        if self.ragged is not None:
            return bool(self.ragged) and self.ragged[0].dtype != value.dtype
        return self.data is not None and self.data.dtype != value.dtype

    def pop_raw(self) -> None:
        self.steps.pop()
        if self.ragged is not None:
            self.ragged.pop()
        else:
            self.n -= 1

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` raw values (``add_raw`` records the step before the value)."""
        del self.steps[n:]
        if self.ragged is not None:
            del self.ragged[n:]
        else:
            self.n = min(self.n, n)

    def last_raw(self) -> np.ndarray:
        return self.ragged[-1] if self.ragged is not None else self.data[self.n - 1]  # type: ignore[index]

    def nbytes(self) -> int:
        """Bytes of the raw values."""
        if self.ragged is not None:
            return sum(a.nbytes for a in self.ragged)
        return 0 if self.data is None else self.data[: self.n].nbytes

    def values(self) -> list[np.ndarray] | np.ndarray:
        if self.ragged is not None:
            return self.ragged
        assert self.data is not None
        return self.data[: self.n]

    def release(self) -> None:
        if self.data is not None:
            data, self.data = self.data, None
            POOL.put(data)


class ShardBuffer:
    """The shard being built: values are copied once, at :meth:`stage`, into
    per-tensor stacked arrays; a step counts once :meth:`commit` is called.

    Parameters
    ----------
    max_steps, max_bytes
        The shard's limits (:class:`~tensortap.capture.ShardPolicy`): a tensor's
        stacked array is sized for them at once, so it rarely has to grow.
    rows
        Steps this shard is expected to hold at most (see :meth:`successor`): a tensor's stacked
        array reserves that many rows (within ``max_bytes``), so that it does not grow, a copy
        of every row so far on the training thread, in the middle of the shard.
    """

    def __init__(self, max_steps: int = 1000, max_bytes: int = 256 << 20, rows: int = 0) -> None:
        self.max_steps = max_steps
        self.max_bytes = max_bytes
        self.rows = rows
        self.steps: list[tuple[int, int, int]] = []
        self.wall_times: list[float] = []  # time.time() at each commit
        self.columns: dict[str, _Column] = {}
        self.nbytes = 0
        self._staged: list[tuple[str, int, bool, int]] = []  # name, step, raw added, reductions added
        self._staged_keys: set[tuple[str, int]] = set()  # (name, step) of _staged: a lookup per tensor, not a scan
        self._reserved = 0  # bytes of the rows :meth:`_reserve` granted

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def staging(self) -> bool:
        """Whether values of a step that is not committed yet are in the buffer."""
        return bool(self._staged)

    def stage(
        self,
        step: int,
        name: str,
        collections: Sequence[str],
        raw: np.ndarray | None,
        reductions: dict[str, float],
        orig_dtype: str | None,
        histogram: Histogram | PendingHistogram | None = None,
    ) -> np.ndarray | None:
        """Copy one tensor of the step in progress into the buffer; return the stored raw value."""
        col = self.columns.get(name)
        if col is None:
            col = self.columns[name] = _Column()
        col.collections.update(collections)
        if orig_dtype:
            col.orig_dtype = orig_dtype
        stored = None
        if (name, step) in self._staged_keys:  # twice in one step: the last wins
            if col.steps and col.steps[-1] == step:
                col.pop_raw()
            col.red = [r for r in col.red if r[0] != step]
            self._staged = [(n, s, r and n != name, 0 if n == name else k) for n, s, r, k in self._staged]
        if raw is not None:
            stored = col.add_raw(step, raw, self._reserve)
            self.nbytes += raw.nbytes
        if reductions:
            col.red.extend((step, k, float(v)) for k, v in reductions.items())
        self.nbytes += 24 * len(reductions) + 64
        if histogram is not None:
            if col.hist and col.hist[-1][0] == step:  # the same name twice in one step: last wins
                col.hist.pop()
            col.hist.append((step, histogram))
            # the counts (a pending histogram's values are bounded by the counting thread's limit instead)
            self.nbytes += histogram.edges.nbytes + 8 * (len(histogram.edges) - 1)
        self._staged_keys.add((name, step))
        self._staged.append((name, step, raw is not None, len(reductions)))
        return stored

    def _reserve(self, nbytes: int) -> int:
        """Rows a tensor's stacked array reserves for values of ``nbytes``: :attr:`rows` rounded up to
        a power of two (so that shards of about the same length reuse pooled arrays); without that
        hint (the first shard), as many as :data:`_FIRST_RESERVE` allows.

        The rows of all the buffer's arrays reserve at most :data:`_RESERVE_SHARDS` times
        :attr:`max_bytes` (plus a row each), which a hint never reaches: untouched pages cost no
        memory, but the address space they reserve counts where the system refuses to overcommit it
        (``vm.overcommit_memory=2``, a ``ulimit -v``), where a first shard of hundreds of large
        tensors asked for gigabytes of it. A tensor that finds the reservation spent grows
        (:meth:`_Column.add_raw`)."""
        size = max(nbytes, 1)
        fits = self.max_bytes // size + 1
        if self.rows:
            rows = min(1 << (self.rows - 1).bit_length(), fits)
        else:
            rows = min(self.max_steps, fits, _FIRST_RESERVE // size)
        rows = max(min(rows, (_RESERVE_SHARDS * self.max_bytes - self._reserved) // size + 1), 1)
        self._reserved += rows * nbytes
        return rows

    def successor(self) -> ShardBuffer:
        """An empty buffer for the next shard, with the same limits, that reserves the rows a full
        shard of steps like this one's holds (a shard closed early, by time, is no guide)."""
        rows = 0
        if self.steps:
            rows = min(self.max_steps, self.max_bytes // max(self.nbytes // len(self.steps), 1) + 1)
        return ShardBuffer(self.max_steps, self.max_bytes, rows)

    def conflicts(self, name: str, raw: np.ndarray | None) -> bool:
        """Whether staging ``raw`` under ``name`` would change the tensor's dtype within this shard."""
        col = self.columns.get(name)
        if raw is None or col is None or not col.conflicts(raw):
            return False
        return not (col.steps and col.steps[-1] == self._step_in_progress())  # else it replaces this step's value

    def _step_in_progress(self) -> int | None:
        return self._staged[-1][1] if self._staged else None

    def detach_staged(self) -> ShardBuffer:
        """Move the values of the step in progress into a new buffer, and return it."""
        moved = self.successor()
        for name, step, raw, n_red in self._staged:
            col = self.columns[name]
            value = np.array(col.last_raw(), copy=True) if raw else None
            reds = {k: v for _, k, v in col.red[len(col.red) - n_red :]}
            hist = col.hist[-1][1] if col.hist and col.hist[-1][0] == step else None
            moved.stage(step, name, sorted(col.collections), value, reds, col.orig_dtype, hist)
        self.rollback()
        return moved

    def commit(self, step: int, mode: int, mode_step: int) -> None:
        """The step in progress is complete."""
        self.wall_times.append(time.time())  # first: an interrupt between the two leaves a time rollback drops
        self.steps.append((step, mode, mode_step))
        self._staged = []
        self._staged_keys = set()

    def rollback(self) -> None:
        """Drop every value of a step that is not committed.

        Works from the committed steps rather than from what :meth:`stage` recorded,
        so that it is also right when a signal handler (SIGTERM) runs it while
        :meth:`stage` is half-way through adding a value.
        """
        del self.wall_times[len(self.steps) :]
        last = self.steps[-1][0] if self.steps else -1
        for name, col in list(self.columns.items()):
            col.truncate(sum(1 for s in col.steps if s <= last))
            col.red = [r for r in col.red if r[0] <= last]
            col.hist = [h for h in col.hist if h[0] <= last]
            if not col.steps and not col.red and not col.hist:
                col.release()
                del self.columns[name]
        self._staged = []
        self._staged_keys = set()

    def release(self) -> None:
        """Give the stacked arrays back to the pool (after the shard is written)."""
        for col in self.columns.values():
            col.release()
        self.columns = {}


def _bytes_of(out: np.ndarray) -> memoryview:
    """The bytes of the C-contiguous array ``out`` (of any dtype), to read into or checksum."""
    return out.reshape(-1).view(np.uint8).data


def crc32(value: np.ndarray) -> int:
    """CRC-32 of the bytes of ``value`` in C order (the checksum of format version 2).

    Computed with ISA-L where the ``isal`` package is installed (a dependency on CPython: about
    6x the speed of zlib's, measured in ``bench/profiles/torch.md``), else with :func:`zlib.crc32`;
    both compute the same checksum and release the GIL.
    """
    data = np.ascontiguousarray(value)
    try:
        return _crc32(data.data)
    except ValueError:  # a longdouble array in an explicit byte order (as HDF5 gives it) has no buffer
        return _crc32(_bytes_of(data))  # a view of its bytes, 10x slower than the buffer on small values


# The shard is laid out with h5py's low-level API (h5g, h5d, h5a), which makes the same objects as
# its high-level one (datasets without access times, ASCII names) in half the interpreter time per
# object. h5py holds the GIL for the whole of every HDF5 call, which the training thread waits for
# meanwhile, so the layout of a shard is recorded as a plan (:class:`_Plan`) and made by
# :func:`lay_out` in a helper process (:class:`Layouts`) where one runs: a shard of 1,500 small
# tensors is about 0.5 ms of HDF5 work a tensor (bench/profiles/torch.md).
Node = Any  # an h5py low-level file, group or dataset identifier (h5py has no type hints)


def _dcpl() -> Any:
    """Dataset creation properties: no access times (as h5py's ``create_dataset``), and the space
    allocated at creation, so that the values can be written at its offset afterwards (no fill
    value is set, so none is written)."""
    plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    plist.set_obj_track_times(False)
    plist.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    return plist


_DCPL = _dcpl()
_SCALAR = h5py.h5s.create_simple(())
_H5_MAX_RANK = 32
"""HDF5's most dimensions of a dataset: a tensor of more (its steps' axis included) is stored as ragged."""
_RAW_KINDS = "biufc"  # dtypes stored in the file as their bytes in memory (bool as an 8-bit enum)


@lru_cache(maxsize=256)
def _h5_type(dtype: np.dtype[Any], logical: bool = True) -> Any:
    """HDF5's type for ``dtype``, as h5py makes it (``logical``: the stored type, else the
    in-memory one)."""
    return h5py.h5t.py_create(dtype, logical=logical)


_WRITEBACK_EVERY = 8 << 20  # bytes of values between two starts of the write-out
_IOV_MAX = 1024  # pieces one os.pwritev takes (POSIX's least IOV_MAX)


def _sync_file_range() -> Callable[[int], object] | None:
    """Linux's ``sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)``: start writing a file's dirty
    pages to disk without waiting; None where it does not exist."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range if sys.platform == "linux" else None
    except (OSError, AttributeError):
        return None
    if fn is None:
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return lambda fd: fn(fd, 0, 0, 2)


_START_WRITEBACK = _sync_file_range()

Op = list[Any]
"""One step of a shard's layout, JSON-able (:func:`lay_out`): ``["g", parent, name]`` a group,
``["d", parent, name, dtype, shape]`` a dataset whose space is allocated, ``["w", parent, name,
array]`` a dataset HDF5 writes (``array``: an index into the plan's arrays), ``["a", object, name,
dtype, value]`` a scalar attribute (``dtype`` ``"S"``: UTF-8 text). Objects are numbered in the
order they are made, the file being 0; a dataset's attributes follow it at once."""


class _Plan:
    """A shard's HDF5 objects, recorded to be made by :func:`lay_out`; its data is written with
    ``os.pwritev`` at the offsets HDF5 allocated, once HDF5 has closed the file. ``pwritev`` releases
    the GIL, which HDF5 (through h5py) holds while it copies data in (an every-step shard of
    ``bench`` holds 86 MB of values); each write through HDF5 also costs 60 us of set-up, as much as
    creating the dataset.

    Data HDF5 must transform (compressed, or of a type not stored as its bytes in memory) is
    written by HDF5, in this process.

    Parameters
    ----------
    compression
        The shard's compression of values (:func:`prepare_shard`).
    writeback
        Start the disk write of the file every :data:`_WRITEBACK_EVERY` bytes, so that the disk
        writes the first values while the next are written, and the ``fsync`` when the shard is
        published waits for the tail only (``bench/profiles/torch.md``: a shard written 25-30%
        faster). Advisory: a failure is ignored, the ``fsync`` still makes the shard durable.
    """

    ROOT = 0

    def __init__(self, compression: str | None, writeback: bool) -> None:
        self.compression = compression
        self.ops: list[Op] = []
        self.arrays: list[tuple[np.ndarray, str | None]] = []  # data HDF5 writes, with its compression
        self._start_writeback = _START_WRITEBACK if writeback else None
        self._objects = 1
        self._allocated = 0  # datasets of kind "d"
        self._later: list[tuple[int, int, np.ndarray]] = []  # allocated dataset number, offset in it, data
        self._slots: dict[int, int] = {}  # object number of an allocated dataset with data -> its number
        self._offsets: list[int] = []  # of the allocated datasets, once made

    def _made(self, op: Op) -> int:
        self.ops.append(op)
        self._objects += 1
        return self._objects - 1

    def group(self, parent: int, name: str) -> int:
        """A group ``name`` of ``parent``."""
        return self._made(["g", parent, name])

    def attr(self, obj: int, name: str, value: str | int | np.generic) -> None:
        """An attribute of ``obj`` holding ``value``: a NumPy scalar, an int (int64), or text, stored
        as a fixed-length UTF-8 string in the checksummed object header (a variable-length string
        would go to HDF5's global heap, which has no checksum)."""
        if isinstance(value, str):
            self.ops.append(["a", obj, name, "S", value])
        else:
            data = np.asarray(value)
            self.ops.append(["a", obj, name, data.dtype.str, data.item()])

    def add(self, parent: int, name: str, data: np.ndarray, values: bool = False) -> int:
        """The dataset ``name`` of ``parent``, holding ``data`` (tensor ``values``: compressed, if the
        shard is)."""
        compression = self.compression if values and data.size else None
        if compression is None and data.dtype.kind in _RAW_KINDS:
            made = self._made(["d", parent, name, data.dtype.str, list(data.shape)])
            if data.size:
                self._later.append((self._allocated, 0, data))
                self._slots[made] = self._allocated
            self._allocated += 1
            return made
        self.arrays.append((data, compression))
        return self._made(["w", parent, name, len(self.arrays) - 1])

    def joined(self, parent: int, name: str, parts: Sequence[np.ndarray]) -> int:
        """The uint8 dataset ``name`` of ``parent`` holding the bytes of ``parts`` one after another
        (each C-contiguous, of a kind stored as its bytes: :data:`_RAW_KINDS`)."""
        made = self._made(["d", parent, name, "|u1", [sum(part.nbytes for part in parts)]])
        at = 0
        for part in parts:
            if part.nbytes:
                self._later.append((self._allocated, at, part))
                self._slots[made] = self._allocated
                at += part.nbytes
        self._allocated += 1
        return made

    def checked(self, parent: int, name: str, data: np.ndarray) -> None:
        """A dataset that carries the CRC-32 of its bytes in its ``crc32`` attribute."""
        self.attr(self.add(parent, name, data), "crc32", np.uint32(crc32(data)))

    def json(self, parent: int, name: str, obj: Any) -> None:
        """A checked dataset of ``obj`` as UTF-8 JSON bytes."""
        self.checked(parent, name, np.frombuffer(json.dumps(obj, ensure_ascii=False).encode("utf-8"), dtype=np.uint8))

    def offset(self, obj: int) -> int | None:
        """The file offset of the bytes of dataset ``obj`` once the file is made, if this plan writes them
        (a dataset :meth:`add` allocated, not empty); else None."""
        slot = self._slots.get(obj)
        return None if slot is None else self._offsets[slot]

    def make(self, path: str) -> None:
        """Create the HDF5 file ``path`` (in the layout process when it can), without the data
        :meth:`write_data` writes."""
        path = os.path.abspath(path)  # the layout process keeps the directory it started in
        offsets = LAYOUTS.lay_out(path, self.ops) if not self.arrays else None
        if offsets is None:
            offsets = lay_out(path, self.ops, self.arrays)
        self._offsets = offsets
        self.arrays = []  # written: views of the shard's arrays go, so that they can go back to the pool

    def write_data(self, path: str) -> None:
        """Write the data of the datasets :meth:`add` allocated into the file :meth:`make` made.
        Makes no HDF5 call (any thread may run it: see :class:`PreparedShard`)."""
        placed = [(self._offsets[number] + at, _bytes(data)) for number, at, data in self._later]
        self._later = []  # as in make
        fd = os.open(path, os.O_WRONLY)
        try:
            placed = _write_direct(path, placed)
            pending = 0  # bytes since the write-out was last started
            for start, pieces in _runs(placed):
                _pwrite_all(fd, pieces, start)
                pending += sum(len(p) for p in pieces)
                if self._start_writeback is not None and pending >= _WRITEBACK_EVERY:
                    self._start_writeback(fd)
                    pending = 0
        finally:
            os.close(fd)


def _bytes(data: np.ndarray) -> memoryview:
    """The bytes of ``data`` in memory (a copy only if it is not contiguous)."""
    return memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8).data)


DIRECT = hasattr(os, "O_DIRECT")
"""Whether large values are written around the page cache (:func:`_write_direct`): Linux has
``O_DIRECT``; macOS and Windows do not, and write every value through the page cache."""
_NO_DIRECT: set[int] = set()
"""Devices (``st_dev``) whose file system refused ``O_DIRECT`` (``EINVAL``: tmpfs before Linux 6.6,
some network file systems): this process writes shards there through the page cache."""


def _write_direct(path: str, placed: list[tuple[int, memoryview]]) -> list[tuple[int, memoryview]]:
    """Write the page-aligned part of each large value of ``placed`` (file offset, bytes) around the
    page cache, with ``O_DIRECT``; return what is left to write through it: the small values and the
    tails of the large ones (their last partial page).

    A shard is written once and read later: through the page cache, the kernel first copies every
    byte into cache pages, which took the writer thread more CPU than the training step on the
    benchmark's machine (``bench/profiles/torch.md``, session 16). The values laid out for it start
    on a page of the file (:func:`lay_out`) and of memory (:func:`page_aligned_empty`). Where the
    file system refuses ``O_DIRECT`` everything goes through the page cache, as on systems without it.
    """
    if not DIRECT:
        return placed
    direct: list[tuple[int, memoryview]] = []
    rest: list[tuple[int, memoryview]] = []
    for offset, data in placed:
        large = len(data) >= DIRECT_MIN and offset % PAGE == 0 and _address(data) % PAGE == 0
        (direct if large else rest).append((offset, data))
    if not direct:
        return placed
    device = os.stat(path).st_dev
    if device in _NO_DIRECT:
        return placed
    try:
        fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        _NO_DIRECT.add(device)
        return placed
    try:
        for offset, data in direct:
            head = 0 if device in _NO_DIRECT else len(data) - len(data) % PAGE
            try:
                for at in range(0, head, _WRITEBACK_EVERY):
                    _pwrite_all(fd, [data[at : min(head, at + _WRITEBACK_EVERY)]], offset + at)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                _NO_DIRECT.add(device)  # this value and the next are written through the page cache
                head = 0
            if head < len(data):
                rest.append((offset + head, data[head:]))
    finally:
        os.close(fd)
    return rest


def _address(data: memoryview) -> int:
    """The address in memory of ``data``'s first byte."""
    return np.frombuffer(data, dtype=np.uint8).ctypes.data


def _runs(placed: Iterable[tuple[int, memoryview]]) -> Iterator[tuple[int, list[memoryview]]]:
    """The bytes of ``placed`` (file offset, data) as runs of adjacent pieces, each run at most
    :data:`_WRITEBACK_EVERY` bytes (a larger array is cut into pieces of that size): one write per
    run. HDF5 puts small datasets' space next to each other, so the 4,500 datasets of a shard of
    1,500 small tensors take a few writes."""
    start, end, size = 0, 0, 0
    run: list[memoryview] = []
    for offset, raw in sorted(placed, key=lambda p: p[0]):
        for at in range(0, len(raw), _WRITEBACK_EVERY):
            piece = raw[at : at + _WRITEBACK_EVERY]
            if run and (offset + at != end or size + len(piece) > _WRITEBACK_EVERY or len(run) == _IOV_MAX):
                yield start, run
                run, size = [], 0
            if not run:
                start = offset + at
            run.append(piece)
            size += len(piece)
            end = offset + at + len(piece)
    if run:
        yield start, run


# HDF5's own file lock (``flock``) is not taken while a shard is written: the shard has a temporary name
# that nobody else opens. A lock taken while the process forks (the layout helper starting, a DataLoader
# worker) stays held by the child, which shares the open file, until the child closes it or exits; a
# reader then failed to open the published shard ("unable to lock file", seen under load in CI). Readers
# keep HDF5's default (a shared lock), which a user's own h5py handle on the same file must match.
_HDF5 = h5py.version.hdf5_version_tuple
# the HDF5 versions that can turn the lock off (h5py's own condition): 1.10.7+ of 1.10, and 1.12.1+
_NO_LOCKING: dict[str, Any] = {"locking": False} if _HDF5 >= (1, 12, 1) or (1, 10, 7) <= _HDF5 < (1, 11) else {}


def lay_out(path: str, ops: Sequence[Op], arrays: Sequence[tuple[np.ndarray, str | None]] = ()) -> list[int]:
    """Create the HDF5 file ``path`` holding the objects of ``ops`` (:data:`Op`); return the file
    offset of each allocated dataset's space, in order (0 for an empty one).

    Runs in the layout process (:class:`Layouts`) or in the writer's: ``arrays`` (the data HDF5
    writes) only in the writer's.
    """
    offsets: list[int] = []
    with h5py.File(
        path, "w", libver=("v110", "v110"), alignment_threshold=DIRECT_MIN, alignment_interval=PAGE, **_NO_LOCKING
    ) as file:
        objects: list[Node] = [file.id]  # groups and the file; a dataset is kept while it is the last made
        last: Node = None
        for op in ops:
            kind = op[0]
            if kind == "a":
                _, obj, name, dtype, value = op
                data = np.asarray(np.bytes_(value.encode("utf-8"))) if dtype == "S" else np.asarray(value, dtype=dtype)
                target = objects[obj]
                if target is None:  # a dataset: its attributes follow it
                    if obj != len(objects) - 1:
                        raise ValueError(f"an attribute of dataset {obj} after other objects")
                    target = last
                attr = h5py.h5a.create(target, name.encode(), _h5_type(data.dtype), _SCALAR)
                attr.write(data, mtype=_h5_type(data.dtype, False))
                continue
            parent, name = objects[op[1]], op[2]
            if kind == "g":
                made = h5py.h5g.create(parent, name.encode())
            elif kind == "d":
                made = _allocated(parent, name, np.dtype(op[3]), tuple(op[4]))
                offsets.append(made.get_offset() or 0)
            else:
                data, compression = arrays[op[3]]
                if compression is not None:
                    made = h5py.Group(parent).create_dataset(name, data=data, compression=compression, shuffle=True).id
                else:
                    made = _allocated(parent, name, data.dtype, data.shape)
                    if data.size:
                        made.write(h5py.h5s.ALL, h5py.h5s.ALL, np.ascontiguousarray(data))
            objects.append(made if kind == "g" else None)
            last = made
    return offsets


def _allocated(parent: Node, name: str, dtype: np.dtype[Any], shape: tuple[int, ...]) -> Node:
    """A dataset of ``parent`` whose space is allocated at once (:data:`_DCPL`), nothing written."""
    return h5py.h5d.create(parent, name.encode(), _h5_type(dtype), h5py.h5s.create_simple(shape), dcpl=_DCPL)


def _pwrite_all(fd: int, pieces: list[memoryview], offset: int) -> None:
    """Write ``pieces`` one after the other from ``offset`` (``os.pwritev``, which releases the
    GIL), until every byte is written."""
    first = 0
    while first < len(pieces):
        if len(pieces) - first > 1 and hasattr(os, "pwritev"):  # not on macOS before 11
            n = os.pwritev(fd, pieces[first:], offset)
        else:
            n = os.pwrite(fd, pieces[first], offset)
        if n <= 0:  # a regular file raises instead (ENOSPC); never loop on a file that takes nothing
            raise OSError(f"writing the shard: nothing written at offset {offset}")
        offset += n
        while n and n >= len(pieces[first]):
            n -= len(pieces[first])
            first += 1
        if n:
            pieces[first] = pieces[first][n:]


def lay_out_or_error(path: str, ops: list[Op]) -> list[int] | str:
    """:func:`lay_out` in the layout process: the offsets, or why it failed (an ``OSError``, as a
    full disk, or the ``RuntimeError`` HDF5 raises when a full disk fails its last flush; the writer's
    process then lays the shard out itself, and raises it)."""
    try:
        return lay_out(path, ops)
    except (OSError, ValueError, RuntimeError) as exc:
        return f"{type(exc).__name__}: {exc}"


LAYOUT_SECONDS = 600.0
"""Time one shard's layout may take in the layout process before it is laid out in the writer's."""
CLOSE_SECONDS = 5.0
"""Time :meth:`Layouts.close` (at exit) waits for a layout in flight."""


class Layouts:
    """Lays shards out (:func:`lay_out`) in one helper process, where HDF5 holding the GIL does not
    stall the training thread: the writer thread waits for the answer without the GIL.

    The process starts in the background at the first shard, which is laid out in the writer's
    process, as is any shard while the helper is starting or cannot run (a shard whose data HDF5
    must write, compressed shards included). If the helper fails (it dies, or takes longer than
    :data:`LAYOUT_SECONDS`), one warning says so and shards are laid out in the writer's process
    from then on. ``TENSORTAP_LAYOUT_PROCESS=0`` keeps the layout in the writer's process, as does
    a frozen application (PyInstaller), whose executable would run the application again.
    """

    def __init__(self) -> None:
        # a frozen application's executable is the application itself, not a Python to run code with
        python = bool(sys.executable) and not getattr(sys, "frozen", False)
        self.enabled = python and os.environ.get("TENSORTAP_LAYOUT_PROCESS", "1") != "0"
        self._reset()

    def _reset(self) -> None:
        """A helper not started yet (also in a forked child: the running one is the parent's)."""
        self.child = isolated.ShardChild(
            "tensortap.backends.shard:lay_out_or_error", LAYOUT_SECONDS, keep_on_signals=True
        )
        self._lock = threading.Lock()
        self._state = "new"  # then "starting", "on", "failed" or "closed"

    @property
    def running(self) -> bool:
        """Whether shards are laid out in the helper process now."""
        return self._state == "on"

    def lay_out(self, path: str, ops: list[Op]) -> list[int] | None:
        """:func:`lay_out` of ``path`` and ``ops`` in the helper process; None where it is not
        running (the caller lays the shard out itself)."""
        if not self.enabled or isolated.IN_CHILD or not self._lock.acquire(blocking=False):
            return None  # busy starting, or laying out a shard of another thread
        try:
            if self._state == "new":
                self._state = "starting"
                try:
                    threading.Thread(target=self._start, name="tensortap-layout-start", daemon=True).start()
                except RuntimeError:  # at interpreter shutdown Python 3.12 starts no thread: no helper then
                    self._state = "failed"
            if self._state != "on":
                return None
            try:
                if not self.child.alive:  # never restarted here: the writer would wait for it
                    raise isolated.ChildFailed("it exited")
                answer: list[int] | str = self.child.ask(path, ops)
            except isolated.ChildFailed as exc:
                self._fail(exc)
                return None
            return answer if isinstance(answer, list) else None  # an error: laid out here, it is raised
        finally:
            self._lock.release()

    def _start(self) -> None:
        with self._lock:
            if self._state != "starting":
                return
            try:
                self.child.start()
            except (isolated.ChildFailed, OSError) as exc:
                self._fail(exc)
            else:
                self._state = "on"

    def _fail(self, exc: BaseException) -> None:
        self.child.close()
        if self._state == "closed":  # killed by close(): not a failure
            return
        self._state = "failed"
        logger.warning(
            "tensortap: the shard layout process failed (%s); shards are laid out in the training process "
            "from now on, where HDF5 holds the GIL while it works",
            exc,
        )

    def close(self) -> None:
        """End the helper process; later shards are laid out in the writer's process. A layout in
        flight (a helper stuck on a disk that does not answer) is waited for :data:`CLOSE_SECONDS`
        at most, then ended: that shard is laid out in the writer's process."""
        locked = self._lock.acquire(timeout=CLOSE_SECONDS)
        try:
            self._state = "closed"
            self.child.close()
        finally:
            if locked:
                self._lock.release()


LAYOUTS = Layouts()
atexit.register(LAYOUTS.close)  # after the writers' own exit handlers, registered later
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: LAYOUTS._reset())  # the one in use at the fork


def _row_checksums(values: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """CRC-32 of each value's bytes (each array of ``values``, or each row of the array ``values``, taken as
    a slice: a row of a 1-D array would be a NumPy scalar, in the machine's byte order), little-endian."""
    rows = [values[i : i + 1] for i in range(len(values))] if isinstance(values, np.ndarray) else values
    return np.array([crc32(v) for v in rows], dtype="<u4")


@dataclass(frozen=True)
class RawAt:
    """Where the raw values of one tensor lie in its shard's file, as its index record says (``raw_at``,
    format 2.1): ``k`` rows of ``dtype`` and ``shape`` one after another from byte ``data``, and their
    ``k`` CRC-32s (little-endian uint32) from byte ``crc32``. ``check`` is :func:`raw_at_check` of the
    tensor's name, these fields and the steps of the rows: a record damaged anywhere that matters here
    is refused, never read as another tensor's or another step's values.
    """

    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    data: int
    crc32: int
    check: int

    @property
    def row_bytes(self) -> int:
        """The size of one value."""
        return self.dtype.itemsize * math.prod(self.shape)

    def entry(self) -> dict[str, Any]:
        """The index record's ``raw_at`` object."""
        return {"dtype": self.dtype.str, "data": self.data, "crc32": self.crc32, "check": self.check}


def raw_at_check(name: str, dtype: np.dtype[Any], shape: Sequence[int], steps: np.ndarray, data: int, crc: int) -> int:
    """The ``check`` of a ``raw_at`` (docs/format.md): CRC-32 of the tensor's name in UTF-8, a zero byte, the
    dtype's NumPy string (``"<f4"``), a zero byte, then as little-endian int64: ``data``, ``crc32``, the
    number of dimensions, the shape, and the global step of each row in order."""
    ints = np.array([data, crc, len(shape), *shape], dtype="<i8").tobytes() + steps.astype("<i8").tobytes()
    return zlib.crc32(ints, zlib.crc32(f"{name}\0{dtype.str}\0".encode()))


# what raw_at may describe: integers and floats, read back as their bytes (bool is an enum in HDF5)
RAW_AT_KINDS = "iuf"
_RAW_AT_FLOAT_BYTES = 8
"""The widest float the format locates or packs: float16, float32 and float64 (``np.longdouble``, float80
padded to 12 or 16 bytes, float128 or float64 by platform, is not portable: wider, only an HDF5 dataset)."""


def locatable(dtype: np.dtype[Any]) -> bool:
    """Whether values of ``dtype`` may be packed (``/packed``, format 3) or located (``raw_at``): an
    integer, or a float of at most 8 bytes, the dtypes readers take there (docs/format.md)."""
    return dtype.kind in RAW_AT_KINDS and (dtype.kind != "f" or dtype.itemsize <= _RAW_AT_FLOAT_BYTES)


def _write_raw(plan: _Plan, group: int, col: _Column) -> tuple[dict[str, Any], tuple[int, int] | None]:
    """The datasets of ``col``'s raw values; return its index entry and, for values stored as their
    bytes in the order of their steps, the plan's objects of its ``data`` and ``crc32`` (for ``raw_at``)."""
    plan.checked(group, "steps", np.array(col.steps, dtype=np.int64))
    values = col.values()
    if isinstance(values, np.ndarray) and values.ndim > _H5_MAX_RANK:  # HDF5's most: as ragged values, flattened
        values = list(values)
    if isinstance(values, np.ndarray):
        data = plan.add(group, "data", values, values=True)
        crc = plan.add(group, "crc32", _row_checksums(values))
        plan.attr(group, "layout", "fixed")
        entry = {"dtype": str(values.dtype), "shape": list(values.shape[1:])}
        ascending = all(a < b for a, b in pairwise(col.steps))
        return entry, (data, crc) if locatable(values.dtype) and ascending else None
    dtype = np.result_type(*values)
    ndim = max(a.ndim for a in values)
    parts = [np.ascontiguousarray(a.astype(dtype, copy=False)).ravel() for a in values]
    flat = np.concatenate(parts)
    offsets = np.zeros(len(values) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([a.size for a in values])
    shapes = np.full((len(values), ndim), -1, dtype=np.int64)
    for i, a in enumerate(values):
        shapes[i, : a.ndim] = a.shape
    plan.add(group, "data", flat, values=True)
    plan.add(group, "crc32", _row_checksums(parts))
    plan.checked(group, "offsets", offsets)
    plan.checked(group, "shapes", shapes)
    plan.checked(group, "ndims", np.array([a.ndim for a in values], dtype=np.int8))
    plan.attr(group, "layout", "ragged")
    return {"dtype": str(np.dtype(dtype)), "shape": list(values[-1].shape)}, None


def _write_histograms(
    plan: _Plan, group: int, pending: list[tuple[int, Histogram | PendingHistogram]], n_steps: int
) -> Any:
    """``/tensors/<id>/histogram/{steps,edges,counts}`` (pending histograms counted now, on the
    writer thread); return the index record's ``histogram_steps``."""
    hists = [(s, resolved(h)) for s, h in pending]
    bins = {len(h.counts) for _, h in hists}
    if len(bins) != 1:  # the core fixes a tensor's bins once: this is a bug, never silent
        raise ValueError(f"histograms of one tensor with different numbers of bins in one shard: {sorted(bins)}")
    hg = plan.group(group, "histogram")
    plan.checked(hg, "steps", np.array([s for s, _ in hists], dtype=np.int64))
    plan.checked(hg, "edges", np.stack([h.edges for _, h in hists]).astype(np.float64))
    plan.checked(hg, "counts", np.stack([h.counts for _, h in hists]).astype(np.int64))
    return ALL_STEPS if len(hists) == n_steps else [s for s, _ in hists]


PACK_BYTES = DIRECT_MIN
"""Default of ``pack_bytes`` (:func:`prepare_shard`, :class:`~tensortap.capture.ShardPolicy`): values that
small cost a shard more to lay out as HDF5 objects of their own than to write."""


class _Pack:
    """The tensors of a shard kept in its shared tables ``/packed`` (format 3): their values' bytes one
    after another in ``data``, each value's step and CRC-32 in ``steps`` and ``crc32``, and each tensor's
    id, collections, dtype, shape and place in ``meta`` (JSON). A tensor in a group of its own costs
    HDF5 a group, three datasets and three attributes, about 0.2 ms (a shard of 1,000 small tensors took
    0.2 s to lay out, in a process that a 2-core machine's training shares: bench/profiles/torch.md)."""

    def __init__(self) -> None:
        self.meta: list[dict[str, Any]] = []
        self.steps: list[int] = []
        self.crcs: list[np.ndarray] = []
        self.parts: list[np.ndarray] = []
        self.nbytes = 0

    @staticmethod
    def takes(col: _Column, compression: str | None, pack_bytes: int) -> bool:
        """Whether ``col`` is packed: a shard whose values are not compressed, a tensor without
        histograms whose raw values (if any) have one shape, a dtype :func:`locatable` and take
        fewer than ``pack_bytes`` bytes together."""
        if col.hist or compression is not None or pack_bytes <= 0:
            return False
        if not col.steps:
            return True
        values = col.values()
        return isinstance(values, np.ndarray) and locatable(values.dtype) and values.nbytes < pack_bytes

    def add(self, tid: int, col: _Column, collections: list[str]) -> tuple[dict[str, Any], tuple[int, int] | None]:
        """Pack ``col``, tensor ``tid``; return its index entry's ``dtype`` and ``shape`` (none without raw
        values) and, where its steps ascend, where its values and their checksums start in ``data`` and
        ``crc32`` (bytes from the start of each, for ``raw_at``)."""
        meta: dict[str, Any] = {"id": tid, "collections": collections}
        if col.orig_dtype:
            meta["orig_dtype"] = col.orig_dtype
        self.meta.append(meta)
        if not col.steps:
            return {}, None
        values = col.values()
        assert isinstance(values, np.ndarray)  # takes() said so
        first = len(self.steps)
        meta.update(dtype=values.dtype.str, shape=list(values.shape[1:]), rows=[first, len(values)], offset=self.nbytes)
        located = (self.nbytes, 4 * first) if all(a < b for a, b in pairwise(col.steps)) else None
        self.steps.extend(col.steps)
        self.crcs.append(_row_checksums(values))
        self.parts.append(values)
        self.nbytes += values.nbytes
        return {"dtype": str(values.dtype), "shape": list(values.shape[1:])}, located

    def write(self, plan: _Plan, parent: int) -> tuple[int, int]:
        """The group ``packed`` of ``parent``; return the plan's objects of its ``data`` and ``crc32``."""
        group = plan.group(parent, "packed")
        plan.json(group, "meta", self.meta)
        plan.checked(group, "steps", np.array(self.steps, dtype=np.int64))
        crc = plan.add(group, "crc32", np.concatenate(self.crcs) if self.crcs else np.empty(0, dtype="<u4"))
        return plan.joined(group, "data", self.parts), crc


@dataclass
class PreparedShard:
    """A shard whose HDF5 file is made, its values not yet written (:func:`prepare_shard`).

    :meth:`write` writes them with ``os.pwrite`` only (no HDF5 call, the GIL released), so it may
    run on another thread while the writer thread prepares the next shard.
    """

    path: str
    plan: _Plan
    record_head: dict[str, Any]
    record_tail: dict[str, Any]

    def write(self) -> dict[str, Any]:
        """Write the values at the offsets HDF5 allocated; return the shard's index record."""
        self.plan.write_data(self.path)
        return {**self.record_head, "bytes": os.path.getsize(self.path), **self.record_tail}


def prepare_shard(
    path: str,
    worker: str,
    seq: int,
    buffer: ShardBuffer,
    shard_key: str,
    compression: str | None = None,
    writeback: bool = False,
    pack_bytes: int = PACK_BYTES,
) -> PreparedShard:
    """Make the HDF5 file of the committed steps of ``buffer`` at ``path``, all but the values that
    :meth:`PreparedShard.write` then writes (returning the shard's index record).

    Parameters
    ----------
    path
        Local file to create (the caller publishes it afterwards).
    worker, seq
        Written into the file's attributes and the index record.
    buffer
        The steps to write (no step may be in progress).
    shard_key
        The key under which the shard will be published (recorded in the index record).
    compression
        ``None`` (default, fastest), ``"gzip"`` or ``"lzf"``: built-in HDF5 filters only.
    writeback
        Start writing the file to disk while it is written (see :class:`_Plan`): for a file
        that is published where it is (renamed), not one that is uploaded and deleted.
    pack_bytes
        Tensors whose raw values here take fewer bytes go into the shared tables ``/packed``
        (:class:`_Pack`); 0 gives every tensor a group of its own.
    """
    names = sorted(buffer.columns)
    n_steps = len(buffer.steps)
    tensors_index: dict[str, Any] = {}
    red_rows: list[tuple[int, int, str, float]] = []
    plan = _Plan(compression, writeback)
    f = plan.ROOT
    plan.attr(f, "format", SHARD_MAGIC)
    plan.attr(f, "format_version", FORMAT_VERSION)
    plan.attr(f, "format_minor", FORMAT_MINOR)
    plan.attr(f, "worker", worker)
    plan.attr(f, "seq", seq)
    steps = np.array(buffer.steps, dtype=np.int64).reshape(n_steps, 3)
    st_group = plan.group(f, "steps")
    plan.checked(st_group, "step", steps[:, 0])
    plan.checked(st_group, "mode", steps[:, 1].astype(np.int8))
    plan.checked(st_group, "mode_step", steps[:, 2])
    plan.checked(st_group, "wall_time", np.array(buffer.wall_times, dtype=np.float64))
    plan.json(f, "names", names)
    tgroup = plan.group(f, "tensors")
    pack = _Pack()
    packed: list[tuple[str, tuple[int, int]]] = []  # name, where its values and checksums start in /packed
    located: list[tuple[str, int, int, int, int]] = []  # name; data object and offset in it; crc32's
    for tid, name in enumerate(names):
        col = buffer.columns[name]
        collections = sorted(col.collections)
        entry: dict[str, Any] = {"id": tid, "collections": collections}
        if _Pack.takes(col, compression, pack_bytes):
            raw, starts = pack.add(tid, col, collections)
            if starts is not None:
                packed.append((name, starts))
        else:
            g = plan.group(tgroup, str(tid))
            plan.attr(g, "collections", json.dumps(collections))
            raw, objects = _write_raw(plan, g, col) if col.steps else ({}, None)
            if objects is not None:
                located.append((name, objects[0], 0, objects[1], 0))
            if col.orig_dtype:
                plan.attr(g, "orig_dtype", col.orig_dtype)
        if col.steps:
            entry.update(raw)
            entry["raw_steps"] = ALL_STEPS if len(col.steps) == n_steps else list(col.steps)
        if col.orig_dtype:
            entry["orig_dtype"] = col.orig_dtype
        if col.red:
            red_steps = sorted({s for s, _, _ in col.red})
            entry["reductions"] = sorted({k for _, k, _ in col.red})
            entry["reduction_steps"] = ALL_STEPS if len(red_steps) == n_steps else red_steps
            red_rows.extend((tid, s, k, v) for s, k, v in col.red)
        if col.hist:  # never packed
            entry["histogram_steps"] = _write_histograms(plan, g, col.hist, n_steps)
        tensors_index[name] = entry
    data_obj, crc_obj = pack.write(plan, f)
    located.extend((name, data_obj, data_at, crc_obj, crc_at) for name, (data_at, crc_at) in packed)
    kinds = sorted({k for _, _, k, _ in red_rows})
    kind_id = {k: i for i, k in enumerate(kinds)}
    rg = plan.group(f, "reductions")
    plan.attr(rg, "kinds", json.dumps(kinds))
    plan.checked(rg, "tensor_id", np.array([r[0] for r in red_rows], dtype=np.int32))
    plan.checked(rg, "step", np.array([r[1] for r in red_rows], dtype=np.int64))
    plan.checked(rg, "kind", np.array([kind_id[r[2]] for r in red_rows], dtype=np.int16))
    plan.checked(rg, "value", np.array([r[3] for r in red_rows], dtype=np.float64))
    plan.make(path)
    for name, data_obj, data_at, crc_obj, crc_at in located:
        data, crc = plan.offset(data_obj), plan.offset(crc_obj)
        if data is not None and crc is not None:  # written at those offsets by the plan (not compressed, not empty)
            entry = tensors_index[name]
            data, crc, dtype = data + data_at, crc + crc_at, np.dtype(entry["dtype"])
            steps = np.array(buffer.columns[name].steps, dtype=np.int64)
            check = raw_at_check(name, dtype, entry["shape"], steps, data, crc)
            entry["raw_at"] = RawAt(dtype, tuple(entry["shape"]), data, crc, check).entry()
    head = {
        "format": INDEX_MAGIC,
        "format_version": FORMAT_VERSION,
        "format_minor": FORMAT_MINOR,
        "worker": worker,
        "seq": seq,
        "shard": shard_key,
    }
    tail = {"steps": [list(s) for s in buffer.steps], "wall_times": list(buffer.wall_times), "tensors": tensors_index}
    return PreparedShard(path, plan, head, tail)


class ShardError(TensortapError):
    """A shard cannot be read (truncated, corrupt, not a tensortap shard, or refused as unsafe)."""


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# HDF5 filters tensortap writes, with the most a filter can expand what is stored (deflate: 1032 to 1)
FILTER_EXPANSION = {
    h5py.h5z.FILTER_DEFLATE: 1032,
    h5py.h5z.FILTER_SHUFFLE: 1,
    h5py.h5z.FILTER_FLETCHER32: 1,
    32000: 100,
}
VALUE_KINDS = "biufc"  # bool, integers, floats, complex: the only values (bfloat16 and float8 are stored as float32)
INTEGER_KINDS = "iu"
TENSOR_PARTS = frozenset({"steps", "data", "crc32", "offsets", "shapes", "ndims", "histogram"})
STEP_PARTS = ("step", "mode", "mode_step")
REDUCTION_PARTS = ("tensor_id", "step", "kind", "value")
PACKED_PARTS = ("meta", "steps", "crc32", "data")
PACKED_META_KEYS = frozenset({"id", "collections", "orig_dtype", "dtype", "shape", "rows", "offset"})

MAX_READ_ENV = "TENSORTAP_MAX_READ_BYTES"


def max_read_bytes() -> int:
    """The most one read of a compressed dataset may allocate: ``$TENSORTAP_MAX_READ_BYTES``, else half
    of the machine's physical memory (4 GiB where it is unknown).

    An uncompressed dataset is bounded by the file's size instead; a compressed one by 1032 times
    what it stores (deflate's limit, which an all-zero tensor reaches), and by this budget.
    """
    value = os.environ.get(MAX_READ_ENV)
    if value:
        try:
            return int(value)
        except ValueError:
            raise ShardError(f"{MAX_READ_ENV}={value!r} is not a number of bytes") from None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (AttributeError, ValueError, OSError):  # not POSIX
        return 4 << 30


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _shard_errors(method: Callable[_P, _R]) -> Callable[_P, _R]:
    """Turn any error of h5py, NumPy or JSON inside a :class:`ShardReader` method into a :class:`ShardError`."""

    @wraps(method)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(*args, **kwargs)
        except ShardError:
            raise
        except Exception as exc:  # a corrupt file can make h5py raise anything
            path = getattr(args[0], "path", "?")
            raise ShardError(f"{path}: cannot read shard ({type(exc).__name__}: {exc})") from exc

    return wrapper


def check_hdf5_header(path: str, expected_bytes: int | None = None) -> int:
    """Check what can be checked before HDF5 sees the file; return its size.

    The file must be a regular file whose size is ``expected_bytes`` (from
    the index record) when given, start with the HDF5 signature and a
    version 2 or 3 superblock (what ``libver="v110"`` writes) whose
    end-of-file address is the file's size: a truncated or extended file is
    refused here.
    """
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ShardError(f"{path}: not a regular file")
    size = st.st_size
    if expected_bytes is not None and size != expected_bytes:
        raise ShardError(f"{path}: {size} bytes, but its index record says {expected_bytes} (truncated or replaced)")
    with open(path, "rb") as f:
        head = f.read(48)
    if head[:8] != HDF5_SIGNATURE:
        raise ShardError(f"{path}: not an HDF5 file")
    if len(head) < 48 or head[8] not in (2, 3) or head[9] != 8 or head[10] != 8:
        raise ShardError(f"{path}: HDF5 superblock of a kind tensortap does not write (truncated or foreign file)")
    base, eof = int.from_bytes(head[12:20], "little"), int.from_bytes(head[28:36], "little")
    if base != 0 or eof != size:
        raise ShardError(f"{path}: {size} bytes, but its HDF5 superblock says {eof} (truncated or extended)")
    return size


VET_SECONDS = 20.0
"""Time limit for reading the attributes of one format-1 shard in a child process (it takes milliseconds)."""
VET_IDLE_SECONDS = 60.0
"""The child that vets format-1 shards exits after this long without a shard to vet."""


def vet_format_1(path: str, expected_bytes: int | None) -> str | None:
    """Read every attribute of every object of the shard at ``path``: the problem, or None.

    Run in a child process with a time limit (:class:`Format1Vetter`): format 1 kept
    text attributes in HDF5's global heap, which has no checksum; a corrupt one
    can make HDF5 loop forever. Every other HDF5 structure of a shard (both
    formats are written with ``libver="v110"``) carries HDF5's checksum.
    """

    def read(_name: str, obj: h5py.HLObject) -> None:
        for key in obj.attrs:
            obj.attrs[key]

    try:
        check_hdf5_header(path, expected_bytes)
        with h5py.File(path, "r") as f:
            read("/", f)
            f.visititems(read)
    except Exception as exc:  # a corrupt file can make h5py raise anything
        return f"{path}: cannot read shard ({type(exc).__name__}: {exc})"
    return None


class Format1Vetter:
    """Vets format-1 shards before their first in-process use, in one child process with a time limit.

    The verdict for a file is kept for the life of the process, keyed by its
    real path, size, modification time and inode: a file that changes is vetted again.
    """

    def __init__(self) -> None:
        self.child = isolated.ShardChild("tensortap.backends.shard:vet_format_1", VET_SECONDS, VET_IDLE_SECONDS)
        self._good: set[tuple[str, int, int, int, int]] = set()
        self._lock = threading.Lock()

    def problem(self, path: str, expected_bytes: int | None) -> str | None:
        """Why the format-1 shard at ``path`` cannot be read safely in this process, or None."""
        if isolated.IN_CHILD:  # the child's own time limit bounds it
            return None
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
        with self._lock:
            if key in self._good:
                return None
            try:
                problem: str | None = self.child.ask(path, expected_bytes)
            except isolated.ChildFailed as exc:
                problem = f"{path}: {exc}"
            if problem is None:
                self._good.add(key)
            return problem

    def close(self) -> None:
        """End the child (a later shard starts a new one)."""
        with self._lock:
            self.child.close()


FORMAT_1 = Format1Vetter()
atexit.register(FORMAT_1.close)


# How a shard is opened for reading: with the sec2 driver, whose handle is a POSIX file descriptor (values
# stored contiguously are read from it directly)
_FAPL = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
_FAPL.set_fapl_sec2()
_LINK_KINDS = {h5py.h5l.TYPE_SOFT: "SoftLink", h5py.h5l.TYPE_EXTERNAL: "ExternalLink"}
DIRECT_KINDS = "iuf"
"""Kinds of values read from the file's bytes directly when stored contiguously as they are in memory
(booleans and complex numbers, HDF5 enums and compounds, always go through HDF5's conversion)."""
_MEMORY_TYPES: dict[np.dtype[Any], Any] = {}  # dtype -> its HDF5 type (h5py.h5t.py_create)


@dataclass(frozen=True)
class _Node:
    """An open HDF5 group or dataset of the shard (a low-level h5py identifier) and its path, for messages."""

    id: Any
    where: str


@dataclass(frozen=True)
class _Dataset(_Node):
    """A checked dataset: its type and shape, and the offset of its bytes in the file when they are
    stored contiguously as they are in memory (read directly then), else None (read through HDF5)."""

    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    offset: int | None


def _memory_type(dtype: np.dtype[Any]) -> Any:
    """The HDF5 type of ``dtype`` in memory."""
    if dtype.metadata is not None:  # h5py's special types (text, enums): equal to plain dtypes, so not cached
        return h5py.h5t.py_create(dtype)
    htype = _MEMORY_TYPES.get(dtype)
    if htype is None:
        htype = _MEMORY_TYPES[dtype] = h5py.h5t.py_create(dtype)
    return htype


@dataclass
class _Values:
    """The validated layout of one tensor's raw values in a shard."""

    steps: np.ndarray
    row: dict[int, int]
    data: _Dataset | None = None
    crc: np.ndarray | None = None
    offsets: np.ndarray | None = None
    shapes: list[tuple[int, ...]] | None = None


_NO_VALUES = _Values(np.empty(0, dtype=np.int64), {})


@dataclass(frozen=True)
class _Packed:
    """A packed tensor's checked place in ``/packed`` (format 3): ``count`` values of ``dtype`` and ``shape``
    (None: no raw values), rows ``first`` on of ``steps`` and ``crc32``, from byte ``offset`` of ``data``."""

    dtype: np.dtype[Any] | None
    shape: tuple[int, ...]
    first: int
    count: int
    offset: int

    @property
    def row_bytes(self) -> int:
        """The size of one value."""
        return 0 if self.dtype is None else self.dtype.itemsize * math.prod(self.shape)

    @property
    def end(self) -> int:
        """The byte of ``data`` after its values."""
        return self.offset + self.count * self.row_bytes


def _row_error(path: str, steps: np.ndarray, i: int) -> NoReturn:
    raise ShardError(f"{path}: value {i} of tensor step {int(steps[i])} does not match its checksum")


def _verify_rows(path: str, steps: np.ndarray, crc: np.ndarray, data: np.ndarray, first: int = 0) -> None:
    """Check each row of ``data`` (C-contiguous: the values ``first`` on of those at ``steps``) against its
    CRC-32 in ``crc``."""
    if not len(data):
        return
    size = data.nbytes // len(data)
    raw = _bytes_of(data)
    for i, expected in enumerate(crc.tolist()):
        if _crc32(raw[i * size : (i + 1) * size]) != expected:
            _row_error(path, steps, first + i)


class RawSource(Protocol):
    """What reads one tensor's raw values in one shard: a :class:`ShardReader` or a :class:`RawAtReader`."""

    def values(self, name: str) -> dict[int, np.ndarray]: ...

    def stacked(self, name: str) -> tuple[np.ndarray, np.ndarray] | None: ...

    def value(self, name: str, step: int) -> np.ndarray | None: ...


class RawAtReader:
    """The raw values of one tensor in one shard, read where its index record's ``raw_at`` says (format
    2.1), without HDF5: the file's size and two reads (range requests on object storage: the shard is not
    downloaded), against a dozen HDF5 objects opened and checked by :class:`ShardReader`
    (bench/profiles/read.md). Each value is verified against its CRC-32.

    HDF5 never sees the file, so nothing in it is interpreted but these bytes; what the record says is
    checked before any read: ``raw_at.check`` against the name, the steps and the locations, the file's
    size against the record's, and every byte to read against the end of the file (so a read allocates
    at most the file's size). Every failure is a :class:`ShardError` naming the shard. Implements
    :class:`RawSource` for the one tensor ``name`` (the ``name`` its methods take).

    Parameters
    ----------
    open_file
        Opens the shard to read ranges of it (:meth:`Storage.open_ranges`), once per read.
    where
        The shard, for messages.
    expected_bytes
        The shard's size according to its index record.
    name
        The tensor.
    steps
        The global steps of its rows, in order.
    at
        Its ``raw_at``.
    """

    def __init__(
        self,
        open_file: Callable[[], RangedFile],
        where: str,
        expected_bytes: int | None,
        name: str,
        steps: np.ndarray,
        at: RawAt,
    ) -> None:
        if raw_at_check(name, at.dtype, at.shape, steps, at.data, at.crc32) != at.check:
            raise ShardError(f"{where}: its index record's raw_at of {name!r} does not match its check")
        self.open_file, self.where, self.expected_bytes = open_file, where, expected_bytes
        self.name, self.steps, self.at = name, steps, at

    def _rows(self, first: int, count: int) -> np.ndarray:
        at, size, n, where = self.at, self.at.row_bytes, len(self.steps), f"{self.where}: the values of {self.name!r}"
        file = self.open_file()
        try:
            if self.expected_bytes is not None and file.size != self.expected_bytes:
                raise ShardError(f"{self.where}: {file.size} bytes, but its index record says {self.expected_bytes}")
            if at.data + n * size > file.size or at.crc32 + 4 * n > file.size:
                raise ShardError(f"{where} would lie past the end of the file (bad record)")
            out = read_buffer((count, *at.shape), at.dtype)
            crc = np.empty(count, dtype="<u4")
            parts = [(at.data + first * size, _bytes_of(out)), (at.crc32 + 4 * first, _bytes_of(crc))]
            if not file.read_into(sorted(parts, key=lambda part: part[0])):
                raise ShardError(f"{where} end past the end of the file (it changed)")
        finally:
            file.close()
        _verify_rows(self.where, self.steps, crc, out, first)
        return out

    def stacked(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)``, ``values[i]`` the raw value at ``steps[i]``: one read."""
        return self.steps, self._rows(0, len(self.steps))

    def values(self, name: str) -> dict[int, np.ndarray]:
        """Every raw value, by global step (one read)."""
        steps, data = self.stacked(name)
        return {s: data[i, ...] for i, s in enumerate(steps.tolist())}

    def value(self, name: str, step: int) -> np.ndarray | None:
        """The raw value at global ``step``, or None."""
        i = int(np.searchsorted(self.steps, step))
        if i == len(self.steps) or self.steps[i] != step:
            return None
        return self._rows(i, 1)[0, ...]


class ShardReader:
    """Read access to one published shard, which may come from a stranger.

    Nothing is handed to HDF5 before :func:`check_hdf5_header` passed; every
    object is reached through hard links only; every dataset is checked
    before it is read (numeric type, no external or virtual storage, only the
    filters tensortap writes, declared size bounded by what the file stores);
    values and tables are checked against their CRC-32 (format version 2).
    Every failure is a :class:`ShardError` naming the file and what is wrong.

    HDF5 is used through h5py's low-level API (a shard is opened for a few
    small reads, where the high-level objects cost more than HDF5 itself), and
    a dataset stored contiguously, unfiltered and as its values are in memory
    is read from the file's bytes at its offset, which was checked to lie
    within the file.

    Parameters
    ----------
    path
        Local path of the ``.h5`` file.
    expected_bytes
        The shard's size according to its index record, if known.
    """

    def __init__(self, path: str, expected_bytes: int | None = None) -> None:
        self.path = path
        self.version = 1  # until the file says
        self._tensors: dict[int, _Values] = {}
        self._groups: _Node | None = None  # /tensors, once opened
        self._packed: dict[int, _Packed] | None = None  # the tensors of /packed (format 3), once read
        self._packed_tables: tuple[np.ndarray, np.ndarray, _Dataset]  # its steps, crc32s and data, then
        self._packed_meta: list[dict[str, Any]] = []  # and its meta entries
        self._reductions: dict[int, dict[tuple[int, str], float]] | None = None
        self._steps: np.ndarray | None = None  # steps_table(), read once
        self._fid: Any = None
        self._opened: list[Any] = []  # groups and datasets opened in the file, closed with it
        self._lock = threading.Lock()  # between direct reads and close(), which closes their descriptor
        try:
            self._size = check_hdf5_header(path, expected_bytes)
            self._fid = h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDONLY, fapl=_FAPL)
            self._fd: int = self._fid.get_vfd_handle()
            if os.fstat(self._fd).st_size != self._size:
                raise ShardError(f"{path}: changed while it was opened")
            self._root = _Node(h5py.h5g.open(self._fid, b"/"), "/")
            self._opened.append(self._root.id)
            self._open()
        except ShardError:
            self.close()
            raise
        except Exception as exc:
            self.close()
            raise ShardError(f"{path}: cannot read shard ({type(exc).__name__}: {exc})") from exc
        self.ids = {n: i for i, n in enumerate(self.names)}

    def _open(self) -> None:
        version = self._attr(self._root, "format_version", "iu")
        if not isinstance(version, (int, np.integer)) or version < 1:
            raise ShardError(f"{self.path}: not a tensortap shard (format_version {version!r})")
        if version > FORMAT_VERSION:
            raise ShardError(
                f"{self.path}: format version {version} is newer than this tensortap reads ({FORMAT_VERSION})"
            )
        self.version = int(version)
        self.checksums = self.version >= 2
        if not self.checksums:  # text attributes in HDF5's global heap, which has no checksum
            problem = FORMAT_1.problem(self.path, self._size)
            if problem is not None:
                raise ShardError(problem)
        self._check_header(self._root)
        if self._attr(self._root, "format", "S") != SHARD_MAGIC:
            raise ShardError(f"{self.path}: not a tensortap shard (no format attribute {SHARD_MAGIC!r})")
        names = self._json(self._dataset(self._root, "names", "u"))
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
            raise ShardError(f"{self.path}: /names is not a list of distinct names")
        self.names: list[str] = names

    def close(self) -> None:
        """Close the file (and every object opened in it)."""
        with self._lock:
            fid, self._fid = self._fid, None
            opened, self._opened = self._opened, []
            for obj in opened:
                if obj.valid:
                    obj.close()
            # The file closes with its last reference (h5py frees an identifier's HDF5 id when it is
            # deallocated). FileID.close() would also scan every live h5py identifier of the process
            # (`nonlocal_close`), which objects opened with the default close degree do not need:
            # 1.5-2 ms of closing a trial of 19 shards (bench/profiles/read.md).
            del fid

    # ------------------------------------------------------------ checks
    def _attr(self, node: _Node, name: str, kinds: str) -> Any:
        """Attribute ``name`` of ``node`` (text decoded), None if absent; its type is checked before it is read.

        Version-2 shards store text as fixed-length strings; a variable-length
        one (kept in HDF5's global heap, which has no checksum and on which a
        corrupt file can make HDF5 loop) is refused without being read.
        """
        try:
            attr = h5py.h5a.open(node.id, name.encode())
        except KeyError:  # absent
            return None
        dt = attr.dtype
        if dt.kind == "O":  # variable length: text (in version 1, as it stored text) or references
            text = h5py.check_string_dtype(dt)
            allowed = text is not None and self.version < 2 and "S" in kinds
        else:
            allowed = dt.kind in kinds and dt.subdtype is None
        if not allowed:
            raise ShardError(f"{self.path}: attribute {name!r} of {node.where} has type {dt}, not as the format says")
        if attr.shape != ():  # checked first: h5py reads as many values as the file holds into the array given
            raise ShardError(f"{self.path}: attribute {name!r} of {node.where} is not a single value")
        value = np.empty((), dtype=dt)
        attr.read(value, mtype=_memory_type(dt))  # how version 1 stored text, too (checked in a child first)
        got = value[()]
        return got.decode("utf-8", "replace") if isinstance(got, bytes) else got

    def _child(self, group: _Node, name: str, kind: type[Any]) -> Any:
        """``group/name`` when it is a hard link to an object of ``kind`` (a low-level h5py identifier class),
        as a :class:`_Node` whose header is checked; None if absent."""
        key = name.encode()
        links = group.id.links
        if not links.exists(key):
            return None
        where = f"{group.where.rstrip('/')}/{name}"
        link = links.get_info(key).type
        if link != h5py.h5l.TYPE_HARD:
            raise ShardError(
                f"{self.path}: {where} is a {_LINK_KINDS.get(link, 'user-defined link')} "
                "(nothing outside the shard is read)"
            )
        obj = h5py.h5o.open(group.id, key)
        self._opened.append(obj)
        if not isinstance(obj, kind):
            raise ShardError(f"{self.path}: {where} is not a {'group' if kind is h5py.h5g.GroupID else 'dataset'}")
        node = _Node(obj, where)
        self._check_header(node)
        return node

    def _check_header(self, node: _Node) -> None:
        """Format 2 is written with ``libver="v110"``: every object header is version 2, which HDF5 checksums.
        A version-1 header (no checksum, on which a corrupt file can make HDF5 loop) is refused."""
        if self.checksums and h5py.h5o.get_info(node.id).hdr.version != 2:
            raise ShardError(
                f"{self.path}: {node.where} has an HDF5 object header without checksum (not written by tensortap)"
            )

    def _group(self, group: _Node, name: str) -> _Node:
        node = self._child(group, name, h5py.h5g.GroupID)
        if node is None:
            raise ShardError(f"{self.path}: {group.where.rstrip('/')}/{name} is missing")
        return node

    def _tensor_group(self, tid: int) -> _Node:
        """``/tensors/<tid>``."""
        if self._groups is None:
            self._groups = self._group(self._root, "tensors")
        return self._group(self._groups, str(tid))

    def _dataset(self, group: _Node, name: str, kinds: str, ndim: int | None = 1) -> _Dataset:
        """The checked dataset ``group/name``: safe to read, and no larger than the file allows."""
        node = self._child(group, name, h5py.h5d.DatasetID)
        where = f"{self.path}: {group.where.rstrip('/')}/{name}"
        if node is None:
            raise ShardError(f"{where} is missing")
        ds = node.id
        stored_type = ds.get_type()
        dt = stored_type.dtype
        if dt.kind not in kinds or dt.fields is not None or dt.subdtype is not None or h5py.check_enum_dtype(dt):
            raise ShardError(f"{where} has type {dt}, which is not allowed here (only numeric values)")
        shape = ds.shape
        if shape is None:
            raise ShardError(f"{where} has an empty dataspace (no values)")
        if ndim is not None and len(shape) != ndim:
            raise ShardError(f"{where} has {len(shape)} dimensions, expected {ndim}")
        dcpl = ds.get_create_plist()
        layout = dcpl.get_layout()
        if layout == h5py.h5d.VIRTUAL:
            raise ShardError(f"{where} is a virtual dataset (data from other files is never read)")
        if dcpl.get_external_count():
            raise ShardError(f"{where} has external raw storage (data from other files is never read)")
        expansion = 1
        filters = dcpl.get_nfilters()
        for i in range(filters):
            code = dcpl.get_filter(i)[0]
            if code not in FILTER_EXPANSION:
                raise ShardError(f"{where} uses HDF5 filter {code}, which tensortap does not write")
            expansion = max(expansion, FILTER_EXPANSION[code])
        declared = math.prod(shape) * dt.itemsize
        offset = None
        if declared:
            stored = ds.get_storage_size()
            if layout == h5py.h5d.CONTIGUOUS:
                start = ds.get_offset()
                ok = stored == declared and start is not None
                if ok and not 0 <= start <= self._size - declared:  # HDF5 before 1.14.4 opens such a dataset
                    raise ShardError(
                        f"{where}: its {declared} bytes at offset {start} are not inside the file ({self._size} bytes)"
                    )
                if ok and not filters and dt.kind in DIRECT_KINDS and stored_type == _memory_type(dt):
                    offset = start
            elif layout == h5py.h5d.CHUNKED:
                chunks = dcpl.get_chunk()
                ok = declared <= stored * expansion and all(c <= max(d, 1) for c, d in zip(chunks, shape, strict=True))
            else:  # compact: stored in the object header, at most 64 KiB
                ok = declared <= 65536
            if not ok:
                raise ShardError(f"{where} declares {declared} bytes but the file stores {stored} for it")
            if expansion > 1 and declared > (limit := max_read_bytes()):  # the budget: compressed data only
                raise ShardError(
                    f"{where} declares {declared} bytes of compressed values, more than one read may allocate "
                    f"({limit} bytes; set the environment variable {MAX_READ_ENV} to raise it)"
                )
        return _Dataset(ds, node.where, dt, shape, offset)

    def _read(self, ds: _Dataset, rows: tuple[int, int] | None = None) -> np.ndarray:
        """Rows ``rows[0]:rows[1]`` (of the first dimension) of the checked dataset ``ds``, or all of it."""
        shape = ds.shape if rows is None else (rows[1] - rows[0], *ds.shape[1:])
        out = read_buffer(shape, ds.dtype)
        if not out.size:
            return out
        if ds.offset is None:
            if rows is None:
                ds.id.read(h5py.h5s.ALL, h5py.h5s.ALL, out)
            else:
                space = ds.id.get_space()
                space.select_hyperslab((rows[0], *(0 for _ in shape[1:])), shape)
                ds.id.read(h5py.h5s.create_simple(shape), space, out)
            return out
        # within the file (checked by _dataset): at most the rest of the file is read
        start = ds.offset + (0 if rows is None else rows[0] * (out.nbytes // shape[0]))
        with self._lock:
            if self._fid is None:
                raise ShardError(f"{self.path}: the shard was closed")
            if not pread_exactly(self._fd, _bytes_of(out), start):
                raise ShardError(f"{self.path}: {ds.where} ends past the end of the file (it changed)")
        return out

    def _verified(self, ds: _Dataset) -> np.ndarray:
        """All of the (checked) dataset ``ds``, verified against its ``crc32`` attribute."""
        arr = self._read(ds)
        if self.checksums:
            expected = self._attr(ds, "crc32", "u")
            if expected is None or int(expected) != crc32(arr):
                raise ShardError(f"{self.path}: {ds.where} does not match its checksum (corrupt file)")
        return arr

    def _json(self, ds: _Dataset) -> Any:
        try:
            return json.loads(self._verified(ds).tobytes().decode("utf-8"))
        except (ValueError, RecursionError) as exc:
            raise ShardError(f"{self.path}: {ds.where} is not UTF-8 JSON ({exc})") from None

    def _check_row(self, t: _Values, i: int, value: np.ndarray) -> np.ndarray:
        if t.crc is not None and int(t.crc[i]) != crc32(value):
            _row_error(self.path, t.steps, i)
        return value

    def _check_rows(self, t: _Values, data: np.ndarray) -> None:
        """Verify each row of ``data``, all the values of ``t`` in the fixed layout (as :meth:`_read` returns it)."""
        if t.crc is not None:
            _verify_rows(self.path, t.steps, t.crc, data)

    # ------------------------------------------------------------ tensors
    def _values(self, name: str) -> _Values:
        tid = self.ids.get(name)
        if tid is None:
            raise ShardError(f"{self.path}: holds no tensor {name!r}")
        t = self._tensors.get(tid)
        if t is None:
            t = self._tensors[tid] = self._load(tid)
        return t

    def _packed_tensors(self) -> dict[int, _Packed]:
        """The tensors of ``/packed`` by id (none before format 3), read and checked once."""
        if self._packed is None:
            self._packed = {} if self.version < 3 else self._read_packed()
        return self._packed

    def _read_packed(self) -> dict[int, _Packed]:
        """Every entry of ``/packed/meta``, checked against the tables before any of them is read by row (a
        stranger's entries could each claim every row: a table of a million rows read once per entry)."""
        group = self._group(self._root, "packed")
        where = f"{self.path}: /packed"
        meta = self._json(self._dataset(group, "meta", "u"))
        steps = self._verified(self._dataset(group, "steps", INTEGER_KINDS)).astype(np.int64)
        crc = self._read(self._dataset(group, "crc32", "u"))
        data = self._dataset(group, "data", "u")
        if crc.shape != steps.shape:
            raise ShardError(f"{where}/crc32 has {len(crc)} checksums for {len(steps)} steps")
        if data.dtype.itemsize != 1:
            raise ShardError(f"{where}/data has type {data.dtype}, expected bytes (uint8)")
        if not isinstance(meta, list):
            raise ShardError(f"{where}/meta is not a list")
        tensors: dict[int, _Packed] = {}
        for i, item in enumerate(meta):
            tid, packed = self._packed_entry(item, len(steps), data, f"{where}/meta[{i}]")
            if tid in tensors:
                raise ShardError(f"{where}/meta lists tensor {tid} twice")
            tensors[tid] = packed
        rows = [(t.first, t.count) for t in tensors.values()]
        spans = [(t.offset, t.count * t.row_bytes) for t in tensors.values()]
        if not (_tiles(rows, len(steps)) and _tiles(spans, data.shape[0])):
            raise ShardError(f"{where}: the tensors' values do not fill its tables one after another")
        self._packed_tables = steps, crc, data
        self._packed_meta = meta
        return tensors

    def _packed_entry(self, item: object, n_rows: int, data: _Dataset, where: str) -> tuple[int, _Packed]:
        """The id and checked place of the packed tensor ``item`` describes (an entry of ``/packed/meta``), in
        tables of ``n_rows`` rows and ``data``."""
        if not isinstance(item, dict) or not _is_index(tid := item.get("id"), len(self.names)):
            raise ShardError(f"{where} is not an object with the id of a tensor of /names")
        if "dtype" not in item:
            return tid, _Packed(None, (), 0, 0, 0)
        dtype, shape, rows, offset = item["dtype"], item.get("shape"), item.get("rows"), item.get("offset")
        if not isinstance(dtype, str) or not _PACKED_DTYPE.fullmatch(dtype):
            raise ShardError(f"{where}: dtype {dtype!r} is not an integer or float type code such as '<f4'")
        if not isinstance(shape, list) or len(shape) > _MAX_NDIM or not all(_is_index(d, None) for d in shape):
            raise ShardError(f"{where}: shape {shape!r} is not a list of sizes")
        if not isinstance(rows, list) or len(rows) != 2 or not all(_is_index(r, None) for r in rows):
            raise ShardError(f"{where}: rows {rows!r} is not [first, count]")
        packed = _Packed(np.dtype(dtype), tuple(shape), rows[0], rows[1], offset if _is_index(offset, None) else -1)
        if packed.first + packed.count > n_rows or packed.offset < 0 or packed.end > data.shape[0]:
            raise ShardError(f"{where}: its values lie outside /packed (rows {rows}, offset {offset!r})")
        if packed.end > packed.offset and data.offset is None:
            raise ShardError(f"{self.path}: /packed/data is not stored contiguously as its bytes")
        return tid, packed

    def _packed_values(self, tid: int, packed: _Packed) -> _Values:
        """The layout of the values of packed tensor ``tid`` (read by :meth:`_read_packed`)."""
        if packed.dtype is None:
            return _NO_VALUES
        steps, crc, data = self._packed_tables
        own = steps[packed.first : packed.first + packed.count]
        row = {int(s): i for i, s in enumerate(own)}
        if len(row) != packed.count:
            raise ShardError(f"{self.path}: /packed: the steps of tensor {tid} repeat a step")
        start = None if data.offset is None else data.offset + packed.offset
        values = _Dataset(data.id, f"/packed/data of tensor {tid}", packed.dtype, (packed.count, *packed.shape), start)
        return _Values(own, row, values, crc[packed.first : packed.first + packed.count])

    def _grouped(self, tid: int) -> bool:
        """Whether ``/tensors`` links a group (or anything) under ``tid``: always before format 3."""
        if self.version < 3:
            return True
        if self._groups is None:
            self._groups = self._group(self._root, "tensors")
        return bool(self._groups.id.links.exists(str(tid).encode()))

    def _load(self, tid: int) -> _Values:
        packed = None if self._grouped(tid) else self._packed_tensors().get(tid)
        if packed is not None:
            return self._packed_values(tid, packed)
        g = self._tensor_group(tid)
        where = f"{self.path}: {g.where}"
        if not g.id.links.exists(b"data"):
            return _NO_VALUES
        steps = self._verified(self._dataset(g, "steps", INTEGER_KINDS)).astype(np.int64)
        row = {int(s): i for i, s in enumerate(steps)}
        if len(row) != len(steps):
            raise ShardError(f"{where}/steps repeats a step")
        k = len(steps)
        t = _Values(steps, row)
        if self.checksums:
            t.crc = self._read(self._dataset(g, "crc32", "u"))
            if t.crc.shape != (k,):
                raise ShardError(f"{where}/crc32 has {len(t.crc)} checksums for {k} values")
        layout = self._attr(g, "layout", "S")
        if layout == "fixed":
            t.data = self._dataset(g, "data", VALUE_KINDS, ndim=None)
            if not t.data.shape or t.data.shape[0] != k:
                raise ShardError(f"{where}/data holds {t.data.shape[:1]} values for {k} steps")
        elif layout == "ragged":
            t.data = self._dataset(g, "data", VALUE_KINDS)
            offsets = self._verified(self._dataset(g, "offsets", INTEGER_KINDS)).astype(np.int64)
            shapes = self._verified(self._dataset(g, "shapes", INTEGER_KINDS, ndim=2)).astype(np.int64)
            ndims = self._verified(self._dataset(g, "ndims", INTEGER_KINDS)).astype(np.int64)
            if (
                offsets.shape != (k + 1,)
                or shapes.shape[0] != k
                or ndims.shape != (k,)
                or offsets[0] != 0
                or offsets[-1] != t.data.shape[0]
                or (np.diff(offsets) < 0).any()
                or (ndims < 0).any()
                or (ndims > shapes.shape[1]).any()
            ):
                raise ShardError(f"{where}: offsets, shapes and ndims of ragged values do not agree")
            t.offsets = offsets
            t.shapes = [tuple(int(d) for d in shapes[i, : ndims[i]]) for i in range(k)]
            for i, shape in enumerate(t.shapes):
                if min(shape, default=0) < 0 or int(np.prod(shape, dtype=object)) != offsets[i + 1] - offsets[i]:
                    raise ShardError(f"{where}: shape {shape} of value {i} does not match its offsets")
        else:
            raise ShardError(f"{where} has layout {layout!r}, expected 'fixed' or 'ragged'")
        return t

    @_shard_errors
    def raw_steps(self, name: str) -> np.ndarray:
        """Global steps at which ``name`` has a raw value in this shard."""
        return self._values(name).steps

    @_shard_errors
    def values(self, name: str) -> dict[int, np.ndarray]:
        """Every raw value of ``name`` in this shard, by global step (few reads), each verified."""
        t = self._values(name)
        if t.data is None:
            return {}
        data = self._read(t.data)
        if t.offsets is None:
            self._check_rows(t, data)
            out = {s: data[i, ...] for i, s in enumerate(t.steps.tolist())}
        else:
            assert t.shapes is not None
            out = {
                int(s): self._check_row(t, i, data[t.offsets[i] : t.offsets[i + 1]]).reshape(t.shapes[i])
                for i, s in enumerate(t.steps)
            }
        return out

    @_shard_errors
    def last_form(self, name: str) -> tuple[np.dtype[Any], tuple[int, ...]] | None:
        """The dtype and shape of the last raw value of ``name`` in this shard (those its index record's
        ``dtype`` and ``shape`` describe), None if it has none."""
        t = self._values(name)
        if t.data is None or not len(t.steps):
            return None
        return t.data.dtype, tuple(t.data.shape[1:]) if t.shapes is None else t.shapes[-1]

    @_shard_errors
    def stacked(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        """``(steps, values)`` of ``name`` with ``values[i]`` the raw value at ``steps[i]``, in one read
        (each verified); None unless its values have one shape here (fixed layout)."""
        t = self._values(name)
        if t.data is None or t.offsets is not None:
            return None
        data = self._read(t.data)
        self._check_rows(t, data)
        return t.steps, data

    @_shard_errors
    def value(self, name: str, step: int) -> np.ndarray | None:
        """The raw value of ``name`` at global ``step`` (verified), or None."""
        t = self._values(name)
        i = t.row.get(step)
        if i is None or t.data is None:
            return None
        if t.offsets is None:
            return self._check_row(t, i, self._read(t.data, (i, i + 1)))[0, ...]
        assert t.shapes is not None
        value = self._read(t.data, (int(t.offsets[i]), int(t.offsets[i + 1])))
        return self._check_row(t, i, value).reshape(t.shapes[i])

    @_shard_errors
    def histograms(self, name: str) -> dict[int, Histogram]:
        """Saved histograms of ``name`` in this shard, by global step (verified)."""
        tid = self.ids.get(name)
        if tid is None:
            raise ShardError(f"{self.path}: holds no tensor {name!r}")
        if not self._grouped(tid) and tid in self._packed_tensors():  # a packed tensor has no histograms
            return {}
        hg = self._child(self._tensor_group(tid), "histogram", h5py.h5g.GroupID)
        if hg is None:
            return {}
        steps = self._verified(self._dataset(hg, "steps", INTEGER_KINDS))
        edges = self._verified(self._dataset(hg, "edges", "f", ndim=2))
        counts = self._verified(self._dataset(hg, "counts", INTEGER_KINDS, ndim=2))
        if not (len(steps) == len(edges) == len(counts)) or edges.shape[1] != counts.shape[1] + 1:
            raise ShardError(f"{self.path}: {hg.where}: steps, edges and counts do not agree")
        return {int(s): Histogram(edges[i], counts[i]) for i, s in enumerate(steps)}

    @_shard_errors
    def wall_times(self) -> dict[int, float]:
        """``{global step: time.time() when it was committed}`` (empty for shards written without it)."""
        sg = self._group(self._root, "steps")
        if self._child(sg, "wall_time", h5py.h5d.DatasetID) is None:
            return {}
        times = self._verified(self._dataset(sg, "wall_time", "f"))
        steps = self.steps_table()[:, 0]
        if len(times) != len(steps):
            raise ShardError(f"{self.path}: /steps/wall_time has {len(times)} times for {len(steps)} steps")
        return {int(s): float(t) for s, t in zip(steps, times, strict=True)}

    @_shard_errors
    def reductions(self, name: str) -> dict[tuple[int, str], float]:
        """Saved reductions of ``name``: ``{(step, key): value}``."""
        tid = self.ids.get(name)
        if tid is None:
            raise ShardError(f"{self.path}: holds no tensor {name!r}")
        if self._reductions is None:
            self._reductions = self._reduction_table()
        return self._reductions.get(tid, {})

    def _reduction_table(self) -> dict[int, dict[tuple[int, str], float]]:
        rg = self._group(self._root, "reductions")
        try:
            kinds = json.loads(self._attr(rg, "kinds", "S"))
        except (TypeError, ValueError, RecursionError):
            raise ShardError(f"{self.path}: /reductions has no readable 'kinds' attribute") from None
        if not isinstance(kinds, list) or not all(isinstance(k, str) for k in kinds):
            raise ShardError(f"{self.path}: /reductions 'kinds' is not a list of names")
        tids, steps, kind, values = (
            self._verified(self._dataset(rg, part, "f" if part == "value" else INTEGER_KINDS))
            for part in REDUCTION_PARTS
        )
        if not len(tids) == len(steps) == len(kind) == len(values):
            raise ShardError(f"{self.path}: the datasets of /reductions differ in length")
        if len(kind) and (kind.min() < 0 or kind.max() >= len(kinds)):
            raise ShardError(f"{self.path}: /reductions/kind points outside 'kinds'")
        table: dict[int, dict[tuple[int, str], float]] = {}
        for tid, step, k, value in zip(tids.tolist(), steps.tolist(), kind.tolist(), values.tolist(), strict=True):
            table.setdefault(tid, {})[(step, kinds[k])] = value
        return table

    # ------------------------------------------------------------ check
    @_shard_errors
    def steps_table(self) -> np.ndarray:
        """``[step, mode, mode_step]`` of every step in the shard, from ``/steps`` (read once)."""
        if self._steps is None:
            sg = self._group(self._root, "steps")
            cols = [self._verified(self._dataset(sg, part, INTEGER_KINDS)).astype(np.int64) for part in STEP_PARTS]
            if not len(cols[0]) == len(cols[1]) == len(cols[2]):
                raise ShardError(f"{self.path}: the datasets of /steps differ in length")
            self._steps = np.stack(cols, axis=1)
            self._steps.flags.writeable = False  # shared by every caller
        return self._steps

    @_shard_errors
    def validate(self, read_apart: Container[str] = ()) -> None:
        """Check the whole file against the format and read every value once; ShardError on the first problem.

        Objects the format does not define are refused, never read; in a shard of a later minor version of
        this format than this reader knows, which may add objects older readers ignore, they are left unread.
        The raw values of the tensors named in ``read_apart`` are left to the caller, which reads them
        (verified) another way.
        """
        minor = self._attr(self._root, "format_minor", "iu")
        later = self.version == FORMAT_VERSION and isinstance(minor, (int, np.integer)) and minor > FORMAT_MINOR
        packed = self._packed_tensors()
        grouped = [tid for tid in range(len(self.names)) if tid not in packed]
        expected = {
            "/": {"steps", "names", "tensors", "reductions", *(["packed"] if self.version >= 3 else [])},
            "/steps": {*STEP_PARTS, "wall_time"},
            "/reductions": set(REDUCTION_PARTS),
            "/tensors": {str(i) for i in grouped},
            **({"/packed": set(PACKED_PARTS)} if self.version >= 3 else {}),
        }
        for path, allowed in expected.items():
            group = self._root if path == "/" else self._group(self._root, path[1:])
            extra = sorted(_keys(group) - allowed)
            if extra and not later:
                raise ShardError(f"{self.path}: {path.rstrip('/')}/{extra[0]} is not part of the format (not read)")
        for tid in grouped:
            extra = sorted(_keys(self._tensor_group(tid)) - TENSOR_PARTS)
            if extra and not later:
                raise ShardError(f"{self.path}: /tensors/{tid}/{extra[0]} is not part of the format (not read)")
        for i, item in enumerate(self._packed_meta if packed else ()):  # what readers take from the index record
            extra = sorted(set(item) - PACKED_META_KEYS)
            collections, orig = item.get("collections"), item.get("orig_dtype", "")
            if (extra and not later) or not isinstance(collections, list) or not isinstance(orig, str):
                why = f"key {extra[0]!r}" if extra and not later else "collections or orig_dtype"
                raise ShardError(f"{self.path}: /packed/meta[{i}]: {why} not as the format says")
            if not all(isinstance(c, str) for c in collections):
                raise ShardError(f"{self.path}: /packed/meta[{i}]: collections not as the format says")
        self.steps_table()
        self.wall_times()
        for name in self.names:
            if name not in read_apart:
                self.values(name)
            self.reductions(name)
            self.histograms(name)


def _tiles(spans: list[tuple[int, int]], end: int) -> bool:
    """Whether the non-empty ``(start, length)`` of ``spans`` lie one after another from 0 to ``end``."""
    at = 0
    for start, length in sorted(span for span in spans if span[1]):
        if start != at:
            return False
        at += length
    return at == end


def _is_index(value: object, bound: int | None) -> TypeGuard[int]:
    """Whether ``value`` is an int (not a bool) from 0, below ``bound`` if given."""
    return type(value) is int and value >= 0 and (bound is None or value < bound)


_PACKED_DTYPE = re.compile(r"[<>|=]?(?:[iu][1248]|f[248])")
"""The dtypes ``/packed/meta`` may name: those :func:`locatable`, as NumPy type codes."""
_MAX_NDIM = 64
"""NumPy's most dimensions."""


def _keys(group: _Node) -> set[str]:
    """The names of the links of ``group``."""
    return {name.decode("utf-8", "surrogateescape") for name in group.id}

"""The histogram counting thread: histograms of values taken at save, counted while training goes on.

Once a tensor's bins are fixed, the hook takes each later value of a host-binned tensor as
a :class:`~tensortap.reductions.PendingHistogram` (one copy, into a recycled buffer) and
hands it to :data:`COUNTER`, whose thread counts it during the next steps. Counting right
after the step, rather than when the shard is written, spreads the work evenly over the
steps and keeps a shard's buffer small (its counts only). The writer thread, writing the
shard, waits for a histogram being counted, or counts one not yet reached itself.

The compiled kernel (``tensortap._bins``) counts a tensor in one call that releases the GIL,
and NumPy and torch release it in the bulk of their passes where the kernel was not built
(bench/profiles/histogram.md), so the training thread runs beside it. The values waiting to
be counted are bounded by :data:`MAX_PENDING_BYTES`: past it the hook counts on the training
thread instead (the backpressure), so memory stays bounded and nothing is dropped.
"""

from __future__ import annotations

import collections
import itertools
import os
import threading
from collections.abc import Sequence

import numpy as np

from ..reductions import PendingHistogram, dtype_name
from .handoff import Done, Wake

MAX_PENDING_BYTES = 64 << 20  # values waiting to be counted, per process
_POOL_BYTES = MAX_PENDING_BYTES  # recycled value buffers kept for the next steps' copies


class HistogramCounter:
    """One daemon thread per process that counts :class:`~tensortap.reductions.PendingHistogram` in order.

    Training threads hand it work as the writer thread's jobs are handed
    (:mod:`tensortap.capture.handoff`): a ``deque``, a :class:`~tensortap.capture.handoff.Wake`,
    and a :class:`~tensortap.capture.handoff.Done` per step to wait for. Their side takes no lock
    (a lock an interrupt leaves held would stop the counting): each counter it changes is one
    statement, and an interrupt between two of them leaves a bound stricter, never looser
    (:meth:`buffer`, :meth:`submit`).
    """

    def __init__(self, max_bytes: int = MAX_PENDING_BYTES) -> None:
        self.max_bytes = max_bytes
        self._queue: collections.deque[tuple[PendingHistogram, int, Done | None]] = collections.deque()
        self._wake = Wake()
        self._last: Done | None = None  # set when the latest step's histograms are counted
        self._bytes = 0  # of the values submitted and not yet counted
        self._free: dict[tuple[str, int], list[np.ndarray]] = {}
        self._free_bytes = 0
        self._thread: threading.Thread | None = None
        self._claims = itertools.count()  # next() is atomic: the submit that draws 0 starts the thread

    def has_room(self) -> bool:
        """Whether a histogram taken now would be counted on this thread (else: count it at once)."""
        return self._bytes < self.max_bytes

    def buffer(self, dtype: str, size: int) -> np.ndarray:
        """A flat array of ``size`` values of ``dtype`` to take a value into: recycled when one is free.

        Interrupted between taking a buffer and its accounting, the pool keeps fewer buffers after.
        """
        try:
            values = self._free[(dtype, size)].pop()
        except (KeyError, IndexError):  # none free
            return np.empty(size, dtype=dtype)
        self._free_bytes -= values.nbytes
        return values

    def submit(self, hists: Sequence[PendingHistogram]) -> None:
        """Count ``hists`` (a step's) on the counting thread, after those submitted before: one wake-up.

        Interrupted between the accounting and the queueing, the bound on the values waiting
        is lower by these values' bytes after (the training thread then counts sooner).
        """
        taken = [(h, v.nbytes) for h in hists if (v := h.values) is not None]  # not counted by the writer yet
        if not taken:
            return
        if self._thread is None and next(self._claims) == 0:  # the first submit of the process starts it
            self._thread = threading.Thread(target=self._run, name="tensortap-histograms", daemon=True)
            self._thread.start()
        done = Done()
        self._bytes += sum(n for _, n in taken)
        last, nbytes = taken[-1]
        self._queue.extend([(h, n, None) for h, n in taken[:-1]] + [(last, nbytes, done)])
        self._wake.set()
        self._last = done

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every histogram submitted so far is counted; False if ``timeout`` s passed first.

        Counts them on the calling thread if the counting thread never started (an interrupt
        landed between claiming its start and starting it).
        """
        last = self._last
        if last is None:
            return True
        if self._thread is None:
            self._count_queued()
        return last.wait(timeout)

    def clear_buffers(self) -> None:
        """Drop the recycled buffers (capture is over)."""
        self._free = {}
        self._free_bytes = 0

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._count_queued()

    def _count_queued(self) -> None:
        """Count the histograms queued, in order (on the counting thread, else on the one waiting)."""
        while True:
            try:
                hist, nbytes, done = self._queue.popleft()
            except IndexError:
                return
            try:
                values = hist.count()
            except Exception:  # counted again when the shard is written, where the error is reported
                values = None
            self._bytes -= nbytes
            if values is not None and self._free_bytes + values.nbytes <= _POOL_BYTES:
                self._free.setdefault((dtype_name(values.dtype), values.size), []).append(values)
                self._free_bytes += values.nbytes
            if done is not None:
                done.set()


COUNTER = HistogramCounter()


def _forget_after_fork() -> None:
    """In a forked child, the parent's counting thread does not exist: start afresh."""
    global COUNTER
    COUNTER = HistogramCounter()


if hasattr(os, "register_at_fork"):  # POSIX; there is no fork elsewhere
    os.register_at_fork(after_in_child=_forget_after_fork)

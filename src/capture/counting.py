"""The histogram counting thread: histograms of values taken at save, counted while training goes on.

Once a tensor's bins are fixed, the hook takes each later value of a host-binned tensor as
a :class:`~tensortap.reductions.PendingHistogram` (one copy, into a recycled buffer) and
hands it to :data:`COUNTER`, whose thread counts it during the next steps. Counting right
after the step, rather than when the shard is written, spreads the work evenly over the
steps and keeps a shard's buffer small (its counts only). The writer thread, writing the
shard, waits for a histogram being counted, or counts one not yet reached itself.

NumPy and torch release the GIL in the bulk of the counting (bench/profiles/histogram.md),
so the training thread runs beside it. The values waiting to be counted are bounded by
:data:`MAX_PENDING_BYTES`: past it the hook counts on the training thread instead (the
backpressure), so memory stays bounded and nothing is dropped.
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Sequence

import numpy as np

from ..reductions import PendingHistogram, dtype_name

MAX_PENDING_BYTES = 64 << 20  # values waiting to be counted, per process
_POOL_BYTES = MAX_PENDING_BYTES  # recycled value buffers kept for the next steps' copies


class HistogramCounter:
    """One daemon thread per process that counts :class:`~tensortap.reductions.PendingHistogram` in order."""

    def __init__(self, max_bytes: int = MAX_PENDING_BYTES) -> None:
        self.max_bytes = max_bytes
        self._cond = threading.Condition()
        self._queue: collections.deque[tuple[PendingHistogram, int]] = collections.deque()  # and its values' bytes
        self._bytes = 0  # of the values submitted and not yet counted
        self._free: dict[tuple[str, int], list[np.ndarray]] = {}
        self._free_bytes = 0
        self._thread: threading.Thread | None = None

    def has_room(self) -> bool:
        """Whether a histogram taken now would be counted on this thread (else: count it at once)."""
        return self._bytes < self.max_bytes

    def buffer(self, dtype: str, size: int) -> np.ndarray:
        """A flat array of ``size`` values of ``dtype`` to take a value into: recycled when one is free."""
        with self._cond:
            free = self._free.get((dtype, size))
            if free:
                self._free_bytes -= free[-1].nbytes
                return free.pop()
        return np.empty(size, dtype=dtype)

    def submit(self, hists: Sequence[PendingHistogram]) -> None:
        """Count ``hists`` (a step's) on the counting thread, after those submitted before: one wake-up."""
        taken = [(h, v.nbytes) for h in hists if (v := h.values) is not None]  # not counted by the writer yet
        if not taken:
            return
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="tensortap-histograms", daemon=True)
                self._thread.start()
            self._queue.extend(taken)
            self._bytes += sum(n for _, n in taken)
            self._cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every histogram submitted so far is counted; False if ``timeout`` s passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and self._bytes == 0, timeout)

    def clear_buffers(self) -> None:
        """Drop the recycled buffers (capture is over)."""
        with self._cond:
            self._free.clear()
            self._free_bytes = 0

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._queue))
                hist, nbytes = self._queue.popleft()
            try:
                values = hist.count()
            except Exception:  # counted again when the shard is written, where the error is reported
                values = None
            with self._cond:
                self._bytes -= nbytes
                if values is not None and self._free_bytes + values.nbytes <= _POOL_BYTES:
                    self._free.setdefault((dtype_name(values.dtype), values.size), []).append(values)
                    self._free_bytes += values.nbytes
                self._cond.notify_all()


COUNTER = HistogramCounter()


def _forget_after_fork() -> None:
    """In a forked child, the parent's counting thread does not exist: start afresh."""
    global COUNTER
    COUNTER = HistogramCounter()


if hasattr(os, "register_at_fork"):  # POSIX; there is no fork elsewhere
    os.register_at_fork(after_in_child=_forget_after_fork)

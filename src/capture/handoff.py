"""Handing work from training threads to tensortap's own threads, where a ``KeyboardInterrupt``
may land between any two bytecodes of the training thread.

Python's default SIGINT handler (Jupyter installs it around every cell) raises in the main
thread wherever it runs. ``threading.Condition``, under ``threading.Event`` and ``queue.Queue``,
can be left in the wrong state by such an interrupt: inside ``Condition.wait`` its lock is left
released under a ``with`` (a ``RuntimeError: release unlocked lock`` then escapes the user's
``except KeyboardInterrupt``: measured, tests/test_crash.py), at the return of
``Condition.__enter__`` held for ever. So the training thread's side of a handoff (the writer
thread's jobs, the histograms to count) uses only bare locks, whose ``acquire`` and ``release``
are single C calls, and ``collections.deque`` operations, atomic under the GIL: :class:`Wake`
to wake the thread that works, :class:`Done` to wait for its work.
"""

from __future__ import annotations

import threading
import time

SLICE_SECONDS = 0.1  # how long a Done waiter holds the lock at a time (another may hold it for ever)


class Done:
    """A flag that one thread sets once and others wait for.

    Waits on a bare lock, released once by :meth:`set`; a waiter interrupted while it holds the
    lock leaves it held, and every later wait reads the flag first.
    """

    __slots__ = ("_flag", "_lock")

    def __init__(self) -> None:
        self._flag = False
        self._lock = threading.Lock()
        self._lock.acquire()

    def set(self) -> None:
        """Set the flag and wake the waiters (once; later calls do nothing)."""
        if not self._flag:
            self._flag = True
            self._lock.release()

    def is_set(self) -> bool:
        """Whether :meth:`set` was called."""
        return self._flag

    def wait(self, timeout: float) -> bool:
        """Wait until the flag is set, ``timeout`` s at most; return the flag."""
        deadline = time.monotonic() + timeout
        while not self._flag:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            # in slices: another waiter, interrupted between its acquire and release, may hold the lock
            if self._lock.acquire(timeout=min(left, SLICE_SECONDS)):
                self._lock.release()
        return True


class Wake:
    """Wakes the one thread that takes work from a ``deque``: a binary semaphore of a bare lock.

    Producers append their work, then :meth:`set`; the worker :meth:`wait`\\ s, then takes
    everything queued. A wake-up set while one is pending is absorbed by it, and none is lost:
    work appended after the worker found the queue empty comes with a wake-up still pending.
    """

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()

    def set(self) -> None:
        """Wake the worker (any thread)."""
        try:
            self._lock.release()
        except RuntimeError:  # released already: a wake-up is pending
            pass

    def wait(self, timeout: float | None = None) -> None:
        """Wait for a wake-up, ``timeout`` s at most (the worker only)."""
        self._lock.acquire(timeout=-1 if timeout is None else timeout)

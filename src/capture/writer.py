"""The write path below the hook: shard buffering, the writer thread, publishing.

One daemon thread per process owns every h5py call made while capturing. A
:class:`TrialWriter` (one per hook) buffers saved steps and hands a full
buffer to that thread, which writes the shard to a temporary file, publishes
it atomically and then writes its index record. The thread also publishes
buffers that are older than ``max_seconds`` while training is idle, so data
reaches live readers in time. Every open writer is closed at normal
interpreter exit and on SIGTERM.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import signal
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from types import FrameType
from typing import Any

from ..backends import layout
from ..backends.shard import POOL, ShardBuffer, write_shard
from ..backends.storage import Storage
from ..config import check_keys
from ..reductions import Histogram

logger = logging.getLogger("tensortap")


@dataclass(frozen=True)
class ShardPolicy:
    """When a shard is closed and published: whichever limit is reached first.

    Parameters
    ----------
    max_steps
        Saved steps per shard.
    max_seconds
        Age of the oldest unpublished step; this bounds how late a live reader sees data.
    max_bytes
        Bytes of tensor data buffered per shard.
    compression
        ``None`` (default), ``"gzip"`` or ``"lzf"``.
    """

    max_steps: int = 1000
    max_seconds: float = 2.0
    max_bytes: int = 256 << 20
    compression: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_steps, int) or self.max_steps < 1:
            raise ValueError(f"max_steps: expected an integer >= 1, got {self.max_steps!r}")
        if not isinstance(self.max_seconds, (int, float)) or self.max_seconds <= 0:
            raise ValueError(f"max_seconds: expected a number > 0, got {self.max_seconds!r}")
        if not isinstance(self.max_bytes, int) or self.max_bytes < 1:
            raise ValueError(f"max_bytes: expected an integer >= 1, got {self.max_bytes!r}")
        if self.compression not in (None, "gzip", "lzf"):
            raise ValueError(f"compression: {self.compression!r} is not valid; valid: None, 'gzip', 'lzf'")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ShardPolicy:
        """Build from a JSON object with the fields above."""
        check_keys("shard_policy", data, {f.name for f in fields(cls)})
        return cls(**dict(data))


class _Job:
    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn
        self.done = threading.Event()


class _WriterThread:
    """The process's single writer thread."""

    _instance: _WriterThread | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.jobs: queue.Queue[_Job] = queue.Queue(maxsize=4)
        self.writers: weakref.WeakSet[TrialWriter] = weakref.WeakSet()
        self.thread = threading.Thread(target=self._run, name="tensortap-writer", daemon=True)
        self.thread.start()

    @classmethod
    def get(cls) -> _WriterThread:
        with cls._lock:
            if cls._instance is None or not cls._instance.thread.is_alive():
                cls._instance = _WriterThread()
                _install_exit_handlers()
            return cls._instance

    def submit(self, fn: Callable[[], None]) -> _Job:
        job = _Job(fn)
        if threading.current_thread() is self.thread:
            self._execute(job)
        else:
            self.jobs.put(job)  # blocks when the queue is full: backpressure on training
        return job

    @staticmethod
    def _execute(job: _Job) -> None:
        try:
            job.fn()
        finally:
            job.done.set()

    def _run(self) -> None:
        while True:
            try:
                job = self.jobs.get(timeout=0.1)
            except queue.Empty:
                for w in list(self.writers):
                    w.publish_if_old()
                continue
            self._execute(job)


class TrialWriter:
    """Buffers one worker's saved steps into shards and publishes them.

    Parameters
    ----------
    storage
        Where the trial lives.
    worker
        ``worker_<rank>``.
    policy
        When to close a shard.
    worker_info
        JSON-serialisable facts written to the worker record at start
        (framework, collections, configuration).
    on_error
        Called once, from the writer thread, with the first exception a publish raised.

    Raises
    ------
    OSError
        If the trial root cannot be created or written.
    """

    def __init__(
        self,
        storage: Storage,
        worker: str,
        policy: ShardPolicy,
        worker_info: dict[str, Any],
        on_error: Callable[[BaseException], None],
    ) -> None:
        self.storage = storage
        self.worker = worker
        self.policy = policy
        self.on_error = on_error
        self.error: BaseException | None = None
        self.closed = False
        self._lock = threading.RLock()
        self._buffer = ShardBuffer(policy.max_steps, policy.max_bytes)
        self._since = 0.0
        self._pending: list[_Job] = []
        self._io_lock = threading.Lock()  # held by the writer thread while it publishes on its own
        storage.makedirs()
        storage.write_json(
            layout.worker_key(worker),
            {"worker": worker, "pid": os.getpid(), "started": time.time(), **worker_info},
        )
        storage.delete(layout.end_key(worker))
        existing = storage.list(f"{layout.INDEX}/{worker}")
        self._seq = max((int(n.split(".")[0]) for n in existing if n.endswith(".json")), default=-1) + 1
        self._thread = _WriterThread.get()
        self._thread.writers.add(self)
        _OPEN_WRITERS.add(self)

    def stage(
        self,
        step: int,
        name: str,
        collections: tuple[str, ...],
        raw: Any,
        reductions: dict[str, float],
        orig_dtype: str | None,
        histogram: Histogram | None = None,
    ) -> Any:
        """Copy one tensor of the step in progress into the shard buffer; return the stored raw value.

        A tensor keeps one dtype within a shard: when its dtype changes, the
        committed steps are published first and the step in progress moves to a new shard.
        """
        job = None
        with self._lock:
            if self.closed or self.error is not None:
                return raw
            if self._buffer.conflicts(name, raw):
                job = self._take_locked()
            if not self._buffer.steps and not self._buffer.staging:
                self._since = time.monotonic()
            stored = self._buffer.stage(step, name, collections, raw, reductions, orig_dtype, histogram)
        if job is not None:
            self._submit(job)
        return stored

    def commit(self, step: int, mode: int, mode_step: int) -> None:
        """The step in progress is complete; publish the buffer when a limit is reached."""
        with self._lock:
            if self.closed or self.error is not None:
                return
            self._buffer.commit(step, mode, mode_step)
            full = len(self._buffer) >= self.policy.max_steps or self._buffer.nbytes >= self.policy.max_bytes
            job = self._take_locked() if full or self._old() else None
        if job is not None:
            self._submit(job)

    def rollback(self) -> None:
        """Drop the values of the step in progress (the process is exiting mid-step)."""
        with self._lock:
            self._buffer.rollback()

    def _old(self) -> bool:
        return bool(self._buffer) and time.monotonic() - self._since >= self.policy.max_seconds

    def publish_if_old(self) -> None:
        """Publish the buffer if its oldest step is older than ``max_seconds`` (writer thread)."""
        with self._io_lock:
            if not self._lock.acquire(blocking=False):
                return
            try:
                job = self._take_locked() if self._old() else None
            finally:
                self._lock.release()
            if job is not None:
                job()

    def _take_locked(self) -> Callable[[], None] | None:
        if not self._buffer:
            return None
        buffer, seq = self._buffer, self._seq
        # a step in progress moves on to the next shard
        self._buffer = (
            buffer.detach_staged() if buffer.staging else ShardBuffer(self.policy.max_steps, self.policy.max_bytes)
        )
        self._seq += 1
        return lambda: self._publish(buffer, seq)

    def _submit(self, fn: Callable[[], None]) -> None:
        self._pending = [j for j in self._pending if not j.done.is_set()]
        self._pending.append(self._thread.submit(fn))

    def _publish(self, buffer: ShardBuffer, seq: int) -> None:
        if self.error is not None:
            return
        key = layout.shard_key(self.worker, seq)
        try:
            staging = os.path.join(self.storage.staging_dir(), layout.SHARDS, self.worker)
            os.makedirs(staging, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{seq:010d}.", suffix=".h5.tmp", dir=staging)
            os.close(fd)
            try:
                record = write_shard(tmp, self.worker, seq, buffer, key, self.policy.compression)
                buffer.release()
                self.storage.publish_file(tmp, key)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            self.storage.write_json(layout.index_key(self.worker, seq), record)
        except BaseException as exc:  # reported to the hook, never raised into the writer thread
            self.error = exc
            self.on_error(exc)

    def flush(self) -> None:
        """Publish what is buffered and wait until every submitted shard is published."""
        with self._lock:
            job = self._take_locked()
        if job is not None:
            self._submit(job)
        for j in self._pending:
            j.done.wait()
        self._pending = []
        with self._io_lock:  # a publish the writer thread started on its own
            pass

    def close(
        self,
        reason: str = "closed",
        last_step: int | None = None,
        mode_steps: dict[str, int] | None = None,
    ) -> None:
        """Flush, then write the end-of-training marker (unless publishing failed). Idempotent.

        Parameters
        ----------
        reason
            Why training ended: ``closed``, ``exit``, ``sigterm``, ``stop_request``.
        last_step, mode_steps
            The last global step the hook counted, and the last step of each mode (by name).
        """
        if self.closed:
            return
        self.flush()
        self.closed = True
        _OPEN_WRITERS.discard(self)
        self._thread.writers.discard(self)
        if not _OPEN_WRITERS:
            POOL.clear()  # keep no memory once capture is over
        if self.error is None:
            try:
                self.storage.write_json(
                    layout.end_key(self.worker),
                    {
                        "worker": self.worker,
                        "reason": reason,
                        "last_step": last_step,
                        "mode_steps": mode_steps or {},
                        "time": time.time(),
                    },
                )
            except OSError as exc:
                self.error = exc
                self.on_error(exc)


_OPEN_WRITERS: weakref.WeakSet[TrialWriter] = weakref.WeakSet()
_CLOSE_CALLBACKS: weakref.WeakSet[Any] = weakref.WeakSet()  # hooks with a close_for_exit(reason)
_handlers_installed = False


def register_for_exit(hook: Any) -> None:
    """Make ``hook.close_for_exit(reason)`` run at interpreter exit and on SIGTERM."""
    _CLOSE_CALLBACKS.add(hook)


def _forget_after_fork() -> None:
    """In a forked child (a DataLoader worker, ...): the parent's writers are not the child's.

    The child must neither publish the parent's buffered steps nor end its
    training, and cannot: the writer thread does not exist in the child.
    """
    for w in list(_OPEN_WRITERS):
        w.closed = True
    _OPEN_WRITERS.clear()
    _CLOSE_CALLBACKS.clear()
    _WriterThread._instance = None


if hasattr(os, "register_at_fork"):  # POSIX; there is no fork elsewhere
    os.register_at_fork(after_in_child=_forget_after_fork)


def close_all(reason: str) -> None:
    """Close every open hook and writer (at exit, on SIGTERM)."""
    for hook in list(_CLOSE_CALLBACKS):
        try:
            hook.close_for_exit(reason)
        except Exception:  # exiting: report, never raise
            logger.exception("tensortap: closing a hook at %s failed", reason)
    for w in list(_OPEN_WRITERS):
        w.close(reason)


def _close_at_threading_exit() -> None:
    main = threading.main_thread()
    if not any(t is not main and not t.daemon and t.is_alive() for t in threading.enumerate()):
        close_all("exit")


def _install_exit_handlers() -> None:
    global _handlers_installed
    if _handlers_installed:
        return
    _handlers_installed = True
    atexit.register(close_all, "exit")
    # Close earlier where possible: before threading shuts down thread pools, which asyncio
    # clients (s3fs/aiobotocore) need for DNS and new connections, and before weakref
    # finalizers close their sessions. Not while other non-daemon threads may still train.
    import concurrent.futures.thread  # noqa: F401  its exit hook stops the pools; registered first, it runs after ours

    register_threading_exit = getattr(threading, "_register_atexit", None)
    if register_threading_exit is not None:
        register_threading_exit(_close_at_threading_exit)
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        close_all("sigterm")
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    try:
        signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread of the main interpreter
        pass

"""The write path below the hook: claiming a worker name, shard buffering, the writer thread, publishing.

One daemon thread per process owns every h5py call made while capturing. A
:class:`TrialWriter` (one per hook) claims its worker name in the trial (see
``if_exists``), buffers saved steps and hands a full buffer to that thread,
which writes the shard to a temporary file, publishes it atomically and then
writes its index record. The thread also publishes buffers before they are
``live_seconds`` old while publishing is cheap, and before they are
``max_seconds`` old in any case, so data reaches live readers in time. Every storage call
runs off the training thread, and the training thread never waits for one
longer than ``ShardPolicy.timeout``.

Every open writer is closed at normal interpreter exit and on SIGTERM. The
SIGTERM and SIGINT handlers never interrupt tensortap's own code: a signal
that lands while the main thread is inside it (recording a step, holding a
lock) is delivered again once the main thread is back in the user's code, so
a step being recorded is finished first and no lock is ever taken twice.
``docs/reliability.md`` lists what is promised and the tests that check it.
"""

from __future__ import annotations

import _thread
import atexit
import collections
import contextlib
import functools
import logging
import math
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from types import FrameType, TracebackType
from typing import Any, Literal, TypeVar

from ..backends import layout
from ..backends.shard import PACK_BYTES, POOL, PreparedShard, ShardBuffer, prepare_shard
from ..backends.storage import STORAGE_FAILURES, Bound, Storage, bounded, kept
from ..config import check_keys
from ..exceptions import TrialExistsError
from ..modes import Mode
from ..processes import process_record
from ..reductions import Histogram, PendingHistogram
from ..trial.index import read_records
from . import counting
from .handoff import Done, Wake

logger = logging.getLogger("tensortap")

IfExists = Literal["error", "overwrite", "new_run"]
IF_EXISTS = ("error", "overwrite", "new_run")
POLL_SECONDS = 0.1  # how often the writer thread looks for buffers due for publishing
LIVE_SHARE = 0.02  # publishing at the live deadline takes at most this share of one core (the writer thread's CPU)
IN_FLIGHT = 2  # shards handed off and not yet published that a hand-off does not wait for, bytes allowing (_hand_off)
RETRY_SHARE = 0.9
"""Share of a wait for the storage (``ShardPolicy.timeout``) during which the storage calls waited for retry
transient errors (:class:`~tensortap.backends.storage.Bound`): an outage shorter than that is waited out. The
rest is left for the last attempt to end, so that the waiter reports the storage's error, not its own timeout."""
RETRY_AFTER_ERROR_SECONDS = 2.0
"""How long the end marker of a capture that a storage error turned off is retried, at most: the storage failed
for a whole bound already, and ``close()`` waits for it (twice where it fails: :meth:`TrialWriter.close`)."""
_T = TypeVar("_T")
Staged = tuple[str, tuple[str, ...], Any, dict[str, float], str | None, Histogram | PendingHistogram | None]
"""One tensor for :meth:`TrialWriter.stage`: name, collections, raw host array (or None), reductions,
original dtype (or None), histogram (or None)."""


@dataclass(frozen=True)
class ShardPolicy:
    """When a shard is closed and published: whichever limit is reached first.

    Parameters
    ----------
    max_steps
        Saved steps per shard.
    max_seconds
        Age of the oldest unpublished step at which the shard is published at the latest:
        this bounds how late a live reader sees data, and what a SIGKILL loses.
    max_bytes
        Bytes of tensor data capture holds for steps not yet published (the memory bound):
        a shard closes at a quarter of it (:attr:`shard_bytes`) or at the first step past
        that, and a hand-off waits until the shards handed off and not yet published are at
        most :data:`IN_FLIGHT` (2) holding at most three quarters of it, so that they and the
        shard being built hold at most ``max_bytes`` plus the step in progress. A shard larger
        than three quarters of ``max_bytes`` (one step larger than that) is published whole,
        the only one in flight: the writer then holds it and what was built meanwhile (the
        step in progress, where each step fills a shard). Besides, the arrays of the shard
        published last wait in a pool (:data:`~tensortap.backends.shard.POOL`, 1 GiB at most)
        for the next one.
    compression
        ``None`` (default), ``"gzip"`` or ``"lzf"``.
    pack_bytes
        A tensor whose raw values in a shard take fewer bytes than this (default 256 KiB), of
        one shape, an integer or float dtype and without histograms, is kept in the shard's
        shared tables (``/packed``, format 3) rather than in HDF5 objects of its own: laying
        out a shard of 1,000 small tensors took 0.2 s of CPU with a group each. ``0`` gives
        every tensor its own group (``/tensors/<id>``), read by path with plain h5py;
        compressed shards do so anyway. See ``docs/format.md``.
    timeout
        Seconds the training thread waits, at most, for the storage: for the set-up at
        construction, for room in the publishing queue, for one publish at ``flush``/``close``.
        Past it, capture turns itself off (training goes on) and the error is logged. Storage
        calls of remote backends retry transient errors for :data:`RETRY_SHARE` (90%) of it, so
        an outage shorter than that costs no data (training waits for it where it waits for the
        storage); a longer one turns capture off with the storage's error.
    live_seconds
        Age at which the shard is published already while publishing is cheap, so live
        readers see a step within about ``live_seconds`` plus their ``refresh_interval``.
        The deadline stretches from ``live_seconds`` towards ``max_seconds`` as publishes
        cost more CPU time (many tensors, large steps): time-based publishing never takes
        more than ``LIVE_SHARE`` (2%) of one core, so short deadlines do not fill a
        trial with tiny shards (see :func:`publish_deadline`). ``None``, or a value of
        ``max_seconds`` or more, publishes by ``max_seconds`` only (the fewest shards).
    """

    max_steps: int = 1000
    max_seconds: float = 2.0
    max_bytes: int = 256 << 20
    compression: str | None = None
    pack_bytes: int = PACK_BYTES
    timeout: float = 60.0
    live_seconds: float | None = 0.5

    def __post_init__(self) -> None:
        if not isinstance(self.max_steps, int) or self.max_steps < 1:
            raise ValueError(f"max_steps: expected an integer >= 1, got {self.max_steps!r}")
        if not isinstance(self.max_seconds, (int, float)) or self.max_seconds <= 0:
            raise ValueError(f"max_seconds: expected a number > 0, got {self.max_seconds!r}")
        live = self.live_seconds
        if live is not None and (not isinstance(live, (int, float)) or isinstance(live, bool) or live <= 0):
            raise ValueError(f"live_seconds: expected a number > 0 or None, got {live!r}")
        if not isinstance(self.max_bytes, int) or self.max_bytes < 1:
            raise ValueError(f"max_bytes: expected an integer >= 1, got {self.max_bytes!r}")
        if not isinstance(self.timeout, (int, float)) or self.timeout <= 0:
            raise ValueError(f"timeout: expected a number > 0, got {self.timeout!r}")
        if self.compression not in (None, "gzip", "lzf"):
            raise ValueError(f"compression: {self.compression!r} is not valid; valid: None, 'gzip', 'lzf'")
        if type(self.pack_bytes) is not int or self.pack_bytes < 0:
            raise ValueError(f"pack_bytes: expected an integer >= 0, got {self.pack_bytes!r}")

    @property
    def shard_bytes(self) -> int:
        """Bytes of tensor data at which a shard closes: ``max_bytes`` over :data:`IN_FLIGHT` + 2."""
        return max(1, self.max_bytes // (IN_FLIGHT + 2))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ShardPolicy:
        """Build from a JSON object with the fields above."""
        check_keys("shard_policy", data, {f.name for f in fields(cls)})
        return cls(**dict(data))


def publish_deadline(policy: ShardPolicy, publish_cpu_seconds: float) -> float:
    """Age (seconds) of the oldest unpublished step at which the buffer is published.

    ``policy.live_seconds`` while a publish takes little CPU time, stretched so that
    publishing once per deadline takes at most :data:`LIVE_SHARE` of the time
    (``publish_cpu_seconds / LIVE_SHARE``), and never beyond ``policy.max_seconds``.

    Parameters
    ----------
    policy
        The shard policy.
    publish_cpu_seconds
        CPU time one publish takes on the writer thread (a moving average; 0 before the first).
    """
    if policy.live_seconds is None:
        return policy.max_seconds
    return min(policy.max_seconds, max(policy.live_seconds, publish_cpu_seconds / LIVE_SHARE))


def _discard(prepared: PreparedShard) -> None:
    """Remove ``prepared``'s file if it is still in the staging folder (not published)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(prepared.path)


def _moving_average(average: float, value: float, first: bool) -> float:
    return value if first else 0.7 * average + 0.3 * value


def run_bounded(fn: Callable[[Callable[[], None]], _T], timeout: float, what: str) -> _T:
    """Return ``fn(answered)`` run on a daemon thread; raise TimeoutError once the storage gave it no answer for
    ``timeout`` s.

    ``fn`` calls ``answered()`` after each part of a task whose length grows with the trial (a batch of
    deletes or of records read): the caller waits on while the storage answers, so a large trial on a store
    that answers is set up however long it takes, and one that stops answering is given up ``timeout`` s after
    its last answer. The storage calls of ``fn`` retry transient errors for :data:`RETRY_SHARE` of ``timeout``
    from the start or the last answer (:func:`~tensortap.backends.storage.bounded`): an outage shorter than
    that is waited out, a longer one raises the storage's last error. A call that never returns (a storage
    endpoint that accepts connections and never answers) is left behind on its daemon thread; the caller goes
    on, and no other storage call of ``fn`` starts after (it would write into a trial the caller gave up on).
    """
    gave_up = Done()
    bound = Bound(RETRY_SHARE * timeout, gave_up.is_set)
    last = time.monotonic()

    def answered() -> None:
        nonlocal last
        last = time.monotonic()
        bound.until = last + RETRY_SHARE * timeout

    def call() -> _T:
        with bounded(bound):
            return fn(answered)

    result = on_daemon_thread(call, "tensortap-storage")
    while True:
        try:
            return result(max(0.0, last + timeout - time.monotonic()))
        except _NoAnswer:
            if time.monotonic() - last >= timeout:
                gave_up.set()
                raise TimeoutError(f"{what}: the storage did not answer within {timeout:g} s") from None


class _NoAnswer(Exception):
    """A call started by :func:`on_daemon_thread` is still running when its waiter gives up."""


def on_daemon_thread(fn: Callable[[], _T], name: str) -> Callable[[float], _T]:
    """Start ``fn()`` on a daemon thread named ``name``; return its waiter, which returns what ``fn``
    returned or raises what it raised, waiting ``timeout`` s at most (``math.inf``: as long as it
    takes); past it, :class:`_NoAnswer`. Where no thread can start (Python 3.12 at interpreter
    shutdown, when the exit handler publishes), ``fn()`` runs in the caller, without a bound."""
    result: list[Any] = []
    failure: list[BaseException] = []
    done = Done()

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # handed to the caller
            failure.append(exc)
        finally:
            done.set()

    try:
        threading.Thread(target=target, name=name, daemon=True).start()
    except RuntimeError:  # at interpreter shutdown Python 3.12 starts no thread: the call runs here, unbounded
        target()

    def wait(timeout: float) -> _T:
        if not done.wait(timeout):
            raise _NoAnswer
        if failure:
            raise failure[0]
        return result[0]

    return wait


# ------------------------------------------------------------------ claiming a worker name
def _exists_message(storage: Storage, worker: str) -> str:
    return (
        f"{storage.url} already holds data of {worker} ({layout.worker_key(worker)}: a previous run, or another "
        'process running now with the same rank). Choose: if_exists="overwrite" replaces that worker\'s data, '
        f'if_exists="new_run" writes each run to {storage.url.rstrip("/")}/{layout.RUN_PREFIX}<n>, or give each run '
        "a folder of its own (and each process of one run its own rank)"
    )


DELETES_AT_ONCE = 1000
"""Files one :meth:`~tensortap.backends.storage.Storage.delete_many` call removes when a run is overwritten (one
request on S3, whose ``DeleteObjects`` takes 1,000 keys)."""


def _remove_worker(storage: Storage, worker: str, started: float, answered: Callable[[], None]) -> None:
    """Delete what an earlier run of ``worker`` wrote, :data:`DELETES_AT_ONCE` files a call (``answered()`` after
    each). Its end marker first, so a run removed half-way (capture gave up) reads as one that did not end,
    never as one that ended with fewer steps; then its index records, so no reader follows one to a gone shard;
    then its shards."""
    storage.delete(layout.end_key(worker))
    for folder in (f"{layout.INDEX}/{worker}", f"{layout.SHARDS}/{worker}"):
        names = storage.list(folder)
        answered()
        for first in range(0, len(names), DELETES_AT_ONCE):
            storage.delete_many([f"{folder}/{name}" for name in names[first : first + DELETES_AT_ONCE]])
            answered()
        if names:
            # a batch passes over keys the store refused (s3fs: S3's quiet DeleteObjects): those still listed are
            # deleted one by one, which raises the refusal
            for name in storage.list(folder):
                storage.delete(f"{folder}/{name}")
    try:
        request = storage.read_json(layout.STOP_REQUEST)
    except (OSError, ValueError):
        return
    stale = not isinstance(request, dict) or not isinstance(request.get("time"), (int, float))
    if stale or request["time"] < started:  # written before this run started: it stopped the run replaced
        storage.delete(layout.STOP_REQUEST)


Recorded = tuple[int, dict[int, int]]
"""The last global step of a worker's index records, and the last step of each mode (by its number)."""


def _resume(
    storage: Storage, worker: str, record: dict[str, Any], answered: Callable[[], None]
) -> tuple[int, Recorded] | None:
    """:func:`_continue` ``worker``'s run in ``storage`` if its record has ``record``'s run id; None if not."""
    try:
        if storage.read_json(layout.worker_key(worker)).get("run_id") != record["run_id"]:
            return None
    except STORAGE_FAILURES:  # the record may be there: never taken for another run's (overwritten)
        raise
    except (OSError, ValueError, AttributeError):
        return None
    return _continue(storage, worker, record, answered)


def _continue(
    storage: Storage, worker: str, record: dict[str, Any], answered: Callable[[], None]
) -> tuple[int, Recorded]:
    """Continue ``worker``'s run in ``storage``, whose record has ``record``'s run id: return the next shard number
    and the steps the index records of the run list (:func:`recorded_steps`: those of every worker, so that the
    ranks of a run resumed together number on alike). Its end marker is removed and its record written anew only
    once those are read: a resume that fails (the storage stops answering) leaves the run as it was."""
    key = layout.worker_key(worker)
    listed = _index_records(storage, answered)
    recorded = recorded_steps(storage, listed, answered)
    storage.delete(layout.end_key(worker))
    storage.write_json(key, record)
    seqs = [n.split(".")[0] for n in listed.get(worker, [])]
    return max((int(n) for n in seqs if n.isdigit()), default=-1) + 1, recorded


_MODES = frozenset(int(m) for m in Mode)


def _index_records(storage: Storage, answered: Callable[[], None]) -> dict[str, list[str]]:
    """The names of the index records (``*.json``) of every worker in ``storage``, by worker, each folder listed
    once (``answered()`` after each)."""
    listed: dict[str, list[str]] = {}
    for worker in storage.list_dirs(layout.INDEX):
        listed[worker] = [name for name in storage.list(f"{layout.INDEX}/{worker}") if name.endswith(".json")]
        answered()
    return listed


def recorded_steps(storage: Storage, listed: Mapping[str, list[str]], answered: Callable[[], None]) -> Recorded:
    """The last global step the index records ``listed`` (:func:`_index_records`: of every worker in ``storage``, a
    run) list, and the last step of each mode (by its number), the greatest over the workers: -1 and none where
    there is none. The ranks of a run resumed after a crash had each published a different number of steps;
    numbered on from their own, they would give one training step different numbers. Read
    :data:`~tensortap.trial.index.RECORDS_AT_ONCE` at once (``answered()`` after each). A record that cannot be
    read is passed over (a reader reports it); a failure of the storage is raised
    (:meth:`~tensortap.backends.storage.Storage.read_json_many`)."""
    keys = [f"{layout.INDEX}/{worker}/{name}" for worker, names in listed.items() for name in names]
    last, modes = -1, dict[int, int]()
    for _, record in read_records(storage, keys):
        answered()
        try:
            for step, mode, mode_step in record.get("steps"):
                if type(step) is type(mode) is type(mode_step) is int and mode in _MODES:
                    last, modes[mode] = max(last, step), max(modes.get(mode, -1), mode_step)
        except (ValueError, TypeError, AttributeError):  # an error in place of the record has no .get
            continue
    return last, modes


def _run_folder_of(
    storage: Storage, worker: str, run_id: str, numbers: Sequence[int], answered: Callable[[], None]
) -> int | None:
    """The number of the last of the run folders ``run-<n>`` (``numbers``) of ``storage`` whose record of ``worker``
    names ``run_id``; None if none does. Not only the last folder: other trainings may have written run folders
    since (a run trained further after another run). The records are read
    :data:`~tensortap.trial.index.RECORDS_AT_ONCE` at once, the last folders first (``answered()`` after each); one
    that cannot be read is passed over, a failure of the storage is raised."""
    key = layout.worker_key(worker)
    keys = [f"{layout.RUN_PREFIX}{n}/{key}" for n in sorted(numbers, reverse=True)]
    for found, got in read_records(storage, keys):
        answered()
        if isinstance(got, dict) and got.get("run_id") == run_id:
            return layout.run_number(found.partition("/")[0])
    return None


def claim_worker(
    storage: Storage,
    worker: str,
    record: dict[str, Any],
    if_exists: IfExists,
    resume: bool = False,
    *,
    answered: Callable[[], None],
) -> tuple[Storage, int, Recorded]:
    """Create the trial root and write ``worker``'s record; return the storage the worker writes to, its first seq
    and, of a continued run, the steps recorded (:func:`recorded_steps`; else -1 and none).

    ``if_exists`` says what happens when ``worker`` is already recorded there: ``"error"``
    raises :class:`TrialExistsError`, ``"overwrite"`` removes that worker's data first,
    ``"new_run"`` writes to the run folder ``run-<n>`` (the last one, if this worker is not
    recorded in it yet: ranks of one run share it; otherwise a new one). On storage with
    exclusive create (local folders), two processes claiming one name at the same instant
    cannot both succeed. With ``resume``, a worker recorded with ``record["run_id"]`` (the
    same run, trained further) is continued instead; with ``"new_run"``, in whichever run folder
    it is recorded (:func:`_run_folder_of`). ``answered`` is called after each batch of
    a task that grows with the trial (see :func:`run_bounded`).
    """
    storage.makedirs()
    key = layout.worker_key(worker)
    if if_exists == "new_run":
        numbers = [k for name in storage.list_dirs("") if (k := layout.run_number(name)) is not None]
        if resume and (found := _run_folder_of(storage, worker, record["run_id"], numbers, answered)) is not None:
            run = storage.child(f"{layout.RUN_PREFIX}{found}")
            return run, *_continue(run, worker, record, answered)
        n = max(numbers, default=0)
        while True:
            run = storage.child(f"{layout.RUN_PREFIX}{n}")
            run.makedirs()
            if run.create_json(key, record):
                return run, 0, (-1, {})
            n += 1
    # index records of the worker without its record (a folder removed mid-run and made anew): taken too
    orphaned = bool(storage.list(f"{layout.INDEX}/{worker}")) and not storage.exists(key)
    if not orphaned and storage.create_json(key, record):
        return storage, 0, (-1, {})
    if resume and (resumed := _resume(storage, worker, record, answered)) is not None:
        return storage, *resumed
    if if_exists == "error":
        raise TrialExistsError(_exists_message(storage, worker))
    _remove_worker(storage, worker, record["started"], answered)
    storage.write_json(key, record)
    return storage, 0, (-1, {})


def _open_claim(storage: Storage, worker: str, if_exists: IfExists) -> None:
    """An open writer of this process that writes ``worker`` in ``storage`` (a notebook cell run again, its first
    hook never closed): ``if_exists="error"`` raises :class:`TrialExistsError` saying so; ``"overwrite"`` turns it
    off first, with a warning (it would publish over the new run's shards, at the latest at exit)."""
    for other in list(_LIVE.open_writers):
        if other.worker != worker or other.root_url != storage.url or other.closed:
            continue
        started = time.strftime("%H:%M:%S", time.localtime(other._record["started"]))
        if if_exists == "error":
            raise TrialExistsError(
                f"{storage.url}: a capture that this process started at {started} still writes {worker} there (a "
                'cell run again?): close it first (hook.close()), or pass if_exists="overwrite" to replace it '
                'and its data, or if_exists="new_run"'
            )
        logger.warning(
            "tensortap: %s: the capture this process started at %s still wrote %s there: it is turned off (it "
            "saves nothing more) and its data replaced by this run's",
            storage.url,
            started,
            worker,
        )
        other.retire()


# ------------------------------------------------------------------ the writer thread
MAX_QUEUED_JOBS = 4  # jobs waiting for the writer thread; past it, training waits (backpressure)


class _Job:
    __slots__ = ("done", "fn")

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn
        self.done = Done()


class _WriterThread:
    """The process's single writer thread.

    Training threads hand it jobs with bare-lock and ``deque`` operations only
    (:mod:`tensortap.capture.handoff`): an interrupt there leaves nothing locked.
    """

    _lock = threading.Lock()

    def __init__(self) -> None:
        self.jobs: collections.deque[_Job] = collections.deque()
        self._wake = Wake()
        self.writers: weakref.WeakSet[TrialWriter] = weakref.WeakSet()
        self.thread = threading.Thread(target=self._run, name="tensortap-writer", daemon=True)
        self.thread.start()

    @classmethod
    def get(cls) -> _WriterThread:
        with cls._lock:
            live = _LIVE  # one thread per process, kept across a reload of this module
            if live.writer_thread is None or not live.writer_thread.thread.is_alive():
                live.writer_thread = _WriterThread()
            _install_exit_handlers()  # every writer: one in the main thread installs the signal handlers
            return live.writer_thread

    def submit(self, fn: Callable[[], None], timeout: float) -> _Job:
        """Queue ``fn``; TimeoutError if the queue stays full for ``timeout`` s (the storage hangs)."""
        job = _Job(fn)
        if threading.current_thread() is self.thread:
            self._execute(job)
            return job
        deadline = time.monotonic() + timeout
        while len(self.jobs) >= MAX_QUEUED_JOBS:  # backpressure on training: wait for the oldest job
            try:
                oldest = self.jobs[0]
            except IndexError:  # taken meanwhile
                continue
            if not oldest.done.wait(deadline - time.monotonic()):
                raise TimeoutError(f"publishing made no progress for {timeout:g} s (the storage does not answer)")
        self.jobs.append(job)
        self._wake.set()
        return job

    @staticmethod
    def _execute(job: _Job) -> None:
        try:
            job.fn()
        finally:
            job.done.set()

    def _run(self, poll: float = POLL_SECONDS) -> None:
        """The thread's loop; it never ends. A poll that finds nothing to do reads none of this module's names
        (``poll`` is bound at definition): IPython's ``%autoreload`` empties the module's namespace while it runs
        it again, and an error of a poll or a job there (a NameError) is let go, what waits being published at
        the next poll (before, it ended the thread, and every publish after it waited in vain)."""
        while True:
            try:
                self._wake.wait(poll)
                while self.jobs:
                    self._execute(self.jobs.popleft())
                self._publish_due()
            except NameError:  # this module is being run again (a reload): its names are back by the next poll
                continue
            except Exception as exc:  # jobs report their own errors: nothing else is expected here
                try:
                    logger.warning("tensortap: the writer thread met %s: %s; it goes on", type(exc).__name__, exc)
                except NameError:  # a reload, as above
                    pass

    def _publish_due(self) -> None:
        # a method of its own: no local of the thread's loop holds a writer (and its hook and model) once closed
        for w in list(self.writers):
            w.publish_if_due()


class TrialWriter:
    """Buffers one worker's saved steps into shards and publishes them.

    Parameters
    ----------
    storage
        Where the trial lives.
    worker
        ``worker_<rank>``.
    policy
        When to close a shard, and how long to wait for the storage.
    worker_info
        JSON-serialisable facts written to the worker record at start
        (framework, collections, configuration).
    on_error
        Called once, from the thread that met it, with the first error of publishing.
    if_exists
        What to do when ``worker`` is already recorded in ``storage`` (see :func:`claim_worker`).
    run_id
        Continue the run with this id (:attr:`run_id` of an earlier writer of the same
        training): its data is kept and shards are numbered on. Default: a new run.

    Attributes
    ----------
    storage
        Where this worker writes: ``storage``, or its run folder with ``if_exists="new_run"``.
    run_id
        Written into the worker record and every index record, so readers detect two
        processes writing one worker name.
    recorded
        Of a continued run (``run_id`` given): the last global step the run's index records list and the last
        step of each mode, over all its workers (:func:`recorded_steps`), for the steps to be numbered on; else
        -1 and none.

    Raises
    ------
    TrialExistsError
        With ``if_exists="error"``, when ``worker`` is already recorded.
    OSError, TimeoutError
        If the trial cannot be set up, or the storage does not answer within ``policy.timeout``.
    """

    def __init__(
        self,
        storage: Storage,
        worker: str,
        policy: ShardPolicy,
        worker_info: dict[str, Any],
        on_error: Callable[[BaseException], None],
        if_exists: IfExists = "error",
        run_id: str | None = None,
    ) -> None:
        if if_exists not in IF_EXISTS:
            raise ValueError(f"if_exists: {if_exists!r} is not valid; valid: {', '.join(map(repr, IF_EXISTS))}")
        self.worker = worker
        self.policy = policy
        self.on_error = on_error
        self.error: BaseException | None = None
        self.closed = False  # accepts no more data
        self._finished = False
        self.run_id = run_id or uuid.uuid4().hex
        self._lock = threading.RLock()
        # the shard being built is the last; before it, shards handed off to the writer thread (see _take_locked)
        self._buffers = [ShardBuffer(policy.max_steps, self.policy.shard_bytes)]
        self._since = 0.0
        self._publish_seconds = 0.0  # moving average of one publish: publishing starts this much earlier
        self._publish_cpu = 0.0  # moving average of one publish's CPU time on the writer thread
        self._publishes = 0
        self._seq = 0  # of the next shard the writer thread publishes
        self._publishing = False  # _publish_handed_off is running (see there)
        self._ahead: tuple[ShardBuffer, PreparedShard] | None = None  # the next shard, prepared (see _publish)
        self._last: tuple[int, int, int] | None = None  # the last committed (step, mode, mode_step)
        self._staging_step = -1
        self._hung = False  # the storage did not answer within policy.timeout: wait for it no more
        self._cause: str | None = None  # why capture turned itself off (see disable)
        # the end marker the storage refused when capture turned itself off: tried again once, at close()
        self._unwritten_end: dict[str, Any] | None = None
        self._pending: list[_Job] = []
        self._io_lock = threading.Lock()  # held by the writer thread while it publishes on its own
        record = {
            "worker": worker,
            "pid": os.getpid(),
            **({"process": proc} if (proc := process_record()) is not None else {}),
            "started": time.time(),
            "run_id": self.run_id,
            **worker_info,
        }
        self._record = record  # written again where a local trial's folder lost it (_keep_claim)
        self.root_url = storage.url  # the trial it claimed the worker in (its run folder is self.storage)
        if if_exists != "new_run" and run_id is None:
            _open_claim(storage, worker, if_exists)
        self.storage, self._seq, self.recorded = run_bounded(
            lambda answered: claim_worker(storage, worker, record, if_exists, run_id is not None, answered=answered),
            policy.timeout,
            f"setting up {storage.url}",
        )
        self._thread = _WriterThread.get()
        self._thread.writers.add(self)
        _LIVE.open_writers.add(self)

    def retire(self) -> None:
        """Take no more data, write nothing more (no end marker): another writer of this process claims the
        worker. Waits for the shards already handed off, so that none is published after the claim."""
        with self._lock:
            self.closed = True  # the shard being built is never handed off
        self._wait_for(list(self._pending))
        self._finished = True
        _LIVE.open_writers.discard(self)
        self._thread.writers.discard(self)

    def stage(self, step: int, entries: Sequence[Staged]) -> list[Any]:
        """Copy tensors of the step in progress into the shard buffer, in order; return each stored raw value.

        A tensor keeps one dtype within a shard: when its dtype changes, the committed steps are
        published first and the step in progress moves to a new shard. Values of an earlier step
        that was never committed (a step interrupted by a ``KeyboardInterrupt`` that the user
        caught) are dropped first.
        """
        job = None
        with self._lock:
            if self.closed or self.error is not None:
                return [raw for _, _, raw, _, _, _ in entries]
            buf = self._buffer
            stored: list[Any] = []
            try:
                if self._staging_step != step:
                    if buf.staging:
                        buf.rollback()
                    self._staging_step = step
                for name, collections, raw, reductions, orig_dtype, histogram in entries:
                    # once at most: the new buffer holds this step's values only, which a value replaces
                    if raw is not None and buf.conflicts(name, raw):
                        job = self._take_locked()
                        buf = self._buffer
                    if not buf.steps and not buf.staging:
                        self._since = time.monotonic()
                    stored.append(buf.stage(step, name, collections, raw, reductions, orig_dtype, histogram))
            except BaseException:  # an interrupt half-way: keep the buffer consistent
                self._buffer.rollback()
                raise
        if job is not None:
            self._hand_off(job)
        return stored

    def commit(self, step: int, mode: int, mode_step: int) -> None:
        """The step in progress is complete; publish the buffer when a limit is reached."""
        with self._lock:
            if self.closed or self.error is not None:
                return
            self._buffer.commit(step, mode, mode_step)
            self._last = (step, mode, mode_step)
            full = len(self._buffer) >= self.policy.max_steps or self._buffer.nbytes >= self.policy.shard_bytes
            job = self._take_locked() if full or self._due() else None
        if job is not None:
            self._hand_off(job)

    def rollback(self) -> None:
        """Drop the values of the step in progress (the process is exiting mid-step)."""
        with self._lock:
            self._buffer.rollback()

    def _due(self) -> bool:
        """Whether the buffer must be published now to reach readers within its :func:`publish_deadline`.

        Publishing starts early by the time a publish takes (twice its moving average) plus
        one poll of the writer thread, but never before half of the deadline.
        """
        if not self._buffer:
            return False
        deadline = publish_deadline(self.policy, self._publish_cpu)
        lead = min(POLL_SECONDS + 2 * self._publish_seconds, deadline / 2)
        return time.monotonic() - self._since >= deadline - lead

    def publish_if_due(self, wait: float = POLL_SECONDS) -> None:
        """Publish the buffer if :meth:`_due`, and every shard handed off (writer thread); ``wait``: how long
        to wait for the training thread's lock (bound at definition, see :meth:`_WriterThread._run`)."""
        with self._io_lock:
            if not self._lock.acquire(timeout=wait):
                return
            try:
                if not self.closed and self.error is None and self._due():
                    self._take_locked()
            finally:
                self._lock.release()
            self._publish_handed_off()  # also a shard whose job an interrupt kept from the queue

    @property
    def _buffer(self) -> ShardBuffer:
        """The shard being built."""
        return self._buffers[-1]

    def _take_locked(self) -> Callable[[], None] | None:
        """Hand the committed steps off to the writer thread; return the job that publishes them, if any.

        A ``KeyboardInterrupt`` may land between any two bytecodes here (Python's default
        SIGINT handler, as Jupyter installs it). The handoff is one ``list.append`` that makes
        a new buffer the open one: before it, the shard is still the open buffer; after it,
        the shard waits in ``_buffers`` until the writer thread publishes it, whether or not
        the returned job reaches the queue (the writer thread publishes what waits at every
        poll, and :meth:`close` does too). A step in progress moves on to the new buffer.
        """
        buffer = self._buffer
        if buffer:
            self._buffers.append(buffer.detach_staged() if buffer.staging else buffer.successor())
        return functools.partial(self._publish_handed_off, self._buffers[-2]) if len(self._buffers) > 1 else None

    def _publish_handed_off(self, last: ShardBuffer | None = None) -> None:
        """Publish the shards handed off, oldest first, up to ``last`` (writer thread); all of them
        without ``last``, nothing once ``last`` is published.

        A job stops at its own shard: one that went on to a shard handed off while it ran made the
        training thread, waiting for that job at its next hand-off, wait for the later shard's
        publish too, so every other hand-off waited for a whole publish (bench/profiles/keras.md,
        session 20).

        Not again while it runs: a publish that fails turns capture off, which hands off the open
        shard and submits this from the writer thread, where a job runs at once. Run inside the
        loop, it would take the loop's shards, and the loop would then delete the open one.
        """
        if self._publishing or (last is not None and not any(b is last for b in self._buffers[:-1])):
            return
        self._publishing = True
        try:
            while len(self._buffers) > 1:
                buffer = self._buffers[0]
                self._publish(buffer, self._seq)
                self._seq += 1
                del self._buffers[0]
                if buffer is last:
                    return
        finally:
            self._publishing = False

    def _hand_off(self, job: Callable[[], None]) -> None:
        """Submit the job that publishes a full shard, then wait, oldest first, for the shards before it
        until those left to publish are this one alone, or at most :data:`IN_FLIGHT` whose bytes leave
        room for a shard of ``policy.shard_bytes`` within ``policy.max_bytes``: the one built meanwhile
        (see :class:`ShardPolicy`).

        Counting shards alone let a step larger than a shard's quarter of ``max_bytes`` (a shard of its
        own) hold three such steps, whatever ``max_bytes`` said (session 46's scale hunt, F2). A shard
        larger than that room is still published whole, as the only one in flight: waiting for it too
        would make every step wait for its own write.

        Two in flight rather than one (with thirds): a publish that takes longer than building a
        shard (a spell of slow disk, a large layout) no longer stops the training at once, and
        a training saving every step faster than the writer waits at fewer hand-offs
        (bench/profiles/keras.md, session 21)."""
        self._submit(job)
        room = self.policy.max_bytes - self.policy.shard_bytes
        while not self._hung and len(self._pending) > 1:
            if len(self._pending) <= IN_FLIGHT and self.in_flight_bytes <= room:
                return
            self._wait_for(self._pending[:1])
            self._pending = [j for j in self._pending if not j.done.is_set()]

    @property
    def in_flight_bytes(self) -> int:
        """Bytes of tensor data (:attr:`ShardBuffer.nbytes`) of the shards handed off and not yet published."""
        return sum(b.nbytes for b in self._buffers[:-1])

    def _submit(self, fn: Callable[[], None]) -> None:
        if self._hung:
            return
        self._pending = [j for j in self._pending if not j.done.is_set()]
        try:
            self._pending.append(self._thread.submit(fn, self.policy.timeout))
        except TimeoutError as exc:
            self._hung = True
            self._report(exc)

    def _report(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
            self.on_error(exc)

    def _publish(self, buffer: ShardBuffer, seq: int) -> None:
        """Publish ``buffer`` as shard ``seq`` (writer thread); an error turns capture off.

        Two stages overlap when a shard handed off waits behind this one: while this shard's values
        are written (``os.pwrite`` on a thread of its own: no HDF5 call, the GIL released, little
        CPU), the writer thread prepares the next (its checksums and HDF5 objects: a quarter of a
        publish, bench/profiles/keras.md, session 21), which its own publish then finds ready.
        """
        ahead, self._ahead = self._ahead, None
        if ahead is not None and (ahead[0] is not buffer or self.error is not None):
            _discard(ahead[1])  # not this shard's (never expected): made again below
            ahead = None
        if self.error is not None:
            buffer.release()
            return
        start, start_cpu = time.monotonic(), time.thread_time()
        key = layout.shard_key(self.worker, seq)
        prepared = None if ahead is None else ahead[1]
        try:
            with bounded(self._bound()) as bound:
                try:
                    if prepared is None:
                        prepared = self._prepare(buffer, seq)
                    record = self._write_preparing_the_next(prepared, buffer, seq)
                    buffer.release()
                    self._keep_claim(seq)
                    bound.check(f"publishing {key}")  # on any backend, also those that retry nothing
                    self.storage.publish_file(prepared.path, key)
                finally:
                    if prepared is not None:
                        _discard(prepared)
                record["run_id"] = self.run_id
                bound.check(f"writing the index record of {key}")
                self.storage.write_json(layout.index_key(self.worker, seq), record)
        except BaseException as exc:  # reported to the hook, never raised into the writer thread
            buffer.release()
            self._report(exc)
            return
        first = self._publishes == 0  # the first publish sets the averages, later ones move them
        self._publishes += 1
        self._publish_seconds = _moving_average(self._publish_seconds, time.monotonic() - start, first)
        if not first:  # the first pays one-off costs (laid out here while the layout process starts, ...)
            cpu = time.thread_time() - start_cpu
            self._publish_cpu = _moving_average(self._publish_cpu, cpu, self._publishes == 2)

    def _bound(self, seconds: float | None = None) -> Bound:
        """The bound of one storage job of the writer thread: transient errors retried for :data:`RETRY_SHARE`
        of ``policy.timeout`` (or ``seconds``, if shorter); nothing started once the training thread stopped
        waiting for the storage (``_hung``: capture turned off, and another run may claim the worker)."""
        share = RETRY_SHARE * self.policy.timeout
        return Bound(share if seconds is None else min(share, seconds), lambda: self._hung)

    def _keep_claim(self, seq: int) -> None:
        """Before shard ``seq`` is published to a local folder: where the worker record is gone (the trial's
        folder removed or moved while the training writes it), write it again, with one warning. Writing
        made the folder anew without a word before: a trial without its worker record, which a later run
        did not see as taken and wrote over."""
        key = layout.worker_key(self.worker)
        if not self.storage.is_local or self.storage.exists(key):
            return
        logger.warning(
            "tensortap: %s lost the record of %s (its folder was removed or moved while the training wrote "
            "it?): the %d shard(s) published before are not there; the record is written again and capture "
            "goes on from shard %d",
            self.storage.url,
            self.worker,
            seq,
            seq,
        )
        self.storage.write_json(key, self._record)

    def _prepare(self, buffer: ShardBuffer, seq: int) -> PreparedShard:
        """Make shard ``seq``'s file of ``buffer`` under a temporary name in the staging folder, its
        values not yet written (:func:`~tensortap.backends.shard.prepare_shard`)."""
        staging = os.path.join(self.storage.staging_dir(), layout.SHARDS, self.worker)
        os.makedirs(staging, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{seq:010d}.", suffix=".h5.tmp", dir=staging)
        os.close(fd)
        try:
            key = layout.shard_key(self.worker, seq)
            policy = self.policy
            writeback = self.storage.publishes_in_place
            return prepare_shard(tmp, self.worker, seq, buffer, key, policy.compression, writeback, policy.pack_bytes)
        except BaseException:
            os.unlink(tmp)
            raise

    def _write_preparing_the_next(self, prepared: PreparedShard, buffer: ShardBuffer, seq: int) -> dict[str, Any]:
        """Write ``prepared``'s values and return its index record; meanwhile prepare the shard handed
        off after ``buffer``, if any.

        A failure to prepare the next shard is left to that shard's own publish, which prepares it
        again and reports what fails then (the same error, or none if it was passing).
        """
        handed_off = self._buffers[:-1]  # the open shard is last; only this thread removes shards
        at = next((i for i, b in enumerate(handed_off) if b is buffer), None)
        if at is None or at + 1 >= len(handed_off):
            return prepared.write()
        written = on_daemon_thread(prepared.write, "tensortap-shard-values")  # at shutdown: written here
        try:
            with contextlib.suppress(Exception):  # prepared again, and reported, by its own publish (see above)
                self._ahead = (handed_off[at + 1], self._prepare(handed_off[at + 1], seq + 1))
        finally:
            record = written(math.inf)
        return record

    def drain(self) -> None:
        """Wait until every shard handed off so far is published, ``policy.timeout`` at most for each,
        and the histograms taken so far are counted (:mod:`tensortap.capture.counting`).

        The shard being built stays open (:meth:`flush` publishes it too).

        A job stays in ``_pending`` until it is done: an exception raised while this waits (a
        ``KeyboardInterrupt``, another library's signal handler) leaves it there, and the next
        ``drain`` or :meth:`close` waits for it.
        """
        self._wait_for(list(self._pending))
        self._pending = [j for j in self._pending if not j.done.is_set()]
        if not counting.COUNTER.wait_idle(self.policy.timeout):
            logger.warning(
                "tensortap: histograms taken so far are not counted after %g s; each is counted at the "
                "latest when its shard is written",
                self.policy.timeout,
            )
        # a publish the writer thread started on its own: watched, not acquired (an interrupt between an
        # acquire and its release would leave the lock held, and the writer thread waiting on it for ever)
        deadline = time.monotonic() + self.policy.timeout
        while not self._hung and self._io_lock.locked() and time.monotonic() < deadline:
            time.sleep(0.001)

    def _wait_for(self, jobs: list[_Job]) -> None:
        """Wait until ``jobs`` are done, ``policy.timeout`` at most for each; past it, capture turns off."""
        for j in jobs:
            if self._hung:
                return
            if not j.done.wait(self.policy.timeout):
                self._hung = True
                timeout = self.policy.timeout
                self._report(TimeoutError(f"publishing to {self.storage.url}: no answer within {timeout:g} s"))
                return

    def flush(self) -> None:
        """Publish what is buffered and wait until every submitted shard is published."""
        with self._lock:
            job = None if self.closed else self._take_locked()
        if job is not None:
            self._submit(job)
        self.drain()

    def disable(self, last_step: int | None, mode_steps: dict[str, int], cause: str) -> None:
        """Capture turned itself off: publish the committed steps, then end this worker (reason ``error``).

        ``cause`` goes into the end marker. Returns at once; the storage work happens on the
        writer thread, and :meth:`close` waits for it.
        """
        self._cause = cause
        self._end("error", last_step, mode_steps)

    _ending = False  # _end closed this writer: its end marker is written (retire() closes without one)
    _end_queued = False  # the end marker's job is submitted

    def _end(
        self, reason: str, last_step: int | None, mode_steps: dict[str, int] | None, error: str | None = None
    ) -> None:
        """Take no more data, hand off the committed steps, then submit their publish and the end marker.

        Again after an interrupt (a ``KeyboardInterrupt`` in a first :meth:`close`): what the first
        call did not submit is submitted now, once.
        """
        with self._lock:
            if not self.closed:
                self._ending = True  # first: an interrupt between the two leaves the writer open
                self.closed = True
            elif not self._ending:
                return
            if self._end_queued:
                return
            self._buffer.rollback()
            self._take_locked()
        if len(self._buffers) > 1:  # every shard handed off, also one whose job an interrupt kept from the queue
            self._submit(self._publish_handed_off)
        if last_step is None and self._last is not None:
            last_step = self._last[0]
        if mode_steps is None:
            mode_steps = {} if self._last is None else {Mode(self._last[1]).name: self._last[2]}
        record: dict[str, Any] = {
            "worker": self.worker,
            "reason": reason,
            "last_step": last_step,
            "mode_steps": mode_steps,
            "time": time.time(),
            "run_id": self.run_id,
        }
        if error is None and reason == "exception" and _LIVE.uncaught:
            error = _LIVE.uncaught[-1]
        if error is not None:
            record["error"] = error
        self._submit(lambda: self._write_end(record))
        self._end_queued = True  # after: an interrupt before it submits the end marker again (written twice)

    def _write_end(self, record: dict[str, Any]) -> None:
        """Write the end marker ``record`` (writer thread): not once the training thread stopped waiting for the
        storage (a later run may own the worker by the time a storage that hung answers); retried for
        :data:`RETRY_AFTER_ERROR_SECONDS` at most after a storage error turned capture off."""
        if self._hung:
            return
        if self.error is not None:
            record["reason"] = "error"
            record["error"] = f"{type(self.error).__name__}: {self.error}"
        elif self._cause is not None:
            record["error"] = self._cause
        again, self._unwritten_end = self._unwritten_end is not None, None
        try:
            with bounded(self._bound(None if self.error is None else RETRY_AFTER_ERROR_SECONDS)):
                self.storage.write_json(layout.end_key(self.worker), record)
        except Exception as exc:  # the storage is gone: readers cannot be told
            if self.error is None:
                self._report(exc)
            else:
                self._unwritten_end = None if again else record  # tried again once, at close()
                logger.log(
                    logging.INFO if again else logging.WARNING,
                    "tensortap: cannot write the end marker of %s to %s%s: %s",
                    self.worker,
                    self.storage.url,
                    " (again, at close)" if again else "",
                    exc,
                )

    def close(
        self,
        reason: str = "closed",
        last_step: int | None = None,
        mode_steps: dict[str, int] | None = None,
        error: str | None = None,
    ) -> None:
        """Publish what is committed, then write the end-of-training marker, and wait for both. Idempotent.

        After an error the end marker says ``"reason": "error"`` (when the storage still takes it).

        Parameters
        ----------
        reason
            Why training ended: ``closed``, ``exit``, ``sigterm``, ``stop_request``.
        last_step, mode_steps
            The last global step the hook counted, and the last step of each mode (by name).
        error
            With ``exception``: the exception's ``"Type: message"`` (:func:`exception_text`), written as
            the end marker's ``error``; by default the uncaught exception that ends the program, if any.
        """
        if self._finished:
            return
        self._end(reason, last_step, mode_steps, error)
        self.drain()
        if (unwritten := self._unwritten_end) is not None:  # capture turned off, and the storage refused it then
            self._submit(lambda: self._write_end(unwritten))
            self.drain()
        self._finished = True
        _LIVE.open_writers.discard(self)
        self._thread.writers.discard(self)
        if not _LIVE.open_writers:
            POOL.clear()  # keep no memory once capture is over
            counting.COUNTER.clear_buffers()


class _Live:
    """What capture holds for the whole process, beyond any one writer: made once per process
    (:func:`~tensortap.backends.storage.kept`), so that a reload of this module (IPython's ``%autoreload``)
    keeps the writers opened before it, which the exit handler closes (it forgot them, and their last shard
    was lost), and installs no exit or signal handler twice. Made with the handler that forgets the
    parent's writers in a forked child (:func:`_forget_after_fork`)."""

    def __init__(self) -> None:
        self.open_writers: weakref.WeakSet[TrialWriter] = weakref.WeakSet()
        self.close_callbacks: weakref.WeakSet[Any] = weakref.WeakSet()  # hooks with a close_for_exit(reason)
        self.writer_thread: _WriterThread | None = None
        self.uncaught: list[str] = []  # the exception that ends the program, as "Type: message" (_note_uncaught)
        self.previous_excepthook = sys.excepthook
        self.handlers_installed = False  # the exit handlers (_install_exit_handlers)
        self.signals_installed = False  # the SIGTERM and SIGINT handlers (main thread only: _install_signal_handlers)
        self.warned_off_main = False
        self.previous_handlers: dict[int, Any] = {}  # signal -> the handler before tensortap's
        self.deferred: dict[int, float] = {}  # signal -> when it was first deferred
        self.pending_signals: collections.deque[int] = collections.deque()
        # the write end of a pipe that wakes the relay thread: os.write is async-signal-safe and takes no lock
        # (a threading.Event would: a signal landing inside the handler's own Event.set deadlocked the process)
        self.relay_fd: int | None = None
        if hasattr(os, "register_at_fork"):  # POSIX; there is no fork elsewhere
            os.register_at_fork(after_in_child=_forget_after_fork)


def register_for_exit(hook: Any) -> None:
    """Make ``hook.close_for_exit(reason)`` run at interpreter exit and on SIGTERM."""
    _LIVE.close_callbacks.add(hook)


def registered_for_exit() -> list[Any]:
    """The hooks :func:`register_for_exit` was given in this process, those closed since included until
    they are collected."""
    return list(_LIVE.close_callbacks)


def _forget_after_fork() -> None:
    """In a forked child (a DataLoader worker, ...): the parent's writers are not the child's.

    The child must neither publish the parent's buffered steps nor end its
    training, and cannot: the writer thread does not exist in the child.
    """
    live = _LIVE
    for w in list(live.open_writers):
        w.closed = w._finished = True
    live.open_writers.clear()
    live.close_callbacks.clear()
    live.writer_thread = None
    live.relay_fd = None
    live.deferred.clear()


_LIVE: _Live = kept(f"{__name__}.live", _Live)


def exception_text(exc: BaseException) -> str:
    """``"RuntimeError: the data loader broke"``: an exception as an end marker's ``error`` gives it (an
    exception whose ``str()`` raises gives its type alone)."""
    try:
        return f"{type(exc).__name__}: {exc}"
    except Exception:
        return type(exc).__name__


def _note_uncaught(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    """``sys.excepthook`` once capture runs: remember the exception that ends the program, then report it
    as the hook that was there before does. A Ctrl-C is not a failure: it keeps the reason ``exit``."""
    try:
        if not issubclass(kind, KeyboardInterrupt):
            _LIVE.uncaught.append(exception_text(value))
    finally:
        _LIVE.previous_excepthook(kind, value, tb)


def _exit_reason() -> str:
    """``exception`` when an uncaught exception ends the program (not in an interactive session, where
    the prompt goes on after one), else ``exit``."""
    return "exception" if _LIVE.uncaught and not hasattr(sys, "ps1") else "exit"


def close_all(reason: str) -> None:
    """Close every open hook and writer (at exit, on SIGTERM).

    At exit after an uncaught exception (``sys.excepthook``) the reason is ``exception``, and the end
    markers hold the exception's text under ``error``.

    An exception raised while one hook closes (a ``KeyboardInterrupt``, another library's signal handler
    such as torch's SIGCHLD one) does not stop the others: it is logged (a ``KeyboardInterrupt`` is kept),
    and a writer whose close it interrupted is closed again (its jobs stay pending,
    :meth:`TrialWriter.drain`). Then the ``KeyboardInterrupt`` is raised again, except at exit, where the
    program ends anyway and a raise would only print a traceback.
    """
    at_exit = reason == "exit"
    if at_exit and signal.SIGTERM in _LIVE.deferred:  # a SIGTERM deferred until the program ended: handled first
        _deliver_deferred_at_exit()
    if at_exit:
        reason = _exit_reason()
    interrupt: BaseException | None = None
    for hook in list(_LIVE.close_callbacks):
        try:
            hook.close_for_exit(reason)
        except Exception:  # report, never raise; its writer is closed below
            logger.exception("tensortap: closing a hook at %s failed", reason)
        except BaseException as exc:  # KeyboardInterrupt: the others are closed first
            interrupt = interrupt or exc
    for _ in range(2):  # a writer whose close an exception interrupted is closed once more
        for w in list(_LIVE.open_writers):
            try:
                w.close(reason)
            except Exception:
                logger.exception("tensortap: closing the writer of %s at %s failed", w.worker, reason)
            except BaseException as exc:
                interrupt = interrupt or exc
        if not _LIVE.open_writers:
            break
    if at_exit:
        _drop_deferred_sigint_at_exit()
    elif interrupt is not None:
        raise interrupt


def _close_at_threading_exit() -> None:
    main = threading.main_thread()
    if not any(t is not main and not t.daemon and t.is_alive() for t in threading.enumerate()):
        close_all("exit")


# ------------------------------------------------------------------ signals
# tensortap's own capture code: a signal landing while the main thread runs it is deferred.
# The read side (trial/, the CLI) is not: a program that reads a trial in a loop stays interruptible.
_PACKAGE = os.path.dirname(os.path.dirname(__file__)) + os.sep
_NOT_CAPTURE = (os.path.join(_PACKAGE, "trial") + os.sep, os.path.join(_PACKAGE, "cli"))
MAX_DEFER_SECONDS = 5.0  # a signal is deferred this long at most, then handled wherever the main thread is
_RELAY_PAUSE = 0.002


def _in_capture_code(frame: FrameType | None) -> bool:
    while frame is not None:
        path = frame.f_code.co_filename
        if path.startswith(_PACKAGE) and not path.startswith(_NOT_CAPTURE):
            return True
        frame = frame.f_back
    return False


def _relay_signals(wake_fd: int) -> None:
    """Send deferred signals again, until the handler finds the main thread outside capture code."""
    while True:
        os.read(wake_fd, 4096)  # blocks until the handler deferred a signal
        time.sleep(_RELAY_PAUSE)
        main = threading.main_thread().ident
        while _LIVE.pending_signals and main is not None:
            signum = _LIVE.pending_signals.popleft()
            if hasattr(signal, "pthread_kill"):
                signal.pthread_kill(main, signum)  # to the main thread: it interrupts a blocking read
            else:  # Windows
                _thread.interrupt_main(signal.Signals(signum))


def _on_signal(signum: int, frame: FrameType | None) -> None:
    now = time.monotonic()
    live = _LIVE
    relay_fd = live.relay_fd
    if (
        relay_fd is not None
        and _in_capture_code(frame)
        and now - live.deferred.setdefault(signum, now) < MAX_DEFER_SECONDS
    ):
        live.pending_signals.append(signum)  # lock-free; the relay thread sends it again shortly
        with contextlib.suppress(OSError):  # a full pipe: the relay thread is awake anyway
            os.write(relay_fd, b"\0")
        return
    live.deferred.pop(signum, None)
    if signum == signal.SIGTERM:
        # the process ends: a Ctrl-C deferred earlier (and sent again by the relay) must not interrupt the closing
        live.pending_signals.clear()
        live.deferred.clear()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        close_all("sigterm")
    previous = live.previous_handlers.get(signum)
    if callable(previous):
        previous(signum, frame)  # SIGINT: default_int_handler raises KeyboardInterrupt here, in the user's code
    elif previous != signal.SIG_IGN:
        if signum != signal.SIGTERM:
            close_all("exit")  # SIG_DFL ends the process without running exit handlers
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _deliver_deferred_at_exit() -> None:
    """A SIGTERM still deferred when the program ends (its last steps ran in capture code) is handled now:
    it closes every hook (reason ``sigterm``) and still ends the process with its status. A deferred SIGINT
    waits for :func:`_drop_deferred_sigint_at_exit`."""
    if signal.SIGTERM in _LIVE.deferred:
        _on_signal(signal.SIGTERM, None)


def _drop_deferred_sigint_at_exit() -> None:
    """A Ctrl-C still deferred once the exit handler closed everything is dropped: the program ends anyway,
    and Python's handler would raise a ``KeyboardInterrupt`` inside the exit handler (before this, it did
    so before anything was closed, which stopped the closing and printed tracebacks). The relay thread stops
    sending it. A program whose SIGINT handler was ``SIG_DFL`` still ends by SIGINT, as it would have."""
    live = _LIVE
    if live.deferred.pop(signal.SIGINT, None) is None:
        return
    with contextlib.suppress(ValueError):
        while True:
            live.pending_signals.remove(signal.SIGINT)
    if live.previous_handlers.get(signal.SIGINT) == signal.SIG_DFL:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)


def _install_exit_handlers() -> None:
    """The exit handlers, once (from any thread), then the signal handlers (:func:`_install_signal_handlers`).
    Called by every writer that starts: one started in the main thread installs the signal handlers that an
    earlier writer, started in another thread, could not."""
    live = _LIVE
    if not live.handlers_installed:
        live.handlers_installed = True
        atexit.register(close_all, "exit")
        live.previous_excepthook, sys.excepthook = sys.excepthook, _note_uncaught
        # Close earlier where possible: before threading shuts down thread pools, which asyncio
        # clients (s3fs/aiobotocore) need for DNS and new connections, and before weakref
        # finalizers close their sessions. Not while other non-daemon threads may still train.
        import concurrent.futures.thread  # noqa: F401  its exit hook stops the pools; registered first, it runs after ours

        register_threading_exit = getattr(threading, "_register_atexit", None)
        if register_threading_exit is not None:
            register_threading_exit(_close_at_threading_exit)
    _install_signal_handlers()


def _install_signal_handlers() -> None:
    """The SIGTERM and SIGINT handlers and their relay thread, once, from the main thread.

    Python sets signal handlers from the main thread only, and nothing else is safe: the main thread's
    signal mask cannot be changed from another thread (so ``sigwait`` on a thread of ours would race the
    default action, which ends the process), and a C-level handler cannot run Python code. So a writer
    started in another thread, before any in the main thread, warns once: until a writer starts in the
    main thread, a SIGTERM ends the process as a SIGKILL would (the steps not yet published are lost, no
    end marker); the exit handlers still publish everything at a normal exit.
    """
    live = _LIVE
    if live.signals_installed:
        return
    if threading.current_thread() is not threading.main_thread():
        if not live.warned_off_main:
            live.warned_off_main = True
            logger.warning(
                "tensortap: capture started in thread %r, not the main thread, and Python installs signal "
                "handlers from the main thread only: a SIGTERM now ends the process without publishing the "
                "steps not yet published (those of the last max_seconds) or writing the end marker, and a "
                "Ctrl-C may land inside capture code. A normal exit still publishes everything. Start a hook "
                "(or tensortap.capture.Writer) in the main thread to have them installed",
                threading.current_thread().name,
            )
        return
    live.signals_installed = True
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    threading.Thread(target=_relay_signals, args=(read_fd,), name="tensortap-signals", daemon=True).start()
    live.relay_fd = write_fd
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(signum)
        if previous == signal.SIG_IGN:
            continue  # the program ignores it: so does capture
        try:
            signal.signal(signum, _on_signal)
        except ValueError:  # not the main thread of the main interpreter
            return
        live.previous_handlers[signum] = previous

"""What ``tensortap check`` finds: every problem of a trial, never hanging on a hostile file.

Every JSON record is checked against its schema; every ``.h5`` file under the
trial is opened and read in full (whether or not an index record names it)
in a child process with a time limit, because a corrupt HDF5 structure can
make HDF5 loop forever; and every shard an index record names must exist,
hold the steps and tensors the record lists, and hold under each name the
values the record's ``raw_at`` locates (format 2.1). A worker whose end marker
says ``import failed`` (an ``import-smdebug`` that an older version left
half-way) is a problem too.
"""

from __future__ import annotations

import functools
import os
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor, wait
from typing import Any

import numpy as np

from ..backends import layout
from ..backends.isolated import ChildFailed, ShardChild
from ..backends.layout import UnsafeKey, check_key
from ..backends.shard import RawAtReader, ShardError, ShardReader
from ..backends.storage import STORAGE_FAILURES, LocalRanges, Storage
from .index import (
    IMPORT_FAILED,
    MAX_WORKERS_NAMED,
    READS_AT_ONCE,
    Claims,
    Listed,
    ParsedRecord,
    RecordError,
    check_end_marker,
    check_worker_record,
    disagreement,
    expected_workers,
    in_background,
    parse_index_record,
    read_records,
    world_size_disagreement,
    world_sizes,
)
from .progress import progress
from .trial import trial_problem, trial_storage

CHECK_SECONDS = 60.0
"""Time limit for reading one shard in full (a 256 MiB shard takes about a second)."""
DOWNLOAD_POLL_SECONDS = 0.1
"""How often a thread of ``check`` waiting for a remote shard's download looks whether the check has ended."""

Summary = tuple[str | None, list[list[int]], list[str]]  # (problem, [[step, mode, mode_step]], tensor names)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether the arrays ``a`` and ``b``, of one dtype and shape, hold the same bits (NaNs and signed
    zeros included), compared as unsigned integers of their item size: a fifth of the time of comparing
    their ``tobytes()``, or less."""
    size = a.dtype.itemsize
    bits = np.dtype(f"u{size}") if size in (1, 2, 4, 8) else np.dtype(np.uint8)
    return bool(np.array_equal(a.reshape(-1).view(bits), b.reshape(-1).view(bits)))


def _misplaced(reader: ShardReader, parsed: ParsedRecord) -> str | None:
    """Where the index record's ``raw_at`` of a tensor (format 2.1) does not give the values the shard's
    HDF5 structure holds, or None. Reads those values, verified, through HDF5 and where ``raw_at`` says."""
    open_file = functools.partial(LocalRanges.open, reader.path)
    for name, at in parsed.raw_at.items():
        steps = parsed.tensors[name][0]
        direct = RawAtReader(open_file, reader.path, parsed.record["bytes"], name, steps, at).stacked(name)
        stored = reader.stacked(name)
        if (
            stored is None
            or not np.array_equal(stored[0], direct[0])
            or stored[1].dtype != direct[1].dtype
            or stored[1].shape != direct[1].shape
            or not _same_bits(stored[1], direct[1])
        ):
            return f"{reader.path}: the index record's raw_at of {name!r} does not give the values the shard holds"
    return None


def _disagreement(reader: ShardReader, parsed: ParsedRecord) -> str | None:
    """Where the index record lists other raw steps of a tensor than the shard holds, or declares another
    dtype or shape of its last raw value, or another dtype where it says its values lie (readers refuse the
    shard), or None."""
    declared = parsed.declared
    for row, (name, (raw, _, _)) in enumerate(parsed.tensors.items()):
        if name not in reader.ids:
            continue  # reported as other tensors than the shard holds
        why = disagreement(reader, name, raw, declared.form(row, raw), declared.raw_at(row))
        if why is not None:
            return f"{reader.path}: its index record {why}"
    return None


def _other_reductions(reader: ShardReader, parsed: ParsedRecord) -> str | None:
    """Where the index record lists other reductions of a tensor than the shard holds (readers would say one
    it lists and the shard lacks was not saved), or None."""
    for name in parsed.tensors:
        if name not in reader.ids:
            continue  # reported as other tensors than the shard holds
        listed = sorted(set(parsed.record["tensors"][name].get("reductions", [])))
        held = sorted({key for _, key in reader.reductions(name)})
        if listed != held:
            return (
                f"{reader.path}: its index record lists the reductions {', '.join(listed) or 'none'} of {name!r}; "
                f"the shard holds {', '.join(held) or 'none'}"
            )
    return None


def inspect_shard(path: str, expected_bytes: int | None, record: dict[str, Any] | None = None) -> Summary:
    """Read the shard at ``path`` in full: ``(problem or None, its steps, its tensor names)``; with its
    index record ``record``, also what the record's ``raw_at`` locations give."""
    try:
        reader = ShardReader(path, expected_bytes)
    except ShardError as exc:
        return str(exc), [], []
    try:
        parsed = None if record is None else parse_index_record(record, record["worker"])
        reader.validate(read_apart=() if parsed is None else parsed.raw_at)  # the located values: read below
        problem = (
            None
            if parsed is None
            else _misplaced(reader, parsed) or _disagreement(reader, parsed) or _other_reductions(reader, parsed)
        )
        return problem, reader.steps_table().tolist(), list(reader.names)
    except ShardError as exc:
        return str(exc), [], []
    finally:
        reader.close()


def _second_writer(worker_record: Any, worker: str, record: dict[str, Any]) -> str | None:
    """Why the index record ``record`` of ``worker`` comes from another process than its worker record
    ``worker_record`` (as read: None, an error or anything else when it is not a valid one), or None."""
    if "run_id" not in record or not isinstance(worker_record, dict):
        return None
    claimed = worker_record.get("run_id")
    if claimed is None or claimed == record["run_id"]:
        return None
    return f"written by another process than the one the worker record names: two processes wrote the worker {worker}"


def _check_json(
    key: str,
    records: dict[str, Any],
    named: dict[str, tuple[str, dict[str, Any]]],
    claims: Claims,
    workers: dict[str, dict[str, Any]],
) -> str | None:
    """The problem of the JSON record ``key`` (``records[key]``: as read, or the error reading it), or
    None; index records go into ``named`` and ``claims`` by shard, unless they name a shard or list a step
    of their worker that an earlier one does (readers refuse them: :meth:`Claims.conflict`); valid worker
    records go into ``workers`` by worker."""
    try:
        record = records[key]
        if isinstance(record, (OSError, ValueError)):
            raise record
        folder, *rest = key.split("/")
        if folder == layout.INDEX:
            if len(rest) != 2:
                raise RecordError("an index record outside index/<worker>/")
            parsed = parse_index_record(record, rest[0])
            record, listed = parsed.record, Listed.of(key, rest[0], parsed)
            second = _second_writer(records.get(layout.worker_key(rest[0])), rest[0], record)
            if second is not None:  # its shard is compared with it all the same
                named[record["shard"]] = (key, record)
                return f"{key}: {second}"
            refused = claims.conflict(record["shard"], listed)
            if refused is not None:
                return f"{key}: refused by readers: it {refused}"
            claims.add(record["shard"], listed)
            named[record["shard"]] = (key, record)
            refusal = parsed.refusal()
            if refusal is not None:
                return f"{key}: {refusal}"
        elif folder == layout.WORKERS:
            valid = check_worker_record(record)
            if len(rest) == 1:
                workers[rest[0].removesuffix(".json")] = valid
        elif folder == layout.ENDS and check_end_marker(record).get("reason") == IMPORT_FAILED:
            return (
                f"{key}: tensortap import-smdebug failed midway ({IMPORT_FAILED!r}): the trial holds part of the "
                "smdebug trial; import it again into an empty folder"
            )
    except (OSError, ValueError) as exc:
        return f"{key}: unreadable record ({exc})"
    return None


def _world_size_problems(workers: dict[str, dict[str, Any]], records: dict[str, Any]) -> list[str]:
    """The valid worker records ``workers`` (by worker) that disagree on the world size, and the workers of the
    world size they name that have no worker record among ``records`` (by key): a rank that failed before it
    started capturing (or one still starting), which readers wait for."""
    sizes = world_sizes(workers)
    why = world_size_disagreement(sizes)
    problems = [f"{layout.WORKERS}: {why}"] if why is not None else []
    missing = [worker for worker in expected_workers(sizes) if layout.worker_key(worker) not in records]
    size = max(sizes.values(), default=0)
    problems += [
        f"{layout.worker_key(worker)}: missing: the worker records name a world size of {size}, and {worker} has "
        "written nothing (a rank that failed before it started capturing, or one still starting); readers wait for it"
        for worker in missing[:MAX_WORKERS_NAMED]
    ]
    if len(missing) > MAX_WORKERS_NAMED:
        problems.append(
            f"{layout.WORKERS}: {len(missing) - MAX_WORKERS_NAMED} more workers of the world size {size} have "
            "written nothing"
        )
    return problems


def _compare(key: str, record: dict[str, Any], steps: list[list[int]], names: list[str]) -> str | None:
    """Whether the shard holds what its index record ``key`` lists."""
    if steps != record["steps"]:
        return f"{key}: lists other steps than its shard {record['shard']} holds"
    if sorted(names) != sorted(record["tensors"]):
        return f"{key}: lists other tensors than its shard {record['shard']} holds"
    return None


def _inspect(
    storage: Storage,
    named: dict[str, tuple[str, dict[str, Any]]],
    child: ShardChild,
    key: str,
    downloaded: str | None = None,
) -> str | None:
    """The problem of the shard ``key``, read in full by ``child``, or None. ``downloaded``: its copy
    downloaded ahead; where the child could not read it and it is gone (evicted from the shard cache
    before the child opened it), the storage is asked for the shard again."""
    record_key, record = named.get(key, ("", {}))
    try:
        local = downloaded or storage.local_path(key)
    except STORAGE_FAILURES:
        raise  # the storage does not answer, or failed: nothing is known of the shard
    except OSError as exc:
        return f"{key}: unreadable shard ({exc})"
    try:
        problem, steps, names = child.ask(local, record.get("bytes"), record or None)
    except ChildFailed as exc:
        problem, steps, names = f"{local}: {exc}", [], []
    if problem is not None and downloaded and not os.path.exists(downloaded):
        return _inspect(storage, named, child, key)
    if problem is None and record:
        problem = _compare(record_key, record, steps, names)
    return None if problem is None else f"{key}: unreadable shard ({problem})"


def _folders_among_records(storage: Storage) -> list[str]:
    """A problem for each folder in a worker's index folder, where only index records belong (readers
    name it and read nothing in it); a name that is also listed as a file is checked as one."""
    problems = []
    for worker in storage.list_dirs(layout.INDEX):
        folder = f"{layout.INDEX}/{worker}"
        try:
            files, dirs = storage.entries(folder)
        except (OSError, ValueError):
            continue  # an unsafe name, or a folder that cannot be listed: reported among the walk's keys
        problems += [
            f"{folder}/{name}: a folder where index records belong; not read" for name in dirs if name not in files
        ]
    return problems


def _ahead(storage: Storage, named: dict[str, tuple[str, dict[str, Any]]], shards: list[str]) -> int:
    """How many remote shards to download ahead of the one read: :data:`READS_AT_ONCE`, fewer where the
    storage keeps fewer downloads than that beside the one read (each would evict the one before it)."""
    if storage.is_local or len(shards) < 2:
        return 0
    largest = max((int(named[s][1].get("bytes") or 0) for s in shards if s in named), default=0)
    if storage.kept_bytes is None or largest <= 0:
        return READS_AT_ONCE
    return max(0, min(READS_AT_ONCE, storage.kept_bytes // largest - 1))


def _inspect_shards(
    storage: Storage, named: dict[str, tuple[str, dict[str, Any]]], shards: list[str], timeout: float, count: int
) -> Iterator[str | None]:
    """The problem of each shard of ``shards`` (or None), in order, read by ``count`` children at once.

    Each child serves one thread at a time. Remote shards are downloaded :func:`_ahead` of the one read,
    :data:`READS_AT_ONCE` at once (a copy evicted before its child read it is downloaded again). On the
    way out (an interrupt included) the children are ended at once (:meth:`ShardChild.end`), which ends
    what they read, and no thread waits for a download (they run on daemon threads) or starts another.
    """
    free: queue.SimpleQueue[ShardChild] = queue.SimpleQueue()
    children = [ShardChild("tensortap.trial.check:inspect_shard", timeout) for _ in range(count)]
    for child in children:
        free.put(child)
    ahead = _ahead(storage, named, shards)

    def download(key: str) -> Future[str]:
        """``storage.local_path(key)`` on a daemon thread: an interrupted check does not wait for it."""
        return in_background(functools.partial(storage.local_path, key), "fetch")

    fetched = [download(key) for key in shards[:ahead]]
    ending = threading.Event()

    def downloaded(i: int, key: str) -> str | None:
        """The copy of remote shard ``key`` (the ``i``-th) downloaded ahead, or now; None where the download
        failed (the error is met again by :func:`_inspect`); raised where the storage does not answer or failed
        (:data:`~tensortap.backends.storage.STORAGE_FAILURES`)."""
        got = fetched[i] if i < len(fetched) else download(key)
        while not wait([got], DOWNLOAD_POLL_SECONDS).done:
            if ending.is_set():
                raise CancelledError  # the check is over: its result is read by nobody
        error = got.exception()
        if isinstance(error, STORAGE_FAILURES):
            raise error
        return None if error is not None else got.result()

    def inspect(i: int, key: str) -> str | None:
        if ahead and i + ahead < len(shards):
            fetched.append(download(shards[i + ahead]))
        local = None if storage.is_local else downloaded(i, key)
        child = free.get()
        try:
            return _inspect(storage, named, child, key, local)
        finally:
            free.put(child)

    pool = ThreadPoolExecutor(count, thread_name_prefix="tensortap-check")
    try:
        for future in [pool.submit(inspect, i, key) for i, key in enumerate(shards)]:
            yield future.result()
    finally:
        ending.set()
        pool.shutdown(wait=False, cancel_futures=True)
        for child in children:
            child.end()


def find_problems(
    path: str,
    options: dict[str, Any] | None = None,
    timeout: float = CHECK_SECONDS,
    show_progress: bool | None = None,
    processes: int | None = None,
) -> list[str]:
    """Every problem in the trial at ``path``, one line each, naming the file.

    Parameters
    ----------
    path
        Trial directory or URL.
    options
        Storage options (fsspec) for URLs.
    timeout, show_progress, processes
        As :func:`storage_problems` takes them.

    Raises
    ------
    TrialNotFound
        If no trial is at ``path`` (see :func:`tensortap.trial.trial.trial_problem`).
    """
    storage = trial_storage(path, **(options or {}))
    not_a_trial = trial_problem(storage)
    if not_a_trial is not None:
        raise not_a_trial
    return storage_problems(storage, timeout, show_progress, processes)


def storage_problems(
    storage: Storage,
    timeout: float = CHECK_SECONDS,
    show_progress: bool | None = None,
    processes: int | None = None,
) -> list[str]:
    """Every problem in the trial that ``storage`` holds, one line each, naming the file: ``check`` passes the
    storage of the trial it opened (``trial.storage``), so that the trial is opened once.

    Parameters
    ----------
    storage
        The trial's storage.
    timeout
        Seconds allowed to read one shard in full, in a child process.
    show_progress
        A progress bar over the shards (default: when standard error is a terminal).
    processes
        Child processes reading local shards at once (default: one per core).
    """
    problems: list[str] = []
    named: dict[str, tuple[str, dict[str, Any]]] = {}  # shard -> (index record key, record)
    claims = Claims()
    shards = []
    keys = []
    for key in storage.walk():
        try:
            keys.append(check_key(key))
        except UnsafeKey as exc:
            problems.append(f"{key}: {exc}")
    problems += _folders_among_records(storage)
    records = dict(read_records(storage, [key for key in keys if key.endswith(".json")]))
    workers: dict[str, dict[str, Any]] = {}
    for key in keys:
        if key.endswith(".json"):
            problem = _check_json(key, records, named, claims, workers)
            if problem:
                problems.append(problem)
        elif key.endswith(".h5"):
            shards.append(key)
        elif storage.is_local:
            try:
                storage.local_path(key)  # refuses links out of the trial, FIFOs and devices
            except OSError as exc:
                problems.append(f"{key}: {exc}")
    problems += _world_size_problems(workers, records)
    indexed = {key.split("/")[1] for key in keys if key.startswith(f"{layout.INDEX}/") and key.count("/") == 2}
    problems += [  # a folder removed while a training wrote it, made anew by the writer before session 45
        f"{layout.INDEX}/{worker}: index records of a worker that has no worker record ({layout.worker_key(worker)})"
        for worker in sorted(indexed)
        if layout.worker_key(worker) not in records
    ]
    present = set(shards)
    for shard, (key, _) in sorted(named.items()):
        if shard not in present:
            problems.append(f"{key}: names shard {shard!r}, which does not exist")
    # local shards are read by several children at once; remote ones one at a time (downloaded ahead),
    # since a download into the shared cache may evict another shard between its download and its open
    count = min(processes or os.cpu_count() or 1, len(shards)) if storage.is_local else 1
    found = _inspect_shards(storage, named, shards, timeout, max(count, 1))
    problems.extend(p for p in progress(found, total=len(shards), desc="shards", enable=show_progress) if p)
    return problems

"""What ``tensortap check`` finds: every problem of a trial, never hanging on a hostile file.

Every JSON record is checked against its schema; every ``.h5`` file under the
trial is opened and read in full (whether or not an index record names it)
in a child process with a time limit, because a corrupt HDF5 structure can
make HDF5 loop forever; and every shard an index record names must exist and
hold the steps and tensors the record lists.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
from typing import Any

from ..backends import layout
from ..backends.layout import UnsafeKey, check_key
from ..backends.registry import get_storage
from ..backends.shard import ShardError, ShardReader
from ..backends.storage import Storage
from .index import RecordError, check_end_marker, check_index_record, check_worker_record
from .trial import trial_problem

CHECK_SECONDS = 60.0
"""Time limit for reading one shard in full (a 256 MiB shard takes about a second)."""

Summary = tuple[str | None, list[list[int]], list[str]]  # (problem, [[step, mode, mode_step]], tensor names)


def inspect_shard(path: str, expected_bytes: int | None) -> Summary:
    """Read the shard at ``path`` in full: ``(problem or None, its steps, its tensor names)``."""
    try:
        reader = ShardReader(path, expected_bytes)
    except ShardError as exc:
        return str(exc), [], []
    try:
        reader.validate()
        return None, reader.steps_table().tolist(), list(reader.names)
    except ShardError as exc:
        return str(exc), [], []
    finally:
        reader.close()


def _serve() -> None:
    """The child process: for each JSON line ``[path, expected_bytes]`` on stdin, one JSON summary line."""
    for line in sys.stdin:
        sys.stdout.write(json.dumps(inspect_shard(*json.loads(line))) + "\n")
        sys.stdout.flush()


class _Inspector:
    """A child process that inspects shards one at a time, replaced when one takes too long.

    A plain subprocess (not :mod:`multiprocessing`), so that a user's script
    calling :func:`find_problems` is never imported again in the child.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._proc: subprocess.Popen[str] | None = None
        self._answers: queue.Queue[str] = queue.Queue()

    def _start(self) -> subprocess.Popen[str]:
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([package_root, *sys.path])}
        proc = subprocess.Popen(
            [sys.executable, "-c", "from tensortap.trial.check import _serve; _serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        answers: queue.Queue[str] = queue.Queue()
        threading.Thread(target=_pump, args=(proc, answers), daemon=True).start()
        self._proc, self._answers = proc, answers
        return proc

    def inspect(self, path: str, expected_bytes: int | None) -> Summary:
        proc = self._proc or self._start()
        assert proc.stdin is not None
        try:
            proc.stdin.write(json.dumps([path, expected_bytes]) + "\n")
            proc.stdin.flush()
            answer = self._answers.get(timeout=self.timeout)
        except queue.Empty:
            self.close()
            return f"{path}: reading it did not finish within {self.timeout:g} s (corrupt HDF5 structure)", [], []
        except OSError:
            answer = ""
        if not answer:  # the child died (HDF5 aborted, out of memory)
            self.close()
            return f"{path}: reading it killed the process that read it", [], []
        problem, steps, names = json.loads(answer)
        return problem, steps, names

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            for stream in (self._proc.stdin, self._proc.stdout):
                if stream is not None:
                    stream.close()
            self._proc = None


def _pump(proc: subprocess.Popen[str], answers: queue.Queue[str]) -> None:
    """Move the child's answer lines into ``answers``; an empty string once it has ended."""
    assert proc.stdout is not None
    with contextlib.suppress(ValueError, OSError):  # closed by close()
        for line in proc.stdout:
            answers.put(line)
    answers.put("")


def _second_writer(storage: Storage, worker: str, record: dict[str, Any]) -> str | None:
    """Why the index record ``record`` of ``worker`` comes from another process than its worker record, or None."""
    if "run_id" not in record:
        return None
    try:
        claimed = storage.read_json(layout.worker_key(worker)).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
    if claimed is None or claimed == record["run_id"]:
        return None
    return f"written by another process than the one the worker record names: two processes wrote the worker {worker}"


def _check_json(storage: Storage, key: str, named: dict[str, tuple[str, dict[str, Any]]]) -> str | None:
    """The problem of the JSON record ``key``, or None; index records go into ``named`` by shard."""
    try:
        record = storage.read_json(key)
        folder, *rest = key.split("/")
        if folder == layout.INDEX:
            if len(rest) != 2:
                raise RecordError("an index record outside index/<worker>/")
            record = check_index_record(record, rest[0])
            named[record["shard"]] = (key, record)
            second = _second_writer(storage, rest[0], record)
            if second is not None:
                return f"{key}: {second}"
        elif folder == layout.WORKERS:
            check_worker_record(record)
        elif folder == layout.ENDS:
            check_end_marker(record)
    except (OSError, ValueError) as exc:
        return f"{key}: unreadable record ({exc})"
    return None


def _compare(key: str, record: dict[str, Any], steps: list[list[int]], names: list[str]) -> str | None:
    """Whether the shard holds what its index record ``key`` lists."""
    if steps != record["steps"]:
        return f"{key}: lists other steps than its shard {record['shard']} holds"
    if sorted(names) != sorted(record["tensors"]):
        return f"{key}: lists other tensors than its shard {record['shard']} holds"
    return None


def find_problems(path: str, options: dict[str, Any] | None = None, timeout: float = CHECK_SECONDS) -> list[str]:
    """Every problem in the trial at ``path``, one line each, naming the file.

    Parameters
    ----------
    path
        Trial directory or URL.
    options
        Storage options (fsspec) for URLs.
    timeout
        Seconds allowed to read one shard in full, in a child process.

    Raises
    ------
    TrialNotFound
        If no trial is at ``path`` (see :func:`tensortap.trial.trial.trial_problem`).
    """
    storage = get_storage(path, **(options or {}))
    not_a_trial = trial_problem(storage)
    if not_a_trial is not None:
        raise not_a_trial
    problems: list[str] = []
    named: dict[str, tuple[str, dict[str, Any]]] = {}  # shard -> (index record key, record)
    shards = []
    for key in storage.walk():
        try:
            check_key(key)
        except UnsafeKey as exc:
            problems.append(f"{key}: {exc}")
            continue
        if key.endswith(".json"):
            problem = _check_json(storage, key, named)
            if problem:
                problems.append(problem)
        elif key.endswith(".h5"):
            shards.append(key)
        elif storage.is_local:
            try:
                storage.local_path(key)  # refuses links out of the trial, FIFOs and devices
            except OSError as exc:
                problems.append(f"{key}: {exc}")
    present = set(shards)
    for shard, (key, _) in sorted(named.items()):
        if shard not in present:
            problems.append(f"{key}: names shard {shard!r}, which does not exist")
    inspector = _Inspector(timeout)
    try:
        for key in shards:
            record_key, record = named.get(key, ("", {}))
            try:
                local = storage.local_path(key)
            except OSError as exc:
                problems.append(f"{key}: unreadable shard ({exc})")
                continue
            problem, steps, names = inspector.inspect(local, record.get("bytes"))
            if problem is None and record:
                problem = _compare(record_key, record, steps, names)
            if problem is not None:
                problems.append(f"{key}: unreadable shard ({problem})")
    finally:
        inspector.close()
    return problems

"""The read side's view of a trial's files: index records, workers, end markers, shards.

:class:`TrialIndex` lists what is new since the last refresh (cheap: one
listing per worker folder, parsing only records not seen before) and keeps
where every (tensor, worker, step) lives. Shards are opened lazily and kept
open in a small LRU cache.

A trial may come from a stranger: every name listed is checked with
:func:`~tensortap.backends.layout.check_name`, every record is checked
against its schema (:func:`check_index_record`, ``docs/format.md``), and a
file that fails is skipped with one warning naming it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..backends import layout
from ..backends.layout import UnsafeKey, check_name
from ..backends.shard import ALL_STEPS, INDEX_MAGIC, ShardError, ShardReader
from ..backends.storage import Storage
from ..modes import Mode

logger = logging.getLogger("tensortap")
_T = TypeVar("_T")


class RecordError(ValueError):
    """A JSON record of a trial that does not follow its schema."""


def _is_int(value: object, minimum: int | None = None) -> bool:
    return type(value) is int and (minimum is None or value >= minimum)


def _is_names(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _step_spec(value: object, steps: set[int]) -> bool:
    """``"*"`` or a list of steps of the shard."""
    return value == ALL_STEPS or (isinstance(value, list) and all(_is_int(v) and v in steps for v in value))


def check_index_record(record: object, worker: str) -> dict[str, Any]:
    """Return ``record`` if it is a valid index record of ``worker``'s folder, else raise :class:`RecordError`.

    The schema is the one ``docs/format.md`` describes; keys it does not name are ignored.
    """

    def bad(why: str) -> RecordError:
        return RecordError(f"not a valid index record: {why}")

    if not isinstance(record, dict) or record.get("format") != INDEX_MAGIC:
        raise bad(f"no 'format': {INDEX_MAGIC!r}")
    version = record.get("format_version")
    if not _is_int(version, 1):
        raise bad("'format_version' is not a positive integer")
    if version > layout.FORMAT_VERSION:  # type: ignore[operator]
        raise bad(f"format version {version} is newer than this tensortap reads ({layout.FORMAT_VERSION})")
    if record.get("worker") != worker:
        raise bad(f"'worker' is {record.get('worker')!r}, but the record is in the folder of {worker!r}")
    if not _is_int(record.get("seq"), 0) or not _is_int(record.get("bytes"), 0):
        raise bad("'seq' or 'bytes' is not a non-negative integer")
    if not layout.is_shard_key_of(record.get("shard"), worker):
        raise bad(f"'shard' {record.get('shard')!r} is not a shard of {worker} inside the trial")
    steps = record.get("steps")
    modes = {int(m) for m in Mode}
    if not isinstance(steps, list) or not all(
        isinstance(s, list) and len(s) == 3 and all(_is_int(v) for v in s) and s[1] in modes for s in steps
    ):
        raise bad("'steps' is not a list of [step, mode, mode_step]")
    step_set = {s[0] for s in steps}
    if len(step_set) != len(steps):
        raise bad("'steps' repeats a step")
    times = record.get("wall_times", [])
    if (
        not isinstance(times, list)
        or (times and len(times) != len(steps))
        or not all(type(t) in (int, float) for t in times)
    ):
        raise bad("'wall_times' is not a list of numbers, one per step")
    tensors = record.get("tensors")
    if not isinstance(tensors, dict):
        raise bad("'tensors' is not an object")
    for name, entry in tensors.items():
        if not isinstance(entry, dict):
            raise bad(f"tensor {name!r} is not an object")
        checks = {
            "id": _is_int(entry.get("id"), 0),
            "collections": _is_names(entry.get("collections", [])),
            "reductions": _is_names(entry.get("reductions", [])),
            "dtype": isinstance(entry.get("dtype", ""), str),
            "orig_dtype": isinstance(entry.get("orig_dtype", ""), str),
            "shape": isinstance(entry.get("shape", []), list) and all(_is_int(d, 0) for d in entry.get("shape", [])),
            "raw_steps": _step_spec(entry.get("raw_steps", []), step_set),
            "reduction_steps": _step_spec(entry.get("reduction_steps", []), step_set),
            "histogram_steps": _step_spec(entry.get("histogram_steps", []), step_set),
        }
        wrong = [key for key, ok in checks.items() if not ok]
        if wrong or ("dtype" in entry) != ("shape" in entry):
            raise bad(f"tensor {name!r}: {', '.join(wrong) or 'dtype and shape'} not as the format says")
    return record


def check_end_marker(end: object) -> dict[str, Any]:
    """Return ``end`` if it is a valid end marker, else raise :class:`RecordError`."""
    if not isinstance(end, dict):
        raise RecordError("not a valid end marker: not an object")
    last = end.get("last_step")
    mode_steps = end.get("mode_steps") or {}
    if (last is not None and not _is_int(last)) or not (
        isinstance(mode_steps, dict) and all(k in Mode.__members__ and _is_int(v) for k, v in mode_steps.items())
    ):
        raise RecordError("not a valid end marker: 'last_step' or 'mode_steps' not as the format says")
    return end


def check_worker_record(info: object) -> dict[str, Any]:
    """Return ``info`` if it is a valid worker record (an object), else raise :class:`RecordError`."""
    if not isinstance(info, dict):
        raise RecordError("not a valid worker record: not an object")
    return info


MAX_OPEN_SHARDS = 64


@dataclass
class Location:
    """Where one tensor of one worker at one step is stored."""

    shard: str
    raw: bool
    reductions: tuple[str, ...]
    histogram: bool = False


@dataclass
class TensorInfo:
    """What the index knows of one tensor name."""

    name: str
    collections: set[str] = field(default_factory=set)
    locations: dict[int, dict[str, Location]] = field(default_factory=dict)  # step -> worker -> where
    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    orig_dtype: str | None = None


@dataclass
class WorkerState:
    """Progress of one worker."""

    info: dict[str, Any] = field(default_factory=dict)
    last_step: int = -1
    last_mode_step: dict[Mode, int] = field(default_factory=dict)
    end: dict[str, Any] | None = None
    seen: set[str] = field(default_factory=set)


class TrialIndex:
    """Everything the trial knows, rebuilt incrementally from the storage."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.workers: dict[str, WorkerState] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self.steps: dict[int, tuple[Mode, int]] = {}  # saved step -> (mode, mode_step)
        self.mode_steps: dict[Mode, dict[int, int]] = {}  # mode -> mode_step -> step
        self.step_workers: dict[int, set[str]] = {}
        self.shard_steps: dict[str, list[int]] = {}
        self.wall_times: dict[int, float] = {}  # saved step -> latest commit time of any worker (format 2)
        self.shard_bytes: dict[str, int] = {}
        self.bad_files: dict[str, str] = {}
        self._readers: OrderedDict[str, ShardReader] = OrderedDict()

    def _worker(self, name: str) -> WorkerState:
        if name not in self.workers:
            self.workers[name] = WorkerState()
        return self.workers[name]

    def _warn_bad(self, key: str, why: str) -> None:
        if key not in self.bad_files:
            self.bad_files[key] = why
            logger.warning("tensortap: skipping %s: %s", key, why)

    def refresh(self) -> None:
        """Read index records, worker records and end markers that are new."""
        for worker, key in self._records(layout.WORKERS):
            w = self._worker(worker)
            if not w.info:
                w.info = self._load(key, check_worker_record) or {}
        # End markers before index records: a worker writes its end marker after its last
        # index record, so every record of an ended worker is read in this same refresh.
        for worker, key in self._records(layout.ENDS):
            w = self._worker(worker)
            if w.end is None:
                w.end = self._load(key, check_end_marker)
        for worker in self._index_folders():
            w = self._worker(worker)
            for name in self.storage.list(f"{layout.INDEX}/{worker}"):
                if name in w.seen or not name.endswith(".json"):
                    continue
                w.seen.add(name)
                key = f"{layout.INDEX}/{worker}/{name}"
                record = self._load(key, lambda r, worker=worker: check_index_record(r, worker))  # type: ignore[misc]
                if record is None:
                    continue
                run, claimed = record.get("run_id"), w.info.get("run_id")
                if run is not None and claimed is not None and run != claimed:
                    self._warn_bad(
                        key,
                        f"written by another process than the one {layout.worker_key(worker)} names "
                        f"(run {run}, not {claimed}): two processes wrote the worker {worker}",
                    )
                    continue
                self._add_record(worker, w, record)

    def _records(self, folder: str) -> list[tuple[str, str]]:
        """``(worker, key)`` of the ``<worker>.json`` files in ``folder`` whose names are valid."""
        out = []
        for name in self.storage.list(folder):
            if name.endswith(".json"):
                try:
                    out.append((check_name(name[: -len(".json")]), f"{folder}/{name}"))
                except UnsafeKey as exc:
                    self._warn_bad(f"{folder}/{name}", str(exc))
        return out

    def _load(self, key: str, check: Callable[[Any], _T]) -> _T | None:
        """The record at ``key`` once ``check`` accepted it; None (with a warning naming it) otherwise."""
        try:
            return check(self.storage.read_json(key))
        except (OSError, ValueError) as exc:  # RecordError, UnsafeKey and JSON errors are ValueErrors
            self._warn_bad(key, f"unreadable record ({exc})")
            return None

    def _index_folders(self) -> list[str]:
        folders = set(self.workers)
        for name in self.storage.list_dirs(layout.INDEX):
            try:
                folders.add(check_name(name))
            except UnsafeKey as exc:
                self._warn_bad(f"{layout.INDEX}/{name}", str(exc))
        return sorted(folders)

    def _add_record(self, worker: str, w: WorkerState, record: dict[str, Any]) -> None:
        shard = record["shard"]
        steps = [int(s[0]) for s in record["steps"]]
        self.shard_steps[shard] = steps
        times = record.get("wall_times")
        if isinstance(times, list) and len(times) == len(steps):
            for step, t in zip(steps, times, strict=True):
                if isinstance(t, (int, float)):
                    self.wall_times[step] = max(float(t), self.wall_times.get(step, float("-inf")))
        self.shard_bytes[shard] = record["bytes"]
        for step, mode_value, mode_step in record["steps"]:
            mode = Mode(mode_value)
            self.steps[step] = (mode, mode_step)
            self.mode_steps.setdefault(mode, {})[mode_step] = step
            self.step_workers.setdefault(step, set()).add(worker)
            w.last_step = max(w.last_step, step)
            w.last_mode_step[mode] = max(w.last_mode_step.get(mode, -1), mode_step)
        for name, entry in record["tensors"].items():
            info = self.tensors.get(name)
            if info is None:
                info = self.tensors[name] = TensorInfo(name)
            info.collections.update(entry.get("collections", ()))
            if "dtype" in entry:
                info.dtype, info.shape = entry["dtype"], tuple(entry["shape"])
            info.orig_dtype = entry.get("orig_dtype", info.orig_dtype)
            raw_steps = _expand(entry.get("raw_steps"), steps)
            red_steps = _expand(entry.get("reduction_steps"), steps)
            hist_steps = _expand(entry.get("histogram_steps"), steps)
            reds = tuple(entry.get("reductions", ()))
            for step in sorted(raw_steps | red_steps | hist_steps):
                info.locations.setdefault(step, {})[worker] = Location(
                    shard, step in raw_steps, reds if step in red_steps else (), step in hist_steps
                )

    def drop_shard(self, shard: str, why: str) -> None:
        """Forget everything stored in ``shard`` (it cannot be read)."""
        self._warn_bad(shard, why)
        for info in self.tensors.values():
            for step in self.shard_steps.get(shard, ()):
                workers = info.locations.get(step)
                if workers:
                    for wk in [wk for wk, loc in workers.items() if loc.shard == shard]:
                        del workers[wk]
                    if not workers:
                        del info.locations[step]
        worker = shard.split("/")[1]  # shards/<worker>/<seq>.h5
        for step in self.shard_steps.pop(shard, ()):
            holders = self.step_workers.get(step, set())
            holders.discard(worker)
            if not holders:  # no readable copy of this step is left: it was not saved, as far as readers go
                self.step_workers.pop(step, None)
                if step in self.steps:  # two records of a stranger may list one step
                    mode, mode_step = self.steps.pop(step)
                    self.mode_steps[mode].pop(mode_step, None)
                self.wall_times.pop(step, None)

    def reader(self, shard: str) -> ShardReader | None:
        """Return the open reader of ``shard``, or None (with a warning) if it cannot be read."""
        r = self._readers.get(shard)
        if r is not None:
            self._readers.move_to_end(shard)
            return r
        try:
            r = ShardReader(self.storage.local_path(shard), self.shard_bytes.get(shard))
        except (ShardError, OSError, ValueError) as exc:
            self.drop_shard(shard, str(exc))
            return None
        self._readers[shard] = r
        if len(self._readers) > MAX_OPEN_SHARDS:
            _, old = self._readers.popitem(last=False)
            old.close()
        return r

    def read(self, shard: str, what: Callable[[ShardReader], _T]) -> _T | None:
        """``what(reader)`` on ``shard``; None, with the shard dropped and one warning, if it cannot be read."""
        reader = self.reader(shard)
        if reader is None:
            return None
        try:
            return what(reader)
        except ShardError as exc:
            self._readers.pop(shard, None)
            reader.close()
            self.drop_shard(shard, str(exc))
            return None

    def close(self) -> None:
        """Close every open shard."""
        for r in self._readers.values():
            r.close()
        self._readers.clear()


def _expand(spec: Any, steps: list[int]) -> set[int]:
    if spec is None:
        return set()
    if spec == ALL_STEPS:
        return set(steps)
    return set(spec)

"""The read side's view of a trial's files: index records, workers, end markers, shards.

:class:`TrialIndex` lists what is new since the last refresh (cheap: one
listing per worker folder, parsing only records not seen before) and keeps
where every (tensor, worker, step) lives. Shards are opened lazily and kept
open in a small LRU cache.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ..backends import layout
from ..backends.shard import ALL_STEPS, INDEX_MAGIC, ShardError, ShardReader
from ..backends.storage import Storage
from ..modes import Mode

logger = logging.getLogger("tensortap")

MAX_OPEN_SHARDS = 64


@dataclass
class Location:
    """Where one tensor of one worker at one step is stored."""

    shard: str
    raw: bool
    reductions: tuple[str, ...]


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
        for name in self.storage.list(layout.WORKERS):
            if name.endswith(".json"):
                w = self._worker(name[: -len(".json")])
                if not w.info:
                    try:
                        w.info = self.storage.read_json(f"{layout.WORKERS}/{name}")
                    except (OSError, ValueError) as exc:
                        self._warn_bad(f"{layout.WORKERS}/{name}", str(exc))
        # End markers before index records: a worker writes its end marker after its last
        # index record, so every record of an ended worker is read in this same refresh.
        for name in self.storage.list(layout.ENDS):
            if name.endswith(".json"):
                w = self._worker(name[: -len(".json")])
                if w.end is None:
                    try:
                        w.end = self.storage.read_json(f"{layout.ENDS}/{name}")
                    except (OSError, ValueError) as exc:
                        self._warn_bad(f"{layout.ENDS}/{name}", str(exc))
        for worker in self._index_folders():
            w = self._worker(worker)
            for name in self.storage.list(f"{layout.INDEX}/{worker}"):
                if name in w.seen or not name.endswith(".json"):
                    continue
                w.seen.add(name)
                key = f"{layout.INDEX}/{worker}/{name}"
                try:
                    record = self.storage.read_json(key)
                    if record.get("format") != INDEX_MAGIC:
                        raise ValueError("not a tensortap index record")
                except (OSError, ValueError) as exc:
                    self._warn_bad(key, f"unreadable index record ({exc})")
                    continue
                self._add_record(worker, w, record)

    def _index_folders(self) -> list[str]:
        return sorted(set(self.workers) | set(self.storage.list_dirs(layout.INDEX)))

    def _add_record(self, worker: str, w: WorkerState, record: dict[str, Any]) -> None:
        shard = record["shard"]
        steps = [int(s[0]) for s in record["steps"]]
        self.shard_steps[shard] = steps
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
            reds = tuple(entry.get("reductions", ()))
            for step in sorted(raw_steps | red_steps):
                info.locations.setdefault(step, {})[worker] = Location(
                    shard, step in raw_steps, reds if step in red_steps else ()
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
                mode, mode_step = self.steps.pop(step)
                self.mode_steps[mode].pop(mode_step, None)

    def reader(self, shard: str) -> ShardReader | None:
        """Return the open reader of ``shard``, or None (with a warning) if it cannot be read."""
        r = self._readers.get(shard)
        if r is not None:
            self._readers.move_to_end(shard)
            return r
        try:
            r = ShardReader(self.storage.local_path(shard))
        except (ShardError, OSError) as exc:
            self.drop_shard(shard, str(exc))
            return None
        self._readers[shard] = r
        if len(self._readers) > MAX_OPEN_SHARDS:
            _, old = self._readers.popitem(last=False)
            old.close()
        return r

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

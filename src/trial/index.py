"""The read side's view of a trial's files: index records, workers, end markers, shards.

:class:`TrialIndex` lists what is new since the last refresh (cheap: one
listing per worker folder, parsing only records not seen before; and a look
for the shards of the records read, which may show after them: a listing of
a worker's shard folder as its records are first read, else a request for
each new shard) and keeps
where every (tensor, worker, step) lives: a :class:`Segment` per shard shared by
the tensors that hold the same steps there, NumPy arrays of its steps and of
what each step holds, never an object per step nor per (tensor, shard); what
a record says of each tensor is a row of its :class:`Declared` columns.
Shards are opened lazily and kept open in a small LRU cache.

A trial may come from a stranger: every name listed is checked with
:func:`~tensortap.backends.layout.check_name`, every record is checked
against its schema (:func:`parse_index_record`, ``docs/format.md``), and a
file that fails is skipped with one warning naming it.
"""

from __future__ import annotations

import bisect
import contextvars
import functools
import logging
import threading
from array import array
from collections import Counter, OrderedDict
from collections.abc import Callable, ItemsView, Iterable, Iterator, Mapping, Sequence, ValuesView
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from itertools import chain, pairwise
from typing import Any, TypeGuard, TypeVar

import numpy as np

from ..backends import layout
from ..backends.layout import UnsafeKey, check_name
from ..backends.shard import (
    ALL_STEPS,
    INDEX_MAGIC,
    RawAt,
    RawAtReader,
    RawSource,
    ShardError,
    ShardReader,
    locatable,
)
from ..backends.storage import STORAGE_FAILURES, Storage
from ..modes import Mode
from ..processes import KILLED, process_gone
from ..reductions import KEYS as REDUCTION_KEYS

logger = logging.getLogger("tensortap")
_T = TypeVar("_T")

RECORDS_AT_ONCE = 64
"""Index records read in one batch (one round trip on remote storage; their bytes held at once)."""
REQUESTS_AT_ONCE = 32
"""Small requests to remote storage made at once: folders listed, and the values of a tensor read by range
where its index records locate them (:meth:`TrialIndex.read_raw_many`). Each is a round trip or two, its
answer small or returned anyway; the filesystem's own connection pool may queue some (s3fs: 10)."""
SHARDS_ASKED_FOR = 8
"""A refresh asks for the shards of a worker's new index records one by one (one small request each) where they
are at most this many and its shard folder holds more (a live worker polled); else it lists the folder (a
request per 1,000 names, on S3 billed as some ten object requests, its answer growing with the run)."""
READS_AT_ONCE = 8
"""Whole shards downloaded at once from remote storage (:meth:`TrialIndex.fetch`), and shards whose values
a reduction holds together."""
_MODES = {int(m): m for m in Mode}
_IS_MODE = np.zeros(max(_MODES) + 1, dtype=bool)  # by value
_IS_MODE[list(_MODES)] = True
_NO_STEPS = np.zeros(0, dtype=np.int64)
_INT64_MIN, _INT64_MAX = int(np.iinfo(np.int64).min), int(np.iinfo(np.int64).max)
MAX_WORLD_SIZE = 2**20
"""The largest ``world_size`` a worker record may name: readers list every worker it names, so a
stranger's record must not name billions (the largest trainings run some 10^5 processes)."""


class RecordError(ValueError):
    """A JSON record of a trial that does not follow its schema."""


class NewerFormat(RecordError):
    """A JSON record of a newer format version than this tensortap reads."""


_INT64 = (-(1 << 63), 1 << 63)  # every integer of a record is read as an int64 (steps, offsets, sizes)


def _is_int(value: object, minimum: int | None = None) -> bool:
    """Whether ``value`` is an int of the int64 range, at least ``minimum``."""
    low, high = _INT64
    return type(value) is int and (low if minimum is None else max(low, minimum)) <= value < high


def _is_names(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _ints(value: object) -> np.ndarray | None:
    """``value`` as an int64 array if it is a list of JSON integers (no booleans, no floats), else None.

    The types are checked in one pass at C speed (``set(map(type, ...))``), not element by element.
    """
    if not isinstance(value, list) or not set(map(type, value)) <= {int}:
        return None
    try:
        return np.array(value, dtype=np.int64)
    except OverflowError:  # an integer beyond int64 is no step
        return None


def _step_rows(value: object) -> np.ndarray | None:
    """``value`` as an ``(n, 3)`` int64 array if it is a list of ``[step, mode, mode_step]``, else None."""
    if not isinstance(value, list) or not set(map(type, value)) <= {list} or not set(map(len, value)) <= {3}:
        return None
    flat = _ints(list(chain.from_iterable(value)))
    return None if flat is None else flat.reshape(-1, 3)


def _spec_steps(value: object, steps: np.ndarray) -> np.ndarray | None:
    """The steps a step spec names, sorted and unique: ``"*"`` all of ``steps`` (itself, not a copy),
    a list some of them; None if ``value`` is neither."""
    if value == ALL_STEPS:
        return steps
    if value == []:
        return _NO_STEPS
    listed = _ints(value)
    if listed is None or not np.isin(listed, steps).all():
        return None
    return np.unique(listed)


_SPECS = ("raw_steps", "reduction_steps", "histogram_steps")
_RAW_AT_KEYS = ("data", "crc32", "check")
_EMPTY: list[Any] = []  # the default of a list an entry leaves out (read, never changed)

Form = tuple[str, tuple[int, ...]]
"""A dtype (as an index record writes it) and a shape."""


def _raw_at_dtype(code: object) -> np.dtype[Any] | None:
    """The dtype a ``raw_at`` names by ``code`` (``"<f4"``), None if it is not one the format allows."""
    return _dtype_code(code) if isinstance(code, str) and len(code) == 3 and code[0] in "<>|" else None


@functools.lru_cache(maxsize=64)
def _dtype_code(code: str) -> np.dtype[Any] | None:
    try:
        dtype = np.dtype(code)
    except TypeError:
        return None
    return dtype if locatable(dtype) and dtype.str == code else None


Located = tuple[np.dtype[Any], int, int, int]
"""A ``raw_at`` of an index record: the dtype of the values, and the offsets of the data, of the CRC-32s,
and the check."""


def _raw_at(entry: dict[str, Any], raw: np.ndarray) -> Located | None:
    """The entry's ``raw_at`` (format 2.1) as ``(dtype, data, crc32, check)``, None if it has none; a
    ``ValueError`` if it is not as the format says (``raw`` holds the entry's raw steps)."""
    value = entry.get("raw_at")
    if value is None:
        return None
    if not isinstance(value, dict) or not all(_is_int(value.get(k), 0) for k in _RAW_AT_KEYS) or "dtype" not in entry:
        raise ValueError("raw_at")
    dtype = _raw_at_dtype(value.get("dtype"))
    if dtype is None or value["check"] > 0xFFFFFFFF or not len(raw):
        raise ValueError("raw_at")
    return dtype, value["data"], value["crc32"], value["check"]


@dataclass(frozen=True, eq=False)
class Declared:
    """What an index record declares of its tensors, a row each in the record's order, column by column:
    the dtype and shape of each one's values (None where it declares none), and where its raw values lie
    in the shard (format 2.1: a dtype in ``codes``, None where the record does not say, and ``places``).

    Shared by the record's segments: the index keeps no object per tensor and record.
    """

    forms: list[Form | None]
    codes: list[np.dtype[Any] | None]
    places: np.ndarray  # (rows, 3) int64: data, crc32 and check of each row that has a code

    @classmethod
    def of(cls, forms: list[Form | None], located: list[Located | None]) -> Declared:
        """The columns of each row's form and ``raw_at``; a form several rows have is held once."""
        known: dict[Form, Form] = {}
        places = np.zeros((len(located), 3), dtype=np.int64)
        for row, at in enumerate(located):
            if at is not None:
                places[row] = at[1:]
        return cls(
            [None if f is None else known.setdefault(f, f) for f in forms],
            [None if at is None else at[0] for at in located],
            places,
        )

    def form(self, row: int, raw_steps: np.ndarray) -> Form | None:
        """The dtype and shape declared for the last raw value of the tensor of ``row``, whose raw values are
        at ``raw_steps``: None if it has none or declares none."""
        return self.forms[row] if len(raw_steps) else None

    def raw_at(self, row: int) -> RawAt | None:
        """Where the raw values of the tensor of ``row`` lie, None if the record does not say."""
        dtype, form = self.codes[row], self.forms[row]
        if dtype is None or form is None:
            return None
        data, crc, check = self.places[row].tolist()
        return RawAt(dtype, form[1], data, crc, check)


@dataclass(frozen=True)
class ParsedRecord:
    """A valid index record with its step lists as arrays, sorted by step; the tensors whose entries are not
    as the format says are left out of ``tensors``, in ``refused``."""

    record: dict[str, Any]
    steps: np.ndarray  # saved steps, sorted
    modes: np.ndarray  # mode value of each step
    mode_steps: np.ndarray  # mode step of each step
    wall_times: np.ndarray | None  # float64 per step, None if the record has none
    tensors: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]  # name -> raw, reduction, histogram steps
    declared: Declared  # a row per tensor, in the order of ``tensors``
    refused: dict[str, str] = field(default_factory=dict)  # name -> why, of the entries not as the format says

    @property
    def raw_at(self) -> dict[str, RawAt]:
        """``{name: where its raw values lie in the shard}`` of the tensors whose record says (format 2.1)."""
        located = ((name, self.declared.raw_at(row)) for row, name in enumerate(self.tensors))
        return {name: at for name, at in located if at is not None}

    def refusal(self) -> str | None:
        """What readers say of the tensors :attr:`refused` (the first few named, each with why), None if none."""
        if not self.refused:
            return None
        named = [f"{name!r} ({why})" for name, why in list(self.refused.items())[:_NAMED_REFUSED]]
        more = len(self.refused) - len(named)
        tensors = (
            f"tensor{'s' if len(self.refused) > 1 else ''} {', '.join(named)}{f' and {more} more' if more else ''}"
        )
        return f"refused {tensors}: not read from {self.record['shard']}; its other tensors are"


_NAMED_REFUSED = 3  # the refused tensors of a record a warning names


def _all_modes(values: np.ndarray) -> bool:
    """Whether every one of ``values`` (integers) is a mode's value (``np.isin`` took 15% of opening a trial)."""
    return not len(values) or bool(values.min() >= 0 and values.max() < len(_IS_MODE) and _IS_MODE[values].all())


def _all_of(values: list[Any], kind: type) -> bool:
    """Whether each of ``values`` is exactly of type ``kind`` (checked at C speed)."""
    return set(map(type, values)) <= {kind}


def _names_lists(values: list[Any]) -> bool:
    """Whether each of ``values`` is a list of strings."""
    return _all_of(values, list) and _all_of(list(chain.from_iterable(values)), str)


_REDUCTION_KEYS = frozenset(REDUCTION_KEYS)


def _reduction_keys(values: list[Any]) -> bool:
    """Whether each of ``values`` is a list of the keys reductions are stored under (``"mean"``, ``"abs_max"``...)."""
    return _names_lists(values) and set(chain.from_iterable(values)) <= _REDUCTION_KEYS


def _non_negative(values: list[Any]) -> np.ndarray | None:
    """``values`` as an int64 array if each is a JSON integer of the int64 range, at least 0, else None."""
    out = _ints(values)
    return out if out is not None and (not len(out) or out.min() >= 0) else None


def _columns(
    entries: list[Any], spec_steps: Callable[[object], np.ndarray | None]
) -> tuple[list[tuple[np.ndarray, np.ndarray, np.ndarray]], Declared] | None:
    """The step lists and :class:`Declared` of the tensor ``entries`` of a record, checked key by key over
    all entries at once (a Python call per entry cost more than reading the JSON); None if any entry is
    not as the format says, for :func:`parse_index_record` to say which, entry by entry."""
    if not _all_of(entries, dict):
        return None
    ids = _non_negative([e.get("id") for e in entries])
    shapes = [e.get("shape", _EMPTY) for e in entries]
    has_dtype = ["dtype" in e for e in entries]
    if (
        ids is None
        or not _names_lists([e.get("collections", _EMPTY) for e in entries])
        or not _reduction_keys([e.get("reductions", _EMPTY) for e in entries])
        or not all(_all_of([e.get(k, "") for e in entries], str) for k in ("dtype", "orig_dtype"))
        or has_dtype != ["shape" in e for e in entries]
        or not _all_of(shapes, list)
        or _non_negative(list(chain.from_iterable(shapes))) is None
    ):
        return None
    columns = [[spec_steps(e.get(key, _EMPTY)) for e in entries] for key in _SPECS]
    if any(s is None for column in columns for s in column):
        return None
    specs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = list(zip(*columns, strict=True))
    if not all(len(raw) or len(reduced) or len(hist) for raw, reduced, hist in specs):
        return None
    ats = [e.get("raw_at") for e in entries]
    rows = [i for i, at in enumerate(ats) if at is not None]
    located = [ats[i] for i in rows]
    if not _all_of(located, dict):
        return None
    fields = [f for k in _RAW_AT_KEYS if (f := _non_negative([at.get(k) for at in located])) is not None]
    dtypes = [_raw_at_dtype(at.get("dtype")) for at in located]
    if (
        len(fields) < len(_RAW_AT_KEYS)
        or (rows and fields[2].max() > 0xFFFFFFFF)
        or any(dtype is None or not has_dtype[i] or not len(specs[i][0]) for i, dtype in zip(rows, dtypes, strict=True))
    ):
        return None
    places: list[Located | None] = [None] * len(entries)
    for i, dtype, data, crc, check in zip(rows, dtypes, *(f.tolist() for f in fields), strict=True):
        places[i] = (dtype, data, crc, check)
    forms = [(e["dtype"], tuple(s)) if yes else None for e, s, yes in zip(entries, shapes, has_dtype, strict=True)]
    return specs, Declared.of(forms, places)


def parse_index_record(record: object, worker: str) -> ParsedRecord:
    """Check ``record`` against the schema ``docs/format.md`` describes (keys it does not name are ignored) as
    an index record of ``worker``'s folder, and return it with its step lists as arrays; else raise
    :class:`RecordError`. An entry of ``tensors`` not as the format says is refused alone
    (:attr:`ParsedRecord.refused`)."""

    def bad(why: str) -> RecordError:
        return RecordError(f"not a valid index record: {why}")

    if not isinstance(record, dict) or record.get("format") != INDEX_MAGIC:
        raise bad(f"no 'format': {INDEX_MAGIC!r}")
    version = record.get("format_version")
    if not _is_int(version, 1):
        raise bad("'format_version' is not a positive integer")
    if version > layout.FORMAT_VERSION:  # type: ignore[operator]
        raise NewerFormat(
            f"not a valid index record: format version {version} is newer than this tensortap reads "
            f"({layout.FORMAT_VERSION})"
        )
    if record.get("worker") != worker:
        raise bad(f"'worker' is {record.get('worker')!r}, but the record is in the folder of {worker!r}")
    if not _is_int(record.get("seq"), 0) or not _is_int(record.get("bytes"), 0):
        raise bad("'seq' or 'bytes' is not a non-negative integer")
    if not layout.is_shard_key_of(record.get("shard"), worker):
        raise bad(f"'shard' {record.get('shard')!r} is not a shard of {worker} inside the trial")
    rows = _step_rows(record.get("steps"))
    if rows is None or not _all_modes(rows[:, 1]):
        raise bad("'steps' is not a list of [step, mode, mode_step]")
    if not len(rows):
        raise bad("'steps' is empty (a shard holds at least one step)")
    order = np.argsort(rows[:, 0], kind="stable")
    steps = rows[order, 0]
    if (np.diff(steps) <= 0).any():
        raise bad("'steps' repeats a step")
    times = record.get("wall_times", [])
    bad_times = "'wall_times' is not a list of finite numbers, one per step"
    if not isinstance(times, list) or not set(map(type, times)) <= {int, float} or len(times) not in (0, len(steps)):
        raise bad(bad_times)
    try:
        wall_times = np.array(times, dtype=np.float64)[order] if times else None
    except OverflowError:  # an integer too large for a float
        raise bad(bad_times) from None
    if wall_times is not None and not np.isfinite(wall_times).all():  # Python's JSON reads NaN and Infinity
        raise bad(bad_times)
    tensors = record.get("tensors")
    if not isinstance(tensors, dict):
        raise bad("'tensors' is not an object")
    shared: dict[tuple[int, ...], np.ndarray | None] = {}  # step lists many tensors give alike (XGBoost's)

    def spec_steps(value: object) -> np.ndarray | None:
        """:func:`_spec_steps`, checked and made once for each list of integers the record gives."""
        if value == ALL_STEPS:
            return steps
        if not isinstance(value, list) or not value or not set(map(type, value)) <= {int}:
            return _spec_steps(value, steps)
        key = tuple(value)
        if key not in shared:
            shared[key] = _spec_steps(value, steps)
        return shared[key]

    # a name JSON gives with a lone surrogate ("\ud800") cannot be written out (exports, plots): the writer's rule
    columns = _columns(list(tensors.values()), spec_steps) if layout.is_unicode("".join(tensors)) else None
    if columns is None:
        names, specs, declared, refused = _one_by_one(tensors, spec_steps)
    else:
        (specs, declared), names, refused = columns, list(tensors), {}
    return ParsedRecord(
        record,
        steps,
        rows[order, 1],
        rows[order, 2],
        wall_times,
        dict(zip(names, specs, strict=True)),
        declared,
        refused,
    )


def _one_by_one(
    tensors: dict[str, Any], spec_steps: Callable[[object], np.ndarray | None]
) -> tuple[list[str], list[tuple[np.ndarray, np.ndarray, np.ndarray]], Declared, dict[str, str]]:
    """What :func:`_columns` gives, checked entry by entry: the names of the entries of ``tensors`` that are
    as the format says, their step lists and :class:`Declared`, and why each other entry is refused (by
    name). An entry stands alone (its own id, steps and ``raw_at``): refusing one loses no other."""
    names: list[str] = []
    specs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    forms: list[Form | None] = []
    places: list[Located | None] = []
    refused: dict[str, str] = {}
    for name, entry in tensors.items():
        if not layout.is_unicode(name):
            refused[name] = "its name is not valid Unicode"
            continue
        if not isinstance(entry, dict):
            refused[name] = "not an object"
            continue
        listed = {key: spec_steps(entry.get(key, [])) for key in _SPECS}
        checks = {
            "id": _is_int(entry.get("id"), 0),
            "collections": _is_names(entry.get("collections", [])),
            "reductions": _reduction_keys([entry.get("reductions", [])]),
            "dtype": isinstance(entry.get("dtype", ""), str),
            "orig_dtype": isinstance(entry.get("orig_dtype", ""), str),
            "shape": isinstance(entry.get("shape", []), list) and all(_is_int(d, 0) for d in entry.get("shape", [])),
            **{key: spec is not None for key, spec in listed.items()},
        }
        wrong = [key for key, ok in checks.items() if not ok]
        if wrong or ("dtype" in entry) != ("shape" in entry):
            refused[name] = f"{', '.join(wrong) or 'dtype and shape'} not as the format says"
            continue
        if not any(map(len, listed.values())):  # type: ignore[arg-type]
            refused[name] = "lists no step (a shard holds a tensor at one step at least)"
            continue
        try:
            places.append(_raw_at(entry, listed["raw_steps"]))  # type: ignore[arg-type]
        except ValueError:
            refused[name] = "raw_at not as the format says"
            continue
        names.append(name)
        specs.append(tuple(listed.values()))  # type: ignore[arg-type]
        forms.append((entry["dtype"], tuple(entry["shape"])) if "dtype" in entry else None)
    return names, specs, Declared.of(forms, places), refused


IMPORT_FAILED = "import failed"
"""The end marker's ``reason`` of a worker that ``tensortap import-smdebug`` began and did not finish: a half
trial, which ``check`` reports (an import that fails now removes what it wrote; older versions left it)."""


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
    """Return ``info`` if it is a valid worker record (an object of a format version this reader knows),
    else raise :class:`RecordError`."""
    if not isinstance(info, dict):
        raise RecordError("not a valid worker record: not an object")
    version = info.get("format_version", 1)
    if not _is_int(version, 1):
        raise RecordError("not a valid worker record: 'format_version' is not a positive integer")
    if version > layout.FORMAT_VERSION:
        raise NewerFormat(
            f"not a valid worker record: format version {version} is newer than this tensortap reads "
            f"({layout.FORMAT_VERSION})"
        )
    if "world_size" in info and not (_is_int(info["world_size"], 1) and info["world_size"] <= MAX_WORLD_SIZE):
        raise RecordError(f"not a valid worker record: 'world_size' is not an integer from 1 to {MAX_WORLD_SIZE}")
    return info


def world_sizes(records: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
    """The world size each of the valid worker ``records`` (by worker) names, of those that name one."""
    return {worker: record["world_size"] for worker, record in records.items() if "world_size" in record}


MAX_WORKERS_NAMED = 10
"""Workers a report or status names one by one of those it lists (missing, awaited); the rest it counts."""


def expected_workers(sizes: Mapping[str, int]) -> list[str]:
    """The workers of a run whose worker records name the world sizes ``sizes`` (:func:`world_sizes`):
    ``worker_0 .. worker_<n - 1>``, ``n`` the largest; none if no record names one."""
    return [layout.worker_name(rank) for rank in range(max(sizes.values(), default=0))]


def world_size_disagreement(sizes: Mapping[str, int]) -> str | None:
    """How the worker records of ``sizes`` (:func:`world_sizes`) disagree on the world size; None if they agree."""
    if len(set(sizes.values())) < 2:
        return None
    said = ", ".join(f"{worker} says {size}" for worker, size in sorted(sizes.items()))
    return f"the worker records disagree on the world size ({said}); readers expect the largest, {max(sizes.values())}"


MAX_OPEN_SHARDS = 64


@dataclass(frozen=True)
class Location:
    """Where one tensor of one worker at one step is stored."""

    shard: str
    raw: bool
    reductions: tuple[str, ...]
    histogram: bool = False


@dataclass(frozen=True, eq=False)
class Segment:
    """Steps of a tensor in one shard (one index record): arrays, not an object per step.

    ``steps`` is sorted and unique; ``raw``, ``reduced`` and ``histogram`` say,
    step by step, what the shard holds. The tensors of a record that have the
    same steps and reductions (most of them) share one segment, and what the
    record declares of each (its form, where its values lie) is a row of
    ``declared``: the index holds no object per tensor and record.
    """

    shard: str
    worker: str
    steps: np.ndarray
    raw: np.ndarray
    reduced: np.ndarray
    histogram: np.ndarray
    reductions: tuple[str, ...]
    declared: Declared | None = None  # of the record's tensors, a row each

    @functools.cached_property
    def raw_steps(self) -> np.ndarray:
        """The steps with a raw value, sorted: the rows of the shard's values."""
        return self.steps if self.raw.all() else self.steps[self.raw]

    @functools.cached_property
    def codes(self) -> np.ndarray:
        """Per step: bit 0 raw, bit 1 reductions, bit 2 histogram (an index into :attr:`variants`)."""
        return self.raw.astype(np.uint8) | (self.reduced.astype(np.uint8) << 1) | (self.histogram.astype(np.uint8) << 2)

    @functools.cached_property
    def variants(self) -> tuple[Location, ...]:
        """The eight locations a step of this segment may have, shared by its steps."""
        return tuple(Location(self.shard, bool(c & 1), self.reductions if c & 2 else (), bool(c & 4)) for c in range(8))

    def get(self, step: int) -> Location | None:
        """The location of ``step``, None if this segment does not hold it."""
        i = int(self.steps.searchsorted(step))  # the method: np.searchsorted's dispatch costs as much again
        if i < len(self.steps) and self.steps[i] == step:
            return self.variants[int(self.codes[i])]
        return None


def _is_step(value: object) -> TypeGuard[int | np.integer]:
    """Whether ``value`` is an integer that may be a step (fits int64)."""
    return isinstance(value, (int, np.integer)) and _INT64_MIN <= int(value) <= _INT64_MAX


def _positions(values: np.ndarray, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each of ``values`` is in ``table`` (sorted, unique, not empty), and which are there at all."""
    i = np.searchsorted(table, values)
    np.minimum(i, len(table) - 1, out=i)
    return i, table[i] == values


def steps_meet(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether the sorted, unique int64 arrays ``a`` and ``b`` have a step in common.

    One binary search answers the usual case (the first step of the shorter is
    in the longer); else both are cut to the range they share, then merged when
    their sizes are alike, else the shorter is searched in the longer: no
    Python loop over steps.
    """
    if not len(a) or not len(b):
        return False
    if len(a) > len(b):
        a, b = b, a
    first = a[0]
    i = int(np.searchsorted(b, first))
    if i < len(b) and b[i] == first:
        return True
    b = b[i : np.searchsorted(b, a[-1], side="right")]  # b from a's first step to a's last
    if not len(b):
        return False
    a = a[np.searchsorted(a, b[0]) : np.searchsorted(a, b[-1], side="right")]
    if len(a) > len(b):
        a, b = b, a
    if len(b) <= 3 * len(a):  # sizes alike: one linear merge (a stable sort of two sorted runs is timsort's)
        both = np.concatenate([a, b])
        both.sort(kind="stable")
        return bool((both[1:] == both[:-1]).any())
    return bool(len(a)) and bool(_positions(a, b)[1].any())


class Locations(Mapping[int, Mapping[str, Location]]):
    """Read-only ``{step: {worker: Location}}`` view of a tensor's segments, in step order.

    ``len``, ``in`` and iteration use the tensor's merged step array; a lookup
    searches each segment's sorted steps; ``items()`` builds the mapping of
    every step at once (one pass per segment).
    """

    def __init__(self, info: TensorInfo) -> None:
        self._info = info

    def __len__(self) -> int:
        return len(self._info.saved_steps())

    def __iter__(self) -> Iterator[int]:
        return iter(self._info.saved_steps().tolist())

    def __contains__(self, step: object) -> bool:
        return _is_step(step) and any(seg.get(int(step)) is not None for seg in self._info.segments_spanning(int(step)))

    def any_in(self, steps: np.ndarray) -> bool:
        """Whether the tensor was saved at one or more of ``steps`` (sorted, unique int64), such as a mode's steps.

        Binary searches per segment (:func:`steps_meet`), stopping at the first
        segment that has one: the segments are not merged, the steps not iterated.
        """
        return any(steps_meet(seg.steps, steps) for seg in self._info.segments)

    def saved_of(self, steps: np.ndarray) -> np.ndarray:
        """Which of ``steps`` (sorted, unique int64) the tensor was saved at: a boolean array over ``steps``."""
        out = np.zeros(len(steps), dtype=bool)
        if len(steps):
            for seg in self._info.segments:
                at, hit = _positions(seg.steps, steps)
                out[at[hit]] = True
        return out

    def __getitem__(self, step: int) -> dict[str, Location]:
        out: dict[str, Location] = {}
        if _is_step(step):
            for seg in self._info.segments_spanning(int(step)):  # later records win
                loc = seg.get(step)
                if loc is not None:
                    out[seg.worker] = loc
        if not out:
            raise KeyError(step)
        return out

    def _all(self) -> dict[int, dict[str, Location]]:
        segments = self._info.segments
        if len(segments) == 1:
            seg = segments[0]
            v, w = seg.variants, seg.worker
            return {s: {w: v[c]} for s, c in zip(seg.steps.tolist(), seg.codes.tolist(), strict=True)}
        out: dict[int, dict[str, Location]] = {s: {} for s in self._info.saved_steps().tolist()}
        for seg in segments:
            v, w = seg.variants, seg.worker
            for s, c in zip(seg.steps.tolist(), seg.codes.tolist(), strict=True):
                out[s][w] = v[c]
        return out

    def items(self) -> ItemsView[int, dict[str, Location]]:
        return self._all().items()

    def values(self) -> ValuesView[dict[str, Location]]:
        return self._all().values()


@dataclass(eq=False)
class TensorInfo:
    """What the index knows of one tensor name: its metadata, and a :class:`Segment` per shard with the
    tensor's row in its record (``rows``, an array: no object per shard)."""

    name: str
    collections: set[str] = field(default_factory=set)
    segments: list[Segment] = field(default_factory=list)
    rows: array[int] = field(default_factory=lambda: array("q"))
    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    orig_dtype: str | None = None
    _steps: np.ndarray | None = field(default=None, repr=False)
    _spans: tuple[array[int], array[int], bool] | None = field(default=None, repr=False)  # segments_spanning
    _located: dict[str, int] | None = field(default=None, repr=False)  # shard -> its position in ``segments``

    @property
    def locations(self) -> Locations:
        """``{step: {worker: Location}}``, read-only, in step order."""
        return Locations(self)

    def saved_steps(self) -> np.ndarray:
        """Every step any worker saved this tensor at, sorted (merged once per change of the segments)."""
        if self._steps is None:
            arrays = [seg.steps for seg in self.segments]
            if len(arrays) == 1:
                self._steps = arrays[0]
            elif all(a[-1] < b[0] for a, b in pairwise(arrays)):  # none, or shards one after another
                self._steps = np.concatenate([_NO_STEPS, *arrays])
            else:
                self._steps = np.unique(np.concatenate(arrays))
        return self._steps

    def segments_spanning(self, step: int, last: int | None = None) -> list[Segment]:
        """The segments whose first and last steps enclose ``step`` (with ``last``: overlap ``step`` to
        ``last``), in the order they were added.

        Each segment's first and last step are kept in two arrays (built once per change of the
        segments), so a lookup does not look at each of thousands of shards: two binary searches where
        both go up with the segments (shards one after another, the usual case), else one comparison
        over the arrays.
        """
        if self._spans is None:
            firsts = array("q", (seg.steps[0] if len(seg.steps) else _INT64_MAX for seg in self.segments))
            lasts = array("q", (seg.steps[-1] if len(seg.steps) else _INT64_MIN for seg in self.segments))
            ordered = all(a <= b for a, b in pairwise(firsts)) and all(a <= b for a, b in pairwise(lasts))
            self._spans = (firsts, lasts, ordered)
        firsts, lasts, ordered = self._spans
        upto = step if last is None else last
        if ordered:  # those from the first that ends at ``step`` or later to the last that starts by ``upto``
            return self.segments[bisect.bisect_left(lasts, step) : bisect.bisect_right(firsts, upto)]
        met = (np.frombuffer(firsts, dtype=np.int64) <= upto) & (np.frombuffer(lasts, dtype=np.int64) >= step)
        return [self.segments[i] for i in np.flatnonzero(met).tolist()]

    def _of(self, i: int) -> tuple[np.ndarray, Form | None, RawAt | None]:
        """The raw steps of the ``i``-th segment, the form its record declares for the last raw value
        (None if none), and where its raw values lie (None if the record does not say)."""
        seg = self.segments[i]
        return seg.raw_steps, self._form(i), None if seg.declared is None else seg.declared.raw_at(self.rows[i])

    def _form(self, i: int) -> Form | None:
        """The dtype and shape the record of the ``i``-th segment declares for its last raw value, or None."""
        seg = self.segments[i]
        return None if seg.declared is None else seg.declared.form(self.rows[i], seg.raw_steps)

    def in_shard(self, shard: str) -> tuple[np.ndarray, Form | None, RawAt | None]:
        """What the record of ``shard`` says of the tensor (no raw step if it has none): the steps of its
        raw values, the dtype and shape of the last (None if it declares none), and where they lie in the
        shard (None if it does not say)."""
        if self._located is None:
            self._located = {seg.shard: i for i, seg in enumerate(self.segments)}  # one at most per shard
        i = self._located.get(shard)
        return (_NO_STEPS, None, None) if i is None else self._of(i)

    def saved_reductions(self) -> set[str]:
        """Reduction keys saved at one step or more."""
        return {k for seg in self.segments if seg.reduced.any() for k in seg.reductions}

    def add(self, segment: Segment, row: int = 0) -> None:
        """Add the steps of one more shard, the tensor being the ``row``-th of its record."""
        self.segments.append(segment)
        self.rows.append(row)
        self._steps = self._spans = self._located = None

    def drop(self, shard: str) -> None:
        """Forget the steps stored in ``shard``, and the dtype and shape its record declared."""
        kept = [i for i, seg in enumerate(self.segments) if seg.shard != shard]
        if len(kept) != len(self.segments):
            self.segments = [self.segments[i] for i in kept]
            self.rows = array("q", (self.rows[i] for i in kept))
            self._steps = self._spans = self._located = None
            forms = (self._form(i) for i in reversed(range(len(kept))))
            self.dtype, self.shape = next((form for form in forms if form), (None, None))


@dataclass
class WorkerState:
    """Progress of one worker."""

    info: dict[str, Any] = field(default_factory=dict)
    last_step: int = -1
    last_mode_step: dict[Mode, int] = field(default_factory=dict)
    end: dict[str, Any] | None = None
    killed: bool = False  # ``end`` is this reader's: the process ended without writing an end marker
    version: str | None = None  # Storage.listed_version of the worker record ``info`` was read from
    # shard -> (key, record) of the index records listed before their shard (a store that shows objects in any
    # order, a copy of a live trial): added once the shard is there (TrialIndex._add_held)
    held: dict[str, tuple[str, ParsedRecord]] = field(default_factory=dict)

    def passed(self, mode: Mode | None) -> int:
        """The last step (mode step of ``mode``) this worker has passed: its last saved one, but before the
        first step of a record :attr:`held` for its shard (that step, and those after it, are not complete)."""
        last = self.last_step if mode is None else self.last_mode_step.get(mode, -1)
        for _, parsed in self.held.values():
            mine = parsed.steps if mode is None else parsed.mode_steps[parsed.modes == mode]
            if len(mine):
                last = min(last, int(mine.min()) - 1)
        return last


@dataclass(frozen=True, eq=False)
class Listed:
    """What an index record says of its shard: a reader trusts it only as far as the shard agrees."""

    record: str  # the index record's key
    worker: str
    steps: np.ndarray  # sorted
    modes: np.ndarray  # of each step
    mode_steps: np.ndarray  # of each step
    bytes: int

    @classmethod
    def of(cls, key: str, worker: str, parsed: ParsedRecord) -> Listed:
        """What the index record ``key`` of ``worker``, ``parsed``, says."""
        return cls(key, worker, parsed.steps, parsed.modes, parsed.mode_steps, parsed.record["bytes"])

    def disagrees(self, table: np.ndarray) -> bool:
        """Whether the shard's own ``[step, mode, mode_step]`` rows (``table``) are other steps than listed."""
        table = table[np.argsort(table[:, 0], kind="stable")]
        listed = (self.steps, self.modes, self.mode_steps)
        return len(table) != len(self.steps) or not all(np.array_equal(table[:, i], a) for i, a in enumerate(listed))


class Claims(dict[str, Listed]):
    """What the index records added so far say, by shard; :meth:`conflict` says which may not be added.

    A worker saves each step once, in one shard: a second record of a shard or of a worker's step comes
    from a damaged or crafted trial, and the earlier one is kept (it may be the true one; whichever is
    false, its shard disagrees with it when read, and is refused then).
    """

    def __init__(self) -> None:
        super().__init__()
        self.last: dict[str, int] = {}  # worker -> the last step its records list

    def conflict(self, shard: str, new: Listed) -> str | None:
        """Why the index record ``new`` of ``shard`` may not be added: it names a shard an earlier one
        names, or lists a step an earlier one of its worker lists; None if neither."""
        if shard in self:
            return f"names the shard {shard}, which {self[shard].record} names too"
        if not len(new.steps) or new.steps[0] > self.last.get(new.worker, _INT64_MIN - 1):  # the usual case
            return None
        for other in self.values():
            if other.worker == new.worker and steps_meet(other.steps, new.steps):
                return f"lists steps that {other.record} lists too (a worker saves a step once)"
        return None

    def add(self, shard: str, new: Listed) -> None:
        """Add the index record ``new`` of ``shard``."""
        self[shard] = new
        if len(new.steps):
            self.last[new.worker] = max(self.last.get(new.worker, _INT64_MIN), int(new.steps[-1]))


def _another_run(held: Mapping[str, Any], new: object) -> bool:
    """Whether a record of run ``new`` is of another run than the worker record ``held``: also when only the
    new one has a run_id (a run overwrote a format-1 worker, whose record has none); not while no worker
    record is held (the record is read first, :meth:`TrialIndex._look_again` takes it as the first)."""
    return new is not None and bool(held) and new != held.get("run_id")


def disagreement(
    reader: ShardReader, name: str, raw_steps: np.ndarray, declared: Form | None, located: RawAt | None
) -> str | None:
    """How the raw values of ``name`` in ``reader``'s shard are not those its index record describes
    (``raw_steps``, the dtype and shape it declares for the last, and ``located``, where it says they lie: None
    if it does not), as the end of a sentence whose subject is the record; None if they are."""
    if not np.array_equal(reader.raw_steps(name), raw_steps):
        return f"lists other steps of {name!r} than the shard holds"
    if declared is None:
        return None
    held = reader.last_form(name)
    if held is None:
        return f"declares a value of {name!r}; the shard holds none"
    dtype, shape = declared
    try:  # of either byte order: the shard's reader reads its values in the shard's own byte order
        same_type = np.dtype(dtype).newbyteorder("=") == held[0].newbyteorder("=")
    except (TypeError, ValueError):  # not a dtype NumPy knows
        same_type = False
    if not same_type:
        return f"declares the dtype {dtype} for {name!r}; the shard holds {held[0]}"
    if located is not None and located.dtype != held[0]:  # read as the bytes they are there: byte order included
        return (
            f"says the values of {name!r} are {located.dtype.str} where they lie (raw_at); "
            f"the shard holds {held[0].str}"
        )
    if shape != held[1]:
        return f"declares the shape {shape} for {name!r}; the shard holds {held[1]}"
    return None


def read_records(storage: Storage, keys: Sequence[str]) -> Iterator[tuple[str, Any]]:
    """Each of ``keys`` with its JSON record as read, or the OSError or ValueError reading it raised,
    :data:`RECORDS_AT_ONCE` at a time (:meth:`Storage.read_json_many`: one round of requests each on
    remote storage)."""
    for first in range(0, len(keys), RECORDS_AT_ONCE):
        batch = keys[first : first + RECORDS_AT_ONCE]
        yield from zip(batch, storage.read_json_many(batch), strict=True)


def at_once(calls: Sequence[Callable[[], _T]], name: str, limit: int = REQUESTS_AT_ONCE) -> list[Future[_T]]:
    """Run ``calls`` on threads (named ``tensortap-<name>``), ``limit`` at a time, each in a copy of this
    thread's context (a reader's bound on the storage's answers: :func:`~tensortap.backends.storage.answer_by`);
    return their futures, all done, in the same order (for requests to remote storage: a round trip or more
    each). Fewer than two run on this thread: there is nothing to overlap."""
    if len(calls) < 2:
        return [_ran(call) for call in calls]
    pool = ThreadPoolExecutor(min(limit, len(calls)), thread_name_prefix=f"tensortap-{name}")
    try:
        futures = [pool.submit(contextvars.copy_context().run, call) for call in calls]
        wait(futures)
    finally:
        pool.shutdown(cancel_futures=True)
    return futures


def _ran(call: Callable[[], _T]) -> Future[_T]:
    """The future of ``call`` run now, on this thread (its result, or the exception it raised)."""
    return settle(Future(), call)


def settle(future: Future[_T], call: Callable[[], _T]) -> Future[_T]:
    """Run ``call`` now, on this thread, and give ``future`` its result or the exception it raised."""
    try:
        future.set_result(call())
    except Exception as exc:
        future.set_exception(exc)
    return future


def in_background(call: Callable[[], _T], name: str) -> Future[_T]:
    """The future of ``call`` run on a daemon thread named ``tensortap-<name>``: a wait for it may give up
    (a storage endpoint that never answers), and the interpreter does not wait for it at exit."""
    future: Future[_T] = Future()
    threading.Thread(target=settle, args=(future, call), name=f"tensortap-{name}", daemon=True).start()
    return future


class TrialIndex:
    """Everything the trial knows, rebuilt incrementally from the storage."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.workers: dict[str, WorkerState] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self.steps: dict[int, tuple[Mode, int]] = {}  # saved step -> (mode, mode_step)
        self.mode_steps: dict[Mode, dict[int, int]] = {}  # mode -> mode_step -> step
        self.shards = Claims()  # shard -> what its index record says of it
        self.wall_times: dict[int, float] = {}  # saved step -> latest commit time of any worker (format 2)
        self.bad_files: dict[str, str] = {}
        self.newer: dict[str, str] = {}  # records refused for a newer format version: key -> why
        self._lost: dict[tuple[Mode | None, int], str] = {}  # (mode or None, step) -> the bad shard that held it
        self._seen: dict[str, set[str]] = {}  # worker -> names in its index folder read (or warned about)
        self._readers: OrderedDict[str, ShardReader] = OrderedDict()
        self._ranged_once: set[str] = set()  # remote shards a value of which was read by range (read_raw)
        self._sorted: dict[Mode | None, list[int]] = {}  # sorted_steps(), until the steps change
        self._of_mode: dict[Mode, tuple[np.ndarray, np.ndarray]] | None = None  # steps_of_mode(), likewise
        self._replaced = False  # a worker's run was replaced in this refresh: list again
        self._looked: set[str] = set()  # workers whose records were looked at again for a foreign index record
        # workers the worker records' world size names that have written nothing yet (see _expect)
        self.awaited: list[str] = []
        self._expected_for = (0, 0)  # the largest world size and the number of workers awaited was listed for
        self._disagreement: str | None = None  # the last disagreement on the world size warned about

    def _steps_changed(self) -> None:
        self._sorted.clear()
        self._of_mode = None

    def sorted_steps(self, mode: Mode | None = None) -> list[int]:
        """Saved global steps (mode steps of ``mode``), sorted; computed once per change. Do not modify."""
        got = self._sorted.get(mode)
        if got is None:
            got = self._sorted[mode] = sorted(self.steps if mode is None else self.mode_steps.get(mode, {}))
        return got

    def steps_of_mode(self, mode: Mode) -> tuple[np.ndarray, np.ndarray]:
        """The saved global steps of ``mode``, sorted (int64, read-only), and the mode step of each.

        As :attr:`steps` says (the latest record wins); computed for every mode
        at once, once per change of the steps.
        """
        if self._of_mode is None:
            n = len(self.steps)
            steps = np.fromiter(self.steps, dtype=np.int64, count=n)
            rows = np.fromiter(chain.from_iterable(self.steps.values()), dtype=np.int64, count=2 * n).reshape(n, 2)
            order = np.argsort(steps)
            steps, rows = steps[order], rows[order]
            self._of_mode = {}
            for m in Mode:
                mine = rows[:, 0] == m
                pair = (steps[mine], rows[mine, 1])
                for a in pair:
                    a.flags.writeable = False
                self._of_mode[m] = pair
        return self._of_mode[mode]

    def _worker(self, name: str) -> WorkerState:
        if name not in self.workers:
            self.workers[name] = WorkerState()
        return self.workers[name]

    def _warn_bad(self, key: str, why: str, skipped: bool = True) -> None:
        """Say once why ``key`` is not read (``skipped``), or read in part."""
        if key not in self.bad_files:
            self.bad_files[key] = why
            logger.warning("tensortap: %s%s: %s", "skipping " if skipped else "", key, why)

    def refresh(self) -> None:
        """Read index records, worker records and end markers that are new.

        End markers are listed before the index records: a worker writes its end marker after its
        last index record, so every record of an ended worker is read in this same refresh. Two
        rounds of listings (on remote storage each round's requests made at once): the workers'
        records, the end markers and the index folders; then each worker's index folder. Then the shards of
        the records read are looked for (:data:`SHARDS_ASKED_FOR`): a record whose shard is not there yet is
        held for it (:attr:`WorkerState.held`). A worker
        without an end marker whose process has ended (:func:`~tensortap.processes.process_gone`, looked
        at before the listings, so that everything it published is read here) ends, reason ``killed``,
        unless its worker record, read again (:meth:`_look_again`), names another process that resumed
        its run. A worker that ended runs again when its run was resumed (see :meth:`_look_again`). A
        worker's record is read again too when index records read before are no longer listed, when an index
        record or end marker of another run comes, and when its version (:meth:`Storage.listed_version`: the
        listing's ETag or modification time, a local file's ``stat``) shows it written again (at each refresh
        for an ended worker, where the storage does not tell; a running worker's once its index records are
        listed): a new run that overwrote the worker is read from its first record.
        """
        storage = self.storage
        none: list[str] = []
        # before the listings: whatever a process that has ended wrote is listed below
        gone = [name for name, w in self.workers.items() if w.end is None and process_gone(w.info)]
        ended = {name for name, w in self.workers.items() if w.end is not None}
        workers, ends, folders = self._listings(
            [(storage.list, layout.WORKERS), (storage.list, layout.ENDS), (storage.list_dirs, layout.INDEX)], none
        )
        new = [
            (w, key)
            for w, key in self._records(layout.WORKERS, workers)
            if w not in self.workers or not self.workers[w].info
        ]
        versions = {w: storage.listed_version(key) for w, key in new}  # before reading (Storage.listed_version)
        for worker, _, info in self._load(new, lambda record, _: check_worker_record(record)):
            if info is not None or worker in self.workers:  # an unreadable record alone is no worker (warned)
                self._worker(worker).info = info or {}
                self.workers[worker].version = versions[worker]
        met = [w for w, _ in new if w in self.workers and process_gone(self.workers[w].info)]  # next round
        markers = self._records(layout.ENDS, ends)
        listed = {w for w, _ in markers}
        # a resumed run removes the end marker; a killed worker's record is looked at until one resumes it; an
        # ended worker's when it was written again, or when that cannot be told without reading it (a run that
        # overwrote the worker with as many records, and ended, is seen by nothing else)
        self._looked.clear()
        again = [n for n in ended if self._rewritten(n) is not False]
        again += [n for n in ended if self.workers[n].killed or n not in listed]
        renewed = self._look_again([*gone, *again])
        self._read_ends(markers)
        for worker in gone:
            if worker not in renewed and self.workers[worker].end is None:  # ended without its end marker
                self.workers[worker].end = {"worker": worker, "reason": KILLED, "last_step": None, "mode_steps": {}}
                self.workers[worker].killed = True
        folders = self._index_folders(folders)
        listings = self._listings([(storage.entries, f"{layout.INDEX}/{w}") for w in folders], (none, none))
        new = []
        removed = []  # workers whose records read before are gone: their run may have been overwritten
        gone_records: set[str] = set()  # the keys of those records
        for worker, (names, dirs) in zip(folders, listings, strict=True):
            seen = self._seen.setdefault(worker, set())
            new += [(worker, f"{layout.INDEX}/{worker}/{n}") for n in names if n not in seen and n.endswith(".json")]
            if missing := seen.difference(names):
                removed.append(worker)
                seen.difference_update(missing)  # looked at once
                gone_records.update(f"{layout.INDEX}/{worker}/{n}" for n in missing)
            for name in set(dirs).difference(names):  # a name in both is read, and warned about if it fails
                self._warn_bad(f"{layout.INDEX}/{worker}/{name}", "a folder where index records belong; not read")
        # a running worker's record written again: by a run that overwrote it and may have published as many
        # records as were read, under their names; looked at once its records are listed (a local file's
        # version is its state now: a run that claimed the worker while this refresh listed is seen too)
        running = [n for n, w in self.workers.items() if w.end is None and self._rewritten(n)]
        self._look_again([*removed, *running])
        for shard in [shard for shard, listed in self.shards.items() if listed.record in gone_records]:
            self.drop_shard(shard, "its index record is gone (the trial's files removed while it was read?)")
        # the shards of the new records, and of those held for theirs, are looked for after the index folders (a
        # writer publishes a shard before its record): a worker's shard folder listed where it is not much more
        # than those (a worker first read), else each shard asked for (a live worker's poll: its folder grows)
        wanted = Counter(w for w, _ in new)
        wanted.update({w: len(state.held) for w, state in self.workers.items() if state.held})
        whole = {w for w, n in wanted.items() if n > SHARDS_ASKED_FOR or len(self._seen.get(w, ())) <= n}
        shards = self._shard_names(whole)
        asked: list[tuple[str, str, ParsedRecord]] = []  # records whose shards are asked for, added after
        after_end = set()  # workers that ended before this refresh and published since: resumed

        def add(worker: str, key: str, parsed: ParsedRecord) -> None:
            # may find the worker's run replaced, and forget what was seen
            self._add_checked(worker, key, parsed, shards.get(worker))
            if worker in ended and self.workers[worker].end is not None:
                after_end.add(worker)

        for worker, key, parsed in self._load(new, parse_index_record):
            if parsed is not None:
                if worker in whole:
                    add(worker, key, parsed)
                else:
                    asked.append((worker, key, parsed))
            self._seen[worker].add(key.rsplit("/", 1)[1])  # once read (or warned about)
        held = [shard for w, state in self.workers.items() if w not in whole for shard in state.held]
        shards.update(self._shards_there([parsed.record["shard"] for _, _, parsed in asked] + held))
        for record in asked:
            add(*record)
        self._add_held(shards)
        renewed = self._look_again(after_end)
        self._read_ends([(w, key) for w, key in markers if w in renewed])  # its records up to it are read above
        if self._replaced or any(self.workers[w].end is None for w in met):
            # workers first met here whose process has ended: list again, now after the check; runs replaced:
            # read their records from the first
            self._replaced = False
            self.refresh()
        self._expect()

    def _expect(self) -> None:
        """List in :attr:`awaited` the workers of the run (:func:`expected_workers`, from the world size its
        worker records name) that have written nothing yet: a step is not complete, nor the training ended,
        without them. Worker records that disagree on the world size are warned about (once each way)."""
        sizes = world_sizes({name: w.info for name, w in self.workers.items()})
        why = world_size_disagreement(sizes)
        if why is not None and why != self._disagreement:
            logger.warning("tensortap: %s: %s", self.storage.url, why)
        self._disagreement = why
        size = max(sizes.values(), default=0)
        if (size, len(self.workers)) != self._expected_for:  # workers are only ever added
            self._expected_for = (size, len(self.workers))
            self.awaited = [name for name in expected_workers(sizes) if name not in self.workers]

    def _rewritten(self, worker: str) -> bool | None:
        """Whether ``worker``'s record was written again since it was read (its version in this refresh is
        another); None when the storage does not tell."""
        version = self.storage.listed_version(layout.worker_key(worker))
        return None if version is None else version != self.workers[worker].version

    def _read_ends(self, markers: Sequence[tuple[str, str]]) -> None:
        """Read the end markers ``(worker, key)`` of the workers that have not ended; one removed since it
        was listed (by a resumed run, see :meth:`_look_again`) is not there. An end marker of another run
        than the worker's: a new run overwrote the worker (:meth:`_look_again`), whose records and end
        marker are then read from the first."""
        new = [(w, key) for w, key in markers if self._worker(w).end is None]
        for worker, _, end in self._load(new, lambda record, _: check_end_marker(record), removed_ok=True):
            another = end is not None and _another_run(self.workers[worker].info, end.get("run_id"))
            if another and worker in self._look_again([worker]):
                continue
            self.workers[worker].end = end

    def _look_again(self, names: Iterable[str]) -> set[str]:
        """Read the worker records of ``names`` again; return the workers whose run was resumed or replaced.

        A training resumed into the trial (a hook given the ``run_id`` of the worker's run, in this
        process or another) rewrites the worker record, for the process now writing, and removes the
        end marker. A worker whose record now is another one of the same run takes it: it has not
        ended (it may end again, by the end marker of the resumed run or as ``killed`` when its
        process is gone). A record of another run replaced the worker's data (``if_exists="overwrite"``):
        what was read of the worker is forgotten (:meth:`_replace_run`). None, or one not valid,
        changes nothing.
        """
        records = [(w, layout.worker_key(w)) for w in sorted(set(names))]
        versions = {w: self.storage.listed_version(key) for w, key in records}  # before reading
        renewed = set()
        for worker, _, info in self._load(records, lambda record, _: check_worker_record(record), removed_ok=True):
            w = self.workers[worker]
            run = w.info.get("run_id")
            if info is None:
                continue
            version = versions[worker]
            if info == w.info or info.get("run_id") is None or not w.info:  # no run (format 1), or none held
                w.version = version
                continue
            if info["run_id"] == run:
                w.info, w.end, w.killed = info, None, False
            else:
                self._replace_run(worker, info)
            self.workers[worker].version = version
            renewed.add(worker)
        return renewed

    def _replace_run(self, worker: str, info: dict[str, Any]) -> None:
        """``worker``'s data was replaced by the run of the worker record ``info`` (a hook made with
        ``if_exists="overwrite"``): forget its steps, tensors and records read so far (one warning), take
        ``info``, and list the trial again in this refresh, to read the new run's records from the first
        (they reuse the names of the old ones)."""
        logger.warning(
            "tensortap: %s was overwritten by a new run (run %s) since this trial read it; what was read of it "
            "is forgotten, and its steps are now the new run's",
            worker,
            info["run_id"],
        )
        for shard in [shard for shard, listed in self.shards.items() if listed.worker == worker]:
            self._forget_shard(shard)
        self.shards.last.pop(worker, None)
        self.workers[worker] = WorkerState(info=info)
        self._seen[worker] = set()
        mine = (f"{layout.INDEX}/{worker}/", f"{layout.SHARDS}/{worker}/", layout.end_key(worker))
        for key in [key for key in self.bad_files if key.startswith(mine)]:
            del self.bad_files[key]  # the new run's files, of the same names, are warned about afresh
        self._replaced = True

    def _add_checked(self, worker: str, key: str, parsed: ParsedRecord, shards: set[str] | None = None) -> None:
        """Add the index record ``key`` of ``worker``, unless another process than the worker's wrote it; hold
        it (:attr:`WorkerState.held`) while ``shards``, the names of the worker's shards found there (None: not
        looked for), lacks its shard."""
        w = self._worker(worker)
        run, claimed = parsed.record.get("run_id"), w.info.get("run_id")
        if _another_run(w.info, run) and worker not in self._looked:
            self._looked.add(worker)  # a new run overwrote the worker? (once a refresh)
            self._look_again([worker])
            claimed = self.workers[worker].info.get("run_id")
        if run is not None and claimed is not None and run != claimed:
            self._warn_bad(
                key,
                f"written by another process than the one {layout.worker_key(worker)} names "
                f"(run {run}, not {claimed}): two processes wrote the worker {worker}",
            )
            return
        listed = Listed.of(key, worker, parsed)
        why = self.shards.conflict(parsed.record["shard"], listed)
        if why is not None:
            self._warn_bad(key, f"refused: it {why}; the earlier record is kept")
            return
        shard = parsed.record["shard"]
        if shards is not None and shard.rsplit("/", 1)[1] not in shards:  # not there yet: neither are its steps
            self.workers[worker].held[shard] = (key, parsed)
            return
        self._add_record(w, listed, parsed)
        refusal = parsed.refusal()
        if refusal is not None:
            self._warn_bad(key, refusal, skipped=False)

    def _listings(
        self,
        listings: Sequence[tuple[Callable[[str], _T], str]],
        empty: _T,
        unlisted: str = "what it holds is not read",
    ) -> list[_T]:
        """What each ``(list, folder)`` of ``listings`` gives (a storage listing of a folder): on remote
        storage, made at once. A folder that cannot be listed (no permission, a link loop) gives ``empty``,
        with a warning naming it and what follows (``unlisted``; its records are read once it can be); a
        failure of the storage (:data:`~tensortap.backends.storage.STORAGE_FAILURES`) is raised."""
        calls = [functools.partial(listing, folder) for listing, folder in listings]
        done = [_ran(call) for call in calls] if self.storage.is_local else at_once(calls, "list")
        out = []
        for (_, folder), future in zip(listings, done, strict=True):
            exc = future.exception()
            if exc is None:
                out.append(future.result())
                continue
            if isinstance(exc, STORAGE_FAILURES) or not isinstance(exc, OSError):
                raise exc
            self._warn_bad(folder, f"the folder cannot be listed ({exc}); {unlisted}")
            out.append(empty)
        return out

    def _records(self, folder: str, names: Sequence[str]) -> list[tuple[str, str]]:
        """``(worker, key)`` of the ``<worker>.json`` files among ``names`` (listed in ``folder``) whose
        names are valid."""
        out = []
        for name in names:
            if name.endswith(".json"):
                try:
                    out.append((check_name(name[: -len(".json")]), f"{folder}/{name}"))
                except UnsafeKey as exc:
                    self._warn_bad(f"{folder}/{name}", str(exc))
        return out

    def _load(
        self, records: list[tuple[str, str]], check: Callable[[Any, str], _T], removed_ok: bool = False
    ) -> Iterator[tuple[str, str, _T | None]]:
        """``(worker, key, record)`` of the records ``(worker, key)``, read by :func:`read_records`, each
        once ``check(record, worker)`` accepted it; None, with a warning naming it, for one that cannot
        be read or is not valid; with ``removed_ok``, None without a warning for one removed since it
        was listed."""
        read = read_records(self.storage, [key for _, key in records])
        for (worker, key), (_, record) in zip(records, read, strict=True):
            checked = None
            try:
                if isinstance(record, (OSError, ValueError)):
                    raise record
                checked = check(record, worker)
            except (OSError, ValueError) as exc:  # RecordError, UnsafeKey and JSON errors are ValueErrors
                if isinstance(exc, NewerFormat):  # the trial is refused whole (TrialTooNew), naming them: no warning
                    self.newer[key] = str(exc)
                elif not (removed_ok and isinstance(exc, FileNotFoundError)):
                    self._warn_bad(key, f"unreadable record ({exc})")
            yield worker, key, checked

    def _shard_names(self, workers: Iterable[str]) -> dict[str, set[str]]:
        """The names in the shard folder of each of ``workers`` (on remote storage, listed at once); a folder
        that cannot be listed is left out, with a warning naming it (:meth:`_listings`)."""
        named = sorted(set(workers))
        unlisted = "its index records are read without waiting for their shards"
        listed = self._listings([(self.storage.list, f"{layout.SHARDS}/{w}") for w in named], None, unlisted)
        return {w: set(names) for w, names in zip(named, listed, strict=True) if names is not None}

    def _shards_there(self, shards: Sequence[str]) -> dict[str, set[str]]:
        """The names of those of ``shards`` (keys) that the storage has, by worker (as :meth:`_shard_names`:
        every worker of ``shards`` is in it), each asked for (on remote storage, at once). One that cannot
        be asked for (no permission) counts as there: its read says what fails."""
        calls = [functools.partial(self.storage.exists, shard) for shard in shards]
        done = [_ran(call) for call in calls] if self.storage.is_local else at_once(calls, "exists")
        there: dict[str, set[str]] = {}
        for shard, future in zip(shards, done, strict=True):
            _, worker, name = shard.split("/")  # a shard key of its worker (parse_index_record)
            names = there.setdefault(worker, set())
            exc = future.exception()
            if exc is not None and (isinstance(exc, STORAGE_FAILURES) or not isinstance(exc, OSError)):
                raise exc
            if exc is not None or future.result():
                names.add(name)
        return there

    def _add_held(self, shards: Mapping[str, set[str]]) -> None:
        """Add the index records :attr:`WorkerState.held` whose shards are now in ``shards`` (the names of each
        worker's shards found there: :meth:`_shard_names`, :meth:`_shards_there`), and those of a worker whose
        shards were not looked for; a shard still not there once its worker has ended is dropped as missing (one
        warning, :meth:`drop_shard`): its steps were never complete, so no step listed leaves the trial."""
        for worker, w in list(self.workers.items()):
            names = shards.get(worker)
            for shard, (key, parsed) in list(w.held.items()):
                missing = names is not None and shard.rsplit("/", 1)[1] not in names
                if missing and w.end is None:
                    continue  # not there yet: looked for at the next refresh
                del w.held[shard]
                self._add_checked(worker, key, parsed)
                if missing and shard in self.shards and self.shards[shard].record == key:
                    self.drop_shard(shard, self.missing(shard))

    def held_steps(self) -> set[int]:
        """The steps of the index records :attr:`WorkerState.held` for their shards that no record read lists:
        saved, not complete (not in :attr:`steps` until their shards are there)."""
        held = (parsed.steps.tolist() for w in self.workers.values() for _, parsed in w.held.values())
        return set(chain.from_iterable(held)).difference(self.steps)

    def missing(self, shard: str) -> str:
        """Why ``shard`` is dropped when the storage does not have it: the index record that names it, and
        the steps it lists (the file's error says no more than its path, or an object's key)."""
        listed = self.shards.get(shard)
        if listed is None:
            return "not found"
        steps = listed.steps.tolist()
        held = f"step {steps[0]}" if len(steps) == 1 else f"{len(steps)} steps, {steps[0]} to {steps[-1]}"
        return f"not found, though its index record {listed.record} lists it, holding {held}"

    def _index_folders(self, names: Sequence[str]) -> list[str]:
        """The workers whose index folders to list: those known, and the folders ``names`` (of the
        index folder) whose names are valid."""
        folders = set(self.workers)
        for name in names:
            try:
                folders.add(check_name(name))
            except UnsafeKey as exc:
                self._warn_bad(f"{layout.INDEX}/{name}", str(exc))
        return sorted(folders)

    def _add_record(self, w: WorkerState, listed: Listed, parsed: ParsedRecord) -> None:
        record, steps, worker = parsed.record, parsed.steps, listed.worker
        shard = record["shard"]
        self.shards.add(shard, listed)
        self._steps_changed()
        step_list = steps.tolist()
        if parsed.wall_times is not None:
            times, new_times = self.wall_times, parsed.wall_times.tolist()
            if times.keys().isdisjoint(step_list):  # the usual case: steps no other record listed
                times.update(zip(step_list, new_times, strict=True))
            else:  # the latest commit of any worker
                for step, t in zip(step_list, new_times, strict=True):
                    before = times.get(step)
                    times[step] = t if before is None else max(t, before)
        modes = [_MODES[m] for m in parsed.modes.tolist()]
        self.steps.update(zip(step_list, zip(modes, parsed.mode_steps.tolist(), strict=True), strict=True))
        if step_list:
            w.last_step = max(w.last_step, step_list[-1])
        for mode in set(modes):
            mine = parsed.modes == mode
            mode_steps = parsed.mode_steps[mine]
            self.mode_steps.setdefault(mode, {}).update(zip(mode_steps.tolist(), steps[mine].tolist(), strict=True))
            w.last_mode_step[mode] = max(w.last_mode_step.get(mode, -1), int(mode_steps.max()))
        masks = _Masks()
        entries, declared = record["tensors"], parsed.declared
        shared: dict[tuple[int, int, int, tuple[str, ...]], Segment] = {}  # the record's segments, by what they hold
        for row, (name, (raw, reduced, hist)) in enumerate(parsed.tensors.items()):
            entry = entries[name]
            info = self.tensors.get(name)
            if info is None:
                info = self.tensors[name] = TensorInfo(name)
            info.collections.update(entry.get("collections", ()))
            form = declared.forms[row]
            if form is not None:
                info.dtype, info.shape = form
            info.orig_dtype = entry.get("orig_dtype", info.orig_dtype)
            reductions = tuple(entry.get("reductions", ()))
            key = (id(raw), id(reduced), id(hist), reductions)  # the arrays live as long as ``parsed``
            segment = shared.get(key)
            if segment is None:
                parts = [a for a in (raw, reduced, hist) if len(a)]  # one at least (parse_index_record)
                union = steps if all(a is steps for a in parts) else np.unique(np.concatenate(parts))
                segment = shared[key] = Segment(
                    shard,
                    worker,
                    union,
                    masks.of(raw, union),
                    masks.of(reduced, union),
                    masks.of(hist, union),
                    reductions,
                    declared,
                )
            info.add(segment, row)

    def drop_shard(self, shard: str, why: str) -> None:
        """Forget everything stored in ``shard`` (it cannot be read), with one warning saying ``why``; its
        steps that no other shard holds are :meth:`lost_in` it."""
        self._warn_bad(shard, why)
        for step, mode, mode_step in self._forget_shard(shard):
            self._lost[None, step] = self._lost[mode, mode_step] = shard

    def lost_in(self, step: int, mode: Mode | None) -> str | None:
        """The unreadable shard that held ``step`` (a mode step of ``mode``), forgotten since, or None."""
        shard = self._lost.get((mode, step))
        return shard if shard in self.bad_files else None  # not once a new run replaced the worker

    def _forget_shard(self, shard: str) -> list[tuple[int, Mode, int]]:
        """Forget everything stored in ``shard``, and close its reader; return the steps (with their mode and
        mode step) no other shard holds, which are no longer steps of the trial."""
        for info in self.tensors.values():
            info.drop(shard)
        reader = self._readers.pop(shard, None)
        if reader is not None:
            reader.close()
        self._ranged_once.discard(shard)
        listed = self.shards.pop(shard, None)
        dropped = _NO_STEPS if listed is None else listed.steps
        if not len(dropped):
            return []
        others = [other.steps for other in self.shards.values()]
        held = np.concatenate(others) if others else _NO_STEPS
        # no readable copy of these steps is left: they were not saved, as far as readers go
        forgotten = []
        for step in np.setdiff1d(dropped, held).tolist():
            if step in self.steps:  # two records of a stranger may list one step
                mode, mode_step = self.steps.pop(step)
                self.mode_steps[mode].pop(mode_step, None)
                forgotten.append((step, mode, mode_step))
            self.wall_times.pop(step, None)
        self._steps_changed()
        return forgotten

    def _drop_unreadable(self, shard: str, exc: Exception) -> None:
        """:meth:`drop_shard` for the error that reading ``shard`` raised; a failure of the storage (it does not
        answer, or failed the request: :data:`~tensortap.backends.storage.STORAGE_FAILURES`) is raised again
        instead: the shard may be sound, and the next read asks again."""
        if isinstance(exc, STORAGE_FAILURES):
            raise exc
        if isinstance(exc, FileNotFoundError):
            self.drop_shard(shard, self.missing(shard))
            return
        why = str(exc)
        path, named, rest = why.partition(f"{shard}: ")
        self.drop_shard(shard, rest if named and (not path or path.endswith("/")) else why)  # the shard named once

    def reader(self, shard: str) -> ShardReader | None:
        """Return the open reader of ``shard``, or None (with a warning) if it cannot be read."""
        r = self._readers.get(shard)
        if r is not None:
            self._readers.move_to_end(shard)
            return r
        listed = self.shards.get(shard)
        try:
            r = ShardReader(self.storage.local_path(shard), None if listed is None else listed.bytes)
            if listed is not None and listed.disagrees(r.steps_table()):
                r.close()
                raise ShardError(f"its index record {listed.record} lists other steps than the shard holds")
        except (ShardError, OSError, ValueError) as exc:
            self._drop_unreadable(shard, exc)
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

    def read_raw(self, name: str, shard: str, what: Callable[[RawSource], _T], one_value: bool = False) -> _T | None:
        """``what(source)`` on the raw values of ``name`` in ``shard``: read where its index record
        says (``raw_at``, without HDF5) when it does, else through the shard's reader; None, with the
        shard dropped and one warning, if it cannot be read.

        ``one_value``: ``what`` reads one value. On remote storage the first such read of a shard reads
        it by range too (a look at one step downloads a few bytes, not the shard); later ones go through
        the shard's reader (the shard downloaded once, then read locally), since a loop over steps would
        otherwise make requests for every value. Whatever reads through the shard's reader first checks
        that the shard agrees with its record (:meth:`agreeing`).
        """
        direct = True  # where the record says, if it does
        if one_value and not self.storage.is_local:
            direct = shard not in self._readers and shard not in self._ranged_once
            self._ranged_once.add(shard)
        try:
            source = self._located(name, shard) if direct else None
            if source is not None:
                return what(source)
        except (ShardError, OSError, ValueError) as exc:
            self._drop_unreadable(shard, exc)
            return None
        return self.read(shard, lambda reader: what(self.agreeing(reader, name, shard)))

    def agreeing(self, reader: ShardReader, name: str, shard: str) -> ShardReader:
        """``reader``, of ``shard``, once sure it holds raw values of ``name`` at the steps its index record
        lists, no more, no fewer, of the form it declares, and of the dtype its ``raw_at`` reads them as where
        it says they lie, byte order included (else a ShardError: a reader never lists a step whose value it
        drops, nor gives a step's value other than the one read where the record says)."""
        raw_steps, declared, located = self.tensors[name].in_shard(shard)
        record = self.shards[shard].record if shard in self.shards else "its index record"
        why = disagreement(reader, name, raw_steps, declared, located)
        if why is not None:
            raise ShardError(f"{record} {why}")
        return reader

    def read_raw_many(self, name: str, shards: Sequence[str], what: Callable[[RawSource], _T]) -> dict[str, _T | None]:
        """:meth:`read_raw` of each of ``shards``. On remote storage, :data:`REQUESTS_AT_ONCE` shards at a
        time: those whose record says where the values lie read by as many threads at once (a round trip or
        two each), the others downloaded :data:`READS_AT_ONCE` at once (:meth:`fetch`), then read."""
        if self.storage.is_local:
            return {s: self.read_raw(name, s, what) for s in shards}
        out: dict[str, _T | None] = {}
        for first in range(0, len(shards), REQUESTS_AT_ONCE):
            batch = shards[first : first + REQUESTS_AT_ONCE]
            located = self._read_located(name, batch, what)
            self.fetch([s for s in batch if s not in located])
            out.update({s: located[s] if s in located else self.read_raw(name, s, what) for s in batch})
        return out

    def _read_located(self, name: str, shards: Sequence[str], what: Callable[[RawSource], _T]) -> dict[str, _T | None]:
        """``what(source)`` of ``name`` in each of ``shards`` whose record says where its values lie, on a
        thread each (None, with the shard dropped and one warning, where that fails: in the shards' order)."""
        out: dict[str, _T | None] = {}
        sources: dict[str, RawAtReader] = {}
        for shard in shards:
            try:
                if (source := self._located(name, shard)) is not None:
                    sources[shard] = source
            except (ShardError, OSError, ValueError) as exc:
                self._drop_unreadable(shard, exc)
                out[shard] = None
        if not sources:
            return out
        futures = at_once([functools.partial(what, source) for source in sources.values()], "read")
        for shard, future in zip(sources, futures, strict=True):
            try:
                out[shard] = future.result()
            except (ShardError, OSError, ValueError) as exc:
                self._drop_unreadable(shard, exc)
                out[shard] = None
        return out

    def fetch(self, shards: Sequence[str]) -> None:
        """Download the remote ``shards`` not open yet into the cache, :data:`READS_AT_ONCE` at once, so
        that the readers opened next find them there (a shard that fails says so when it is opened; a
        storage that does not answer or fails raises now: :data:`~tensortap.backends.storage.STORAGE_FAILURES`)."""
        todo = [s for s in shards if s not in self._readers]
        if self.storage.is_local or len(todo) < 2:
            return
        for future in at_once([functools.partial(self.storage.local_path, s) for s in todo], "fetch", READS_AT_ONCE):
            if isinstance(future.exception(), STORAGE_FAILURES):
                future.result()  # raised: the storage does not answer, or failed

    def _located(self, name: str, shard: str) -> RawAtReader | None:
        """The reader of ``name``'s values in ``shard`` where its index record says they lie, if it does
        (ShardError if the record's ``raw_at`` does not match its check)."""
        raw_steps, _, at = self.tensors[name].in_shard(shard)
        if at is None:
            return None
        open_file = functools.partial(self.storage.open_ranges, shard)
        listed = self.shards.get(shard)
        return RawAtReader(open_file, shard, None if listed is None else listed.bytes, name, raw_steps, at)

    def close(self) -> None:
        """Close every open shard."""
        for r in self._readers.values():
            r.close()
        self._readers.clear()


class _Masks:
    """The step masks of one record's segments; all-true and all-false ones are shared by length."""

    def __init__(self) -> None:
        self._constant: dict[tuple[int, bool], np.ndarray] = {}

    def of(self, part: np.ndarray, union: np.ndarray) -> np.ndarray:
        """Which steps of ``union`` are in ``part`` (a sorted subset of it)."""
        if len(part) in (0, len(union)):
            key = (len(union), bool(len(part)))
            if key not in self._constant:
                mask = np.full(len(union), key[1])
                mask.flags.writeable = False
                self._constant[key] = mask
            return self._constant[key]
        return np.isin(union, part, assume_unique=True)

"""The HDF5 shard format (version 1): writing and reading one shard.

A shard holds every tensor a worker saved over a run of consecutive saved
steps. Tensor names map to integer ids; each tensor's values over the shard's
steps are stored together in one dataset, so reading a tensor across many
steps costs one read per shard. ``docs/format.md`` is the normative
description; this module is its only implementation. No framework is imported.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np

from .layout import FORMAT_VERSION

SHARD_MAGIC = "tensortap-shard"
INDEX_MAGIC = "tensortap-index"
ALL_STEPS = "*"


@dataclass
class TensorRecord:
    """One tensor at one step, as handed to step listeners (in-process rules).

    ``raw`` is a view into the shard buffer: valid while the listener runs;
    copy what you keep.
    """

    name: str
    collections: tuple[str, ...]
    raw: np.ndarray | None = None
    reductions: dict[str, float] = field(default_factory=dict)
    orig_dtype: str | None = None


@dataclass
class StepRecord:
    """Everything one worker saved at one step."""

    step: int
    mode: int
    mode_step: int
    tensors: list[TensorRecord] = field(default_factory=list)


class BufferPool:
    """Recycles the stacked arrays of published shards, so that steady-state capture
    copies each value once into memory that is already mapped (no page faults)."""

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = max_bytes
        self._free: dict[tuple[str, tuple[int, ...]], list[np.ndarray]] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, dtype: np.dtype[Any], shape: tuple[int, ...], rows: int) -> np.ndarray:
        """An uninitialised array of at least ``rows`` rows of ``shape``."""
        with self._lock:
            free = self._free.get((dtype.str, shape))
            if free:
                for i, arr in enumerate(free):
                    if arr.shape[0] >= rows:
                        self._bytes -= arr.nbytes
                        return free.pop(i)
        return np.empty((rows, *shape), dtype=dtype)

    def put(self, arr: np.ndarray) -> None:
        """Give back ``arr`` unless a view of it is still referenced elsewhere, or the pool is full."""
        # references: the caller's variable, getrefcount's argument and ours
        if sys.getrefcount(arr) > 3 or self._bytes + arr.nbytes > self.max_bytes:
            return
        with self._lock:
            self._free.setdefault((arr.dtype.str, arr.shape[1:]), []).append(arr)
            self._bytes += arr.nbytes

    def clear(self) -> None:
        """Drop every pooled array."""
        with self._lock:
            self._free.clear()
            self._bytes = 0


POOL = BufferPool()
_FIRST_RESERVE = 64 << 20  # bytes a tensor's stacked array may reserve up front (untouched pages cost nothing)


class _Column:
    """One tensor's values within the shard being built."""

    __slots__ = ("collections", "data", "n", "orig_dtype", "ragged", "red", "steps")

    def __init__(self) -> None:
        self.collections: set[str] = set()
        self.steps: list[int] = []  # steps with a raw value
        self.data: np.ndarray | None = None  # stacked rows while every value has one shape and dtype
        self.n = 0
        self.ragged: list[np.ndarray] | None = None
        self.red: list[tuple[int, str, float]] = []
        self.orig_dtype: str | None = None

    def add_raw(self, step: int, value: np.ndarray, rows: int) -> np.ndarray:
        """Copy ``value`` in as the row of ``step``; ``rows`` is how many rows to reserve at first."""
        self.steps.append(step)
        if self.data is not None and self.n == 0 and self.conflicts(value):
            self.release()
        if self.ragged is None and self.data is None:
            self.data = POOL.get(value.dtype, value.shape, rows)
        elif self.ragged is None and self.data is not None and self.data.shape[1:] != value.shape:
            self.ragged = [self.data[i].copy() for i in range(self.n)]
            POOL.put(self.data)
            self.data, self.n = None, 0
        if self.ragged is not None:
            self.ragged.append(np.array(value, copy=True))
            return self.ragged[-1]
        assert self.data is not None
        if self.n == self.data.shape[0]:
            bigger = POOL.get(self.data.dtype, self.data.shape[1:], 2 * self.n)
            bigger[: self.n] = self.data[: self.n]
            POOL.put(self.data)
            self.data = bigger
        self.data[self.n] = value
        self.n += 1
        return self.data[self.n - 1]

    def conflicts(self, value: np.ndarray) -> bool:
        """Whether ``value`` has another dtype than the values stored (one dtype per tensor and shard)."""
        if self.ragged is not None:
            return bool(self.ragged) and self.ragged[0].dtype != value.dtype
        return self.data is not None and self.data.dtype != value.dtype

    def pop_raw(self) -> None:
        self.steps.pop()
        if self.ragged is not None:
            self.ragged.pop()
        else:
            self.n -= 1

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` raw values (``add_raw`` records the step before the value)."""
        del self.steps[n:]
        if self.ragged is not None:
            del self.ragged[n:]
        else:
            self.n = min(self.n, n)

    def last_raw(self) -> np.ndarray:
        return self.ragged[-1] if self.ragged is not None else self.data[self.n - 1]  # type: ignore[index]

    def values(self) -> list[np.ndarray] | np.ndarray:
        if self.ragged is not None:
            return self.ragged
        assert self.data is not None
        return self.data[: self.n]

    def release(self) -> None:
        if self.data is not None:
            data, self.data = self.data, None
            POOL.put(data)


class ShardBuffer:
    """The shard being built: values are copied once, at :meth:`stage`, into
    per-tensor stacked arrays; a step counts once :meth:`commit` is called.

    Parameters
    ----------
    max_steps, max_bytes
        The shard's limits (:class:`~tensortap.capture.ShardPolicy`): a tensor's
        stacked array is sized for them at once, so it rarely has to grow.
    """

    def __init__(self, max_steps: int = 1000, max_bytes: int = 256 << 20) -> None:
        self.max_steps = max_steps
        self.max_bytes = max_bytes
        self.steps: list[tuple[int, int, int]] = []
        self.columns: dict[str, _Column] = {}
        self.nbytes = 0
        self._staged: list[tuple[str, int, bool, int]] = []  # name, step, raw added, reductions added

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def staging(self) -> bool:
        """Whether values of a step that is not committed yet are in the buffer."""
        return bool(self._staged)

    def stage(
        self,
        step: int,
        name: str,
        collections: Sequence[str],
        raw: np.ndarray | None,
        reductions: dict[str, float],
        orig_dtype: str | None,
    ) -> np.ndarray | None:
        """Copy one tensor of the step in progress into the buffer; return the stored raw value."""
        col = self.columns.get(name)
        if col is None:
            col = self.columns[name] = _Column()
        col.collections.update(collections)
        if orig_dtype:
            col.orig_dtype = orig_dtype
        stored = None
        if any(n == name and s == step for n, s, _, _ in self._staged):  # twice in one step: the last wins
            if col.steps and col.steps[-1] == step:
                col.pop_raw()
            col.red = [r for r in col.red if r[0] != step]
            self._staged = [(n, s, r and n != name, 0 if n == name else k) for n, s, r, k in self._staged]
        if raw is not None:
            reserve = min(
                self.max_steps, self.max_bytes // max(raw.nbytes, 1) + 1, _FIRST_RESERVE // max(raw.nbytes, 1)
            )
            stored = col.add_raw(step, raw, max(reserve, 1))
            self.nbytes += raw.nbytes
        col.red.extend((step, k, float(v)) for k, v in reductions.items())
        self.nbytes += 24 * len(reductions) + 64
        self._staged.append((name, step, raw is not None, len(reductions)))
        return stored

    def conflicts(self, name: str, raw: np.ndarray | None) -> bool:
        """Whether staging ``raw`` under ``name`` would change the tensor's dtype within this shard."""
        col = self.columns.get(name)
        if raw is None or col is None:
            return False
        if col.steps and col.steps[-1] == self._step_in_progress():
            return False  # replaces this step's value
        return col.conflicts(raw)

    def _step_in_progress(self) -> int | None:
        return self._staged[-1][1] if self._staged else None

    def detach_staged(self) -> ShardBuffer:
        """Move the values of the step in progress into a new buffer, and return it."""
        moved = ShardBuffer(self.max_steps, self.max_bytes)
        for name, step, raw, n_red in self._staged:
            col = self.columns[name]
            value = np.array(col.last_raw(), copy=True) if raw else None
            reds = {k: v for _, k, v in col.red[len(col.red) - n_red :]}
            moved.stage(step, name, sorted(col.collections), value, reds, col.orig_dtype)
        self.rollback()
        return moved

    def commit(self, step: int, mode: int, mode_step: int) -> None:
        """The step in progress is complete."""
        self.steps.append((step, mode, mode_step))
        self._staged = []

    def rollback(self) -> None:
        """Drop every value of a step that is not committed.

        Works from the committed steps rather than from what :meth:`stage` recorded,
        so that it is also right when a signal handler (SIGTERM) runs it while
        :meth:`stage` is half-way through adding a value.
        """
        last = self.steps[-1][0] if self.steps else -1
        for name, col in list(self.columns.items()):
            col.truncate(sum(1 for s in col.steps if s <= last))
            col.red = [r for r in col.red if r[0] <= last]
            if not col.steps and not col.red:
                col.release()
                del self.columns[name]
        self._staged = []

    def release(self) -> None:
        """Give the stacked arrays back to the pool (after the shard is written)."""
        for col in self.columns.values():
            col.release()
        self.columns = {}


def _json_dataset(group: h5py.Group, name: str, obj: Any) -> None:
    data = np.frombuffer(json.dumps(obj, ensure_ascii=False).encode("utf-8"), dtype=np.uint8)
    group.create_dataset(name, data=data)


def read_json_dataset(ds: h5py.Dataset) -> Any:
    """Decode a dataset written as UTF-8 JSON bytes (``/names``, ...)."""
    return json.loads(ds[()].tobytes().decode("utf-8"))


def _write_raw(group: h5py.Group, col: _Column, compression: str | None) -> dict[str, Any]:
    group.create_dataset("steps", data=np.array(col.steps, dtype=np.int64))
    values = col.values()
    opts: dict[str, Any] = {"compression": compression, "shuffle": True} if compression else {}
    if isinstance(values, np.ndarray):
        group.create_dataset("data", data=values, **(opts if values.size else {}))
        group.attrs["layout"] = "fixed"
        return {"dtype": str(values.dtype), "shape": list(values.shape[1:])}
    dtype = np.result_type(*values)
    ndim = max(a.ndim for a in values)
    flat = np.concatenate([a.astype(dtype, copy=False).ravel() for a in values])
    offsets = np.zeros(len(values) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([a.size for a in values])
    shapes = np.full((len(values), ndim), -1, dtype=np.int64)
    for i, a in enumerate(values):
        shapes[i, : a.ndim] = a.shape
    group.create_dataset("data", data=flat, **(opts if flat.size else {}))
    group.create_dataset("offsets", data=offsets)
    group.create_dataset("shapes", data=shapes)
    group.create_dataset("ndims", data=np.array([a.ndim for a in values], dtype=np.int8))
    group.attrs["layout"] = "ragged"
    return {"dtype": str(np.dtype(dtype)), "shape": list(values[-1].shape)}


def write_shard(
    path: str,
    worker: str,
    seq: int,
    buffer: ShardBuffer,
    shard_key: str,
    compression: str | None = None,
) -> dict[str, Any]:
    """Write the committed steps of ``buffer`` into a new HDF5 file at ``path``; return its index record.

    Parameters
    ----------
    path
        Local file to create (the caller publishes it afterwards).
    worker, seq
        Written into the file's attributes and the index record.
    buffer
        The steps to write (no step may be in progress).
    shard_key
        The key under which the shard will be published (recorded in the index record).
    compression
        ``None`` (default, fastest), ``"gzip"`` or ``"lzf"``: built-in HDF5 filters only.
    """
    names = sorted(buffer.columns)
    n_steps = len(buffer.steps)
    tensors_index: dict[str, Any] = {}
    red_rows: list[tuple[int, int, str, float]] = []
    with h5py.File(path, "w", libver=("v110", "v110")) as f:
        f.attrs["format"] = SHARD_MAGIC
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["worker"] = worker
        f.attrs["seq"] = seq
        steps = np.array(buffer.steps, dtype=np.int64).reshape(n_steps, 3)
        st_group = f.create_group("steps")
        st_group.create_dataset("step", data=steps[:, 0])
        st_group.create_dataset("mode", data=steps[:, 1].astype(np.int8))
        st_group.create_dataset("mode_step", data=steps[:, 2])
        _json_dataset(f, "names", names)
        tgroup = f.create_group("tensors")
        for tid, name in enumerate(names):
            col = buffer.columns[name]
            g = tgroup.create_group(str(tid))
            collections = sorted(col.collections)
            g.attrs["collections"] = json.dumps(collections)
            entry: dict[str, Any] = {"id": tid, "collections": collections}
            if col.steps:
                entry.update(_write_raw(g, col, compression))
                entry["raw_steps"] = ALL_STEPS if len(col.steps) == n_steps else list(col.steps)
            if col.orig_dtype:
                g.attrs["orig_dtype"] = entry["orig_dtype"] = col.orig_dtype
            if col.red:
                red_steps = sorted({s for s, _, _ in col.red})
                entry["reductions"] = sorted({k for _, k, _ in col.red})
                entry["reduction_steps"] = ALL_STEPS if len(red_steps) == n_steps else red_steps
                red_rows.extend((tid, s, k, v) for s, k, v in col.red)
            tensors_index[name] = entry
        kinds = sorted({k for _, _, k, _ in red_rows})
        kind_id = {k: i for i, k in enumerate(kinds)}
        rg = f.create_group("reductions")
        rg.attrs["kinds"] = json.dumps(kinds)
        rg.create_dataset("tensor_id", data=np.array([r[0] for r in red_rows], dtype=np.int32))
        rg.create_dataset("step", data=np.array([r[1] for r in red_rows], dtype=np.int64))
        rg.create_dataset("kind", data=np.array([kind_id[r[2]] for r in red_rows], dtype=np.int16))
        rg.create_dataset("value", data=np.array([r[3] for r in red_rows], dtype=np.float64))
    return {
        "format": INDEX_MAGIC,
        "format_version": FORMAT_VERSION,
        "worker": worker,
        "seq": seq,
        "shard": shard_key,
        "bytes": os.path.getsize(path),
        "steps": [list(s) for s in buffer.steps],
        "tensors": tensors_index,
    }


class ShardError(Exception):
    """A shard cannot be read (truncated, garbage, wrong format)."""


class ShardReader:
    """Read access to one published shard.

    Parameters
    ----------
    path
        Local path of the ``.h5`` file.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._file = h5py.File(path, "r")
            if self._file.attrs.get("format") != SHARD_MAGIC:
                raise ShardError(f"{path}: not a tensortap shard (no format attribute {SHARD_MAGIC!r})")
            version = int(self._file.attrs["format_version"])
            if version > FORMAT_VERSION:
                raise ShardError(
                    f"{path}: format version {version} is newer than this tensortap reads ({FORMAT_VERSION})"
                )
            self.names: list[str] = read_json_dataset(self._file["names"])
        except ShardError:
            self.close()
            raise
        except Exception as exc:
            self.close()
            raise ShardError(f"{path}: cannot read shard ({exc})") from exc
        self.ids = {n: i for i, n in enumerate(self.names)}
        self._reductions: dict[int, dict[tuple[int, str], float]] | None = None

    def close(self) -> None:
        """Close the file."""
        f = getattr(self, "_file", None)
        if f is not None:
            f.close()

    def validate(self) -> None:
        """Read every dataset once; raise ShardError on the first that fails."""
        try:

            def visit(_: str, obj: Any) -> None:
                if isinstance(obj, h5py.Dataset):
                    obj[()]

            self._file.visititems(visit)
        except Exception as exc:
            raise ShardError(f"{self.path}: {exc}") from exc

    def _group(self, name: str) -> h5py.Group:
        return self._file["tensors"][str(self.ids[name])]

    def raw_steps(self, name: str) -> np.ndarray:
        """Global steps at which ``name`` has a raw value in this shard."""
        g = self._group(name)
        return g["steps"][()] if "steps" in g else np.empty(0, dtype=np.int64)

    def values(self, name: str) -> dict[int, np.ndarray]:
        """Every raw value of ``name`` in this shard, by global step (few reads)."""
        g = self._group(name)
        if "data" not in g:
            return {}
        steps = g["steps"][()]
        data = g["data"][()]
        if g.attrs["layout"] == "fixed":
            return {int(s): data[i, ...] for i, s in enumerate(steps)}
        offsets, shapes, ndims = g["offsets"][()], g["shapes"][()], g["ndims"][()]
        return {
            int(s): data[offsets[i] : offsets[i + 1]].reshape(tuple(shapes[i, : ndims[i]])) for i, s in enumerate(steps)
        }

    def value(self, name: str, step: int) -> np.ndarray | None:
        """The raw value of ``name`` at global ``step``, or None."""
        g = self._group(name)
        if "data" not in g:
            return None
        steps = g["steps"][()]
        hits = np.nonzero(steps == step)[0]
        if not len(hits):
            return None
        i = int(hits[0])
        if g.attrs["layout"] == "fixed":
            return np.asarray(g["data"][i, ...])
        o = g["offsets"][i : i + 2]
        shape = tuple(g["shapes"][i, : g["ndims"][i]])
        return g["data"][o[0] : o[1]].reshape(shape)

    def reductions(self, name: str) -> dict[tuple[int, str], float]:
        """Saved reductions of ``name``: ``{(step, key): value}``."""
        if self._reductions is None:
            rg = self._file["reductions"]
            kinds = json.loads(rg.attrs["kinds"])
            table: dict[int, dict[tuple[int, str], float]] = {}
            for tid, step, kind, value in zip(
                rg["tensor_id"][()], rg["step"][()], rg["kind"][()], rg["value"][()], strict=True
            ):
                table.setdefault(int(tid), {})[(int(step), kinds[kind])] = float(value)
            self._reductions = table
        return self._reductions.get(self.ids[name], {})

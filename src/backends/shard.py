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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np

from .layout import FORMAT_VERSION

SHARD_MAGIC = "tensortap-shard"
INDEX_MAGIC = "tensortap-index"
ALL_STEPS = "*"
_STACK_LIMIT = 64 << 20  # stack a tensor's steps in memory below this many bytes


@dataclass
class TensorRecord:
    """One tensor at one step, ready to store."""

    name: str
    collections: tuple[str, ...]
    raw: np.ndarray | None = None
    reductions: dict[str, float] = field(default_factory=dict)
    orig_dtype: str | None = None

    @property
    def nbytes(self) -> int:
        """Bytes this record adds to a shard (roughly)."""
        return (self.raw.nbytes if self.raw is not None else 0) + 16 * len(self.reductions) + 64


@dataclass
class StepRecord:
    """Everything one worker saved at one step."""

    step: int
    mode: int
    mode_step: int
    tensors: list[TensorRecord] = field(default_factory=list)


def _json_dataset(group: h5py.Group, name: str, obj: Any) -> None:
    data = np.frombuffer(json.dumps(obj, ensure_ascii=False).encode("utf-8"), dtype=np.uint8)
    group.create_dataset(name, data=data)


def read_json_dataset(ds: h5py.Dataset) -> Any:
    """Decode a dataset written as UTF-8 JSON bytes (``/names``, ...)."""
    return json.loads(ds[()].tobytes().decode("utf-8"))


def _write_raw(group: h5py.Group, items: list[tuple[int, np.ndarray]], compression: str | None) -> dict[str, Any]:
    steps = np.array([s for s, _ in items], dtype=np.int64)
    arrays = [a for _, a in items]
    dtype = np.result_type(*arrays) if len({a.dtype for a in arrays}) > 1 else arrays[0].dtype
    group.create_dataset("steps", data=steps)
    shapes = {a.shape for a in arrays}
    opts: dict[str, Any] = {}
    if compression:
        opts = {"compression": compression, "shuffle": True}
    if len(shapes) == 1:
        shape = arrays[0].shape
        total = sum(a.nbytes for a in arrays)
        if compression and (len(arrays) * int(np.prod(shape, dtype=np.int64)) == 0):
            opts = {}
        if total <= _STACK_LIMIT:
            group.create_dataset("data", data=np.stack(arrays).astype(dtype, copy=False), **opts)
        else:
            ds = group.create_dataset("data", shape=(len(arrays), *shape), dtype=dtype, **opts)
            for i, a in enumerate(arrays):
                ds[i] = a
        group.attrs["layout"] = "fixed"
    else:
        ndim = max(a.ndim for a in arrays)
        flat = np.concatenate([a.astype(dtype, copy=False).ravel() for a in arrays])
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([a.size for a in arrays])
        shp = np.full((len(arrays), ndim), -1, dtype=np.int64)
        for i, a in enumerate(arrays):
            shp[i, : a.ndim] = a.shape
        group.create_dataset("data", data=flat, **(opts if flat.size else {}))
        group.create_dataset("offsets", data=offsets)
        group.create_dataset("shapes", data=shp)
        group.create_dataset("ndims", data=np.array([a.ndim for a in arrays], dtype=np.int8))
        group.attrs["layout"] = "ragged"
    return {"dtype": str(np.dtype(dtype)), "shape": list(arrays[-1].shape)}


def write_shard(
    path: str,
    worker: str,
    seq: int,
    steps: Sequence[StepRecord],
    shard_key: str,
    compression: str | None = None,
) -> dict[str, Any]:
    """Write ``steps`` into a new HDF5 file at ``path`` and return its index record.

    Parameters
    ----------
    path
        Local file to create (the caller publishes it afterwards).
    worker, seq
        Written into the file's attributes and the index record.
    steps
        The saved steps, in order.
    shard_key
        The key under which the shard will be published (recorded in the index record).
    compression
        ``None`` (default, fastest), ``"gzip"`` or ``"lzf"``: built-in HDF5 filters only.
    """
    by_name: dict[str, list[tuple[int, TensorRecord]]] = {}
    for i, st in enumerate(steps):
        for rec in st.tensors:
            by_name.setdefault(rec.name, []).append((i, rec))
    names = sorted(by_name)
    step_numbers = [st.step for st in steps]
    tensors_index: dict[str, Any] = {}
    red_rows: list[tuple[int, int, str, float]] = []
    with h5py.File(path, "w", libver=("v110", "v110")) as f:
        f.attrs["format"] = SHARD_MAGIC
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["worker"] = worker
        f.attrs["seq"] = seq
        st_group = f.create_group("steps")
        st_group.create_dataset("step", data=np.array(step_numbers, dtype=np.int64))
        st_group.create_dataset("mode", data=np.array([st.mode for st in steps], dtype=np.int8))
        st_group.create_dataset("mode_step", data=np.array([st.mode_step for st in steps], dtype=np.int64))
        _json_dataset(f, "names", names)
        tgroup = f.create_group("tensors")
        for tid, name in enumerate(names):
            recs = by_name[name]
            g = tgroup.create_group(str(tid))
            collections = sorted({c for _, r in recs for c in r.collections})
            g.attrs["collections"] = json.dumps(collections)
            entry: dict[str, Any] = {"id": tid, "collections": collections}
            raw_items = [(step_numbers[i], r.raw) for i, r in recs if r.raw is not None]
            if raw_items:
                entry.update(_write_raw(g, raw_items, compression))
                entry["raw_steps"] = ALL_STEPS if len(raw_items) == len(steps) else [s for s, _ in raw_items]
            orig = {r.orig_dtype for _, r in recs if r.orig_dtype}
            if orig:
                g.attrs["orig_dtype"] = entry["orig_dtype"] = sorted(orig)[0]
            red_steps = []
            keys: set[str] = set()
            for i, r in recs:
                if r.reductions:
                    red_steps.append(step_numbers[i])
                    for k, v in r.reductions.items():
                        red_rows.append((tid, step_numbers[i], k, float(v)))
                        keys.add(k)
            if red_steps:
                entry["reductions"] = sorted(keys)
                entry["reduction_steps"] = ALL_STEPS if len(red_steps) == len(steps) else red_steps
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
        "steps": [[st.step, st.mode, st.mode_step] for st in steps],
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
                raise ShardError(f"{path}: format version {version} is newer than this tensortap reads ({FORMAT_VERSION})")
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
            int(s): data[offsets[i] : offsets[i + 1]].reshape(tuple(shapes[i, : ndims[i]]))
            for i, s in enumerate(steps)
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

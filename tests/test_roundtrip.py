"""SPEC sections 2, 6, 7: values read back equal what was written, bit for bit."""

from __future__ import annotations

import json
import logging
import math
import mmap
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from helpers.pages import cached_pages
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import tensortap
from tensortap.capture import ShardPolicy, Writer
from tensortap.trial.check import find_problems

DTYPES = ["float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool", "complex64"]
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_identical(got: np.ndarray, want: np.ndarray) -> None:
    """Same dtype, same shape, same bytes (so NaN payloads and -0.0 count)."""
    assert isinstance(got, np.ndarray)
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert got.tobytes() == np.ascontiguousarray(want).tobytes()


SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)  # 0-d and empty included


def arrays_of(dtype: str) -> st.SearchStrategy[np.ndarray]:
    return hnp.arrays(np.dtype(dtype), SHAPES)


@st.composite
def tensors(draw: st.DrawFn) -> tuple[str, np.ndarray]:
    dtype = draw(st.sampled_from(DTYPES))
    return draw(st.text(max_size=20)), draw(arrays_of(dtype))


@SETTINGS
@given(st.lists(tensors(), min_size=1, max_size=4, unique_by=lambda t: t[0]), st.sampled_from([None, "gzip"]))
def test_any_dtype_shape_and_name_round_trips(items: list[tuple[str, np.ndarray]], compression: str | None) -> None:
    with tempfile.TemporaryDirectory() as d:
        with Writer(d, shard_policy=ShardPolicy(compression=compression)) as w:
            for _ in range(2):
                with w.stepping():
                    for name, a in items:
                        w.save(name, a)
        trial = tensortap.create_trial(d)
        assert trial.tensor_names() == sorted(n for n, _ in items)
        for name, a in items:
            t = trial.tensor(name)
            assert t.steps() == [0, 1]
            assert_identical(t.value(1), a)
            assert t.shape(0) == a.shape
            values = t.values()
            assert list(values) == [0, 1]
            for v in values.values():
                assert_identical(v, a)
        trial.close()


@pytest.mark.parametrize("dtype", [*DTYPES, "uint64", ">i4"])
@pytest.mark.parametrize("shape", [(), (5,), (2, 3), (0, 3)], ids=["0-d", "1-d", "2-d", "empty"])
def test_values_read_where_the_record_says_equal_what_hdf5_reads(
    dtype: str, shape: tuple[int, ...], tmp_path: Path
) -> None:
    """Integers and floats are read at the offsets of the index record's ``raw_at`` (format 2.1), without
    HDF5; the same trial read through HDF5 (the records without ``raw_at``, as format 2.0 wrote them)
    gives the same values, bit for bit, and both are what was saved."""
    rng = np.random.default_rng(0)
    saved = [(rng.standard_normal(shape) * 100).astype(dtype) for _ in range(5)]
    with Writer(tmp_path, shard_policy=ShardPolicy(max_steps=2)) as w:
        for value in saved:
            with w.stepping():
                w.save("t", value)
    records = sorted((tmp_path / "index" / "worker_0").glob("*.json"))
    located = np.dtype(dtype).kind in "iuf" and math.prod(shape) > 0
    assert all(("raw_at" in json.loads(r.read_text())["tensors"]["t"]) == located for r in records)

    def read() -> tuple[dict[int, np.ndarray], list[np.ndarray]]:
        with tensortap.create_trial(tmp_path) as trial:
            t = trial.tensor("t")
            return t.values(), [t.value(step) for step in range(len(saved))]

    read_located = read()
    for r in records:
        record = json.loads(r.read_text())
        record["tensors"]["t"].pop("raw_at", None)
        r.write_text(json.dumps(record))
    for values, each in (read_located, read()):
        assert list(values) == list(range(len(saved)))
        for step, value in enumerate(saved):
            assert_identical(values[step], value)
            assert_identical(each[step], value)


@SETTINGS
@given(
    st.sampled_from(DTYPES).flatmap(lambda dt: st.lists(arrays_of(dt), min_size=2, max_size=4)),
    st.integers(1, 3),
)
def test_shape_changing_between_steps_round_trips(steps: list[np.ndarray], max_steps: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        with Writer(d, shard_policy=ShardPolicy(max_steps=max_steps)) as w:
            for a in steps:
                with w.stepping():
                    w.save("ragged", a)
        trial = tensortap.create_trial(d)
        t = trial.tensor("ragged")
        for i, a in enumerate(steps):
            assert_identical(t.value(i), a)
            assert t.shape(i) == a.shape
        values = t.values()
        assert list(values) == list(range(len(steps)))
        for i, a in enumerate(steps):
            assert_identical(values[i], a)
        trial.close()


def test_ragged_layout_is_used_and_readable_with_plain_h5py(tmp_path: Path) -> None:
    steps = [np.arange(3, dtype=np.int16), np.arange(6, dtype=np.int16).reshape(2, 3), np.array(7, dtype=np.int16)]
    with Writer(tmp_path) as w:
        for a in steps:
            with w.stepping():
                w.save("x", a)
    (shard,) = (tmp_path / "shards" / "worker_0").glob("*.h5")
    with h5py.File(shard, "r") as f:
        assert f["tensors/0"].attrs["layout"] == b"ragged"  # fixed-length UTF-8 (format 2)
    trial = tensortap.create_trial(tmp_path)
    for i, a in enumerate(steps):
        assert_identical(trial.tensor("x").value(i), a)


def plain_h5py(f: h5py.File, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(steps, data, crc32)`` of tensor ``name`` of the open shard ``f``, read as format.md tells a user of
    plain h5py to: from ``/tensors/<id>`` where the tensor has a group, else from the tables of ``/packed``."""
    tid = json.loads(f["names"][()].tobytes()).index(name)
    if str(tid) in f["tensors"]:
        g = f["tensors"][str(tid)]
        return g["steps"][()], g["data"][()], g["crc32"][()]
    meta = next(m for m in json.loads(f["packed/meta"][()].tobytes()) if m["id"] == tid)
    first, count = meta["rows"]
    dtype, shape = np.dtype(meta["dtype"]), tuple(meta["shape"])
    raw = f["packed/data"][meta["offset"] : meta["offset"] + count * dtype.itemsize * math.prod(shape)]
    rows = slice(first, first + count)
    return f["packed/steps"][rows], raw.view(dtype).reshape(count, *shape), f["packed/crc32"][rows]


@pytest.mark.parametrize("pack_bytes", [0, 1 << 20])
def test_checksums_are_zlib_crc32_of_each_row_and_dataset(pack_bytes: int, tmp_path: Path) -> None:
    """format.md: the checksum is zlib's CRC-32, whichever library computed it (ISA-L when installed), of a
    tensor's own group or of ``/packed``."""
    rng = np.random.default_rng(0)
    fixed = [rng.standard_normal((300, 7)).astype(np.float32) for _ in range(3)]
    ragged = [np.arange(n, dtype=np.int64) for n in (1, 5000, 3)]
    with Writer(tmp_path, shard_policy=ShardPolicy(pack_bytes=pack_bytes)) as w:
        for a, b in zip(fixed, ragged, strict=True):
            with w.stepping():
                w.save("fixed", a)
                w.save("ragged", b)
    (shard,) = (tmp_path / "shards" / "worker_0").glob("*.h5")
    with h5py.File(shard, "r") as f:
        assert ("packed/meta" in f) and (str(json.loads(f["names"][()].tobytes()).index("fixed")) in f["tensors"]) == (
            not pack_bytes
        )
        steps, data, crc = plain_h5py(f, "fixed")
        assert steps.tolist() == [0, 1, 2] and np.array_equal(data, np.stack(fixed))
        assert crc.tolist() == [zlib.crc32(a.tobytes()) for a in fixed]
        assert plain_h5py(f, "ragged")[2].tolist() == [zlib.crc32(b.tobytes()) for b in ragged]
        for table in ("steps/step", "packed/steps", "packed/meta"):
            assert int(f[table].attrs["crc32"]) == zlib.crc32(f[table][()].tobytes()), table


@pytest.mark.parametrize("policy", [{}, {"pack_bytes": 0}, {"compression": "gzip"}], ids=["packed", "groups", "gzip"])
def test_tensors_of_more_dimensions_than_hdf5_has_are_saved(policy: dict[str, Any], tmp_path: Path) -> None:
    """HDF5 datasets have 32 dimensions at most, a tensor's values in a shard one more than the tensor: a tensor
    of 32 dimensions or more failed the shard's publish and turned capture off for the rest of the run (session
    49's hunt 21: only where it went in a group of its own). Such values are stored as ragged ones."""
    values = {
        "d32": lambda s: np.arange(2, dtype=np.float32).reshape((1,) * 31 + (2,)) + s,
        "d63": lambda s: np.full((1,) * 63, s, dtype=np.int8),
        "d63_bool": lambda s: np.full((1,) * 63, s % 2 == 0),
        "d62_empty": lambda s: np.zeros((1,) * 61 + (0,), dtype=np.int8),
        "plain": lambda s: np.float32(s),
    }
    with Writer(tmp_path, shard_policy=ShardPolicy(**policy)) as w:
        for step in range(3):
            with w.stepping():
                for name, make in values.items():
                    w.save(name, make(step))
    trial = tensortap.create_trial(tmp_path)
    for name, make in values.items():
        for step in range(3):
            assert_identical(trial.tensor(name).value(step), make(step))
    assert find_problems(str(tmp_path)) == []


def test_dtype_changing_between_steps_keeps_each_dtype(tmp_path: Path) -> None:
    big = np.array([2**62 + 1, -(2**62) - 3], dtype=np.int64)
    steps = [big, np.array([0.1, np.nan], dtype=np.float32), np.array([True]), np.array([-1, 255], dtype=np.int16)]
    with Writer(tmp_path) as w:
        for a in steps:
            with w.stepping():
                w.save("x", a)
    t = tensortap.create_trial(tmp_path).tensor("x")
    for i, a in enumerate(steps):
        assert_identical(t.value(i), a)
    for i, v in t.values().items():
        assert_identical(v, steps[i])


SPECIAL = {
    "nan/inf": np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-310], dtype=np.float64),
    "nan payload": np.array([0x7FF8000000000001, 0xFFF0000000000002], dtype=np.uint64).view(np.float64),
    "f16 nan": np.array([np.nan, -np.inf, 65504.0, 6e-8], dtype=np.float16),
    "f32 nan.inf": np.array([[np.nan], [np.inf]], dtype=np.float32),
    "0-d": np.array(-3.25, dtype=np.float32),
    "0-d int": np.array(-128, dtype=np.int8),
    "empty": np.zeros((0,), dtype=np.float32),
    "empty 2d": np.zeros((3, 0), dtype=np.int64),
    "extremes": np.array([np.iinfo(np.int64).min, np.iinfo(np.int64).max], dtype=np.int64),
    "bools": np.array([[True, False], [False, True]]),
    "uint8": np.arange(256, dtype=np.uint8),
    "layer.1/weight ü 名前 🙂": np.ones((2, 2), dtype=np.float64),
    "a//b/../c": np.ones(1, dtype=np.int32),
    " lead and trail ": np.zeros(1, dtype=np.int16),
    "": np.ones(2, dtype=np.uint8),
    "0": np.zeros(2, dtype=np.uint8),
}


def test_special_values_and_names_round_trip(tmp_path: Path) -> None:
    with Writer(tmp_path) as w, w.stepping():
        for name, a in SPECIAL.items():
            w.save(name, a)
    trial = tensortap.create_trial(tmp_path)
    assert trial.tensor_names() == sorted(SPECIAL)
    for name, a in SPECIAL.items():
        assert_identical(trial.tensor(name).value(0), a)
    assert trial.tensor_names(regex="名前") == ["layer.1/weight ü 名前 🙂"]


def test_non_contiguous_input_and_copy_semantics(tmp_path: Path) -> None:
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    view = base[::2, ::3]
    with Writer(tmp_path) as w:
        with w.stepping():
            w.save("v", view)
            w.save("f", np.asfortranarray(base))
        base[:] = -1  # the writer keeps its own copy of what was saved
    trial = tensortap.create_trial(tmp_path)
    assert_identical(trial.tensor("v").value(0), np.arange(24, dtype=np.float32).reshape(4, 6)[::2, ::3].copy())
    assert_identical(trial.tensor("f").value(0), np.arange(24, dtype=np.float32).reshape(4, 6))


def test_python_scalars_and_lists(tmp_path: Path) -> None:
    with Writer(tmp_path) as w, w.stepping():
        w.save("int", 3)
        w.save("float", 0.1)
        w.save("list", [[1, 2], [3, 4]])
    trial = tensortap.create_trial(tmp_path)
    assert_identical(trial.tensor("int").value(0), np.asarray(3))
    assert_identical(trial.tensor("float").value(0), np.asarray(0.1))
    assert_identical(trial.tensor("list").value(0), np.asarray([[1, 2], [3, 4]]))


def test_64_mib_tensor(tmp_path: Path) -> None:
    big = np.random.default_rng(0).standard_normal(16 << 20, dtype=np.float32)  # 64 MiB
    big[::4096] = np.nan
    with Writer(tmp_path) as w:
        for _ in range(2):
            with w.stepping():
                w.save("big", big)
    t = tensortap.create_trial(tmp_path).tensor("big")
    assert_identical(t.value(1), big)
    assert t.shape(0) == (16 << 20,)


def test_a_shard_closes_at_a_quarter_of_max_bytes(tmp_path: Path) -> None:
    """The memory bound: IN_FLIGHT (2) shards handed off, the one being built and the recycled arrays."""
    value = np.ones(256, dtype=np.float32)  # 1 KiB a step
    with Writer(tmp_path, shard_policy=ShardPolicy(max_bytes=8 << 10, max_seconds=60, live_seconds=None)) as w:
        for _ in range(8):
            with w.stepping():
                w.save("v", value)
    shards = sorted(p.name for p in (tmp_path / "shards" / "worker_0").glob("*.h5"))
    assert len(shards) == 4  # 2 KiB, two steps, each
    assert tensortap.create_trial(tmp_path).steps() == list(range(8))


def test_a_shard_reserves_the_rows_of_the_previous_one(monkeypatch, tmp_path: Path) -> None:
    """A tensor's stacked array is sized for the steps the previous shard held: it never grows
    (a copy of every row so far, on the training thread) in the middle of a shard."""
    from tensortap.backends import shard

    monkeypatch.setattr(shard, "_FIRST_RESERVE", 4096)  # a 1 KiB value reserves 4 rows without a hint
    value = np.arange(256, dtype=np.float32)

    def first_array_kept(buf: shard.ShardBuffer) -> bool:
        first = None
        for step in range(10):
            buf.stage(step, "x", ("c",), value + step, {}, None)
            buf.commit(step, 0, step)
            first = buf.columns["x"].data if first is None else first
        np.testing.assert_array_equal(buf.columns["x"].values(), np.stack([value + s for s in range(10)]))
        return buf.columns["x"].data is first

    assert not first_array_kept(shard.ShardBuffer())  # without a hint it grows
    assert first_array_kept(shard.ShardBuffer(rows=10))
    with Writer(tmp_path, shard_policy=ShardPolicy(max_steps=5)) as w:
        for _ in range(6):
            with w.stepping():
                w.save("x", value)
        assert w.writer is not None
        assert w.writer._buffer.rows == 5  # the first shard held max_steps
    assert tensortap.create_trial(tmp_path).tensor("x").steps() == list(range(6))


def test_a_shard_closed_early_does_not_shrink_the_next_ones_reservation() -> None:
    """A shard published by time after one step is no guide to the next one's length: the next
    reserves the rows that fit its byte budget, so it does not grow (copy every row) 1, 2, 4, ..."""
    from tensortap.backends import shard

    value = np.arange(256, dtype=np.float32)  # 1 KiB
    first = shard.ShardBuffer(max_steps=1000, max_bytes=64 << 10)
    first.stage(0, "x", ("c",), value, {}, None)
    first.commit(0, 0, 0)
    nxt = first.successor()
    assert nxt.rows == (64 << 10) // first.nbytes + 1  # about 60 steps of a bit over 1 KiB
    arrays = set()
    for step in range(nxt.rows):
        nxt.stage(step, "x", ("c",), value + step, {}, None)
        nxt.commit(step, 0, step)
        arrays.add(id(nxt.columns["x"].data))
    assert len(arrays) == 1  # never grown


def test_a_first_shard_of_many_large_tensors_reserves_a_bounded_address_space() -> None:
    """Without a hint each tensor's array reserved up to 64 MiB: 200 tensors of 64 KiB reserved
    217 MB of address space for a shard of 1 MiB. The buffer's reservation is now bounded (a few
    times its budget); the tensors that find it spent grow instead, and every value is kept."""
    from tensortap.backends import shard

    buf = shard.ShardBuffer(max_bytes=1 << 20)
    values = [np.full(16 << 10, i, dtype=np.float32) for i in range(200)]  # 64 KiB each
    pooled = shard.POOL._bytes
    for step in range(3):
        for i, value in enumerate(values):
            buf.stage(step, f"t{i}", ("c",), value + step, {}, None)
        buf.commit(step, 0, step)
        reserved = sum(col.data.nbytes for col in buf.columns.values() if col.data is not None)
        assert reserved <= shard._RESERVE_SHARDS * buf.max_bytes + (step + 1) * 2 * sum(v.nbytes for v in values)
    for i, value in enumerate(values):
        np.testing.assert_array_equal(buf.columns[f"t{i}"].values(), np.stack([value + s for s in range(3)]))
    assert shard.POOL._bytes <= pooled  # the arrays outgrown were freed, not pooled (no shard would take them)


def test_capture_keeps_going_where_address_space_is_not_overcommitted(tmp_path: Path) -> None:
    """Under a limit on address space (as ``vm.overcommit_memory=2`` or ``ulimit -v`` set), the first
    shard of 50 tensors of 4 MiB reserved 3.2 GB: the ``MemoryError`` turned capture off at the
    first step (its 27th tensor). Now every step of every tensor is kept, with no warning."""
    code = f"""
import resource
import numpy as np
from tensortap.capture import Writer
size = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + (2 << 30), resource.RLIM_INFINITY))
values = [np.full(1 << 20, i, dtype=np.float32) for i in range(50)]
with Writer({str(tmp_path)!r}) as w:
    for step in range(3):
        with w.stepping():
            for i, value in enumerate(values):
                w.save(f"t{{i}}", value + step)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "capture" not in done.stderr, done.stderr
    trial = tensortap.create_trial(tmp_path)
    assert len(trial.tensor_names()) == 50
    for i in (0, 49):
        tensor = trial.tensor(f"t{i}")
        assert tensor.steps() == [0, 1, 2]
        np.testing.assert_array_equal(tensor.value(2), np.full(1 << 20, i + 2, dtype=np.float32))


def test_a_shard_published_before_its_last_step_ends_goes_back_to_the_pool(monkeypatch, tmp_path: Path) -> None:
    """A step's records hold views of the rows it staged; the step drops them before it hands its shard
    off, so a shard the writer thread publishes before ``end_step`` returns (here: at once) gives its
    arrays back to the pool. Held, the pool refused them, and the next shard's arrays were fresh memory
    whose first touch the training thread paid (bench/profiles/torch.md, session 15)."""
    from tensortap.backends import shard
    from tensortap.capture.writer import TrialWriter

    pool = shard.BufferPool()
    monkeypatch.setattr(shard, "POOL", pool)

    def hand_off_and_wait(self: TrialWriter, job: Any) -> None:  # published before commit returns
        self._submit(job)
        self._wait_for(self._pending)

    monkeypatch.setattr(TrialWriter, "_hand_off", hand_off_and_wait)
    value = np.arange(1024, dtype=np.float32)
    with Writer(tmp_path, shard_policy=ShardPolicy(max_steps=1)) as w:
        for step in range(4):
            with w.stepping():
                w.save("x", value + step)
            assert pool._bytes > 0, f"step {step}: the array of its shard was not given back"
    t = tensortap.create_trial(tmp_path).tensor("x")
    for step in range(4):
        assert_identical(t.value(step), value + step)  # a recycled array holds the right values


def test_a_shard_published_by_time_during_a_step_goes_back_to_the_pool_after_it(monkeypatch, tmp_path: Path) -> None:
    """When the writer thread publishes the committed steps by time while a step is in progress, that
    step's records still view rows of the published shard's arrays: the pool takes them back once
    the step has ended, so later shards reuse them instead of fresh memory (every shard of a training
    whose steps are slower than the publish deadline went this way)."""
    import time

    from tensortap.backends import shard

    pool = shard.BufferPool()
    monkeypatch.setattr(shard, "POOL", pool)
    made: list[tuple[int, ...]] = []
    empty = shard.page_aligned_empty
    monkeypatch.setattr(shard, "page_aligned_empty", lambda shape, dtype: made.append(shape) or empty(shape, dtype))
    during: list[int] = []
    detach = shard.ShardBuffer.detach_staged
    monkeypatch.setattr(shard.ShardBuffer, "detach_staged", lambda self: during.append(1) or detach(self))
    value = np.arange(1 << 16, dtype=np.float32)
    steps = 14
    policy = ShardPolicy(max_steps=4, max_seconds=30, live_seconds=0.2)  # every shard's arrays: 4 rows
    with Writer(tmp_path, shard_policy=policy) as w:
        for step in range(steps):
            with w.stepping():
                w.save("x", value + step)
                if step % 2:  # a fast step opens a shard, a slow one sees it published from under it
                    time.sleep(0.5)
    assert len(during) >= 3, "shards were not published during a step: the test proved nothing"
    assert len(made) <= 4, made  # the first shards' arrays, then recycled ones (without: one per slow step)
    t = tensortap.create_trial(tmp_path).tensor("x")
    for step in range(steps):
        assert_identical(t.value(step), value + step)


@pytest.mark.parametrize("rows", [1, 64])  # 16 KiB: NumPy's memory; 1 MiB: a mapping of its own
def test_the_buffer_pool_hands_out_no_array_still_viewed_and_large_ones_page_aligned(
    rows: int, caplog: pytest.LogCaptureFixture
) -> None:
    """An array given back while a view of it lives (the records of a step in progress) is handed
    out again only once the view is gone, however it was allocated: the next shard would overwrite
    the viewed values. Those kept waiting count towards the pool's bytes: past them the oldest are
    forgotten, with a debug log line (a listener keeping every record makes every shard's arrays new
    memory)."""
    from tensortap.backends.shard import DIRECT_MIN, PAGE, BufferPool

    caplog.set_level(logging.DEBUG, logger="tensortap")
    f32 = np.dtype(np.float32)
    pool = BufferPool()
    arr = pool.get(f32, (4096,), rows)
    if arr.nbytes >= DIRECT_MIN:
        assert arr.ctypes.data % PAGE == 0
    first, nbytes = id(arr), arr.nbytes
    row = arr[0]
    pool.put(arr)
    del arr  # the writer keeps no reference to what it gives back
    other = pool.get(f32, (4096,), rows)
    assert id(other) != first  # ``row`` still reads it
    del row
    assert id(pool.get(f32, (4096,), rows)) == first
    assert not caplog.records

    pool = BufferPool(max_bytes=2 * nbytes)
    kept = []
    for _ in range(3):
        arr = pool.get(f32, (4096,), rows)
        kept.append(arr[0])
        pool.put(arr)
        del arr
    assert [r.getMessage() for r in caplog.records] == [f"shard array of {nbytes} bytes not pooled: still viewed"]
    kept.clear()
    got = [pool.get(f32, (4096,), rows) for _ in range(3)]
    assert len({id(a) for a in got}) == 3 and pool._bytes == 0  # the two it kept, then a new one


def test_the_buffer_pool_hands_out_the_smallest_fit_and_drops_the_oldest_when_full() -> None:
    from tensortap.backends.shard import BufferPool

    f32 = np.dtype(np.float32)
    big, small, a, b = (np.empty((n, 16), dtype=f32) for n in (2, 1, 1, 1))  # 128, 64, 64 and 64 bytes
    pool = BufferPool(max_bytes=256)
    pool.put(big)
    pool.put(small)
    assert pool.get(f32, (16,), 1) is small  # not big, which a longer shard can use
    pool.put(small)
    pool.put(a)
    pool.put(b)  # full: the oldest (big) goes to make room
    got = [pool.get(f32, (16,), 1) for _ in range(4)]
    assert [any(g is x for g in got) for x in (big, small, a, b)] == [False, True, True, True]


def test_a_local_shard_is_written_out_while_it_is_built_and_reads_back(monkeypatch, tmp_path: Path) -> None:
    """Local shards written through the page cache (values under ``DIRECT_MIN``, or where there is no
    ``O_DIRECT``) start their disk write every few MB (``sync_file_range``, on Linux); the values read
    back the same and no file descriptor is left open."""
    import os

    from tensortap.backends import shard

    monkeypatch.setattr(shard, "DIRECT", False)
    starts: list[int] = []
    real = shard._START_WRITEBACK
    if real is not None:
        monkeypatch.setattr(shard, "_START_WRITEBACK", lambda fd: starts.append(real(fd)))  # type: ignore[arg-type]
    values = [np.random.default_rng(i).standard_normal(1 << 20, dtype=np.float32) for i in range(12)]  # 4 MiB each
    with Writer(tmp_path / "first") as w, w.stepping():  # the writer thread's own files are open from here on
        w.save("w", values[0])
    fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    with Writer(tmp_path) as w:
        for v in values:
            with w.stepping():
                w.save("w", v)
    if fds is not None:
        assert len(os.listdir("/proc/self/fd")) == fds
    if real is not None:
        assert starts and set(starts) == {0}  # called, and the kernel took it
    t = tensortap.create_trial(tmp_path).tensor("w")
    for step, v in enumerate(values):
        assert_identical(t.value(step), v)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="O_DIRECT and mincore: Linux")
def test_large_values_are_page_aligned_and_written_around_the_page_cache(monkeypatch, tmp_path: Path) -> None:
    """Values of ``DIRECT_MIN`` bytes or more start on a page of the shard and of memory and are written
    with ``O_DIRECT``: none of their whole pages goes through the page cache (checked with the shard's
    own page drop turned off; the same shard written through the cache keeps them); the tails of
    sizes that are not whole pages, and the small values, read back the same."""
    from tensortap.backends import shard, storage

    monkeypatch.setattr(storage, "drop_cached_pages", lambda fd: None)
    rng = np.random.default_rng(0)
    values = {  # one row each; a shard of 3 steps makes 3 rows
        "whole_pages": rng.standard_normal(shard.DIRECT_MIN // 4, dtype=np.float32),
        "a_tail": rng.standard_normal(shard.DIRECT_MIN // 8 + 3, dtype=np.float64),
        "bytes": rng.integers(0, 255, 3 * shard.DIRECT_MIN // 2 + 1, dtype=np.uint8),
        "small": rng.standard_normal(10, dtype=np.float32),
    }

    def write(root: Path) -> tuple[Path, dict[str, tuple[int, int]]]:
        with Writer(root) as w:
            for step in range(3):
                with w.stepping():
                    for name, v in values.items():
                        w.save(name, v + step)
        (path,) = (root / "shards" / "worker_0").glob("*.h5")
        with h5py.File(path, "r") as f:
            names = json.loads(f["names"][()].tobytes())
            data = {n: f[f"tensors/{i}/data"] for i, n in enumerate(names) if n != "small"}  # small: in /packed
            spans = {n: (d.id.get_offset(), d.nbytes) for n, d in data.items()}
        return path, spans

    def read_back(root: Path) -> None:
        trial = tensortap.create_trial(root)
        for step in range(3):
            for name, v in values.items():
                assert_identical(trial.tensor(name).value(step), v + step)

    def cached_whole_pages(path: Path, span: tuple[int, int]) -> int:
        offset, nbytes = span
        return sum(cached_pages(path)[offset // PAGE : (offset + nbytes) // PAGE])

    PAGE = shard.PAGE
    direct, spans = write(tmp_path / "direct")
    for name in ("whole_pages", "a_tail", "bytes"):
        assert spans[name][0] % PAGE == 0, name
    monkeypatch.setattr(shard, "DIRECT", False)
    through_cache, cached_spans = write(tmp_path / "through_cache")
    assert cached_whole_pages(through_cache, cached_spans["whole_pages"]) > 0  # else this check proves nothing
    if cached_whole_pages(direct, spans["whole_pages"]):
        assert shard._NO_DIRECT, "O_DIRECT was taken, yet the pages are cached"
        pytest.skip("this file system refuses O_DIRECT")
    assert not any(cached_whole_pages(direct, spans[n]) for n in ("whole_pages", "a_tail", "bytes"))
    read_back(tmp_path / "direct")
    read_back(tmp_path / "through_cache")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps: Linux")
def test_large_values_read_land_in_memory_not_advised_for_huge_pages(tmp_path: Path) -> None:
    """A read of ``POPULATED_MIN`` bytes or more, where the index record says (format 2.1) or through HDF5
    (its records without ``raw_at``, as format 2.0 wrote them), lands in a mapping made for it at once, which
    asks for no huge pages: NumPy's own arrays of that size do, and where the kernel compacts memory to make
    them the first read of a large tensor in a process spent seconds in the kernel (bench/profiles/read.md)."""
    from helpers.pages import vm_flags

    from tensortap.backends import shard

    plain = np.ones(16 << 20, dtype=np.uint8)  # NumPy advises from 4 MiB, from the array's first 2 MiB boundary on
    if "hg" not in vm_flags(plain.ctypes.data + plain.nbytes // 2):
        pytest.skip("NumPy asks this kernel for no huge pages: nothing to tell apart")
    rng = np.random.default_rng(0)
    big = rng.standard_normal(shard.POPULATED_MIN // 4 // 2 + 5, dtype=np.float32)  # two rows: over the bound
    small = rng.standard_normal(100, dtype=np.float32)
    with Writer(tmp_path) as w:
        for step in range(2):
            with w.stepping():
                w.save("big", big + step)
                w.save("small", small + step)

    def check() -> None:
        with tensortap.create_trial(tmp_path) as trial:
            values = trial.tensor("big").values()
            assert_identical(trial.tensor("small").values()[1], small + 1)
        for step in range(2):
            assert_identical(values[step], big + step)
            assert "hg" not in vm_flags(values[step].ctypes.data + values[step].nbytes // 2)

    check()
    for r in (tmp_path / "index" / "worker_0").glob("*.json"):
        record = json.loads(r.read_text())
        assert record["tensors"]["big"].pop("raw_at")
        r.write_text(json.dumps(record))
    check()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS as Linux counts it")
def test_a_large_read_the_system_refuses_memory_for_is_a_memory_error_not_a_bad_shard(tmp_path: Path) -> None:
    """Where a read of ``POPULATED_MIN`` bytes or more cannot have its memory (here an address-space limit),
    the reader says so with ``MemoryError``, as NumPy would: it does not skip the shard as unreadable."""
    from tensortap.backends import shard

    with Writer(tmp_path) as w:
        for _ in range(2):
            with w.stepping():
                w.save("big", np.zeros(shard.POPULATED_MIN // 4 // 2 + 5, dtype=np.float32))
    script = f"""
import re, resource
import tensortap
trial = tensortap.create_trial({str(tmp_path)!r})
tensor = trial.tensor("big")
size = int(re.search(r"VmSize:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + (16 << 20), resource.RLIM_INFINITY))
try:
    tensor.values()
except MemoryError as exc:
    print("MemoryError", exc)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("MemoryError"), (done.stdout, done.stderr)


@pytest.mark.skipif(not hasattr(mmap, "MAP_POPULATE"), reason="a mapping made at once (MAP_POPULATE): Linux")
def test_values_read_one_at_a_time_reuse_the_memory_of_those_read_before(tmp_path: Path) -> None:
    """A loop of ``value(step)`` over values of 5 MiB (below ``POPULATED_MIN``) reads into NumPy's own
    memory, which ``malloc`` recycles; a value in memory mapped for it alone would fault in each of its
    pages again (a first version of ``read_buffer`` did: 384,000 page faults for 300 such values, 18
    before). Values of ``POPULATED_MIN`` or more are read into a mapping of their own.

    The page faults are not asserted: how many a loop counts depends on the process's and the machine's
    state (a fresh process counts a few hundred for 27 values here; a full CI run counted 20,790).
    """
    from tensortap.backends import shard

    def mapped(array: np.ndarray) -> bool:
        base: Any = array
        while isinstance(base, np.ndarray) and base.base is not None:
            base = base.base
        return isinstance(base, mmap.mmap)

    value = np.arange(5 << 18, dtype=np.float32)  # 5 MiB
    large = np.arange(shard.POPULATED_MIN // 4, dtype=np.float32)
    assert value.nbytes < shard.POPULATED_MIN <= large.nbytes
    with Writer(tmp_path) as w:
        for step in range(5):
            with w.stepping():
                w.save("t", value + step)
                w.save("large", large + step)
    with tensortap.create_trial(tmp_path) as trial:
        t = trial.tensor("t")
        for step in range(5):
            got = t.value(step)
            assert_identical(got, value + step)
            assert not mapped(got), step
        got = trial.tensor("large").value(4)
        assert_identical(got, large + 4)
        assert mapped(got), "a large value: read into a mapping of its own"


def test_values_are_written_outside_hdf5_and_plain_h5py_reads_every_dataset(monkeypatch, tmp_path: Path) -> None:
    """The shard's data goes in with ``os.pwrite``/``os.pwritev`` (which release the GIL the training
    thread needs), at the offsets HDF5 allocated, also when the system writes part of a run at a
    time; plain h5py reads back every value and checksum, of every type stored as its bytes in
    memory, big-endian included."""
    import os

    from tensortap.backends import shard

    written: list[int] = []
    real, realv = os.pwrite, os.pwritev

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        written.append(real(fd, data, offset))
        return written[-1]

    def pwritev(fd: int, pieces: list[memoryview], offset: int) -> int:
        part = pieces[:1] + [p[: len(p) // 2] for p in pieces[1:2]]  # a piece and a half: the rest again
        written.append(realv(fd, part, offset))
        return written[-1]

    monkeypatch.setattr(shard.os, "pwrite", pwrite)
    monkeypatch.setattr(shard.os, "pwritev", pwritev)
    saved = {
        "bool": np.array([True, False, True]),
        "f16": np.array([1.5, -np.inf], dtype=np.float16),
        "c64": np.array([1 + 2j], dtype=np.complex64),
        "big-endian": np.arange(5, dtype=">f4"),
        "big-endian scalar": np.array(2.5, dtype=">f8"),
        "u64": np.array([2**64 - 1], dtype=np.uint64),
        "ragged": [np.arange(3, dtype=np.int8), np.arange(4, dtype=np.int8).reshape(2, 2)],
    }
    with Writer(tmp_path) as w:
        for step in range(2):
            with w.stepping():
                for name, v in saved.items():
                    w.save(name, v[step] if isinstance(v, list) else v)
    (path,) = (tmp_path / "shards" / "worker_0").glob("*.h5")
    with h5py.File(path, "r") as f:
        names = json.loads(f["names"][()].tobytes())
        assert f["packed/data"].id.get_offset() is not None  # contiguous, allocated
        for tid, name in enumerate(names):
            if str(tid) in f["tensors"]:  # the others are packed
                assert f[f"tensors/{tid}/data"].id.get_offset() is not None
            steps, data, crc = plain_h5py(f, name)
            assert steps.tolist() == [0, 1]
            if name == "ragged":
                flat = np.concatenate([a.ravel() for a in saved["ragged"]])  # type: ignore[union-attr]
                assert_identical(data, flat)
                continue
            want = np.asarray(saved[name])
            assert_identical(data, np.array([want, want], dtype=want.dtype))
            assert crc.tolist() == [zlib.crc32(np.ascontiguousarray(want).tobytes())] * 2
        assert sorted(m["id"] for m in json.loads(f["packed/meta"][()].tobytes())) == sorted(
            names.index(n) for n in ("f16", "big-endian", "big-endian scalar", "u64")
        )
    assert sum(written) >= sum(np.asarray(v).nbytes * 2 for k, v in saved.items() if k != "ragged")
    trial = tensortap.create_trial(tmp_path)
    for name, v in saved.items():
        for step in range(2):
            got, want = trial.tensor(name).value(step), (v[step] if isinstance(v, list) else v)
            assert got.tobytes() == np.ascontiguousarray(want).tobytes() and got.dtype.str == want.dtype.str


def test_a_closed_trial_leaves_no_shard_open_and_a_users_own_handle_working(tmp_path: Path) -> None:
    """``Trial.close()`` closes every shard file it opened (their HDF5 files and descriptors), without
    ``FileID.close()``; a shard the user has open with h5py meanwhile stays readable. (Booleans are
    read through HDF5: integers and floats are read where the index record says, without it.)"""
    import os

    with Writer(tmp_path, shard_policy=ShardPolicy(max_steps=2)) as w:
        for step in range(6):
            with w.stepping():
                w.save("w", np.full(3, step % 2 == 1))
    shards = sorted((tmp_path / "shards" / "worker_0").glob("*.h5"))
    assert len(shards) == 3

    def open_shards() -> list[str]:
        fd_dir = "/proc/self/fd"
        if not os.path.isdir(fd_dir):
            return []
        targets = []
        for fd in os.listdir(fd_dir):
            try:
                targets.append(os.readlink(os.path.join(fd_dir, fd)))
            except OSError:  # closed meanwhile (the listing's own descriptor)
                pass
        return [t for t in targets if t.endswith(".h5")]

    files_before = h5py.h5f.get_obj_count(h5py.h5f.OBJ_ALL, h5py.h5f.OBJ_FILE)
    with h5py.File(shards[0], "r") as mine:
        trial = tensortap.create_trial(tmp_path)
        values = trial.tensor("w").values()
        assert sorted(values) == list(range(6))
        assert h5py.h5f.get_obj_count(h5py.h5f.OBJ_ALL, h5py.h5f.OBJ_FILE) > files_before + 1
        trial.close()
        assert h5py.h5f.get_obj_count(h5py.h5f.OBJ_ALL, h5py.h5f.OBJ_FILE) == files_before + 1  # the user's
        assert mine["tensors/0/data"][()].tolist() == [[False] * 3, [True] * 3]
    assert h5py.h5f.get_obj_count(h5py.h5f.OBJ_ALL, h5py.h5f.OBJ_FILE) == files_before
    assert open_shards() == []


@pytest.mark.parametrize("pack_bytes", [0, 1 << 18])
def test_an_explicit_step_that_does_not_go_up_is_dropped_with_a_warning(
    pack_bytes: int, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``stepping(step=...)`` took a step that went back or repeated without a word; the shard then held its steps
    out of order or twice, and readers refused it with every step in it (steps 0 and 5 before the mistake
    included) or the trial's index record (session 50's hunt 23, F2). Then it raised a ValueError out of the
    training loop (hunt 25, M1: a Keras loop numbering its steps by ``optimizer.iterations``, which a
    ``LossScaleOptimizer`` does not move on a batch it skips, died of it). Now the block runs and nothing of it
    is saved, one warning names the step (later ones at INFO), and nothing of it reaches the steps after it:
    neither its values, nor its mode, nor its numbers, also when it is left by an exception and dropped as
    a framework that does not count a failed step drops it (``take_back``)."""
    w = Writer(tmp_path / "run", shard_policy=ShardPolicy(pack_bytes=pack_bytes))
    ran = []
    with caplog.at_level(logging.INFO, logger="tensortap"):
        for i, (step, mode) in enumerate([(0, None), (5, None), (3, "eval"), (5, None), (7, None)]):
            with w.stepping(mode, step=step) as saved:
                w.save("a", np.full(2, step, np.float32))
                w.save(f"block{i}", np.float32(i))
            ran.append((step, saved))
        w.begin_step(step=7)
        w.save("a", np.full(2, -1, np.float32))
        w.drop_step(RuntimeError("a failed step"), take_back=True)
        with w.stepping() as saved:
            w.save("a", np.full(2, 8, np.float32))
        ran.append((w.step, saved))
    w.close()
    assert ran == [(0, True), (5, True), (3, False), (5, False), (7, True), (8, True)]
    said = [(r.levelname, r.getMessage()) for r in caplog.records if "not greater than the last step" in r.getMessage()]
    assert [(level, message.split(":")[1]) for level, message in said] == [
        ("WARNING", " step 3 is not greater than the last step, 5"),
        ("INFO", " step 5 is not greater than the last step, 5"),
        ("INFO", " step 7 is not greater than the last step, 7"),
    ]
    assert "nothing of step 3 is saved and training goes on" in said[0][1]
    trial = tensortap.create_trial(tmp_path / "run")
    assert trial.steps() == [0, 5, 7, 8]
    assert trial.modes() == [tensortap.Mode.TRAIN]
    assert trial.steps(mode="train") == [0, 1, 2, 3]
    assert {s: v.tolist() for s, v in trial.tensor("a").values().items()} == {s: [s, s] for s in (0, 5, 7, 8)}
    assert [n for n in trial.tensor_names() if n.startswith("block")] == ["block0", "block1", "block4"]


def test_an_explicit_step_that_does_not_go_up_raises_when_strict(tmp_path: Path) -> None:
    """With ``strict=True`` a step number that does not go up raises a ValueError naming both steps before the
    block runs, and changes nothing: the steps before and after it are kept."""
    w = Writer(tmp_path / "run", strict=True)
    refused = []
    for step in (0, 5, 3, 5, 7):
        try:
            with w.stepping(step=step):
                w.save("a", np.full(2, step, np.float32))
        except ValueError as exc:
            refused.append((step, str(exc)))
    w.close()
    assert refused == [(s, f"step: {s} is not greater than the last step, 5") for s in (3, 5)]
    trial = tensortap.create_trial(tmp_path / "run")
    assert trial.steps() == [0, 5, 7]
    assert {s: v.tolist() for s, v in trial.tensor("a").values().items()} == {s: [s, s] for s in (0, 5, 7)}


@pytest.mark.parametrize("pack_bytes", [None, 0], ids=["packed", "unpacked"])
def test_a_longdouble_saved_during_torch_training_loses_nothing(
    pack_bytes: int | None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An ``np.longdouble`` value (not portable: float80 or float128 by platform) is neither packed nor
    located by ``raw_at``, which define floats of 8 bytes at most: it is an HDF5 dataset of its own, read
    back bit-equal on this platform, and every weight and loss of the training around it reads back."""
    torch = pytest.importorskip("torch")
    import tensortap.torch as ttt

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt, loss_fn = torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.MSELoss()
    policy = ShardPolicy() if pack_bytes is None else ShardPolicy(pack_bytes=pack_bytes)
    hook = ttt.capture(
        model, tmp_path, optimizer=opt, save_config=tensortap.SaveConfig(save_interval=1), shard_policy=policy
    )
    stat = np.array([1, 3], dtype=np.longdouble) / 7  # more digits than a float64 holds, where longdouble is wider
    weights, losses = [], []
    for step in range(5):
        opt.zero_grad()
        loss = loss_fn(model(torch.randn(4, 3)), torch.zeros(4, 2))
        loss.backward()
        if step == 3:
            hook.save_tensor("stat", stat)
        opt.step()
        weights.append(model.weight.detach().numpy().copy())
        losses.append(loss.detach().numpy().copy())
    hook.close()
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps() == list(range(5))
    assert {"weight", "bias", "losses/loss", "stat"} <= set(trial.tensor_names())
    for step in range(5):
        assert_identical(trial.tensor("weight").value(step), weights[step])
        assert_identical(trial.tensor("losses/loss").value(step), losses[step])
    assert trial.tensor("stat").steps() == [3]
    assert_identical(trial.tensor("stat").value(3), stat)
    trial.close()
    (record,) = (tmp_path / "index" / "worker_0").glob("*.json")
    entry = json.loads(record.read_text())["tensors"]["stat"]
    assert entry["dtype"] == str(np.dtype(np.longdouble)) and "raw_at" not in entry
    assert find_problems(str(tmp_path)) == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize(
    "damage",
    [{"raw_at": {"dtype": "<f16", "data": 0, "crc32": 0, "check": 0}}, {"id": -1}, None],
    ids=["raw_at of a dtype readers refuse", "no id", "not an object"],
)
def test_an_index_entry_readers_refuse_loses_that_tensor_alone(
    damage: dict[str, Any] | None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A record's entry for one tensor that is not as the format says (as a writer that located a longdouble
    wrote it) is refused alone, with one warning naming it and its shard: the record's other tensors are read."""
    with Writer(tmp_path, shard_policy=ShardPolicy(pack_bytes=0)) as w:
        for step in range(2):
            with w.stepping():
                w.save("kept", np.full(2, step, np.float32))
                w.save("damaged", np.full(2, step, np.float64))
    (path,) = (tmp_path / "index" / "worker_0").glob("*.json")
    record = json.loads(path.read_text())
    tensors = record["tensors"]
    tensors["damaged"] = 7 if damage is None else {**tensors["damaged"], **damage}
    path.write_text(json.dumps(record))
    trial = tensortap.create_trial(tmp_path)
    assert trial.tensor_names() == ["kept"]
    assert {s: v.tolist() for s, v in trial.tensor("kept").values().items()} == {0: [0, 0], 1: [1, 1]}
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1 and "'damaged'" in said[0] and record["shard"] in said[0]
    assert list(trial.problems()) == [f"index/worker_0/{path.name}"]
    trial.close()
    (problem,) = find_problems(str(tmp_path))
    assert "refused tensor 'damaged'" in problem

"""Write and read paths with synthetic tensors, against the floor measured in the same run.

Write: ``TENSORS`` float32 tensors of ``SHAPE`` per step, through
:class:`tensortap.capture.Writer` (every step saved, shards published as the
default ``ShardPolicy`` says and at close), against ``numpy.save`` of the
same arrays into one open file, fsynced and dropped from the page cache every
shard's worth of bytes (the floor: no format, no index, no checksum;
tensortap's shards are fsynced and dropped when published), twice
(the run's noise). The arms write ``BLOCK`` steps at a time in turns
(:mod:`bench.harness`); the tensortap arm waits at the end of each block
until the shards it handed off are published. ``floor/this`` is our bytes/s over the floor's (the
target is >= 0.8). Read: one tensor across 1,000 saved steps, with
``Tensor.values()`` (one read per shard) and a ``value(step)`` loop, each from
a freshly opened trial.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import tensortap
from bench import harness
from tensortap import ReductionConfig
from tensortap.backends.storage import drop_cached_pages
from tensortap.capture import ShardPolicy, Writer

BLOCK = 20
WARMUP_BLOCKS = 5  # 100 steps, four shards: the writer's pool of shard arrays is full (bench/notes.md)
ROUNDS = 10
TENSORS = 20
SHAPE = (128, 256)
READ_STEPS = 1000
READ_SHAPE = (64, 64)
SHARD_BYTES = ShardPolicy().shard_bytes  # bytes at which a shard closes


def _arrays(rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.standard_normal(SHAPE, dtype=np.float32) for _ in range(TENSORS)]


class FloorArm:
    """``numpy.save`` of every array of a step into one open file: no format, no index, no checksum;
    flushed to disk with ``fsync`` and dropped from the page cache each time it holds as many new
    bytes as a default shard (``ShardPolicy().shard_bytes``) and at close, as tensortap's
    shards are when published."""

    def __init__(self, root: Path, arrays: list[np.ndarray]) -> None:
        self.arrays = arrays
        self.file = tempfile.NamedTemporaryFile(dir=root, suffix=".npy", delete=False)
        self.unsynced = 0  # bytes

    def run(self, n: int) -> None:
        for _ in range(n):
            for a in self.arrays:
                np.save(self.file, a)
                self.unsynced += a.nbytes
                if self.unsynced >= SHARD_BYTES:
                    self._sync()

    def _sync(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        drop_cached_pages(self.file.fileno())
        self.unsynced = 0

    def close(self) -> None:
        self._sync()
        self.file.close()

    def discard(self) -> None:
        """Remove the file (untimed, as the writer arm's trial: :func:`bench.harness.discard`)."""
        os.unlink(self.file.name)


class WriterArm:
    """The same arrays through :class:`tensortap.capture.Writer` (with ``config``), every step saved."""

    def __init__(self, root: Path, arrays: list[np.ndarray], config: ReductionConfig | None = None) -> None:
        self.arrays = arrays
        self.writer = Writer(root, reduction_config=config)

    def run(self, n: int) -> None:
        for _ in range(n):
            with self.writer.stepping():
                for i, a in enumerate(self.arrays):
                    self.writer.save(f"layer{i}/weight", a, ["weights"])

    def settle(self) -> None:
        """Wait until the shards handed off so far are published (see :func:`bench.harness.settle`)."""
        if self.writer.writer is not None:
            self.writer.writer.drain()

    def close(self) -> None:
        self.writer.close()


def _read(root: Path, steps: int) -> tuple[float, float]:
    with Writer(root / "read") as w:
        rng = np.random.default_rng(1)
        data = [rng.standard_normal(READ_SHAPE, dtype=np.float32) for _ in range(TENSORS)]
        for _ in range(steps):
            with w.stepping():
                for i, a in enumerate(data):
                    w.save(f"layer{i}/weight", a, ["weights"])
    t0 = time.perf_counter()
    values = tensortap.create_trial(root / "read").tensor("layer7/weight").values()
    t_values = time.perf_counter() - t0
    assert len(values) == steps
    t0 = time.perf_counter()
    tensor = tensortap.create_trial(root / "read").tensor("layer7/weight")
    for s in range(steps):
        tensor.value(s)
    t_loop = time.perf_counter() - t0
    return t_values, t_loop


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Measure and return one row per case."""
    arrays = _arrays(np.random.default_rng(0))
    root = Path(tempfile.mkdtemp(prefix="tensortap-bench-"))
    rounds, block = (2, 5) if quick else (ROUNDS, BLOCK)
    read_steps = 50 if quick else READ_STEPS
    try:
        timings = harness.interleave(
            {
                harness.BASELINE: lambda: FloorArm(root, arrays),
                harness.BASELINE_2: lambda: FloorArm(root, arrays),
                "tensortap Writer": lambda: WriterArm(Path(tempfile.mkdtemp(dir=root)), arrays),
            },
            rounds=rounds,
            block=block,
            warmup=WARMUP_BLOCKS * block,
        )
        rows = harness.rows("write", timings, unit="ms_per_step", unsettled=False)
        step_mb = sum(a.nbytes for a in arrays) / 1e6
        for row in rows:
            # the floor syncs every shard of bytes, not at the end of each block: its blocks alone mean little
            del row["ratio of the blocks"]
            row["MB/s"] = step_mb / (float(row["ms_per_step"]) / 1e3)  # type: ignore[arg-type]
            row["floor/this (bytes/s)"] = 1 / float(row["ratio"])  # type: ignore[arg-type]
            if (ratios := row.pop(harness.INTERVAL)) is not None:
                row[harness.interval_column("floor/this (bytes/s)")] = (1 / ratios[1], 1 / ratios[0])  # type: ignore[index]
        t_values, t_loop = _read(root, read_steps)
        rows.append({"benchmark": "read", "case": f"values() of 1 tensor x {read_steps} steps", "seconds": t_values})
        rows.append({"benchmark": "read", "case": f"value(step) loop x {read_steps} steps", "seconds": t_loop})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)

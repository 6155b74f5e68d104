"""Write and read paths with synthetic tensors, against the floor measured in the same run.

Write: the same arrays (``STEPS`` steps x ``TENSORS`` float32 tensors of
``SHAPE``) written through :class:`tensortap.capture.Writer` (every step,
shard published at close) versus ``numpy.save`` of every array into one open
file (the floor: no format, no index). Read: one tensor across 1,000 saved
steps, with ``Tensor.values()`` (one read per shard) and a ``value(step)``
loop, each from a freshly opened trial. Runs alternate and start after ``os.sync()``
so that neither side pays for the other's dirty pages; the best of three counts.
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
from tensortap.capture import Writer

STEPS = 200
TENSORS = 20
SHAPE = (128, 256)
REPEATS = 3
READ_STEPS = 1000
READ_SHAPE = (64, 64)


def _arrays(rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.standard_normal(SHAPE, dtype=np.float32) for _ in range(TENSORS)]


def _write_floor(root: Path, arrays: list[np.ndarray]) -> float:
    t0 = time.perf_counter()
    with open(root / "floor.npy", "wb") as f:
        for _ in range(STEPS):
            for a in arrays:
                np.save(f, a)
    return time.perf_counter() - t0


def _write_tensortap(root: Path, arrays: list[np.ndarray]) -> float:
    t0 = time.perf_counter()
    with Writer(root / "trial") as w:
        for _ in range(STEPS):
            with w.stepping():
                for i, a in enumerate(arrays):
                    w.save(f"layer{i}/weight", a, ["weights"])
    return time.perf_counter() - t0


def _read(root: Path) -> tuple[float, float]:
    with Writer(root / "read") as w:
        rng = np.random.default_rng(1)
        data = [rng.standard_normal(READ_SHAPE, dtype=np.float32) for _ in range(TENSORS)]
        for _ in range(READ_STEPS):
            with w.stepping():
                for i, a in enumerate(data):
                    w.save(f"layer{i}/weight", a, ["weights"])
    t0 = time.perf_counter()
    values = tensortap.create_trial(root / "read").tensor("layer7/weight").values()
    t_values = time.perf_counter() - t0
    assert len(values) == READ_STEPS
    t0 = time.perf_counter()
    tensor = tensortap.create_trial(root / "read").tensor("layer7/weight")
    for s in range(READ_STEPS):
        tensor.value(s)
    t_loop = time.perf_counter() - t0
    return t_values, t_loop


def run() -> list[dict[str, Any]]:
    """Measure and return one row per case."""
    rng = np.random.default_rng(0)
    arrays = _arrays(rng)
    nbytes = STEPS * sum(a.nbytes for a in arrays)
    rows: list[dict[str, Any]] = []
    root = Path(tempfile.mkdtemp(prefix="tensortap-bench-"))
    try:
        floor_times, our_times = [], []
        for i in range(REPEATS):  # alternate, start each run with no dirty pages
            os.sync()
            floor_times.append(_write_floor(root, arrays))
            (root / "floor.npy").unlink()
            os.sync()
            our_times.append(_write_tensortap(root / f"r{i}", arrays))
            shutil.rmtree(root / f"r{i}")
        floor, ours = min(floor_times), min(our_times)
        mb = nbytes / 1e6
        rows.append({"benchmark": "write", "case": f"numpy.save floor ({mb:.0f} MB)", "MB/s": mb / floor, "ratio": 1.0})
        rows.append({"benchmark": "write", "case": "tensortap Writer", "MB/s": mb / ours, "ratio": ours / floor})
        t_values, t_loop = _read(root)
        rows.append({"benchmark": "read", "case": f"values() of 1 tensor x {READ_STEPS} steps", "seconds": t_values})
        rows.append({"benchmark": "read", "case": f"value(step) loop x {READ_STEPS} steps", "seconds": t_loop})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)

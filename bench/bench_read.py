"""Reading one tensor over 1,000 saved steps: smdebug's trial API against tensortap's, same training.

Each library's own PyTorch hook captures :mod:`bench.read_workload` (a
``Linear(640, 640)``: the loss, a scalar, and the 1.6 MB weight, every step)
into its own trial. Then reader processes take turns (:mod:`bench.harness`,
``ROUNDS`` interleaved blocks of ``BLOCK`` reads, one process per block that
times its own reads, so starting Python is not counted): tensortap, twice
(the baseline and the run's noise), and smdebug in its own environment, each
doing the same work. The loss is read into a list of every value
(``Tensor.values()``; smdebug: ``value(step)`` for every step, its only way
to read values). The 1.6 MB weight is read twice over: each value dropped
once read (``value(step)`` for every step, both libraries: the read itself),
and every value kept (``values()``; smdebug: a list of ``value(step)``), where
mapping 1.6 GB of fresh memory in the reader's process weighs on both. Every
read creates a fresh trial. ``ratio`` is time over tensortap's, so smdebug's row holds the figure
of the target. For every value kept, a floor arm reads the shard files' bytes into new arrays, with
no format (:func:`_floor_read`): smdebug's time over the floor's is the most that figure can reach
here. Without smdebug's environment (``TENSORTAP_SMDEBUG_PYTHON`` unset, as outside ``nox -s
bench``) only tensortap's rows are measured.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import tensortap
from bench import harness, read_workload

ROUNDS = 4
BLOCK = {"small": 2, "big": 1, "big-kept": 1}  # reads per process
SMDEBUG_PYTHON = os.environ.get("TENSORTAP_SMDEBUG_PYTHON")
ROOT = str(Path(__file__).resolve().parent.parent)


def _hook(model: Any, opt: Any, loss_fn: Any, out_dir: str) -> Any:
    import tensortap.torch as ttt

    return ttt.capture(
        model,
        out_dir,
        optimizer=opt,
        loss=loss_fn,
        save_config=tensortap.SaveConfig(save_interval=1),
        include_collections=["weights", "losses"],
    )


def _read(path: str, collection: str, keep: bool) -> int:
    with tensortap.create_trial(path) as trial:
        tensor = trial.tensor(trial.tensor_names(collection=collection)[0])
        if keep:
            return len(tensor.values())
        return sum(1 for s in tensor.steps() if tensor.value(s) is not None)


FLOOR = "floor: the shards' bytes read into new arrays, no format"


def _floor_read(path: str, n: int) -> float:
    """Seconds to read every shard file of the trial at ``path`` into new arrays, kept until the pass
    ends, ``n`` times: the floor of reading every value kept (the same bytes into fresh memory, with no
    format, index or checksum)."""
    files = sorted(Path(path, "shards").rglob("*.h5"))
    t0 = time.perf_counter()
    for _ in range(n):
        kept = []
        for file in files:
            with open(file, "rb", buffering=0) as f:
                data = np.empty(os.fstat(f.fileno()).st_size, dtype=np.uint8)
                assert f.readinto(data.data) == data.size
            kept.append(data)
        del kept
    return time.perf_counter() - t0


def _readers(kind: str, ours: str, theirs: str) -> dict[str, Callable[[], harness.Arm]]:
    """The arms reading the tensor of ``kind``: tensortap twice, smdebug where its environment is known,
    and for every value kept, the floor (:func:`_floor_read`)."""
    argv = {
        harness.BASELINE: [sys.executable, "-m", "bench.bench_read", "read", ours, kind],
        harness.BASELINE_2: [sys.executable, "-m", "bench.bench_read", "read", ours, kind],
    }
    if SMDEBUG_PYTHON:
        argv["smdebug"] = [SMDEBUG_PYTHON, "-m", "bench.bench_read_smdebug", "read", theirs, kind]
    if kind == "big-kept":
        argv[FLOOR] = [sys.executable, "-m", "bench.bench_read", "floor", ours]
    return {name: functools.partial(harness.Process, a, ROOT) for name, a in argv.items()}


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Write both trials, read them in turns, return one row per (tensor, reader)."""
    steps, rounds = (20, 1) if quick else (read_workload.STEPS, ROUNDS)
    root = Path(tempfile.mkdtemp(prefix="tensortap-bench-read-"))
    ours, theirs = str(root / "tensortap"), str(root / "smdebug")
    rows: list[dict[str, Any]] = []
    try:
        read_workload.train(_hook, ours, steps)
        if SMDEBUG_PYTHON:
            write = [SMDEBUG_PYTHON, "-m", "bench.bench_read_smdebug", "write", theirs, str(steps)]
            subprocess.run(write, cwd=ROOT, check=True, capture_output=True)
        for kind, what in (
            ("small", "the loss (a scalar)"),
            ("big", "a 1.6 MB weight, each value dropped once read,"),
            ("big-kept", "a 1.6 MB weight, every value kept,"),
        ):
            timings = harness.interleave(_readers(kind, ours, theirs), rounds=rounds, block=1 if quick else BLOCK[kind])
            rows += harness.rows(f"read {what} over {steps} steps", timings, unit="ms_per_read")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["read"]:
        read_workload.main(_hook, _read)
    elif sys.argv[1:2] == ["floor"]:
        print(_floor_read(sys.argv[2], int(sys.argv[3])))
    else:
        for row in run():
            print(row)

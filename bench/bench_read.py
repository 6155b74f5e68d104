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
read creates a fresh trial; both trials are in the page cache (read once after writing,
untimed). ``ratio`` is time over tensortap's, so smdebug's row holds the figure
of the target. Without smdebug's environment (``TENSORTAP_SMDEBUG_PYTHON``
unset, as outside ``nox -s bench``) only tensortap's rows are measured.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def _cache(root: Path) -> None:
    """Read every file under ``root`` once, so that both libraries' trials are read from the page
    cache: tensortap drops a shard's pages once it is published (``storage.drop_cached_pages``),
    smdebug leaves its files cached."""
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with path.open("rb") as f:
                while f.read(1 << 22):
                    pass


def _readers(kind: str, ours: str, theirs: str) -> dict[str, Callable[[], harness.Arm]]:
    """The arms reading the tensor of ``kind``: tensortap twice, smdebug where its environment is known."""
    argv = {
        harness.BASELINE: [sys.executable, "-m", "bench.bench_read", "read", ours, kind],
        harness.BASELINE_2: [sys.executable, "-m", "bench.bench_read", "read", ours, kind],
    }
    if SMDEBUG_PYTHON:
        argv["smdebug"] = [SMDEBUG_PYTHON, "-m", "bench.bench_read_smdebug", "read", theirs, kind]
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
        _cache(root)
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
    else:
        for row in run():
            print(row)

"""Reductions of a raw tensor into pandas, against reading its raw values.

One float32 tensor of ``SHAPE`` saved raw at ``STEPS`` steps (one shard).
``Tensor.values()`` reads every value (one read per shard);
``Trial.to_pandas(names=[name], reductions=REDUCTIONS)`` reads the same shard
once and computes the reductions of every step with the formulas of
``tensortap.reductions``. Each timing opens a fresh trial; the best of
``REPEATS`` counts. The target is a ratio within 3.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import tensortap
from tensortap.capture import Writer

STEPS = 1000
SHAPE = (64, 64)
REDUCTIONS = ["mean"]
REPEATS = 5
NAME = "layer/weight"


def _best(fn: Any, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Time ``values()`` and ``to_pandas(reductions=...)`` on one raw tensor; return the table rows.

    ``quick``: 50 steps, once (checks that the benchmark runs).
    """
    steps, repeats = (50, 1) if quick else (STEPS, REPEATS)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rng = np.random.default_rng(0)
        with Writer(root) as w:
            for _ in range(steps):
                with w.stepping():
                    w.save(NAME, rng.standard_normal(SHAPE, dtype=np.float32), ["weights"])

        def values() -> None:
            with tensortap.create_trial(root) as trial:
                assert len(trial.tensor(NAME).values()) == steps

        def frame() -> None:
            with tensortap.create_trial(root) as trial:
                assert len(trial.to_pandas(names=[NAME], reductions=REDUCTIONS, progress=False)) == steps

        base = _best(values, repeats)
        pandas_s = _best(frame, repeats)
    case = f"1 tensor {'x'.join(map(str, SHAPE))} float32 x {steps} steps"
    return [
        {"benchmark": case, "case": "Tensor.values()", "seconds": base, "ratio": 1.0},
        {
            "benchmark": case,
            "case": f"to_pandas(reductions={REDUCTIONS})",
            "seconds": pandas_s,
            "ratio": pandas_s / base,
        },
    ]


if __name__ == "__main__":
    for row in run():
        print(row)

"""Reductions of a raw tensor into pandas, against reading its raw values.

One float32 tensor of ``SHAPE`` saved raw at ``STEPS`` steps (one shard).
Arms (:mod:`bench.harness`, one read per unit, ``ROUNDS`` interleaved blocks
of one): ``Tensor.values()``, which reads every value (one read per shard),
twice (the baseline and the run's noise); and
``Trial.to_pandas(names=[name], reductions=REDUCTIONS)``, which reads the same
shard once and computes the reductions of every step with the formulas of
``tensortap.reductions``. Every read opens a fresh trial. ``ratio`` is the
time over ``values()``'s.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import tensortap
from bench import harness
from tensortap.capture import Writer

STEPS = 1000
SHAPE = (64, 64)
REDUCTIONS = ["mean"]
ROUNDS = 10
NAME = "layer/weight"


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Time ``values()`` and ``to_pandas(reductions=...)`` on one raw tensor; return the table rows.

    ``quick``: 50 steps, two rounds (checks that the benchmark runs).
    """
    steps, rounds = (50, 2) if quick else (STEPS, ROUNDS)
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

        arms: dict[str, Callable[[], harness.Arm]] = {
            harness.BASELINE: lambda: harness.Repeat(values),
            harness.BASELINE_2: lambda: harness.Repeat(values),
            f"to_pandas(reductions={REDUCTIONS})": lambda: harness.Repeat(frame),
        }
        timings = harness.interleave(arms, rounds=rounds, block=1, warmup=1)
    benchmark = f"1 tensor {'x'.join(map(str, SHAPE))} float32 x {steps} steps"
    return harness.rows(benchmark, timings, unit="ms_per_read")


if __name__ == "__main__":
    for row in run():
        print(row)

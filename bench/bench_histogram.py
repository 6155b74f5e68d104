"""Cost of the histogram reduction next to raw capture, with the NumPy ``Writer``.

``TENSORS`` float32 tensors of ``SHAPE`` saved at every step with the NumPy
:class:`tensortap.capture.Writer` (the NumPy formulas, the path of any
adapter without an on-device histogram). Arms (:mod:`bench.harness`, each its
own writer, ``BLOCK`` steps at a time, ``ROUNDS`` interleaved blocks,
``close()`` timed with its arm): raw tensors, twice (the baseline and the
run's noise); a 64-bin histogram only (``ReductionConfig(histogram=64)``); a
histogram plus ``mean`` and ``l2``. ``ratio`` is against raw capture;
``MB_on_disk`` is what the arm's trial holds at the end. The PyTorch-level
figure of the target (histograms of every weight and gradient of the MLP) is
in the ``torch`` table.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench import harness
from bench.bench_io import WriterArm
from tensortap import ReductionConfig

BLOCK = 10
ROUNDS = 10
TENSORS = 10
SHAPE = (256, 256)
CASES: dict[str, ReductionConfig | None] = {
    harness.BASELINE: None,
    harness.BASELINE_2: None,
    "histogram=64 only": ReductionConfig(histogram=64),
    "histogram=64 + mean, l2": ReductionConfig(reductions=("mean",), norms=("l2",), histogram=64),
}


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Time each case; return the table rows. ``quick``: two blocks of two steps (checks that it runs)."""
    rounds, block = (2, 2) if quick else (ROUNDS, BLOCK)
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(SHAPE, dtype=np.float32) for _ in range(TENSORS)]
    root = Path(tempfile.mkdtemp(prefix="tensortap-bench-histogram-"))
    dirs = {name: root / str(i) for i, name in enumerate(CASES)}
    try:
        arms: dict[str, Callable[[], harness.Arm]] = {
            name: functools.partial(WriterArm, dirs[name], arrays, config) for name, config in CASES.items()
        }
        timings = harness.interleave(arms, rounds=rounds, block=block, warmup=1)
        on_disk = {name: sum(f.stat().st_size for f in d.rglob("*.h5")) / 1e6 for name, d in dirs.items()}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    mb = TENSORS * int(np.prod(SHAPE)) * 4 / 1e6
    benchmark = f"{TENSORS} tensors {'x'.join(map(str, SHAPE))} float32 ({mb:.1f} MB) per step"
    rows = harness.rows(benchmark, timings, unsettled=False)
    for row in rows:
        row["MB_on_disk"] = on_disk[str(row["case"])]
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)

"""Cost of the histogram reduction next to raw capture, with the NumPy ``Writer``.

``TENSORS`` float32 tensors of ``SHAPE`` saved at each of ``STEPS`` steps with
the NumPy :class:`tensortap.capture.Writer` (the NumPy formulas, the path of
any adapter without an on-device histogram): raw tensors; a 64-bin histogram
only (``ReductionConfig(histogram=64)``); a histogram plus ``mean`` and ``l2``.
Time includes ``close()``; the best of ``REPEATS`` interleaved runs counts.
``ratio`` is against raw capture.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from tensortap import ReductionConfig
from tensortap.capture import Writer

STEPS = 100
TENSORS = 10
SHAPE = (256, 256)
REPEATS = 3
CASES: dict[str, ReductionConfig | None] = {
    "raw tensors": None,
    "histogram=64 only": ReductionConfig(histogram=64),
    "histogram=64 + mean, l2": ReductionConfig(reductions=["mean"], norms=["l2"], histogram=64),
}


def _size(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*.h5"))


def _write(root: Path, arrays: list[np.ndarray], config: ReductionConfig | None, steps: int) -> float:
    t0 = time.perf_counter()
    with Writer(root, reduction_config=config) as w:
        for _ in range(steps):
            with w.stepping():
                for i, a in enumerate(arrays):
                    w.save(f"layer{i}/weight", a, ["weights"])
    return time.perf_counter() - t0


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Time each case; return the table rows. ``quick``: 10 steps, once (checks that the benchmark runs)."""
    steps, repeats = (10, 1) if quick else (STEPS, REPEATS)
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(SHAPE, dtype=np.float32) for _ in range(TENSORS)]
    best = {name: float("inf") for name in CASES}
    sizes: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for name, config in CASES.items():
                root = Path(tmp) / f"{r}-{len(sizes)}-{name.replace(' ', '_')}"
                os.sync()
                best[name] = min(best[name], _write(root, arrays, config, steps))
                sizes[name] = _size(root)
    base = best["raw tensors"]
    mb = TENSORS * int(np.prod(SHAPE)) * 4 / 1e6
    return [
        {
            "benchmark": f"{TENSORS} tensors {'x'.join(map(str, SHAPE))} float32 ({mb:.1f} MB) x {steps} steps",
            "case": name,
            "ms_per_step": best[name] / steps * 1000,
            "MB_on_disk": sizes[name] / 1e6,
            "ratio": best[name] / base,
        }
        for name in CASES
    ]


if __name__ == "__main__":
    for row in run():
        print(row)

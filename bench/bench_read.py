"""Reading one tensor over 1,000 saved steps: smdebug's trial API against tensortap's, same training.

Each library's own PyTorch hook captures :mod:`bench.read_workload` (a
``Linear(640, 640)``: the loss, a scalar, and the 1.6 MB weight, every step)
into its own trial. Then the readers take turns, ``ROUNDS`` times: tensortap
(``create_trial`` + ``Tensor.values()``), tensortap again (the run's noise),
and smdebug (``create_trial`` + ``value(step)`` for every step, its only way to
read values) in its own environment (a subprocess that times itself, so
starting Python is not counted). ``ratio`` is smdebug's time over tensortap's.
Without smdebug's environment (``TENSORTAP_SMDEBUG_PYTHON`` unset, as outside
``nox -s bench``) only tensortap's rows are measured.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import read_workload

ROUNDS = 5
SMDEBUG_PYTHON = os.environ.get("TENSORTAP_SMDEBUG_PYTHON")
ROOT = Path(__file__).resolve().parent.parent


def _tensortap_hook(model: Any, opt: Any, loss_fn: Any, out_dir: str) -> Any:
    import tensortap
    import tensortap.torch as ttt

    return ttt.capture(
        model,
        out_dir,
        optimizer=opt,
        loss=loss_fn,
        save_config=tensortap.SaveConfig(save_interval=1),
        include_collections=["weights", "losses"],
    )


def _read(path: str, collection: str) -> float:
    import tensortap

    t0 = time.perf_counter()
    trial = tensortap.create_trial(path)
    values = trial.tensor(trial.tensor_names(collection=collection)[0]).values()
    elapsed = time.perf_counter() - t0
    assert len(values) >= 10
    return elapsed


def _smdebug(*args: str) -> str:
    assert SMDEBUG_PYTHON is not None
    done = subprocess.run(
        [SMDEBUG_PYTHON, "-m", "bench.bench_read_smdebug", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Write both trials, read them in turns, return one row per (tensor, reader)."""
    steps = 50 if quick else read_workload.STEPS
    root = Path(tempfile.mkdtemp(prefix="tensortap-bench-read-"))
    try:
        ours, theirs = str(root / "tensortap"), str(root / "smdebug")
        read_workload.train(lambda m, o, lf: _tensortap_hook(m, o, lf, ours), steps)
        if SMDEBUG_PYTHON:
            _smdebug("write", theirs, str(steps))
        times: dict[str, list[float]] = {}
        for _ in range(2 if quick else ROUNDS):
            for kind, collection in (("small", "losses"), ("big", "weights")):
                times.setdefault(f"{kind} tensortap", []).append(_read(ours, collection))
                times.setdefault(f"{kind} tensortap (2nd arm)", []).append(_read(ours, collection))
            if SMDEBUG_PYTHON:
                for kind, seconds in json.loads(_smdebug("read", theirs)).items():
                    times.setdefault(f"{kind} smdebug", []).append(seconds)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows: list[dict[str, Any]] = []
    for kind, what in (("small", "the loss (a scalar)"), ("big", "a 1.6 MB weight")):
        base = sum(times[f"{kind} tensortap"])
        noise = abs(sum(times[f"{kind} tensortap (2nd arm)"]) / base - 1)
        for reader in ("tensortap", "tensortap (2nd arm)", "smdebug"):
            t = times.get(f"{kind} {reader}")
            if t:
                rows.append(
                    {
                        "benchmark": f"read {what} over {steps} steps",
                        "case": reader,
                        "seconds": statistics.median(t),
                        "ratio smdebug/this": sum(times.get(f"{kind} smdebug", [float("nan")])) / sum(t),
                        "noise": noise,
                    }
                )
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)

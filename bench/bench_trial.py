"""Trial metadata at scale, live visibility, and memory while saving every step.

- **Scale**: trials of ``N`` steps x ``TENSORS`` scalar tensors, all TRAIN
  steps (written with the NumPy ``Writer``, 10,000 steps per shard) for two
  ``N``, measured with :mod:`bench.harness` (``ROUNDS`` interleaved blocks, a
  second baseline arm for the run's noise). *Open*, one open per block:
  ``create_trial`` + first ``steps()``, and ``create_trial`` + first
  ``tensor_names(mode=TRAIN)``, against the baseline of parsing the trial's
  index records with ``json.loads`` (the floor of opening it). *Queries* on one
  open trial (refreshing disabled: a refresh is part of the open), ``QUERIES``
  calls per block: ``steps()``, ``tensor_names()``,
  ``tensor_names(mode=TRAIN)`` and one tensor's ``steps(mode=TRAIN)``, against
  the baseline of copying a list of the ``N`` steps (the floor of ``steps()``,
  which returns a new list). ``seconds`` is per open or per call; "flat in
  steps" means the two sizes give about the same time.
- **Live**: a writer process saves a step every 50 ms (default ``ShardPolicy``);
  this process polls a live trial and records how long after its save each
  step became visible (median and max), and how many shards the writer published.
- **Memory**: peak resident memory of the PyTorch MLP of :mod:`bench.bench_torch`
  trained 300 steps in a fresh process, without a hook and with tensortap
  saving weights, biases, gradients and losses every step (with the peak of
  its shard layout process added); the difference, next to the shard budget
  (``ShardPolicy.max_bytes``) and the size of one step's data.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import tensortap
from bench import harness
from tensortap import Mode, Trial

TENSORS = 200
SIZES = (10_000, 100_000)
QUICK_SIZES = (200, 1_000)
CACHED_FROM = 10_000  # trials this large are written once and kept (see _scale_trial)
LIVE_STEPS = 40
ROUNDS = 7  # blocks per arm
QUERIES = 50  # calls per block of a query arm
OPEN = "open (create_trial + first steps())"
ROOT = Path(__file__).resolve().parent.parent


def _write(path: Path, steps: int) -> None:
    from tensortap.capture import ShardPolicy, Writer

    names = [f"layer{i}/value" for i in range(TENSORS)]
    value = np.float32(1.0)
    with Writer(path, shard_policy=ShardPolicy(max_steps=10_000, max_seconds=3600, live_seconds=None)) as w:
        for _ in range(steps):
            with w.stepping():
                for name in names:
                    w.save(name, value)


def _open_arms(path: Path) -> dict[str, Callable[[], harness.Arm]]:
    records = sorted((path / "index").rglob("*.json"))

    def parse() -> None:
        for record in records:
            json.loads(record.read_bytes())

    def open_steps() -> None:
        with tensortap.create_trial(path) as trial:
            trial.steps()

    def open_names() -> None:
        with tensortap.create_trial(path) as trial:
            trial.tensor_names(mode=Mode.TRAIN)

    return {
        harness.BASELINE: lambda: harness.Repeat(parse),
        harness.BASELINE_2: lambda: harness.Repeat(parse),
        OPEN: lambda: harness.Repeat(open_steps),
        "open (create_trial + first tensor_names(mode=TRAIN))": lambda: harness.Repeat(open_names),
    }


def _query_arms(trial: Trial) -> dict[str, Callable[[], harness.Arm]]:
    saved = trial.steps()
    tensor = trial.tensor(trial.tensor_names()[0])
    return {
        harness.BASELINE: lambda: harness.Repeat(saved.copy),
        harness.BASELINE_2: lambda: harness.Repeat(saved.copy),
        "steps()": lambda: harness.Repeat(trial.steps),
        "tensor_names()": lambda: harness.Repeat(trial.tensor_names),
        "tensor_names(mode=TRAIN)": lambda: harness.Repeat(lambda: trial.tensor_names(mode=Mode.TRAIN)),
        "Tensor.steps(mode=TRAIN), one tensor": lambda: harness.Repeat(lambda: tensor.steps(mode=Mode.TRAIN)),
    }


def _scale(root: Path, sizes: tuple[int, ...], rounds: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for steps in sizes:
        if steps >= CACHED_FROM:
            path = _scale_trial(steps)
        else:
            path = root / f"scale-{steps}"
            _write(path, steps)
        bench = f"trial of {steps} steps x {TENSORS} tensors"
        timings = harness.interleave(_open_arms(path), rounds=rounds, block=1)
        rows += harness.rows(f"open a {bench}", timings, unit="seconds", scale=1.0)
        with tensortap.create_trial(path, refresh_interval=math.inf) as trial:
            assert len(trial.steps()) == steps and len(trial.tensor_names(mode=Mode.TRAIN)) == TENSORS
            timings = harness.interleave(_query_arms(trial), rounds=rounds, block=QUERIES, warmup=1)
        rows += harness.rows(bench, timings, unit="seconds", scale=1.0)
        if path.parent == root:
            shutil.rmtree(path)
    return rows


def _scale_trial(steps: int) -> Path:
    """A trial of ``steps`` steps, written once and kept in ``bench/results/`` (writing 100,000 steps takes minutes)."""
    from tensortap.backends.layout import FORMAT_MINOR, FORMAT_VERSION

    path = ROOT / "bench" / "results" / f"scale-{steps}x{TENSORS}-format{FORMAT_VERSION}.{FORMAT_MINOR}"
    if not path.exists():  # written under another name first, so a killed run leaves no half trial
        partial = path.with_name(path.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        _write(partial, steps)
        partial.rename(path)
    return path


LIVE_WRITER = """
import sys, time
import numpy as np
from tensortap.capture import Writer
with Writer(sys.argv[1]) as w:
    print("ready", flush=True)
    for _ in range(int(sys.argv[2])):
        with w.stepping():
            w.save("metrics/saved_at", np.float64(time.time()), ["metrics"])
        time.sleep(0.05)
"""


def _live(root: Path, steps: int) -> list[dict[str, Any]]:
    path = root / "live"
    proc = subprocess.Popen(
        [sys.executable, "-c", LIVE_WRITER, str(path), str(steps)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().startswith("ready")
    trial = tensortap.create_trial(path, wait=True)
    seen: dict[int, float] = {}
    while len(seen) < steps:
        for s in trial.steps():
            seen.setdefault(s, time.time())
        if proc.poll() is not None and len(seen) < steps and trial.training_ended:
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    saved = trial.tensor("metrics/saved_at").values()
    lags = [seen[s] - float(saved[s]) for s in seen if s in saved]
    bench = f"live: a step every 50 ms, {steps} steps"
    return [
        {"benchmark": bench, "case": "seconds from save to visible, median", "seconds": statistics.median(lags)},
        {"benchmark": bench, "case": "seconds from save to visible, max", "seconds": max(lags)},
        {"benchmark": bench, "case": "shards published", "shards": len(list(path.glob("index/worker_0/*.json")))},
    ]


MEMORY_RUN = r"""
import re, sys
import torch
from bench.bench_torch import TrainArm, _tensortap_hook
torch.set_num_threads(1)
arm = TrainArm(_tensortap_hook if sys.argv[1] == "hook" else None, 1, ("weights", "biases", "gradients", "losses"))
arm.run(int(sys.argv[2]))
arm.close()
arm.discard()
from tensortap.backends.shard import LAYOUTS
# VmHWM of this process image (ru_maxrss would also count the parent's pages inherited through fork),
# and of the shard layout process where one ran
peak = 0
for pid in ("self", LAYOUTS.child.pid):
    if pid is not None:
        with open(f"/proc/{pid}/status") as f:
            peak += int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024
print(peak)
"""


def _memory(steps: int) -> list[dict[str, Any]]:
    from tensortap.capture import ShardPolicy

    def peak(arm: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", MEMORY_RUN, arm, str(steps)], cwd=ROOT, capture_output=True, text=True, check=True
        )
        return int(out.stdout.split()[-1])

    bare, hooked = peak("none"), peak("hook")
    step_bytes = 2 * 4 * (784 * 512 + 512 + 512 * 256 + 256 + 256 * 10 + 10)  # weights + gradients, float32
    bench = f"peak memory, torch MLP, {steps} steps, every step saved"
    return [
        {"benchmark": bench, "case": "no hook (MB)", "MB": bare / 1e6},
        {"benchmark": bench, "case": "tensortap, extra (MB)", "MB": (hooked - bare) / 1e6},
        {"benchmark": bench, "case": "shard budget max_bytes (MB)", "MB": ShardPolicy().max_bytes / 1e6},
        {"benchmark": bench, "case": "one step's weights+gradients (MB)", "MB": step_bytes / 1e6},
    ]


PARTS = ("scale", "live", "memory")


def run(quick: bool = False, parts: tuple[str, ...] = PARTS) -> list[dict[str, Any]]:
    """Measure and return one row per figure of ``parts`` (all by default)."""
    root = Path(tempfile.mkdtemp(prefix="tensortap-bench-trial-"))
    try:
        rows = _scale(root, QUICK_SIZES if quick else SIZES, 2 if quick else ROUNDS) if "scale" in parts else []
        rows += _live(root, 10 if quick else LIVE_STEPS) if "live" in parts else []
        rows += _memory(30 if quick else 300) if "memory" in parts else []
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


if __name__ == "__main__":  # python -m bench.bench_trial [--quick] [--part scale,live,memory]
    chosen = tuple(sys.argv[sys.argv.index("--part") + 1].split(",")) if "--part" in sys.argv else PARTS
    for row in run(quick="--quick" in sys.argv, parts=chosen):
        print(json.dumps(row))

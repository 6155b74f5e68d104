"""Cost of the Keras callback on a small ``fit``, against the same ``fit`` without it, per Keras backend.

An MLP 784-512-256-10 (535k parameters), batch 64, SGD, ``STEPS`` steps of one
``fit`` in Keras's default compiled mode, one CPU thread. The time per step is
measured from the start of step ``SKIP`` (after tracing and compiling) to the
end of ``fit``, which includes publishing the last shard. Cases: no callback;
a no-op callback that overrides ``on_train_batch_end`` (which turns Keras's
asynchronous batch-end dispatch off on the torch and JAX backends; tensortap's
callback overrides no batch-end method); tensortap saving weights, biases,
gradients and losses (raw tensors) every step and every 100 steps; and with
every layer's outputs too, every step. Cases are interleaved and their order
rotated between ``REPEATS`` rounds; the best run of each counts. The backend
Keras was imported with runs in this process, the other installed backends in
subprocesses with ``KERAS_BACKEND`` set.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

STEPS = 300
SKIP = 20
BATCH = 64
REPEATS = 2
BACKENDS = ("tensorflow", "torch", "jax")
BASIC = ("weights", "biases", "gradients", "losses")
# (case, save interval or "noop" or None for no callback, collections)
CASES: list[tuple[str, int | str | None, Sequence[str]]] = [
    ("no callback", None, ()),
    ("no-op callback with on_train_batch_end (sync dispatch)", "noop", ()),
    ("tensortap: weights+biases+gradients+losses, every step", 1, BASIC),
    ("tensortap: weights+biases+gradients+losses, every 100 steps", 100, BASIC),
    ("tensortap: weights+biases+gradients+losses+outputs, every step", 1, (*BASIC, "outputs")),
]


def _single_thread() -> None:
    import keras

    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        torch.set_num_threads(1)
    elif backend == "tensorflow":
        import tensorflow as tf

        try:
            tf.config.threading.set_intra_op_parallelism_threads(1)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:  # TensorFlow already running
            pass


def seconds_per_step(interval: int | str | None, collections: Sequence[str], x: Any, y: Any) -> float:
    """Seconds per step of one ``fit`` (steps ``SKIP`` to the end, including the callback's close)."""
    import keras

    import tensortap
    import tensortap.keras as ttk

    class Timer(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            if batch == SKIP:
                self.t0 = time.perf_counter()

        def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
            self.t1 = time.perf_counter()

    class NoOp(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            pass

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(512, activation="relu"),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.01), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    out_dir = tempfile.mkdtemp(prefix="tensortap-bench-")
    try:
        callbacks: list[Any] = []
        if interval == "noop":
            callbacks.append(NoOp())
        elif interval is not None:
            callbacks.append(
                ttk.Callback(
                    out_dir,
                    save_config=tensortap.SaveConfig(save_interval=int(interval)),
                    include_collections=list(collections),
                )
            )
        timer = Timer()
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[*callbacks, timer])
        return (timer.t1 - timer.t0) / (STEPS - SKIP)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def measure() -> list[dict[str, Any]]:
    """Time every case of :data:`CASES` on the backend Keras runs on in this process."""
    import keras
    import numpy as np

    _single_thread()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(STEPS * BATCH, 784)).astype("float32")
    y = rng.integers(0, 10, STEPS * BATCH)
    best = {case: float("inf") for case, _, _ in CASES}
    for r in range(REPEATS):
        for case, interval, collections in CASES[r % len(CASES) :] + CASES[: r % len(CASES)]:
            best[case] = min(best[case], seconds_per_step(interval, collections, x, y))
    base = best["no callback"]
    name = f"keras ({keras.backend.backend()}) MLP 784-512-256-10, batch 64"
    return [
        {"benchmark": name, "case": case, "ms_per_step": best[case] * 1e3, "ratio": best[case] / base}
        for case, _, _ in CASES
    ]


def _in_subprocess(backend: str) -> list[dict[str, Any]]:
    env = dict(os.environ, KERAS_BACKEND=backend)
    if backend == "jax":
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_keras", "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"bench_keras with KERAS_BACKEND={backend} failed:\n{proc.stderr[-2000:]}")
    return list(json.loads(proc.stdout.strip().splitlines()[-1]))


def run() -> list[dict[str, Any]]:
    """One row per backend and case: ms per step and the ratio to no callback.

    The backend of this process first (TensorFlow unless ``KERAS_BACKEND`` says
    otherwise), then every other installed backend in a subprocess.
    """
    import keras

    here = keras.backend.backend()
    rows = measure()
    for backend in BACKENDS:
        if backend != here and importlib.util.find_spec(backend) is not None:
            rows += _in_subprocess(backend)
    return rows


def show(rows: list[dict[str, Any]]) -> None:
    """Print rows as a small table."""
    for row in rows:
        print(f"{row['benchmark']:45s} {row['case']:66s} {row['ms_per_step']:7.2f} ms/step  x{row['ratio']:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="measure this process's backend only; print JSON rows")
    if parser.parse_args().json:
        print(json.dumps(measure()))
    else:
        show(run())

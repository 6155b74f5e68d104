"""Cost of the Keras callback on a small ``fit``, against the same ``fit`` without it, per Keras backend.

An MLP 784-512-256-10 (535k parameters), batch 64, SGD, one ``fit`` per arm in
Keras's default compiled mode, one CPU thread. Every arm's ``fit`` runs in a
thread of its own, held by a gate callback at batch begins; the arms run
``BLOCK`` steps at a time in turns (``ROUNDS`` blocks each, ``JAX_ROUNDS`` on
JAX, whose steps are short) (:mod:`bench.harness`), after ``WARMUP``
untimed steps (tracing, compiling, the first shards) and after one short untimed ``fit`` run to its
end (the first end of a fit pays a one-time cost); at the end of each block a tensortap arm
publishes what it holds and waits for it (timed with the block, and reported apart: ``ratio,
settle left out``), and the end of ``fit`` (tensortap publishes its last shard there) is timed
with its arm. Arms: no callback, twice (the run's
noise); a no-op callback that overrides ``on_train_batch_end`` (which turns Keras's
asynchronous batch-end dispatch off on the torch and JAX backends; tensortap's
callback overrides no batch-end method); tensortap saving weights, biases,
gradients and losses (raw tensors) every step and every 100 steps; and with
every layer's outputs too, every step. The backend
Keras was imported with runs in this process, the other installed backends in
subprocesses with ``KERAS_BACKEND`` set.

On TensorFlow every arm is fed a ``tf.data.Dataset`` of the same batches with
tf.data's autotuning off (no background thread): with Keras's own pipeline for
arrays, the end of an arm's ``fit`` (timed with it) sometimes waited seconds,
GIL held, for the epoch iterator's tf.data threads to end
(``bench/profiles/keras.md``, "The TensorFlow fit-end stall"). On JAX, which
dispatches steps asynchronously, each block ends when the arm's steps are computed.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from bench import harness

BATCH = 64
BLOCK = 100  # steps: each block pays once the wait for its last shard (the settle), a quarter of what 25 did
# the timed steps are a multiple of 100, so that the every-100-steps arm saves as often in them
# wherever they start (6 and 12 saves)
ROUNDS = 6
JAX_ROUNDS = 12  # JAX's bare step is 2-3.5 ms here: 10 blocks of 25 gave 95% intervals of +-15%
WARMUP = 75  # untimed steps: tracing, and four shards of the every-step arms (their pool of arrays is full)
WARM_FIT = 7  # steps of the untimed fit run to its end first
BACKENDS = ("tensorflow", "torch", "jax")
BASIC = ("weights", "biases", "gradients", "losses")
# (case, save interval or "noop" or None for no callback, collections)
CASES: list[tuple[str, int | str | None, Sequence[str]]] = [
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


def _tf_batches(x: Any, y: Any) -> Any:
    """``(x, y)`` in batches of :data:`BATCH` as a ``tf.data.Dataset`` with no background thread
    (no autotuning, prefetch or parallel map)."""
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    options.experimental_optimization.apply_default_optimizations = False
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).with_options(options)


class FitArm(harness.GatedThread):
    """One ``fit`` (a fresh model, its callbacks), held at batch begins by a gate callback."""

    def __init__(self, interval: int | str | None, collections: Sequence[str], x: Any, y: Any) -> None:
        import keras

        import tensortap
        import tensortap.keras as ttk

        gate = self.gate

        class Gate(keras.callbacks.Callback):
            def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
                gate()

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
        self.out_dir = tempfile.mkdtemp(prefix="tensortap-bench-")
        callbacks: list[Any] = [Gate()]
        self.capture: ttk.Callback | None = None
        if interval == "noop":
            callbacks.append(NoOp())
        elif interval is not None:
            self.capture = ttk.Callback(
                self.out_dir,
                save_config=tensortap.SaveConfig(save_interval=int(interval)),
                include_collections=list(collections),
            )
            callbacks.append(self.capture)
        tf_data = _tf_batches(x, y) if keras.backend.backend() == "tensorflow" else None
        self.jax = keras.backend.backend() == "jax"

        def train() -> None:
            if tf_data is not None:
                model.fit(tf_data, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
            else:
                model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)

        super().__init__(train)

    def run(self, n: int) -> None:
        """Let ``n`` steps through and wait for them, on JAX until they are computed: JAX dispatches
        asynchronously, so without this an arm's last steps would run in the next arm's block (the
        noise of 0.5 read before), or in its settle."""
        super().run(n)
        if self.jax:
            import jax

            jax.block_until_ready(jax.live_arrays())  # the other arms' are ready: their blocks ended so

    def settle(self) -> None:
        """Publish what the callback holds and wait until it is published (see :func:`bench.harness.settle`)."""
        writer = None if self.capture is None else self.capture.hook.writer
        if writer is not None:
            writer.flush()

    def discard(self) -> None:
        """Remove the trials (untimed: see :func:`bench.harness.discard`)."""
        shutil.rmtree(self.out_dir, ignore_errors=True)


def measure(quick: bool = False) -> list[dict[str, Any]]:
    """Time every case of :data:`CASES`, interleaved, on the backend Keras runs on in this process."""
    import keras
    import numpy as np

    _single_thread()
    rounds = JAX_ROUNDS if keras.backend.backend() == "jax" else ROUNDS
    rounds, block, warmup = (2, 5, 5) if quick else (rounds, BLOCK, WARMUP)
    steps = warmup + rounds * block + 2
    rng = np.random.default_rng(0)
    x = rng.normal(size=(steps * BATCH, 784)).astype("float32")
    y = rng.integers(0, 10, steps * BATCH)
    # one short fit to its end, untimed: the first end of a fit in a process pays a one-time cost
    # (164 ms on JAX, measured), which the arm closed first would otherwise be billed for
    warm = FitArm(None, (), x[: WARM_FIT * BATCH], y[: WARM_FIT * BATCH])
    warm.close()
    warm.discard()
    arms: dict[str, Callable[[], harness.Arm]] = {
        harness.BASELINE: lambda: FitArm(None, (), x, y),
        harness.BASELINE_2: lambda: FitArm(None, (), x, y),
    }
    for case, interval, collections in CASES:
        arms[case] = functools.partial(FitArm, interval, collections, x, y)
    timings = harness.interleave(arms, rounds=rounds, block=block, warmup=warmup)
    return harness.rows(f"keras ({keras.backend.backend()}) MLP 784-512-256-10, batch 64", timings)


def _in_subprocess(backend: str, quick: bool) -> list[dict[str, Any]]:
    env = dict(os.environ, KERAS_BACKEND=backend)
    if backend == "jax":
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_keras", "--json", *(["--quick"] if quick else [])],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"bench_keras with KERAS_BACKEND={backend} failed:\n{proc.stderr[-2000:]}")
    return list(json.loads(proc.stdout.strip().splitlines()[-1]))


def run(quick: bool = False) -> list[dict[str, Any]]:
    """One row per backend and case: ms per step and the ratio to no callback.

    The backend of this process first (TensorFlow unless ``KERAS_BACKEND`` says
    otherwise), then every other installed backend in a subprocess.
    """
    import keras

    here = keras.backend.backend()
    rows = measure(quick)
    for backend in BACKENDS:
        if backend != here and importlib.util.find_spec(backend) is not None and not quick:
            rows += _in_subprocess(backend, quick)
    return rows


def show(rows: list[dict[str, Any]]) -> None:
    """Print rows as a small table."""
    for row in rows:
        print(f"{row['benchmark']:45s} {row['case']:66s} {row['ms_per_step']:7.2f} ms/step  x{row['ratio']:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="measure this process's backend only; print JSON rows")
    parser.add_argument("--quick", action="store_true", help="two rounds only: check that the benchmark runs")
    args = parser.parse_args()
    if args.json:
        print(json.dumps(measure(args.quick)))
    else:
        show(run(args.quick))

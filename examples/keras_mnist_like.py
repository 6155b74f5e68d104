"""Capture a small Keras 3 training with one callback, then read it back with a Trial.

MNIST-shaped random data (no download), a small CNN, Adam, validation after
each epoch, then ``evaluate`` and ``predict`` with the same callback. Runs in
a few seconds on a CPU with any Keras backend::

    KERAS_BACKEND=tensorflow python examples/keras_mnist_like.py [OUT_DIR]   # or torch, jax
"""

from __future__ import annotations

import sys
import tempfile

import keras
import numpy as np

import tensortap
import tensortap.keras as ttk

EPOCHS = 2
BATCHES = 30
BATCH = 32


def data(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Random 28x28 images whose label is the brightest of ten image bands (learnable)."""
    x = rng.random((n, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, n)
    x[np.arange(n), y * 2 + 4, :, 0] += 0.3
    return x, y


def main(out_dir: str) -> None:
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    (x, y), (xv, yv) = data(rng, BATCHES * BATCH), data(rng, 5 * BATCH)
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(8, 5, strides=2, activation="relu", name="conv"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(64, activation="relu", name="fc1"),
            keras.layers.Dense(10, name="fc2"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    callback = ttk.Callback(
        out_dir,
        save_config=tensortap.SaveConfig(save_interval=10),
        include_collections=["weights", "biases", "gradients", "losses", "outputs", "metrics"],
        close_on_train_end=False,  # evaluate and predict below are captured too
    )
    history = model.fit(
        x, y, batch_size=BATCH, epochs=EPOCHS, validation_data=(xv, yv), callbacks=[callback], verbose=0
    )
    for epoch in range(EPOCHS):
        print(
            f"epoch {epoch}: loss {history.history['loss'][epoch]:.3f}, "
            f"validation accuracy {history.history['val_accuracy'][epoch]:.2f}"
        )
    model.evaluate(xv, yv, batch_size=BATCH, callbacks=[callback], verbose=0)
    model.predict(xv[:BATCH], batch_size=BATCH, callbacks=[callback], verbose=0)
    callback.close()

    trial = tensortap.create_trial(out_dir)
    print(f"\ntrial at {out_dir} ({keras.backend.backend()} backend): modes {[m.name for m in trial.modes()]}")
    for mode in trial.modes():
        print(f"  saved {mode.name} steps: {trial.steps(mode=mode)}")
    for coll in ("weights", "biases", "gradients", "outputs", "losses", "metrics"):
        print(f"  {coll:9s} {trial.tensor_names(collection=coll)}")
    loss = trial.tensor("losses/loss")
    curve = {s: round(float(loss.value(s, mode="train")), 3) for s in loss.steps(mode="train")}
    print(f"per-step training loss (not Keras's running mean): {curve}")
    g = trial.tensor("gradients/fc1/kernel")
    print(f"mean |grad fc1/kernel| at step 0: {g.reduction_value(0, 'mean', abs=True, mode='train'):.2e}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="tensortap-keras-"))

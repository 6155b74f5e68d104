"""The histogram reduction through the Keras callback (binned with NumPy from the host copy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("keras")
import keras

import tensortap
from tensortap import Collection, ReductionConfig, SaveConfig

ttk = pytest.importorskip("tensortap.keras")

pytestmark = [
    pytest.mark.keras,
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
]


def test_keras_weights_histograms_equal_numpy_on_keras_weights(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((48, 5)).astype("float32"), rng.standard_normal((48, 1)).astype("float32")
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(7, activation="relu"), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    weights = Collection("weights", reduction_config=ReductionConfig(histogram=8))
    final: list[list[np.ndarray]] = []

    class Last(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: object = None) -> None:
            final.append([np.array(w) for w in self.model.get_weights()])

    cb = ttk.Callback(
        tmp_path, save_config=SaveConfig(save_interval=1), include_collections=["weights"],
        collection_configs={"weights": weights},
    )  # fmt: skip
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, callbacks=[cb, Last()], verbose=0)
    trial = tensortap.create_trial(tmp_path)
    kernel = sorted(n for n in trial.tensor_names(collection="weights") if "kernel" in n)[0]  # the first Dense
    t = trial.tensor(kernel)
    steps = t.steps("train")
    assert len(steps) == 3 and not t.has_raw(steps[0], "train")
    first = t.histogram_value(steps[0], "train")
    for s in steps:
        edges, counts = t.histogram_value(s, "train")
        np.testing.assert_array_equal(edges, first.edges)  # fixed from the first saved value
        assert counts.sum() == 5 * 7
    w = final[-1][0].astype(np.float64)  # the first Dense kernel after the last batch, as Keras reports it
    edges, counts = t.histogram_value(steps[-1], "train")
    np.testing.assert_array_equal(counts, np.histogram(np.clip(w, edges[0], edges[-1]), bins=edges)[0])

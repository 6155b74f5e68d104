"""The histogram reduction through the Keras callback on real fits: each histogram against the raw value and Keras."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("keras")
import keras

import tensortap
from tensortap import Collection, ReductionConfig, SaveConfig
from tensortap.capture.testing import numpy_histogram_rule, numpy_rule_edges

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


BINS = 8
RAW_AND_HISTOGRAM = ReductionConfig(save_raw_tensor=True, histogram=BINS)


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_keras_int_ids_embedding_and_a_multi_output_model_raw_and_histograms_in_one_run(
    tmp_path: Path, policy: str
) -> None:
    """Token ids (int64) into an Embedding, an LSTM's tuple output, two heads with two losses; every tensor saved
    raw and as a histogram: each step's histogram is the rule on the raw value of that step, on edges fixed
    from the first; the raw values are compared with what Keras reports (the batch, the weights)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 20, (24, 5)).astype("int64")
    y_reg, y_cls = rng.standard_normal((24, 1)).astype("float32"), rng.integers(0, 3, (24,)).astype("int32")
    inp = keras.Input((5,), dtype="int64", name="ids")
    emb = keras.layers.Embedding(20, 4, name="emb", dtype=policy)(inp)
    # use_cudnn=False: on a GPU, JAX's cuDNN LSTM takes no bfloat16
    seq, h, c = keras.layers.LSTM(6, return_state=True, name="lstm", dtype=policy, use_cudnn=False)(emb)
    merged = keras.layers.Concatenate(name="cat", dtype=policy)([seq, h, c])
    reg = keras.layers.Dense(1, name="reg", dtype=policy)(merged)
    cls = keras.layers.Dense(3, activation="softmax", name="cls", dtype=policy)(merged)
    model = keras.Model(inp, [reg, cls])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=["mse", "sparse_categorical_crossentropy"])
    colls = ["weights", "biases", "gradients", "outputs", "inputs", "losses"]
    before: list[np.ndarray] = []
    after: list[list[np.ndarray]] = []

    # on JAX, Keras's Variables hold no value inside fit (its state lives in the trainer): no reading them there
    readable = keras.backend.backend() != "jax"

    class Seen(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch: int, logs: object = None) -> None:
            if readable:
                before.append(np.array(model.get_layer("emb").embeddings))

        def on_train_batch_end(self, batch: int, logs: object = None) -> None:
            if readable:
                after.append([np.array(w) for w in model.get_weights()])

    cb = ttk.Callback(
        tmp_path, save_config=SaveConfig(save_interval=1), include_collections=colls,
        collection_configs={c: Collection(c, reduction_config=RAW_AND_HISTOGRAM) for c in colls},
    )  # fmt: skip
    model.fit(ids, [y_reg, y_cls], batch_size=8, epochs=1, shuffle=False, callbacks=[cb, Seen()], verbose=0)
    trial = tensortap.create_trial(tmp_path)
    names = set(trial.tensor_names())
    wanted = {"inputs/emb", "outputs/emb", "outputs/reg", "outputs/cls", "losses/reg_loss", "losses/cls_loss"}
    assert wanted | {f"outputs/lstm/{i}" for i in range(3)} <= names
    half = "bfloat16" if policy == "mixed_bfloat16" else None
    assert trial.tensor("outputs/emb").summary()["orig_dtype"] == half
    as_backend = np.asarray(keras.ops.convert_to_tensor(ids)).dtype  # int64; int32 on JAX without x64
    assert trial.tensor("inputs/emb").summary()["dtype"] == as_backend.name
    weights = {v.path: i for i, v in enumerate(model.weights)}
    for step in range(3):
        batch = ids[step * 8 : (step + 1) * 8]
        np.testing.assert_array_equal(trial.tensor("inputs/emb").value(step), batch)
        ids_hist = trial.tensor("inputs/emb").histogram_value(step)  # the histogram of integers
        np.testing.assert_array_equal(ids_hist.counts, numpy_histogram_rule(batch, ids_hist.edges))
        if not readable:
            continue
        looked_up = before[step][batch]  # the embedding rows of the batch, as the layer computes them
        if half:
            looked_up = np.array(keras.ops.cast(keras.ops.cast(looked_up, "bfloat16"), "float32"))
        np.testing.assert_array_equal(trial.tensor("outputs/emb").value(step), looked_up)
        for path, i in weights.items():
            np.testing.assert_array_equal(trial.tensor(path).value(step), after[step][i], err_msg=path)
    for name in names:
        t = trial.tensor(name)
        assert t.steps() == [0, 1, 2], name
        edges = numpy_rule_edges(t.value(0), BINS)
        assert edges is not None, name
        for step in range(3):
            hist = t.histogram_value(step)
            np.testing.assert_array_equal(hist.edges, edges, err_msg=f"{name} {step}")
            np.testing.assert_array_equal(hist.counts, numpy_histogram_rule(t.value(step), edges), f"{name} {step}")


def test_keras_gradients_are_captured_before_the_optimizers_own_clipping(tmp_path: Path) -> None:
    """``global_clipnorm`` clips inside ``optimizer.apply``, after the callback took the gradients: the ones saved
    (raw and histogram) are the model's, and Keras's update is them scaled down to the clip norm."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((16, 5)).astype("float32"), rng.standard_normal((16, 1)).astype("float32")
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(1, name="d")])
    lr, clip = 1.0, 0.05  # an update large enough for float32 weights to show it to ~1e-6
    model.compile(optimizer=keras.optimizers.SGD(lr, global_clipnorm=clip), loss="mse")
    before = [np.array(w) for w in model.get_weights()]
    cb = ttk.Callback(
        tmp_path, save_config=SaveConfig(save_interval=1), include_collections=["gradients"],
        collection_configs={"gradients": Collection("gradients", reduction_config=RAW_AND_HISTOGRAM)},
    )  # fmt: skip
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[cb], verbose=0)  # one step
    after = [np.array(w) for w in model.get_weights()]
    trial = tensortap.create_trial(tmp_path)
    grads = [trial.tensor(f"gradients/d/{n}").value(0).astype(np.float64) for n in ("kernel", "bias")]
    norm = np.sqrt(sum(float(np.sum(g * g)) for g in grads))
    assert norm > 10 * clip  # unclipped
    for g, w0, w1 in zip(grads, before, after, strict=True):
        np.testing.assert_allclose((w0 - w1) / lr, g * (clip / norm), rtol=1e-4, atol=1e-6)
    for name in ("gradients/d/kernel", "gradients/d/bias"):
        t = trial.tensor(name)
        edges = numpy_rule_edges(t.value(0), BINS)
        assert edges is not None
        hist = t.histogram_value(0)
        np.testing.assert_array_equal(hist.edges, edges)
        np.testing.assert_array_equal(hist.counts, numpy_histogram_rule(t.value(0), edges))

"""The Keras 3 callback, on real tiny models, under whatever ``KERAS_BACKEND`` is set.

Run once per backend::

    KERAS_BACKEND=tensorflow pytest tests/capture/test_keras.py
    KERAS_BACKEND=torch pytest tests/capture/test_keras.py
    KERAS_BACKEND=jax pytest tests/capture/test_keras.py

The reference values come from Keras itself (a recording callback) and from
NumPy recomputations of the same layers and loss.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("keras")

import keras

import tensortap
from tensortap import Mode, SaveConfig

ttk = pytest.importorskip("tensortap.keras")

from keras.src.utils.python_utils import is_default  # noqa: E402

pytestmark = [
    pytest.mark.keras,
    # Keras's torch backend converts tensors with np.array(), which NumPy 2 warns about
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
]

BACKEND = keras.backend.backend()
LR = 0.1
BATCH = 16
ALL = ["weights", "biases", "gradients", "outputs", "inputs", "losses", "metrics", "optimizer_variables"]
EVERY_STEP = SaveConfig(save_interval=1)

if BACKEND == "torch":
    import torch

    torch.set_num_threads(1)
elif BACKEND == "tensorflow":
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # TensorFlow already started in this process
        pass

RNG = np.random.default_rng(7)
X = RNG.normal(size=(48, 6)).astype("float32")
Y = RNG.normal(size=(48, 1)).astype("float32")
XV = RNG.normal(size=(32, 6)).astype("float32")
YV = RNG.normal(size=(32, 1)).astype("float32")

# how the step function runs: Keras's default, eager, and XLA (TensorFlow only: on JAX
# the default already is XLA, and torch.compile is too slow for a unit test)
RUN_MODES = {"compiled": {}, "eager": {"run_eagerly": True}}
if BACKEND == "tensorflow":
    RUN_MODES["xla"] = {"jit_compile": True}


def mlp(**compile_kw: Any) -> Any:
    """6-5-1 ReLU MLP under plain SGD and MSE."""
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(5, activation="relu", name="dense"),
            keras.layers.Dense(1, name="dense_1"),
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(LR, name="sgd"), loss="mse", metrics=["mae"], **compile_kw)
    return model


def to_numpy(x: Any) -> np.ndarray:
    """A copy on the host, through the framework's own conversion (NumPy's warns on torch tensors)."""
    if BACKEND == "torch":
        return x.detach().cpu().numpy().copy()
    return np.array(x.numpy() if BACKEND == "tensorflow" else x)


def numpy_weights(model: Any) -> list[np.ndarray]:
    return [to_numpy(v.value) for v in model.weights]


def forward(w: list[np.ndarray], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The MLP in NumPy: ``(hidden, output)`` for weights ``[k0, b0, k1, b1]``."""
    hidden = np.maximum(x @ w[0] + w[1], 0.0)
    return hidden, hidden @ w[2] + w[3]


def mse(w: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean((forward(w, x)[1] - y) ** 2))


class Recorder(keras.callbacks.Callback):
    """Keras's own view: the weights after every train batch (the reference)."""

    def __init__(self) -> None:
        super().__init__()
        self.weights: list[list[np.ndarray]] = []

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.initial = numpy_weights(self.model)

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self.weights.append(numpy_weights(self.model))


def values(trial: Any, name: str, mode: Mode = Mode.TRAIN) -> dict[int, np.ndarray]:
    return trial.tensor(name).values(mode=mode)


def assert_model_clean(model: Any) -> None:
    """No wrapper of the callback is left on the model, its optimizer or its layers."""
    for attr in ("train_step", "test_step", "predict_step", "compute_loss"):
        assert attr not in model.__dict__, attr
    assert "apply" not in model.optimizer.__dict__
    for layer in model._flatten_layers(include_self=False, recursive=True):
        assert "call" not in layer.__dict__, layer.name
    assert model.train_function is None and model.test_function is None and model.predict_function is None


# ------------------------------------------------------------------ fit: values
@pytest.fixture(scope="module", params=list(RUN_MODES))
def fitted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One epoch of 3 batches with 2 validation batches, everything saved at every step."""
    out = tmp_path_factory.mktemp(f"keras_{request.param}")
    model = mlp(**RUN_MODES[request.param])
    rec = Recorder()
    cb = ttk.Callback(out, save_config=EVERY_STEP, include_collections=ALL, strict=True)
    history = model.fit(
        X, Y, batch_size=BATCH, epochs=1, shuffle=False, validation_data=(XV, YV), callbacks=[cb, rec], verbose=0
    )
    return {
        "mode": request.param,
        "model": model,
        "rec": rec,
        "cb": cb,
        "history": history.history,
        "trial": tensortap.create_trial(out),
    }


def test_names_steps_and_modes(fitted: dict[str, Any]) -> None:
    trial = fitted["trial"]
    names = set(trial.tensor_names())
    expected = {
        "dense/kernel",
        "dense/bias",
        "dense_1/kernel",
        "dense_1/bias",
        "gradients/dense/kernel",
        "gradients/dense/bias",
        "gradients/dense_1/kernel",
        "gradients/dense_1/bias",
        "losses/loss",
        "losses/val_loss",
        "metrics/mae",
        "metrics/val_mae",
        "optimizer/sgd/iteration",
        "optimizer/sgd/learning_rate",
    }
    expected |= {"outputs/dense", "outputs/dense_1", "inputs/dense", "inputs/dense_1"}
    assert names == expected
    assert trial.steps(mode=Mode.TRAIN) == [0, 1, 2]
    assert trial.steps(mode=Mode.EVAL) == [0, 1]
    assert trial.steps() == [0, 1, 2, 3, 4]
    assert set(trial.collection("biases").tensor_names) >= {"dense/bias", "dense_1/bias"}
    assert "dense/kernel" in trial.collection("weights").tensor_names
    assert trial.training_ended and trial.end_reasons() == {"worker_0": "closed"}


def test_weights_are_those_after_each_step(fitted: dict[str, Any]) -> None:
    trial, rec, model = fitted["trial"], fitted["rec"], fitted["model"]
    names = ["dense/kernel", "dense/bias", "dense_1/kernel", "dense_1/bias"]
    for s, after in enumerate(rec.weights):
        for name, ref in zip(names, after, strict=True):
            np.testing.assert_allclose(trial.tensor(name).value(s, mode=Mode.TRAIN), ref, rtol=1e-6, atol=1e-7)
    for name, ref in zip(names, numpy_weights(model), strict=True):
        np.testing.assert_allclose(trial.tensor(name).value(2, mode=Mode.TRAIN), ref, rtol=1e-6, atol=1e-7)
    iterations = values(trial, "optimizer/sgd/iteration")
    assert {s: int(v) for s, v in iterations.items()} == {0: 1, 1: 2, 2: 3}


def test_gradients_are_the_applied_ones(fitted: dict[str, Any]) -> None:
    trial, rec = fitted["trial"], fitted["rec"]
    names = ["gradients/dense/kernel", "gradients/dense/bias", "gradients/dense_1/kernel", "gradients/dense_1/bias"]
    before = rec.initial
    for s, after in enumerate(rec.weights):
        for name, w0, w1 in zip(names, before, after, strict=True):
            np.testing.assert_allclose(
                trial.tensor(name).value(s, mode=Mode.TRAIN), (w0 - w1) / LR, rtol=1e-4, atol=1e-5
            )
        before = after


def test_raw_loss_outputs_and_inputs_match_numpy(fitted: dict[str, Any]) -> None:
    trial, rec, history = fitted["trial"], fitted["rec"], fitted["history"]
    before = rec.initial
    losses = values(trial, "losses/loss")
    for s, after in enumerate(rec.weights):
        xb, yb = X[s * BATCH : (s + 1) * BATCH], Y[s * BATCH : (s + 1) * BATCH]
        assert float(losses[s]) == pytest.approx(mse(before, xb, yb), rel=1e-5)
        hidden, out = forward(before, xb)
        np.testing.assert_allclose(trial.tensor("inputs/dense").value(s, mode=Mode.TRAIN), xb)
        np.testing.assert_allclose(
            trial.tensor("outputs/dense").value(s, mode=Mode.TRAIN), hidden, rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(trial.tensor("outputs/dense_1").value(s, mode=Mode.TRAIN), out, rtol=1e-5, atol=1e-6)
        before = after
    # the raw per-step loss is not Keras's running mean, which ends in the logs
    assert float(losses[2]) != pytest.approx(float(history["loss"][-1]), rel=1e-3)
    assert float(np.mean([float(v) for v in losses.values()])) == pytest.approx(float(history["loss"][-1]), rel=1e-4)
    assert float(values(trial, "metrics/mae")[2]) == pytest.approx(float(history["mae"][-1]), rel=1e-5)


def test_validation_gives_eval_steps(fitted: dict[str, Any]) -> None:
    trial, rec, history = fitted["trial"], fitted["rec"], fitted["history"]
    final = rec.weights[-1]
    val = values(trial, "losses/val_loss", Mode.EVAL)
    for s in (0, 1):
        xb, yb = XV[s * BATCH : (s + 1) * BATCH], YV[s * BATCH : (s + 1) * BATCH]
        assert float(val[s]) == pytest.approx(mse(final, xb, yb), rel=1e-5)
    assert float(values(trial, "metrics/val_mae", Mode.EVAL)[1]) == pytest.approx(
        float(history["val_mae"][-1]), rel=1e-5
    )
    assert trial.tensor("losses/val_loss").steps(mode=Mode.TRAIN) == []
    np.testing.assert_allclose(
        trial.tensor("outputs/dense_1").value(1, mode=Mode.EVAL), forward(final, XV[BATCH:])[1], rtol=1e-5, atol=1e-6
    )


def test_model_is_clean_after_fit_and_a_later_fit_is_unaffected(fitted: dict[str, Any]) -> None:
    model, trial, cb = fitted["model"], fitted["trial"], fitted["cb"]
    assert_model_clean(model)
    steps_before = trial.steps()
    history = model.fit(X, Y, batch_size=BATCH, epochs=1, verbose=0)
    assert np.isfinite(float(history.history["loss"][-1]))
    assert cb.step == 4  # the callback saw no step of the second fit
    trial.refresh()
    assert trial.steps() == steps_before
    for attr in ("train_step", "compute_loss"):
        assert attr not in model.__dict__


@pytest.mark.skipif(BACKEND != "tensorflow", reason="XLA's static shapes matter for TensorFlow's variables")
def test_xla_with_a_partial_batch_keeps_weights_gradients_and_losses(tmp_path: Path) -> None:
    # 40 rows in batches of 16: Keras traces with an unknown batch dimension, and XLA
    # needs static shapes, so activations are not captured (documented); the rest is
    model = mlp(jit_compile=True)
    rec = Recorder()
    cb = ttk.Callback(
        tmp_path, save_config=EVERY_STEP, include_collections=["weights", "gradients", "outputs", "losses"]
    )
    model.fit(X[:40], Y[:40], batch_size=BATCH, epochs=1, shuffle=False, callbacks=[cb, rec], verbose=0)
    trial = tensortap.create_trial(tmp_path)
    assert "outputs/dense" not in trial.tensor_names()
    assert trial.tensor("losses/loss").steps(mode=Mode.TRAIN) == [0, 1, 2]
    assert trial.tensor("gradients/dense/kernel").steps(mode=Mode.TRAIN) == [0, 1, 2]
    before, after = rec.weights[1], rec.weights[2]
    np.testing.assert_allclose(trial.tensor("dense/kernel").value(2, mode=Mode.TRAIN), after[0], rtol=1e-6)
    np.testing.assert_allclose(
        trial.tensor("gradients/dense/kernel").value(2, mode=Mode.TRAIN),
        (before[0] - after[0]) / LR,
        rtol=1e-4,
        atol=1e-5,
    )
    assert float(trial.tensor("losses/loss").value(2, mode=Mode.TRAIN)) == pytest.approx(
        mse(before, X[32:40], Y[32:40]), rel=1e-5
    )


def test_close_after_a_failed_fit_detaches_from_the_model(tmp_path: Path) -> None:
    class Boom(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            if batch == 1:
                raise RuntimeError("boom")

    model = mlp()
    cb = ttk.Callback(tmp_path, save_config=EVERY_STEP, include_collections=["losses"])
    with pytest.raises(RuntimeError, match="boom"):
        model.fit(X, Y, batch_size=BATCH, epochs=1, callbacks=[cb, Boom()], verbose=0)
    cb.close()
    assert_model_clean(model)
    assert tensortap.create_trial(tmp_path).steps(mode=Mode.TRAIN) == [0]


# ------------------------------------------------------------ configuration
def test_save_config_intervals_start_end_and_modes(tmp_path: Path) -> None:
    model = mlp()
    cb = ttk.Callback(
        tmp_path,
        save_config={
            Mode.TRAIN: SaveConfig(save_interval=2, start_step=1, end_step=5),
            Mode.EVAL: SaveConfig(start_step=3, save_steps=[1]),
        },
        include_collections=["weights", "gradients", "losses"],
        collection_configs={"gradients": {"save_config": SaveConfig(save_interval=3)}},
    )
    model.fit(X, Y, batch_size=BATCH, epochs=2, validation_data=(XV, YV), callbacks=[cb], verbose=0)
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps(mode=Mode.TRAIN) == [0, 1, 3]
    assert trial.tensor("dense/kernel").steps(mode=Mode.TRAIN) == [1, 3]
    assert trial.tensor("losses/loss").steps(mode=Mode.TRAIN) == [1, 3]
    assert trial.tensor("gradients/dense/kernel").steps(mode=Mode.TRAIN) == [0, 3]
    assert trial.tensor("losses/val_loss").steps(mode=Mode.EVAL) == [1, 3]
    assert "outputs/dense" not in trial.tensor_names() and "metrics/mae" not in trial.tensor_names()


def test_default_interval_saves_step_zero_only_and_keeps_async_dispatch(tmp_path: Path) -> None:
    model = mlp()
    cb = ttk.Callback(tmp_path)
    model.fit(X, Y, batch_size=BATCH, epochs=2, callbacks=[cb], verbose=0)
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps(mode=Mode.TRAIN) == [0]
    assert {"dense/kernel", "dense/bias", "gradients/dense/kernel", "losses/loss", "metrics/mae"} <= set(
        trial.tensor_names()
    )
    assert "outputs/dense" not in trial.tensor_names()
    callbacks = keras.callbacks.CallbackList([cb], model=model)
    # the callback overrides no batch-end method, so it never turns Keras's async dispatch off
    # (TensorFlow's backend never dispatches asynchronously)
    assert callbacks._async_train == (BACKEND in ("jax", "torch"))
    assert all(is_default(getattr(cb, m)) for m in ("on_train_batch_end", "on_test_batch_end", "on_predict_batch_end"))


def test_without_keras_the_import_error_says_what_to_install() -> None:
    code = (
        "import sys; sys.modules['keras'] = None\n"
        "try:\n    import tensortap.keras\nexcept ImportError as exc:\n    print(exc)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert 'pip install "tensortap[keras]"' in out.stdout


def test_from_json_builds_a_keras_callback(tmp_path: Path) -> None:
    config = tmp_path / "tensortap.json"
    config.write_text(
        '{"out_dir": "%s", "save_config": {"save_interval": 2}, "include_collections": ["losses"]}' % (tmp_path / "run")
    )
    cb = ttk.Callback.from_json(config)
    assert isinstance(cb, keras.callbacks.Callback) and isinstance(cb, ttk.Callback)
    mlp().fit(X, Y, batch_size=BATCH, epochs=1, callbacks=[cb], verbose=0)
    trial = tensortap.create_trial(tmp_path / "run")
    assert trial.tensor_names() == ["losses/loss"]
    assert trial.steps(mode=Mode.TRAIN) == [0, 2]


@pytest.mark.skipif(BACKEND == "torch", reason="Keras's torch backend requires steps_per_execution=1")
def test_steps_per_execution_one_step_per_execution_with_its_last_batch(tmp_path: Path) -> None:
    model = mlp(steps_per_execution=2)
    x, y = np.concatenate([X, X[:16]]), np.concatenate([Y, Y[:16]])  # 4 batches: 2 executions
    rec = Recorder()
    cb = ttk.Callback(
        tmp_path, save_config=EVERY_STEP, include_collections=["weights", "biases", "gradients", "losses"]
    )
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, callbacks=[cb, rec], verbose=0)
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps(mode=Mode.TRAIN) == [0, 1]
    assert len(rec.weights) == 2
    names = ["dense/kernel", "dense/bias", "dense_1/kernel", "dense_1/bias"]
    for s in (0, 1):
        after = rec.weights[s]
        grads = [trial.tensor(f"gradients/{n}").value(s, mode=Mode.TRAIN) for n in names]
        for n, ref in zip(names, after, strict=True):
            np.testing.assert_allclose(trial.tensor(n).value(s, mode=Mode.TRAIN), ref, rtol=1e-6, atol=1e-7)
        # the saved gradient and loss are those of the execution's last batch (batch 2s+1):
        # undo that batch's SGD update and recompute its loss
        before_last = [w + LR * g for w, g in zip(after, grads, strict=True)]
        b = 2 * s + 1
        loss = float(trial.tensor("losses/loss").value(s, mode=Mode.TRAIN))
        assert loss == pytest.approx(
            mse(before_last, x[b * BATCH : (b + 1) * BATCH], y[b * BATCH : (b + 1) * BATCH]), rel=1e-4
        )


# --------------------------------------------------- other models, other modes
class Block(keras.layers.Layer):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.inner = keras.layers.Dense(4, activation="tanh", name="inner")

    def call(self, x: Any) -> Any:
        return self.inner(x)


def custom_train_step() -> Callable[..., Any]:
    """A user's own train_step for the running backend (it calls compute_loss and the optimizer)."""
    if BACKEND == "jax":
        import jax

        def jax_train_step(self: Any, state: Any, data: Any) -> Any:
            tv, ntv, ov, mv = state
            x, y = data

            def loss_fn(tv: Any, ntv: Any) -> Any:
                y_pred, ntv = self.stateless_call(tv, ntv, x)
                return self.compute_loss(x, y, y_pred), ntv

            (loss, ntv), grads = jax.value_and_grad(loss_fn, has_aux=True)(tv, ntv)
            tv, ov = self.optimizer.stateless_apply(ov, grads, tv)
            return {"loss": loss}, (tv, ntv, ov, mv)

        return jax_train_step

    if BACKEND == "torch":

        def torch_train_step(self: Any, data: Any) -> Any:
            x, y = data
            self.zero_grad()
            loss = self.compute_loss(x, y, self(x, training=True))
            loss.backward()
            weights = self.trainable_weights
            with torch.no_grad():
                self.optimizer.apply([v.value.grad for v in weights], weights)
            return {"loss": loss}

        return torch_train_step

    def tf_train_step(self: Any, data: Any) -> Any:
        x, y = data
        with tf.GradientTape() as tape:
            loss = self.compute_loss(x, y, self(x, training=True))
        weights = self.trainable_weights
        self.optimizer.apply(tape.gradient(loss, weights), weights)
        return {"loss": loss}

    return tf_train_step


class Nested(keras.Model):
    def __init__(self) -> None:
        super().__init__(name="nested")
        self.block = Block(name="block")
        self.head = keras.layers.Dense(1, name="head")

    def call(self, x: Any) -> Any:
        return self.head(self.block(x))


class NestedCustomStep(Nested):
    train_step = custom_train_step()


@pytest.mark.parametrize("run_eagerly", [False, True], ids=["compiled", "eager"])
def test_subclassed_nested_model_with_own_train_step(tmp_path: Path, run_eagerly: bool) -> None:
    keras.utils.set_random_seed(2)
    model = NestedCustomStep()
    model(X[:1])  # build, so that the reference recorder sees the initial weights
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse", run_eagerly=run_eagerly)
    rec = Recorder()
    cb = ttk.Callback(
        tmp_path, save_config=EVERY_STEP, include_collections=["weights", "biases", "gradients", "outputs", "losses"]
    )
    model.fit(X[:32], Y[:32], batch_size=BATCH, epochs=1, shuffle=False, callbacks=[rec, cb], verbose=0)
    trial = tensortap.create_trial(tmp_path)
    assert {
        "block/inner/kernel",
        "head/kernel",
        "gradients/block/inner/kernel",
        "gradients/head/bias",
        "outputs/block",
        "outputs/block/inner",
        "outputs/head",
        "losses/loss",
    } <= set(trial.tensor_names())
    names = [v.path.removeprefix("nested/") for v in model.weights]
    assert len(names) == len(rec.initial) == 4 and len(rec.weights) == 2
    for s, (before, after) in enumerate(zip([rec.initial, *rec.weights], rec.weights, strict=False)):
        for name, w0, w1 in zip(names, before, after, strict=True):
            np.testing.assert_allclose(trial.tensor(name).value(s, mode=Mode.TRAIN), w1, rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(
                trial.tensor(f"gradients/{name}").value(s, mode=Mode.TRAIN), (w0 - w1) / LR, rtol=1e-4, atol=1e-5
            )
        w = dict(zip(names, before, strict=True))
        xb = X[s * BATCH : (s + 1) * BATCH]
        inner = np.tanh(xb @ w["block/inner/kernel"] + w["block/inner/bias"])
        np.testing.assert_allclose(trial.tensor("outputs/block").value(s, mode=Mode.TRAIN), inner, rtol=1e-5, atol=1e-6)
        out = inner @ w["head/kernel"] + w["head/bias"]
        np.testing.assert_allclose(trial.tensor("outputs/head").value(s, mode=Mode.TRAIN), out, rtol=1e-5, atol=1e-6)
        loss = float(trial.tensor("losses/loss").value(s, mode=Mode.TRAIN))
        assert loss == pytest.approx(float(np.mean((out - Y[s * BATCH : (s + 1) * BATCH]) ** 2)), rel=1e-5)
    assert_model_clean(model)


@pytest.mark.parametrize("run_eagerly", [False, True], ids=["compiled", "eager"])
def test_a_layer_called_twice_gives_numbered_outputs(tmp_path: Path, run_eagerly: bool) -> None:
    keras.utils.set_random_seed(3)
    inp = keras.Input((6,))
    shared = keras.layers.Dense(6, activation="tanh", name="shared")
    out = keras.layers.Dense(1, name="head")(shared(shared(inp)))
    model = keras.Model(inp, out, name="twice")
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse", run_eagerly=run_eagerly)
    k, b = (to_numpy(v.value) for v in shared.weights)
    cb = ttk.Callback(tmp_path, save_config=EVERY_STEP, include_collections=["outputs"])
    model.fit(X[:16], Y[:16], batch_size=BATCH, epochs=1, shuffle=False, callbacks=[cb], verbose=0)
    trial = tensortap.create_trial(tmp_path)
    assert set(trial.tensor_names()) == {"outputs/shared:0", "outputs/shared:1", "outputs/head"}
    first = np.tanh(X[:16] @ k + b)
    second = np.tanh(first @ k + b)
    np.testing.assert_allclose(trial.tensor("outputs/shared:0").value(0, mode=Mode.TRAIN), first, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(trial.tensor("outputs/shared:1").value(0, mode=Mode.TRAIN), second, rtol=1e-5, atol=1e-6)


def test_evaluate_and_predict_are_eval_and_predict_steps(tmp_path: Path) -> None:
    model = mlp()
    weights = numpy_weights(model)
    cb = ttk.Callback(tmp_path, save_config=EVERY_STEP, include_collections=["outputs", "losses", "metrics"])
    result = model.evaluate(XV, YV, batch_size=BATCH, callbacks=[cb], verbose=0, return_dict=True)
    pred = model.predict(XV, batch_size=BATCH, callbacks=[cb], verbose=0)
    cb.close()
    assert_model_clean(model)
    trial = tensortap.create_trial(tmp_path)
    assert trial.modes() == [Mode.EVAL, Mode.PREDICT]
    assert trial.steps(mode=Mode.EVAL) == [0, 1] and trial.steps(mode=Mode.PREDICT) == [0, 1]
    val = values(trial, "losses/val_loss", Mode.EVAL)
    assert float(np.mean([float(v) for v in val.values()])) == pytest.approx(float(result["loss"]), rel=1e-5)
    assert float(val[0]) == pytest.approx(mse(weights, XV[:BATCH], YV[:BATCH]), rel=1e-5)
    assert float(values(trial, "metrics/val_mae", Mode.EVAL)[1]) == pytest.approx(float(result["mae"]), rel=1e-5)
    got = values(trial, "outputs/dense_1", Mode.PREDICT)
    np.testing.assert_allclose(np.concatenate([got[0], got[1]]), pred, rtol=1e-5, atol=1e-6)
    assert "losses/val_loss" not in trial.tensor_names(mode=Mode.PREDICT)


def test_stop_request_sets_stop_training(tmp_path: Path) -> None:
    model = mlp()
    cb = ttk.Callback(tmp_path, save_config=EVERY_STEP, include_collections=["losses"])
    tensortap.create_trial(tmp_path).request_stop("rule fired", rule="LossNotDecreasing")
    history = model.fit(X, Y, batch_size=BATCH, epochs=3, callbacks=[cb], verbose=0)
    assert model.stop_training is True
    assert len(history.epoch) == 1
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps(mode=Mode.TRAIN) == [0]
    assert trial.end_reasons() == {"worker_0": "stop_request"}
    assert cb.stop_reason == "rule fired"

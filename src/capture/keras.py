"""Keras 3 adapter: one callback captures a model's tensors from ``fit``, ``evaluate`` and ``predict``.

::

    import tensortap.keras as ttk
    model.fit(x, y, validation_data=(xv, yv), epochs=3,
              callbacks=[ttk.Callback(out_dir, include_collections=["weights", "gradients", "losses"])])

How it works. While the callback is active (from ``on_train_begin``,
``on_test_begin`` or ``on_predict_begin`` to the matching end) it puts
wrappers on the model's *instance*: every sub-layer's ``call`` (outputs,
inputs), ``model.compute_loss`` (the per-step raw loss),
``model.optimizer.apply`` (gradients) and ``model.train_step`` /
``test_step`` / ``predict_step`` (the mode and the metrics the step returns).
It then rebuilds the step function so that the wrappers are traced into it,
and at the end removes every wrapper and drops the step functions so that a
later ``fit`` traces a clean model.

The wrappers hand tensors over in the way the running step allows:

- eager steps (``run_eagerly=True``, the torch backend): directly;
- TensorFlow ``tf.function`` and XLA: into one ``tf.Variable`` per tensor,
  assigned inside the graph under a ``tf.cond`` on a per-collection flag, so
  that unsaved steps copy nothing; read after the step;
- JAX ``jit``: ``jax.debug.callback``; the callback drops the values on
  unsaved steps, and saved steps wait for them with ``jax.effects_barrier``.

Weights, biases and optimizer variables are read after the step (on JAX from
the trainer's live state, since the Variables are stale during ``fit``).
A step is closed when the next one begins (or at the end of the epoch,
evaluation or training), so the callback overrides no ``on_*_batch_end``
method and Keras keeps dispatching batch-end callbacks asynchronously.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np

from .. import reductions as red
from ..modes import Mode
from .core import Hook, TensorOps

try:
    import keras
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise ImportError('tensortap.keras needs Keras 3: pip install "tensortap[keras]"') from _exc
if not keras.__version__.startswith("3."):  # pragma: no cover - depends on the environment
    raise ImportError(f'tensortap.keras needs Keras 3, found keras {keras.__version__}: pip install "tensortap[keras]"')

logger = logging.getLogger("tensortap")

BACKEND = keras.backend.backend()
# collections whose tensors come from inside the step (the others are read after it)
STEP_COLLECTIONS = ("gradients", "outputs", "inputs", "losses", "metrics")
_NOTHING_WANTED = dict.fromkeys(STEP_COLLECTIONS, False)
_NO_FLAGS = np.zeros(len(STEP_COLLECTIONS), dtype=bool)
_NUMPY_DTYPES = frozenset(
    [
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
        "complex64",
        "complex128",
    ]
)

if BACKEND == "tensorflow":
    import tensorflow as tf
elif BACKEND == "jax":
    import jax
elif BACKEND == "torch":
    import torch


def _to_numpy(value: Any) -> np.ndarray:
    """A host array of a backend tensor (through the framework's own conversion)."""
    if BACKEND == "torch" and isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if BACKEND == "tensorflow" and isinstance(value, (tf.Tensor, tf.Variable)):
        return np.asarray(value.numpy())
    return np.asarray(value)


def _is_tracer(value: Any) -> bool:
    return BACKEND == "jax" and isinstance(value, jax.core.Tracer)


def _graph_mode() -> bool:
    return BACKEND == "tensorflow" and not tf.executing_eagerly()


class _Tagged(NamedTuple):
    """A batch and the step's collection flags, as one (JAX pytree) input of the jitted step."""

    data: Any
    flags: np.ndarray


class _FlagIterator:
    """Yields each batch of Keras's JAX data iterator tagged with the callback's current flags."""

    def __init__(self, iterator: Any, callback: Callback) -> None:
        self.iterator = iterator
        self.callback = callback

    def __iter__(self) -> _FlagIterator:
        return self

    def __next__(self) -> _Tagged:
        return _Tagged(next(self.iterator), self.callback._flags_now)


class KerasOps(TensorOps):
    """Reductions with ``keras.ops`` on the tensor's device, then one copy to host.

    JAX values (which arrive on the host through ``jax.debug.callback``) and
    NumPy arrays use the NumPy formulas; TensorFlow and torch tensors are
    reduced on their device. Either way in float64.
    """

    def prepare(
        self, value: Any, keys: Sequence[str], raw: bool
    ) -> tuple[np.ndarray | None, dict[str, float], str | None]:
        if BACKEND == "torch" and isinstance(value, torch.Tensor):
            value = value.detach()
        elif BACKEND == "tensorflow" and isinstance(value, tf.Variable):
            value = tf.convert_to_tensor(value)
        if (
            isinstance(value, (np.ndarray, np.generic, int, float))
            or BACKEND == "jax"
            or not keras.ops.is_tensor(value)
        ):
            host = _to_numpy(value)
            dtype = keras.backend.standardize_dtype(host.dtype)
            orig = None
            if dtype not in _NUMPY_DTYPES:
                host, orig = host.astype(np.float32), dtype
            return (*super().prepare(host, keys, raw)[:2], orig)
        dtype = keras.backend.standardize_dtype(value.dtype)
        orig = None
        if dtype not in _NUMPY_DTYPES:
            value, orig = keras.ops.cast(value, "float32"), dtype
        values: dict[str, float] = {}
        if keys:
            values = self._reduce(value, list(keys))
        copy = np.array(_to_numpy(value), copy=True) if raw else None
        return copy, values, orig

    @staticmethod
    def _reduce(value: Any, keys: list[str]) -> dict[str, float]:
        ops = keras.ops
        if int(np.prod(ops.shape(value))) == 0:
            return red.compute_many(_to_numpy(value), keys)
        x = ops.cast(value, "float64")
        formulas: dict[str, Callable[[Any], Any]] = {
            "min": ops.min,
            "max": ops.max,
            "mean": ops.mean,
            "std": ops.std,
            "variance": ops.var,
            "sum": ops.sum,
            "prod": ops.prod,
            "l1": lambda a: ops.sum(ops.abs(a)),
            "l2": lambda a: ops.sqrt(ops.sum(a * a)),
            "nan_count": lambda a: ops.sum(ops.cast(ops.isnan(a), "float64")),
            "inf_count": lambda a: ops.sum(ops.cast(ops.isinf(a), "float64")),
            "zero_count": lambda a: ops.sum(ops.cast(ops.equal(a, 0), "float64")),
        }
        out = []
        for key in keys:
            name, absolute = red.split_key(key)
            out.append(formulas[name](ops.abs(x) if absolute else x))
        host = _to_numpy(ops.stack(out))
        return {k: float(v) for k, v in zip(keys, host, strict=True)}


class _Patches:
    """Attributes set on object instances, and how to undo them."""

    def __init__(self) -> None:
        self._saved: list[tuple[Any, str, bool, Any]] = []

    def set(self, obj: Any, attr: str, value: Any) -> None:
        had = attr in obj.__dict__
        self._saved.append((obj, attr, had, obj.__dict__.get(attr)))
        object.__setattr__(obj, attr, value)

    def undo(self) -> None:
        while self._saved:
            obj, attr, had, old = self._saved.pop()
            if had:
                object.__setattr__(obj, attr, old)
            else:
                object.__delattr__(obj, attr)


class _TFTap:
    """One captured tensor of a ``tf.function``: a variable holding its value and the step that wrote it."""

    def __init__(self, name: str, collection: str, value: Any, static: bool) -> None:
        self.name = name
        self.collection = collection
        shape = value.shape if static else tf.TensorShape(None)
        init = tf.zeros([d or 0 for d in value.shape] if value.shape.rank is not None else [], value.dtype)
        self.var = tf.Variable(init, shape=shape, trainable=False, dtype=value.dtype)
        self.stamp = tf.Variable(tf.constant(-1, tf.int64), trainable=False)


class _TFGraphTaps:
    """Getting tensors out of TensorFlow graphs (``tf.function``, with or without XLA)."""

    def __init__(self, xla: bool) -> None:
        self.xla = xla
        self.flags = {c: tf.Variable(False, trainable=False) for c in STEP_COLLECTIONS}
        self._wanted = dict.fromkeys(STEP_COLLECTIONS, False)
        self.step = tf.Variable(tf.constant(-1, tf.int64), trainable=False)
        self.taps: dict[tuple[str, Any], _TFTap] = {}
        self.skipped: set[str] = set()

    def set_flags(self, wanted: dict[str, bool], step: int) -> None:
        """Before a step: which collections it saves (assigns only what changed)."""
        for c, w in wanted.items():
            if w != self._wanted[c]:
                self.flags[c].assign(w)
                self._wanted[c] = w
        if any(wanted.values()):
            self.step.assign(step)

    def tap(self, collection: str, items: list[tuple[str, Any]]) -> None:
        """Inside a trace: store ``items`` when the collection's flag is set at run time."""
        pairs = []
        for name, value in items:
            value = tf.convert_to_tensor(value)
            static = self.xla
            if static and not value.shape.is_fully_defined():
                if name not in self.skipped:
                    self.skipped.add(name)
                    logger.warning(
                        "tensortap: %s has no static shape %s under XLA; it is not captured", name, value.shape
                    )
                continue
            key = (name, tuple(value.shape) if static else value.dtype)
            if key not in self.taps:
                with tf.init_scope():
                    self.taps[key] = _TFTap(name, collection, value, static)
            pairs.append((self.taps[key], value))
        if not pairs:
            return

        def save() -> Any:
            for t, v in pairs:
                t.var.assign(v)
                t.stamp.assign(self.step)
            return tf.constant(True)

        tf.cond(self.flags[collection], save, lambda: tf.constant(False))

    def written(self, step: int) -> Iterator[_TFTap]:
        """After a saved step: the taps that step wrote."""
        for t in self.taps.values():
            if self._wanted[t.collection] and int(t.stamp.numpy()) == step:
                yield t


class Callback(keras.callbacks.Callback, Hook):
    """Keras 3 callback that captures tensors into a tensortap trial.

    Pass it to ``fit``, ``evaluate`` or ``predict``; nothing else in the code
    changes. Validation during ``fit`` and ``evaluate`` give EVAL steps,
    ``predict`` PREDICT steps. Names (relative to the model, nested layers by
    path): ``dense/kernel`` (weights), ``dense/bias`` (biases),
    ``gradients/dense/kernel``, ``outputs/dense``, ``inputs/dense``
    (``outputs/dense:0``, ``outputs/dense:1``, ... for a layer called several
    times in one step), ``losses/loss``
    (the step's own loss, TRAIN), ``losses/val_loss`` (EVAL),
    ``metrics/<name>`` and ``metrics/val_<name>`` (what the step returns, as in
    Keras's logs), ``optimizer/<variable path>``.

    Parameters
    ----------
    out_dir
        Local directory or fsspec URL of the trial.
    close_on_train_end
        Close the trial (mark training as ended) when ``fit`` ends. Set False
        to go on capturing ``evaluate``/``predict`` with the same callback,
        then call :meth:`close`.
    **kwargs
        Everything :class:`tensortap.capture.Hook` takes (``save_config``,
        ``include_collections``, ``reduction_config``, ...).

    Notes
    -----
    With ``steps_per_execution=N`` Keras runs N batches between two callback
    calls; each execution is one tensortap step and holds the values of its
    last batch. The stop request of a rule (``control/stop.json`` in the
    trial) sets ``model.stop_training = True``.
    """

    framework = "keras"
    ops = KerasOps()

    def __init__(self, out_dir: str | os.PathLike[str], close_on_train_end: bool = True, **kwargs: Any) -> None:
        keras.callbacks.Callback.__init__(self)
        Hook.__init__(self, out_dir, **kwargs)
        self.close_on_train_end = bool(close_on_train_end)
        self._depth = 0
        self._patches = _Patches()
        self._graph: _TFGraphTaps | None = None
        self._ctx_mode: Mode | None = None
        self._calls: dict[str, int] = {}
        self._traced_names: list[list[str]] = []
        self._arrived: list[tuple[str, list[str], list[Any]]] = []
        self._offered: set[str] = set()
        self._accepting = False
        self._flags_now = _NO_FLAGS
        self._jax_flags: Any = None
        self._prefix = ""

    # ------------------------------------------------------------ lifecycle
    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._enter("train")

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._exit()
        if self.close_on_train_end:
            self.close()

    def on_test_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._enter("test")

    def on_test_end(self, logs: dict[str, Any] | None = None) -> None:
        self._exit()

    def on_predict_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._enter("predict")

    def on_predict_end(self, logs: dict[str, Any] | None = None) -> None:
        self._exit()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._finish_step()

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._begin(Mode.TRAIN)
        if self.should_stop:
            logger.info("tensortap: stop requested (%s); stopping fit", self.stop_reason)
            self._model.stop_training = True

    def on_test_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._begin(Mode.EVAL)

    def on_predict_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._begin(Mode.PREDICT)

    def _enter(self, kind: str) -> None:
        self._finish_step()
        self._depth += 1
        if self._depth > 1:
            return
        model = self._model  # not self.model: on JAX that property syncs the state
        if self.writer is not None and self.writer.closed:
            logger.warning("tensortap: the trial at %s is closed; nothing more is captured", self.out_dir)
        try:
            self._install(model)
        except Exception as exc:
            self._patches.undo()
            self._fail(exc, "cannot attach to the Keras model")
        for fn in ("train_function", "test_function", "predict_function"):
            setattr(model, fn, None)
        getattr(model, f"make_{kind}_function")()

    def _exit(self) -> None:
        self._finish_step()
        self._depth -= 1
        if self._depth > 0:
            return
        self._detach()
        if self.writer is not None and not self.writer.closed:
            self.flush()

    def _detach(self) -> None:
        """Remove every wrapper and drop the model's step functions (they were traced with the wrappers)."""
        self._depth = 0
        self._patches.undo()
        if self._model is not None:
            for fn in ("train_function", "test_function", "predict_function"):
                setattr(self._model, fn, None)

    def close(self, reason: str = "closed") -> None:
        """Publish what is left, mark the end of training and detach from the model. Idempotent.

        ``fit`` calls no callback when it raises: closing the callback then also
        removes the wrappers it left on the model.
        """
        if self._depth:
            self._finish_step()
            self._detach()
        super().close(reason)

    # ----------------------------------------------------------------- steps
    def _begin(self, mode: Mode) -> None:
        self._finish_step()
        self._accepting = False
        saving = self.begin_step(mode)
        self._offered, self._arrived = set(), []
        wanted = {c: self._wants(c) for c in STEP_COLLECTIONS} if saving else _NOTHING_WANTED
        if self._graph is not None:
            self._graph.set_flags(wanted, self.step)
        if BACKEND == "jax":
            self._flags_now = np.array(list(wanted.values()), dtype=bool) if saving else _NO_FLAGS
        if saving and BACKEND == "jax":
            jax.effects_barrier()  # callbacks of an earlier, unsaved step must not land in this one
        self._accepting = True

    def _finish_step(self) -> None:
        if not self._in_step:
            return
        if self.is_saving():
            try:
                self._collect_after_step()
            except Exception as exc:
                self._fail(exc, f"cannot read the tensors of step {self.step}")
        self.end_step()

    def _collect_after_step(self) -> None:
        if BACKEND == "jax":
            jax.effects_barrier()
        arrived, self._arrived = self._arrived, []
        latest = {n: (c, v) for c, names, values in arrived for n, v in zip(names, values, strict=True)}
        for name, (collection, value) in latest.items():  # the last batch of an execution wins
            self._offer_once(name, value, (collection,))
        if self._graph is not None:
            for t in self._graph.written(self.step):
                self._offer_once(t.name, t.var.value(), (t.collection,))
        if self.mode == Mode.TRAIN:
            for name, coll, value in self._variables():
                self._offer_once(name, value, (coll,))

    def _wants(self, collection: str) -> bool:
        """Whether tensors of ``collection`` may be saved at this step (through a regex collection too)."""
        return self.is_saving(collection) or any(self.is_saving(c.name) for c in self._regex_collections)

    def _may_save(self, collection: str) -> bool:
        """Whether ``collection`` is saved at any step (decides which wrappers are installed)."""
        return self.save_all or collection in self.included or bool(self._regex_collections)

    def _offer_once(self, name: str, value: Any, collections: tuple[str, ...]) -> None:
        """Offer ``value``; a later value of the same name in the same step replaces the earlier one."""
        if name in self._offered:
            self._records = [r for r in self._records if r.name != name]
        self._offered.add(name)
        self.offer(name, value, collections)

    # ------------------------------------------------------------- variables
    def _name(self, path: str) -> str:
        return path[len(self._prefix) :] if path.startswith(self._prefix) else path

    def _variables(self) -> Iterator[tuple[str, str, Any]]:
        """``(name, collection, value)`` of the weights and optimizer variables after the step."""
        model = self._model
        state = getattr(model, "_jax_state", None) if BACKEND == "jax" else None
        if getattr(model, "_jax_state_synced", True):
            state = None  # the Variables hold the values

        def values(variables: Sequence[Any], key: str) -> Iterator[tuple[Any, Any]]:
            if state is not None and state.get(key) is not None:
                yield from zip(variables, state[key], strict=True)
            else:
                yield from ((v, v.value) for v in variables)

        if self.is_saving("weights") or self.is_saving("biases") or self._regex_collections or self.save_all:
            for key in ("trainable_variables", "non_trainable_variables"):
                for v, value in values(getattr(model, key), key):
                    if keras.backend.is_float_dtype(v.dtype):
                        coll = "biases" if v.name.endswith("bias") else "weights"
                        yield self._name(v.path), coll, value
        optimizer = getattr(model, "optimizer", None)
        if optimizer is not None and (
            self.is_saving("optimizer_variables") or self._regex_collections or self.save_all
        ):
            for v, value in values(optimizer.variables, "optimizer_variables"):
                yield f"optimizer/{v.path}", "optimizer_variables", value

    # -------------------------------------------------------------- wrappers
    def _install(self, model: Any) -> None:
        self._prefix = f"{getattr(model, 'path', None) or model.name}/"
        self._graph = None
        if BACKEND == "tensorflow" and not model.run_eagerly:
            self._graph = _TFGraphTaps(xla=bool(model.jit_compile))
        for attr, mode in (("train_step", Mode.TRAIN), ("test_step", Mode.EVAL), ("predict_step", Mode.PREDICT)):
            self._patches.set(model, attr, self._wrap_step(getattr(model, attr), mode))
        if self._may_save("losses"):
            self._patches.set(model, "compute_loss", self._wrap_loss(model.compute_loss))
        optimizer = getattr(model, "optimizer", None)
        if optimizer is not None and self._may_save("gradients"):
            self._patches.set(optimizer, "apply", self._wrap_apply(optimizer))
        if BACKEND == "jax":
            self._patches.set(model, "_make_function", self._wrap_make_function(model._make_function))
        if self._may_save("outputs") or self._may_save("inputs"):
            for layer in model._flatten_layers(include_self=False, recursive=True):
                if isinstance(layer, keras.layers.InputLayer):
                    continue
                self._patches.set(layer, "call", self._wrap_call(layer))

    def _wrap_make_function(self, make: Callable[..., Any]) -> Callable[..., Any]:
        """JAX: feed the step's flags into the jitted step with each batch, so that unsaved steps copy nothing."""

        @functools.wraps(make)
        def wrapped(step_function: Callable[..., Any], *args: Any, **kwargs: Any) -> Callable[..., Any]:
            run = make(step_function, *args, **kwargs)

            def tagged(state: Any, iterator: Any) -> Any:
                return run(state, _FlagIterator(iterator, self))

            return tagged

        return wrapped

    @contextmanager
    def _stepping_in(self, mode: Mode, flags: Any) -> Iterator[None]:
        """Run a step function (or trace one) in ``mode``."""
        outer = self._ctx_mode, self._jax_flags
        self._ctx_mode, self._jax_flags, self._calls, self._traced_names = mode, flags, {}, []
        try:
            yield
        finally:
            self._ctx_mode, self._jax_flags = outer

    def _wrap_step(self, step: Callable[..., Any], mode: Mode) -> Callable[..., Any]:
        @functools.wraps(step)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            flags = None
            if len(args) >= 2 and isinstance(args[1], _Tagged):  # JAX: (state, tagged batch)
                flags, args = args[1].flags, (args[0], args[1].data, *args[2:])
            with self._stepping_in(mode, flags):
                out = step(*args, **kwargs)
                logs = out[0] if BACKEND == "jax" else out
                if mode != Mode.PREDICT and isinstance(logs, dict):
                    prefix = "metrics/val_" if mode == Mode.EVAL else "metrics/"
                    self._tap("metrics", [(f"{prefix}{k}", v) for k, v in logs.items() if k != "loss"])
            return out

        return wrapped

    def _wrap_loss(self, compute_loss: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(compute_loss)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            loss = compute_loss(*args, **kwargs)
            if self._ctx_mode in (Mode.TRAIN, Mode.EVAL):
                name = "losses/loss" if self._ctx_mode == Mode.TRAIN else "losses/val_loss"
                self._tap("losses", [(name, loss)])
            return loss

        return wrapped

    def _wrap_apply(self, optimizer: Any) -> Callable[..., Any]:
        apply = optimizer.apply

        @functools.wraps(apply)
        def wrapped(grads: Any, trainable_variables: Any = None) -> Any:
            if self._ctx_mode == Mode.TRAIN:
                variables = trainable_variables if trainable_variables is not None else optimizer._trainable_variables
                self._tap(
                    "gradients",
                    [
                        (f"gradients/{self._name(v.path)}", g)
                        for g, v in zip(grads, variables, strict=True)
                        if g is not None
                    ],
                )
            return apply(grads, trainable_variables)

        return wrapped

    def _wrap_call(self, layer: Any) -> Callable[..., Any]:
        call = layer.call

        @functools.wraps(call)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            out = call(*args, **kwargs)
            if self._ctx_mode is not None:
                # the path, known once the layer is built: "block/inner" for a layer nested in "block"
                path = self._name(getattr(layer, "path", None) or layer.name)
                i = self._calls.get(path, 0)
                self._calls[path] = i + 1
                if i == 1:  # called again in this step: the first call becomes ":0"
                    self._rename(f"outputs/{path}", f"outputs/{path}:0")
                    self._rename(f"inputs/{path}", f"inputs/{path}:0")
                suffix = f":{i}" if i else ""
                if args:
                    self._tap("inputs", _flat(f"inputs/{path}{suffix}", args[0]), hold=True)
                self._tap("outputs", _flat(f"outputs/{path}{suffix}", out), hold=True)
            return out

        return wrapped

    def _tap(self, collection: str, items: list[tuple[str, Any]], hold: bool = False) -> None:
        """Hand ``items`` of ``collection`` over from inside a step, in the way the step allows.

        ``hold``: in an eager step, keep them until the step ends (layer outputs,
        whose names depend on how often the layer is called in the step).
        """
        if not items or not self._may_save(collection):
            return
        names = [n for n, _ in items]
        tensors = [v for _, v in items]
        try:
            if _graph_mode():
                if self._graph is not None:
                    self._graph.tap(collection, items)
            elif any(_is_tracer(v) for v in tensors):
                self._traced_names.append(names)  # renamed in place by _rename
                deliver = functools.partial(self._deliver, collection, names, later=True)
                if self._jax_flags is None:  # a step fed without flags: hand over every time
                    jax.debug.callback(deliver, tensors)
                else:
                    flag = self._jax_flags[STEP_COLLECTIONS.index(collection)]
                    jax.lax.cond(flag, lambda t: jax.debug.callback(deliver, t), lambda t: None, tensors)
            else:
                if hold:
                    self._traced_names.append(names)
                self._deliver(collection, names, tensors, later=hold)
        except Exception as exc:
            self._fail(exc, f"cannot capture {collection} ({items[0][0]}, ...)")

    def _rename(self, base: str, new: str) -> None:
        """Rename the tensors called ``base`` (or ``base/<i>``) captured so far in this step or trace."""

        def renamed(name: str) -> str:
            rest = name[len(base) :] if name.startswith(base) else None
            return new + rest if rest == "" or (rest and rest[0] == "/" and rest[1:].isdigit()) else name

        for names in self._traced_names:
            names[:] = [renamed(n) for n in names]
        if self._graph is not None:
            for t in self._graph.taps.values():
                t.name = renamed(t.name)

    def _deliver(self, collection: str, names: list[str], values: list[Any], later: bool = False) -> None:
        """Offer values handed over in a step, or (``later``) keep them until the step ends.

        JAX callbacks deliver ``later``: they arrive on another thread, and during a
        trace (eager JAX runs ``grad`` as a trace) before a repeated layer call renames them.
        """
        if not (self._accepting and self._in_step and self._wants(collection)):
            return
        if later:
            self._arrived.append((collection, names, values))
            return
        for name, value in zip(names, values, strict=True):
            self._offer_once(name, value, (collection,))


def _flat(name: str, value: Any) -> list[tuple[str, Any]]:
    """``[(name, tensor)]`` for one tensor, ``[(name/0, t0), (name/1, t1), ...]`` for a structure."""
    leaves = [v for v in keras.tree.flatten(value) if v is not None and hasattr(v, "shape")]
    if len(leaves) == 1 and not isinstance(value, (list, tuple, dict)):
        return [(name, leaves[0])]
    return [(f"{name}/{i}", v) for i, v in enumerate(leaves)]


__all__ = ["Callback", "KerasOps"]

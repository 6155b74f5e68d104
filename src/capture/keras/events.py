"""The Keras callback: Keras events (and a loop's own steps) translated into capture calls.

While the callback is active (from ``on_train_begin``, ``on_test_begin`` or
``on_predict_begin`` to the matching end, or from :meth:`Callback.attach` to
:meth:`Callback.close` for a loop of your own) it puts wrappers on the
model's *instance*: every sub-layer's ``call`` (outputs, inputs),
``model.compute_loss`` (the step's loss), ``apply`` of every optimizer of the
model (gradients; a GAN has two) and ``model.train_step`` / ``test_step`` /
``predict_step`` (the mode, and the metrics and losses the step returns); in a
loop of your own, ``train_on_batch`` / ``test_on_batch`` of the model and of the
models nested in it instead (the metrics they return). It also listens to
``keras.metrics.Mean.update_state``: a ``Mean`` named
``...loss`` updated with a scalar is a loss tracker, and the scalar is the
step's loss of that name (Keras's ``loss`` and per-output ``<output>_loss``,
the guides' ``Mean(name="d_loss")``). For ``fit``/``evaluate``/``predict`` it
rebuilds the step function so that the wrappers are traced into it (on
TensorFlow and JAX, compiled: a plain variant and capturing ones, see
:class:`.transport.StepVariants`), and at the end removes every wrapper and
leaves the model the step functions Keras alone would hold (see
:meth:`Callback._leave_step_functions`): a later ``fit`` without the callback runs as
after a ``fit`` without it.

How values leave the step: see :mod:`.transport`. Weights, biases and
optimizer variables are those after the step's update, taken when its step
function returns, before any other callback runs: returned by TensorFlow's
capturing step after its update, on JAX from the state the step returned (the
Variables are stale during ``fit``), otherwise from the Variables (in a loop of
your own, at the block's end). A step is closed when
the next one begins (or at the end of the epoch, evaluation or training), so
the callback overrides no ``on_*_batch_end`` method and Keras keeps
dispatching batch-end callbacks asynchronously.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import sys
import threading
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from types import FrameType
from typing import Any

import keras
import numpy as np

from ...modes import Mode
from ...trial.rules.inprocess import RuleSet
from ..core import Hook, check_rules, config_path, warn_next_run
from ..session import MAX_CALLS, Session, flatten
from ..stop import AllReduceMax, agreed, log_stop
from .naming import flatten_logs
from .ops import (
    BACKEND,
    Held,
    KerasOps,
    as_output,
    at_level,
    backend_all_reduce_max,
    graph_mode,
    hold,
    is_scalar,
    is_symbolic,
    is_tensor,
    is_tracer,
    release,
    trace_level,
    uncapturable,
)
from .patches import Patches, listen_to_mean_updates
from .trainable import TrainableState, as_traced, keras_train_function, retraced, traced_state
from .transport import (
    EAGER,
    NO_FLAGS,
    STEP_COLLECTIONS,
    FlagIterator,
    ReportedStep,
    Run,
    Slot,
    StepVariants,
    Tagged,
    TFGraphTaps,
    in_run_order,
    replica_now,
)

if BACKEND == "jax":
    import jax
elif BACKEND == "tensorflow":
    import tensorflow as tf

logger = logging.getLogger("tensortap")

_NOTHING_WANTED = dict.fromkeys(STEP_COLLECTIONS, False)
# collections read from the variables after a TRAIN step (TensorFlow's capturing steps return them)
VARIABLE_COLLECTIONS = ("weights", "biases", "optimizer_variables")
# what a JAX train function returns beside its logs: the trainer's state, in order (the keys of model._jax_state)
_JAX_STATE = ("trainable_variables", "non_trainable_variables", "optimizer_variables", "metrics_variables")
_STEP_FUNCTIONS = ("train_function", "test_function", "predict_function")
# make_<kind>_function builds <kind>_function around the model's <step> method, in this mode
_KINDS = {
    "train": ("train_step", Mode.TRAIN),
    "test": ("test_step", Mode.EVAL),
    "predict": ("predict_step", Mode.PREDICT),
}
# what a step hands over outside its graphs: collection, slots, values and (TensorFlow, beside graphs
# with taps) the mark of the step's clock when they came (see TFGraphTaps.tick)
Arrival = tuple[str, list[Slot], list[Any], Any]


TracedFor = tuple[tuple[Any, ...], tuple[Any, ...]]  # objects (compared by identity), values (by equality)


class _InStep(threading.local):
    """The step function running (or being traced) on this thread, as the callback's wrappers see it.

    A TensorFlow strategy of several replicas traces the step once for each replica, on a
    thread of its own, and the threads take turns at the step's synchronisation points
    (the optimizer's all-reduce): each replica's trace has its own.
    """

    def __init__(self) -> None:
        self.mode: Mode | None = None
        self.jax_flags: Any = None  # JAX: the flags fed with the batch (None: a step fed without flags)
        # the variant (see transport.StepVariants), the extras it returns, the step's trace level
        self.variant: frozenset[str] | None = None
        self.extras: dict[str, Any] = {}
        self.level: Any = None
        self.calls: dict[str, int] = {}  # the calls of each layer, by path (see Callback._call_index)
        self.levels: dict[str, Any] = {}  # the trace level (see ops.trace_level) of each layer's last call, by path
        self.loss_names: set[str] = set()
        # the Means updated with a scalar, by id (metric, value), and their results (result, metric)
        self.means: dict[int, tuple[Any, Any]] = {}
        self.results: dict[int, tuple[Any, Any]] = {}
        # compute_loss's values, with their keys and sources (see _loss_source)
        self.computed: list[tuple[Any, str, Any]] = []
        self.applied: set[int] = set()  # optimizers (by id) that applied gradients in a capturing variant's trace


@dataclass
class _Kept:
    """Step functions traced with the callback's wrappers, kept for its next ``fit`` of the same model."""

    traced_for: TracedFor  # see Callback._traced_for
    functions: dict[str, StepVariants]
    graph: TFGraphTaps | None  # TensorFlow's taps, whose flag variables the traced graphs read

    def serves(self, traced_for: TracedFor) -> bool:
        """Whether these functions were traced for what ``traced_for`` describes."""
        (objects, values), (kept, kept_values) = traced_for, self.traced_for
        same = len(objects) == len(kept) and all(a is b for a, b in zip(objects, kept, strict=True))
        return same and values == kept_values


def _loss_name(key: str, mode: Mode | None) -> str:
    return f"losses/val_{key}" if mode == Mode.EVAL else f"losses/{key}"


class KerasHook(Hook):
    """The capture core as the Keras callback configures it (its framework name and tensor ops); nothing overridden."""

    framework = "keras"
    ops = KerasOps()


class Callback(keras.callbacks.Callback):
    """Keras 3 callback that captures tensors into a tensortap trial.

    Pass it to ``fit``, ``evaluate`` or ``predict``; nothing else in the code
    changes. Validation during ``fit`` and ``evaluate`` give EVAL steps,
    ``predict`` PREDICT steps. For a training loop of your own
    (``tf.GradientTape``, torch autograd) see :meth:`attach` and :meth:`stepping`.
    Names (relative to the model, nested layers by path): ``dense/kernel``
    (weights), ``dense/bias`` (biases), ``gradients/dense/kernel``,
    ``outputs/dense``, ``inputs/dense`` (``outputs/dense:0``,
    ``outputs/dense:1``, ... for a layer called several times in one step;
    ``outputs/dense/<i>`` or ``/<key>`` for a nested output),
    ``losses/loss`` (the step's own loss, TRAIN), ``losses/val_loss`` (EVAL),
    ``losses/<name>`` (a loss tracker's input, e.g. ``losses/out_a_loss`` of a
    multi-output model, ``losses/d_loss`` of a GAN), ``metrics/<name>`` and
    ``metrics/val_<name>`` (what the step returns, as in Keras's logs),
    ``optimizer/<variable path>``.

    Parameters
    ----------
    out_dir
        Local directory or fsspec URL of the trial.
    close_on_train_end
        Close the trial (mark training as ended) when ``fit`` ends. Set False
        to go on capturing ``evaluate``/``predict`` with the same callback,
        then call :meth:`close`. A run holds one model's steps: a call of
        another model starts the trial's next run (``out_dir/run-<n>``, as a
        copy of the callback does), with a warning.
    all_reduce_max
        For several processes training together: a blocking collective that
        takes this process's flag (0 or 1) and returns the maximum over all
        of them. Default: the backend's (torch.distributed, JAX multi-process);
        TensorFlow has none to offer a callback, pass yours.
    max_calls
        Calls of one layer per step saved in full (``outputs/<layer>:<i>``);
        beyond, only the last one (see :class:`tensortap.capture.Session`).
    **kwargs
        Everything :class:`tensortap.capture.Hook` takes (``save_config``,
        ``include_collections``, ``reduction_config``, ...).

    Attributes
    ----------
    hook
        The capture core (:class:`tensortap.capture.Hook`) this callback drives.
    session
        The step machinery (:class:`tensortap.capture.Session`) over it.

    Notes
    -----
    With ``steps_per_execution=N`` Keras runs N batches between two callback
    calls; each execution is one tensortap step and holds the values of its
    last batch. The stop request of a rule (``control/stop.json`` in the
    trial) sets ``model.stop_training = True``; with several processes they
    agree every :attr:`stop_sync_steps` training steps, so all stop at the same step.
    """

    # with several processes, they agree on a stop request every this many training steps
    stop_sync_steps: int = 10

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        close_on_train_end: bool = True,
        all_reduce_max: AllReduceMax | None = None,
        max_calls: int = MAX_CALLS,
        **kwargs: Any,
    ) -> None:
        make = functools.partial(KerasHook, out_dir, **kwargs)
        rules = RuleSet(check_rules(kwargs.get("rules")))
        self._setup(make, "if_exists" in kwargs, close_on_train_end, all_reduce_max, max_calls, rules)

    def _setup(
        self,
        make: Callable[..., Hook],
        if_exists_given: bool,
        close_on_train_end: bool,
        all_reduce_max: AllReduceMax | None,
        max_calls: int,
        rules: RuleSet,
    ) -> None:
        """Set the callback up with the hook ``make(rules=...)`` opens (``make`` is kept: :meth:`__deepcopy__`),
        its run judged by ``rules``."""
        keras.callbacks.Callback.__init__(self)
        self._rules = rules
        hook = make(rules=rules.for_new_run())
        assert isinstance(hook, KerasHook)
        self.hook = hook
        self._make, self._if_exists_given = make, if_exists_given
        # values reach the session at the step's end, already copied or held by _tap (ops.hold): no second copy
        self.session = Session(hook, is_tensor, max_calls=max_calls)
        self.session.at_finish(self._collect_after_step)
        self.close_on_train_end = bool(close_on_train_end)
        self.all_reduce_max = all_reduce_max
        self._reduce_max: AllReduceMax | None = None
        self._kinds: list[str] = []  # kinds ("train", "test", "predict") of the calls running, the innermost last
        self._patches = Patches()
        self._unlisten: Callable[[], None] | None = None
        self._graph: TFGraphTaps | None = None
        self._optimizers: list[Any] = []
        self._loss_scaled = False  # a LossScaleOptimizer among them
        self._warned_unapplied = False
        self._warned_eager_replicas = False
        self._loop = False
        self._in = _InStep()
        self._running_means: set[str] = set()  # keys returned as running means of unknown step value (warned)
        self._batch_models: set[int] = set()  # in a loop: the models whose train_on_batch/test_on_batch are wrapped
        self._means_seen: set[int] = set()  # in a loop: the Means (by id) whose model was looked for
        self._unattached: set[int] = set()  # in a loop: models (by id) found running but not attached (warned)
        self._run_sources: dict[str, list[tuple[Any, int]]] = {}  # key -> (source, its run in a step)
        # in the step: (key, id(source)) -> what gave each of its runs ("computed", "tracked", ...), see _run_slot
        self._runs: dict[tuple[str, int], list[set[str]]] = {}
        self._applied: set[int] = set()  # in the step: optimizers (by id) that applied gradients eagerly
        # optimizers seen applying (their apply run or traced) or found applied before, see _has_applied
        self._ever_applied: weakref.WeakSet[Any] = weakref.WeakSet()
        self._warned_reapplied: set[int] = set()
        self._warned_stateless = False  # a JAX loop's stateless_call or stateless_apply, see _wrap_stateless
        self._arrived: list[Arrival] = []
        self._variables_taken = False  # the open TRAIN step's variables were taken when its step function returned
        # by mode, collection and slot, whether the steps left a value given eagerly as it was given (True: held
        # by reference, not copied) or one step did not (False: copied from then on, see _release_held); per mode,
        # as a layer may change its input in place only when training
        self._as_given: dict[tuple[Mode, str, Slot], bool] = {}
        self._warned_changed: set[str] = set()
        self._warned_masked: set[str] = set()  # recurrent layers (by path) warned about receiving a mask
        self._skipped: set[str] = set()
        self._accepting = False
        self.flags_now = NO_FLAGS
        self._prefix = ""
        # step variants (see transport.StepVariants): what the open step saves from inside it,
        # the variant running, and what the variants returned
        self.wanted_now: frozenset[str] = frozenset()
        self.running: frozenset[str] | None = None
        self.extras_out: list[dict[str, Any]] = []
        self._steps: dict[str, Callable[..., Any]] = {}
        self._making = False
        self._entering = False  # _enter builds the step function (make_<kind>_function) of its call
        self._first_train_batch = False  # the next train batch is a fit's first: compare the counts then
        self._epoch: int | None = None  # the epoch begun last (at a fit's first batch: its first, see _steps_done)
        # at the last fit's first batch: its optimizer, iterations, steps_per_execution, first TRAIN step, epochs
        self._keras_lead: tuple[weakref.ref[Any], int, int, int, int] | None = None
        self._epochs_begun = 0  # by this callback's fits (on_epoch_begin)
        self._extra_keys: dict[tuple[str, Slot], str] = {}
        self._extra_slots: dict[str, tuple[str, Slot]] = {}
        self._callbacks_traced = False
        self._variable_names: dict[int, tuple[Any, str, str | None]] = {}
        self._renamed: dict[int, str] = {}  # layers and variables (by id) named by their tree path, see _tree_names
        self._quantized: set[int] = set()  # the variables (by id) of quantized layers: their integer ones are weights
        self._kept: _Kept | None = None
        self._traced_as: TrainableState | None = None  # TensorFlow: what the step functions train (see .trainable)
        self._keras_own: dict[str, Callable[..., Any]] = {}  # the model's own step functions, see _leave_step_functions
        self._warned_closed = False
        self._closed_by_fit = False  # closed by on_train_end (close_on_train_end): _attach says so
        self._last_model: weakref.ref[Any] | None = None  # the model of the last call (see _one_model_a_run)

    @classmethod
    def from_json(
        cls,
        path: str | os.PathLike[str],
        close_on_train_end: bool = True,
        all_reduce_max: AllReduceMax | None = None,
        max_calls: int = MAX_CALLS,
        **overrides: Any,
    ) -> Callback:
        """A callback configured by a JSON file (see :meth:`tensortap.capture.Hook.from_json`)."""
        cb = cls.__new__(cls)
        make = functools.partial(KerasHook.from_json, path, **overrides)
        rules = RuleSet(check_rules(overrides.get("rules")))
        cb._setup(make, "if_exists" in overrides, close_on_train_end, all_reduce_max, max_calls, rules)
        return cb

    def __deepcopy__(self, memo: dict[int, Any]) -> Callback:
        """A new callback of the same configuration, which writes the trial's next run (``out_dir/run-<n>``,
        unless ``if_exists`` was given), with a warning naming it: keras-tuner copies the callbacks given to
        ``search()`` for each trial (their writer and session cannot be copied). Its run is judged from scratch,
        by fresh copies of the in-process rules as they were given (``copied.hook.rules``)."""
        copied = type(self).__new__(type(self))
        copied._setup_next_run(self, self._rules.copy())
        logger.warning("tensortap: a copy of the callback writing %s writes %s", self.out_dir, copied.out_dir)
        return copied

    def _setup_next_run(self, like: Callback, rules: RuleSet) -> None:
        """Set this callback up afresh with ``like``'s configuration, writing the next run of its trial
        (``out_dir/run-<n>``, unless ``if_exists`` was given: then as that says), judged by ``rules``."""
        make, if_exists_given = like._make, like._if_exists_given
        next_run = make if if_exists_given else functools.partial(make, if_exists="new_run")
        self._setup(next_run, True, like.close_on_train_end, like.all_reduce_max, like.session.max_calls, rules)
        self._make, self._if_exists_given = make, if_exists_given

    @classmethod
    def from_env(cls, **overrides: Any) -> Callback | None:
        """A callback configured by the JSON file named by ``TENSORTAP_CONFIG``; None if it is unset."""
        path = config_path()
        return cls.from_json(path, **overrides) if path else None

    # ---------------------------------------------------- the core, read-only
    @property
    def out_dir(self) -> str:
        """Where the trial is written."""
        return self.hook.out_dir

    @property
    def step(self) -> int:
        """The global step number of the last step begun (-1 before the first)."""
        return self.hook.step

    @property
    def mode(self) -> Mode:
        """The mode of the last step begun."""
        return self.hook.mode

    @property
    def mode_step(self) -> int:
        """The step number of the last step begun, counted in its mode."""
        return self.hook.mode_step

    @property
    def failed(self) -> bool:
        """True once capture disabled itself after an error of the capture path."""
        return self.hook.failed

    @property
    def should_stop(self) -> bool:
        """True once a stop request was written into the trial (polled at most every second)."""
        return self.hook.should_stop

    @property
    def stop_reason(self) -> str | None:
        """The reason given by the stop request, once :attr:`should_stop` is true."""
        return self.hook.stop_reason

    def flush(self) -> None:
        """Publish everything saved so far (a partial shard) and wait for it."""
        self.hook.flush()

    # ------------------------------------------------------------ lifecycle
    def set_model(self, model: Any) -> None:
        """Keras gives a call's callbacks the model before it builds the call's step functions: the model's
        step functions of Keras's own now are those it held before the call (see :meth:`_leave_step_functions`)."""
        if not self._depth and model is not None:
            self._one_model_a_run(model)
        super().set_model(model)
        if not self._depth:
            self._keras_own = {
                fn: f
                for fn in _STEP_FUNCTIONS
                if (f := getattr(model, fn, None)) is not None and not isinstance(f, ReportedStep)
            }

    def _one_model_a_run(self, model: Any) -> None:
        """Before a call with ``model`` (``fit``, ``evaluate``, ``predict``, :meth:`attach`): a run holds the steps of
        one model. Where the callback's open trial holds steps of another model (the callback given to the fits of
        two models), its run is closed and this call starts the trial's next run, as a copy of the callback does
        (:meth:`_setup_next_run`), with one warning naming both folders; its steps are numbered as a first fit's."""
        last, self._last_model = self._last_model, weakref.ref(model)
        writer = self.hook.writer
        if last is None or last() is model or self.hook.step < 0 or writer is None or writer.closed:
            return
        earlier, before = self.out_dir, last()
        self.close()
        self._setup_next_run(self, self._rules)
        self._last_model = weakref.ref(model)
        warn_next_run(
            "another model" if before is None else f"model {getattr(before, 'name', '')!r}",
            earlier,
            f"model {getattr(model, 'name', '')!r}",
            self.out_dir,
        )

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._enter("train")
        # Keras's count is read at the first batch: a callback listed after this one may restore it at its train
        # begin (BackupAndRestore)
        self._first_train_batch = True

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._exit()
        if self.close_on_train_end:
            self.close()
            self._closed_by_fit = True

    def on_test_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._enter("test")

    def on_test_end(self, logs: dict[str, Any] | None = None) -> None:
        self._exit()

    def on_predict_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._enter("predict")

    def on_predict_end(self, logs: dict[str, Any] | None = None) -> None:
        self._exit()

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch = epoch
        self._epochs_begun += 1

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._finish_step()

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self._first_train_batch:
            self._first_train_batch = False
            try:
                self._count_train_on()
            except Exception as exc:
                self.hook.fail(exc, "cannot read the optimizer's iterations")
        self._begin(Mode.TRAIN)
        if self.stop_agreed():
            log_stop(self.stop_reason, "fit")
            self._model.stop_training = True

    def _count_train_on(self) -> None:
        """At a fit's first batch: number its TRAIN steps on from Keras's count (its first fit) or the callback's.

        Steps only go up in a trial: a later fit goes on from the callback's own count (see
        :func:`_steps_done`). Where Keras's count went back since the last fit's first batch, with
        the same optimizer (``BackupAndRestore`` restored its iterations after an interrupted fit;
        a new optimizer, of a model compiled again, counts from 0 by design), the steps are saved
        under other numbers than Keras's: one warning names both. Went back: the optimizer's
        iterations are fewer than the batches of the steps numbered since, each execution of
        ``steps_per_execution`` batches whole but the last of each epoch (one batch at least); for a
        ``LossScaleOptimizer``, which does not count the steps it skips (non-finite gradients), fewer than
        at the last fit's first batch.
        """
        model = self._model
        optimizer, last = getattr(model, "optimizer", None), self._keras_lead
        iterations = None if optimizer is None else _applied(optimizer)
        n = max(int(model.steps_per_execution), 1)
        done = _steps_done(iterations or 0, n, self._epoch, (self.params or {}).get("steps"))
        if Mode.TRAIN not in self.hook.mode_steps:
            self.hook.number_on(Mode.TRAIN, done)
        after = self.hook.mode_steps[Mode.TRAIN] + 1  # the number of the fit's first step
        went_back = False
        if iterations is not None and last is not None and last[0]() is optimizer:
            _, since, per_execution, first, epochs = last
            steps, partial = after - first, min(self._epochs_begun - epochs, after - first)
            if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
                went_back = iterations < since
            else:
                went_back = iterations < since + (steps - partial) * per_execution + partial
        if went_back and after != done:
            logger.warning(
                "tensortap: this fit goes on from Keras's training step %d (its optimizer's iterations went "
                "back: restored by BackupAndRestore or from a checkpoint), but this callback has numbered TRAIN "
                "steps up to %d, and steps only go up in a trial: its steps are saved from step %d on, not %d "
                "as Keras counts them. To keep Keras's numbers, give a resumed fit a new tensortap callback "
                "with a new out_dir",
                done,
                after - 1,
                after,
                done,
            )
        self._keras_lead = None
        if iterations is not None:
            self._keras_lead = (weakref.ref(optimizer), iterations, n, after, self._epochs_begun)

    def on_test_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._begin(Mode.EVAL)

    def on_predict_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._begin(Mode.PREDICT)

    def _enter(self, kind: str) -> None:
        if not self._depth:
            self._abandon_others(self._model)
        if kind in self._kinds:  # no call runs inside one of its kind: that one raised (Keras calls no callback then)
            del self._kinds[self._kinds.index(kind) :]  # and the calls inside it: a Ctrl-C in a notebook
            if not self._depth:
                self._detach()
        self._kinds.append(kind)
        self._finish_step()
        if self._depth > 1:
            return
        model = self._model  # not self.model: on JAX that property syncs the state
        kept, self._kept = self._kept, None  # the step functions of the last call, if they still serve
        if kept is not None and not kept.serves(self._traced_for(model)):
            kept = None
        if BACKEND == "tensorflow":  # trace as Keras traced those it held before the call (or traces now)
            self._traced_as = traced_state(model, bool(self._keras_own))
        self._attach(model, (), None if kept is None else kept.graph)
        for fn in _STEP_FUNCTIONS:  # never Keras's own (traced without the wrappers) while attached
            setattr(model, fn, None if kept is None else kept.functions.get(fn))
        self._entering = True
        try:
            getattr(model, f"make_{kind}_function")()
        finally:
            self._entering = False

    def _abandon_others(self, model: Any) -> None:
        """Before the callback attaches to ``model``: another callback's call of it that raised (Keras calls no
        callback then) left its wrappers on the model; that callback ends its capture there (:meth:`_abandon`)."""
        for fn in _STEP_FUNCTIONS:
            f = None if model is None else model.__dict__.get(fn)
            if isinstance(f, ReportedStep) and isinstance(f.owner, Callback) and f.owner is not self:
                f.owner._abandon()

    @property
    def _depth(self) -> int:
        """Calls running with the callback, one inside another: ``fit``, ``evaluate``, ``predict``, a loop."""
        return len(self._kinds) + self._loop

    def _traced_for(self, model: Any) -> TracedFor:
        """What step functions of ``model`` traced now depend on: the model as compiled (Keras drops
        its own step functions at ``compile``), its trainable variables, how it runs, the collections."""
        compiled = (getattr(model, "_compile_config", None), getattr(model, "optimizer", None))
        settings = (model.run_eagerly, model.jit_compile, model.steps_per_execution)
        return (model, *compiled, *model.trainable_variables), (*settings, self.hook.included, self.hook.save_all)

    def _attach(self, model: Any, optimizers: Sequence[Any], graph: TFGraphTaps | None = None) -> None:
        writer = self.hook.writer
        if writer is not None and writer.closed and not self._warned_closed:
            self._warned_closed = True  # once: a closed trial stays closed
            why = (
                ": this callback closed it when its fit ended (close_on_train_end=True, the default); to capture "
                "later fit/evaluate/predict calls with the same callback, make it with close_on_train_end=False "
                "and call its close() at the end"
                if self._closed_by_fit
                else ""
            )
            logger.warning("tensortap: the trial at %s is closed; nothing more is captured%s", self.out_dir, why)
        self._reduce_max = self.all_reduce_max or backend_all_reduce_max()
        try:
            self._install(model, optimizers, graph)
        except Exception as exc:
            self._detach()
            self.hook.fail(exc, "cannot attach to the Keras model")

    def _exit(self) -> None:
        self._finish_step()
        if self._kinds:
            self._kinds.pop()
        if self._depth > 0:
            return
        model = self._model
        if model is not None and not self._loop:  # for the next call (_enter), instead of tracing anew
            functions = {fn: f for fn in _STEP_FUNCTIONS if isinstance(f := getattr(model, fn, None), StepVariants)}
            self._kept = _Kept(self._traced_for(model), functions, self._graph) if functions else None
        self._detach()
        writer = self.hook.writer
        if writer is not None and not writer.closed:
            self.flush()

    def _detach(self) -> None:
        """Remove every wrapper and replace the model's step functions traced with them."""
        self._kinds = []
        self._patches.undo()
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None
        if self._model is not None and not self._loop:
            self._leave_step_functions(self._model)
        self._loop = False
        self._steps = {}
        self.running = None

    def _leave_step_functions(self, model: Any) -> None:
        """Replace the step functions the callback set on ``model`` by those Keras alone would hold now.

        Those of Keras's own that the model held when the call began (Keras keeps them until
        ``compile``); else, on TensorFlow compiled, for a train function the call built: Keras's
        own, its step traced as the callback's was (:func:`.trainable.keras_train_function`), as
        Keras alone would have traced it in this call (a layer made trainable since, without
        ``compile``, is not trained by it, as with Keras alone); else none (traced or run anew
        at the next call, as the model is then: what Keras's own do run eagerly, and on JAX
        with trainable variables changed). A function Keras built itself is left as it is.
        """
        own, self._keras_own = self._keras_own, {}
        built_train = isinstance(model.train_function, ReportedStep)
        for fn in _STEP_FUNCTIONS:
            if fn in own or isinstance(getattr(model, fn), ReportedStep):
                setattr(model, fn, own.get(fn))
        state = self._traced_as if BACKEND == "tensorflow" and not model.run_eagerly else None
        if built_train and state is not None and "train_function" not in own:
            model.train_function = keras_train_function(model, state)

    def close(self, reason: str = "closed") -> None:
        """Publish what is left, mark the end of training and detach from the model. Idempotent.

        ``fit`` calls no callback when it raises: closing the callback then also
        removes the wrappers it left on the model.
        """
        if self._depth:
            self._finish_step()
            self._detach()
        self._kept = None
        self.session.finish()
        self.hook.close(reason)

    # ------------------------------------------------------ loops of your own
    def attach(self, model: Any, optimizer: Any | Sequence[Any] | None = None) -> Callback:
        """Capture a training loop of your own: weights, gradients, outputs, losses and metrics of ``model`` per step.

        Metrics are those that ``train_on_batch``/``test_on_batch`` of ``model``, or of a
        model nested in it, return in a step (named by the step's mode, as in ``fit``).
        Call it before the first call of your step function (a ``tf.function``
        traced earlier would not contain the capture), then bracket each
        iteration with :meth:`stepping`, give the loss with :meth:`record_loss`, and
        call :meth:`close` at the end (which detaches from the model)::

            cb = ttk.Callback(out_dir, save_config=tensortap.SaveConfig(save_interval=10))
            cb.attach(model, optimizer)
            for x, y in dataset:
                with cb.stepping():
                    loss = train_step(x, y)      # GradientTape ... optimizer.apply(grads, weights)
                    cb.record_loss(loss)
            cb.close()

        Parameters
        ----------
        model
            The Keras model trained by the loop.
        optimizer
            The optimizer(s) the loop applies gradients with (default: those of the model).

        Returns
        -------
        Callback
            This callback.
        """
        if self._depth:
            raise RuntimeError("Callback.attach: already attached (to a fit, or to a loop); close() it first")
        self.set_model(model)
        self._loop = True
        given = [] if optimizer is None else list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
        self._attach(model, given)
        return self

    @contextmanager
    def stepping(self, mode: Mode | str | None = None, step: int | None = None) -> Iterator[bool]:
        """``with cb.stepping(): ...`` brackets one iteration of your loop; yields whether it is saved.

        Weights are read when the block ends (after the update); gradients arrive
        through the optimizer's ``apply``, layer outputs through the layers. A block left
        by an exception (``KeyboardInterrupt`` included) did not finish its step: the step
        is dropped, with one warning when it was saved, and the exception goes on; the
        run stays open.

        Parameters
        ----------
        mode
            Mode of the step (default TRAIN).
        step
            Explicit global step number; default: last + 1. One not greater than the last step is
            refused with a warning (the block runs, its step saves nothing); with ``strict=True``
            a ``ValueError``.
        """
        if not self._loop:
            raise RuntimeError("Callback.stepping: call attach(model, optimizer) first")
        mode = Mode.TRAIN if mode is None else Mode.parse(mode)
        self._begin(mode, step)
        self._new_step_losses()
        outer, self._in.mode = self._in.mode, mode
        try:
            yield self.hook.is_saving()
        except BaseException as exc:
            self._arrived, self.extras_out = [], []  # values of the step dropped
            self.session.drop(exc)
            raise
        finally:
            self._in.mode = outer
        self._finish_step()

    def record_loss(self, value: Any, name: str = "loss") -> None:
        """Capture ``value`` as the step's loss ``losses/<name>`` (``losses/val_<name>`` in EVAL steps).

        For a ``train_step`` or a loop that computes its loss without
        ``compute_loss`` or a ``Mean`` loss tracker. Works inside compiled steps
        (``tf.function``, ``jax.jit``) as outside.
        """
        if not (self.session.is_open or graph_mode() or is_tracer(value)):
            raise RuntimeError("Callback.record_loss: no step is open (call it inside `with cb.stepping():` or a step)")
        mode = self._in.mode or self.hook.mode
        key = _loss_name(name, mode)
        self._in.loss_names.add(key)
        self._tap("losses", [(self._run_slot(key, _loss_source(self._model)), value)])

    # ----------------------------------------------------------------- steps
    def _begin(self, mode: Mode, step: int | None = None) -> None:
        self._accepting = False
        self.hook.end_at_exit = None
        saving = self.session.open(mode, step)  # records the previous step first
        self._arrived, self._variables_taken = [], False
        wanted = {c: self.session.saving(c) for c in STEP_COLLECTIONS} if saving else _NOTHING_WANTED
        self.wanted_now = frozenset(c for c, w in wanted.items() if w)
        if saving and mode == Mode.TRAIN and BACKEND == "tensorflow":  # returned by the step (_return_variables)
            self.wanted_now |= {c for c in VARIABLE_COLLECTIONS if self.session.saving(c)}
        self.extras_out = []
        self._runs, self._applied = {}, set()
        if self._graph is not None:
            self._graph.set_flags(wanted, self.hook.step)
        if BACKEND == "jax":
            self.flags_now = np.array(list(wanted.values()), dtype=bool) if saving else NO_FLAGS
        if saving and self._callbacks_traced:
            jax.effects_barrier()  # callbacks of an earlier, unsaved step must not land in this one
        self._accepting = True

    def _finish_step(self) -> None:
        self.hook.end_at_exit = None
        self.session.finish()

    def step_ran(self, mode: Mode, out: Any) -> None:
        """A step function of ``mode`` returned ``out``: the open step is complete. Keras records it when the next
        step begins (or at the epoch's end); if the script dies before (in reading the next batch, in a
        callback's ``on_epoch_end``), it is recorded at exit instead of dropped as a step in progress.

        A saved TRAIN step's variables are taken now, not when it is recorded: by then every callback's
        ``on_epoch_end`` (and, with validation, ``on_test_begin``) has run, and one listed before this one
        may have changed them (``SwapEMAWeights`` swaps the EMA weights in, ``ReduceLROnPlateau`` lowers the
        learning rate). On JAX they are the state ``out`` holds (Keras puts it into the model after the
        function returns). Offered now, they are copied once, now instead of then.
        """
        if self._takes(mode):
            self.hook.end_at_exit = self._finish_step
            if mode == Mode.TRAIN and self.hook.is_saving():
                state = dict(zip(_JAX_STATE, out[1], strict=True)) if BACKEND == "jax" else None
                self.session.guard(self._offer_variables, state)

    def step_raised(self, mode: Mode, why: BaseException) -> None:
        """A step function of ``mode`` raised: the open step did not happen (a Ctrl-C, an error in its data
        or its computation, or no batch left: how TensorFlow ends an epoch over data of unknown length).

        Drop it and give its numbers to the next step, as Keras counts (a ``fit`` run again after a
        Ctrl-C in a notebook goes on from it); one warning when it was saved, none when the data ran out.
        """
        if self._takes(mode):
            self._drop_open_step(None if _ran_out(why) else why)
            if not _ran_out(why) and not self._loop and self._depth:
                self._abandon()  # fit/evaluate/predict raise it: Keras calls no callback (its on_*_end) then

    def _drop_open_step(self, why: BaseException | None) -> None:
        """Forget the open step (one warning naming ``why`` when it was saved) and give its numbers to the next."""
        self._arrived, self.extras_out = [], []
        if self._graph is not None:
            self._graph.forget(self.hook.step)
        self.session.drop(why, take_back=True)

    def _abandon(self) -> None:
        """The call of the model this callback is active in raised (Keras calls no callback then): end it here,
        as its end would have. The step open is recorded if its step function had returned (as at exit), else
        dropped and its numbers given to the next step (Keras did not count it); the callback detaches from the
        model (a later call of it, with another callback or none, runs as if this one had not been there) and
        publishes its trial, which stays open: the same callback given to a later call goes on from its count."""
        end, self.hook.end_at_exit = self.hook.end_at_exit, None
        try:
            if end is not None and self.session.is_open:
                end()
            else:
                self._drop_open_step(None)
        except Exception as exc:
            self.hook.fail(exc, "cannot end the step of a call that raised")
        self._detach()
        writer = self.hook.writer
        try:
            if writer is not None and not writer.closed:
                self.flush()
        except Exception as exc:
            self.hook.fail(exc, "cannot publish the trial of a call that raised")

    def wanted_in(self, mode: Mode) -> frozenset[str]:
        """What a step function of ``mode`` run now saves from inside it (see :meth:`_takes`)."""
        return self.wanted_now if self._takes(mode) else frozenset()

    def returnable_in(self, mode: Mode) -> frozenset[str]:
        """What a capturing step function of ``mode`` may return at some step (see :meth:`_begin`)."""
        collections = [
            *STEP_COLLECTIONS,
            *(VARIABLE_COLLECTIONS if mode == Mode.TRAIN and BACKEND == "tensorflow" else ()),
        ]
        return frozenset(c for c in collections if self.session.may_save(c))

    def _takes(self, mode: Mode | None) -> bool:
        """Whether values from a step function of ``mode`` (None: no step function) belong to the open step.

        Not when no step is open, nor when it has another mode: an ``evaluate`` or
        ``predict`` that another callback runs in its ``on_epoch_end`` (this callback
        not among its callbacks) runs the model's wrapped step functions while the
        epoch's last TRAIN step is still open; its values are not that step's.
        """
        return self.session.is_open and (mode is None or mode == self.hook.mode)

    def _collect_after_step(self) -> None:
        """When a saved step is recorded: what arrived from inside it, then the variables after it."""
        if self._callbacks_traced:
            jax.effects_barrier()
        latest: dict[Slot, tuple[str, Any]] = {}  # the last value of a name in the step wins
        for slot, collection, value in self._handed_over():
            latest[slot] = (collection, value)
        extras_out, self.extras_out = self.extras_out, []
        for extras in extras_out:
            # a variant returns more where every step runs one (see StepVariants._only): what the step saves
            extras = {k: v for k, v in extras.items() if self._extra_slots[k][0] in self.wanted_now}
            for key, value in _on_host(extras).items():
                collection, slot = self._extra_slots[key]
                latest[slot] = (collection, value)
        if self._loss_scaled and self.hook.mode == Mode.TRAIN and self.session.saving("gradients"):
            self._note_unapplied(c for c, _ in latest.values())
        self._release_held(latest)
        calls: dict[tuple[str, int], tuple[str, dict[str, Any]]] = {}
        for slot, (collection, value) in latest.items():
            # a call's tensors, keyed by their place in its output: "" alone, else "0", "key", "1/0"
            if slot.call is not None:
                calls.setdefault((slot.name, slot.call), (collection, {}))[1][slot.sub.lstrip("/")] = value
        self.session.offer_many((s.name, value, (c,)) for s, (c, value) in latest.items() if s.call is None)
        for (base, _), (collection, tensors) in sorted(calls.items()):  # each layer's calls in order
            self.session.offer_call(base, tensors, (collection,))
        if self.hook.mode == Mode.TRAIN and not self._variables_taken:  # a loop's step: at its block's end
            self._offer_variables()

    def _offer_variables(self, state: dict[str, Any] | None = None) -> None:
        """Offer the variables the open TRAIN step saves, as they are now (JAX: as in the trainer's ``state``),
        but those a capturing TensorFlow step returns (read in its graph after the update, with its extras)."""
        returned = self.running or frozenset()
        saved = [c for c in VARIABLE_COLLECTIONS if c not in returned and self.session.saving(c)]
        self.session.offer_many((name, value, (coll,)) for name, coll, value in self._variables(saved, state))
        self._variables_taken = True

    def _release_held(self, latest: dict[Slot, tuple[str, Any]]) -> None:
        """Put in ``latest`` the values of the torch tensors held from the step (:func:`.ops.hold`).

        A value is copied when given until a step of its mode has left it as given: from then on it is
        only referenced. One changed in place after that, before its step ended (an optimizer that scales its
        gradients in place from some step on), cannot be told any more: it is left out of that step, with
        one warning naming it, and copied when given for good (one changed only now and then, as by a
        clipping past a threshold, would otherwise be lost, unsaid, at each later change).
        """
        for slot, (collection, value) in list(latest.items()):
            if not isinstance(value, Held):
                continue
            kept, changed = release(value)
            key = (self.hook.mode, collection, slot)
            if changed:
                self._as_given[key] = False
            else:
                self._as_given.setdefault(key, True)
            if kept is not None:
                latest[slot] = (collection, kept)
                continue
            del latest[slot]
            if slot.label() not in self._warned_changed:
                self._warned_changed.add(slot.label())
                logger.warning(
                    "tensortap: %s was changed in place at step %d after it was given, before the step ended; it is "
                    "not saved at that step (its value as given cannot be told) and is copied when given from now on",
                    slot.label(),
                    self.hook.step,
                )

    def _note_unapplied(self, collections: Iterable[str]) -> None:
        """A saved TRAIN step with a ``LossScaleOptimizer``, which handed over ``collections``: without gradients,
        the optimizer applied none (their scaled values were not finite); the first such step is named."""
        if "gradients" not in collections and not self._warned_unapplied:
            self._warned_unapplied = True
            logger.warning(
                "tensortap: step %d has no gradients: the loss scale optimizer applied none (the scaled gradients "
                "were not finite; it lowers its scale and goes on); later such steps are not named",
                self.hook.step,
            )

    def _handed_over(self) -> list[tuple[Slot, str, Any]]:
        """``(slot, collection, value)`` of what the step handed over (extras aside), in the order it came.

        Values that TensorFlow's graphs wrote are put in the order of the step's clock with
        those that came eagerly beside them, and each layer call is numbered by its place in
        the step (:func:`.transport.in_run_order`); a value that came with no mark came when
        no graph had taps: before every value a graph wrote in the step.
        """
        arrived, self._arrived = self._arrived, []
        batches = max(int(self._model.steps_per_execution), 1) if self._model is not None else 1
        written = self._graph.written(self.hook.step, batches) if self._graph is not None else []
        if not written:
            return [(s, c, v) for c, slots, values, _ in arrived for s, v in zip(slots, values, strict=True)]
        runs = [
            Run(slot, collection, value, EAGER, 0 if mark is None else int(mark))
            for collection, slots, values, mark in arrived
            for slot, value in zip(slots, values, strict=True)
        ]
        return in_run_order(runs + written)

    def stop_agreed(self) -> bool:
        """Whether to stop now: :attr:`should_stop`, agreed by every process every :attr:`stop_sync_steps` steps.

        Processes may see the request at different times; one leaving a data-parallel
        training alone would leave the others waiting in their next collective.
        """
        hook = self.hook
        return agreed(hook.mode_step, self.stop_sync_steps, hook.stop_channel, hook.stop_poll_seconds, self._reduce_max)

    # ------------------------------------------------------------- variables
    def _name(self, path: str) -> str:
        return path[len(self._prefix) :] if path.startswith(self._prefix) else path

    def _variables(
        self, collections: Collection[str], state: dict[str, Any] | None = None
    ) -> Iterator[tuple[str, str, Any]]:
        """``(name, collection, value)`` of the weights and biases (when ``collections`` has either) and
        of the optimizer variables (``"optimizer_variables"``), as they are now, or as in ``state``: the JAX
        trainer's state a train function returned (during ``fit`` the Variables are stale), by key
        (``"trainable_variables"``, ...)."""
        model = self._model

        def values(variables: Sequence[Any], key: str | None) -> Iterator[tuple[Any, Any]]:
            if state is not None and key is not None and state.get(key) is not None:
                yield from zip(variables, state[key], strict=True)
            else:
                yield from ((v, v.value) for v in variables)

        if "weights" in collections or "biases" in collections:
            for key in ("trainable_variables", "non_trainable_variables"):
                for v, value in values(getattr(model, key), key):
                    name, coll = self._variable_name(v)
                    if coll is not None:
                        yield name, coll, value
        if "optimizer_variables" in collections:
            for optimizer in self._optimizers:
                if not self._has_applied(optimizer):
                    continue  # never applied (the default optimizer of a model that trains its own)
                own = optimizer is getattr(model, "optimizer", None)
                names = _numbered([f"optimizer/{v.path}" for v in optimizer.variables])
                state_key = "optimizer_variables" if own else None
                for name, (_, value) in zip(names, values(optimizer.variables, state_key), strict=True):
                    yield name, "optimizer_variables", value

    def _has_applied(self, optimizer: Any) -> bool:
        """Whether ``optimizer`` (or the one it wraps) applied gradients: its ``apply`` was run or traced while
        attached, or its ``iterations`` counted steps when the callback attached. Not whether it is built:
        Keras's torch and JAX trainers (TensorFlow's under a strategy) build ``model.optimizer`` when ``fit``
        begins, also a GAN's default one, which its own two optimizers leave unapplied."""
        return any(o in self._ever_applied for o in _chain(optimizer))

    def _variable_name(self, v: Any) -> tuple[str, str | None]:
        """A model variable's name and collection (``"weights"``, ``"biases"``; None: neither a float nor one of
        a quantized layer's, such as a seed generator's state), remembered."""
        known = self._variable_names.get(id(v))
        if known is None or known[0] is not v:
            name, coll = self._renamed.get(id(v)) or self._name(v.path), None
            if keras.backend.is_float_dtype(v.dtype) or id(v) in self._quantized:
                coll = "biases" if name.endswith("bias") else "weights"
            known = self._variable_names[id(v)] = (v, name, coll)
        return known[1], known[2]

    def _return_variables(self, collections: Collection[str]) -> None:
        """TensorFlow, in a capturing step's trace after the update: the variables as extra outputs."""
        try:
            for name, coll, value in self._variables(collections):
                self._in.extras[self._extra_key(coll, Slot(name))] = as_output(value)
        except Exception as exc:
            self.hook.fail(exc, "cannot capture the variables")

    # -------------------------------------------------------------- wrappers
    def _install(self, model: Any, optimizers: Sequence[Any], graph: TFGraphTaps | None = None) -> None:
        """Wrap what the capture needs; ``graph``: the TensorFlow taps of step functions kept from a
        ``fit`` before (they read its flag variables)."""
        self._prefix = f"{_path(model)}/"
        self._variable_names = {}
        self._renamed = _tree_names(model, self._name)
        self._quantized = {
            id(v)
            for layer in model._flatten_layers(include_self=False)
            if getattr(layer, "quantization_mode", None) is not None
            for v in layer.variables
        }
        self._graph = graph
        if graph is None and BACKEND == "tensorflow" and (self._loop or not model.run_eagerly):
            self._graph = TFGraphTaps(xla=bool(not self._loop and model.jit_compile), one_function=not self._loop)
        if not self._loop:
            for kind, (attr, mode) in _KINDS.items():
                self._steps[attr] = getattr(model, attr)
                self._patches.set(model, attr, self._wrap_step(self._steps[attr], mode))
                make = f"make_{kind}_function"
                variants = _variants_serve(model, kind)
                self._patches.set(model, make, self._wrap_make(model, kind, getattr(model, make), variants))
            if BACKEND == "jax":
                self._patches.set(model, "_make_function", self._wrap_make_function(model._make_function))
                # a capturing variant is built at the first step that saves from inside it; under a
                # distribution Keras builds a step from the shardings of the variables' values, which a
                # fit has taken from the variables by then: the shardings of the first build serve
                if keras.distribution.distribution() is not None and hasattr(model, "_get_state_sharding_spec"):
                    spec = functools.cache(model._get_state_sharding_spec)
                    self._patches.set(model, "_get_state_sharding_spec", spec)
        elif self.session.may_save("metrics"):  # a loop: the models' train_on_batch and test_on_batch
            for m in model._flatten_layers(include_self=True, recursive=True):
                if isinstance(m, keras.Model):
                    self._batch_models.add(id(m))
                    for attr in ("train_on_batch", "test_on_batch"):
                        self._patches.set(m, attr, self._wrap_on_batch(m, getattr(m, attr)))
        if self.session.may_save("losses"):
            if getattr(model, "compiled", False):
                self._patches.set(model, "compute_loss", self._wrap_loss(model))
            self._unlisten = listen_to_mean_updates(self._on_mean_event)
        self._optimizers = list(dict.fromkeys([*optimizers, *_optimizers_of(model)]))
        self._loss_scaled = any(isinstance(o, keras.optimizers.LossScaleOptimizer) for o in self._optimizers)
        if self.session.may_save("optimizer_variables"):
            self._ever_applied.update(o for o in self._optimizers if _steps_counted(o))
        if self.session.may_save("gradients", "optimizer_variables"):
            # each optimizer's apply, and that of the one it wraps, which is given the gradients applied
            for optimizer in dict.fromkeys(o for top in self._optimizers for o in _chain(top)):
                taps = _applying(optimizer) is optimizer and self.session.may_save("gradients")
                self._patches.set(optimizer, "apply", self._wrap_apply(optimizer, taps))
        if self._loop and BACKEND == "jax" and self.session.may_save("weights", "biases", "optimizer_variables"):
            for owner in (model, *self._optimizers):
                attr = "stateless_call" if owner is model else "stateless_apply"
                self._patches.set(owner, attr, self._wrap_stateless(getattr(owner, attr)))
        if self.session.may_save("outputs") or self.session.may_save("inputs"):
            for layer in model._flatten_layers(include_self=False, recursive=True):
                if isinstance(layer, keras.layers.InputLayer):
                    continue
                # a quantized layer (model.quantize) runs quantized_call in place of call
                attr = "call" if getattr(layer, "quantization_mode", None) is None else "quantized_call"
                self._patches.set(layer, attr, self._wrap_call(layer, getattr(layer, attr)))

    def _wrap_make(self, model: Any, kind: str, make: Callable[..., Any], variants: bool) -> Callable[..., Any]:
        """``make_<kind>_function``: install :class:`StepVariants` as ``model.<kind>_function`` (where they
        cannot serve, ``variants`` false: Keras's own as a :class:`ReportedStep`)."""
        attr, mode = _KINDS[kind]
        fn_attr = f"{kind}_function"

        def build() -> Callable[..., Any]:
            """One variant: Keras's own step function, built around a wrapper of its own."""
            self._making = True
            try:
                make(force=True)
                return getattr(model, fn_attr)
            finally:
                self._making = False

        def build_capturing() -> Callable[..., Any]:
            # a distinct step object for each variant (JAX caches traces by function); the
            # wrapper learns which variant it is traced in from the dispatcher (`running`)
            installed, variants = model.__dict__[attr], getattr(model, fn_attr)
            object.__setattr__(model, attr, self._wrap_step(self._steps[attr], mode))
            try:
                return build()
            finally:
                object.__setattr__(model, attr, installed)
                setattr(model, fn_attr, variants)

        @functools.wraps(make)
        def wrapped(force: bool = False) -> Any:
            if kind in self._kinds and not (self._entering or self._making):
                # a new fit/evaluate/predict begins (Keras builds its step function before any callback hears of
                # it) while the callback counts itself inside one of that kind: that one raised
                self._abandon()
                return getattr(model, f"make_{kind}_function")(force)
            if force:  # Keras's own, if the model held it, is replaced as Keras alone would
                self._keras_own.pop(fn_attr, None)
            if force and BACKEND == "tensorflow":  # traced anew, as the model is now
                self._traced_as = retraced(model)
            if getattr(model, fn_attr) is None or force:
                if variants:
                    setattr(model, fn_attr, StepVariants(build(), build_capturing, self, BACKEND == "jax", mode))
                else:
                    make(force=True)
                    setattr(model, fn_attr, ReportedStep(getattr(model, fn_attr), self, mode))
            return getattr(model, fn_attr)

        return wrapped

    def _wrap_make_function(self, make: Callable[..., Any]) -> Callable[..., Any]:
        """JAX, steps without variants: feed the step's flags into the jitted step with each batch,
        so that unsaved steps copy nothing."""

        @functools.wraps(make)
        def wrapped(step_function: Callable[..., Any], *args: Any, **kwargs: Any) -> Callable[..., Any]:
            run = make(step_function, *args, **kwargs)
            if self._making:
                return run  # a variant: fed no flags

            def tagged(state: Any, iterator: Any) -> Any:
                return run(state, FlagIterator(iterator, self))

            return tagged

        return wrapped

    @contextmanager
    def _stepping_in(self, mode: Mode, flags: Any) -> Iterator[None]:
        """Run a step function (or trace one) in ``mode``, as the variant the dispatcher runs (if any)."""
        state = self._in
        outer = state.mode, state.jax_flags, state.variant, state.extras, state.level
        state.mode, state.jax_flags = mode, flags
        self._new_step_losses()
        state.variant, state.extras, state.level = self.running, {}, trace_level()
        try:
            yield
        finally:
            state.mode, state.jax_flags, state.variant, state.extras, state.level = outer

    def _wrap_step(self, step: Callable[..., Any], mode: Mode) -> Callable[..., Any]:
        @functools.wraps(step)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            flags = None
            if len(args) >= 2 and isinstance(args[1], Tagged):  # JAX: (state, tagged batch)
                flags, args = args[1].flags, (args[0], args[1].data, *args[2:])
            with self._stepping_in(mode, flags), self._as_traced():
                out = step(*args, **kwargs)
                logs = out[0] if BACKEND == "jax" else out
                if mode != Mode.PREDICT and isinstance(logs, dict):
                    self._tap_logs(flatten_logs(logs), mode)
                if self._in.variant:  # a capturing variant: return the values taken as extra outputs
                    if BACKEND == "tensorflow" and mode == Mode.TRAIN:
                        self._return_variables(self._in.variant)
                    extras = dict(self._in.extras)
                    out = ((out[0], extras), out[1]) if BACKEND == "jax" else (out, extras)
            return out

        return wrapped

    def _as_traced(self) -> AbstractContextManager[None]:
        """While TensorFlow traces a step function: the layers trainable as in Keras's own trace (see
        :mod:`.trainable`)."""
        return as_traced(self._traced_as) if graph_mode() and self._traced_as is not None else nullcontext()

    def _new_step_losses(self) -> None:
        """Forget the layer calls and losses seen: a step (or a step function's run or trace) begins."""
        state = self._in
        state.calls, state.loss_names, state.means, state.results, state.computed = {}, set(), {}, {}, []
        state.levels, state.applied = {}, set()

    def _tap_logs(self, logs: dict[str, Any], mode: Mode) -> None:
        """The metrics a step returns, and the losses among them that no tracker or ``compute_loss`` gave.

        A scalar returned under ``...loss`` is a loss unless a tracker or ``compute_loss``
        gave that name: a raw loss (``{"d_loss": d_loss}``, the DCGAN example), or a
        tracker's ``result()`` (``{"loss": total_loss_tracker.result()}``, the VAE
        example), a running mean: then the scalar the tracker was updated with in the
        step is saved; a result of a tracker not updated with a scalar in the step is not
        (one warning names the key).
        """
        self._tap_metrics(logs, mode)
        losses = []
        for k, v in logs.items():
            key = _loss_name(k, mode)
            if not k.endswith("loss") or key in self._in.loss_names or not is_scalar(v):
                continue
            result = self._in.results.get(id(v))
            if result is None or result[0] is not v:
                losses.append((self._run_slot(key, _loss_source(self._model)), v))
            elif id(result[1]) in self._in.means:
                losses.append((self._run_slot(key, result[1]), self._in.means[id(result[1])][1]))
            elif key not in self._running_means:
                self._running_means.add(key)
                logger.warning(
                    "tensortap: the step returns %s, the running mean of %r, not updated with a scalar in the step; "
                    "it is not saved as %s (record_loss saves the step's own value)",
                    k,
                    getattr(result[1], "name", "a Mean"),
                    key,
                )
        self._tap("losses", losses)

    def _tap_metrics(self, logs: dict[str, Any], mode: Mode, source: Any = None) -> None:
        """The metrics among a step's ``logs``, every key but ``loss``: ``metrics/<key>`` (``metrics/val_<key>``
        in EVAL steps), as Keras's logs name them.

        ``source``: the model whose ``train_on_batch``/``test_on_batch`` returned ``logs``
        in a loop; its metrics are kept apart from another model's, and from its own
        other runs in the step, as losses are (:meth:`_run_slot`).
        """
        prefix = "metrics/val_" if mode == Mode.EVAL else "metrics/"
        items = [(f"{prefix}{k}", v) for k, v in logs.items() if k != "loss" and is_tensor(v)]
        if source is None:
            self._tap("metrics", [(Slot(name), v) for name, v in items])
        else:
            self._tap("metrics", [(self._run_slot(name, source, "returned"), v) for name, v in items])

    def _warn_if_not_attached(self) -> None:
        """In a loop, a ``Mean`` updated for the first time: if a model's ``train_on_batch``/``test_on_batch``
        updates it and the callback is attached neither to that model nor to one holding it, say (once
        per model) that only its losses are saved: its metrics, weights and gradients are not."""
        frame = _on_batch_frame(sys._getframe(2), ("train_on_batch", "test_on_batch"))
        if frame is None:
            return
        model = frame.f_locals.get("self")
        if isinstance(model, keras.Model) and id(model) not in self._batch_models | self._unattached:
            self._unattached.add(id(model))
            logger.warning(
                "tensortap: model %r runs %s in a step, but the callback is attached neither to it nor to "
                "a model that holds it: only its losses are saved (not its metrics, weights or "
                "gradients); attach the callback to a model that holds it",
                model.name,
                frame.f_code.co_name,
            )

    def _wrap_on_batch(self, model: Any, on_batch: Callable[..., Any]) -> Callable[..., Any]:
        """``train_on_batch``/``test_on_batch`` of ``model`` in a loop: in a saved step, the metrics it returns
        (asked for as a dict, and returned as the caller asked)."""
        signature = inspect.signature(on_batch)

        @functools.wraps(on_batch)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            mode = self._in.mode
            if mode not in (Mode.TRAIN, Mode.EVAL) or not self.session.saving("metrics"):
                return on_batch(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            as_dict = bound.arguments.get("return_dict", False)
            bound.arguments["return_dict"] = True
            logs = on_batch(*bound.args, **bound.kwargs)  # Python floats (non-scalars as NumPy arrays)
            self._tap_metrics({k: np.asarray(v) if isinstance(v, float) else v for k, v in logs.items()}, mode, model)
            return logs if as_dict else model._flatten_metrics_in_order(logs)

        return wrapped

    def _wrap_loss(self, model: Any) -> Callable[..., Any]:
        compute_loss = model.compute_loss

        @functools.wraps(compute_loss)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            loss = compute_loss(*args, **kwargs)
            if self._in.mode in (Mode.TRAIN, Mode.EVAL) and loss is not None and not is_symbolic(loss):
                name = _loss_name("loss", self._in.mode)
                self._in.loss_names.add(name)
                source = _loss_source(model)
                self._in.computed.append((loss, name, source))
                self._tap("losses", [(self._run_slot(name, source, "computed"), _unscaled(loss))])
            return loss

        return wrapped

    def _run_slot(self, key: str, source: Any, claim: str | None = None) -> Slot:
        """Where a loss named ``key`` from ``source`` (a loss tracker) goes, or a metric a model's
        ``train_on_batch``/``test_on_batch`` returned (``source``: that model): one call of ``key``
        per source and run of a step function.

        Two models trained in one step (a GAN's ``d.train_on_batch`` and
        ``combined.train_on_batch``) each give ``losses/loss`` through their own
        tracker: numbered by the order the callback first saw them, they are
        saved as ``losses/loss:0`` and ``losses/loss:1`` (one alone: ``losses/loss``).
        ``compute_loss`` of a model counts as its tracker (both give the same value).
        One model trained twice in a step (``d.train_on_batch(real)``, then
        ``d.train_on_batch(fake)``) gives a loss per run where the runs are eager: a
        run's loss is ``claim``-ed once by ``compute_loss`` ("computed") and once by the
        tracker's update ("tracked"), its metrics once by ``train_on_batch`` ("returned"); a
        second claim of any starts the next run. A
        compiled function gets its slots when traced, once however often it runs
        (:meth:`TFGraphTaps.written` warns about a second run in a step). A loss given
        without a claim (returned, recorded) goes with the run in progress.
        """
        runs = self._runs.setdefault((key, id(source)), [])
        if claim is not None and trace_level() is None:
            if not runs or claim in runs[-1]:
                runs.append(set())
            runs[-1].add(claim)
        nth = max(len(runs) - 1, 0)
        sources = self._run_sources.setdefault(key, [])
        for i, (known, n) in enumerate(sources):
            if known is source and n == nth:
                return Slot(key, i)
        sources.append((source, nth))
        return Slot(key, len(sources) - 1)

    def _on_mean_event(self, metric: Any, value: Any, is_result: bool) -> None:
        """A ``Mean`` updated in a step (``value``: what it was given), or its ``result()`` (``value``) taken.

        Updated with a scalar, it is remembered (a step may return its result); if its
        name ends in ``loss`` the scalar is a loss.
        """
        if self._in.mode not in (Mode.TRAIN, Mode.EVAL):
            return
        if is_result:
            self._in.results[id(value)] = (value, metric)
            return
        if self._batch_models and id(metric) not in self._means_seen:
            self._means_seen.add(id(metric))
            self._warn_if_not_attached()
        if not is_scalar(value) or is_symbolic(value):
            return
        self._in.means[id(metric)] = (metric, value)
        name = str(getattr(metric, "name", ""))
        if name.endswith("loss"):
            key = _loss_name(name, self._in.mode)
            self._in.loss_names.add(key)
            # compute_loss's value again: its model's own tracker (under a strategy of several replicas
            # updated with it scaled for the replicas and back, another tensor), or a tracker given it
            computed = self._in.computed
            if not any(k == key and (source is metric or _same_value(value, loss)) for loss, k, source in computed):
                self._tap("losses", [(self._run_slot(key, metric, "tracked"), value)])

    def _wrap_apply(self, optimizer: Any, taps: bool) -> Callable[..., Any]:
        """``optimizer.apply``, noting that it applied (:meth:`_has_applied`); ``taps``: telling the gradients."""
        apply = optimizer.apply

        @functools.wraps(apply)
        def wrapped(grads: Any, trainable_variables: Any = None) -> Any:
            if len(grads):  # (Keras applies no gradients as nothing)
                self._ever_applied.add(optimizer)
            if taps and self._in.mode == Mode.TRAIN:
                self._note_apply(optimizer)
                variables = trainable_variables if trainable_variables is not None else optimizer._trainable_variables
                scale = getattr(optimizer, "loss_scale_factor", None)  # apply divides the gradients by it
                self._tap(
                    "gradients",
                    [
                        (Slot(f"gradients/{self._variable_name(v)[0]}"), g if scale is None else g / scale)
                        for g, v in zip(grads, variables, strict=True)
                        # a variable overwritten with its "gradient" (float8 scales, amax histories): no gradient
                        if g is not None and not getattr(v, "overwrite_with_gradient", False)
                    ],
                )
            return apply(grads, trainable_variables)

        return wrapped

    def _wrap_stateless(self, method: Callable[..., Any]) -> Callable[..., Any]:
        """A JAX loop's ``model.stateless_call`` or ``optimizer.stateless_apply``: the loop keeps the weights in
        a state of its own, and the variables they are read from do not move; one warning, at its first call
        not made by a ``train_on_batch``, ``test_on_batch`` or ``predict_on_batch`` (which give the variables
        the state they end with)."""

        @functools.wraps(method)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if not self._warned_stateless and _on_batch_frame(sys._getframe(1), _ON_BATCH) is None:
                self._warned_stateless = True
                logger.warning(
                    "tensortap: the loop calls %s: it keeps the weights in a state of its own, and the model's "
                    "variables, from which weights and optimizer variables are saved, do not move: assign the "
                    "state back to them (variable.assign) after each step to have them saved as trained",
                    method.__name__,
                )
            return method(*args, **kwargs)

        return wrapped

    def _note_apply(self, optimizer: Any) -> None:
        """An ``apply`` of ``optimizer``: a second one in a saved step (eager), or in a trace of a step that returns
        what it captures as extra outputs (``fit`` compiled), replaces the gradients of the first; one warning per
        optimizer (a compiled step without extra outputs is warned about by :meth:`TFGraphTaps.written`)."""
        variant = self._in.variant
        if trace_level() is not None:
            if variant is None or "gradients" not in variant:
                return
            applied, where = self._in.applied, "each run of the compiled step"
        elif not self.session.saving("gradients") or replica_now()[1] > 1:
            return  # (the applies of a strategy's replicas: see _eager_replicas)
        else:
            applied, where = self._applied, f"step {self.hook.step}"
        if id(optimizer) in applied and id(optimizer) not in self._warned_reapplied:
            self._warned_reapplied.add(id(optimizer))
            logger.warning(
                "tensortap: optimizer %s applied gradients more than once in %s; its gradients/ values are those "
                "of the last apply (give each apply a step of its own to keep each)",
                getattr(optimizer, "name", type(optimizer).__name__),
                where,
            )
        applied.add(id(optimizer))

    def _wrap_call(self, layer: Any, call: Callable[..., Any]) -> Callable[..., Any]:
        """``call``, the method that runs ``layer`` (``call``, or ``quantized_call``), telling its inputs and
        outputs."""

        @functools.wraps(call)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            out = call(*args, **kwargs)
            if self._in.mode is not None:
                outputs = flatten("", out, is_tensor)
                if outputs and is_symbolic(outputs[0][1]):
                    return out  # Keras building the model, not a call of the step: not counted
                # the path, known once the layer is built: "block/inner" for a layer nested in "block"
                path = self._renamed.get(id(layer)) or self._name(_path(layer))
                i = self._call_index(path)
                level = self._in.levels[path] = trace_level()
                if kwargs.get("mask") is not None and isinstance(layer, keras.layers.RNN):
                    cell = self._renamed.get(id(layer.cell)) or self._name(_path(layer.cell))
                    if self._in.levels.get(cell, level) != level:  # a compiled loop's body: its last iteration kept
                        self._warn_masked(path)
                if args:
                    inputs = flatten("", args[0], is_tensor)
                    self._tap("inputs", [(Slot(f"inputs/{path}", i, sub), v) for sub, v in inputs])
                self._tap("outputs", [(Slot(f"outputs/{path}", i, sub), v) for sub, v in outputs])
            return out

        return wrapped

    def _warn_masked(self, path: str) -> None:
        """A recurrent layer at ``path`` given a mask, whose cell ran in a compiled loop (a TensorFlow ``while``
        body, a JAX ``lax.scan``): one warning per layer that its cell's values are not the layer's output (Keras
        keeps the output of each sequence's last unmasked timestep, not of the last one). A loop run in Python
        keeps every call of the cell: nothing to warn about."""
        if path in self._warned_masked or "outputs" not in self.hook.included:
            return
        self._warned_masked.add(path)
        logger.warning(
            "tensortap: layer %s receives a mask: its cell's values (outputs/%s/...) are those of its call at the "
            "loop's last timestep, computed on the padding of a sequence that ends earlier, while the layer's "
            "output (outputs/%s) is that of each sequence's last unmasked timestep: they differ there",
            path,
            path,
            path,
        )

    def _call_index(self, path: str) -> int:
        """The index of this call of the layer at ``path`` in the running step (or in the graph being traced).

        TensorFlow may trace one function twice in a step (a ``tf.function`` that creates
        variables on its first call), and a strategy of several replicas traces the step once
        for each: each trace counts its own calls.
        """
        key = f"{id(tf.compat.v1.get_default_graph())}:{replica_now()}:{path}" if graph_mode() else path
        i = self._in.calls.get(key, 0)
        self._in.calls[key] = i + 1
        return i

    def _capturable(self, items: list[tuple[Slot, Any]]) -> list[tuple[Slot, Any]]:
        """``items`` without what cannot be stored (ragged, sparse, string), each named once in a warning."""
        kept = []
        for slot, value in items:
            why = uncapturable(value)
            if why is None:
                kept.append((slot, value))
            elif slot.label() not in self._skipped:
                self._skipped.add(slot.label())
                logger.warning("tensortap: %s is %s; it is not captured (everything else is)", slot.label(), why)
        return kept

    def _tap(self, collection: str, items: list[tuple[Slot, Any]]) -> None:
        """Hand ``items`` of ``collection`` over from inside a step, in the way the step allows."""
        if not items or not self.session.may_save(collection):
            return
        variant = self._in.variant
        if variant is not None and collection not in variant:
            return  # a step variant built without this collection (the plain one takes nothing)
        try:
            traced = graph_mode() or any(is_tracer(v) for _, v in items)
            if variant is None and not traced and not self.session.saving(collection):
                return  # a step run eagerly that does not save this collection: nothing to check or copy
            if not traced and self._eager_replicas():
                return
            items = self._capturable(items)
            if not items:
                return
            if variant is not None:
                own = trace_level() == self._in.level
                nested = []
                for slot, value in items:  # an extra output of the step where it can be one
                    at_step = value if own else at_level(value, self._in.level)
                    if at_step is not None:
                        self._in.extras[self._extra_key(collection, slot)] = as_output(at_step)
                    else:  # this later value (read before the extras) must win
                        self._in.extras.pop(self._extra_key(collection, slot), None)
                        nested.append((slot, value))
                if not nested:
                    return
                items = nested
            slots = [s for s, _ in items]
            tensors = [v for _, v in items]
            if graph_mode():
                if self._graph is not None:
                    self._graph.tap(collection, items)
            elif traced:
                self._callbacks_traced = True
                deliver = functools.partial(self._deliver, collection, slots, mode=self._in.mode)
                if self._in.jax_flags is None:  # a step fed without flags: hand over every time
                    jax.debug.callback(deliver, tensors)
                else:
                    flag = self._in.jax_flags[STEP_COLLECTIONS.index(collection)]
                    if is_tracer(flag):  # a compiled step: whether it saves is known when it runs
                        jax.lax.cond(flag, lambda t: jax.debug.callback(deliver, t), lambda t: None, tensors)
                    elif flag:  # a step run eagerly: known now (under jax.value_and_grad, a callback under
                        jax.debug.callback(deliver, tensors)  # lax.cond in a lax.scan body is lost, jax#28738)
            else:
                graph = self._graph
                mark = graph.tick() if graph is not None and graph.taps else None  # beside graphs: when
                mode = self._in.mode  # None: given outside a step function, to the open step (see _takes)
                step_mode = mode or self.hook.mode
                values = [hold(v, copy=not self._as_given.get((step_mode, collection, s), False)) for s, v in items]
                self._deliver(collection, slots, values, mark, mode)
        except Exception as exc:
            self.hook.fail(exc, f"cannot capture {collection} ({items[0][0].label()}, ...)")

    def _eager_replicas(self) -> bool:
        """Whether a value taken now comes from one of several replicas of a step run eagerly (a strategy's
        ``run_eagerly=True``): such values are not captured (one warning), the step's own are not at hand."""
        replicas = replica_now()[1]
        if replicas > 1 and not self._warned_eager_replicas:
            self._warned_eager_replicas = True
            logger.warning(
                "tensortap: a step run eagerly under a strategy of %d replicas gives the values computed in it "
                "(%s) of each replica: they are not captured (compile the model without run_eagerly=True to "
                "capture the step's own); the variables are",
                replicas,
                ", ".join(STEP_COLLECTIONS),
            )
        return replicas > 1

    def _extra_key(self, collection: str, slot: Slot) -> str:
        """The key of ``slot`` among a step's extra outputs (one per slot and collection, for the callback's life)."""
        key = self._extra_keys.get((collection, slot))
        if key is None:
            key = self._extra_keys[(collection, slot)] = str(len(self._extra_keys))
            self._extra_slots[key] = (collection, slot)
        return key

    def _deliver(
        self, collection: str, slots: list[Slot], values: list[Any], mark: Any = None, mode: Mode | None = None
    ) -> None:
        """Keep values handed over in a step until it ends (JAX callbacks arrive on another thread);
        ``mark``: when they came on the clock of TensorFlow's graphs, if any has taps; ``mode``: the
        mode of the step function that computed them."""
        if self._accepting and self._takes(mode) and self.session.saving(collection):
            self._arrived.append((collection, slots, values, mark))


def _same_value(value: Any, computed: Any) -> bool:
    """Whether ``value`` is the tensor ``computed`` (on JAX also: the primal, in an enclosing trace, of that
    value computed inside ``jax.value_and_grad``): a tracker of its own updated with ``compute_loss``'s value
    gives that value again, not a second loss."""
    while computed is not None:
        if computed is value:
            return True
        computed = getattr(computed, "primal", None)
    return False


def _unscaled(loss: Any) -> Any:
    """``compute_loss``'s value as its replica's loss: under a TensorFlow strategy of several replicas, Keras
    scales it down by their number (their gradients are summed), and gives its tracker the loss scaled back."""
    replicas = tf.distribute.get_strategy().num_replicas_in_sync if BACKEND == "tensorflow" else 1
    return loss if replicas == 1 else keras.ops.multiply(loss, keras.ops.cast(replicas, loss.dtype))


def _loss_source(model: Any) -> Any:
    """Where the losses of ``model`` come from: the ``Mean`` its ``compute_loss``'s value updates (Keras's
    ``loss`` tracker), or the model itself before it is compiled."""
    tracker = getattr(model, "_loss_tracker", None)
    return model if tracker is None else tracker


def _on_host(extras: dict[str, Any]) -> dict[str, Any]:
    """A capturing step's extra outputs, ready to offer: on JAX with a device, fetched to the host in
    one transfer (``jax.device_get``); as they are elsewhere, and on a JAX whose only backend is the CPU,
    whose arrays already live in host memory (``numpy.asarray`` of one is a view of it, as
    ``jax.device_get``'s is, in 7 us against 60: 0.3-0.6 ms of CPU a saved step of the bench's MLP)."""
    if BACKEND == "jax" and jax.default_backend() != "cpu":
        return dict(jax.device_get(extras))
    return extras


# optimizers warned about by _applied (a warning each)
_WARNED_UNCOUNTED: weakref.WeakSet[Any] = weakref.WeakSet()


def _applied(optimizer: Any) -> int:
    """The optimizer's ``apply`` calls, one per execution of a ``fit``: its ``iterations`` (a
    ``LossScaleOptimizer``'s, its inner optimizer's), which with ``gradient_accumulation_steps=N`` counts
    its updates, one every N calls: its own count of calls then, Keras's private ``_iterations`` (Keras 3
    has no public one); a Keras without it gets one warning and the count of updates."""
    *_, inner = _chain(optimizer)
    counter = inner.iterations
    if getattr(inner, "gradient_accumulation_steps", None):
        calls = getattr(inner, "_iterations", None)
        if calls is not None:
            counter = calls
        elif inner not in _WARNED_UNCOUNTED:
            _WARNED_UNCOUNTED.add(inner)
            logger.warning(
                "tensortap: optimizer %s accumulates gradients but has no count of its apply calls (_iterations) "
                "in this Keras: a fit that goes on from its iterations numbers its TRAIN steps by its updates",
                getattr(inner, "name", type(inner).__name__),
            )
    return int(keras.ops.convert_to_numpy(counter))


def _steps_done(iterations: int, n: int, epoch: int | None, steps: int | None) -> int:
    """The steps a model was trained so far, as Keras counts them: its optimizer's ``iterations`` (a model
    restored by ``keras.models.load_model`` has those of the run it was saved in; 0 without an optimizer),
    one step per execution of ``n`` (``steps_per_execution``) batches. Where a callback's first ``fit`` starts
    numbering.

    A ``fit`` of ``steps`` batches an epoch that begins at ``epoch`` after as many whole epochs of those
    (``iterations == epoch * steps``) counts ``ceil(steps / n)`` executions an epoch, as Keras ran them (the
    last one partial); otherwise ``iterations // n``, which is one less per epoch that ended in a partial
    execution.

    Not at a later ``fit`` of the same callback, which counts on from the steps Keras ran: compiled on
    TensorFlow, over data of unknown length, ``iterations`` also counts the step that found no batch at
    each epoch's end.
    """
    if epoch and steps and iterations == epoch * steps:  # whole epochs, each ending in a partial execution
        return epoch * -(-steps // n)
    return iterations // n


def _ran_out(error: BaseException) -> bool:
    """Whether ``error`` is how a step function says that no batch was left (Keras ends the epoch)."""
    if BACKEND == "tensorflow" and isinstance(error, tf.errors.OutOfRangeError):
        return True
    return isinstance(error, StopIteration)


def _variants_serve(model: Any, kind: str) -> bool:
    """Whether Keras's ``make_<kind>_function`` of ``model`` can be built as :class:`StepVariants`.

    Only a compiled step (TensorFlow's ``tf.function``, JAX's jit) gains from them;
    ``predict`` with ``steps_per_execution > 1`` concatenates its outputs and a
    TensorFlow strategy of several replicas reduces them (extras included).
    """
    if kind == "predict" and model.steps_per_execution > 1:
        return False
    if BACKEND == "tensorflow":
        return not model.run_eagerly and model.distribute_strategy.num_replicas_in_sync == 1
    if BACKEND == "jax":
        return not model.run_eagerly and bool(model.jit_compile)
    return False


def _applying(optimizer: Any) -> Any:
    """The optimizer whose ``apply`` is given the gradients ``optimizer`` applies: a ``LossScaleOptimizer``'s
    inner one, which it gives them divided by the loss scale, on the steps whose gradients are finite (on the
    others it applies nothing); its own ``apply`` gets them multiplied by the scale, and on JAX is not
    called (its ``stateless_apply`` calls the inner one's): the last of :func:`_chain`."""
    *_, innermost = _chain(optimizer)
    return innermost


def _chain(optimizer: Any) -> Iterator[Any]:
    """``optimizer``, then the optimizers it wraps (a ``LossScaleOptimizer``'s inner one), outermost first."""
    yield optimizer
    while isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
        yield optimizer


def _steps_counted(optimizer: Any) -> bool:
    """Whether ``optimizer``'s ``iterations`` counts steps applied (read from its variable, outside a step)."""
    return int(keras.ops.convert_to_numpy(optimizer.iterations)) > 0


def _optimizers_of(model: Any) -> list[Any]:
    """The model's optimizer and every other optimizer it holds as an attribute (a GAN's two)."""
    found = [model.optimizer] if getattr(model, "optimizer", None) is not None else []
    found += [v for v in vars(model).values() if isinstance(v, keras.optimizers.Optimizer)]
    return list(dict.fromkeys(found))


def _path(obj: Any) -> str:
    """Keras's path of a layer or variable (``"block/inner"``, ``"dense/kernel"``), else its name."""
    return str(getattr(obj, "path", None) or obj.name)


_ON_BATCH = ("train_on_batch", "test_on_batch", "predict_on_batch")


def _on_batch_frame(frame: FrameType | None, names: Collection[str]) -> FrameType | None:
    """The nearest frame from ``frame`` up of a method of a Keras model named one of ``names`` (its
    ``train_on_batch``...), or None (a frame walk: off the common path only)."""
    while frame is not None:
        if frame.f_code.co_name in names and isinstance(frame.f_locals.get("self"), keras.Model):
            return frame
        frame = frame.f_back
    return None


def _tree_names(model: Any, name: Callable[[str], str]) -> dict[int, str]:
    """Tree names of the layers and variables of ``model`` whose name another one shares, by id, and
    of the variables of its ``keras.layers.TorchModuleWrapper`` layers.

    Keras names a layer or variable by its path where it was built: the layers of two
    functional sub-models built alike (``e1`` and ``e2``, each with a layer ``dense``)
    are both ``dense``, their kernels both ``dense/kernel``. These are named by their
    place under ``model`` instead: ``e1/dense``, ``e1/dense/kernel``, ``e2/dense/kernel``
    (a layer reached twice keeps its first place). ``name`` makes a Keras path relative
    to the model.

    A ``TorchModuleWrapper`` makes a variable of each parameter of its torch module
    without a name (Keras numbers them in the process: ``variable_4``): each is named by
    the layer's name and the parameter's in the module (``named_parameters``): ``tw/0.weight``.

    Parameters
    ----------
    model
        The Keras model captured.
    name
        The name of a Keras path (the model's own name left out).

    Returns
    -------
    dict[int, str]
        The tree name of each such layer and variable, by ``id``.
    """
    tree: dict[int, tuple[Any, str]] = {}

    def walk(layer: Any, prefix: str) -> None:
        for sub in layer._flatten_layers(include_self=False, recursive=False):
            if id(sub) in tree:
                continue
            path = f"{prefix}{sub.name}"
            tree[id(sub)] = (sub, path)
            for v in [*getattr(sub, "_trainable_variables", []), *getattr(sub, "_non_trainable_variables", [])]:
                tree.setdefault(id(v), (v, f"{path}/{v.name}"))
            walk(sub, f"{path}/")

    walk(model, "")
    shared: dict[str, list[int]] = {}
    for key, (obj, _) in tree.items():
        shared.setdefault(name(_path(obj)), []).append(key)
    renamed = {key: tree[key][1] for keys in shared.values() if len(keys) > 1 for key in keys}
    for layer, _ in tree.values():
        if isinstance(layer, keras.layers.TorchModuleWrapper):
            prefix = renamed.get(id(layer)) or name(_path(layer))
            parameters = {id(p): n for n, p in layer.module.named_parameters()}
            for v in layer.variables:  # each wraps its parameter itself (torch backend)
                if id(v.value) in parameters:
                    renamed[id(v)] = f"{prefix}/{parameters[id(v.value)]}"
    return renamed


def _numbered(names: list[str]) -> list[str]:
    """``names`` where each name given more than once is numbered in order: ``name:0``, ``name:1``, ...

    The optimizer variables of two variables of the same Keras path
    (``adam/dense_kernel_momentum`` twice) stay apart.
    """
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    seen: dict[str, int] = {}
    numbered = []
    for n in names:
        if counts[n] > 1:
            seen[n] = seen.get(n, -1) + 1
            n = f"{n}:{seen[n]}"
        numbered.append(n)
    return numbered

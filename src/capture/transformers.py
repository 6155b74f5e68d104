"""Hugging Face Transformers adapter: a ``TrainerCallback`` that captures a ``Trainer``'s training.

Use it through :mod:`tensortap.transformers`::

    import tensortap.transformers as tth
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val,
                      callbacks=[tth.Callback(out_dir)])
    trainer.train()

Steps (see :mod:`tensortap.capture.trainers` for the names):

- ``TRAIN``: one optimizer step (``gradient_accumulation_steps`` batches).
  Gradients are read at ``on_pre_optimizer_step``, after the Trainer clipped
  them (``max_grad_norm``) and unscaled them: what ``optimizer.step()``
  applies, of the parameters it updates. Weights and biases are read after
  the step. What the Trainer logs right after the step (every
  ``logging_steps``: ``loss``, averaged over the steps since the last log,
  each what the Trainer makes of its batches, ``grad_norm`` before clipping,
  ``learning_rate``, ``epoch``) is saved in it: ``losses/loss``, ``metrics/grad_norm``, ...
  So is the log of an epoch (``logging_strategy="epoch"``, written after
  ``on_epoch_end``): it goes to the epoch's last step, the ``step`` that
  ``trainer.state.log_history`` gives it.
- ``EVAL``: one evaluation run: the metrics ``evaluate`` returned
  (``losses/eval_loss``, ``metrics/eval_accuracy``, ``metrics/eval_runtime``, ...).
- ``PREDICT``: one ``predict`` call: the metrics it computed (``losses/test_loss``, ...).
- ``GLOBAL``: what is logged apart from a step: the summary at the end of
  training (``losses/train_loss``, ``metrics/train_runtime``, ...).

Each process writes ``worker_<args.process_index>``. A stop request (``tensortap
rules --stop-training``, ``Trial.request_stop``, an in-process rule) sets
``control.should_training_stop``: ``train`` ends after the current step.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import weakref
from collections.abc import Iterable, Mapping
from types import CodeType, FrameType
from typing import Any, ClassVar

try:
    import torch
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_callback import CallbackHandler
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError('tensortap.transformers needs Transformers: pip install "tensortap[transformers]"') from exc
if not hasattr(TrainerCallback, "on_pre_optimizer_step"):  # pragma: no cover - depends on the environment
    raise ImportError('tensortap.transformers needs Transformers 4.46 or newer: pip install "tensortap[transformers]"')

from ..config import SaveConfig
from ..modes import Mode
from ..trial.rules.inprocess import RuleSet
from . import trainers
from .core import check_rules, warn_next_run
from .stop import agreed, log_stop
from .torch.events import all_reduce_max, optimized_parameters, saved_parameters, unwrap
from .trainers import StepCapture, check_hook_kwargs, check_stop_sync_steps, open_run, same_logged
from .writer import logger

__all__ = ["Callback", "Hook"]


class Hook(trainers.Hook):
    """The capture core of the Trainer: by default also what the Trainer logs, at every step it logs it.

    The Trainer logs after its step ``k * logging_steps`` (``TRAIN`` step ``k * logging_steps - 1``),
    seldom on an every-100th ``TRAIN`` step that the default saves (``logging_steps=10``: never);
    without a ``save_config``,
    the ``losses`` and ``metrics`` collections are saved at every step (only the steps with a log
    hold any). A ``save_config`` given applies to them too, unless ``collection_configs`` sets
    their own; a configuration of theirs given without a ``save_config`` keeps every step
    (:attr:`collection_defaults`, as XGBoost's coarser defaults).

    Parameters
    ----------
    out_dir
        Local directory or fsspec URL of the trial.
    save_config
        As :class:`tensortap.capture.trainers.Hook`.
    **kwargs
        As :class:`tensortap.capture.Hook`.
    """

    collection_defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "losses": {"save_config": SaveConfig(save_interval=1)},
        "metrics": {"save_config": SaveConfig(save_interval=1)},
    }


STAMPS = frozenset({"epoch", "num_input_tokens_seen"})
"""What ``Trainer.log`` adds to every log, a user's too: the step's last is its value, without a warning."""


class TrainInterrupted(Exception):
    """A ``train()`` raised in a step; seen at the next event from outside it (``train()`` called again, an
    ``evaluate()``)."""


_HANDLER_CODES = frozenset(f.__code__ for f in vars(CallbackHandler).values() if inspect.isfunction(f))


def _handler_frame(frame: FrameType | None) -> FrameType | None:
    """The innermost frame of the Trainer's ``CallbackHandler`` at or above ``frame``: the one running the event
    being handled; None when no ``CallbackHandler`` runs it (the callback's methods called by hand)."""
    while frame is not None and frame.f_code not in _HANDLER_CODES:
        frame = frame.f_back
    return frame


def _dispatcher() -> tuple[int, CodeType] | None:
    """The frame (its id and code) that has the Trainer's ``CallbackHandler`` run the event being handled: at
    ``on_train_begin``, the training loop, on the stack until ``train()`` returns or raises. None when no
    ``CallbackHandler`` runs it."""
    frame = _handler_frame(sys._getframe(1))
    while frame is not None and frame.f_code in _HANDLER_CODES:
        frame = frame.f_back
    return None if frame is None else (id(frame), frame.f_code)


def _handler() -> CallbackHandler | None:
    """The ``CallbackHandler`` running the event being handled (one per ``Trainer``); None when none does."""
    frame = _handler_frame(sys._getframe(1))
    handler = None if frame is None else frame.f_locals.get("self")
    return handler if isinstance(handler, CallbackHandler) else None


def _running(at: tuple[int, CodeType]) -> bool:
    """Whether the frame ``at`` (:func:`_dispatcher`) is on this thread's stack: its code runs still."""
    frame_id, code = at
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if id(frame) == frame_id and frame.f_code is code:
            return True
        frame = frame.f_back
    return False


def _described(model: torch.nn.Module) -> str:
    """A model's name for a warning: where it was loaded from, else its class."""
    return repr(getattr(model, "name_or_path", "") or type(model).__name__)


class _Log(dict[str, Any]):
    """A copy of what ``on_log`` got, with the mapping it was copied from (:attr:`source`).

    ``Trainer.evaluate`` logs the very dict it then gives ``on_evaluate``; a callback may add to
    it, or change it, between the two (a perplexity from ``eval_loss``): the evaluation's log is
    found by that identity, not by its values.
    """

    def __init__(self, source: Mapping[str, Any]) -> None:
        super().__init__(source)
        self.source = source


def _holds(logged: Mapping[str, Any], metrics: Mapping[str, Any]) -> bool:
    """Whether ``logged`` is the log of the run whose ``metrics`` these are.

    It is when it was copied from ``metrics`` itself (``Trainer.evaluate`` logs the very dict it
    then gives ``on_evaluate``, which a callback may have changed since), or else holds every one
    of them: a value is the same object in both, so a NaN metric (a Pearson correlation of constant
    predictions, an ``eval_loss`` that overflowed) matches itself although ``nan != nan``.
    """
    if isinstance(logged, _Log) and logged.source is metrics:
        return True
    return all(k in logged and same_logged(logged[k], v) for k, v in metrics.items())


def _is_training_log(logs: Mapping[str, Any]) -> bool:
    """Whether ``logs`` is the Trainer's log of the training loss (``_maybe_log_save_evaluate``).

    It always holds ``loss`` and ``learning_rate`` (``grad_norm``, ``epoch``, ... may follow);
    the summary of ``train()`` has ``train_loss`` instead, an evaluation ``eval_loss``.
    """
    return "loss" in logs and "learning_rate" in logs


def _logs_included(hook: trainers.Hook) -> bool:
    """Whether ``hook`` saves what the Trainer logs at all: ``losses`` or ``metrics`` is among its collections."""
    return hook.save_all or not {"losses", "metrics"}.isdisjoint(hook.included)


class Callback(TrainerCallback):
    """Capture a Transformers ``Trainer``'s ``train`` and ``evaluate`` into a tensortap trial.

    The hook that writes is created at the first training or evaluation event
    and closed at ``on_train_end``. An ``evaluate`` or ``predict`` outside
    ``train`` (alone, or after it, also after one that raised) is written and closed at once, into the same
    run: its steps are numbered on from the ones before. The events of another model start the trial's
    next run (:meth:`_one_model_a_run`). A ``TRAIN`` step is written once the
    logs that follow it are in: at the next step, or once an evaluation's first batch is done if
    the step's log came (the Trainer logs before it evaluates), so an evaluation that raises does
    not lose it. A step without its log yet may get it after an evaluation or prediction at it (the
    log of an epoch, after an evaluation at its last step; a ``predict`` in a callback's
    ``on_step_end``): it is written once its log, the epoch's end or the next step comes, and the
    run's step after it (at exit, if the script dies first).

    Parameters
    ----------
    out_dir
        Local directory or fsspec URL of the trial.
    stop_sync_steps
        With several processes, they agree on a stop request every this many ``TRAIN`` steps.
    **hook_kwargs
        ``save_config``, ``include_collections``, ``reduction_config``, ``rules``, ...
        as :class:`tensortap.capture.Hook`, and ``stop_poll_seconds`` (minimum seconds
        between two looks for a stop request, default 1); checked here, at construction. The
        default saves every 100th ``TRAIN`` step, what the Trainer logs at every step it logs it
        (:class:`Hook`), and every ``EVAL`` and ``GLOBAL`` step.
    """

    def __init__(self, out_dir: str | os.PathLike[str], *, stop_sync_steps: int = 10, **hook_kwargs: Any) -> None:
        self.stop_sync_steps = check_stop_sync_steps(stop_sync_steps)
        self.out_dir = os.fspath(out_dir)
        self.hook_kwargs = hook_kwargs
        check_hook_kwargs(self.out_dir, hook_kwargs)
        self.hook: trainers.Hook | None = None
        self._steps: StepCapture | None = None
        self._previous: trainers.Hook | None = None  # closed: a later event continues its run
        self._rules = RuleSet(check_rules(hook_kwargs.get("rules")))
        self._run_rules = self._rules.for_new_run()  # the rules of this run
        self._if_exists: str | None = None  # "new_run" once another model's steps went to the trial's next run
        # the model of the last event, its name, and the CallbackHandler of its Trainer (_one_model_a_run)
        self._model: tuple[weakref.ref[torch.nn.Module], str, weakref.ref[CallbackHandler] | None] | None = None
        self._training = False  # between on_train_begin and on_train_end, or the train() after it that raised
        self._loop: tuple[int, CodeType] | None = None  # the training loop of that train() (_dispatcher)
        self._raised: str | None = None  # the train() before raised: the run's end reason is exception
        self._pending = False  # a TRAIN step ended; logs may still come for it, until an evaluation begins
        self._stepping = False  # the open TRAIN step reached its optimizer step (its gradients were offered)
        self._stepped = False  # and its optimizer step returned (on_optimizer_step): the step is trained
        self._epoch_ended = False  # the pending step ended its epoch: the Trainer may log the epoch for it
        # a step's log may come after an evaluation or prediction at it (the epoch's log, after an evaluation at
        # the epoch's last step; a predict in a callback's on_step_end): the runs and logs of those are kept
        # here and written after the step (_holding)
        self._hold = False
        self._held: list[tuple[Mode, dict[str, Any]]] = []
        self._held_logs: list[_Log] = []
        self._logs: list[_Log] = []
        self._warned_twice: set[str] = set()  # keys logged twice in a step, warned about
        self._warned_unsaved = False  # logs of a TRAIN step the hook does not save, warned about

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "hook": None, "_steps": None, "_previous": None, "_model": None, "_loop": None}

    def _open(self, args: TrainingArguments, model: torch.nn.Module | None) -> StepCapture:
        """The step capture of this run, opened at the first event (again after :meth:`close`: the run goes on);
        the trial's next run for another ``model`` than the run's (:meth:`_one_model_a_run`)."""
        self._end_if_train_raised()
        before = None if model is None else self._one_model_a_run(unwrap(model))
        if self._steps is None:
            kwargs = {"rank": args.process_index, "world_size": args.world_size, **self.hook_kwargs}
            kwargs["rules"] = self._run_rules
            if self._if_exists is not None:
                kwargs["if_exists"] = self._if_exists
            self.hook = open_run(Hook, self._previous, out_dir=self.out_dir, **kwargs)
            self._steps = StepCapture(self.hook)
        if before is not None:
            warn_next_run(*before, self._steps.hook.out_dir)
        return self._steps

    def _one_model_a_run(self, model: torch.nn.Module) -> tuple[str, str, str] | None:
        """Before an event of ``model``: a run holds the steps of one model, as with the Keras callback.

        Where the run holds steps of another model of another Trainer (the callback given to the Trainers of
        two models: a notebook's next experiment, a loop over configurations), it is closed, and the next one is
        the trial's next run (``out_dir/run-<n>``; with ``if_exists`` given, as that says), judged by fresh copies
        of the rules, its steps numbered as a first ``train()``'s. The same Trainer's new model (``model_init``
        makes one at each ``train()``: a resumed one, a hyperparameter search) goes on in the run. Returns the
        other model, the folder of its run and ``model``, described for the warning; else None.
        """
        handler = _handler()
        last = self._model
        self._model = (weakref.ref(model), _described(model), None if handler is None else weakref.ref(handler))
        held = self.hook if self.hook is not None else self._previous
        if last is None or last[0]() is model or held is None or held.step < 0:
            return None
        if handler is not None and last[2] is not None and last[2]() is handler:  # the same Trainer's
            return None
        earlier = (f"model {last[1]}", held.out_dir, f"another model {self._model[1]}")
        self.close()
        self._previous = None
        self._run_rules = self._rules.for_new_run()
        if "if_exists" not in self.hook_kwargs:
            self._if_exists = "new_run"
        return earlier

    def close(self, reason: str = "closed") -> None:
        """Write what is pending, publish it and mark this worker's run as ended.

        Idempotent; a later event of the trainer opens the run again. After a ``train()`` that raised, the end
        reason is ``exception`` until a ``train()`` begins.
        """
        if self._steps is not None:
            self._flush(None)
        if self.hook is not None:
            if self._raised is not None and reason == "closed":
                self.hook.close_for_exit("exception", self._raised)
            else:
                self.hook.close(reason)
            self._previous = self.hook
        self._steps = None
        self.hook = None

    # ------------------------------------------------------------- training
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        """Open the run; resumed from a checkpoint, the ``TRAIN`` steps are numbered on from its ``global_step``.

        After a ``train()`` that raised (a Ctrl-C in a notebook, an error in ``compute_metrics``)
        the run goes on: the step it finished is written with its logs, the step it left
        unfinished is dropped and its number taken by the next step, as the Trainer counts.
        """
        if self._training:  # the train() before never reached on_train_end: it raised
            self._end_raised_train()
        steps = self._open(args, kw.get("model"))
        self._training, self._loop, self._raised = True, _dispatcher(), None
        steps.hook.number_on(Mode.TRAIN, state.global_step)
        last = steps.hook.mode_steps.get(Mode.TRAIN, -1)
        if state.global_step <= last:
            logger.warning(
                "tensortap: train() goes on from the Trainer's global_step %d, but this run already holds TRAIN "
                "steps up to %d: its steps are numbered on from %d, not as the Trainer counts (give a new training "
                "a new out_dir)",
                state.global_step,
                last,
                last + 1,
            )

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        steps = self._steps
        if steps is not None:
            self._flush(kw.get("model"))
            steps.open_train()
            self._stepping = self._stepped = False

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        """Offer the gradients the optimizer is about to apply (clipped, unscaled), of the parameters it updates."""
        steps, model, optimizer = self._steps, kw.get("model"), kw.get("optimizer")
        if steps is None:
            return
        if model is not None and steps.open_train():
            named: Iterable[tuple[str, torch.Tensor]] = saved_parameters(unwrap(model))
            if optimizer is not None:  # a parameter outside it may have a gradient, which nothing applies
                stepped = {id(p) for p in optimized_parameters(optimizer)}
                named = ((name, p) for name, p in named if id(p) in stepped)
            steps.offer_gradients(named)
        self._stepping = True  # saved or not: a run a callback starts from now on is written after the step

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        """The optimizer stepped: a callback may raise, or the script die, before the step's end, which is written
        then (:meth:`_end_stepped`). Not before: an ``optimizer.step()`` that raises (out of memory) trained
        nothing, and the Trainer does not count the step."""
        if self._steps is not None and self._stepping:
            self._stepped = True
            self._steps.hook.end_at_exit = self._end_stepped

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        """The step is over: offer the weights it produced; it is written when the logs that follow it are in.

        Act on a stop request.
        """
        steps, model = self._steps, kw.get("model")
        if steps is None or self.hook is None:
            return
        self._step_ended(steps, model)
        # the script may die before the step is written (in the evaluation or checkpoint save after it):
        steps.hook.end_at_exit = functools.partial(self._flush, None) if self._pending else None
        hook = self.hook
        if agreed(hook.mode_step, self.stop_sync_steps, hook.stop_channel, hook.stop_poll_seconds, all_reduce_max()):
            log_stop(self.hook.stop_reason, "training")
            control.should_training_stop = True

    def _step_ended(self, steps: StepCapture, model: torch.nn.Module | None) -> None:
        """The open ``TRAIN`` step is over: it is pending, its weights (those of ``model`` now) offered."""
        self._pending, self._stepping, self._stepped = steps.train_open, False, False
        if self._pending and model is not None:
            steps.offer_parameters(saved_parameters(unwrap(model)))

    def _end_stepped(self) -> None:
        """Write the open ``TRAIN`` step, which passed its optimizer step but not its end (a callback raised in
        ``on_optimizer_step`` or ``on_step_end``, or the script dies there), with the weights of the model now,
        then the runs held for after it (:meth:`_holding`)."""
        if self._steps is not None:
            self._step_ended(self._steps, None if self._model is None else self._model[0]())
            self._flush(None)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: Mapping[str, Any] | None = None,
        **kw: Any,
    ) -> None:
        """Keep what was logged for the step it follows; the log of an epoch ends the epoch's last step.

        A value logged while an evaluation runs (in a ``compute_loss`` that ``evaluate`` calls too, the model
        in eval mode) is not the step's: it ends the pending step first.
        """
        if not logs:
            return
        model = kw.get("model")
        self._open(args, model)
        evaluating = model is not None and not model.training and not _is_training_log(logs)
        if evaluating and not self._epoch_ended and self._holding():  # an evaluation before the step's log
            self._held_logs.append(_Log(logs))
            return
        if (self._epoch_ended and not _is_training_log(logs)) or (self._pending and evaluating):
            self._flush(model)  # not the step's log (the summary of train(), an evaluation's): after it
        self._logs.append(_Log(logs))
        if self._epoch_ended:  # the epoch's log: the step is complete
            self._flush(model)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        """The epoch's last step stays pending for the log of the epoch that may follow (``logging_strategy``
        ``"epoch"``, or a callback's ``control.should_log``); any other log, or event, ends it first."""
        if self._pending:
            self._epoch_ended = True
        else:
            self._flush(kw.get("model"))

    def on_prediction_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        """An evaluation or prediction runs: a pending ``TRAIN`` step that has its log is complete, write it now.

        An evaluation that raises (a bug in ``compute_metrics``, out of memory, a Ctrl-C) cannot lose it then. A
        step whose log may still come is not complete (:meth:`_holding`); the run's step is held for after it.
        """
        self._end_if_train_raised()
        if self._pending and not self._holding():
            self._flush(kw.get("model"))

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: Mapping[str, Any] | None = None,
        **kw: Any,
    ) -> None:
        """Write the evaluation run's metrics as one ``EVAL`` step (they were just logged too: not twice)."""
        self._write_run(args, Mode.EVAL, metrics, kw.get("model"))

    def on_predict(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: Mapping[str, Any] | None = None,
        **kw: Any,
    ) -> None:
        """Write the metrics ``predict`` computed (``test_loss``, ...) as one ``PREDICT`` step."""
        self._write_run(args, Mode.PREDICT, metrics, kw.get("model"))

    def _write_run(
        self, args: TrainingArguments, mode: Mode, metrics: Mapping[str, Any] | None, model: torch.nn.Module | None
    ) -> None:
        """Write one evaluation or prediction run as a step of ``mode``; outside ``train``, close the run again.

        The logs that came during the run stay for the next step's end: a ``predict`` that a callback runs
        in ``on_evaluate`` comes before the evaluation's log is matched to its metrics here. A run within a
        ``TRAIN`` step before its optimizer step (a callback's ``trainer.evaluate()`` in ``on_substep_end``) saw
        the weights of the step before: it is written before the step, which goes on, with the same numbers.
        """
        steps = self._open(args, model)
        hold = self._holding()
        logs = self._held_logs if hold else self._logs
        for i in range(len(logs) - 1, -1, -1):
            if metrics and _holds(logs[i], metrics):
                del logs[i]
                break
        metrics = dict(metrics or {})
        if hold:  # written after the step, once its log is in it
            self._held.append((mode, metrics))
            return
        if self._pending:  # a run without a batch (on_prediction_step ends the step before it)
            self._flush(model)
        within = steps.train_open  # a callback's run within a step, before its optimizer step: the step goes on
        if within:
            steps.suspend_train()
        steps.write_step(mode, metrics)
        if within:
            steps.open_train()
        if not self._training:
            self.close()

    def _end_if_train_raised(self) -> None:
        """At an event from outside the ``train()`` begun last, which did not reach ``on_train_end``: it raised
        (a Ctrl-C in a notebook, an error in ``compute_metrics``), and this event is the next cell's
        (``evaluate()``, ``predict()``): end it (:meth:`_end_raised_train`)."""
        if self._training and self._loop is not None and not _running(self._loop):
            self._end_raised_train()

    def _end_raised_train(self) -> None:
        """The ``train()`` begun last raised: write the step it finished, with its logs, and drop the step it
        left unfinished before its optimizer step returned (one warning; an ``optimizer.step()`` that raised trained
        nothing), whose numbers the next ``TRAIN`` step takes, as the Trainer counts (one whose optimizer step
        returned is written: :meth:`_end_stepped`). Until a
        ``train()`` begins, the run's end reason is ``exception``."""
        stepped, self._training, self._loop, self._stepping, self._stepped = self._stepped, False, None, False, False
        self._raised = "train() raised (the Trainer then calls no on_train_end)"
        if stepped:  # it raised after the step's optimizer step: the step is complete
            self._end_stepped()
        elif self._steps is not None:
            if not self._pending:
                self._steps.drop_train(TrainInterrupted("the train() before raised in it"))
            self._flush(None)  # the step it finished, then the runs held for either step (an evaluation in it)

    def _holding(self) -> bool:
        """Whether an evaluation or prediction running now is held, to be written after the pending ``TRAIN`` step.

        The Trainer logs a step at most once: right after it (before it evaluates), or, when the step ends its
        epoch or the training and was not logged then, at the epoch's end, after an evaluation at it
        (``logging_strategy="epoch"``, a callback's ``control.should_log`` in ``on_epoch_end``); a run that a
        callback starts in ``on_step_end`` (``trainer.predict``) comes before the step's log. So a run at a
        pending step without its training log is held (from its start to the step's end) while the step's
        epoch goes on; once the epoch ended without a log, no log comes for the step. So is a run a callback starts
        after the optimizer step of the open step, before its end (``on_optimizer_step``, an ``on_step_end`` that
        runs before this callback's): it saw the step's weights. One before the optimizer step (in
        ``on_substep_end``, within a gradient accumulation window) is written at once (:meth:`_write_run`).
        """
        if self._stepping:  # a callback's run after the optimizer step, before the step's end: after the step too
            self._hold = True
        elif not self._hold and self._pending and not self._epoch_ended:
            self._hold = not any(_is_training_log(logs) for logs in self._logs)
        return self._hold

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self._training, self._loop = False, None
        self._flush(kw.get("model"))
        self.close()

    def _merged_logs(self) -> dict[str, Any]:
        """The logs since the last step's end, in one mapping; a key logged twice with two values (a ``loss``
        the user logs in ``compute_loss``, then the Trainer's) keeps the last, with one warning per key (not
        for the :data:`STAMPS` the Trainer puts on each log)."""
        logs: dict[str, Any] = {}
        for entry in self._logs:
            for key, value in entry.items():
                twice = key in logs and key not in STAMPS and not same_logged(logs[key], value)
                if twice and key not in self._warned_twice:
                    self._warned_twice.add(key)
                    logger.warning(
                        "tensortap: %r was logged twice in one step (%r, then %r); the last is saved "
                        "(log it under another name to keep both; this warning is not repeated)",
                        key,
                        logs[key],
                        value,
                    )
                logs[key] = value
        self._logs.clear()
        return logs

    def _flush(self, model: torch.nn.Module | None) -> None:
        """End the pending ``TRAIN`` step with the logs that came after it; other logs make a ``GLOBAL`` step."""
        self._epoch_ended = False
        steps = self._steps
        if steps is None:
            return
        logs = self._merged_logs()
        if self._pending:  # logged right after the step: they belong to it; its weights are offered
            if steps.hook.is_saving():
                steps.offer_logged(logs)
            elif logs and not self._warned_unsaved and _logs_included(steps.hook):
                self._warned_unsaved = True
                logger.warning(
                    "tensortap: the Trainer logged %s after TRAIN step %d, which the hook's save_config does not "
                    "save: not captured, nor at its other unsaved steps (give the logs their own save_config: "
                    'collection_configs={"losses": {"save_config": SaveConfig(save_interval=1)}, "metrics": ...})',
                    ", ".join(map(repr, sorted(logs))),
                    steps.hook.mode_steps.get(Mode.TRAIN, -1),
                )
            logs = {}
            self._pending = False
            steps.hook.end_at_exit = None
            steps.end_train(())
        elif steps.train_open:
            steps.end_train(saved_parameters(unwrap(model)) if model is not None else ())
        steps.write_step(Mode.GLOBAL, logs)
        self._hold = False
        for mode, metrics in self._held:  # the evaluation at the step: after it
            steps.write_step(mode, metrics)
        self._held.clear()
        if self._held_logs:  # what else was logged while it ran: a GLOBAL step after it, never the next TRAIN step
            self._logs.extend(self._held_logs)
            self._held_logs.clear()
            steps.write_step(Mode.GLOBAL, self._merged_logs())

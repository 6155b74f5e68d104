"""Rules on the course of training: loss not decreasing, overfit, overtraining, stalled."""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np

from ...config import TRAINING_DATA
from ...modes import Mode
from .actions import StopTraining
from .base import Requirement, Rule, check_bool, check_number, check_regexes
from .reading import LOSS_MODES, ModeSeries, Selection, judged_workers, on_worker, parse_mode, scalar_at

# a name part (between "/", "_", ".", "-") "val", "valid", "validation", "eval" or "test", in any
# case (``Valid``), optionally prefixed with "d" (``dtest``, ``dval``) and followed by digits (``test1``)
# the losses an adapter marked as computed on the training data itself (collection training_data)
TRAINING_SELECTION = Selection((TRAINING_DATA,), None, ())
VALIDATION_REGEX = r"(?i)(^|[/_.-])d?(val|valid|validation|eval|test)\d*([/_.-]|$)"
# a name part that says on which data a loss was computed: ``train``, ``dtrain``, ``training``, or a validation
# name part (``val``, ``dtest``, ``validation``, ``test1``...)
DATA_PART = re.compile(r"d?(train|training|val|valid|validation|eval|test)\d*")


def percent_change(before: float, now: float) -> float:
    """``100 * (now - before) / |before|``; with ``before == 0``: 0 if equal, else +-inf."""
    if before == 0:
        return 0.0 if now == 0 else float(np.sign(now) * np.inf)
    return 100.0 * (now - before) / abs(before)


class _EvaluationRuns(Rule):
    """A rule that judges a loss saved over a run of consecutive EVAL steps (one evaluation) once it is over.

    The run of a loss is the consecutive global steps, all EVAL steps, that
    saved it (Keras saves one validation loss per batch; so does a PyTorch
    evaluation loop calling the loss module given to ``capture``). It is over
    at the next saved step that does not continue it (:meth:`runs_over`), or
    when the training ends (:meth:`on_training_end`); its value is the mean of
    the loss over the run (Keras's ``val_loss``). Subclasses extend runs
    (:meth:`extend_run`) and judge those over (:meth:`judge_runs`).

    On a trial of several workers, each worker's loss is a series of its own
    (each rank's loss is that of its own batches): the rules key their state by
    the loss of one worker, ``"losses/loss on worker_1"``
    (:func:`~tensortap.trial.rules.reading.on_worker`), and their reasons show it
    so; on a trial of one worker, by the loss's name.
    """

    def __init__(self, base_trial: Any) -> None:
        super().__init__(base_trial)
        # per loss, its run not over yet: first and last global step, first and last mode step
        self.open_runs: dict[str, list[int]] = {}

    def source(self, loss: str) -> tuple[str, str | None]:
        """The tensor name and the worker (None on a trial of one worker) of ``loss``, as
        :func:`~tensortap.trial.rules.reading.on_worker` names it."""
        name, on, worker = loss.rpartition(" on ")
        workers = self.base_trial.workers()
        return (name, worker) if on and len(workers) > 1 and worker in workers else (loss, None)

    def runs_over(self, step: int, names: Collection[str]) -> list[tuple[str, list[int]]]:
        """The runs (forgotten now) that ``step``, which saved ``names`` (losses as :meth:`source` reads them),
        does not continue, as ``(loss, run)``."""
        where = self.base_trial.mode_step(step)
        eval_step = where is not None and where[0] is Mode.EVAL
        over = [n for n, run in self.open_runs.items() if not eval_step or n not in names or step != run[1] + 1]
        return [(n, self.open_runs.pop(n)) for n in over]

    def extend_run(self, name: str, step: int, mode_step: int) -> None:
        """Add EVAL step ``step`` (mode step ``mode_step``) to the run of ``name``, or start one."""
        run = self.open_runs.get(name)
        self.open_runs[name] = [run[0] if run else step, step, run[2] if run else mode_step, mode_step]

    def run_values(self, loss: str, first: int, last: int) -> list[float]:
        """The values of ``loss`` (:meth:`source`) saved at global steps ``first`` to ``last`` (those that can be
        read)."""
        name, worker = self.source(loss)
        req = Requirement("losses")
        read = [scalar_at(self, self.base_trial, name, s, req, worker) for s in range(first, last + 1)]
        return [v for v in read if v is not None]

    def judge_runs(self, runs: list[tuple[str, list[int]]]) -> list[tuple[str, list[str]]]:
        """Judge ``runs``, which are over: ``(reason, tensors)`` for each failure found."""
        raise NotImplementedError

    def on_training_end(self, last_step: int) -> bool:
        """Judge the runs the training's last steps left open."""
        runs, self.open_runs = list(self.open_runs.items()), {}
        return self.fire_all(last_step, self.judge_runs(runs))

    def fire_all(self, step: int, failures: list[tuple[str, list[str]]]) -> bool:
        """Fire at ``step`` with every ``(reason, tensors)`` of ``failures``; False when there is none."""
        if not failures:
            return False
        return self.fire(step, "; ".join(r for r, _ in failures), [t for _, ts in failures for t in ts])


class LossNotDecreasing(_EvaluationRuns):
    """Fires when a loss has not decreased enough over ``num_steps`` steps.

    Formula, for each selected loss tensor and each of its modes ``M`` (``mode``,
    or each of EVAL, TRAIN, GLOBAL in which it has steps), on its own: steps
    below are mode steps of ``M``, and a training loss is compared with
    training losses, a validation loss with validation losses. The loss *at*
    a saved step ``s``, ``loss(s)``, is the mean of the values saved at steps
    ``s - window < step <= s`` (``window`` defaults to ``num_steps``): a
    mini-batch loss saved at every step is judged by its mean over the window,
    not by one batch's noise; saved every ``window`` steps or less often, it is
    the value saved at ``s`` alone (``window=1``: always, as smdebug).

    - Check steps: the first saved step ``s`` that has a saved step
      ``b <= s - num_steps``, then each first saved step ``>= last check + num_steps``.
      At a check step, ``b`` is the latest saved step ``<= s - num_steps`` and
      ``decrease = 100 * (loss(b) - loss(s)) / |loss(b)|``. Fires when
      ``decrease <= diff_percent``.
    - Between check steps: fires when the loss is more than
      ``increase_threshold_percent`` percent above its value at the last check step,
      judged once its window holds no step of the last check's window (``s - window
      >= last check``; with the default window, the next check comes first): two
      windows that share all but a few steps differ by those steps' noise.
    - At any saved step: fires when the loss is not finite (NaN, infinite).

    A loss saved at consecutive EVAL steps (Keras saves one validation loss per
    batch; so does a PyTorch evaluation loop calling the loss module given to
    ``capture``) is saved once per evaluation for this formula: each run of
    consecutive EVAL steps counts as one saved step, the mode step of its last
    EVAL step, whose value is the mean over the run (Keras's ``val_loss``). An
    evaluation is judged at the next saved step, which shows it is over, or when
    the training ends: in-process when the hook closes, offline and live once
    the runner has evaluated the last step of a trial whose training has ended
    (a last evaluation that fails fires at that step).

    Example: loss saved every 4 steps with 0.30, 0.33, 0.31, 0.30, 0.28 at steps
    0, 4, 8, 12, 16, ``num_steps=10``, ``window=1``: the first check is step 12
    (against step 0): decrease 0% <= 0%, fires. Step 16 is not a check step (the
    next is >= 22) and 0.28 is below 0.30, so it does not fire. With the default
    ``window`` (10), ``loss(12)`` is the mean of steps 4, 8 and 12 (0.3133): it rose
    4.4% from 0.30, fires; ``loss(16)`` (steps 8, 12, 16) shares steps with it and
    is not judged before the next check.

    A run of an ended training that could make no check (no loss saved
    ``num_steps`` steps after an earlier one of its mode: a training too short)
    lacks inputs and says so (:meth:`~tensortap.rules.Rule.not_judged`): not a
    pass (while the training runs, more steps may come).

    Needs: collection ``losses`` (scalars), saved over more than ``num_steps`` steps of a mode.

    Parameters
    ----------
    base_trial
        The trial to inspect.
    collection_names
        Collections of losses to inspect, in addition to ``losses``.
    tensor_regex
        Regexes of loss tensor names, in addition.
    use_losses_collection
        Inspect the ``losses`` collection. Default True.
    num_steps
        Steps between checks, and the least distance to the step compared. Default 10.
    diff_percent
        Least decrease, in percent, the loss must show at a check. Default ``0.0``.
    increase_threshold_percent
        Largest increase, in percent of the last checked value, tolerated between checks. Default ``5.0``.
    mode
        Mode of the steps judged (``"TRAIN"``, ``"EVAL"``, ...); default: each of EVAL, TRAIN, GLOBAL.
    window
        Steps whose saved values are averaged into the loss at a step; default ``num_steps``, 1: no mean.
    """

    state_attrs = ("last_checked", "last_value", "open_runs", "judged", "span")
    state_version = 2  # last_checked, last_value: per mode and loss (hunt 44), per loss before

    def __init__(
        self,
        base_trial: Any = None,
        collection_names: str | Sequence[str] | None = None,
        tensor_regex: str | Sequence[str] | None = None,
        use_losses_collection: bool = True,
        num_steps: int = 10,
        diff_percent: float = 0.0,
        increase_threshold_percent: float = 5.0,
        mode: Mode | str | None = None,
        window: int | None = None,
    ) -> None:
        super().__init__(base_trial)
        num_steps = check_number("num_steps", num_steps, 1, integer=True)
        if window is not None:
            window = check_number("window", window, 1, integer=True)
        diff_percent = check_number("diff_percent", diff_percent)
        increase_threshold_percent = check_number("increase_threshold_percent", increase_threshold_percent, 0)
        use_losses_collection = check_bool("use_losses_collection", use_losses_collection)
        names = [*((collection_names,) if isinstance(collection_names, str) else collection_names or ())]
        if use_losses_collection:
            names.append("losses")
        if not names and tensor_regex is None:
            raise ValueError(
                "LossNotDecreasing: nothing to inspect; give collection_names or tensor_regex, "
                "or keep use_losses_collection=True"
            )
        self.selection = Selection(",".join(names) or None, tensor_regex, ())
        self.num_steps, self.diff_percent = num_steps, diff_percent
        self.increase_threshold_percent = increase_threshold_percent
        self.mode = parse_mode(mode)
        self.series = ModeSeries((self.mode,) if self.mode is not None else LOSS_MODES)
        self.window = num_steps if window is None else window
        # per series (series_key: a loss in one mode), its last check: mode step and value
        self.last_checked: dict[str, int] = {}
        self.last_value: dict[str, float] = {}
        self.judged = False  # a check (or a loss that is not finite) was judged
        # the most mode steps between the first saved step of a loss's series and a later one (None: no loss seen)
        self.span: int | None = None
        self._values: dict[str, dict[int, float | None]] = {}  # per series, {global step: value} of recent windows
        # per loss judged in EVAL mode, its run of EVAL steps not over yet: first and last global, mode step
        self.open_runs: dict[str, list[int]] = {}
        self._evaluations: dict[str, list[tuple[int, int]]] = {}  # per such loss, its runs over: (mode step, global)
        self._run_first: dict[str, dict[int, int]] = {}  # per such loss, {last global step of a run: its first}

    def required_captures(self) -> list[Requirement]:
        return self.selection.requirements()

    def invoke_at_step(self, step: int) -> bool:
        trial = self.base_trial
        names = self.selection.names_for(self, step, Requirement("losses"))
        saved = [(n, w) for n in names for w in judged_workers(trial, n, step)]
        failures = self.judge_runs(self.runs_over(step, [on_worker(n, w) for n, w in saved]))
        failures += [(r, [n]) for n, w in saved if (r := self._check(step, n, w)) is not None]
        return self.fire_all(step, failures)

    def _check(self, step: int, name: str, worker: str | None) -> str | None:
        found = self.series.at(self.base_trial, name, step, worker)
        if found is None:
            return None
        mode, ms, series, i = found
        if mode is Mode.EVAL:
            self.extend_run(on_worker(name, worker), step, ms)
            return None
        return self._judge(on_worker(name, worker), mode, series, i)

    def judge_runs(self, runs: list[tuple[str, list[int]]]) -> list[tuple[str, list[str]]]:
        return [(r, [self.source(loss)[0]]) for loss, run in runs if (r := self._judge_run(loss, run)) is not None]

    def _judge_run(self, name: str, run: list[int]) -> str | None:
        """Judge the evaluation of loss ``name`` (:meth:`source`) saved over ``run``, which is over."""
        first, last, first_ms, last_ms = run
        evaluations = self._evaluations.get(name)
        if evaluations is None:  # the runs over before this one, as the trial saved them
            evaluations = self._evaluations[name] = []
            runs = self._run_first[name] = {}
            tensor, worker = self.source(name)
            found = self.series.at(self.base_trial, tensor, last, worker)
            for ms, g in found[2] if found is not None else ():
                if g >= first:
                    break
                if evaluations and g == evaluations[-1][1] + 1:
                    runs[g] = runs.pop(evaluations[-1][1])
                    evaluations[-1] = (ms, g)
                else:
                    runs[g] = g
                    evaluations.append((ms, g))
        evaluations.append((last_ms, last))
        self._run_first[name][last] = first
        steps = f"EVAL steps {first_ms}-{last_ms}" if first_ms != last_ms else None
        return self._judge(name, Mode.EVAL, evaluations, len(evaluations) - 1, steps)

    def _judge(
        self, name: str, mode: Mode, series: list[tuple[int, int]], i: int, steps: str | None = None
    ) -> str | None:
        """The reason the loss at ``series[i]`` fails, or None (``steps``: the EVAL steps of an evaluation)."""
        ms = series[i][0]
        key = series_key(name, mode)
        self.span = max(self.span or 0, ms - series[0][0])
        now = self._loss(key, name, series, i)
        if now is None:
            return None
        where = steps or (f"{mode.name} step {ms}" if mode is not Mode.GLOBAL else f"step {ms}")
        if not math.isfinite(now):
            self.judged = True
            return f"{name}: loss {now:.4g} at {where}{self._over(mode, series, i)} is not finite"
        last = self.last_checked.get(key)
        if last is not None and ms < last + self.num_steps:
            if ms - self.window < last:  # its window holds steps of the last check's: one batch's noise apart
                return None
            rise = percent_change(self.last_value[key], now)
            if rise > self.increase_threshold_percent:
                return (
                    f"{name}: loss {now:.4g} at {where}{self._over(mode, series, i)} is {rise:.3g}% above "
                    f"{self.last_value[key]:.4g} at the last check ({mode.name} step {last}; "
                    f"increase_threshold_percent {self.increase_threshold_percent:g})"
                )
            return None
        b = bisect.bisect_right(series, (ms - self.num_steps, float("inf"))) - 1
        if b < 0:
            return None
        before = self._loss(key, name, series, b)
        if before is None:
            return None
        self.last_checked[key], self.last_value[key] = ms, now
        self.judged = True
        decrease = -percent_change(before, now) + 0.0  # no "-0%"
        if decrease <= self.diff_percent:
            return (
                f"{name}: loss {now:.4g} at {where}{self._over(mode, series, i)} {change_words(decrease)} from "
                f"{before:.4g} at {mode.name} step {series[b][0]}{self._over(mode, series, b)} "
                f"(num_steps {self.num_steps}; needs a decrease > {self.diff_percent:g}%)"
            )
        return None

    def _first(self, series: list[tuple[int, int]], i: int) -> int:
        """The index in ``series`` of the first saved step of the window that ends at ``series[i]``."""
        return bisect.bisect_right(series, (series[i][0] - self.window, float("inf")), 0, i)

    def _over(self, mode: Mode, series: list[tuple[int, int]], i: int) -> str:
        """``" (mean of 10 saved steps)"`` where the loss at ``series[i]`` (of ``mode``) is a mean, else ``""``."""
        n = i + 1 - self._first(series, i)
        unit = "evaluations" if mode is Mode.EVAL else "saved steps"
        return f" (mean of {n} {unit})" if n > 1 else ""

    def _loss(self, key: str, name: str, series: list[tuple[int, int]], i: int) -> float | None:
        """The loss at ``series[i]`` of series ``key`` (loss ``name`` in one mode): the mean of the values saved
        in its window (None: none could be read).

        Values are read once and kept while a later window may hold them.
        """
        first = self._first(series, i)
        kept = self._values.setdefault(key, {})
        values = []
        for _, g in series[first : i + 1]:
            if g not in kept:
                kept[g] = self._read(name, g)
            v = kept[g]
            if v is not None:
                values.append(v)
        if i == len(series) - 1:  # the newest step: forget what no later window or check reaches
            oldest = series[self._first(series, max(first - 1, 0))][1]
            for g in [g for g in kept if g < oldest]:
                del kept[g]
        return float(np.mean(values)) if values else None

    def _read(self, name: str, g: int) -> float | None:
        """The loss saved at global step ``g``, or the mean over the evaluation that ends there; None: unreadable."""
        values = self.run_values(name, self._run_first.get(name, {}).get(g, g), g)
        return float(np.mean(values)) if values else None

    def not_judged(self) -> str | None:
        """A loss saved ``num_steps`` apart, while no check could be made by the end of the training (no saved
        step that far back; no loss at all is told by :meth:`Selection.need_in_trial`)."""
        if self.judged or not self.base_trial.training_ended or self.span is None:
            return None
        return (
            f"a loss saved at two steps of one mode at least num_steps={self.num_steps} steps apart to judge "
            f"(parameter num_steps): its saved steps span {self.span} step(s) at most; lower num_steps, or train "
            "longer"
        )


def series_key(name: str, mode: Mode) -> str:
    """The key of the series of loss ``name`` in ``mode`` (a string: kept in a rule's state, JSON)."""
    return f"{mode.name}:{name}"


def metric_key(name: str) -> tuple[str, ...]:
    """The metric of loss ``name``: its name parts (split at ``/``, ``_``, ``.``, ``-``, in lower case) without
    those that say on which data it was computed (:data:`DATA_PART`, with a number part right after one:
    ``validation_0``).

    ``losses/loss`` and ``losses/val_loss``, ``losses/train-logloss`` and ``losses/validation-logloss``,
    ``losses/validation_0-logloss`` and ``losses/validation_1-logloss`` have the same metric.
    """
    key: list[str] = []
    after_data = False
    for part in re.split(r"[/_.-]", name.lower()):
        if DATA_PART.fullmatch(part):
            after_data = True
            continue
        if not (after_data and part.isdigit()):  # else the number of a data set: validation_0
            key.append(part)
        after_data = False
    return tuple(key)


def finite(values: dict[str, float]) -> dict[str, float]:
    """``values`` without those that are not finite (NaN, +-inf)."""
    return {n: v for n, v in values.items() if np.isfinite(v)}


def change_words(decrease: float) -> str:
    """``"rose 1.6%"``, ``"did not change"`` or ``"decreased only 0.5%"`` for a decrease in percent."""
    if decrease < 0:
        return f"rose {-decrease:.2g}%"
    if decrease == 0:
        return "did not change"
    return f"decreased only {decrease:.2g}%"


class _TrainValidation(_EvaluationRuns):
    """Splits the losses saved at a step into training losses and validations, and judges each validation
    with the training losses saved since the previous one (:meth:`judge`).

    A loss is a training loss when it is in collection ``training_data``;
    otherwise a validation loss when its name matches ``validation_regex`` or it
    was saved at an EVAL step; the others are training losses.

    A validation is one evaluation of the model: the validation losses saved at
    one step that is not an EVAL step (XGBoost's ``validation-logloss`` of a
    round), or those saved over a run of consecutive EVAL steps (one per batch of
    Keras's validation, or of a PyTorch evaluation loop), averaged per loss
    (:class:`_EvaluationRuns`).
    """

    def __init__(self, base_trial: Any, tensor_regex: str | Sequence[str] | None, validation_regex: str) -> None:
        super().__init__(base_trial)
        check_regexes("validation_regex", [validation_regex])
        self.validation = re.compile(validation_regex)
        self.selection = Selection(None if tensor_regex else ("losses",), tensor_regex, ())
        self.train_values: dict[str, list[float]] = {}  # per training loss, its values since the last validation

    def required_captures(self) -> list[Requirement]:
        return self.selection.requirements() or [Requirement("losses")]

    def is_validation(self, name: str, training: Collection[str], eval_step: bool) -> bool:
        """Whether loss ``name`` is a validation loss (``training``: the names in collection ``training_data``)."""
        return name not in training and (eval_step or bool(self.validation.search(name)))

    def invoke_at_step(self, step: int) -> bool:
        return self.fire_all(step, self._judge_all(self.losses(step)))

    def judge_runs(self, runs: list[tuple[str, list[int]]]) -> list[tuple[str, list[str]]]:
        validation = self._validation(runs)
        return self._judge_all([validation] if validation is not None else [])

    def _judge_all(self, losses: list[tuple[str, dict[str, float], str]]) -> list[tuple[str, list[str]]]:
        """Keep the training losses; judge each validation with those kept, which are then forgotten."""
        failures = []
        for kind, values, where in losses:
            if kind == "training":
                for n, v in values.items():
                    self.train_values.setdefault(n, []).append(v)
                continue
            for worker in dict.fromkeys(self.source(n)[1] for n in values):  # each worker with its own losses
                ours = {n: v for n, v in values.items() if self.source(n)[1] == worker}
                mine = {n: vs for n, vs in self.train_values.items() if self.source(n)[1] == worker}
                training = {n: float(np.mean(vs)) for n, vs in mine.items()}
                failed = self.judge(training, ours, where)
                failures += [(r, list(dict.fromkeys(self.source(t)[0] for t in ts))) for r, ts in failed]
                self.train_values = {n: vs for n, vs in self.train_values.items() if n not in mine}
            # a validation consumes the training values of every worker but those evaluating still (their
            # validation is judged once their run is over), as it does on a trial of one worker: a worker that
            # never validates (each DDP rank but rank 0) keeps none, so the state stays bounded
            evaluating = {self.source(n)[1] for n in self.open_runs}
            self.train_values = {n: vs for n, vs in self.train_values.items() if self.source(n)[1] in evaluating}
        return failures

    def judge(
        self, training: dict[str, float], validation: dict[str, float], where: str
    ) -> list[tuple[str, list[str]]]:
        """Judge one validation: ``(reason, tensors)`` for each failure found.

        Parameters
        ----------
        training
            The training losses saved since the previous validation: ``{loss: the mean of its values}``.
        validation
            The validation: ``{validation loss: value}`` (a mean over its EVAL steps).
        where
            The step(s) it was saved at.
        """
        raise NotImplementedError

    def training_of(self, name: str, training: Collection[str], validation: Collection[str]) -> list[str]:
        """The training losses of the metric of validation loss ``name`` (:func:`metric_key` of its tensor,
        :meth:`source`).

        With none: all of ``training`` when they are of one metric and ``validation`` (the validation's
        losses) holds ``name`` alone (``loss`` and ``val_ce``); else none.
        """
        keys = {n: metric_key(self.source(n)[0]) for n in (name, *training)}
        same = [n for n in training if keys[n] == keys[name]]
        if same or len(validation) > 1 or len({keys[n] for n in training}) != 1:
            return same
        return list(training)

    def losses(self, step: int) -> list[tuple[str, dict[str, float], str]]:
        """The losses to judge at ``step``, in the order they were computed.

        Each is ``(kind, {loss: value}, where)``: ``kind`` ``"training"`` for the
        training losses saved at ``step``, ``"validation"`` for a validation (its
        losses averaged over its EVAL steps), ``where`` the step(s) it was saved at.
        A validation over EVAL steps that ``step`` does not continue comes first.
        """
        train, val, eval_step = self.split(step)
        over = self.runs_over(step, val if eval_step else ())
        validation = self._validation(over)
        found = [validation] if validation is not None else []
        if train:
            found.append(("training", finite(train), f"step {step}"))
        if eval_step:
            where = self.base_trial.mode_step(step)
            for n in val:
                self.extend_run(n, step, where[1])
        elif val:
            found.append(("validation", finite(val), f"step {step}"))
        return [f for f in found if f[1]]

    def _validation(self, runs: list[tuple[str, list[int]]]) -> tuple[str, dict[str, float], str] | None:
        """The validation of ``runs`` of EVAL steps, which are over (None: no run, or no finite value)."""
        if not runs:
            return None
        values = {n: [v for v in self.run_values(n, run[0], run[1]) if np.isfinite(v)] for n, run in runs}
        val = {n: float(np.mean(vs)) for n, vs in values.items() if vs}
        if not val:
            return None
        first, last = min(run[0] for _, run in runs), max(run[1] for _, run in runs)
        if first == last:
            return "validation", val, f"step {first}"
        return "validation", val, f"steps {first}-{last} (mean of its EVAL steps)"

    def split(self, step: int) -> tuple[dict[str, float], dict[str, float], bool]:
        """``({training loss: value}, {validation loss: value}, whether step is an EVAL step)`` at ``step``
        (values not finite included; losses of one worker each, as :meth:`source` reads them)."""
        trial = self.base_trial
        names = self.selection.names_for(self, step, Requirement("losses"))
        training = set(TRAINING_SELECTION.names(trial))
        where = trial.mode_step(step)
        eval_step = where is not None and where[0] is Mode.EVAL
        train: dict[str, float] = {}
        val: dict[str, float] = {}
        for n in names:
            for w in judged_workers(trial, n, step):
                v = scalar_at(self, trial, n, step, Requirement("losses"), w)
                if v is not None:
                    (val if self.is_validation(n, training, eval_step) else train)[on_worker(n, w)] = v
        return train, val, eval_step

    def check_both_kinds(self, step: int) -> None:
        """Record a missing input when no loss of the trial is a training loss, or none a validation loss.

        The lack of validation losses is only recorded once training has ended
        (they may come later, at the end of an epoch).
        """
        trial = self.base_trial
        names = self.selection.names(trial)
        if not names:
            return
        training = set(TRAINING_SELECTION.names(trial))
        val = [n for n in names if self.is_validation(n, training, False)]
        if len(val) == len(names):
            self.need(
                step,
                Requirement("losses"),
                f"no training loss: every loss ({', '.join(names)}) is a validation loss by its name "
                f"(validation_regex {self.validation.pattern!r}); evaluate on the training data too, e.g. "
                "evals=[(dtrain, 'train'), (dval, 'validation')], or eval_set=[(X_train, y_train), (X_val, y_val)] "
                "with the very objects given to fit (X[idx] written twice makes two copies)",
            )
        elif not val and trial.training_ended and not any(trial.tensor(n).steps(mode=Mode.EVAL) for n in names):
            self.need(
                step,
                Requirement("losses"),
                f"no validation loss: no loss ({', '.join(names)}) matches validation_regex "
                f"{self.validation.pattern!r} and none was saved at an EVAL step (in PyTorch, a loss "
                "computed by a function under no_grad is not captured, even one given to capture(..., loss=...): "
                "give capture a loss module, such as loss=nn.CrossEntropyLoss(), and call it, or "
                "hook.record_loss(val_loss, name='val_loss'))",
            )


class Overfit(_TrainValidation):
    """Fires when the validation loss exceeds the training loss by more than ``ratio_threshold`` for long.

    Formula: each training loss is averaged over its values saved since the
    previous validation; at each validation (below) judged at a step
    ``s >= start_step``, each validation loss ``v`` is compared with ``t``, the
    training loss of the same metric (below), ``ratio = (v - t) / |t|``. A
    validation with ``ratio > ratio_threshold`` counts one for that loss; any
    other resets its count. Fires when a count reaches ``patience``; the reason
    names the validation loss and the training loss it was compared with.

    Metrics are judged apart, never averaged together (``eval_metric=["logloss",
    "error"]``: ``validation-logloss`` against ``train-logloss``,
    ``validation-error`` against ``train-error``). The metric of a loss is its
    name without the name part that says on which data it was computed
    (``train``, ``training``, ``val``, ``valid``, ``validation``, ``eval``,
    ``test``, optionally ``d`` before and digits after, and a number part right
    after it: ``validation_0``): ``loss`` and ``val_loss``, ``out_loss`` and
    ``val_out_loss``, ``dtrain-rmse`` and ``dtest-rmse``, ``train-logloss-mean``
    and ``test-logloss-mean``, and a PyTorch ``losses/loss`` saved at TRAIN and
    at EVAL steps are pairs. A validation of one loss whose metric no training
    loss has is compared with the training losses when those are all of one
    metric (``loss`` and a validation loss named ``val_ce``); otherwise a
    validation loss without a training loss of its metric is not judged.

    A validation is the losses saved at one step that is not an EVAL step
    (XGBoost's ``validation-logloss`` of a round), or the mean of those saved
    over a run of consecutive EVAL steps (Keras's validation saves one per
    batch, as does a PyTorch evaluation loop calling the loss module given to
    ``capture``): one evaluation, not its first batch alone. Such a run is
    judged at the next saved step, which shows it is over, or when the training
    ends: in-process when the hook closes, offline and live once the runner has
    evaluated the last step of a trial whose training has ended (a last
    validation that fails fires at that step).

    Losses are those of collection ``losses`` (or ``tensor_regex``). A loss in
    collection ``training_data`` is a training loss (the XGBoost callback puts
    there the losses of an evaluation set that is the training data itself,
    such as ``validation_0`` of ``eval_set=[(X_train, y_train), (X_val, y_val)]``);
    otherwise a loss is a validation loss when its name matches
    ``validation_regex`` (``val_loss``, ``validation-logloss``, ``eval/...``,
    ``dtest-rmse``, ``validation_1-logloss``) or it was saved at an EVAL step;
    every other loss (``loss``, ``train-logloss``, ``dtrain-rmse``) is a
    training loss. Without training losses, or (on an ended trial) without
    validation losses (EVAL steps that saved no loss count as none), the rule
    cannot compare: it records the missing input
    (:attr:`~tensortap.rules.Rule.missing_inputs`), so the run raises
    :class:`~tensortap.exceptions.RuleInputsMissing` and ``tensortap rules`` exits 2.

    Needs: collection ``losses`` with training and validation losses.

    Parameters
    ----------
    base_trial
        The trial to inspect.
    tensor_regex
        Regexes of the loss tensors; default: collection ``losses``.
    start_step
        First global step compared. Default 0.
    patience
        Consecutive evaluations above the threshold that fire. Default 1.
    ratio_threshold
        Largest tolerated ``(validation - training) / training``. Default ``0.1``.
    validation_regex
        Which loss names are validation losses. Default matches ``val``, ``valid``,
        ``validation``, ``eval`` and ``test`` as name parts, in any case, optionally
        prefixed with ``d`` and followed by digits (``dtest``, ``Valid``, ``validation_1``, ``test2``).
    """

    state_attrs = ("train_values", "exceeded", "open_runs")
    state_version = 3  # keys: per loss and worker (hunt 56), per loss before; exceeded a count before session 45

    def __init__(
        self,
        base_trial: Any = None,
        tensor_regex: str | Sequence[str] | None = None,
        start_step: int = 0,
        patience: int = 1,
        ratio_threshold: float = 0.1,
        validation_regex: str = VALIDATION_REGEX,
    ) -> None:
        super().__init__(base_trial, tensor_regex, validation_regex)
        self.start_step = check_number("start_step", start_step, 0, integer=True)
        self.patience = check_number("patience", patience, 1, integer=True)
        self.ratio_threshold = check_number("ratio_threshold", ratio_threshold)
        self.exceeded: dict[str, int] = {}  # per validation loss, its validations in a row above the threshold

    def invoke_at_step(self, step: int) -> bool:
        if step < self.start_step:
            return False
        self.check_both_kinds(step)
        return super().invoke_at_step(step)

    def judge(
        self, training: dict[str, float], validation: dict[str, float], where: str
    ) -> list[tuple[str, list[str]]]:
        failures = []
        for name, v in validation.items():
            paired = self.training_of(name, training, validation)
            if not paired:
                continue
            t = float(np.mean([training[n] for n in paired]))
            ratio = (v - t) / abs(t) if t != 0 else math.copysign(math.inf, v - t) if v != t else 0.0
            self.exceeded[name] = self.exceeded.get(name, 0) + 1 if ratio > self.ratio_threshold else 0
            if self.exceeded[name] >= self.patience:
                reason = (
                    f"{name}: validation loss {v:.4g} is {ratio:.3g} x above training loss {t:.4g} of "
                    f"{', '.join(paired)} (> ratio_threshold {self.ratio_threshold:g} for {self.exceeded[name]} "
                    f"evaluation(s)) at {where}"
                )
                failures.append((reason, list(dict.fromkeys([name, *paired]))))
        return failures


class Overtraining(_TrainValidation):
    """Fires when the training or the validation loss has stopped improving.

    Formula: at each validation (one per run of EVAL steps, as in
    :class:`Overfit`), each of its losses ``v`` (its mean over the run), and
    each training loss ``t``, the mean of its values saved since the previous
    validation (one per batch in Keras and PyTorch: ``t`` is the epoch's
    training loss, as Keras's ``loss``). Each loss keeps a best and a counter
    (metrics are judged apart, never averaged together): a loss improves when
    ``best - x >= delta`` (or it is its first value), which sets ``best = x``
    and resets its counter; otherwise the counter grows by one. Fires while the
    counter of a training loss is ``>= patience_train`` or that of a validation
    loss is ``>= patience_validation``; the reason names the loss.
    Training and validation losses are told apart as in :class:`Overfit`;
    training losses saved after the last validation are not judged. Without
    training losses, or (on an ended trial) without validation losses, the rule
    records the missing input, as :class:`Overfit`.

    Needs: collection ``losses`` with training and validation losses.

    Parameters
    ----------
    base_trial
        The trial to inspect.
    patience_train
        Validations whose training losses (their mean since the previous validation) do not improve
        that fire. Default 5.
    patience_validation
        Validations without improvement that fire. Default 10.
    delta
        Least decrease that counts as an improvement. Default ``0.01``.
    tensor_regex
        Regexes of the loss tensors; default: collection ``losses``.
    validation_regex
        Which loss names are validation losses (as in :class:`Overfit`).
    """

    state_attrs = ("best", "since", "train_values", "open_runs")
    state_version = 3  # keys: per loss and worker (hunt 56), per loss before; per kind before session 45

    def __init__(
        self,
        base_trial: Any = None,
        patience_train: int = 5,
        patience_validation: int = 10,
        delta: float = 0.01,
        tensor_regex: str | Sequence[str] | None = None,
        validation_regex: str = VALIDATION_REGEX,
    ) -> None:
        super().__init__(base_trial, tensor_regex, validation_regex)
        self.patience = {
            "training": check_number("patience_train", patience_train, 1, integer=True),
            "validation": check_number("patience_validation", patience_validation, 1, integer=True),
        }
        self.delta = check_number("delta", delta, 0)
        # per kind ("training", "validation"), per loss: its best value, and the validations since it improved
        self.best: dict[str, dict[str, float]] = {"training": {}, "validation": {}}
        self.since: dict[str, dict[str, int]] = {"training": {}, "validation": {}}

    def invoke_at_step(self, step: int) -> bool:
        self.check_both_kinds(step)
        return super().invoke_at_step(step)

    def judge(
        self, training: dict[str, float], validation: dict[str, float], where: str
    ) -> list[tuple[str, list[str]]]:
        failures = []
        for kind, values in (("training", training), ("validation", validation)):
            best, since = self.best[kind], self.since[kind]
            for name, x in values.items():
                if name not in best or best[name] - x >= self.delta:
                    best[name], since[name] = x, 0
                else:
                    since[name] += 1
                if since[name] >= self.patience[kind]:
                    what = "mean since the previous validation, " if kind == "training" else ""
                    parameter = "train" if kind == "training" else kind
                    failures.append(
                        (
                            f"{name}: {kind} loss {x:.4g} ({what}validation at {where}) has not improved by "
                            f"{self.delta:g} on its best {best[name]:.4g} for {since[name]} validation(s) "
                            f"(patience_{parameter} {self.patience[kind]})",
                            [name],
                        )
                    )
        return failures


class StalledTraining(Rule):
    """Fires when a running training has saved no new step for ``threshold`` seconds.

    Formula: a live runner (``invoke_rule`` or ``tensortap rules --follow``)
    measures the time since the last new step appeared in the trial, while the
    training has not ended. Fires once per stall, at the last step seen, when
    that time exceeds ``threshold``. On an ended trial it never fires; in-process
    (``Hook(rules=[...])``) it cannot see stalls.

    Needs: nothing beyond any saved step.

    Parameters
    ----------
    base_trial
        The trial to inspect.
    threshold
        Seconds without a new step that fire. Default 1800.
    stop_training_on_fire
        Also ask the training to stop (as the :class:`~tensortap.rules.StopTraining` action). Default False.
    """

    state_attrs = ("stalled_at",)

    def __init__(self, base_trial: Any = None, threshold: float = 1800, stop_training_on_fire: bool = False) -> None:
        super().__init__(base_trial)
        self.threshold = check_number("threshold", threshold, 0)
        self.stalled_at = -2
        if check_bool("stop_training_on_fire", stop_training_on_fire):
            self.add_action(StopTraining())

    def invoke_at_step(self, step: int) -> bool:
        return False

    def on_idle(self, last_step: int, idle_seconds: float) -> bool:
        if idle_seconds <= self.threshold or self.stalled_at == last_step:
            return False
        self.stalled_at = last_step
        return self.fire(
            last_step, f"no new step for {idle_seconds:.0f} s after step {last_step} (threshold {self.threshold:g} s)"
        )
